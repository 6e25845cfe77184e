"""Request buffering for client-streaming retries: replay what was sent, up to a limit."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

__all__ = ["AsyncReplay", "Replay", "message_size"]


def message_size(message: Any) -> int:
    """Serialized size of a request message (protobuf ``ByteSize``, or ``len`` for bytes)."""
    size = getattr(message, "ByteSize", None)
    if size is not None:
        return int(size())
    if isinstance(message, bytes | bytearray | memoryview | str):
        return len(message)
    return 0


class Replay:
    """Buffers the messages a client stream sends so a retry can send them again.

    Each attempt iterates :meth:`attempt`; the buffer keeps every message pulled from
    the caller's iterator until it holds more than ``limit`` bytes. Past that the call
    is committed: :attr:`replayable` turns False and the buffer is dropped.
    """

    def __init__(self, source: Iterable[Any], limit: int) -> None:
        self._source = iter(source)
        self._items: list[Any] = []
        self._size = 0
        self._limit = limit
        self._lock = threading.Lock()
        self.replayable = True
        self._current: _ReplayIterator | None = None

    def attempt(self) -> Iterator[Any]:
        """A fresh iterator for the next attempt (the previous one stops yielding)."""
        if not self.replayable and self._current is not None:
            raise RuntimeError("the request stream is no longer replayable")
        if self._current is not None:
            self._current.closed = True
        self._current = _ReplayIterator(self)
        return self._current

    def _pull(self, index: int) -> tuple[Any, bool]:
        with self._lock:
            if index < len(self._items):
                return self._items[index], True
        item = next(self._source)  # StopIteration ends the attempt's stream
        with self._lock:
            if self.replayable:
                self._size += message_size(item)
                if self._size > self._limit:
                    self.replayable = False
                    self._items = []
                else:
                    self._items.append(item)
        return item, False


class _ReplayIterator:
    __slots__ = ("_index", "_replay", "closed")

    def __init__(self, replay: Replay) -> None:
        self._replay = replay
        self._index = 0
        self.closed = False

    def __iter__(self) -> _ReplayIterator:
        return self

    def __next__(self) -> Any:
        if self.closed:
            raise StopIteration
        item, _ = self._replay._pull(self._index)
        self._index += 1
        return item


class AsyncReplay:
    """The asyncio twin of :class:`Replay` (the source may be sync or async iterable)."""

    def __init__(self, source: AsyncIterable[Any] | Iterable[Any], limit: int) -> None:
        self._aiter: AsyncIterator[Any] | None = None
        self._iter: Iterator[Any] | None = None
        if hasattr(source, "__aiter__"):
            self._aiter = source.__aiter__()
        else:
            self._iter = iter(source)  # type: ignore[arg-type]
        self._items: list[Any] = []
        self._size = 0
        self._limit = limit
        self.replayable = True
        #: The caller's request stream has ended (the call is half-closed).
        self.source_done = False
        self._generation = 0

    def attempt(self) -> AsyncIterator[Any]:
        """A fresh async iterator for the next attempt (the previous one stops yielding)."""
        self._generation += 1
        return self._gen(self._generation)

    async def _gen(self, generation: int) -> AsyncIterator[Any]:
        index = 0
        while generation == self._generation:
            if index < len(self._items):
                item = self._items[index]
            else:
                try:
                    if self._aiter is not None:
                        item = await self._aiter.__anext__()
                    else:
                        assert self._iter is not None
                        item = next(self._iter)
                except (StopIteration, StopAsyncIteration):
                    self.source_done = True
                    return
                if self.replayable:
                    self._size += message_size(item)
                    if self._size > self._limit:
                        self.replayable = False
                        self._items = []
                    else:
                        self._items.append(item)
            index += 1
            yield item
