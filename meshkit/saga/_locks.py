"""Per-key asyncio locks that do not accumulate (one per saga or event being worked on)."""

from __future__ import annotations

import asyncio

__all__ = ["KeyedLocks"]


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class KeyedLocks:
    """One lock per key, kept only while someone holds or waits for it.

    ``async with locks.hold(key):`` serializes work on one key (one saga's KV
    record, one inbox key) while different keys proceed concurrently. A count of
    holders and waiters decides when to drop the lock, so a waiter never ends up
    on a lock that a newcomer no longer sees.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, key: str) -> _Held:
        return _Held(self, key)

    async def _acquire(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:
            self._unref(key, entry)
            raise
        return entry

    def _release(self, key: str, entry: _Entry) -> None:
        entry.lock.release()
        self._unref(key, entry)

    def _unref(self, key: str, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._entries[key]


class _Held:
    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: str) -> None:
        self._locks = locks
        self._key = key
        self._entry: _Entry | None = None

    async def __aenter__(self) -> None:
        self._entry = await self._locks._acquire(self._key)

    async def __aexit__(self, *exc: object) -> None:
        assert self._entry is not None
        self._locks._release(self._key, self._entry)
