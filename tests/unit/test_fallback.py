"""Fallback policy values and the last-good cache."""

from __future__ import annotations

import pytest

from meshkit.resilience.clock import FakeClock
from meshkit.resilience.fallback import (
    FallbackKind,
    FallbackPolicy,
    FallbackTrigger,
    LastGoodCache,
)

pytestmark = pytest.mark.unit


def test_policy_defaults_and_value() -> None:
    p = FallbackPolicy(value_json='{"items":[],"total":0}')
    assert p.kind is FallbackKind.DEFAULT
    assert p.value == {"items": [], "total": 0}
    v = p.value
    assert v is not None
    v["total"] = 5
    assert p.value == {"items": [], "total": 0}  # a fresh dict every time
    assert p.handles("circuit_open")
    assert p.handles(FallbackTrigger.RETRIES_EXHAUSTED)
    assert not p.handles("rate_limited")


def test_policy_is_hashable_and_immutable() -> None:
    p = FallbackPolicy(kind=FallbackKind.ERROR, value_json=None, code="UNAVAILABLE")
    assert hash(p) == hash(FallbackPolicy(kind=FallbackKind.ERROR, value_json=None))
    with pytest.raises(AttributeError):
        p.kind = FallbackKind.CACHED  # type: ignore[misc]
    assert p.value is None


def test_cache_returns_the_last_good_response_per_method_and_request() -> None:
    c = LastGoodCache()
    c.put("/s.S/A", b"req1", b"resp1")
    c.put("/s.S/A", b"req1", b"resp1-newer")
    c.put("/s.S/A", b"req2", b"resp2")
    c.put("/s.S/B", b"req1", b"other")
    assert c.get("/s.S/A", b"req1") == b"resp1-newer"
    assert c.get("/s.S/A", b"req2") == b"resp2"
    assert c.get("/s.S/B", b"req1") == b"other"
    assert c.get("/s.S/A", b"req3") is None
    assert len(c) == 3


def test_cache_max_age() -> None:
    clock = FakeClock()
    c = LastGoodCache(clock=clock)
    c.put("/s.S/A", b"r", b"v")
    clock.advance(10)
    assert c.get("/s.S/A", b"r", max_age=30) == b"v"
    assert c.get("/s.S/A", b"r", max_age=5) is None
    assert c.get("/s.S/A", b"r") == b"v"


def test_cache_is_bounded_by_entries_lru() -> None:
    c = LastGoodCache(max_entries=2)
    c.put("m", b"1", b"a")
    c.put("m", b"2", b"b")
    assert c.get("m", b"1") == b"a"  # 1 is now the most recently used
    c.put("m", b"3", b"c")  # evicts 2
    assert c.get("m", b"2") is None
    assert c.get("m", b"1") == b"a"
    assert c.get("m", b"3") == b"c"


def test_cache_is_bounded_by_bytes() -> None:
    c = LastGoodCache(max_bytes=10)
    c.put("m", b"1", b"x" * 6)
    c.put("m", b"2", b"y" * 6)  # 12 bytes: the oldest goes
    assert c.get("m", b"1") is None
    assert c.size_bytes == 6
    c.put("m", b"3", b"z" * 11)  # larger than the whole cache: not kept
    assert c.get("m", b"3") is None
    c.clear()
    assert (len(c), c.size_bytes) == (0, 0)
