"""Serving the gateway: meshkit's HTTP/1.1 server (uvloop + httptools, :mod:`._serve`),
SO_REUSEPORT workers, SIGHUP reload, SIGTERM graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshkit.errors import ConfigError
from meshkit.gateway._asgi import ASGIApp, Receive, Scope, Send
from meshkit.gateway.core.app import create_app, load_catalog
from meshkit.gateway.core.config import (
    GatewayConfig,
    GatewayOptions,
    config_from_document,
    read_document,
    read_upstreams,
)
from meshkit.gateway.core.descriptors import Catalog, build_catalog, descriptor_set_from_reflection
from meshkit.gateway.serve._http import HttpOptions
from meshkit.gateway.upstream.upstreams import UpstreamRegistry

if TYPE_CHECKING:
    from meshkit.gateway.edge.profiles import EdgeConfig

log = logging.getLogger("meshkit.gateway")


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """Everything needed to (re)build the gateway in a worker process."""

    descriptor_set: str | None
    reflect: bool
    upstreams: tuple[str, ...]
    config: str | None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    services: tuple[str, ...] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    profile: str | None = None
    #: The HTTP server's limits and timeouts.
    http: HttpOptions = field(default_factory=HttpOptions)


#: Set in a worker process of :func:`serve` (``--workers``): its parent forwards
#: SIGHUP to every worker, so a reload asked of one worker goes through the parent.
_worker_of_serve = False
#: A SIGHUP reached this worker before its app could reload (it was starting): the
#: reload runs as soon as the app installs its handler (see :func:`_install_sighup`).
_sighup_while_starting = False


def _note_sighup(_signum: int, _frame: Any) -> None:
    global _sighup_while_starting
    _sighup_while_starting = True


def _install_sighup(reload: Callable[[], None]) -> None:
    """From now on SIGHUP runs ``reload`` in the running loop; one that came while the
    worker was starting (its configuration may have been read before the change) runs
    it at once."""
    global _sighup_while_starting
    # No loop signal handlers off the main thread or on Windows: no SIGHUP reload there.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    if _sighup_while_starting:
        _sighup_while_starting = False
        reload()


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A validated configuration: the catalog, the gateway config and, when the file
    has an ``edge:`` section (or a profile is named), the validated edge config."""

    catalog: Catalog
    cfg: GatewayConfig
    edge: EdgeConfig | None = None


def _load(spec: ServeSpec, previous: GatewayConfig | None = None) -> _Loaded:
    """Read and validate everything ``spec`` names, the whole file included (an
    ``edge:`` section and the ``policy:`` too), so a bad value stops the start with
    ``file:line:col``. ``previous`` (a reload) lends its Policy when unchanged."""
    from meshkit.gateway.edge.profiles import load_edge_config

    edge: EdgeConfig | None = None
    if spec.config is None:
        if spec.profile:
            raise ConfigError(
                "--profile", "the edge needs --config gateway.yaml with an edge: section"
            )
        cfg = GatewayConfig()
    else:
        doc = read_document(spec.config)
        if spec.profile or (isinstance(doc.data, Mapping) and doc.data.get("edge") is not None):
            # The edge validates the whole document, policy included, and owns that
            # Policy; the transcoder's view below only names the upstreams to reflect.
            edge = load_edge_config(doc)
            raw = doc.data if isinstance(doc.data, Mapping) else {}
            cfg = GatewayConfig(
                edge.options,
                read_upstreams(raw.get("upstreams")),
                edge.policy,
                raw.get("edge") or {},
            )
        else:
            cfg = config_from_document(doc, previous=previous)
    if spec.overrides:
        cfg = replace(cfg, options=cfg.options.with_(**spec.overrides))
    specs = list(spec.upstreams) or [
        f"{k}={v}" if k != "default" else v for k, v in cfg.upstreams.items()
    ]
    if not specs and edge is None:
        raise ConfigError("--upstream", "at least one upstream is required (flag or config)")
    if spec.reflect:
        targets = sorted({s.partition("=")[2] or s for s in specs})
        catalog = build_catalog(
            descriptor_set_from_reflection([t.split(",")[0] for t in targets]),
            services=spec.services,
        )
    elif spec.descriptor_set:
        catalog = load_catalog(Path(spec.descriptor_set), spec.services)
    else:
        raise ConfigError("--descriptor-set", "give --descriptor-set FILE or --reflect")
    cfg = GatewayConfig(
        cfg.options,
        {s.partition("=")[0] if "=" in s else "default": s.partition("=")[2] or s for s in specs},
        cfg.policy,
        cfg.edge,
    )
    return _Loaded(catalog, cfg, edge)


def _with_sighup(app: ASGIApp, on_sighup: Callable[[], None]) -> ASGIApp:
    """Install a SIGHUP handler when the app's lifespan starts, then delegate."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            _install_sighup(on_sighup)
        await app(scope, receive, send)

    return wrapper


#: How long ``POST /admin/reload`` on a worker waits for its own reload to finish.
ADMIN_RELOAD_WAIT = 10.0


def _build_edge(spec: ServeSpec, loaded: _Loaded) -> ASGIApp:
    from meshkit.gateway.edge.edge import EdgeApp
    from meshkit.gateway.edge.profiles import load_edge_config

    assert spec.config is not None and loaded.edge is not None
    path = spec.config
    services = list(spec.services) if spec.services else None
    catalog_loader: Callable[[], Catalog] | None = None
    if spec.descriptor_set:
        source = Path(spec.descriptor_set)
        catalog_loader = lambda: load_catalog(source, services)  # noqa: E731
    edge = EdgeApp(
        loaded.edge,
        loaded.catalog,
        config_loader=lambda: load_edge_config(path),
        catalog_loader=catalog_loader,
        option_overrides=spec.overrides,
    )
    inner = edge.app_for(spec.profile) if spec.profile else edge.asgi()
    # Events of admin requests waiting for the next reload to finish (see below).
    waiters: list[asyncio.Event] = []

    def reload() -> None:
        # The waiters registered before this SIGHUP are the ones it answers.
        mine = list(waiters)
        waiters.clear()

        async def run() -> None:
            try:
                await edge.reload()
                log.info("edge reloaded (pid %d)", os.getpid())
            except Exception as exc:  # keep serving the old configuration
                log.error("edge reload failed, keeping the previous configuration: %s", exc)
            finally:
                for event in mine:
                    event.set()

        asyncio.get_running_loop().create_task(run())

    if _worker_of_serve:
        # POST /admin/reload reaches one worker; SIGHUP to the parent reaches them all
        # (the parent forwards it), this one included, which is then awaited so the
        # answer means at least this worker serves the new configuration.
        async def reload_everywhere() -> None:
            before = edge.reloads
            done = asyncio.Event()
            waiters.append(done)
            os.kill(os.getppid(), signal.SIGHUP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), ADMIN_RELOAD_WAIT)
            if edge.reloads == before:
                raise ConfigError("", "the reload failed or timed out; see the log")

        edge.reload_all = reload_everywhere
    return _with_sighup(inner, reload)


def build_app(spec: ServeSpec) -> ASGIApp:
    """Build the app for ``spec`` (the edge when the config has an ``edge:`` section or a
    profile is named) and wire SIGHUP reload into its lifespan."""
    loaded = _load(spec)
    if loaded.edge is not None:
        return _build_edge(spec, loaded)
    cfg = loaded.cfg
    app = create_app(
        loaded.catalog,
        UpstreamRegistry.from_specs(cfg.upstreams, policy=cfg.policy),
        options=cfg.options,
    )
    current = {"cfg": cfg}

    def reload() -> None:
        try:
            old = current["cfg"]
            new = _load(spec, previous=old)
            new_cfg = new.cfg
            # carry_policy kept the old Policy object when the document is unchanged:
            # the same upstreams then keep their channels. A changed one shares the old
            # registry, so new channels still find the breakers whose config is unchanged.
            same_ups = new_cfg.upstreams == old.upstreams and new_cfg.policy is old.policy
            registry = (
                None
                if same_ups
                else UpstreamRegistry.from_specs(new_cfg.upstreams, policy=new_cfg.policy)
            )
            app.reload(app.build_state(new.catalog, registry, new_cfg.options))
            current["cfg"] = new_cfg
            log.info("gateway reloaded: %d routes (pid %d)", len(app.routes), os.getpid())
        except Exception as exc:  # keep serving the old snapshot
            log.error("gateway reload failed, keeping the previous configuration: %s", exc)

    async def install_sighup() -> None:
        _install_sighup(reload)

    app.on_startup.append(install_sighup)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so several workers share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(
    spec: ServeSpec,
    sock: socket.socket | None = None,
    *,
    app: ASGIApp | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Serve in this process until SIGTERM/SIGINT: 0 after a graceful stop, 3 when the
    app's startup failed."""
    from meshkit.gateway.serve._serve import run

    if app is None:
        app = build_app(spec)
    if sock is None:
        sock = bind_socket(spec.host, spec.port)
    return run([(sock, app)], options=spec.http, lifespan=app, on_started=on_started)


def _worker_main(spec: ServeSpec) -> None:
    global _worker_of_serve
    _worker_of_serve = True
    # SIGHUP was ignored since the parent started this process (see serve); from here
    # on one is noted, and the app reloads once it can.
    signal.signal(signal.SIGHUP, _note_sighup)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(run_worker(spec))


def _probe_host(host: str) -> str:
    """Where to connect to reach a server listening on ``host`` (a wildcard address
    is reached on the loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _wait_until_answering(host: str, port: int, procs: list[Any], timeout: float = 120.0) -> bool:
    """Whether the port accepts a connection before every worker has exited (or
    ``timeout`` passed): only then does the parent say it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((_probe_host(host), port), timeout=0.5):
                return True
        except OSError:
            pass
        if not any(p.is_alive() for p in procs):
            return False
        time.sleep(0.05)
    return False


def serve(spec: ServeSpec) -> int:
    """Run the gateway: in-process for one worker, else N SO_REUSEPORT processes.

    The whole configuration is validated (the app built) before anything listens, and
    "listening" is logged only once the port answers: after the lifespan startup in
    one process, after a worker accepted a probe connection with ``--workers``."""
    app = build_app(spec)  # fail fast, in the parent, on any bad file, flag or value
    if spec.workers <= 1:
        sock = bind_socket(spec.host, spec.port)
        port = sock.getsockname()[1]
        return run_worker(
            spec,
            sock,
            app=app,
            on_started=lambda: log.info("meshkit gateway on %s:%d", spec.host, port),
        )
    # Reserve the port (port 0 picks one) so every worker binds the same one.
    reserve = bind_socket(spec.host, spec.port)
    port = reserve.getsockname()[1]
    reserve.close()
    wspec = ServeSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "port": port})
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(wspec,), daemon=False) for _ in range(spec.workers)
    ]

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    # Before the workers start: a worker may ask for a reload (SIGHUP to this process)
    # as soon as it serves, and SIGHUP's default action would end the parent. The
    # workers start with SIGHUP ignored (an ignored signal stays ignored across exec):
    # one forwarded while a worker is still starting must not end it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for p in procs:
        p.start()
    signal.signal(signal.SIGHUP, forward)
    if _wait_until_answering(spec.host, port, procs):
        log.info("meshkit gateway on %s:%d with %d workers", spec.host, port, spec.workers)
    code = 0
    clean = {0, -signal.SIGTERM, -signal.SIGINT}  # a worker killed before its handlers
    for p in procs:
        p.join()
        if p.exitcode not in clean:
            code = code or 1
    return code


def options_overrides(
    *, proto_names: bool = False, emit_unpopulated: bool = False, strict: bool = False
) -> dict[str, Any]:
    """CLI flags that override ``gateway:`` options."""
    out: dict[str, Any] = {}
    if proto_names:
        out["proto_names"] = True
    if emit_unpopulated:
        out["emit_unpopulated"] = True
    if strict:
        out["strict"] = True
    return out


__all__ = ["GatewayOptions", "ServeSpec", "bind_socket", "build_app", "serve"]
