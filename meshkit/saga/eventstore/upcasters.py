"""Schema evolution: :class:`Upcasters` turn events stored in an old schema (or
under an old type name) into the current one as they are loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from meshkit.saga.eventstore.errors import EventStoreError
from meshkit.saga.eventstore.events import StoredEvent

Upcast = Callable[[bytes], "bytes | tuple[str, bytes]"]


class Upcasters:
    """Turns old event versions into new ones at load.

    Register one function per (event type, schema version it reads); it returns
    the payload of the next version, or ``(new type name, payload)`` when the
    type was renamed. Functions chain until no function matches.
    """

    def __init__(self) -> None:
        self._table: dict[tuple[str, int], Upcast] = {}

    def register(self, event_type: str, from_version: int, fn: Upcast) -> None:
        """Upcast ``event_type`` events of schema ``from_version`` to ``from_version + 1``."""
        key = (event_type, from_version)
        if key in self._table:
            raise ValueError(f"an upcaster for {event_type} v{from_version} is already registered")
        self._table[key] = fn

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcast], Upcast]:
        """Decorator form of :meth:`register`."""

        def deco(fn: Upcast) -> Upcast:
            self.register(event_type, from_version, fn)
            return fn

        return deco

    def upcast(self, event: StoredEvent) -> StoredEvent:
        """``event`` brought to the newest schema the registered functions know."""
        seen = 0
        while (fn := self._table.get((event.event_type, event.schema_version))) is not None:
            out = fn(event.data)
            etype, data = out if isinstance(out, tuple) else (event.event_type, out)
            event = replace(
                event,
                event_type=etype,
                data=data,
                schema_version=event.schema_version + 1,
                envelope=replace(event.envelope, event_type=etype),
            )
            seen += 1
            if seen > 1000:
                raise EventStoreError(f"upcasters for {event.event_type} loop")
        return event
