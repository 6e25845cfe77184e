import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventMetadata(_message.Message):
    __slots__ = ("event_id", "event_type", "saga_id", "causation_id", "occurred_at", "traceparent", "tracestate", "deadline_ms", "source")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSATION_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    TRACESTATE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_type: str
    saga_id: str
    causation_id: str
    occurred_at: _timestamp_pb2.Timestamp
    traceparent: str
    tracestate: str
    deadline_ms: int
    source: str
    def __init__(self, event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., saga_id: _Optional[str] = ..., causation_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., traceparent: _Optional[str] = ..., tracestate: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("reason", "consumer", "stream", "subject", "stream_sequence", "deliveries", "headers", "payload", "dead_at", "replay_subject")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DEAD_AT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    consumer: str
    stream: str
    subject: str
    stream_sequence: int
    deliveries: int
    headers: _containers.ScalarMap[str, str]
    payload: bytes
    dead_at: _timestamp_pb2.Timestamp
    replay_subject: str
    def __init__(self, reason: _Optional[str] = ..., consumer: _Optional[str] = ..., stream: _Optional[str] = ..., subject: _Optional[str] = ..., stream_sequence: _Optional[int] = ..., deliveries: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., payload: _Optional[bytes] = ..., dead_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replay_subject: _Optional[str] = ...) -> None: ...
