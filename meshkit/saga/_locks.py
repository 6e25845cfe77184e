"""Per-key asyncio locks that do not accumulate (one per saga or event being worked on)."""

from __future__ import annotations

import asyncio
import collections

__all__ = ["KeyedLocks"]


class KeyedLocks:
    """One lock per key, kept only while someone holds or waits for it.

    ``async with locks.hold(key):`` serializes work on one key (one saga's KV
    record, one inbox key) while different keys proceed concurrently, first come
    first served. A held key costs one dict entry, and a future only for each
    holder-to-be that has to wait: no lock object (every event takes a key or two,
    almost always uncontended). A holder hands the key straight to the first
    waiter, so a newcomer never overtakes one.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        # key -> its waiters, in arrival order (None: held, nobody waiting yet).
        self._held: dict[str, collections.deque[asyncio.Future[None]] | None] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, key: str) -> _Held:
        return _Held(self, key)

    async def _wait(self, key: str) -> None:
        """Wait for ``key``, held by someone else, to be handed over."""
        held = self._held
        waiters = held[key]
        if waiters is None:
            waiters = held[key] = collections.deque()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release(key)  # handed the key just as we were cancelled: pass it on
            elif turn in waiters:
                waiters.remove(turn)
            raise

    def _release(self, key: str) -> None:
        waiters = self._held[key]
        while waiters:
            turn = waiters.popleft()
            if not turn.done():  # a cancelled waiter is skipped
                turn.set_result(None)  # the key stays held: it is the waiter's now
                return
        del self._held[key]


class _Held:
    __slots__ = ("_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        held = self._locks._held
        if self._key in held:
            await self._locks._wait(self._key)
        else:
            held[self._key] = None

    async def __aexit__(self, *exc: object) -> None:
        self._locks._release(self._key)
