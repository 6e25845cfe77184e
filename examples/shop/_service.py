"""What every shop service process does: parse flags, open its store, serve gRPC,
run its saga participant, print ``READY <port>``, and drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from examples.shop import wiring
from examples.shop.store import Store

log = logging.getLogger("examples.shop")


@dataclass
class ServiceContext:
    """What a service's ``build`` function gets."""

    name: str
    store: Store
    bus: Any  # meshkit.saga.EventBus, or None when run without NATS
    args: argparse.Namespace
    mode: str = "choreography"  # or "orchestrated" (SHOP_MODE)
    inbox: Any = None  # the participant's inbox; None: SqliteInbox in the service's store
    # Started after the gRPC server (before READY); each returns its stop function.
    background: list[Callable[[], Awaitable[Callable[[], Awaitable[None]]]]] = field(
        default_factory=list
    )


# build(ctx) -> (add servicers to the server, participant or None)
Build = Callable[[ServiceContext], Awaitable[tuple[Callable[[grpc.aio.Server], None], Any]]]


def parse_args(name: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"examples.shop.{name}")
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", ""))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", default=":memory:")
    parser.add_argument("--log-level", default=os.environ.get("SHOP_LOG_LEVEL", "WARNING"))
    return parser.parse_args(argv)


async def serve(name: str, schema: str, build: Build, argv: Sequence[str] | None = None) -> int:
    args = parse_args(name, argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
    )
    from examples.shop import otel

    otel.setup(name)
    store = Store(args.db, schema)
    bus = None
    if args.nats_url:
        from examples.shop.flow import connect_bus

        bus = await connect_bus(args.nats_url, name=f"shop-{name}")
    from examples.shop.flow import mode

    ctx = ServiceContext(name, store, bus, args, mode=mode())
    add_servicers, participant = await build(ctx)
    server = wiring.server()
    add_servicers(server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    stoppers = [await start() for start in ctx.background]
    consumer = None
    if participant is not None and bus is not None and ctx.mode == "choreography":
        from examples.shop import faults
        from meshkit.saga import SqliteInbox

        inbox = ctx.inbox or SqliteInbox(store.conn, store.lock)
        consumer = await participant.start(
            bus, inbox=inbox, after_commit=faults.after_commit_hook()
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch_parent = _watch_parent(stop)
    tune_gc()
    print(f"READY {port}", flush=True)
    await stop.wait()
    if watch_parent is not None:
        watch_parent.cancel()
    log.info("%s stopping: draining in-flight events", name)
    for stop_one in reversed(stoppers):
        try:
            await stop_one()
        except Exception:  # one part failing to stop must not keep the rest running
            log.exception("%s: stopping a background part failed", name)
    if consumer is not None:
        await consumer.stop()
    await server.stop(grace=2.0)
    if bus is not None:
        await bus.close()
    store.close()
    return 0


def tune_gc() -> None:
    """Collect garbage less often, as long-running services with caches should.

    Handling one event allocates a few dozen container objects, so CPython's default
    (a young collection every 700 net allocations) collects every few events, and
    each older collection walks the order service's aggregate cache: measured, that
    was 16% of the order service's CPU and 6% of the others'. Everything alive at
    start (modules, generated code) is frozen out of the collector's view; young
    collections run every 50,000 net allocations and old ones seldom. Reference
    counting still frees almost everything at once; only cycles wait.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _watch_parent(stop: asyncio.Event) -> asyncio.Task[None] | None:
    """With ``SHOP_PARENT_PID`` set (the runner sets it), stop once that process is gone."""
    raw = os.environ.get("SHOP_PARENT_PID", "")
    if not raw.isdigit():
        return None
    parent = int(raw)

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                log.warning("parent process %d is gone; stopping", parent)
                stop.set()
                return

    return asyncio.create_task(watch())


def main(name: str, schema: str, build: Build) -> None:
    """Entry point for ``python -m examples.shop.<name>``.

    ``SHOP_PROFILE=<dir>`` writes a cProfile of the whole run to ``<dir>/<name>.prof``.
    """
    profile_dir = os.environ.get("SHOP_PROFILE")
    if profile_dir:
        import cProfile

        # CPU time, not wall time: on a shared machine a wall-clock profile charges
        # the time this process waits for a core to whatever it was running.
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        try:
            _run(name, schema, build)
        finally:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{name}.prof"))
        return
    _run(name, schema, build)


def _run(name: str, schema: str, build: Build) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(name, schema, build))
        return
    uvloop.run(serve(name, schema, build))
