"""``meshkit saga``: list, show and watch sagas; draw the flow graph; inspect the dead letters.

::

    meshkit saga list [--state RUNNING]        every saga with its state and age
    meshkit saga show SAGA_ID                  one saga's timeline

``list`` and ``show`` cover choreographed sagas (the tracker's ``--bucket``) and
orchestrated ones (the orchestrator's ``--orch-bucket``, default ``meshkit_orch``).
    meshkit saga watch                         live counts by state (Ctrl-C ends)
    meshkit saga graph examples.shop.flow:PARTICIPANTS [--definition MOD:ATTR]
    meshkit saga track examples.shop.flow:ORDER_SAGA --stream examples.shop.flow:SHOP_STREAM
    meshkit saga dlq list [--stream S] [--consumer C]
    meshkit saga dlq replay [SEQ ...] [--all] [--keep]

The NATS server is ``--nats-url``, else ``NATS_URL``, else nats://127.0.0.1:4222.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

_DEFAULT_URL = "nats://127.0.0.1:4222"
#: How long the inspection commands wait for a server before saying none answered.
_CONNECT_SECONDS = 2.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    saga = subparsers.add_parser(
        "saga",
        help="inspect choreographed sagas: list, show, watch, graph, dlq",
        description="Inspect the sagas a meshkit tracker records in JetStream KV.",
    )
    sub = saga.add_subparsers(dest="saga_command", metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser, *, buckets: bool = True) -> None:
        p.add_argument(
            "--nats-url",
            default=os.environ.get("NATS_URL", _DEFAULT_URL),
            help="NATS server, or a cluster's servers comma-separated "
            "(default: $NATS_URL or %(default)s)",
        )
        if buckets:  # the tracker's and orchestrator's state; the DLQ has neither
            p.add_argument("--bucket", default="meshkit_sagas", help="the tracker's KV bucket")
            p.add_argument(
                "--orch-bucket",
                default="meshkit_orch",
                help="the orchestrator's KV bucket (orchestrated sagas)",
            )
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    def dlq_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stream", help="only letters from this stream (e.g. SHOP)")
        p.add_argument("--consumer", help="only letters of this durable consumer")

    p = sub.add_parser("list", help="every saga with its state")
    common(p)
    p.add_argument("--state", help="only sagas in this state (RUNNING, COMPLETED, ...)")
    p.set_defaults(func=lambda a: _run(_list, a))

    p = sub.add_parser("show", help="one saga's timeline")
    common(p)
    p.add_argument("saga_id", metavar="SAGA_ID")
    p.set_defaults(func=lambda a: _run(_show, a))

    p = sub.add_parser("watch", help="a live view of saga counts by state")
    common(p)
    p.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0: never)")
    p.set_defaults(func=lambda a: _run(_watch, a))

    p = sub.add_parser(
        "graph",
        help="draw the choreography as Mermaid and report cycles and gaps",
        description="Import MODULE:ATTR (a list of Participants), print a Mermaid flowchart on "
        "stdout and problems on stderr; exit 1 on cycles or failure events nobody compensates.",
    )
    p.add_argument("participants", metavar="MODULE:ATTR")
    p.add_argument("--definition", metavar="MODULE:ATTR", help="a SagaDefinition (names failures)")
    p.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="TYPE",
        help="an event published outside any handler (e.g. shop.v1.OrderCreated)",
    )
    p.set_defaults(func=_graph)

    p = sub.add_parser(
        "track",
        help="run a saga tracker (state in KV, timeouts) until interrupted",
        description="Follow a stream's events and keep each saga's state in the KV bucket; "
        "time out sagas whose deadline passes. Several trackers may run at once.",
    )
    common(p)
    p.add_argument("definition", metavar="MODULE:ATTR", help="a SagaDefinition")
    p.add_argument("--stream", required=True, metavar="MODULE:ATTR", help="a StreamSpec")
    p.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0: never)")
    p.set_defaults(func=_track_entry)

    dlq = sub.add_parser("dlq", help="dead letters: list and replay")
    dsub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION")
    p = dsub.add_parser("list", help="list dead letters with their reasons")
    common(p, buckets=False)
    dlq_filters(p)
    p.set_defaults(func=lambda a: _run(_dlq_list, a))
    p = dsub.add_parser("replay", help="republish dead letters to their original subjects")
    common(p, buckets=False)
    p.add_argument("seqs", nargs="*", type=int, metavar="SEQ")
    p.add_argument(
        "--all", action="store_true", help="replay every dead letter (or those filtered)"
    )
    dlq_filters(p)
    p.add_argument("--keep", action="store_true", help="keep replayed letters in the DLQ")
    p.set_defaults(func=lambda a: _run(_dlq_replay, a))
    dlq.set_defaults(func=lambda a: (dlq.print_help(sys.stderr), 2)[1])
    saga.set_defaults(func=lambda a: (saga.print_help(sys.stderr), 2)[1])


def _run(fn: Callable[[Any, argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    from meshkit.saga.bus import EventBus

    async def go() -> int:
        errors: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        try:
            bus = await asyncio.wait_for(
                EventBus.connect(
                    args.nats_url,
                    name="meshkit-cli",
                    allow_reconnect=False,
                    connect_timeout=_CONNECT_SECONDS,
                    error_cb=on_error,
                ),
                _CONNECT_SECONDS,
            )
        except Exception as exc:
            # nats-py keeps trying a refused server until the timeout: say what it met.
            cause = errors[-1] if errors else exc
            reason = str(cause) or type(cause).__name__
            print(
                f"meshkit saga: cannot connect to {args.nats_url}: no NATS server answered "
                f"within {_CONNECT_SECONDS:g} s ({reason}); is it running? "
                "(--nats-url or NATS_URL names it)",
                file=sys.stderr,
            )
            return 1
        try:
            return await fn(bus, args)
        finally:
            await bus.close()

    return asyncio.run(go())


def _fmt_ms(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def _status_dict(status: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(status)


async def _orchestrated(bus: Any, args: argparse.Namespace) -> list[Any]:
    """Orchestrated sagas (the orchestrator's bucket) as ``SagaStatus``, for list."""
    from meshkit.saga.orchestrator import OrchestratorConfig, list_statuses

    return await list_statuses(bus, config=OrchestratorConfig(bucket=args.orch_bucket))


async def _list(bus: Any, args: argparse.Namespace) -> int:
    from meshkit.saga.tracker import SagaStore, state_name

    store = await SagaStore.open(bus, args.bucket)
    sagas = list(await store.list()) + await _orchestrated(bus, args)
    if args.state:
        sagas = [s for s in sagas if state_name(s.state) == args.state.upper()]
    if args.json:
        print(json.dumps([_status_dict(s) for s in sagas], indent=1))
        return 0
    print(f"{'SAGA':<34} {'TYPE':<10} {'STATE':<13} {'STEPS':>5} {'STARTED':<12} {'MS':>6}  REASON")
    for s in sagas:
        start = s.started_at.ToMilliseconds()
        took = s.updated_at.ToMilliseconds() - start
        print(
            f"{s.saga_id:<34} {s.saga_type:<10} {state_name(s.state):<13} {len(s.steps):>5} "
            f"{_fmt_ms(start):<12} {took:>6}  {s.reason}"
        )
    counts = Counter(state_name(s.state) for s in sagas)
    print(f"{len(sagas)} sagas: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


async def _show(bus: Any, args: argparse.Namespace) -> int:
    from meshkit.saga.tracker import SagaStore, state_name

    store = await SagaStore.open(bus, args.bucket)
    status = await store.get(args.saga_id)
    kind = "choreographed"
    if status is None:
        from meshkit.saga.orchestrator import OrchestratorConfig, load_status

        kind = "orchestrated"
        status = await load_status(
            bus, args.saga_id, config=OrchestratorConfig(bucket=args.orch_bucket)
        )
    if status is None:
        print(
            f"meshkit saga: no saga {args.saga_id!r} in bucket {args.bucket} "
            f"(nor orchestrated in {args.orch_bucket})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(_status_dict(status), indent=1))
        return 0
    start = status.started_at.ToMilliseconds()
    print(f"saga {status.saga_id} ({status.saga_type}): {state_name(status.state)}")
    print(f"kind: {kind}")
    if status.reason:
        print(f"reason: {status.reason}")
    if status.HasField("deadline"):
        print(f"deadline: {_fmt_ms(status.deadline.ToMilliseconds())}")
    for step in sorted(status.steps, key=lambda st: st.at.ToMilliseconds()):
        mark = "compensation" if step.compensation else ""
        print(
            f"  {_fmt_ms(step.at.ToMilliseconds())} +{step.at.ToMilliseconds() - start:>5} ms  "
            f"{step.event_type:<34} {step.source:<14} {step.event_id[:12]} {mark}"
        )
    return 0


async def _watch(bus: Any, args: argparse.Namespace) -> int:
    from meshkit.saga.tracker import SagaStore, state_name

    store = await SagaStore.open(bus, args.bucket)
    states: dict[str, str] = {}
    tty = sys.stdout.isatty()
    last_print = 0.0

    def render() -> None:
        counts = Counter(states.values())
        line = f"{time.strftime('%H:%M:%S')} sagas {len(states)}: " + "  ".join(
            f"{k} {counts.get(k, 0)}"
            for k in ("RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED", "TIMED_OUT")
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)

    async def consume() -> None:
        nonlocal last_print
        async for status in store.watch():
            states[status.saga_id] = state_name(status.state)
            now = time.monotonic()
            if now - last_print > 0.2:
                last_print = now
                render()

    try:
        if args.duration > 0:
            try:
                await asyncio.wait_for(consume(), args.duration)
            except TimeoutError:
                pass
        else:
            await consume()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    render()
    if tty:
        print()
    return 0


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{spec!r}: expected MODULE:ATTR")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if callable(obj) and not hasattr(obj, "handlers") else obj


def _graph(args: argparse.Namespace) -> int:
    from meshkit.saga.graph import analyze, build_graph, to_mermaid

    sys.path.insert(0, os.getcwd())
    try:
        participants = _load(args.participants)
        definition = _load(args.definition) if args.definition else None
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"meshkit saga graph: cannot load: {exc}", file=sys.stderr)
        return 2
    if hasattr(participants, "handlers"):
        participants = [participants]
    external = list(args.external)
    if definition is not None:
        external.extend(definition.start)
    graph = build_graph(participants, external=external)
    report = analyze(graph, definition)
    print(to_mermaid(graph, report), end="")
    for line in report.lines():
        print(f"meshkit saga graph: {line}", file=sys.stderr)
    return 0 if report.ok else 1


def _track_entry(args: argparse.Namespace) -> int:
    # Load the definition before connecting, so a typo fails fast without NATS.
    sys.path.insert(0, os.getcwd())
    try:
        args.definition_obj = _load(args.definition)
        args.stream_obj = _load(args.stream)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"meshkit saga track: cannot load: {exc}", file=sys.stderr)
        return 2
    return _run(_track, args)


async def _track(bus: Any, args: argparse.Namespace) -> int:
    from meshkit.saga.tracker import SagaTracker

    definition, stream = args.definition_obj, args.stream_obj
    tracker = await SagaTracker(bus, stream, definition, bucket=args.bucket).start()
    print(
        f"tracking {definition.name} sagas on stream {stream.name} into bucket {args.bucket}; "
        "Ctrl-C stops",
        flush=True,
    )
    try:
        if args.duration > 0:
            await asyncio.sleep(args.duration)
        else:
            await asyncio.Event().wait()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        await tracker.stop()
    print(f"tracker stopped after {tracker.updates} updates", flush=True)
    return 0


async def _dlq_list(bus: Any, args: argparse.Namespace) -> int:
    from meshkit.saga.dlq import list_dead_letters

    entries = await list_dead_letters(bus, stream=args.stream, consumer=args.consumer)
    if args.json:
        print(
            json.dumps(
                [
                    {"seq": e.seq, **_status_dict(e.letter), "payload_size": len(e.letter.payload)}
                    for e in entries
                ],
                indent=1,
            )
        )
        return 0
    for e in entries:
        letter = e.letter
        print(
            f"#{e.seq:<5} {_fmt_ms(letter.dead_at.ToMilliseconds())} {letter.stream}/{letter.consumer} "
            f"{letter.subject} seq {letter.stream_sequence} deliveries {letter.deliveries}\n"
            f"       event {e.event_type or '?'} {e.event_id or '?'}\n       reason: {letter.reason}"
        )
    print(f"{len(entries)} dead letters")
    return 0


async def _dlq_replay(bus: Any, args: argparse.Namespace) -> int:
    from meshkit.saga.dlq import replay_dead_letters

    if not args.seqs and not args.all:
        print("meshkit saga dlq replay: give sequence numbers or --all", file=sys.stderr)
        return 2
    done = await replay_dead_letters(
        bus,
        seqs=args.seqs or None,
        stream=args.stream,
        consumer=args.consumer,
        delete=not args.keep,
    )
    for e in done:
        print(f"replayed #{e.seq} to {e.letter.subject}")
    print(f"{len(done)} dead letters replayed")
    return 0
