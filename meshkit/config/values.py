"""Value readers for the policy document: durations, sizes, integers, numbers, rates,
percentages, booleans, strings, enums, status codes and mappings.

Each takes the value and its key path and returns a clean value or raises
``ConfigError(path, "expected ..., got ...")``. The public aliases (``read_int``,
``parse_duration``...) are shared with the gateway's and the edge's config readers.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

from meshkit.errors import ConfigError
from meshkit.resilience.codes import (
    NEVER_RETRYABLE,
    STATUS_CODE_SET,
    STATUS_CODES,
)

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


def _fmt(seconds: float) -> str:
    """A duration for messages: 250ms, 2s, 1.5s, 2m."""
    if seconds >= 60 and (seconds / 60).is_integer():
        return f"{int(seconds // 60)}m"
    if seconds >= 1:
        return f"{seconds:g}s"
    ms = seconds * 1000
    return f"{ms:.4g}ms"
