"""The resilience interceptors over real loopback gRPC: one suite, sync and aio.

Every test runs twice (``mesh`` is parametrized over ``sync`` and ``aio``): servers
and clients of that flavour, the same assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

import meshkit.deadline
from meshkit import Policy
from meshkit._compat import grpcio as grpcio_compat
from meshkit.grpc import parse_pushback
from tests.integration._echo import OTHER_UNARY, Mesh, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SVC = "meshkit.test.Echo"
FAST_RETRY = {
    "max_attempts": 4,
    "initial_backoff": "5ms",
    "max_backoff": "20ms",
    "retryable_codes": ["UNAVAILABLE"],
}


@pytest.fixture(params=["sync", "aio"])
async def mesh(request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    m = Mesh(request.param)
    try:
        yield m
    finally:
        await m.close()


# grpc core encodes a timeout of 1s to 10s in units of 10ms, rounding up, and measures it
# against a cached clock: the server may see up to 10ms more than the client granted.
GRPC_TIMEOUT_ROUNDING = 0.011


def policy(rule: dict[str, Any], defaults: dict[str, Any] | None = None) -> Policy:
    return Policy.from_dict(
        {"defaults": defaults or {"timeout": "5s"}, "rules": [{"match": SVC, **rule}]}
    )


async def expect_error(coro: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        await coro
    return info.value


# -- retries ---------------------------------------------------------------------------


async def test_fails_twice_then_succeeds_on_third_attempt(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    out = await client.unary({"key": "k", "fail": [{"code": "UNAVAILABLE", "times": 2}]})
    assert out["n"] == 3
    assert out["prev"] == 2  # x-meshkit-previous-attempts on the third attempt
    assert srv.script.total("k") == 3


async def test_invalid_argument_is_tried_once(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(client.unary({"key": "k", "code": "INVALID_ARGUMENT"}))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert srv.script.total("k") == 1


async def test_gives_up_after_max_attempts(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(client.unary({"key": "k", "code": "UNAVAILABLE"}))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("k") == 4


async def test_pushback_delays_the_retry(mesh: Mesh) -> None:
    p = policy({"retry": {**FAST_RETRY, "initial_backoff": "1ms", "max_backoff": "1ms"}})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    start = time.monotonic()
    out = await client.unary(
        {"key": "k", "fail": [{"code": "UNAVAILABLE", "times": 1, "pushback_ms": 300}]}
    )
    assert out["n"] == 2
    assert time.monotonic() - start >= 0.3


async def test_negative_pushback_stops_retrying(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(
        client.unary({"key": "k", "fail": [{"code": "UNAVAILABLE", "times": 3, "pushback_ms": -1}]})
    )
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("k") == 1


async def test_retries_never_sleep_past_the_deadline(mesh: Mesh) -> None:
    p = policy(
        {"retry": {**FAST_RETRY, "initial_backoff": "5s", "max_backoff": "5s", "jitter": "none"}}
    )
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    start = time.monotonic()
    err = await expect_error(client.unary({"key": "k", "code": "UNAVAILABLE"}, timeout=1.0))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 0.9  # gave up at once instead of sleeping 5s
    assert srv.script.total("k") == 1


async def test_total_outage_stays_within_the_retry_budget(mesh: Mesh) -> None:
    retry = {
        **FAST_RETRY,
        "max_attempts": 5,
        "initial_backoff": "1ms",
        "max_backoff": "1ms",
        "budget": {"ratio": 0.2, "min_per_second": 0.1},
    }
    p = policy({"retry": retry})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    calls = 40
    for _ in range(calls):
        await expect_error(client.unary({"key": "outage", "code": "UNAVAILABLE"}))
    attempts = srv.script.total("outage")
    # 1 reserve retry (0.1/s x 10s ttl) + 0.2 per call: far below the 5x without a budget.
    assert calls < attempts <= calls * 1.2 + 2


# -- deadlines -------------------------------------------------------------------------


async def test_deadline_shrinks_across_three_hops(mesh: Mesh) -> None:
    p = policy({}, defaults={"deadline_margin": "50ms"})
    c = await mesh.server(p)
    b = await mesh.server(p)
    a = await mesh.server(p)
    client = mesh.client(p, a.target)
    req = {
        "key": "hop",
        "next": {"target": b.target, "request": {"key": "hop", "next": {"target": c.target}}},
    }
    out = await client.unary(req, timeout=3.0)
    da, db, dc = (
        out["deadline"],
        out["downstream"]["deadline"],
        out["downstream"]["downstream"]["deadline"],
    )
    assert 0 < dc < db < da <= 3.0 + GRPC_TIMEOUT_ROUNDING
    # Two margins of 50ms were taken off, less the transit time each hop regains (a
    # hop's deadline starts when the call arrives): generous for a loaded machine.
    assert da - dc >= 0.02


@pytest.mark.parametrize("budget", [0.3, 2.0, 20.0, 200.0])
async def test_deadline_never_grows_across_hops(mesh: Mesh, budget: float) -> None:
    # grpc-timeout is rounded up on the wire (10 ms steps at 2 s, 1 s at 200 s) and the
    # server's deadline lands later still: each hop must see no more than its caller had.
    p = Policy.from_dict({"defaults": {}})
    c = await mesh.server(p)
    b = await mesh.server(p)
    a = await mesh.server(p)
    client = mesh.client(p, a.target)
    req = {
        "key": "hop",
        "next": {"target": b.target, "request": {"key": "hop", "next": {"target": c.target}}},
    }
    out = await client.unary(req, timeout=budget)
    da = out["deadline"]
    db = out["downstream"]["deadline"]
    dc = out["downstream"]["downstream"]["deadline"]
    assert 0 < dc <= db <= da <= budget
    # ... and the correction costs little: two steps of the budget's magnitude per hop.
    assert da >= budget * 0.97 - 0.1


async def test_spent_deadline_fails_before_sending(mesh: Mesh) -> None:
    p = policy({})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    with meshkit.deadline.scope(0.001):
        await asyncio.sleep(0.01)
        err = await expect_error(client.unary({"key": "k"}))
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert srv.script.total("k") == 0


async def test_configured_timeout_applies(mesh: Mesh) -> None:
    # 1s rather than less: the first call on a fresh channel also sets up the connection,
    # which a loaded 2-core machine can stretch past a few hundred milliseconds.
    p = policy({"timeout": "1s"})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    out = await client.unary({"key": "k"})
    assert 0 < out["deadline"] <= 1.0 + GRPC_TIMEOUT_ROUNDING
    err = await expect_error(client.unary({"key": "slow", "delay": 4.0}))
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED


# -- streams ---------------------------------------------------------------------------


async def test_stream_retried_before_its_first_message(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    got = await client.server_stream(
        {"key": "s", "count": 3, "fail": [{"code": "UNAVAILABLE", "times": 1}]}
    )
    assert [m["i"] for m in got] == [0, 1, 2]
    assert srv.script.total("s") == 2
    # The handler saw the deadline at every message (a sync generator gets it per next()).
    assert all(0 < m["deadline"] <= 5.0 + GRPC_TIMEOUT_ROUNDING for m in got)


async def test_stream_not_retried_after_its_first_message(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(
        client.server_stream({"key": "s", "count": 2, "fail_after": "UNAVAILABLE"})
    )
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert len(err.received) == 2  # type: ignore[attr-defined]
    assert srv.script.total("s") == 1


async def test_client_stream_is_replayed_on_retry(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    reqs = [{"key": "cs", "fail": [{"code": "UNAVAILABLE", "times": 2}]}, {"i": 1}, {"i": 2}]
    out = await client.client_stream(reqs)
    assert out["n"] == 3
    assert out["received"] == 3  # every message sent again on the third attempt


async def test_client_stream_written_after_the_call_returned_is_replayed(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    reqs = [{"key": "w", "fail": [{"code": "UNAVAILABLE", "times": 1}]}, {"i": 1}, {"i": 2}]
    out = await client.client_stream_fed(reqs)
    assert out["received"] == 3
    assert srv.script.total("w") == 2


async def test_bidi_stream_is_retried_before_commit(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    # One request message: with more, grpc.aio may lose the race between writing the
    # next message and the server's status, and report INTERNAL "Internal error from
    # Core" (not retryable) instead of UNAVAILABLE; see docs/interceptors.md.
    got = await client.bidi([{"key": "bd", "fail": [{"code": "UNAVAILABLE", "times": 1}]}])
    assert [m["n"] for m in got] == [2]
    assert srv.script.total("bd") == 2
    if mesh.kind == "sync":
        got = await client.bidi(
            [{"key": "bd2", "fail": [{"code": "UNAVAILABLE", "times": 1}]}, {"i": 1}]
        )
        assert [m["n"] for m in got] == [2, 2]
        assert got[1]["echo"] == {"i": 1}  # every message replayed on the second attempt


# -- hedging ---------------------------------------------------------------------------


async def test_hedging_fastest_attempt_wins_and_the_rest_are_cancelled(mesh: Mesh) -> None:
    p = policy(
        {"hedging": {"max_attempts": 3, "delay": "100ms", "non_fatal_codes": ["UNAVAILABLE"]}}
    )
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    start = time.monotonic()
    out = await client.unary({"key": "h", "delays": [3.0, 0.0]}, timeout=5.0)
    elapsed = time.monotonic() - start
    assert out["n"] == 2  # the second attempt answered
    assert out["prev"] == 1
    assert 0.09 <= elapsed < 2.0
    if mesh.kind == "aio" or grpcio_compat.FAST_PATHS["sync_future"]:
        assert await eventually(lambda: srv.script.cancelled["h"] == 1, timeout=2.5)
    # else: grpcio's public sync continuation cannot be cancelled, the loser runs to its
    # end (docs/interceptors.md, meshkit/_compat/grpcio.py; both ways in
    # tests/integration/test_compat_fallbacks.py)
    assert srv.script.total("h") == 2  # the third hedge was never needed


# -- circuit breaker -------------------------------------------------------------------


async def test_a_hedged_call_returns_at_once_and_cancels_every_attempt(mesh: Mesh) -> None:
    if mesh.kind == "sync" and not grpcio_compat.FAST_PATHS["sync_future"]:
        pytest.skip("without meshkit._compat's sync_future path a hedged .future() races first")
    p = policy({"hedging": {"max_attempts": 2, "delay": "50ms"}, "retry": None})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    start = time.monotonic()
    started = client.start_unary({"key": "h", "delay": 5.0}, timeout=10)
    assert time.monotonic() - start < 1.0  # sync .future() does not race before returning
    assert await eventually(lambda: srv.script.total("h") == 2)  # the hedge went too
    assert started.cancel()
    assert await client.code_of(started) is grpc.StatusCode.CANCELLED
    assert started.cancelled()
    assert await eventually(lambda: srv.script.cancelled["h"] == 2)


async def test_breaker_opens_fails_fast_probes_and_closes(mesh: Mesh) -> None:
    cb = {
        "window": {"type": "count", "size": 4},
        "minimum_calls": 4,
        "failure_rate_threshold": 0.5,
        "open_duration": "200ms",
        "half_open_calls": 1,
    }
    p = policy({"circuit_breaker": cb})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    for _ in range(4):
        err = await expect_error(client.unary({"key": "b", "code": "UNAVAILABLE"}))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("b") == 4
    start = time.monotonic()
    err = await expect_error(client.unary({"key": "b"}))
    assert time.monotonic() - start < 0.1
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert "circuit breaker" in (err.details() or "") and srv.target in (err.details() or "")
    pushback = parse_pushback(err.trailing_metadata())
    assert pushback is not None and 0 < pushback <= 0.2
    assert srv.script.total("b") == 4  # not sent
    (breaker,) = p.registry.breakers().values()
    assert str(breaker.state) == "OPEN"
    await asyncio.sleep(0.3)
    out = await client.unary({"key": "b"})  # the probe
    assert out["n"] == 5
    assert str(breaker.state) == "CLOSED"


# -- bulkheads, rate limits ------------------------------------------------------------


async def test_client_bulkhead_rejects_the_extra_call_fast(mesh: Mesh) -> None:
    p = policy({"bulkhead": {"max_concurrent": 2, "side": "client"}})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    slow = [asyncio.ensure_future(client.unary({"key": "slow", "delay": 0.8})) for _ in range(2)]
    assert await eventually(lambda: srv.script.in_flight == 2)
    start = time.monotonic()
    err = await expect_error(client.unary({"key": "extra"}))
    assert time.monotonic() - start < 0.2
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert parse_pushback(err.trailing_metadata()) is not None
    assert srv.script.total("extra") == 0
    await asyncio.gather(*slow)
    assert (await client.unary({"key": "after"}))["n"] == 1


async def test_server_bulkhead_rejects_the_extra_call_fast(mesh: Mesh) -> None:
    p = policy({"bulkhead": {"max_concurrent": 2, "side": "server"}})
    srv = await mesh.server(p)
    client = mesh.client(None, srv.target)
    slow = [asyncio.ensure_future(client.unary({"key": "slow", "delay": 0.8})) for _ in range(2)]
    assert await eventually(lambda: srv.script.in_flight == 2)
    start = time.monotonic()
    err = await expect_error(client.unary({"key": "extra"}))
    assert time.monotonic() - start < 0.3
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert parse_pushback(err.trailing_metadata()) is not None
    assert srv.script.total("extra") == 0
    await asyncio.gather(*slow)


async def test_server_rate_limit_by_caller_key(mesh: Mesh) -> None:
    p = policy({"rate_limit": {"rate": 1, "per": "10s", "burst": 2, "key": "metadata:x-api-key"}})
    srv = await mesh.server(p)
    client = mesh.client(None, srv.target)
    alice = (("x-api-key", "alice"),)
    for _ in range(2):
        await client.unary({"key": "r"}, metadata=alice)
    err = await expect_error(client.unary({"key": "r"}, metadata=alice))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = parse_pushback(err.trailing_metadata())
    assert pushback is not None and 5.0 < pushback <= 10.0
    assert srv.script.total("r") == 2
    out = await client.unary({"key": "r"}, metadata=(("x-api-key", "bob"),))
    assert out["n"] == 3  # another caller has its own bucket


# -- fault injection -------------------------------------------------------------------


async def test_fault_abort_100_percent_and_0_percent(mesh: Mesh) -> None:
    always = policy({"fault": {"abort": {"percent": 100, "code": "UNAVAILABLE"}}})
    srv = await mesh.server(always)
    client = mesh.client(None, srv.target)
    for _ in range(5):
        err = await expect_error(client.unary({"key": "f"}))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("f") == 0
    never = policy({"fault": {"abort": {"percent": 0, "code": "UNAVAILABLE"}}})
    srv2 = await mesh.server(never)
    client2 = mesh.client(None, srv2.target)
    for _ in range(5):
        await client2.unary({"key": "f"})
    assert srv2.script.total("f") == 5


async def test_fault_delay_and_envoy_headers(mesh: Mesh) -> None:
    p = policy({"fault": {"delay": {"percent": 100, "duration": "150ms"}, "allow_headers": True}})
    srv = await mesh.server(p)
    client = mesh.client(None, srv.target)
    start = time.monotonic()
    await client.unary({"key": "d"})
    assert time.monotonic() - start >= 0.15
    md = (("x-envoy-fault-abort-grpc-request", "8"), ("x-envoy-fault-delay-request", "0"))
    err = await expect_error(client.unary({"key": "d"}, metadata=md))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.script.total("d") == 1


async def test_client_side_fault_injection_is_opt_in(mesh: Mesh) -> None:
    p = policy({"fault": {"abort": {"percent": 100, "code": "UNAVAILABLE"}, "side": "client"}})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(client.unary({"key": "cf"}))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("cf") == 0


# -- fallbacks -------------------------------------------------------------------------

TYPED = "meshkit.test.Typed"


def typed_policy(fallback: dict[str, Any]) -> Policy:
    return Policy.from_dict(
        {
            "rules": [
                {
                    "match": TYPED,
                    "retry": {**FAST_RETRY, "max_attempts": 2},
                    "fallback": fallback,
                }
            ]
        }
    )


async def test_fallback_default_value(mesh: Mesh) -> None:
    p = typed_policy(
        {"on": ["retries_exhausted"], "kind": "default", "value": {"source": "fallback", "n": 0}}
    )
    srv = await mesh.server(typed=True)
    client = mesh.client(p, srv.target)
    out = await client.typed({"key": "t", "code": "UNAVAILABLE"})
    assert dict(out) == {"source": "fallback", "n": 0}
    assert srv.script.total("t") == 2
    err = await expect_error(client.typed({"key": "t2", "code": "NOT_FOUND"}))
    assert err.code() is grpc.StatusCode.NOT_FOUND  # business errors are not hidden


async def test_fallback_last_good_response(mesh: Mesh) -> None:
    p = typed_policy({"on": ["retries_exhausted"], "kind": "cached"})
    srv = await mesh.server(typed=True)
    client = mesh.client(p, srv.target)
    good = await client.typed({"key": "c"})
    assert good["n"] == 1
    # The server now fails every call; the same request is answered from the cache.
    srv.script.failure = lambda req, n: ("UNAVAILABLE", None)
    cached = await client.typed({"key": "c"})
    assert dict(cached) == dict(good)
    assert srv.script.total("c") == 3  # one good call, then two failed attempts
    err = await expect_error(client.typed({"key": "never-seen"}))
    assert err.code() is grpc.StatusCode.UNAVAILABLE  # nothing cached for this request


async def test_fallback_alternate_target(mesh: Mesh) -> None:
    backup = await mesh.server(typed=True)
    p = typed_policy({"on": ["retries_exhausted"], "kind": "alternate", "target": backup.target})
    primary = await mesh.server(typed=True)
    client = mesh.client(p, primary.target)
    primary.script.failure = lambda req, n: ("UNAVAILABLE", None)
    out = await client.typed({"key": "a"})
    assert out["port"] == backup.port
    assert primary.script.total("a") == 2 and backup.script.total("a") == 1


async def test_fallback_on_open_breaker(mesh: Mesh) -> None:
    p = Policy.from_dict(
        {
            "rules": [
                {
                    "match": TYPED,
                    "circuit_breaker": {"window": {"type": "count", "size": 2}, "minimum_calls": 2},
                    "fallback": {
                        "on": ["circuit_open"],
                        "kind": "default",
                        "value": {"source": "open"},
                    },
                }
            ]
        }
    )
    srv = await mesh.server(typed=True)
    client = mesh.client(p, srv.target)
    for _ in range(2):
        await expect_error(client.typed({"key": "o", "code": "UNAVAILABLE"}))
    out = await client.typed({"key": "o"})
    assert dict(out) == {"source": "open"}
    assert srv.script.total("o") == 2


# -- other services are not affected ---------------------------------------------------


async def test_rules_apply_per_service(mesh: Mesh) -> None:
    p = policy({"retry": FAST_RETRY})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(client.unary({"key": "o", "code": "UNAVAILABLE"}, method=OTHER_UNARY))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("o") == 1  # no rule for meshkit.test.Other: no retries


async def test_client_stream_past_the_buffer_is_not_retried(mesh: Mesh) -> None:
    p = policy({"retry": {**FAST_RETRY, "max_buffer_bytes": 128}})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    big = [{"key": "big", "fail": [{"code": "UNAVAILABLE", "times": 1}]}] + [
        {"pad": "x" * 50} for _ in range(3)
    ]
    err = await expect_error(client.client_stream(big, raw=True))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("big") == 1  # committed: the messages could not be replayed
    small = [{"key": "small", "fail": [{"code": "UNAVAILABLE", "times": 1}]}, {"i": 1}]
    out = await client.client_stream(small, raw=True)
    assert out["n"] == 2 and out["received"] == 2  # within the buffer: replayed


async def test_hedging_all_attempts_fail_returns_the_last_error(mesh: Mesh) -> None:
    p = policy(
        {"hedging": {"max_attempts": 3, "delay": "50ms", "non_fatal_codes": ["UNAVAILABLE"]}}
    )
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    err = await expect_error(client.unary({"key": "hf", "code": "UNAVAILABLE"}, timeout=5.0))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert srv.script.total("hf") == 3
    err = await expect_error(client.unary({"key": "fatal", "code": "INVALID_ARGUMENT"}))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert srv.script.total("fatal") == 1  # a fatal status ends the race at once


async def test_stream_permits_are_released(mesh: Mesh) -> None:
    p = policy({"bulkhead": {"max_concurrent": 1, "side": "both"}, "retry": FAST_RETRY})
    srv = await mesh.server(p)
    client = mesh.client(p, srv.target)
    for _ in range(3):
        got = await client.server_stream({"key": "sp", "count": 2})
        assert len(got) == 2
        got = await client.bidi([{"key": "bp"}, {"i": 1}])
        assert len(got) == 2
    assert (await client.unary({"key": "after"}))["n"] == 1
    for bulkhead in p.registry.bulkheads().values():
        assert bulkhead.in_flight == 0


@pytest.mark.parametrize(("read", "cancel"), [(0, False), (0, True), (1, False), (1, True)])
async def test_abandoned_streams_give_their_permits_back(
    mesh: Mesh, read: int, cancel: bool
) -> None:
    # A caller that stops reading early (or never starts) must not keep the bulkhead
    # permit or the breaker's: with one permit, a leak would refuse every later call.
    p = policy(
        {
            "bulkhead": {"max_concurrent": 1},
            "retry": FAST_RETRY,
            "circuit_breaker": {"window": {"type": "count", "size": 4}, "minimum_calls": 4},
        }
    )
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    # A grpc.aio call dropped unfinished stays open inside grpcio (holding its permits,
    # rightly) until its deadline; cancelled calls and sync calls end at once.
    timeout = 0.5

    def released() -> bool:
        return all(b.in_flight == 0 for b in p.registry.bulkheads().values())

    for i in range(3):
        got = await client.abandon_server_stream(
            {"key": "ab", "count": 5}, read, cancel=cancel, timeout=timeout
        )
        assert got == read
        if mesh.kind == "aio" and not cancel:  # grpc.aio starts the call from a task
            assert await eventually(lambda i=i: srv.script.total("ab") == i + 1)
        assert await eventually(released)
    assert (await client.unary({"key": "after"}))["n"] == 1
    assert all(b.state.name == "CLOSED" for b in p.registry.breakers().values())


async def test_server_adaptive_limit_rejects_past_the_limit(mesh: Mesh) -> None:
    p = policy(
        {
            "adaptive_limit": {
                "algorithm": "aimd",
                "initial_limit": 2,
                "min_limit": 1,
                "max_limit": 2,
            }
        }
    )
    srv = await mesh.server(p)
    client = mesh.client(None, srv.target)
    slow = [asyncio.ensure_future(client.unary({"key": "slow", "delay": 0.8})) for _ in range(2)]
    assert await eventually(lambda: srv.script.in_flight == 2)
    err = await expect_error(client.unary({"key": "extra"}))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrency limit" in (err.details() or "")
    assert srv.script.total("extra") == 0
    await asyncio.gather(*slow)
    (limiter,) = p.registry.adaptive_limiters().values()
    assert limiter.in_flight == 0


async def test_client_rate_limit_and_rich_status(mesh: Mesh) -> None:
    from google.rpc import error_details_pb2, status_pb2

    p = policy({"rate_limit": {"rate": 1, "per": "10s", "burst": 1, "side": "both"}})
    srv = await mesh.server(p)
    client = mesh.client(p, srv.target)
    await client.unary({"key": "cr"})
    err = await expect_error(client.unary({"key": "cr"}))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.script.total("cr") == 1  # refused on the client, not sent
    # The server's own rejection carries a google.rpc.Status with RetryInfo.
    raw = mesh.client(None, srv.target)
    err = await expect_error(raw.unary({"key": "cr"}))
    details = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert 5.0 < info.retry_delay.ToTimedelta().total_seconds() <= 10.0


# -- every arity ---------------------------------------------------------------------------


STREAM_CALLS = {
    "server_stream": lambda c, key: c.server_stream({"key": key, "count": 2}),
    "client_stream": lambda c, key: c.client_stream([{"key": key}, {"i": 1}]),
    "bidi": lambda c, key: c.bidi([{"key": key}, {"i": 1}]),
}


@pytest.mark.parametrize("arity", list(STREAM_CALLS))
async def test_streaming_arities_refuse_before_sending(mesh: Mesh, arity: str) -> None:
    # A spent deadline, an open breaker, a client fault and a full client bulkhead each stop
    # a streaming call on the client: the server never sees it.
    run = STREAM_CALLS[arity]
    srv = await mesh.server()

    client = mesh.client(policy({}), srv.target)
    with meshkit.deadline.scope(0.001):
        await asyncio.sleep(0.01)
        err = await expect_error(run(client, "late"))
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    faulty = mesh.client(
        policy({"fault": {"side": "client", "abort": {"percent": 100, "code": "UNAVAILABLE"}}}),
        srv.target,
    )
    err = await expect_error(run(faulty, "faulted"))
    assert err.code() is grpc.StatusCode.UNAVAILABLE

    breaker = {"window": {"type": "count", "size": 2}, "minimum_calls": 2, "open_duration": "30s"}
    p = policy({"circuit_breaker": breaker})
    tripping = mesh.client(p, srv.target)
    for _ in range(2):
        await expect_error(tripping.unary({"key": "down", "code": "UNAVAILABLE"}))
    err = await expect_error(run(tripping, "open"))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert "circuit" in (err.details() or "").lower()

    full = policy({"bulkhead": {"max_concurrent": 1, "side": "client"}})
    crowded = mesh.client(full, srv.target)
    slow = asyncio.ensure_future(crowded.unary({"key": "slow", "delay": 0.6}))
    assert await eventually(lambda: srv.script.in_flight == 1)
    err = await expect_error(run(crowded, "crowded"))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await slow

    for key in ("late", "faulted", "open", "crowded"):
        assert srv.script.total(key) == 0, key


async def test_hung_streams_count_against_the_breaker(mesh: Mesh) -> None:
    # A stream whose first message never comes before the deadline is a failure for the
    # breaker, like a unary call that times out.
    breaker = {"window": {"type": "count", "size": 2}, "minimum_calls": 2, "open_duration": "30s"}
    p = policy({"circuit_breaker": breaker, "bulkhead": {"max_concurrent": 4}})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    for _ in range(2):
        err = await expect_error(
            client.server_stream({"key": "hung", "count": 1, "delay": 2.0}, timeout=0.2)
        )
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    err = await expect_error(client.server_stream({"key": "hung", "count": 1}, timeout=0.2))
    assert err.code() is grpc.StatusCode.UNAVAILABLE  # refused by the open breaker
    assert srv.script.total("hung") == 2
    assert [b.state.name for b in p.registry.breakers().values()] == ["OPEN"]
    assert await eventually(lambda: all(b.in_flight == 0 for b in p.registry.bulkheads().values()))


async def test_a_stream_cancelled_during_its_backoff_is_not_retried(mesh: Mesh) -> None:
    retry = {**FAST_RETRY, "initial_backoff": "400ms", "max_backoff": "400ms", "jitter": "none"}
    p = policy({"retry": retry, "bulkhead": {"max_concurrent": 1}})
    srv = await mesh.server()
    client = mesh.client(p, srv.target)
    req = {"key": "backoff", "count": 1, "fail": [{"code": "UNAVAILABLE", "times": 1}]}
    stream, reading = await client.open_server_stream(req)
    assert await eventually(lambda: srv.script.total("backoff") == 1)
    await asyncio.sleep(0.05)  # the first attempt has failed; the retry waits out 400ms
    assert stream.cancel()
    with pytest.raises((grpc.RpcError, asyncio.CancelledError)):
        await reading
    (bulkhead,) = p.registry.bulkheads().values()
    assert await eventually(lambda: bulkhead.in_flight == 0)
    await asyncio.sleep(0.5)  # past the backoff: no retry went out
    assert srv.script.total("backoff") == 1
    assert (await client.unary({"key": "next"}))["n"] == 1  # the permit is free
