"""Participants against a real nats-server: chains, correlation, exactly-once effects,
duplicates and redelivery, dead letters, unknown types, deadlines, trace propagation."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import meshkit.deadline
from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit.nats import NatsServer
from meshkit.saga import (
    ConsumerSpec,
    Context,
    Envelope,
    EventBus,
    Participant,
    PermanentError,
    SqliteInbox,
    StreamSpec,
    derive_event_id,
    list_dead_letters,
    replay_dead_letters,
    type_name,
)
from meshkit.saga import envelope as E
from meshkit.saga.cluster import JetStreamUnavailable

pytestmark = pytest.mark.integration

FAST = ConsumerSpec(
    ack_wait=5.0,
    max_deliver=3,
    nak_backoff=(0.05,),
    idle_heartbeat=0.2,
    pull_expires=5.0,
    max_in_flight=32,
)


def _stream() -> StreamSpec:
    tag = uuid.uuid4().hex[:8]
    return StreamSpec(name=f"P{tag}", prefix=f"p{tag}")


@pytest.fixture
async def bus(nats_server_module: NatsServer) -> AsyncIterator[EventBus]:
    b = await EventBus.connect(nats_server_module.url, name="test", source="test")
    yield b
    await b.close()


async def _wait(pred: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Recorder:
    """A sink participant that records every event it sees (with its envelope)."""

    def __init__(self, stream: StreamSpec, *types: Any) -> None:
        self.seen: list[tuple[Envelope, Any]] = []
        self.participant = Participant(f"rec{uuid.uuid4().hex[:6]}", stream, consumer=FAST)
        for t in types:
            self.participant.on(t)(self._record)

    async def _record(self, event: Any, ctx: Context) -> None:
        self.seen.append((ctx.envelope, event))


def _inventory(stream: StreamSpec, conn: sqlite3.Connection, *, fail_first: int = 0) -> Participant:
    p = Participant("inventory", stream, consumer=FAST)
    conn.execute("CREATE TABLE IF NOT EXISTS effects (order_id TEXT)")
    failures = {"left": fail_first}

    @p.on(
        ev.OrderCreated,
        emits=[ev.StockReserved],
        validate=lambda e: (
            None if e.order_id else (_ for _ in ()).throw(ValueError("order_id: required"))
        ),
    )
    async def reserve(event: ev.OrderCreated, ctx: Context) -> Any:
        if event.customer_id == "poison":
            raise PermanentError("customer is banned")
        ctx.tx.execute("INSERT INTO effects VALUES (?)", (event.order_id,))
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("database hiccup")  # rolls the insert back
        ctx.emit(ev.StockReserved(order_id=event.order_id, reservation_id="r-" + event.order_id))
        return ev.StockReleased(order_id=event.order_id) if event.customer_id == "two" else None

    return p


def _effects(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT order_id FROM effects ORDER BY order_id")]


async def test_outputs_carry_correlation_causation_and_deterministic_ids(bus: EventBus) -> None:
    stream = _stream()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    inv = await _inventory(stream, conn).start(bus, inbox=SqliteInbox(conn))
    rec = Recorder(stream, ev.StockReserved, ev.StockReleased)
    sink = await rec.participant.start(bus)
    start = await bus.emit(
        stream, ev.OrderCreated(order_id="o1", customer_id="two"), saga_type="order"
    )
    await _wait(lambda: len(rec.seen) == 2)
    by_type = {env.event_type: env for env, _ in rec.seen}
    reserved = by_type["shop.v1.StockReserved"]
    released = by_type["shop.v1.StockReleased"]
    for i, out in enumerate((reserved, released)):  # ctx.emit first, then the returned event
        assert out.event_id == derive_event_id(start.event_id, "inventory.reserve", i)
        assert out.saga_id == start.saga_id and out.saga_type == "order"
        assert out.causation_id == start.event_id
        assert out.source == "inventory"
    assert _effects(conn) == ["o1"]
    assert inv.stats.handled == 1 and inv.stats.emitted == 2
    await inv.stop()
    await sink.stop()


async def test_duplicates_and_redelivery_have_one_effect_and_one_downstream_event(
    bus: EventBus,
) -> None:
    stream = _stream()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    inv = await _inventory(stream, conn, fail_first=1).start(bus, inbox=SqliteInbox(conn))
    rec = Recorder(stream, ev.StockReserved)
    sink = await rec.participant.start(bus)
    event = ev.OrderCreated(order_id="o1", customer_id="c")
    env = Envelope.new(event, saga_type="order")
    # The event id pinned in Meshkit-Event-Id, as a dead letter's replay has it.
    headers = E.pin_event_id(env.to_headers())
    subject = stream.subject_for(event)
    # The same event three times, each with a fresh Nats-Msg-Id so JetStream keeps them all
    # (as after replays).
    for n in range(3):
        await bus.publish_raw(
            subject, event.SerializeToString(), {**headers, E.MSG_ID: f"{env.event_id}-{n}"}
        )
    await _wait(lambda: inv.stats.handled + inv.stats.duplicates == 3)
    await asyncio.sleep(0.3)  # room for a wrong second downstream event to show up
    assert _effects(conn) == ["o1"]
    assert inv.stats.retries == 1  # the first attempt failed and was redelivered
    assert inv.stats.handled == 1 and inv.stats.duplicates == 2
    assert len(rec.seen) == 1
    # every duplicate republished the same output id: JetStream stored it once
    out_subject = stream.subject_for(ev.StockReserved)
    info = await bus.js.stream_info(stream.name, subjects_filter=out_subject)
    assert info.state.subjects == {out_subject: 1}
    await inv.stop()
    await sink.stop()


async def test_an_idempotent_handler_runs_per_delivery_with_one_effect_and_no_record(
    bus: EventBus,
) -> None:
    stream = _stream()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE notices (order_id TEXT PRIMARY KEY)")
    p = Participant("notify", stream, consumer=FAST)
    runs: list[str] = []

    @p.on(ev.OrderCompleted, emits=[ev.CustomerNotified], idempotent=True)
    async def notify(event: ev.OrderCompleted, ctx: Context) -> ev.CustomerNotified:
        runs.append(ctx.event_id)
        ctx.tx.execute("INSERT OR IGNORE INTO notices VALUES (?)", (event.order_id,))
        return ev.CustomerNotified(order_id=event.order_id, notification_id="n-" + event.order_id)

    assert p.handlers[type_name(ev.OrderCompleted)].idempotent
    inbox = SqliteInbox(conn)
    running = await p.start(bus, inbox=inbox)
    rec = Recorder(stream, ev.CustomerNotified)
    sink = await rec.participant.start(bus)
    event = ev.OrderCompleted(order_id="o7")
    env = Envelope.new(event, saga_type="order")
    headers = E.pin_event_id(env.to_headers())
    for n in range(3):  # the same event three times (fresh Nats-Msg-Ids: all stored)
        await bus.publish_raw(
            stream.subject_for(event),
            event.SerializeToString(),
            {**headers, E.MSG_ID: f"{env.event_id}-{n}"},
        )
    await _wait(lambda: running.stats.handled == 3)
    await asyncio.sleep(0.3)  # room for a second downstream event to show up
    # Run on every delivery, one effect, one output id (JetStream kept it once), and
    # nothing in the inbox's table.
    assert runs == [env.event_id] * 3
    assert [r[0] for r in conn.execute("SELECT order_id FROM notices")] == ["o7"]
    assert len(rec.seen) == 1
    assert rec.seen[0][0].event_id == derive_event_id(env.event_id, "notify.notify", 0)
    assert running.stats.duplicates == 0 and inbox.processed() == 0
    await running.stop()
    await sink.stop()


async def test_malformed_and_unknown_events_do_not_block_the_consumer(bus: EventBus) -> None:
    stream = _stream()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    inv = await _inventory(stream, conn).start(bus, inbox=SqliteInbox(conn))
    subject = stream.subject_for(ev.OrderCreated)
    bad = Envelope.new(ev.OrderCreated, saga_id="saga-bad")
    await bus.publish_raw(subject, b"\xff\xff\xff not protobuf", bad.to_headers())
    unknown = Envelope.new("shop.v1.SomethingNew", saga_id="saga-unknown")
    await bus.publish_raw(subject, b"", unknown.to_headers())
    await bus.publish_raw(subject, b"", {"X-No": "envelope"})
    await bus.emit(stream, ev.OrderCreated(order_id=""))  # fails validation
    good = await bus.emit(stream, ev.OrderCreated(order_id="fine"))
    await _wait(
        lambda: inv.stats.handled == 1 and inv.stats.dead_lettered == 3 and inv.stats.ignored == 1
    )
    assert _effects(conn) == ["fine"]
    letters = [e for e in await list_dead_letters(bus, stream=stream.name)]
    reasons = sorted(e.letter.reason for e in letters)
    assert len(letters) == 3
    assert any(r.startswith("undecodable shop.v1.OrderCreated payload") for r in reasons)
    assert any(r.startswith("invalid envelope: header Meshkit-Event-Id") for r in reasons)
    assert any("failed validation: order_id: required" in r for r in reasons)
    undecodable = next(e for e in letters if e.letter.reason.startswith("undecodable"))
    assert undecodable.letter.consumer == inv.participant.durable
    assert undecodable.letter.subject == subject
    assert E.saga_id_of(undecodable.letter.headers) == "saga-bad"  # original headers kept
    assert undecodable.letter.payload.startswith(b"\xff\xff\xff")
    assert good.event_id not in {e.event_id for e in letters}
    await inv.stop()


async def test_permanent_errors_and_max_deliver_go_to_the_dlq_and_can_be_replayed(
    bus: EventBus,
) -> None:
    stream = _stream()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    inv_p = _inventory(stream, conn, fail_first=FAST.max_deliver)  # fails on every delivery
    inv = await inv_p.start(bus, inbox=SqliteInbox(conn))
    poison = await bus.emit(stream, ev.OrderCreated(order_id="p", customer_id="poison"))
    await _wait(lambda: inv.stats.dead_lettered == 1)
    flaky = await bus.emit(stream, ev.OrderCreated(order_id="f", customer_id="c"))
    await _wait(lambda: inv.stats.dead_lettered == 2, within=15)
    letters = await list_dead_letters(bus, stream=stream.name)
    by_id = {e.event_id: e for e in letters}
    assert "rejected the event: customer is banned" in by_id[poison.event_id].letter.reason
    assert by_id[poison.event_id].letter.deliveries == 1  # not retried
    assert "failed 3 times (max_deliver)" in by_id[flaky.event_id].letter.reason
    assert by_id[flaky.event_id].letter.deliveries == 3
    assert _effects(conn) == []
    # The failure is fixed now: replaying the flaky one succeeds, once.
    replayed = await replay_dead_letters(bus, seqs=[by_id[flaky.event_id].seq])
    assert [r.event_id for r in replayed] == [flaky.event_id]
    await _wait(lambda: inv.stats.handled == 1)
    assert _effects(conn) == ["f"]
    remaining = await list_dead_letters(bus, stream=stream.name)
    assert [e.event_id for e in remaining] == [poison.event_id]
    await inv.stop()


async def test_the_request_deadline_travels_with_the_events(bus: EventBus) -> None:
    stream = _stream()
    seen: list[float | None] = []
    p = Participant("deadline", stream, consumer=FAST)

    @p.on(ev.OrderCreated, emits=[ev.StockReserved])
    async def h(event: ev.OrderCreated, ctx: Context) -> Any:
        seen.append(meshkit.deadline.remaining())
        return ev.StockReserved(order_id=event.order_id)

    rec = Recorder(stream, ev.StockReserved)
    running = await p.start(bus)
    sink = await rec.participant.start(bus)
    with meshkit.deadline.scope(30.0):
        sent = await bus.emit(stream, ev.OrderCreated(order_id="d"))
    assert sent.deadline_ms is not None and 29_000 < sent.deadline_ms <= 30_000
    await _wait(lambda: len(rec.seen) == 1)
    assert seen[0] is not None and 25.0 < seen[0] <= 30.0
    out_env = rec.seen[0][0]
    assert out_env.deadline_ms is not None and 25_000 < out_env.deadline_ms <= 30_000
    await bus.emit(stream, ev.OrderCreated(order_id="none"))
    await _wait(lambda: len(seen) == 2)
    assert seen[1] is None
    await running.stop()
    await sink.stop()


def _span_exporter() -> Any:
    """An in-memory exporter on the global SDK tracer provider (installed if none is)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip("another tracer provider is installed globally")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_trace_context_crosses_nats_with_messaging_spans(bus: EventBus) -> None:
    from opentelemetry import trace

    exporter = _span_exporter()

    stream = _stream()
    p = Participant("traced", stream, consumer=FAST)

    @p.on(ev.OrderCreated, emits=[ev.StockReserved])
    async def h(event: ev.OrderCreated, ctx: Context) -> Any:
        return ev.StockReserved(order_id=event.order_id)

    rec = Recorder(stream, ev.StockReserved)
    running = await p.start(bus)
    sink = await rec.participant.start(bus)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("client request") as root:
        sent = await bus.emit(stream, ev.OrderCreated(order_id="t"), saga_type="order")
    trace_id = root.get_span_context().trace_id
    await _wait(lambda: len(rec.seen) == 1)
    await running.stop()
    await sink.stop()
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    kinds = sorted((s.kind.name, s.name.split(" ")[0]) for s in spans if s.name != "client request")
    assert kinds == [
        ("CONSUMER", "process"),
        ("CONSUMER", "process"),
        ("PRODUCER", "send"),
        ("PRODUCER", "send"),
    ]
    first_send = next(s for s in spans if s.name == f"send {stream.subject_for(ev.OrderCreated)}")
    assert first_send.attributes["messaging.system"] == "nats"
    assert first_send.attributes["messaging.message.id"] == sent.event_id
    assert first_send.attributes["messaging.message.conversation_id"] == sent.saga_id
    process = next(s for s in spans if s.name == f"process {stream.subject_for(ev.OrderCreated)}")
    assert process.parent is not None and process.parent.span_id == first_send.context.span_id
    assert process.attributes["messaging.consumer.group.name"] == p.durable
    # the downstream event carries the trace on: its traceparent names our trace
    assert rec.seen[0][0].traceparent.split("-")[1] == format(trace_id, "032x")


async def test_each_output_gets_its_own_send_span_under_the_process_span(
    bus: EventBus,
) -> None:
    from opentelemetry import trace

    exporter = _span_exporter()

    stream = _stream()
    p = Participant("fanout", stream, consumer=FAST)

    @p.on(ev.OrderCreated, emits=[ev.StockReserved, ev.PaymentCompleted])
    async def h(event: ev.OrderCreated, ctx: Context) -> Any:
        ctx.emit(ev.StockReserved(order_id=event.order_id))
        return ev.PaymentCompleted(order_id=event.order_id)

    rec = Recorder(stream, ev.PaymentCompleted)
    running = await p.start(bus)
    sink = await rec.participant.start(bus)
    with trace.get_tracer("test").start_as_current_span("client request") as root:
        await bus.emit(stream, ev.OrderCreated(order_id="f"), saga_type="order")
    await _wait(lambda: len(rec.seen) == 1)
    await running.stop()
    await sink.stop()
    spans = [
        s
        for s in exporter.get_finished_spans()
        if s.context.trace_id == root.get_span_context().trace_id
    ]
    process = next(s for s in spans if s.name == f"process {stream.subject_for(ev.OrderCreated)}")
    sends = [
        s
        for s in spans
        if s.name
        in (
            f"send {stream.subject_for(ev.StockReserved)}",
            f"send {stream.subject_for(ev.PaymentCompleted)}",
        )
    ]
    assert len(sends) == 2
    # Siblings: both published by the handling of one event, neither inside the other.
    assert {s.parent.span_id for s in sends if s.parent} == {process.context.span_id}
    assert all(s.status.is_ok for s in [process, *sends])


async def test_kv_inbox_deduplicates_when_the_store_is_not_sqlite(bus: EventBus) -> None:
    from meshkit.saga import KvInbox

    stream = _stream()
    effects: list[str] = []
    p = Participant("kv", stream, consumer=FAST)

    @p.on(ev.OrderCreated, emits=[ev.StockReserved])
    async def h(event: ev.OrderCreated, ctx: Context) -> Any:
        assert ctx.tx is None  # no transactional store behind a KV inbox
        effects.append(event.order_id)
        return ev.StockReserved(order_id=event.order_id)

    kv = await bus.key_value(f"inbox_{uuid.uuid4().hex[:6]}")
    running = await p.start(bus, inbox=KvInbox(kv))
    event = ev.OrderCreated(order_id="k")
    env = Envelope.new(event)
    for n in range(2):
        await bus.publish_raw(
            stream.subject_for(event),
            event.SerializeToString(),
            {**E.pin_event_id(env.to_headers()), E.MSG_ID: f"x{n}"},
        )
    await _wait(lambda: running.stats.handled + running.stats.duplicates == 2)
    assert effects == ["k"] and running.stats.duplicates == 1
    assert await kv.keys() == [f"kv/{env.event_id}".replace("/", ".")]
    await running.stop()


async def test_outcomes_are_counted_as_opentelemetry_metrics(bus: EventBus) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from meshkit.saga import _telemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _telemetry.use_meter(provider.get_meter("meshkit.saga"))
    try:
        stream = _stream()
        conn = sqlite3.connect(":memory:", isolation_level=None)
        inv = await _inventory(stream, conn).start(bus, inbox=SqliteInbox(conn))
        subject = stream.subject_for(ev.OrderCreated)
        event = ev.OrderCreated(order_id="m", customer_id="c")
        env = Envelope.new(event)
        for n in range(2):  # handled, then duplicate
            await bus.publish_raw(
                subject,
                event.SerializeToString(),
                {**E.pin_event_id(env.to_headers()), E.MSG_ID: f"m{n}"},
            )
        await bus.publish_raw(subject, b"", Envelope.new("shop.v1.Unknown").to_headers())
        await bus.publish_raw(subject, b"\xff", Envelope.new(ev.OrderCreated).to_headers())
        await _wait(
            lambda: (
                inv.stats.dead_lettered == 1
                and inv.stats.ignored == 1
                and inv.stats.duplicates == 1
            )
        )
        await inv.stop()
        data = reader.get_metrics_data()
        points: dict[tuple[str, str], int] = {}
        emitted = 0
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for dp in metric.data.data_points:
                        if metric.name == "meshkit.saga.events":
                            key = (
                                str(dp.attributes["outcome"]),
                                str(dp.attributes["meshkit.event.type"]),
                            )
                            points[key] = points.get(key, 0) + int(dp.value)
                        elif metric.name == "meshkit.saga.emitted":
                            emitted += int(dp.value)
        assert points == {
            ("handled", "shop.v1.OrderCreated"): 1,
            ("duplicate", "shop.v1.OrderCreated"): 1,
            ("ignored", "shop.v1.Unknown"): 1,
            ("dead_lettered", "shop.v1.OrderCreated"): 1,
        }
        assert emitted == 2  # the duplicate republished its recorded output (dropped by dedupe)
    finally:
        _telemetry.use_meter(None)


async def test_outputs_that_cannot_be_published_are_dead_lettered_not_dropped(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The effect commits, then publishing its output fails on every delivery (NATS
    # unreachable for longer than publish_retry): at max_deliver the input must land in
    # the DLQ, and its replay must publish the recorded output without a second effect.
    stream = _stream()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    inv = await _inventory(stream, conn).start(bus, inbox=SqliteInbox(conn))
    rec = Recorder(stream, ev.StockReserved)
    sink = await rec.participant.start(bus)
    real = bus.publish_many
    broken = True

    async def flaky(messages: list[tuple[str, bytes, dict[str, str]]], **kw: Any) -> Any:
        # What publish_many answers when the retry window runs out for these.
        unreachable = JetStreamUnavailable("publishing: nats unreachable")
        reserved = stream.subject_for(ev.StockReserved)
        if broken and any(m[0] == reserved for m in messages):
            rest = await real([m for m in messages if m[0] != reserved], **kw)
            return [unreachable if m[0] == reserved else rest.pop(0) for m in messages]
        return await real(messages, **kw)

    monkeypatch.setattr(bus, "publish_many", flaky)
    start = await bus.emit(stream, ev.OrderCreated(order_id="o1", customer_id="c"))
    await _wait(lambda: inv.stats.dead_lettered == 1, within=15)
    letters = await list_dead_letters(bus, stream=stream.name)
    assert [e.event_id for e in letters] == [start.event_id]
    assert "failed 3 times (max_deliver)" in letters[0].letter.reason
    assert "nats unreachable" in letters[0].letter.reason
    assert _effects(conn) == ["o1"] and rec.seen == []
    broken = False
    await replay_dead_letters(bus, seqs=[letters[0].seq])
    await _wait(lambda: len(rec.seen) == 1 and inv.stats.duplicates == 1)
    assert rec.seen[0][0].event_id == derive_event_id(start.event_id, "inventory.reserve", 0)
    assert _effects(conn) == ["o1"] and inv.stats.handled == 0
    await inv.stop()
    await sink.stop()


async def test_an_empty_dead_letter_stream_lists_nothing(nats_server: NatsServer) -> None:
    from meshkit.saga.dlq import DLQ_STREAM

    # A new stream reports first_seq 0; asking JetStream for message 0 is a 400.
    bus = await EventBus.connect(nats_server.url, name="test-empty-dlq", source="test")
    try:
        await bus.ensure_stream(DLQ_STREAM)
        assert await list_dead_letters(bus) == []
    finally:
        await bus.close()
