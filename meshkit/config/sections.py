"""Section readers: one per section of a rule (``retry``, ``circuit_breaker``,
``bulkhead``...), each validating its mapping into the resilience config it
configures, or ``None`` when the section is off.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from meshkit.config.values import (
    _bool,
    _code,
    _codes,
    _duration,
    _enum,
    _fail,
    _fmt,
    _int,
    _join,
    _mapping,
    _number,
    _percent,
    _rate,
    _str,
    parse_size,
)
from meshkit.errors import ConfigError
from meshkit.resilience.adaptive import AdaptiveAlgorithm, AdaptiveLimitConfig
from meshkit.resilience.breaker import (
    BreakerScope,
    CircuitBreakerConfig,
    WindowType,
)
from meshkit.resilience.budget import RetryBudgetConfig
from meshkit.resilience.bulkhead import BulkheadConfig, LimitScope, Side
from meshkit.resilience.fallback import FallbackKind, FallbackPolicy, FallbackTrigger
from meshkit.resilience.fault import FaultPolicy
from meshkit.resilience.hedging import HedgingPolicy
from meshkit.resilience.ratelimit import RateLimitConfig
from meshkit.resilience.retry import Jitter, RetryPolicy

SECTIONS: tuple[str, ...] = (
    "timeout",
    "deadline_margin",
    "retry",
    "hedging",
    "circuit_breaker",
    "bulkhead",
    "adaptive_limit",
    "rate_limit",
    "fallback",
    "fault",
)
DEFAULT_DEADLINE_MARGIN = 0.005


def _turns_off(value: Any) -> bool:
    """Whether a section's value switches it off: ``null`` or ``false`` (which also
    overrides the same section of a lower layer, where leaving it out would not)."""
    return value is None or value is False


# --------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------


def _read_budget(value: Any, path: str) -> RetryBudgetConfig | None:
    if _turns_off(value):
        return None
    d = _mapping(value, path, ("ratio", "min_per_second", "ttl"))
    base = RetryBudgetConfig()
    ttl = base.ttl
    if "ttl" in d:
        ttl = _duration(d["ttl"], _join(path, "ttl"))
        if not (1.0 <= ttl <= 600.0):
            raise _fail(_join(path, "ttl"), "a duration from 1s to 10m", d["ttl"])
    return RetryBudgetConfig(
        ratio=_number(d["ratio"], _join(path, "ratio"), lo=0.0, hi=10.0)
        if "ratio" in d
        else base.ratio,
        min_per_second=_number(d["min_per_second"], _join(path, "min_per_second"), lo=0.0)
        if "min_per_second" in d
        else base.min_per_second,
        ttl=ttl,
    )


def _read_retry(value: Any, path: str) -> RetryPolicy | None:
    if _turns_off(value):
        return None
    keys = (
        "max_attempts",
        "initial_backoff",
        "max_backoff",
        "multiplier",
        "jitter",
        "retryable_codes",
        "per_attempt_timeout",
        "budget",
        "max_buffer_bytes",
    )
    d = _mapping(value, path, keys)
    base = RetryPolicy()
    kw: dict[str, Any] = {}
    if "max_attempts" in d:
        kw["max_attempts"] = _int(d["max_attempts"], _join(path, "max_attempts"), lo=1)
    if "initial_backoff" in d:
        kw["initial_backoff"] = _duration(d["initial_backoff"], _join(path, "initial_backoff"))
    if "max_backoff" in d:
        kw["max_backoff"] = _duration(d["max_backoff"], _join(path, "max_backoff"))
    initial = kw.get("initial_backoff", base.initial_backoff)
    maximum = kw.get("max_backoff", max(base.max_backoff, initial))
    if maximum < initial:
        raise _fail(
            _join(path, "max_backoff"),
            f"a duration >= initial_backoff ({_fmt(initial)})",
            d["max_backoff"],
        )
    kw["max_backoff"] = maximum
    if "multiplier" in d:
        kw["multiplier"] = _number(d["multiplier"], _join(path, "multiplier"), lo=1.0)
    if "jitter" in d:
        kw["jitter"] = _enum(d["jitter"], _join(path, "jitter"), Jitter)
    if "retryable_codes" in d:
        kw["retryable_codes"] = _codes(
            d["retryable_codes"], _join(path, "retryable_codes"), retryable=True
        )
    if "per_attempt_timeout" in d and d["per_attempt_timeout"] is not None:
        kw["per_attempt_timeout"] = _duration(
            d["per_attempt_timeout"], _join(path, "per_attempt_timeout"), positive=True
        )
    if "budget" in d:
        kw["budget"] = _read_budget(d["budget"], _join(path, "budget"))
    if "max_buffer_bytes" in d:
        kw["max_buffer_bytes"] = parse_size(d["max_buffer_bytes"], _join(path, "max_buffer_bytes"))
    return RetryPolicy(**kw)


def _read_hedging(value: Any, path: str) -> HedgingPolicy | None:
    if _turns_off(value):
        return None
    d = _mapping(value, path, ("max_attempts", "delay", "non_fatal_codes"))
    kw: dict[str, Any] = {}
    if "max_attempts" in d:
        kw["max_attempts"] = _int(d["max_attempts"], _join(path, "max_attempts"), lo=1, hi=10)
    if "delay" in d:
        kw["delay"] = _duration(d["delay"], _join(path, "delay"))
    if "non_fatal_codes" in d:
        kw["non_fatal_codes"] = _codes(
            d["non_fatal_codes"], _join(path, "non_fatal_codes"), retryable=True
        )
    return HedgingPolicy(**kw)


def _read_breaker(value: Any, path: str) -> CircuitBreakerConfig | None:
    if _turns_off(value):
        return None
    keys = (
        "window",
        "failure_rate_threshold",
        "minimum_calls",
        "slow_call_duration",
        "slow_call_rate_threshold",
        "open_duration",
        "max_open_duration",
        "open_duration_multiplier",
        "half_open_calls",
        "failure_codes",
        "scope",
        "automatic_transition",
    )
    d = _mapping(value, path, keys)
    kw: dict[str, Any] = {}
    if "window" in d:
        wp = _join(path, "window")
        w = _mapping(d["window"], wp, ("type", "size"))
        wtype = _enum(w["type"], _join(wp, "type"), WindowType) if "type" in w else WindowType.COUNT
        kw["window_type"] = wtype
        if "size" in w:
            sp = _join(wp, "size")
            if wtype is WindowType.COUNT:
                kw["window_size"] = _int(w["size"], sp, lo=1, hi=100_000)
            else:
                seconds = _duration(w["size"], sp)
                if not seconds.is_integer() or not (1 <= seconds <= 3600):
                    raise _fail(sp, "a whole number of seconds from 1s to 1h", w["size"])
                kw["window_size"] = int(seconds)
        elif wtype is WindowType.TIME:
            kw["window_size"] = 60
    if "failure_rate_threshold" in d:
        kw["failure_rate_threshold"] = _rate(
            d["failure_rate_threshold"], _join(path, "failure_rate_threshold")
        )
    if "minimum_calls" in d:
        kw["minimum_calls"] = _int(d["minimum_calls"], _join(path, "minimum_calls"), lo=1)
    if "slow_call_duration" in d:
        kw["slow_call_duration"] = _duration(
            d["slow_call_duration"], _join(path, "slow_call_duration"), positive=True
        )
    if "slow_call_rate_threshold" in d:
        kw["slow_call_rate_threshold"] = _rate(
            d["slow_call_rate_threshold"], _join(path, "slow_call_rate_threshold")
        )
    if "open_duration" in d:
        kw["open_duration"] = _duration(
            d["open_duration"], _join(path, "open_duration"), positive=True
        )
    if "open_duration_multiplier" in d:
        kw["open_duration_multiplier"] = _number(
            d["open_duration_multiplier"], _join(path, "open_duration_multiplier"), lo=1.0
        )
    open_duration = kw.get("open_duration", CircuitBreakerConfig().open_duration)
    if "max_open_duration" in d and d["max_open_duration"] is not None:
        mp = _join(path, "max_open_duration")
        kw["max_open_duration"] = _duration(d["max_open_duration"], mp)
        if kw["max_open_duration"] < open_duration:
            raise _fail(
                mp, f"a duration >= open_duration ({_fmt(open_duration)})", d["max_open_duration"]
            )
    if kw.get("open_duration_multiplier", 1.0) > 1.0 and "max_open_duration" not in kw:
        raise ConfigError(
            _join(path, "max_open_duration"),
            "missing required key: an open_duration_multiplier above 1 needs a cap",
        )
    if "half_open_calls" in d:
        kw["half_open_calls"] = _int(d["half_open_calls"], _join(path, "half_open_calls"), lo=1)
    if "failure_codes" in d:
        kw["failure_codes"] = _codes(d["failure_codes"], _join(path, "failure_codes"))
    if "scope" in d:
        kw["scope"] = _enum(d["scope"], _join(path, "scope"), BreakerScope)
    if "automatic_transition" in d:
        kw["automatic_transition"] = _bool(
            d["automatic_transition"], _join(path, "automatic_transition")
        )
    return CircuitBreakerConfig(**kw)


def _read_bulkhead(value: Any, path: str) -> BulkheadConfig | None:
    if _turns_off(value):
        return None
    d = _mapping(
        value, path, ("max_concurrent", "max_wait", "scope", "side"), required=("max_concurrent",)
    )
    kw: dict[str, Any] = {
        "max_concurrent": _int(d["max_concurrent"], _join(path, "max_concurrent"), lo=1)
    }
    if "max_wait" in d:
        kw["max_wait"] = _duration(d["max_wait"], _join(path, "max_wait"))
    if "scope" in d:
        kw["scope"] = _enum(d["scope"], _join(path, "scope"), LimitScope)
    if "side" in d:
        kw["side"] = _enum(d["side"], _join(path, "side"), Side)
    return BulkheadConfig(**kw)


def _read_adaptive(value: Any, path: str) -> AdaptiveLimitConfig | None:
    if _turns_off(value):
        return None
    keys = (
        "algorithm",
        "initial_limit",
        "min_limit",
        "max_limit",
        "backoff_ratio",
        "timeout",
        "smoothing",
        "tolerance",
        "long_window",
        "queue_size",
        "alpha",
        "beta",
        "scope",
        "side",
    )
    d = _mapping(value, path, keys)
    kw: dict[str, Any] = {}
    if "algorithm" in d:
        kw["algorithm"] = _enum(d["algorithm"], _join(path, "algorithm"), AdaptiveAlgorithm)
    for key in ("initial_limit", "min_limit", "max_limit", "long_window", "queue_size"):
        if key in d:
            kw[key] = _int(d[key], _join(path, key), lo=0 if key == "queue_size" else 1)
    base = AdaptiveLimitConfig()
    lo = kw.get("min_limit", base.min_limit)
    hi = kw.get("max_limit", max(base.max_limit, lo))
    if hi < lo:
        raise _fail(_join(path, "max_limit"), f"an integer >= min_limit ({lo})", d["max_limit"])
    kw["max_limit"] = hi
    init = kw.get("initial_limit", min(max(base.initial_limit, lo), hi))
    if not (lo <= init <= hi):
        raise _fail(
            _join(path, "initial_limit"),
            f"an integer from min_limit ({lo}) to max_limit ({hi})",
            d["initial_limit"],
        )
    kw["initial_limit"] = init
    if "backoff_ratio" in d:
        kw["backoff_ratio"] = _number(
            d["backoff_ratio"], _join(path, "backoff_ratio"), lo=0.5, hi=1.0
        )
    if "timeout" in d:
        kw["timeout"] = _duration(d["timeout"], _join(path, "timeout"), positive=True)
    if "smoothing" in d:
        kw["smoothing"] = _number(
            d["smoothing"], _join(path, "smoothing"), lo=0.0, hi=1.0, lo_open=True
        )
    if "tolerance" in d:
        kw["tolerance"] = _number(d["tolerance"], _join(path, "tolerance"), lo=1.0)
    for key in ("alpha", "beta"):
        if key in d:
            kw[key] = _number(d[key], _join(path, key), lo=0.0, lo_open=True)
    if kw.get("beta", base.beta) < kw.get("alpha", base.alpha):
        raise _fail(_join(path, "beta"), "a number >= alpha", d.get("beta", base.beta))
    if "scope" in d:
        kw["scope"] = _enum(d["scope"], _join(path, "scope"), LimitScope)
    if "side" in d:
        kw["side"] = _enum(d["side"], _join(path, "side"), Side)
    return AdaptiveLimitConfig(**kw)


_HEADER_NAME = re.compile(r"[0-9a-z_.-]+")


def _read_rate_limit(value: Any, path: str) -> RateLimitConfig | None:
    if _turns_off(value):
        return None
    d = _mapping(
        value,
        path,
        ("rate", "per", "burst", "key", "scope", "side", "max_keys"),
        required=("rate",),
    )
    kw: dict[str, Any] = {"rate": _number(d["rate"], _join(path, "rate"), lo=0.0, lo_open=True)}
    if "per" in d:
        kw["per"] = _duration(d["per"], _join(path, "per"), positive=True)
    kw["burst"] = (
        _int(d["burst"], _join(path, "burst"), lo=1)
        if "burst" in d
        else max(1, math.ceil(kw["rate"]))
    )
    if "key" in d:
        kp = _join(path, "key")
        expected = '"method", "peer" or "metadata:<header name>"'
        key = d["key"]
        if not isinstance(key, str):
            raise _fail(kp, expected, key)
        key = key.strip()
        if key.startswith("metadata:"):
            name = key[len("metadata:") :].strip().lower()
            if not _HEADER_NAME.fullmatch(name) or name.endswith("-bin"):
                raise _fail(kp, expected + " with a lower-case, non-binary header name", key)
            key = "metadata:" + name
        elif key not in ("method", "peer"):
            raise _fail(kp, expected, d["key"])
        kw["key"] = key
    if "scope" in d:
        kw["scope"] = _enum(d["scope"], _join(path, "scope"), LimitScope)
    if "side" in d:
        kw["side"] = _enum(d["side"], _join(path, "side"), Side)
    if "max_keys" in d:
        kw["max_keys"] = _int(d["max_keys"], _join(path, "max_keys"), lo=1, hi=10_000_000)
    return RateLimitConfig(**kw)


def _read_fallback(value: Any, path: str) -> FallbackPolicy | None:
    if _turns_off(value):
        return None
    d = _mapping(value, path, ("on", "kind", "value", "target", "code", "message", "cache_ttl"))
    kw: dict[str, Any] = {}
    if "on" in d:
        op = _join(path, "on")
        raw = d["on"]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise _fail(
                op, "a non-empty list of " + ", ".join(t.value for t in FallbackTrigger), raw
            )
        kw["on"] = frozenset(_enum(t, f"{op}[{i}]", FallbackTrigger) for i, t in enumerate(raw))
    kind = (
        _enum(d["kind"], _join(path, "kind"), FallbackKind) if "kind" in d else FallbackKind.DEFAULT
    )
    kw["kind"] = kind
    for key, allowed_kinds in (
        ("value", (FallbackKind.DEFAULT,)),
        ("target", (FallbackKind.ALTERNATE,)),
        ("code", (FallbackKind.ERROR,)),
        ("message", (FallbackKind.ERROR,)),
        ("cache_ttl", (FallbackKind.CACHED,)),
    ):
        if key in d and kind not in allowed_kinds:
            raise ConfigError(
                _join(path, key),
                f"only applies to kind: {allowed_kinds[0].value}, not {kind.value}",
            )
    if kind is FallbackKind.DEFAULT:
        vp = _join(path, "value")
        v = d.get("value", {})
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise _fail(
                    vp, "a JSON object (the response message in proto3 JSON)", d["value"]
                ) from None
        if not isinstance(v, Mapping):
            raise _fail(vp, "a JSON object (the response message in proto3 JSON)", v)
        try:
            kw["value_json"] = json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            raise _fail(
                vp, "a JSON object (strings, numbers, booleans, lists, objects)", v
            ) from None
    else:
        kw["value_json"] = None
    if kind is FallbackKind.ALTERNATE:
        if "target" not in d:
            raise ConfigError(_join(path, "target"), "missing required key for kind: alternate")
        kw["target"] = _str(d["target"], _join(path, "target"), what="a target address")
    if kind is FallbackKind.ERROR:
        if "code" in d:
            kw["code"] = _code(d["code"], _join(path, "code"))
            if kw["code"] == "OK":
                raise ConfigError(
                    _join(path, "code"), "an error fallback needs an error code, not OK"
                )
        if "message" in d:
            kw["message"] = _str(d["message"], _join(path, "message"))
    if "cache_ttl" in d and d["cache_ttl"] is not None:
        kw["cache_ttl"] = _duration(d["cache_ttl"], _join(path, "cache_ttl"), positive=True)
    return FallbackPolicy(**kw)


def _read_fault(value: Any, path: str) -> FaultPolicy | None:
    if _turns_off(value):
        return None
    d = _mapping(value, path, ("delay", "abort", "allow_headers", "side"))
    kw: dict[str, Any] = {}
    if "delay" in d and not _turns_off(d["delay"]):
        dp = _join(path, "delay")
        dd = _mapping(d["delay"], dp, ("percent", "duration"), required=("duration",))
        kw["delay"] = _duration(dd["duration"], _join(dp, "duration"))
        kw["delay_percent"] = (
            _percent(dd["percent"], _join(dp, "percent")) if "percent" in dd else 100.0
        )
    if "abort" in d and not _turns_off(d["abort"]):
        ap = _join(path, "abort")
        ad = _mapping(d["abort"], ap, ("percent", "code"), required=("code",))
        kw["abort_code"] = _code(ad["code"], _join(ap, "code"))
        if kw["abort_code"] == "OK":
            raise ConfigError(_join(ap, "code"), "an abort needs an error code, not OK")
        kw["abort_percent"] = (
            _percent(ad["percent"], _join(ap, "percent")) if "percent" in ad else 100.0
        )
    if "allow_headers" in d:
        kw["allow_headers"] = _bool(d["allow_headers"], _join(path, "allow_headers"))
    if "side" in d:
        kw["side"] = _enum(d["side"], _join(path, "side"), Side)
    return FaultPolicy(**kw)


def _read_timeout(value: Any, path: str) -> float | None:
    if _turns_off(value):
        return None
    return _duration(value, path, positive=True)


def _read_margin(value: Any, path: str) -> float:
    if value is None:
        return DEFAULT_DEADLINE_MARGIN
    return _duration(value, path)


_READERS: dict[str, Callable[[Any, str], Any]] = {
    "timeout": _read_timeout,
    "deadline_margin": _read_margin,
    "retry": _read_retry,
    "hedging": _read_hedging,
    "circuit_breaker": _read_breaker,
    "bulkhead": _read_bulkhead,
    "adaptive_limit": _read_adaptive,
    "rate_limit": _read_rate_limit,
    "fallback": _read_fallback,
    "fault": _read_fault,
}


def _read_sections(d: Mapping[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SECTIONS:
        if key in d:
            out[key] = _READERS[key](d[key], _join(path, key))
    return out
