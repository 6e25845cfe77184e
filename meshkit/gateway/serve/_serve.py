"""The CLI server: listening sockets, ASGI lifespan, graceful drain, signals.

:class:`HttpServer` serves one or more listening sockets, each with its own ASGI app,
over :class:`~meshkit.gateway.serve._http.HttpProtocol`. A graceful stop (:meth:`HttpServer.stop`,
SIGTERM/SIGINT under :func:`run`) stops accepting, closes idle keep-alive connections,
lets requests in flight finish for up to ``graceful_timeout`` seconds, closes WebSockets
with 1012, then runs the lifespan shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from meshkit.gateway.serve._http import (
    ASGI_VERSION,
    ASGIApp,
    HttpOptions,
    HttpProtocol,
    ServerState,
)

log = logging.getLogger("meshkit.gateway")

#: Exit status of a server whose lifespan startup failed (as uvicorn's).
STARTUP_FAILED = 3


class _Lifespan:
    """The ASGI lifespan protocol, server side."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": state}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.startup_done = asyncio.Event()
        self.shutdown_done = asyncio.Event()
        self.failed: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.supported = True

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if not self.startup_done.is_set():
                log.error("lifespan startup failed", exc_info=exc)
                self.failed = str(exc) or type(exc).__name__
            else:
                log.error("lifespan failed", exc_info=exc)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        else:
            if not self.startup_done.is_set():
                self.supported = False  # an app that returns at once has no lifespan
        finally:
            self.startup_done.set()
            self.shutdown_done.set()

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.startup_done.set()
        elif kind == "lifespan.startup.failed":
            self.failed = message.get("message") or "startup failed"
            self.startup_done.set()
        elif kind == "lifespan.shutdown.complete":
            self.shutdown_done.set()
        elif kind == "lifespan.shutdown.failed":
            log.error("lifespan shutdown failed: %s", message.get("message", ""))
            self.shutdown_done.set()

    async def startup(self) -> bool:
        self.task = asyncio.get_running_loop().create_task(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        await self.startup_done.wait()
        return self.failed is None

    async def shutdown(self) -> None:
        if self.task is None or self.task.done() or not self.supported:
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.shutdown_done.wait()


class HttpServer:
    """Serves ``(socket, app)`` listeners until :meth:`stop`.

    ``lifespan`` is the app whose ASGI lifespan runs around serving (None: no lifespan,
    the caller starts and stops what the apps share).
    """

    def __init__(
        self,
        listeners: Sequence[tuple[socket.socket, ASGIApp]],
        *,
        options: HttpOptions | None = None,
        lifespan: ASGIApp | None = None,
    ) -> None:
        self.listeners = list(listeners)
        self.options = options or HttpOptions()
        self.lifespan_app = lifespan
        self.state = ServerState(self.options)
        self.started = False
        #: Set once every listener accepts connections.
        self.started_event = asyncio.Event()
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def ports(self) -> list[int]:
        """The listening ports, in the order of the listeners."""
        return [int(sock.getsockname()[1]) for sock, _ in self.listeners]

    def stop(self, *, force: bool = False) -> None:
        """Begin a graceful stop (``force``: do not wait for requests in flight)."""
        if force:
            self._forced.set()
        self._stop.set()

    async def serve(self) -> int:
        """Serve until stopped: 0, or :data:`STARTUP_FAILED` when the lifespan startup
        failed (nothing was served)."""
        loop = asyncio.get_running_loop()
        lifespan = None
        if self.lifespan_app is not None:
            lifespan = _Lifespan(self.lifespan_app, self.state.lifespan_state)
            if not await lifespan.startup():
                log.error("application startup failed: %s", lifespan.failed)
                return STARTUP_FAILED
        state = self.state
        self._date_handle = loop.call_later(1.0, self._tick, loop)
        try:
            for sock, app in self.listeners:
                self._servers.append(
                    await loop.create_server(
                        _factory(app, state), sock=sock, backlog=2048, start_serving=True
                    )
                )
            self.started = True
            self.started_event.set()
            await self._stop.wait()
            await self._drain()
        finally:
            self._date_timer_cancel()
            for server in self._servers:
                server.close()
            if lifespan is not None:
                await lifespan.shutdown()
        return 0

    _date_handle: asyncio.TimerHandle | None = None

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        # The Date header, refreshed once a second rather than formatted per response.
        self.state.refresh_date()
        self._date_handle = loop.call_later(1.0, self._tick, loop)

    def _date_timer_cancel(self) -> None:
        if self._date_handle is not None:
            self._date_handle.cancel()
            self._date_handle = None

    async def _drain(self) -> None:
        state = self.state
        state.draining = True
        for server in self._servers:
            server.close()  # no new connections
        for conn in list(state.connections):
            conn.shutdown()
        loop = asyncio.get_running_loop()
        end = loop.time() + self.options.graceful_timeout
        forced = loop.create_task(self._forced.wait())
        try:
            # Requests in flight (and WebSocket apps) finish; their connections close
            # with their responses (keep-alive is off from here).
            while state.tasks and not self._forced.is_set():
                remaining = end - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    [*state.tasks, forced], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            forced.cancel()
        if state.connections:
            log.warning("%d connection(s) still open after the drain", len(state.connections))
        for conn in list(state.connections):
            conn.transport.close()
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=1.0)


def _factory(app: ASGIApp, state: ServerState) -> Callable[[], HttpProtocol]:
    def make() -> HttpProtocol:
        return HttpProtocol(app, state)

    return make


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when available, asyncio's loop otherwise."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(main)


async def serve_until_signalled(
    server: HttpServer, on_started: Callable[[], None] | None = None
) -> int:
    """Serve, stopping gracefully on SIGTERM or SIGINT (a second one stops at once).
    ``on_started`` runs once every listener accepts connections (after the lifespan
    startup), so "listening" is only ever said of a server that answers."""
    loop = asyncio.get_running_loop()
    announce: asyncio.Task[None] | None = None
    if on_started is not None:
        callback = on_started

        async def when_started() -> None:
            await server.started_event.wait()
            callback()

        announce = loop.create_task(when_started())
    seen: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        seen.append(sig)
        server.stop(force=len(seen) > 1)

    handled: list[signal.Signals] = []
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
    try:
        return await server.serve()
    finally:
        if announce is not None:
            announce.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
            # Stopped and drained: what is left is the loop's teardown and the exit. A
            # further signal then (a supervisor repeating its SIGTERM) must not turn a
            # graceful stop into death by signal.
            signal.signal(sig, signal.SIG_IGN)


def run(
    listeners: Sequence[tuple[socket.socket, ASGIApp]],
    *,
    options: HttpOptions | None = None,
    lifespan: ASGIApp | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Serve ``listeners`` in this process until SIGTERM/SIGINT; 0 after a graceful stop.
    ``on_started`` runs once the listeners accept connections."""
    server = HttpServer(listeners, options=options, lifespan=lifespan)
    return run_loop(serve_until_signalled(server, on_started))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's flags (``meshkit gateway`` and ``meshkit edge``)."""
    d = HttpOptions()
    group = parser.add_argument_group("HTTP server")
    group.add_argument(
        "--max-header-bytes",
        type=_positive_int,
        default=d.max_header_bytes,
        metavar="N",
        help=f"request line + header section limit, 431 beyond (default {d.max_header_bytes})",
    )
    group.add_argument(
        "--max-headers",
        type=_positive_int,
        default=d.max_headers,
        metavar="N",
        help=f"header fields per request, 431 beyond (default {d.max_headers})",
    )
    group.add_argument(
        "--header-timeout",
        type=_positive_seconds,
        default=d.header_timeout,
        metavar="SECONDS",
        help=f"time to receive a request's header section, 408 after (default {d.header_timeout:g})",
    )
    group.add_argument(
        "--keep-alive-timeout",
        type=_positive_seconds,
        default=d.keep_alive_timeout,
        metavar="SECONDS",
        help=f"idle keep-alive connections close after (default {d.keep_alive_timeout:g})",
    )


def http_options(args: argparse.Namespace) -> HttpOptions:
    """:class:`HttpOptions` from the flags of :func:`add_http_arguments`."""
    return HttpOptions(
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
    )


__all__ = [
    "STARTUP_FAILED",
    "HttpServer",
    "add_http_arguments",
    "http_options",
    "run",
    "run_loop",
    "serve_until_signalled",
]
