import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SagaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAGA_STATE_UNSPECIFIED: _ClassVar[SagaState]
    SAGA_STATE_RUNNING: _ClassVar[SagaState]
    SAGA_STATE_COMPLETED: _ClassVar[SagaState]
    SAGA_STATE_COMPENSATING: _ClassVar[SagaState]
    SAGA_STATE_COMPENSATED: _ClassVar[SagaState]
    SAGA_STATE_FAILED: _ClassVar[SagaState]
    SAGA_STATE_TIMED_OUT: _ClassVar[SagaState]
SAGA_STATE_UNSPECIFIED: SagaState
SAGA_STATE_RUNNING: SagaState
SAGA_STATE_COMPLETED: SagaState
SAGA_STATE_COMPENSATING: SagaState
SAGA_STATE_COMPENSATED: SagaState
SAGA_STATE_FAILED: SagaState
SAGA_STATE_TIMED_OUT: SagaState

class SagaStep(_message.Message):
    __slots__ = ("event_id", "event_type", "source", "causation_id", "at", "compensation")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CAUSATION_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_type: str
    source: str
    causation_id: str
    at: _timestamp_pb2.Timestamp
    compensation: bool
    def __init__(self, event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., source: _Optional[str] = ..., causation_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., compensation: _Optional[bool] = ...) -> None: ...

class SagaStatus(_message.Message):
    __slots__ = ("saga_id", "saga_type", "state", "steps", "started_at", "updated_at", "deadline", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    SAGA_TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    saga_type: str
    state: SagaState
    steps: _containers.RepeatedCompositeFieldContainer[SagaStep]
    started_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., saga_type: _Optional[str] = ..., state: _Optional[_Union[SagaState, str]] = ..., steps: _Optional[_Iterable[_Union[SagaStep, _Mapping]]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class SagaTimedOut(_message.Message):
    __slots__ = ("saga_id", "last_event_type")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    last_event_type: str
    def __init__(self, saga_id: _Optional[str] = ..., last_event_type: _Optional[str] = ...) -> None: ...
