"""The policy document: validation errors name the key path, rule precedence, registries."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from meshkit import Policy as PublicPolicy
from meshkit.config import MethodPolicy, Policy, parse_duration, parse_size
from meshkit.errors import ConfigError
from meshkit.resilience.adaptive import AdaptiveAlgorithm, AdaptiveLimitConfig
from meshkit.resilience.breaker import BreakerScope, CircuitBreakerConfig, WindowType
from meshkit.resilience.budget import RetryBudgetConfig
from meshkit.resilience.bulkhead import BulkheadConfig, LimitScope, Side
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.events import Event
from meshkit.resilience.fallback import FallbackKind, FallbackTrigger
from meshkit.resilience.ratelimit import RateLimitConfig
from meshkit.resilience.registry import ResilienceRegistry
from meshkit.resilience.retry import Jitter

pytestmark = pytest.mark.unit

ISSUE_YAML = """\
defaults: {timeout: 2s}
rules:
  - match: shop.v1.PaymentService
    timeout: 800ms
    retry: {max_attempts: 4, initial_backoff: 50ms, max_backoff: 2s, multiplier: 2, jitter: full,
            retryable_codes: [UNAVAILABLE, RESOURCE_EXHAUSTED], per_attempt_timeout: 300ms,
            budget: {ratio: 0.2, min_per_second: 10}}
    hedging: {max_attempts: 3, delay: 100ms, non_fatal_codes: [UNAVAILABLE]}
    circuit_breaker: {window: {type: count, size: 10}, failure_rate_threshold: 0.5, minimum_calls: 10,
            slow_call_duration: 1s, slow_call_rate_threshold: 1.0, open_duration: 30s, half_open_calls: 5,
            failure_codes: [UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN], scope: target}
    bulkhead: {max_concurrent: 10, max_wait: 0s}
    rate_limit: {rate: 100, per: 1s, burst: 20, key: "metadata:x-api-key"}
    fallback: {on: [circuit_open, bulkhead_full, retries_exhausted], kind: default, value: {}}
    fault: {delay: {percent: 10, duration: 200ms}, abort: {percent: 5, code: UNAVAILABLE}}
"""


def error_of(document: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Policy.from_dict(document)
    return info.value


# -- the issue's document ---------------------------------------------------------------------


def test_the_issue_document_compiles() -> None:
    policy = Policy.from_text(ISSUE_YAML, "mesh.yaml")
    mp = policy.for_method("/shop.v1.PaymentService/Charge")
    assert (mp.service, mp.method, mp.full_method) == (
        "shop.v1.PaymentService",
        "Charge",
        "/shop.v1.PaymentService/Charge",
    )
    assert mp.timeout == pytest.approx(0.8)
    assert mp.deadline_margin == pytest.approx(0.005)
    assert mp.retry is not None
    assert mp.retry.max_attempts == 4
    assert mp.retry.initial_backoff == pytest.approx(0.05)
    assert mp.retry.max_backoff == 2.0
    assert mp.retry.jitter is Jitter.FULL
    assert mp.retry.retryable_codes == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert mp.retry.per_attempt_timeout == pytest.approx(0.3)
    assert mp.retry.budget == RetryBudgetConfig(ratio=0.2, min_per_second=10, ttl=10)
    assert mp.hedging is not None
    assert (mp.hedging.max_attempts, mp.hedging.delay) == (3, pytest.approx(0.1))
    cb = mp.circuit_breaker
    assert cb is not None
    assert (cb.window_type, cb.window_size, cb.minimum_calls) == (WindowType.COUNT, 10, 10)
    assert (cb.failure_rate_threshold, cb.open_duration, cb.half_open_calls) == (0.5, 30.0, 5)
    assert cb.scope is BreakerScope.TARGET
    assert mp.bulkhead == BulkheadConfig(max_concurrent=10, max_wait=0.0)
    assert mp.rate_limit is not None
    assert (mp.rate_limit.rate, mp.rate_limit.burst) == (100.0, 20)
    assert mp.rate_limit.metadata_key == "x-api-key"
    assert mp.fallback is not None
    assert mp.fallback.on == {
        FallbackTrigger.CIRCUIT_OPEN,
        FallbackTrigger.BULKHEAD_FULL,
        FallbackTrigger.RETRIES_EXHAUSTED,
    }
    assert mp.fallback.value == {}
    assert mp.fault is not None
    assert (mp.fault.delay_percent, mp.fault.delay) == (10.0, pytest.approx(0.2))
    assert (mp.fault.abort_percent, mp.fault.abort_code) == (5.0, "UNAVAILABLE")
    assert mp.matched == ("defaults", "rules[0]")
    assert not mp.is_noop
    # The issue's own example trips the timeout budget check: 4 x 300ms > 800ms.
    assert any("worst case 1.55s" in w and w.startswith("rules[0]") for w in policy.warnings)


def test_policy_is_exported_from_meshkit() -> None:
    assert PublicPolicy is Policy


def test_yaml_and_json_files_load_alike(tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load(ISSUE_YAML.replace("{on:", "{'on':"))
    yfile = tmp_path / "mesh.yaml"
    yfile.write_text(ISSUE_YAML)
    jfile = tmp_path / "mesh.json"
    jfile.write_text(json.dumps(doc))
    a = Policy.load(yfile).for_method("shop.v1.PaymentService/Charge")
    b = Policy.load(jfile).for_method("shop.v1.PaymentService/Charge")
    assert a == b
    assert Policy.load(yfile).source == str(yfile)


def test_empty_documents() -> None:
    for doc in (None, {}, {"defaults": None, "rules": None}):
        mp = Policy.from_dict(doc).for_method("/a.B/C")
        assert mp.is_noop and mp.client_is_noop and mp.server_is_noop
        assert mp.timeout is None
    assert Policy.from_text("").for_method("/a.B/C").is_noop
    assert Policy.from_text("# nothing\n").warnings == []


# -- matching and precedence ----------------------------------------------------------------------

PRECEDENCE = {
    "defaults": {
        "timeout": "2s",
        "retry": {"max_attempts": 5, "jitter": "none"},
        "bulkhead": {"max_concurrent": 100},
    },
    "rules": [
        {"match": "shop.v1.Pay/Charge", "timeout": "300ms"},
        {"match": "shop.v1.Pay", "timeout": "1s", "retry": {"max_attempts": 2}},
        {"match": "shop.v1.Stock", "bulkhead": None, "retry": False},
    ],
}


def test_method_beats_service_beats_defaults() -> None:
    p = Policy.from_dict(PRECEDENCE)
    assert p.for_method("/shop.v1.Pay/Charge").timeout == pytest.approx(0.3)
    assert p.for_method("/shop.v1.Pay/Refund").timeout == 1.0
    assert p.for_method("/other.v1.X/Y").timeout == 2.0
    assert p.for_method("/shop.v1.Pay/Charge").matched == ("defaults", "rules[1]", "rules[0]")


def test_a_section_in_a_rule_replaces_the_whole_default_section() -> None:
    p = Policy.from_dict(PRECEDENCE)
    retry = p.for_method("/shop.v1.Pay/Refund").retry
    assert retry is not None
    assert retry.max_attempts == 2
    assert retry.jitter is Jitter.FULL  # the default's "none" is not merged in
    # A method rule that sets only a timeout keeps its service rule's retry.
    charge = p.for_method("/shop.v1.Pay/Charge").retry
    assert charge is not None and charge.max_attempts == 2
    defaults_retry = p.for_method("/x.Y/Z").retry
    assert defaults_retry is not None and defaults_retry.jitter is Jitter.NONE


def test_null_or_false_turns_a_default_section_off() -> None:
    mp = Policy.from_dict(PRECEDENCE).for_method("/shop.v1.Stock/Reserve")
    assert mp.retry is None
    assert mp.bulkhead is None
    assert mp.timeout == 2.0


def test_method_names_in_both_forms_and_service_lookup() -> None:
    p = Policy.from_dict(PRECEDENCE)
    assert p.for_method("/shop.v1.Pay/Charge") == p.for_method("shop.v1.Pay/Charge")
    svc = p.for_method("shop.v1.Pay")
    assert (svc.service, svc.method, svc.timeout) == ("shop.v1.Pay", "", 1.0)


def test_match_lists_and_leading_slash() -> None:
    p = Policy.from_dict(
        {"rules": [{"match": ["/a.v1.S/M", "b.v1.T"], "timeout": "1s"}]},
    )
    assert p.for_method("/a.v1.S/M").timeout == 1.0
    assert p.for_method("/b.v1.T/Any").timeout == 1.0
    assert p.for_method("/a.v1.S/Other").timeout is None


def test_compiled_once_and_cached() -> None:
    p = Policy.from_dict(PRECEDENCE)
    a = p.for_method("/shop.v1.Pay/Charge")
    assert p.for_method("/shop.v1.Pay/Charge") is a
    with pytest.raises(AttributeError):
        a.timeout = 5.0  # type: ignore[misc]


def test_concurrent_lookups_share_one_object() -> None:
    p = Policy.from_dict(PRECEDENCE)
    seen: list[MethodPolicy] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        mp = p.for_method("/shop.v1.Pay/Refund")
        with lock:
            seen.append(mp)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(mp is p.for_method("/shop.v1.Pay/Refund") for mp in seen)


def test_compiled_methods_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshkit.config.policy as config

    monkeypatch.setattr(config, "MAX_COMPILED_METHODS", 3)
    p = Policy.from_dict(PRECEDENCE)
    for i in range(10):
        assert p.for_method(f"/junk.S/M{i}").timeout == 2.0
    assert len(p._compiled) == 3


def test_noop_flags_per_side() -> None:
    p = Policy.from_dict(
        {
            "rules": [
                {"match": "a.S", "rate_limit": {"rate": 5}},
                {"match": "b.S", "timeout": "1s"},
                {"match": "c.S", "bulkhead": {"max_concurrent": 1, "side": "client"}},
            ]
        }
    )
    a = p.for_method("/a.S/M")
    assert (a.is_noop, a.client_is_noop, a.server_is_noop) == (False, True, False)
    b = p.for_method("/b.S/M")
    assert (b.is_noop, b.client_is_noop, b.server_is_noop) == (False, False, True)
    c = p.for_method("/c.S/M")
    assert (c.is_noop, c.client_is_noop, c.server_is_noop) == (False, False, True)
    assert p.for_method("/d.S/M").is_noop


def test_key_for() -> None:
    mp = Policy.from_dict({}).for_method("/shop.v1.Pay/Charge")
    assert mp.key_for("target", "h:1") == "h:1"
    assert mp.key_for("service", "h:1") == "h:1/shop.v1.Pay"
    assert mp.key_for("method", "h:1") == "h:1/shop.v1.Pay/Charge"
    assert mp.key_for("method") == "/shop.v1.Pay/Charge"


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("100us", 0.0001),
        ("0", 0.0),
        ("0s", 0.0),
        (" 3s ", 3.0),
        (3, 3.0),
        (0.5, 0.5),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "fast", "5 seconds", "-1s", -2, True, None, "1s2", "ms", [1]])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ConfigError, match="expected"):
        parse_duration(bad, "x")


def test_sizes() -> None:
    assert parse_size(1024) == 1024
    assert parse_size("64KiB") == 65536
    assert parse_size("1MiB") == 1 << 20
    assert parse_size("1MB") == 1_000_000
    with pytest.raises(ConfigError):
        parse_size("lots", "x")


def test_defaults_of_every_section() -> None:
    p = Policy.from_dict(
        {
            "defaults": {
                "retry": {},
                "hedging": {},
                "circuit_breaker": {},
                "bulkhead": {"max_concurrent": 4},
                "adaptive_limit": {},
                "rate_limit": {"rate": 7.5},
                "fallback": {},
                "fault": {},
            }
        }
    )
    mp = p.for_method("/a.B/C")
    assert mp.retry is not None
    assert (mp.retry.max_attempts, mp.retry.jitter, mp.retry.retryable_codes) == (
        3,
        Jitter.FULL,
        {"UNAVAILABLE"},
    )
    assert mp.retry.budget == RetryBudgetConfig()
    assert mp.retry.max_buffer_bytes == 1 << 20
    assert mp.circuit_breaker == CircuitBreakerConfig()
    assert mp.circuit_breaker.failure_codes == {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "INTERNAL",
        "UNKNOWN",
    }
    assert mp.bulkhead == BulkheadConfig(max_concurrent=4, max_wait=0.0)
    assert mp.bulkhead.scope is LimitScope.SERVICE and mp.bulkhead.side is Side.BOTH
    assert mp.adaptive_limit == AdaptiveLimitConfig()
    assert mp.adaptive_limit.algorithm is AdaptiveAlgorithm.GRADIENT2
    assert mp.rate_limit == RateLimitConfig(rate=7.5, per=1.0, burst=8, key="method")
    assert mp.fallback is not None and mp.fallback.kind is FallbackKind.DEFAULT
    assert mp.fault is not None and mp.fault.decide().is_noop
    assert mp.deadline_margin == 0.005


def test_rates_as_percentages_and_time_windows() -> None:
    mp = Policy.from_dict(
        {
            "defaults": {
                "circuit_breaker": {
                    "failure_rate_threshold": "50%",
                    "slow_call_rate_threshold": 0.8,
                    "window": {"type": "time", "size": "1m"},
                    "open_duration": "10s",
                    "open_duration_multiplier": 2,
                    "max_open_duration": "5m",
                    "scope": "method",
                    "automatic_transition": False,
                }
            }
        }
    ).for_method("/a.B/C")
    cb = mp.circuit_breaker
    assert cb is not None
    assert cb.failure_rate_threshold == 0.5
    assert (cb.window_type, cb.window_size) == (WindowType.TIME, 60)
    assert cb.open_duration_for(1) == 10 and cb.open_duration_for(3) == 40
    assert cb.open_duration_for(10) == 300
    assert cb.scope is BreakerScope.METHOD
    assert cb.automatic_transition is False


def test_fallback_kinds() -> None:
    p = Policy.from_dict(
        {
            "rules": [
                {"match": "a.S", "fallback": {"kind": "default", "value": {"items": [], "n": 1}}},
                {"match": "b.S", "fallback": {"kind": "default", "value": '{"x": true}'}},
                {"match": "c.S", "fallback": {"kind": "cached", "cache_ttl": "5m"}},
                {"match": "d.S", "fallback": {"kind": "alternate", "target": "backup:50051"}},
                {
                    "match": "e.S",
                    "fallback": {"kind": "error", "code": "unavailable", "message": "later"},
                },
                {"match": "f.S", "fallback": {"on": "rate_limited", "kind": "error"}},
            ]
        }
    )

    def fb(service: str) -> Any:
        return p.for_method(f"/{service}/M").fallback

    assert fb("a.S").value == {"items": [], "n": 1}
    assert fb("a.S").value_json == '{"items":[],"n":1}'
    assert fb("b.S").value == {"x": True}
    assert (fb("c.S").kind, fb("c.S").cache_ttl, fb("c.S").value) == (
        FallbackKind.CACHED,
        300.0,
        None,
    )
    assert fb("d.S").target == "backup:50051"
    assert (fb("e.S").code, fb("e.S").message) == ("UNAVAILABLE", "later")
    assert fb("f.S").on == {FallbackTrigger.RATE_LIMITED}


def test_rate_limit_keys() -> None:
    for key, expected in (
        ("method", "method"),
        ("peer", "peer"),
        ("metadata:X-Api-Key", "metadata:x-api-key"),
    ):
        mp = Policy.from_dict({"defaults": {"rate_limit": {"rate": 1, "key": key}}}).for_method(
            "/a.B/C"
        )
        assert mp.rate_limit is not None and mp.rate_limit.key == expected


# -- errors: every one names its key path --------------------------------------------------------

BAD: list[tuple[Any, str, str]] = [
    # (document, path, a fragment of the message)
    ([], "", "expected a mapping"),
    ({"default": {}}, "default", "did you mean 'defaults'"),
    ({"version": 2}, "version", "expected 1"),
    ({"rules": {}}, "rules", "expected a list of rules"),
    ({"rules": [{}]}, "rules[0].match", "missing required key"),
    ({"rules": ["x"]}, "rules[0]", "expected a mapping"),
    ({"rules": [{"match": 5}]}, "rules[0].match", "expected a service"),
    ({"rules": [{"match": "bad name"}]}, "rules[0].match", "expected a service"),
    ({"rules": [{"match": "a.S/M/X"}]}, "rules[0].match", "expected a service"),
    ({"rules": [{"match": ["a.S", 1]}]}, "rules[0].match[1]", "expected a service"),
    (
        {"rules": [{"match": "a.S"}, {"match": "a.S"}]},
        "rules[1].match",
        "already matched by rules[0]",
    ),
    ({"rules": [{"match": "a.S", "retries": {}}]}, "rules[0].retries", "did you mean 'retry'"),
    ({"defaults": {"match": "a.S"}}, "defaults.match", "unknown key"),
    ({"defaults": {"timeout": "fast"}}, "defaults.timeout", 'expected a duration like "250ms"'),
    ({"defaults": {"timeout": 0}}, "defaults.timeout", "expected a duration > 0"),
    ({"defaults": {"timeout": "-1s"}}, "defaults.timeout", "expected a"),
    ({"defaults": {"deadline_margin": "x"}}, "defaults.deadline_margin", "expected a duration"),
    (
        {"rules": [{"match": "a.S", "retry": {"max_attempts": "four"}}]},
        "rules[0].retry.max_attempts",
        'expected an integer >= 1, got "four"',
    ),
    ({"defaults": {"retry": {"max_attempts": 0}}}, "defaults.retry.max_attempts", ">= 1, got 0"),
    ({"defaults": {"retry": {"max_attempts": 2.5}}}, "defaults.retry.max_attempts", "integer"),
    ({"defaults": {"retry": {"max_attempts": True}}}, "defaults.retry.max_attempts", "integer"),
    ({"defaults": {"retry": {"jitter": "random"}}}, "defaults.retry.jitter", "one of none, full"),
    ({"defaults": {"retry": {"multiplier": 0.5}}}, "defaults.retry.multiplier", ">= 1"),
    (
        {"defaults": {"retry": {"initial_backoff": "1s", "max_backoff": "10ms"}}},
        "defaults.retry.max_backoff",
        "expected a duration >= initial_backoff (1s)",
    ),
    (
        {"defaults": {"retry": {"retryable_codes": []}}},
        "defaults.retry.retryable_codes",
        "non-empty",
    ),
    (
        {"defaults": {"retry": {"retryable_codes": ["UNAVAILBLE"]}}},
        "defaults.retry.retryable_codes[0]",
        "did you mean UNAVAILABLE",
    ),
    (
        {"defaults": {"retry": {"retryable_codes": ["UNAVAILABLE", "INVALID_ARGUMENT"]}}},
        "defaults.retry.retryable_codes[1]",
        "INVALID_ARGUMENT must never be retried",
    ),
    (
        {"defaults": {"retry": {"retryable_codes": ["NOT_FOUND"]}}},
        "defaults.retry.retryable_codes[0]",
        "must never be retried",
    ),
    (
        {"defaults": {"retry": {"retryable_codes": ["ABORTED"]}}},
        "defaults.retry.retryable_codes[0]",
        "retry at a higher level",
    ),
    (
        {"defaults": {"retry": {"per_attempt_timeout": 0}}},
        "defaults.retry.per_attempt_timeout",
        "> 0",
    ),
    ({"defaults": {"retry": {"budget": {"ratio": -1}}}}, "defaults.retry.budget.ratio", ">= 0"),
    ({"defaults": {"retry": {"budget": {"ttl": "1h"}}}}, "defaults.retry.budget.ttl", "1s to 10m"),
    ({"defaults": {"retry": {"budget": {"x": 1}}}}, "defaults.retry.budget.x", "unknown key"),
    (
        {"defaults": {"retry": {"max_buffer_bytes": "huge"}}},
        "defaults.retry.max_buffer_bytes",
        "size in bytes",
    ),
    ({"defaults": {"retry": "yes"}}, "defaults.retry", "expected a mapping"),
    ({"defaults": {"hedging": {"max_attempts": 11}}}, "defaults.hedging.max_attempts", "1 to 10"),
    (
        {"defaults": {"hedging": {"non_fatal_codes": ["PERMISSION_DENIED"]}}},
        "defaults.hedging.non_fatal_codes[0]",
        "must never be retried",
    ),
    (
        {"defaults": {"circuit_breaker": {"failure_rate_threshold": 50}}},
        "defaults.circuit_breaker.failure_rate_threshold",
        'a rate in (0, 1] such as 0.5, or a percentage such as "50%", got 50',
    ),
    (
        {"defaults": {"circuit_breaker": {"failure_rate_threshold": "0%"}}},
        "defaults.circuit_breaker.failure_rate_threshold",
        "a rate in (0, 1]",
    ),
    (
        {"defaults": {"circuit_breaker": {"window": {"type": "sliding"}}}},
        "defaults.circuit_breaker.window.type",
        "one of count, time",
    ),
    (
        {"defaults": {"circuit_breaker": {"window": {"size": 0}}}},
        "defaults.circuit_breaker.window.size",
        "an integer from 1 to 100000",
    ),
    (
        {"defaults": {"circuit_breaker": {"window": {"type": "time", "size": "1.5s"}}}},
        "defaults.circuit_breaker.window.size",
        "whole number of seconds",
    ),
    (
        {"defaults": {"circuit_breaker": {"window": {"kind": "time"}}}},
        "defaults.circuit_breaker.window.kind",
        "unknown key",
    ),
    (
        {"defaults": {"circuit_breaker": {"half_open_calls": 0}}},
        "defaults.circuit_breaker.half_open_calls",
        ">= 1",
    ),
    (
        {"defaults": {"circuit_breaker": {"open_duration_multiplier": 2}}},
        "defaults.circuit_breaker.max_open_duration",
        "needs a cap",
    ),
    (
        {"defaults": {"circuit_breaker": {"open_duration": "1m", "max_open_duration": "10s"}}},
        "defaults.circuit_breaker.max_open_duration",
        ">= open_duration (1m)",
    ),
    (
        {"defaults": {"circuit_breaker": {"failure_codes": ["OK"]}}},
        "defaults.circuit_breaker.failure_codes[0]",
        "OK is a success",
    ),
    (
        {"defaults": {"circuit_breaker": {"scope": "host"}}},
        "defaults.circuit_breaker.scope",
        "one of target, service, method",
    ),
    (
        {"defaults": {"circuit_breaker": {"automatic_transition": "yes"}}},
        "defaults.circuit_breaker.automatic_transition",
        "true or false",
    ),
    ({"defaults": {"bulkhead": {}}}, "defaults.bulkhead.max_concurrent", "missing required key"),
    (
        {"defaults": {"bulkhead": {"max_concurrent": -1}}},
        "defaults.bulkhead.max_concurrent",
        ">= 1",
    ),
    (
        {"defaults": {"bulkhead": {"max_concurrent": 1, "side": "edge"}}},
        "defaults.bulkhead.side",
        "one of client, server, both",
    ),
    (
        {"defaults": {"adaptive_limit": {"algorithm": "bbr"}}},
        "defaults.adaptive_limit.algorithm",
        "one of aimd, gradient2, vegas",
    ),
    (
        {"defaults": {"adaptive_limit": {"min_limit": 10, "max_limit": 5}}},
        "defaults.adaptive_limit.max_limit",
        ">= min_limit (10)",
    ),
    (
        {"defaults": {"adaptive_limit": {"initial_limit": 500}}},
        "defaults.adaptive_limit.initial_limit",
        "from min_limit (2) to max_limit (200)",
    ),
    (
        {"defaults": {"adaptive_limit": {"backoff_ratio": 0.1}}},
        "defaults.adaptive_limit.backoff_ratio",
        ">= 0.5",
    ),
    ({"defaults": {"rate_limit": {}}}, "defaults.rate_limit.rate", "missing required key"),
    ({"defaults": {"rate_limit": {"rate": 0}}}, "defaults.rate_limit.rate", "> 0"),
    ({"defaults": {"rate_limit": {"rate": 1, "per": 0}}}, "defaults.rate_limit.per", "> 0"),
    (
        {"defaults": {"rate_limit": {"rate": 1, "key": "header:x"}}},
        "defaults.rate_limit.key",
        '"method", "peer" or "metadata:<header name>"',
    ),
    (
        {"defaults": {"rate_limit": {"rate": 1, "key": "metadata:x-bin"}}},
        "defaults.rate_limit.key",
        "non-binary",
    ),
    (
        {"defaults": {"fallback": {"on": ["breaker_open"]}}},
        "defaults.fallback.on[0]",
        "one of circuit_open, bulkhead_full",
    ),
    ({"defaults": {"fallback": {"kind": "magic"}}}, "defaults.fallback.kind", "one of default"),
    ({"defaults": {"fallback": {"value": [1]}}}, "defaults.fallback.value", "a JSON object"),
    ({"defaults": {"fallback": {"value": "{nope"}}}, "defaults.fallback.value", "a JSON object"),
    (
        {"defaults": {"fallback": {"kind": "alternate"}}},
        "defaults.fallback.target",
        "missing required key for kind: alternate",
    ),
    (
        {"defaults": {"fallback": {"kind": "error", "value": {}}}},
        "defaults.fallback.value",
        "only applies to kind: default",
    ),
    (
        {"defaults": {"fallback": {"kind": "error", "code": "OK"}}},
        "defaults.fallback.code",
        "not OK",
    ),
    (
        {"defaults": {"fault": {"delay": {"percent": 10}}}},
        "defaults.fault.delay.duration",
        "missing required key",
    ),
    (
        {"defaults": {"fault": {"delay": {"percent": 101, "duration": "1s"}}}},
        "defaults.fault.delay.percent",
        "from 0 to 100",
    ),
    (
        {"defaults": {"fault": {"abort": {"code": "BROKEN"}}}},
        "defaults.fault.abort.code",
        "gRPC status code name",
    ),
    (
        {"defaults": {"fault": {"allow_headers": 1}}},
        "defaults.fault.allow_headers",
        "true or false",
    ),
]


@pytest.mark.parametrize(("document", "path", "fragment"), BAD, ids=[b[1] or "top" for b in BAD])
def test_every_error_names_its_key_path(document: Any, path: str, fragment: str) -> None:
    err = error_of(document)
    assert err.path == path
    assert fragment in str(err)
    if path:
        assert str(err).startswith(f"{path}: ")
    assert err.code == "FAILED_PRECONDITION"


def test_the_exact_error_format() -> None:
    err = error_of({"rules": [{"match": "a.S", "retry": {"max_attempts": "four"}}]})
    assert str(err) == 'rules[0].retry.max_attempts: expected an integer >= 1, got "four"'


def test_file_errors_carry_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(
        "defaults:\n  timeout: 2s\nrules:\n  - match: a.S\n    retry:\n      max_attempts: four\n"
    )
    with pytest.raises(ConfigError) as info:
        Policy.load(f)
    assert str(info.value) == (
        f'{f}:6:21: rules[0].retry.max_attempts: expected an integer >= 1, got "four"'
    )
    assert info.value.path == "rules[0].retry.max_attempts"


def test_unknown_keys_in_files_point_at_the_key(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text("defaults:\n  timeout: 2s\n  retries: {}\n")
    with pytest.raises(ConfigError, match=r"mesh.yaml:3:3: defaults.retries: unknown key"):
        Policy.load(f)


def test_yaml_syntax_errors_report_file_line_col(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("defaults:\n  timeout: [2s\nrules: []\n")
    with pytest.raises(ConfigError) as info:
        Policy.load(f)
    assert str(info.value).startswith(f"{f}:3:")


def test_yaml_duplicate_keys_are_errors(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text("defaults:\n  timeout: 2s\n  timeout: 3s\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3:3: .*duplicate key 'timeout'"):
        Policy.load(f)


def test_yaml_on_is_a_key_not_a_boolean() -> None:
    p = Policy.from_text("defaults:\n  fallback: {on: [rate_limited], kind: error}\n")
    fb = p.for_method("/a.B/C").fallback
    assert fb is not None and fb.on == {FallbackTrigger.RATE_LIMITED}


def test_json_syntax_errors_report_file_line_col(tmp_path: Path) -> None:
    f = tmp_path / "mesh.json"
    f.write_text('{\n  "defaults": {"timeout": "2s",}\n}\n')
    with pytest.raises(ConfigError) as info:
        Policy.load(f)
    assert str(info.value).startswith(f"{f}:2:")


def test_json_value_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "mesh.json"
    f.write_text(json.dumps({"defaults": {"timeout": "soon"}}))
    with pytest.raises(ConfigError) as info:
        Policy.load(f)
    assert str(info.value).startswith(f"{f}: defaults.timeout: expected a duration")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the policy"):
        Policy.load(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        Policy.from_text("- 1\n- 2\n", "x.yaml")


# -- the timeout budget check and other warnings ----------------------------------------------------


def test_no_warnings_for_a_sound_document() -> None:
    p = Policy.from_dict(
        {
            "defaults": {"timeout": "3s"},
            "rules": [
                {
                    "match": "a.S",
                    "timeout": "1s",
                    "retry": {
                        "max_attempts": 3,
                        "per_attempt_timeout": "200ms",
                        "initial_backoff": "50ms",
                        "jitter": "none",
                    },
                }
            ],
        }
    )
    assert p.warnings == []
    assert p.check() == []


def test_timeout_shorter_than_retries_worst_case_warns() -> None:
    p = Policy.from_dict(
        {
            "rules": [
                {
                    "match": "a.S/M",
                    "timeout": "500ms",
                    "retry": {
                        "max_attempts": 3,
                        "per_attempt_timeout": "200ms",
                        "initial_backoff": "100ms",
                        "multiplier": 2,
                        "jitter": "equal",
                    },
                }
            ]
        }
    )
    # 3 x 200ms + 100ms + 200ms = 900ms > 500ms
    assert len(p.warnings) == 1
    w = p.warnings[0]
    assert w.startswith("rules[0] (a.S/M): timeout 500ms is shorter than")
    assert "worst case 900ms" in w
    assert p.check() == p.warnings


def test_defaults_warnings_are_not_repeated_per_rule() -> None:
    p = Policy.from_dict(
        {
            "defaults": {
                "timeout": "100ms",
                "retry": {"max_attempts": 3, "per_attempt_timeout": "100ms"},
            },
            "rules": [{"match": "a.S", "bulkhead": {"max_concurrent": 1}}],
        }
    )
    assert len(p.warnings) == 1
    assert p.warnings[0].startswith("defaults: timeout 100ms")


def test_a_method_rule_inherits_its_service_rule_when_checked() -> None:
    p = Policy.from_dict(
        {
            "rules": [
                {"match": "a.S", "retry": {"max_attempts": 4, "per_attempt_timeout": "1s"}},
                {"match": "a.S/Fast", "timeout": "1s"},
            ]
        }
    )
    assert len(p.warnings) == 1
    assert p.warnings[0].startswith("rules[1] (a.S/Fast): timeout 1s")


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"hedging": {"max_attempts": 3, "delay": "600ms"}}, "before the last hedge"),
        ({"circuit_breaker": {"slow_call_duration": "2s"}}, "no call is ever slow"),
        ({"deadline_margin": "1s"}, "deadline_margin 1s is not below"),
        ({"bulkhead": {"max_concurrent": 1, "max_wait": "1s"}}, "whole deadline waiting"),
        ({"fallback": {"on": ["circuit_open"]}}, "no circuit_breaker"),
    ],
)
def test_other_warnings(section: dict[str, Any], fragment: str) -> None:
    p = Policy.from_dict({"rules": [{"match": "a.S", "timeout": "1s", **section}]})
    assert len(p.warnings) == 1
    assert fragment in p.warnings[0]


# -- shared state registries ---------------------------------------------------------------------


def test_registries_share_instances_per_key_and_config() -> None:
    clock = FakeClock()
    p = Policy.from_dict(PRECEDENCE, registry=ResilienceRegistry(clock=clock))
    cfg = CircuitBreakerConfig()
    a = p.registry.breaker("h:1", cfg)
    assert p.registry.breaker("h:1", cfg) is a
    assert p.registry.breaker("h:1", CircuitBreakerConfig()) is a  # equal configs are the same key
    assert p.registry.breaker("h:2", cfg) is not a
    assert p.registry.breaker("h:1", CircuitBreakerConfig(half_open_calls=1)) is not a
    assert a.name == "h:1"
    bh = BulkheadConfig(max_concurrent=2)
    assert p.registry.bulkhead("k", bh) is p.registry.bulkhead("k", bh)
    rl = RateLimitConfig(rate=1)
    assert p.registry.rate_limiter("k", rl) is p.registry.rate_limiter("k", rl)
    al = AdaptiveLimitConfig()
    assert p.registry.adaptive_limiter("k", al) is p.registry.adaptive_limiter("k", al)
    assert set(p.registry.breakers()) == {"h:1", "h:2"}
    assert set(p.registry.bulkheads()) == {"k"}
    # Instances use the registry's clock.
    for _ in range(10):
        assert a.try_acquire()
        a.on_result(0.01, "UNAVAILABLE")
    assert a.remaining_open_time() == pytest.approx(30.0)
    clock.advance(30)
    assert a.try_acquire()


def test_retry_budget_is_one_per_target() -> None:
    p = Policy.from_dict({"defaults": {"retry": {"budget": {"ratio": 0.5, "min_per_second": 1}}}})
    b = p.retry_budget("h:1")
    assert b is not None
    assert b.config.ratio == 0.5
    assert p.retry_budget("h:1") is b
    assert p.retry_budget("h:1", RetryBudgetConfig(ratio=0.1)) is b  # one per target
    c = p.retry_budget("h:2", RetryBudgetConfig(ratio=0.1))
    assert c is not None and c.config.ratio == 0.1
    off = Policy.from_dict({"defaults": {"retry": {"budget": None}}})
    assert off.retry_budget("h:1") is None
    assert Policy.from_dict({}).retry_budget("h:1") is not None


def test_policy_listeners_reach_every_instance_old_and_new() -> None:
    p = Policy.from_dict({})
    events: list[Event] = []
    old = p.registry.bulkhead("a", BulkheadConfig(max_concurrent=1))
    p.registry.add_listener(events.append)
    new = p.registry.bulkhead("b", BulkheadConfig(max_concurrent=1))
    for bh in (old, new):
        assert bh.try_acquire()
        assert not bh.try_acquire()
    breaker = p.registry.breaker("t", CircuitBreakerConfig(minimum_calls=1, window_size=1))
    assert breaker.try_acquire()
    breaker.on_result(0.0, "UNAVAILABLE")
    kinds = [(e.source, e.name, e.kind) for e in events]
    assert kinds == [
        ("bulkhead", "a", "rejected"),
        ("bulkhead", "b", "rejected"),
        ("circuit_breaker", "t", "state_transition"),
    ]


def test_registries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshkit import config

    p = Policy.from_dict({})
    monkeypatch.setattr(p.registry._bulkheads, "_limit", 5)
    cfg = BulkheadConfig(max_concurrent=1)
    first = p.registry.bulkhead("k0", cfg)
    for i in range(1, 50):
        p.registry.bulkhead(f"k{i}", cfg)
    assert len(p.registry.bulkheads()) == 5
    assert p.registry.bulkhead("k0", cfg) is not first  # the oldest was dropped
    assert config.MAX_INSTANCES >= 1000


def test_last_good_cache_is_shared() -> None:
    p = Policy.from_dict({})
    assert p.registry.last_good_cache() is p.registry.last_good_cache()


def test_hard_coded_status_codes_match_grpc() -> None:
    import grpc

    from meshkit.resilience.codes import RETRYABLE_ALLOWED, STATUS_CODES, code_from_number

    assert list(STATUS_CODES) == [c.name for c in sorted(grpc.StatusCode, key=lambda c: c.value[0])]
    assert all(code_from_number(c.value[0]) == c.name for c in grpc.StatusCode)
    assert {
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "INTERNAL",
        "UNKNOWN",
    } == RETRYABLE_ALLOWED


# -- meshkit policy check / show ------------------------------------------------------------------


def test_cli_check_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from meshkit.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(ISSUE_YAML)
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  retry: {max_attempts: four}\n")
    assert main(["policy", "check", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "good.yaml: ok (1 rules, 2 warnings)" in out
    assert "worst case 1.55s" in err
    assert main(["policy", "check", "--strict", str(good)]) == 1
    out, err = capsys.readouterr()
    assert "ok" not in out  # a failing check does not say ok
    assert "good.yaml: failed with --strict (1 rules, 2 warnings; warnings fail)" in err
    assert main(["policy", "check", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert (
        f'error: {bad}:2:25: defaults.retry.max_attempts: expected an integer >= 1, got "four"'
        in err
    )
    assert main(["policy", "show", str(good), "/shop.v1.PaymentService/Charge"]) == 0
    shown = json.loads(capsys.readouterr().out)["/shop.v1.PaymentService/Charge"]
    assert shown["retry"]["retryable_codes"] == ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]
    assert shown["circuit_breaker"]["window_type"] == "count"
    assert shown["matched"] == ["defaults", "rules[0]"]


def test_from_dict_source_prefixes_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_dict({"defaults": {"timeout": "x"}}, source="inline")
    assert str(info.value).startswith("inline: defaults.timeout: expected a duration")
    assert info.value.source == "inline"
    assert Policy.from_dict({}, source="inline").source == "inline"
