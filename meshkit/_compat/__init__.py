"""Version-gated use of dependencies' private internals, one module per dependency.

meshkit's guarantees rest only on public APIs. Where a private API buys measured
speed, the code using it lives here (:mod:`meshkit._compat.grpcio`,
:mod:`meshkit._compat.nats`) and runs only on the exact release series it was
tested against; on any other version, or with ``MESHKIT_COMPAT=off`` in the
environment (read at import), the public API serves with the same results and
only the speed differs. Nothing else in meshkit touches a private name of grpcio
or nats-py (tests/unit/test_compat.py enforces it).

Each module exposes ``TESTED`` (version prefixes), ``INSTALLED`` (the installed
version), ``FAST_PATHS`` (each fast path and whether it is on) and ``describe()``
(the line logged at first use).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

__all__ = ["ENABLED", "describe", "gate_open", "installed_version", "log_once"]

log = logging.getLogger("meshkit.compat")

#: False when ``MESHKIT_COMPAT=off`` (or 0/false/no) was set at import: every fast
#: path is off, so the public fallbacks can be exercised under the locked versions.
ENABLED: bool = os.environ.get("MESHKIT_COMPAT", "").strip().lower() not in {
    "off",
    "0",
    "false",
    "no",
}

_logged: set[str] = set()


def installed_version(distribution: str, fallback: str = "0.0.0") -> str:
    """The installed version of ``distribution`` (``fallback`` when it has no metadata,
    e.g. a source checkout on ``sys.path``)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return fallback


def gate_open(installed: str, tested: tuple[str, ...]) -> bool:
    """Whether the private fast paths may run: the kill switch is not set and
    ``installed`` starts with one of the ``tested`` prefixes (``"1.85."``: a series)."""
    return ENABLED and installed.startswith(tested)


def log_once(key: str, line: str) -> None:
    """Log ``line`` (which fast paths are on, and why) the first time ``key`` is used."""
    if key not in _logged:
        _logged.add(key)
        log.info("%s", line)


def describe(
    module: str, dependency: str, installed: str, tested: tuple[str, ...], paths: dict[str, bool]
) -> str:
    """One line: which fast paths of ``module`` are on, the installed ``dependency`` and
    the tested series (and the kill switch, when set)."""
    listed = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in paths.items())
    series = " or ".join(f"{t}x" for t in tested)
    if not ENABLED:
        series += "; MESHKIT_COMPAT=off"
    return f"meshkit/_compat/{module}.py: {dependency} {installed} (tested {series}): {listed}"
