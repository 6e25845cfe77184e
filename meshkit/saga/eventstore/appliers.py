"""An aggregate's ``apply*`` methods: :class:`Appliers` finds them by the event
class each one's parameter is annotated with, and decodes and applies events."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from meshkit.errors import ConfigError
from meshkit.saga.envelope import type_name
from meshkit.saga.eventstore.errors import EventStoreError
from meshkit.saga.eventstore.events import StoredEvent

A = TypeVar("A")


class Appliers(Generic[A]):
    """The typed ``apply*`` methods of an aggregate class, by event type.

    An aggregate is any class; each method whose name starts with ``apply`` and
    whose one parameter is annotated with a protobuf message class handles that
    event type. This table is all the "framework" there is: print it to see it.
    """

    def __init__(self, cls: type[A]) -> None:
        self.cls = cls
        self.methods: dict[str, Callable[[A, Message], None]] = {}
        self.types: dict[str, type[Message]] = {}
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("apply"):
                continue
            try:
                hints = typing.get_type_hints(fn)
            except NameError as exc:
                raise ConfigError(
                    f"{cls.__name__}.{name}",
                    f"cannot resolve its annotations ({exc}); event classes must be "
                    "importable from the module that defines the aggregate",
                ) from None
            params = [p for p in inspect.signature(fn).parameters if p != "self"]
            if len(params) != 1:
                continue
            hint = hints.get(params[0])
            if isinstance(hint, type) and issubclass(hint, Message):
                full = type_name(hint)
                if full in self.methods:
                    raise ConfigError(f"{cls.__name__}.{name}", f"a second apply method for {full}")
                self.methods[full] = fn
                self.types[full] = hint
        if not self.methods:
            raise ConfigError(
                cls.__name__, "no apply methods (def apply_x(self, event: SomeEvent) -> None)"
            )

    def apply(self, aggregate: A, event: Message) -> None:
        """Call the method for ``event``'s type."""
        fn = self.methods.get(type_name(event))
        if fn is None:
            raise EventStoreError(f"{self.cls.__name__} has no apply method for {type_name(event)}")
        fn(aggregate, event)

    def decode(self, event: StoredEvent) -> Message:
        t = self.types.get(event.event_type)
        if t is None:
            raise EventStoreError(
                f"{event.subject} v{event.version}: {self.cls.__name__} has no apply method "
                f"for {event.event_type} (schema {event.schema_version})"
            )
        return event.decode(t)

    def __repr__(self) -> str:
        rows = ", ".join(f"{k} -> {v.__name__}" for k, v in self.methods.items())
        return f"Appliers({self.cls.__name__}: {rows})"
