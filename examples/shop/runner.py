"""Start the shop's services as separate processes (the demo, tests and bench use this).

Each service is ``python -m examples.shop.<name>`` with the repository root as
its working directory; it prints ``READY <port>`` on stdout once its gRPC
server listens and its participant consumes.

A service may run as several instances (``ShopCluster(..., instances=2)``): each is
its own process with its own gRPC port and log, and the instances of one service
share its durable consumer (JetStream hands each event to one of them) and its
SQLite file (one host; the store opens it in WAL mode with a busy timeout, and
every write is a ``BEGIN IMMEDIATE`` transaction, so two processes take turns).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from examples.shop._gen import REPO_ROOT

# The saga's participants, and every process (plus the order query service, CQRS's read side).
SAGA_SERVICES: tuple[str, ...] = ("order", "inventory", "payment", "shipping", "notification")
SERVICES: tuple[str, ...] = (*SAGA_SERVICES, "query")
GRPC_SERVICES: dict[str, str] = {
    "order": "shop.v1.OrderService",
    "inventory": "shop.v1.InventoryService",
    "payment": "shop.v1.PaymentService",
    "shipping": "shop.v1.ShippingService",
    "notification": "shop.v1.NotificationService",
    "query": "shop.v1.OrderQueryService",
}
_GATEWAY_ON = re.compile(r"meshkit gateway on [^\s:]+:(\d+)")


class ServiceStartError(RuntimeError):
    """A service process did not report READY."""


def _tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a process's log ("" when it has none yet)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class ServiceProcess:
    """One running service process."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)


def instance_key(name: str, instance: int) -> str:
    """How :class:`ShopCluster` names a service's instance: ``order``, ``order.2``, ..."""
    return name if instance <= 1 else f"{name}.{instance}"


def start_service(
    name: str,
    nats_url: str,
    data_dir: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_args: Iterable[str] = (),
    timeout: float = 30.0,
    instance: int = 1,
) -> ServiceProcess:
    """Start ``examples.shop.<name>`` and wait for its READY line.

    Every instance of a service uses ``<data_dir>/<name>.sqlite``; instance ``i > 1``
    logs to ``<name>.<i>.log`` and is named ``<name>.<i>``.
    """
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    key = instance_key(name, instance)
    log_path = data / f"{key}.log"
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # A runner that dies without stopping its services (a killed test run) leaves
    # no orphans reconnecting forever: each service exits when this process is gone.
    full_env["SHOP_PARENT_PID"] = str(os.getpid())
    if env:
        full_env.update(env)
    args = [
        sys.executable,
        "-m",
        f"examples.shop.{name}",
        "--nats-url",
        nats_url,
        "--port",
        "0",
        "--db",
        str(data / f"{name}.sqlite"),
        *extra_args,
    ]
    log_file = open(log_path, "a")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            start_new_session=True,
        )
    finally:
        log_file.close()
    assert proc.stdout is not None
    ready: list[int] = []
    done = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("READY ") and not ready:
                ready.append(int(line.split()[1]))
                done.set()
        done.set()

    threading.Thread(target=read, name=f"shop-{key}-stdout", daemon=True).start()
    done.wait(timeout)
    if not ready:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise ServiceStartError(f"{key} did not become ready (exit {proc.poll()}):\n{tail}")
    return ServiceProcess(key, proc, ready[0], log_path, lines)


def stop_service(svc: ServiceProcess, timeout: float = 10.0) -> int | None:
    """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code."""
    if svc.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            svc.proc.send_signal(signal.SIGTERM)
        try:
            svc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait(5)
    return svc.proc.returncode


def kill_service(svc: ServiceProcess) -> None:
    """SIGKILL, as a crash would."""
    if svc.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            svc.proc.kill()
        svc.proc.wait(5)


@dataclass
class GatewayProcess:
    """The meshkit gateway (``meshkit gateway``) in front of the shop's services."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)


def start_gateway(
    upstreams: Mapping[str, str], data_dir: Path, descriptor_set: Path, *, timeout: float = 30.0
) -> GatewayProcess:
    """Start ``meshkit gateway`` on a free port with ``{grpc service: address}`` upstreams.

    Ready once it has logged its port and answers ``GET /v1/inventory/book``.
    """
    import urllib.error
    import urllib.request

    log_path = data_dir / "gateway.log"
    args = [sys.executable, "-m", "meshkit.cli", "gateway", "--descriptor-set", str(descriptor_set)]
    for service, address in upstreams.items():
        args += ["--upstream", f"{service}={address}"]
    args += ["--host", "127.0.0.1", "--port", "0"]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    end = time.monotonic() + timeout
    port = 0
    while time.monotonic() < end and proc.poll() is None:
        if not port:
            match = _GATEWAY_ON.search(log_path.read_text(errors="replace"))
            port = int(match.group(1)) if match else 0
        if port:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/v1/inventory/book", timeout=2
                ):
                    return GatewayProcess(proc, port, log_path)
            except urllib.error.HTTPError:
                return GatewayProcess(proc, port, log_path)  # it answered
            except OSError:
                pass
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(5)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    raise ServiceStartError(f"the gateway did not become ready (exit {proc.poll()}):\n{tail}")


class ShopCluster:
    """Every shop service as its own process, sharing one NATS server and a data dir.

    ``nats_url`` may be a cluster's server list (comma-separated). ``instances``: how
    many processes each saga participant runs (an int for all of them, or a mapping
    by service name; default one). The query service runs once whatever the int
    says (its projector applies every event to its own database; a second one on
    the same file would apply each event twice); a mapping may still name it.
    :attr:`procs` is keyed by :func:`instance_key` (``order``, ``order.2``, ...), so
    ``address("order")``, ``kill("order")`` and friends mean the first instance.
    """

    def __init__(
        self,
        nats_url: str,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        services: Iterable[str] = SERVICES,
        env: Mapping[str, Mapping[str, str]] | None = None,
        extra_args: Mapping[str, Iterable[str]] | None = None,
        instances: int | Mapping[str, int] = 1,
    ) -> None:
        self.nats_url = nats_url
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="meshkit-shop-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.names = tuple(services)
        self.env = dict(env or {})
        self.extra_args = dict(extra_args or {})
        self.instances: dict[str, int] = {}
        for name in self.names:
            if isinstance(instances, int):
                count = instances if name in SAGA_SERVICES else 1
            else:
                count = instances.get(name, 1)
            if count < 1:
                raise ValueError(f"instances of {name}: {count}; at least 1")
            self.instances[name] = count
        self.procs: dict[str, ServiceProcess] = {}
        self.gateway: GatewayProcess | None = None

    def start_gateway(self, descriptor_set: Path) -> GatewayProcess:
        """Start the REST gateway in front of the running services."""
        ups = {GRPC_SERVICES[n]: p.address for n, p in self.procs.items() if n in GRPC_SERVICES}
        self.gateway = start_gateway(ups, self.data_dir, descriptor_set)
        return self.gateway

    def start(self) -> ShopCluster:
        """Start every service (in parallel) and wait until all are ready."""
        errors: list[BaseException] = []

        def one(name: str, instance: int) -> None:
            try:
                self.procs[instance_key(name, instance)] = self._start(name, instance=instance)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=one, args=(n, i))
            for n in self.names
            for i in range(1, self.instances[n] + 1)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def _start(
        self, name: str, env: Mapping[str, str] | None = None, *, instance: int = 1
    ) -> ServiceProcess:
        merged = dict(self.env.get(name, {}))
        merged.update(env or {})
        return start_service(
            name,
            self.nats_url,
            self.data_dir,
            env=merged,
            extra_args=self.extra_args.get(name, ()),
            instance=instance,
        )

    @staticmethod
    def _split(key: str) -> tuple[str, int]:
        """``order.2`` -> ("order", 2); ``order`` -> ("order", 1)."""
        name, _, num = key.partition(".")
        return name, int(num) if num.isdigit() else 1

    def keys(self, name: str) -> list[str]:
        """The :attr:`procs` keys of every instance of service ``name``."""
        return [instance_key(name, i) for i in range(1, self.instances.get(name, 1) + 1)]

    def restart(self, name: str, *, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """Stop (if running) and start one instance again with the same database.

        ``name`` is a service (its first instance) or an instance key (``order.2``).
        """
        old = self.procs.get(name)
        if old is not None:
            stop_service(old)
        service, instance = self._split(name)
        self.procs[name] = self._start(service, env, instance=instance)
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL one instance, as a crash would."""
        kill_service(self.procs[name])

    def stop_one(self, name: str) -> int | None:
        """Stop one instance gracefully; :meth:`restart` brings it back."""
        return stop_service(self.procs[name])

    def address(self, name: str) -> str:
        """The gRPC address of an instance (a service name: its first instance)."""
        return self.procs[name].address

    def addresses(self, name: str) -> list[str]:
        """The gRPC addresses of every running instance of service ``name``."""
        return [self.procs[k].address for k in self.keys(name) if k in self.procs]

    def db_path(self, name: str) -> Path:
        """Service ``name``'s database (every instance of it shares the file)."""
        return self.data_dir / f"{self._split(name)[0]}.sqlite"

    def stop(self) -> dict[str, int | None]:
        """Stop every service gracefully (in parallel); returns exit codes by name."""
        codes: dict[str, int | None] = {}

        def one(svc: ServiceProcess) -> None:
            codes[svc.name] = stop_service(svc)

        if self.gateway is not None:
            gw = self.gateway.proc
            if gw.poll() is None:
                gw.send_signal(signal.SIGTERM)
                try:
                    gw.wait(10)
                except subprocess.TimeoutExpired:
                    gw.kill()
                    gw.wait(5)
            codes["gateway"] = gw.returncode
            self.gateway = None
        threads = [threading.Thread(target=one, args=(s,)) for s in self.procs.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return codes

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ShopCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; returns its last truth value."""
    assert callable(predicate)
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)
