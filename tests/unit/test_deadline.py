"""meshkit.deadline: the propagated deadline and the timeout of outgoing calls."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

import meshkit.deadline as dl
from meshkit.errors import DeadlineExceededError

pytestmark = pytest.mark.unit


def test_no_deadline_outside_a_call() -> None:
    assert dl.remaining() is None
    assert dl.absolute() is None
    assert dl.compute_timeout(None, None) is None


def test_timeout_is_the_smallest_of_explicit_configured_and_remaining() -> None:
    now = time.monotonic()
    token = dl.set_absolute(now + 10.0)
    try:
        assert dl.compute_timeout(None, None, 0.0, now=now) == pytest.approx(10.0)
        assert dl.compute_timeout(3.0, None, 0.0, now=now) == 3.0
        assert dl.compute_timeout(None, 2.0, 0.0, now=now) == 2.0
        assert dl.compute_timeout(3.0, 2.0, 0.0, now=now) == 2.0
        assert dl.compute_timeout(30.0, 20.0, 0.5, now=now) == pytest.approx(9.5)
    finally:
        dl.reset(token)
    assert dl.compute_timeout(3.0, 5.0) == 3.0


def test_spent_deadline_raises_without_sending() -> None:
    now = time.monotonic()
    token = dl.set_absolute(now + 0.004)
    try:
        with pytest.raises(DeadlineExceededError) as info:
            dl.compute_timeout(1.0, None, 0.005, now=now)
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert "not sent" in info.value.message
    finally:
        dl.reset(token)


def test_non_positive_explicit_timeout_raises() -> None:
    with pytest.raises(DeadlineExceededError):
        dl.compute_timeout(0.0, None)


def test_infinite_deadline_counts_as_none() -> None:
    token = dl.set_remaining(1e12)
    try:
        assert dl.remaining() is None
    finally:
        dl.reset(token)


def test_remaining_never_negative() -> None:
    token = dl.set_absolute(time.monotonic() - 5.0)
    try:
        assert dl.remaining() == 0.0
    finally:
        dl.reset(token)


def test_scope_never_extends_an_outer_deadline() -> None:
    with dl.scope(1.0):
        outer = dl.absolute()
        assert outer is not None
        with dl.scope(100.0):
            assert dl.absolute() == outer
        with dl.scope(0.5):
            inner = dl.absolute()
            assert inner is not None and inner < outer
        assert dl.absolute() == outer
    assert dl.absolute() is None


def test_deadline_is_per_thread_and_reset_afterwards() -> None:
    seen: list[float | None] = []
    token = dl.set_remaining(5.0)
    try:
        t = threading.Thread(target=lambda: seen.append(dl.remaining()))
        t.start()
        t.join()
        # A plain thread starts with an empty context: nothing leaks between handlers.
        assert seen == [None]
        # A copied context carries it (how meshkit's isolation pools run handlers).
        ctx = contextvars.copy_context()
        left = ctx.run(dl.remaining)
        assert left is not None and 4.0 < left <= 5.0
    finally:
        dl.reset(token)
    assert dl.remaining() is None


async def test_deadline_is_per_task() -> None:
    async def child(seconds: float) -> float | None:
        with dl.scope(seconds):
            await asyncio.sleep(0)
            return dl.remaining()

    a, b = await asyncio.gather(child(1.0), child(2.0))
    assert a is not None and b is not None and a < 1.0 < b <= 2.0
    assert dl.remaining() is None
