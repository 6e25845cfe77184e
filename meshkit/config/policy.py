"""The policy document: load, validate, match rules to methods, compile.

A document has ``defaults`` (apply to every method) and ``rules`` (each matching a
service ``pkg.Service`` or one method ``pkg.Service/Method``). For a method, the
sections of its service rule replace those of the defaults and the sections of its
method rule replace those again: a section is replaced whole, never merged key by
key. docs/policy.md documents every key and default.

The document is validated once at load; a bad one raises
:class:`meshkit.errors.ConfigError` naming the key path, the bad value and what was
expected (``rules[0].retry.max_attempts: expected an integer >= 1, got "four"``),
prefixed with ``file:line:col`` when it came from a file. Each method's policy is
compiled once into a frozen :class:`MethodPolicy` and cached.

The :class:`Policy` also owns the shared state: one registry per pattern, so every
interceptor on every channel using this policy shares the same breakers, budgets,
bulkheads and limiters.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from meshkit.errors import ConfigError
from meshkit.resilience.adaptive import AdaptiveAlgorithm, AdaptiveLimitConfig, AdaptiveLimiter
from meshkit.resilience.breaker import (
    BreakerScope,
    CircuitBreaker,
    CircuitBreakerConfig,
    WindowType,
)
from meshkit.resilience.budget import RetryBudget, RetryBudgetConfig
from meshkit.resilience.bulkhead import Bulkhead, BulkheadConfig, LimitScope, Side
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.codes import (
    NEVER_RETRYABLE,
    STATUS_CODE_SET,
    STATUS_CODES,
)
from meshkit.resilience.events import EventEmitter, Listener
from meshkit.resilience.fallback import FallbackKind, FallbackPolicy, FallbackTrigger, LastGoodCache
from meshkit.resilience.fault import FaultPolicy
from meshkit.resilience.hedging import HedgingPolicy
from meshkit.resilience.ratelimit import KeyedRateLimiter, RateLimitConfig
from meshkit.resilience.retry import Jitter, RetryPolicy

__all__ = [
    "MethodPolicy",
    "Policy",
    "located",
    "parse_duration",
    "parse_size",
    "read_bool",
    "read_code",
    "read_codes",
    "read_int",
    "read_mapping",
    "read_number",
    "read_str",
    "read_yaml",
    "show_value",
]

_log = logging.getLogger("meshkit.config")

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

# Upper bounds on what callers can make us remember.
MAX_COMPILED_METHODS = 10_000
MAX_INSTANCES = 10_000

_T = TypeVar("_T", bound=EventEmitter)
_E = TypeVar("_E", bound=StrEnum)


# --------------------------------------------------------------------------------------
# Value readers. Each takes the value and its key path and returns a clean value or
# raises ConfigError(path, "expected ..., got ...").
# --------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(path, f"expected {expected}, got {_show(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_EXPECTED = 'a duration like "250ms", "2s", "1m" or a number of seconds'


def parse_duration(value: Any, path: str = "") -> float:
    """Seconds from ``"250ms"``, ``"2s"``, ``"1m30s"``, ``"1h"``, ``"100us"`` or a number
    of seconds. Raises :class:`ConfigError` for anything else, negatives included."""
    if isinstance(value, bool):
        raise _fail(path, _DURATION_EXPECTED, value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text):
            seconds = float(text)
        else:
            pos = 0
            seconds = 0.0
            for m in _DURATION_PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise _fail(path, _DURATION_EXPECTED, value)
    else:
        raise _fail(path, _DURATION_EXPECTED, value)
    if not math.isfinite(seconds) or seconds < 0:
        raise _fail(path, "a non-negative duration", value)
    return seconds


_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(value: Any, path: str = "") -> int:
    """Bytes from an integer or ``"64KiB"``, ``"1MiB"``, ``"1MB"``, ``"512B"``."""
    expected = 'a size in bytes like 65536, "64KiB" or "1MiB"'
    if isinstance(value, bool):
        raise _fail(path, expected, value)
    if isinstance(value, int):
        if value < 0:
            raise _fail(path, expected, value)
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    raise _fail(path, expected, value)


def _duration(value: Any, path: str, *, positive: bool = False) -> float:
    seconds = parse_duration(value, path)
    if positive and seconds <= 0:
        raise _fail(path, "a duration > 0", value)
    return seconds


def _int(value: Any, path: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if lo is not None and hi is not None:
        expected = f"an integer from {lo} to {hi}"
    elif lo is not None:
        expected = f"an integer >= {lo}"
    else:
        expected = "an integer"
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _fail(path, expected, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(path, expected, value)
    return int(value)


def _number(
    value: Any,
    path: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    expected = "a number" + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, expected, value)
    v = float(value)
    if not math.isfinite(v):
        raise _fail(path, expected, value)
    if lo is not None and (v < lo or (lo_open and v <= lo)):
        raise _fail(path, expected, value)
    if hi is not None and v > hi:
        raise _fail(path, expected, value)
    return v


def _rate(value: Any, path: str) -> float:
    """A fraction in (0, 1], or a percentage string like "50%"."""
    expected = 'a rate in (0, 1] such as 0.5, or a percentage such as "50%"'
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            v = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise _fail(path, expected, value) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
    else:
        raise _fail(path, expected, value)
    if not (0.0 < v <= 1.0):
        raise _fail(path, expected, value)
    return v


def _percent(value: Any, path: str) -> float:
    """A percentage in [0, 100] (a number, or a string like "10%")."""
    expected = 'a percentage from 0 to 100 such as 10 or "10%"'
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            v = float(value.strip()[:-1])
        except ValueError:
            raise _fail(path, expected, value) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
    else:
        raise _fail(path, expected, value)
    if not (0.0 <= v <= 100.0):
        raise _fail(path, expected, value)
    return v


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def _str(value: Any, path: str, *, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, what, value)
    return value.strip()


def _enum(value: Any, path: str, enum: type[_E]) -> _E:
    names = [m.value for m in enum]
    expected = "one of " + ", ".join(names)
    if not isinstance(value, str):
        raise _fail(path, expected, value)
    try:
        return enum(value.strip().lower())
    except ValueError:
        raise _fail(path, expected, value) from None


def _code(value: Any, path: str) -> str:
    expected = "a gRPC status code name such as UNAVAILABLE"
    if not isinstance(value, str):
        raise _fail(path, expected, value)
    name = value.strip().upper()
    if name not in STATUS_CODE_SET:
        close = difflib.get_close_matches(name, STATUS_CODES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (one of {', '.join(STATUS_CODES)})"
        raise ConfigError(path, f"expected {expected}{hint}, got {_show(value)}")
    return name


def _codes(
    value: Any, path: str, *, retryable: bool = False, allow_ok: bool = False
) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(path, "a non-empty list of gRPC status code names", value)
    out = set()
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        name = _code(item, p)
        if retryable and name in NEVER_RETRYABLE:
            raise ConfigError(
                p,
                f"{name} must never be retried ({NEVER_RETRYABLE[name]}: a second attempt cannot fix it)",
            )
        if not allow_ok and name == "OK":
            raise ConfigError(p, "OK is a success, not a failure code")
        out.add(name)
    return frozenset(out)


def _mapping(
    value: Any,
    path: str,
    allowed: Sequence[str],
    *,
    required: Sequence[str] = (),
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "a mapping", value)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {_show(key)}")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                _join(path, key),
                f"unknown key; {hint}expected one of {', '.join(allowed)}",
            )
    for key in required:
        if key not in value:
            raise ConfigError(_join(path, key), "missing required key")
    return dict(value)


# Public names for the readers, so gateway.yaml's sections (meshkit.gateway) report a
# bad value exactly as a policy document does: the key path, what was expected, the
# value, a did-you-mean for a misspelt key.
show_value = _show
read_int = _int
read_number = _number
read_bool = _bool
read_str = _str
read_code = _code
read_codes = _codes
read_mapping = _mapping


def _off(value: Any) -> bool:
    """``null`` or ``false`` turns a section off (and overrides the defaults' one)."""
    return value is None or value is False


# --------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------


def _read_budget(value: Any, path: str) -> RetryBudgetConfig | None:
    if _off(value):
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
    if _off(value):
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
    if _off(value):
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
    if _off(value):
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
    if _off(value):
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
    if _off(value):
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
    if _off(value):
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
    if _off(value):
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
    if _off(value):
        return None
    d = _mapping(value, path, ("delay", "abort", "allow_headers", "side"))
    kw: dict[str, Any] = {}
    if "delay" in d and not _off(d["delay"]):
        dp = _join(path, "delay")
        dd = _mapping(d["delay"], dp, ("percent", "duration"), required=("duration",))
        kw["delay"] = _duration(dd["duration"], _join(dp, "duration"))
        kw["delay_percent"] = (
            _percent(dd["percent"], _join(dp, "percent")) if "percent" in dd else 100.0
        )
    if "abort" in d and not _off(d["abort"]):
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
    if _off(value):
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


def _fmt(seconds: float) -> str:
    """A duration for messages: 250ms, 2s, 1.5s, 2m."""
    if seconds >= 60 and (seconds / 60).is_integer():
        return f"{int(seconds // 60)}m"
    if seconds >= 1:
        return f"{seconds:g}s"
    ms = seconds * 1000
    return f"{ms:.4g}ms"


# --------------------------------------------------------------------------------------
# The compiled per-method policy.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """Everything the adapters apply to one method, compiled once.

    ``method`` is the method's name alone (``Charge``; ``""`` when looked up by
    service), ``service`` the full service name (``shop.v1.PaymentService``),
    ``full_method`` the gRPC path (``/shop.v1.PaymentService/Charge``). A section is
    ``None`` when off. ``matched`` lists the labels of what applied (``defaults``,
    ``rules[0]``...). ``is_noop`` is true when nothing at all is configured (the
    adapters' fast path; deadline propagation still applies); ``client_is_noop`` and
    ``server_is_noop`` say the same for one side (see each section's ``side``).
    """

    method: str
    service: str
    full_method: str
    timeout: float | None = None
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN
    retry: RetryPolicy | None = None
    hedging: HedgingPolicy | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    bulkhead: BulkheadConfig | None = None
    adaptive_limit: AdaptiveLimitConfig | None = None
    rate_limit: RateLimitConfig | None = None
    fallback: FallbackPolicy | None = None
    fault: FaultPolicy | None = None
    matched: tuple[str, ...] = ()
    is_noop: bool = True
    client_is_noop: bool = True
    server_is_noop: bool = True

    def key_for(self, scope: str, target: str = "") -> str:
        """A registry key for a shared instance of ``scope`` (``target``, ``service``
        or ``method``) on ``target`` (``""`` on servers): ``"host:50051"``,
        ``"host:50051/shop.v1.PaymentService"``, ``"host:50051/shop.v1.PaymentService/Charge"``.
        """
        if scope == "target":
            return target
        if scope == "service":
            return f"{target}/{self.service}"
        return f"{target}{self.full_method}"


def _side_applies(cfg: Any, side: str) -> bool:
    return cfg is not None and bool(cfg.applies_to(side))


def _compile(service: str, method: str, layers: list[tuple[str, dict[str, Any]]]) -> MethodPolicy:
    merged: dict[str, Any] = {"deadline_margin": DEFAULT_DEADLINE_MARGIN}
    labels: list[str] = []
    for label, layer in layers:
        if layer:
            labels.append(label)
        merged.update(layer)
    full = f"/{service}/{method}" if method else f"/{service}"
    mp = MethodPolicy(
        method=method, service=service, full_method=full, matched=tuple(labels), **merged
    )
    side_sections = ("bulkhead", "adaptive_limit", "rate_limit", "fault")
    client_only = ("timeout", "retry", "hedging", "circuit_breaker", "fallback")
    client_noop = all(getattr(mp, s) is None for s in client_only) and not any(
        _side_applies(getattr(mp, s), "client") for s in side_sections
    )
    server_noop = not any(_side_applies(getattr(mp, s), "server") for s in side_sections)
    noop = all(getattr(mp, s) is None for s in SECTIONS if s != "deadline_margin")
    return dataclasses.replace(
        mp, is_noop=noop, client_is_noop=client_noop, server_is_noop=server_noop
    )


# --------------------------------------------------------------------------------------
# Registries of shared state.
# --------------------------------------------------------------------------------------


class _Registry(Generic[_T]):
    """Instances by key; created once; bounded (the oldest is dropped when full).

    Reads are a plain dict lookup; creation takes the lock. A dropped instance lives
    on in whoever holds it, so bounding never breaks a call in flight.
    """

    def __init__(self, factory: Callable[[str, Any], _T], limit: int = MAX_INSTANCES) -> None:
        self._factory = factory
        self._items: dict[Any, _T] = {}
        self._lock = threading.Lock()
        self._limit = limit
        self._listeners: list[Listener] = []

    def get(self, key: Any, name: str, config: Any) -> _T:
        item = self._items.get(key)
        if item is not None:
            return item
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._factory(name, config)
                for listener in self._listeners:
                    item.add_listener(listener)
                if len(self._items) >= self._limit:
                    del self._items[next(iter(self._items))]
                self._items[key] = item
        return item

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)
            items = list(self._items.values())
        for item in items:
            item.add_listener(listener)

    def snapshot(self) -> dict[str, _T]:
        with self._lock:
            return {(k[0] if isinstance(k, tuple) else k): v for k, v in self._items.items()}


# --------------------------------------------------------------------------------------
# The document.
# --------------------------------------------------------------------------------------

_SERVICE = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_MATCH = re.compile(rf"/?({_SERVICE})(?:/([A-Za-z_][A-Za-z0-9_]*))?")


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule: what it matches and the sections it sets."""

    index: int
    matches: tuple[tuple[str, str], ...]  # (service, method or "")
    sections: Mapping[str, Any]

    @property
    def label(self) -> str:
        """``rules[<index>]``."""
        return f"rules[{self.index}]"


class Policy:
    """A validated, compiled policy document plus the shared resilience state.

    Build one with :meth:`load`, :meth:`from_dict` or :meth:`from_text`; share it
    between every channel and server of a process.
    """

    def __init__(
        self,
        defaults: Mapping[str, Any] | None = None,
        rules: Sequence[Rule] = (),
        *,
        source: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.source = source
        self.clock = clock
        #: The document this policy was read from (set by :meth:`from_dict`), so a
        #: reload can tell an unchanged policy and keep this one, breakers and all.
        self.document: Mapping[str, Any] | None = None
        self._defaults: dict[str, Any] = dict(defaults or {})
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_service: dict[str, Rule] = {}
        self._by_method: dict[tuple[str, str], Rule] = {}
        for rule in self.rules:
            for service, method in rule.matches:
                if method:
                    self._by_method[(service, method)] = rule
                else:
                    self._by_service[service] = rule
        self._compiled: dict[str, MethodPolicy] = {}
        self._compile_lock = threading.Lock()
        self._breakers: _Registry[CircuitBreaker] = _Registry(
            lambda name, cfg: CircuitBreaker(cfg, name=name, clock=clock)
        )
        self._budgets: _Registry[RetryBudget] = _Registry(
            lambda name, cfg: RetryBudget(cfg, name=name, clock=clock)
        )
        self._bulkheads: _Registry[Bulkhead] = _Registry(
            lambda name, cfg: Bulkhead(cfg, name=name, clock=clock)
        )
        self._rate_limiters: _Registry[KeyedRateLimiter] = _Registry(
            lambda name, cfg: KeyedRateLimiter(cfg, name=name, clock=clock)
        )
        self._adaptive: _Registry[AdaptiveLimiter] = _Registry(
            lambda name, cfg: AdaptiveLimiter(cfg, name=name, clock=clock)
        )
        self._last_good: LastGoodCache | None = None
        self._last_good_lock = threading.Lock()
        self.warnings: list[str] = self.check()
        for warning in self.warnings:
            _log.warning("%s%s", f"{source}: " if source else "", warning)

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        document: Mapping[str, Any] | None,
        source: str | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Policy:
        """Validate and compile a document given as a dict (``None``: an empty policy)."""
        try:
            defaults, rules = _read_document(document)
        except ConfigError as exc:
            if source and exc.source is None:
                raise ConfigError(exc.path, _bare(exc), source=source) from None
            raise
        policy = cls(defaults, rules, source=source, clock=clock)
        policy.document = document
        return policy

    @classmethod
    def from_text(
        cls,
        text: str,
        source: str | None = None,
        *,
        format: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Policy:
        """Parse YAML (default) or JSON (``format="json"``) text, then :meth:`from_dict`.

        Syntax errors and invalid values report ``source:line:col``.
        """
        where = source or "<policy>"
        if format == "json":
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError("", exc.msg, source=f"{where}:{exc.lineno}:{exc.colno}") from None
            marks: dict[str, tuple[int, int]] = {}
        elif format in (None, "yaml"):
            document, marks = read_yaml(text, where)
        else:
            raise ValueError(f"format must be 'yaml' or 'json', not {format!r}")
        if document is not None and not isinstance(document, Mapping):
            raise ConfigError(
                "", f"expected a mapping at the top level, got {_show(document)}", source=where
            )
        try:
            return cls.from_dict(document, source, clock=clock)
        except ConfigError as exc:
            raise located(exc, where, marks) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, clock: Clock = SYSTEM_CLOCK) -> Policy:
        """Load a ``.yaml``/``.yml`` or ``.json`` file (by extension; others as YAML)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                "", f"cannot read the policy: {exc.strerror or exc}", source=str(p)
            ) from None
        fmt = "json" if p.suffix.lower() == ".json" else "yaml"
        return cls.from_text(text, str(p), format=fmt, clock=clock)

    # -- lookup --------------------------------------------------------------------

    def for_method(self, full_method: str) -> MethodPolicy:
        """The compiled policy of ``/pkg.Service/Method`` (or ``pkg.Service/Method``).

        Precedence: a rule matching the method beats one matching its service, which
        beats the defaults; each section comes whole from the most specific layer
        that sets it. Cached: after the first call this is one dict lookup.
        """
        mp = self._compiled.get(full_method)
        if mp is not None:
            return mp
        service, _, method = full_method.lstrip("/").partition("/")
        layers: list[tuple[str, dict[str, Any]]] = [("defaults", self._defaults)]
        srule = self._by_service.get(service)
        if srule is not None:
            layers.append((srule.label, dict(srule.sections)))
        mrule = self._by_method.get((service, method)) if method else None
        if mrule is not None:
            layers.append((mrule.label, dict(mrule.sections)))
        mp = _compile(service, method, layers)
        if len(self._compiled) < MAX_COMPILED_METHODS:
            with self._compile_lock:
                mp = self._compiled.setdefault(full_method, mp)
        return mp

    # -- shared state --------------------------------------------------------------

    def breaker(self, scope_key: str, config: CircuitBreakerConfig) -> CircuitBreaker:
        """The breaker shared by every call with ``scope_key`` and this ``config``.

        ``scope_key`` names it (``MethodPolicy.key_for(config.scope, target)``).
        """
        return self._breakers.get((scope_key, config), scope_key, config)

    def retry_budget(
        self, target: str, config: RetryBudgetConfig | None = None
    ) -> RetryBudget | None:
        """The retry budget of ``target``, one per target, created with the first
        ``config`` asked for (default: the ``retry.budget`` of the document's
        ``defaults``, else :class:`RetryBudgetConfig`'s defaults). ``None`` only when
        no config is given and the defaults turn the budget off."""
        existing = self._budgets._items.get(target)
        if existing is not None:
            return existing
        if config is None:
            retry = self._defaults.get("retry")
            if isinstance(retry, RetryPolicy):
                if retry.budget is None:
                    return None
                config = retry.budget
            else:
                config = RetryBudgetConfig()
        return self._budgets.get(target, target, config)

    def bulkhead(self, key: str, config: BulkheadConfig) -> Bulkhead:
        """The bulkhead shared under ``key`` with this ``config``."""
        return self._bulkheads.get((key, config), key, config)

    def rate_limiter(self, key: str, config: RateLimitConfig) -> KeyedRateLimiter:
        """The keyed rate limiter shared under ``key``; callers' keys live inside it."""
        return self._rate_limiters.get((key, config), key, config)

    def adaptive_limiter(self, key: str, config: AdaptiveLimitConfig) -> AdaptiveLimiter:
        """The adaptive concurrency limiter shared under ``key``."""
        return self._adaptive.get((key, config), key, config)

    @property
    def last_good_cache(self) -> LastGoodCache:
        """The cache of last good responses for ``fallback: {kind: cached}``."""
        if self._last_good is None:
            with self._last_good_lock:
                if self._last_good is None:
                    self._last_good = LastGoodCache(clock=self.clock)
        return self._last_good

    def add_listener(self, listener: Listener) -> None:
        """Receive the events of every breaker, budget, bulkhead and limiter this
        policy has made or will make."""
        for registry in (
            self._breakers,
            self._budgets,
            self._bulkheads,
            self._rate_limiters,
            self._adaptive,
        ):
            registry.add_listener(listener)

    def breakers(self) -> dict[str, CircuitBreaker]:
        """The breakers made so far, by name."""
        return self._breakers.snapshot()

    def retry_budgets(self) -> dict[str, RetryBudget]:
        """The retry budgets made so far, by target."""
        return self._budgets.snapshot()

    def bulkheads(self) -> dict[str, Bulkhead]:
        """The bulkheads made so far, by key."""
        return self._bulkheads.snapshot()

    def rate_limiters(self) -> dict[str, KeyedRateLimiter]:
        """The rate limiters made so far, by key."""
        return self._rate_limiters.snapshot()

    def adaptive_limiters(self) -> dict[str, AdaptiveLimiter]:
        """The adaptive limiters made so far, by key."""
        return self._adaptive.snapshot()

    # -- checks ------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Warnings about sound-but-suspect settings (timeout budgets and friends).

        Checked for the defaults and for each rule as it applies (merged over the
        defaults and, for a method rule, over its service's rule):

        * a timeout shorter than its retries' worst case (``max_attempts x
          per_attempt_timeout`` plus the longest backoffs): the upper level's
          timeout must exceed the sum below it;
        * a timeout that ends before the last hedge is sent;
        * a breaker whose ``slow_call_duration`` is not below the timeout;
        * a ``deadline_margin`` or a bulkhead ``max_wait`` not below the timeout;
        * a fallback on ``circuit_open`` without a breaker.
        """
        out: list[str] = []
        base = self._check_one(_compile("", "", [("defaults", self._defaults)]))
        out.extend(f"defaults: {w}" for w in base)
        by_service: dict[str, list[str]] = {}
        # Service rules first, so a method rule repeats nothing its service rule said.
        ordered = sorted(
            ((rule, m) for rule in self.rules for m in rule.matches), key=lambda x: bool(x[1][1])
        )
        found: list[tuple[int, str]] = []
        for rule, (service, method) in ordered:
            layers: list[tuple[str, dict[str, Any]]] = [("defaults", self._defaults)]
            parent = base
            if method and service in self._by_service:
                srule = self._by_service[service]
                layers.append((srule.label, dict(srule.sections)))
                parent = by_service.get(service, base)
            layers.append((rule.label, dict(rule.sections)))
            mine = self._check_one(_compile("", "", layers))
            if not method:
                by_service[service] = mine
            what = f"{service}/{method}" if method else service
            found.extend(
                (rule.index, f"{rule.label} ({what}): {w}") for w in mine if w not in parent
            )
        out.extend(text for _, text in sorted(found, key=lambda x: x[0]))
        return out

    @staticmethod
    def _check_one(mp: MethodPolicy) -> list[str]:
        out: list[str] = []
        t = mp.timeout
        retry = mp.retry
        if t is not None and retry is not None and retry.max_attempts > 1:
            worst = retry.worst_case()
            if worst is not None and worst > t:
                backoffs = worst - retry.max_attempts * (retry.per_attempt_timeout or 0.0)
                out.append(
                    f"timeout {_fmt(t)} is shorter than its retries' worst case "
                    f"{_fmt(worst)} ({retry.max_attempts} attempts x "
                    f"{_fmt(retry.per_attempt_timeout or 0.0)} + backoffs {_fmt(backoffs)}); "
                    "later attempts will be cut short (a timeout must exceed the sum of the "
                    "attempts and waits below it)"
                )
        hedging = mp.hedging
        if t is not None and hedging is not None and hedging.max_attempts > 1:
            last = hedging.delay * (hedging.max_attempts - 1)
            if last >= t:
                out.append(
                    f"timeout {_fmt(t)} ends before the last hedge would be sent "
                    f"({hedging.max_attempts - 1} x delay {_fmt(hedging.delay)} = {_fmt(last)})"
                )
        cb = mp.circuit_breaker
        if (
            t is not None
            and cb is not None
            and cb.slow_call_duration >= t
            and "slow_call_duration" in _explicit_breaker_keys(cb)
        ):
            out.append(
                f"circuit_breaker.slow_call_duration {_fmt(cb.slow_call_duration)} "
                f"is not below the timeout {_fmt(t)}, so no call is ever slow"
            )
        if t is not None and mp.deadline_margin >= t:
            out.append(
                f"deadline_margin {_fmt(mp.deadline_margin)} is not below the timeout {_fmt(t)}"
            )
        if t is not None and mp.bulkhead is not None and mp.bulkhead.max_wait >= t:
            out.append(
                f"bulkhead.max_wait {_fmt(mp.bulkhead.max_wait)} is not below the "
                f"timeout {_fmt(t)}: a queued call may spend its whole deadline waiting"
            )
        fb = mp.fallback
        if (
            fb is not None
            and FallbackTrigger.CIRCUIT_OPEN in fb.on
            and cb is None
            and fb.on != FallbackPolicy().on
        ):
            out.append("fallback.on lists circuit_open but no circuit_breaker is set")
        return out

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, rules={len(self.rules)})"


def _explicit_breaker_keys(cb: CircuitBreakerConfig) -> set[str]:
    """Keys of ``cb`` that differ from the defaults (a default 60s slow-call
    duration under a short timeout is not worth a warning)."""
    base = CircuitBreakerConfig()
    return {f.name for f in dataclasses.fields(cb) if getattr(cb, f.name) != getattr(base, f.name)}


def _bare(exc: ConfigError) -> str:
    """The message of ``exc`` without its source and path prefix."""
    text = exc.message
    prefix = (f"{exc.source}: " if exc.source else "") + (f"{exc.path}: " if exc.path else "")
    return text[len(prefix) :] if text.startswith(prefix) else text


def _read_sections(d: Mapping[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SECTIONS:
        if key in d:
            out[key] = _READERS[key](d[key], _join(path, key))
    return out


def _read_match(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    expected = 'a service "pkg.Service" or a method "pkg.Service/Method" (or a list of them)'
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(path, expected, value)
    out = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, str):
            raise _fail(p, expected, item)
        m = _MATCH.fullmatch(item.strip())
        if not m:
            raise _fail(p, expected, item)
        out.append((m.group(1), m.group(2) or ""))
    return tuple(out)


def _read_document(document: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[Rule]]:
    if document is None:
        return {}, []
    d = _mapping(document, "", ("version", "defaults", "rules"))
    if "version" in d and (isinstance(d["version"], bool) or d["version"] != 1):
        raise _fail("version", "1", d["version"])
    defaults: dict[str, Any] = {}
    if d.get("defaults") is not None:
        raw = _mapping(d["defaults"], "defaults", SECTIONS)
        defaults = _read_sections(raw, "defaults")
    rules: list[Rule] = []
    seen: dict[tuple[str, str], str] = {}
    raw_rules = d.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise _fail("rules", "a list of rules", raw_rules)
    for i, raw_rule in enumerate(raw_rules):
        path = f"rules[{i}]"
        r = _mapping(raw_rule, path, ("match", *SECTIONS), required=("match",))
        matches = _read_match(r["match"], _join(path, "match"))
        for m in matches:
            if m in seen:
                what = f"{m[0]}/{m[1]}" if m[1] else m[0]
                raise ConfigError(_join(path, "match"), f'"{what}" is already matched by {seen[m]}')
            seen[m] = path
        rules.append(Rule(i, matches, _read_sections(r, path)))
    return defaults, rules


# --------------------------------------------------------------------------------------
# YAML with positions and without silent duplicate keys.
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:
                dup = False
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads on/off/yes/no as booleans, so ``fallback: {on: [...]}`` would get
# the key True. Booleans are only true/false here, as in YAML 1.2 and JSON.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def read_yaml(text: str, source: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """Parse YAML the way every meshkit document is read: safe, duplicate keys are
    errors, booleans only ``true``/``false`` (so ``on:`` stays a string key).

    Returns the document (``None`` when empty) and the positions of its nodes by key
    path, for :func:`located`. A syntax error is a ConfigError naming
    ``source:line:col``."""
    try:
        return _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError("", problem or str(exc), source=f"{source}{pos}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", str(exc), source=source) from None


def located(exc: ConfigError, source: str, marks: Mapping[str, tuple[int, int]]) -> ConfigError:
    """``exc`` again, its source now ``source:line:col`` of the node its key path
    names (of the key itself for an unknown key), as ``meshkit policy check`` reports.
    An error that already names another source (a key file, say) is returned unchanged."""
    if exc.source is not None and exc.source != source:
        return exc
    pos = _mark_for(exc.path, marks, at_key=_bare(exc).startswith("unknown key"))
    return ConfigError(exc.path, _bare(exc), source=f"{source}{pos}")


def _load_yaml(text: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        document = loader.construct_document(node)
    finally:
        loader.dispose()
    marks: dict[str, tuple[int, int]] = {}
    _collect_marks(node, "", marks)
    return document, marks


def _collect_marks(node: yaml.Node, path: str, marks: dict[str, tuple[int, int]]) -> None:
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = _join(path, str(key_node.value))
                _collect_marks(value_node, child, marks)
                # An unknown key is reported at the key itself.
                marks.setdefault(
                    child + "#key", (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                )
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_marks(item, f"{path}[{i}]", marks)


def _mark_for(path: str, marks: Mapping[str, tuple[int, int]], *, at_key: bool = False) -> str:
    """``:line:col`` of the deepest known node on ``path`` ("" if none); of the key
    itself rather than its value when ``at_key``."""
    if not marks:
        return ""
    p = path
    while True:
        hit = (marks.get(p + "#key") or marks.get(p)) if at_key else marks.get(p)
        if hit is not None:
            return f":{hit[0]}:{hit[1]}"
        if not p:
            return ""
        cut = max(p.rfind("."), p.rfind("["))
        p = p[:cut] if cut > 0 else ""
