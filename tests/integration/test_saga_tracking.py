"""The tracker against a real nats-server: saga state in KV, timeouts, dead letters; and the CLI."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.cli import main as cli
from meshkit.nats import NatsServer
from meshkit.saga import (
    ConsumerSpec,
    Context,
    EventBus,
    Participant,
    SagaDefinition,
    SagaTracker,
    StreamSpec,
    state_name,
)

pytestmark = pytest.mark.integration

FAST = ConsumerSpec(
    ack_wait=5.0, max_deliver=2, nak_backoff=(0.05,), idle_heartbeat=0.2, pull_expires=5.0
)
DEF = SagaDefinition.of(
    "order",
    start=[ev.OrderCreated],
    completed=[ev.OrderCompleted],
    failures=[ev.PaymentFailed],
    compensations=[ev.StockReleased],
    compensated=[ev.OrderCancelled],
)


@pytest.fixture
async def bus(nats_server_module: NatsServer) -> AsyncIterator[EventBus]:
    b = await EventBus.connect(nats_server_module.url, name="test", source="test")
    yield b
    await b.close()


def _stream() -> StreamSpec:
    tag = uuid.uuid4().hex[:8]
    return StreamSpec(name=f"K{tag}", prefix=f"k{tag}")


def _chain(stream: StreamSpec) -> Participant:
    """OrderCreated -> (PaymentFailed if customer 'broke' else OrderCompleted); PaymentFailed ->
    StockReleased -> OrderCancelled. Customer 'slow' gets no answer at all."""
    p = Participant("chain", stream, consumer=FAST)

    @p.on(ev.OrderCreated, emits=[ev.OrderCompleted, ev.PaymentFailed])
    async def created(e: ev.OrderCreated, ctx: Context) -> Any:
        if e.customer_id == "slow":
            return None
        if e.customer_id == "broke":
            return ev.PaymentFailed(order_id=e.order_id, reason="declined")
        return ev.OrderCompleted(order_id=e.order_id)

    @p.compensate(ev.PaymentFailed, emits=[ev.StockReleased])
    async def failed(e: ev.PaymentFailed, ctx: Context) -> Any:
        return ev.StockReleased(order_id=e.order_id)

    @p.compensate(ev.StockReleased, emits=[ev.OrderCancelled])
    async def released(e: ev.StockReleased, ctx: Context) -> Any:
        return ev.OrderCancelled(order_id=e.order_id)

    @p.compensate(saga_pb2.SagaTimedOut, emits=[ev.OrderCancelled])
    async def timed_out(e: saga_pb2.SagaTimedOut, ctx: Context) -> Any:
        return ev.OrderCancelled(order_id=e.saga_id, reason="timed out")

    return p


async def test_tracker_records_every_path_and_times_out_stuck_sagas(
    bus: EventBus, nats_server_module: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = _stream()
    bucket = f"sagas_{uuid.uuid4().hex[:6]}"
    tracker = await SagaTracker(bus, stream, DEF, bucket=bucket, sweep_interval=0.05).start()
    running = await _chain(stream).start(bus)
    assert tracker.store is not None
    ok = await bus.emit(
        stream, ev.OrderCreated(order_id="ok", customer_id="c"), saga_id="ok", saga_type="order"
    )
    broke = await bus.emit(
        stream, ev.OrderCreated(order_id="broke", customer_id="broke"), saga_id="broke"
    )
    slow = await bus.emit(
        stream,
        ev.OrderCreated(order_id="slow", customer_id="slow"),
        saga_id="slow",
        saga_timeout=0.5,
    )
    final = {
        s: await tracker.store.wait(s, within=15) for s in (ok.saga_id, broke.saga_id, slow.saga_id)
    }
    assert await tracker.wait_caught_up(within=10)
    final = {s: await tracker.store.get(s) for s in final}
    assert state_name(final["ok"].state) == "COMPLETED"
    assert [st.event_type for st in final["ok"].steps] == [
        "shop.v1.OrderCreated",
        "shop.v1.OrderCompleted",
    ]
    b = final["broke"]
    assert state_name(b.state) == "COMPENSATED" and b.reason == "PaymentFailed"
    assert sorted((st.event_type.rsplit(".", 1)[-1], st.compensation) for st in b.steps) == [
        ("OrderCancelled", True),
        ("OrderCreated", False),
        ("PaymentFailed", False),
        ("StockReleased", True),
    ]
    s = final["slow"]
    assert state_name(s.state) == "TIMED_OUT"
    assert s.deadline.ToMilliseconds() == slow.saga_deadline_ms
    types = [st.event_type for st in sorted(s.steps, key=lambda x: x.at.ToMilliseconds())]
    # the timeout event started compensation: the chain cancelled the order
    assert types == ["shop.v1.OrderCreated", "meshkit.v1.SagaTimedOut", "shop.v1.OrderCancelled"]
    assert s.steps[1].source == "meshkit-tracker"
    # the timeout is published once, even if the sweep runs again
    await tracker.time_out("slow")
    await asyncio.sleep(0.3)
    info = await bus.js.stream_info(
        stream.name, subjects_filter=stream.subject_for(saga_pb2.SagaTimedOut)
    )
    assert info.state.subjects == {stream.subject_for(saga_pb2.SagaTimedOut): 1}

    # The CLI reads the same bucket.
    url = nats_server_module.url
    rc = await asyncio.to_thread(cli, ["saga", "list", "--nats-url", url, "--bucket", bucket])
    out = capsys.readouterr().out
    assert rc == 0
    assert "3 sagas: COMPENSATED 1, COMPLETED 1, TIMED_OUT 1" in out
    rc = await asyncio.to_thread(
        cli, ["saga", "show", "broke", "--nats-url", url, "--bucket", bucket]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "saga broke (order): COMPENSATED" in out and "shop.v1.StockReleased" in out
    rc = await asyncio.to_thread(
        cli, ["saga", "show", "ok", "--json", "--nats-url", url, "--bucket", bucket]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["state"] == "SAGA_STATE_COMPLETED"
    rc = await asyncio.to_thread(
        cli, ["saga", "show", "nope", "--nats-url", url, "--bucket", bucket]
    )
    assert rc == 1 and "no saga 'nope'" in capsys.readouterr().err
    rc = await asyncio.to_thread(
        cli, ["saga", "watch", "--duration", "0.5", "--nats-url", url, "--bucket", bucket]
    )
    assert rc == 0 and "sagas 3:" in capsys.readouterr().out
    await running.stop()
    await tracker.stop()


async def test_a_dead_lettered_event_fails_its_saga_and_the_cli_replays_it(
    bus: EventBus, nats_server_module: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = _stream()
    bucket = f"sagas_{uuid.uuid4().hex[:6]}"
    tracker = await SagaTracker(bus, stream, DEF, bucket=bucket).start()
    assert tracker.store is not None
    running = await _chain(stream).start(bus)
    subject = stream.subject_for(ev.OrderCreated)
    from meshkit.saga import Envelope

    env = Envelope.new(ev.OrderCreated, saga_id="poisoned", saga_type="order")
    await bus.publish_raw(subject, b"\x0a\xff", env.to_headers())  # truncated protobuf
    status = await tracker.store.wait("poisoned", within=10)
    assert status is not None and state_name(status.state) == "FAILED"
    assert status.reason.startswith("dead-lettered: undecodable shop.v1.OrderCreated payload")

    url = nats_server_module.url
    rc = await asyncio.to_thread(
        cli, ["saga", "dlq", "list", "--stream", stream.name, "--nats-url", url]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "1 dead letters" in out and "undecodable" in out and env.event_id in out
    rc = await asyncio.to_thread(cli, ["saga", "dlq", "replay", "--nats-url", url])
    assert rc == 2  # needs SEQ or --all
    capsys.readouterr()
    rc = await asyncio.to_thread(
        cli, ["saga", "dlq", "replay", "--all", "--stream", stream.name, "--nats-url", url]
    )
    assert rc == 0 and "1 dead letters replayed" in capsys.readouterr().out
    # still undecodable: it comes straight back to the DLQ
    for _ in range(100):
        rc = await asyncio.to_thread(
            cli, ["saga", "dlq", "list", "--stream", stream.name, "--nats-url", url]
        )
        if "1 dead letters" in capsys.readouterr().out:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the replayed letter did not come back")
    await running.stop()
    await tracker.stop()


def test_cli_graph_draws_the_shop_and_flags_problems(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli(
        [
            "saga",
            "graph",
            "examples.shop.flow:PARTICIPANTS",
            "--definition",
            "examples.shop.flow:ORDER_SAGA",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.startswith("flowchart LR")
    assert (
        "ev_shop_v1_ShipmentFailed -.->|payment.refund_after_shipping_failure| ev_shop_v1_PaymentRefunded"
        in captured.out
    )
    assert "event nobody consumes: shop.v1.CustomerNotified" in captured.err
    assert cli(["saga", "graph", "no.such.module:X"]) == 2


def test_cli_cannot_connect_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    rc = cli(["saga", "list", "--nats-url", url])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 1
    assert f"cannot connect to {url}: no NATS server answered within 2 s" in err
    assert "Connect call failed" in err  # what it met, not a bare TimeoutError()
    assert took < 4.0, took


async def test_cli_track_runs_a_tracker(
    bus: EventBus, nats_server_module: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.shop.flow import SHOP_STREAM
    from meshkit.saga import SagaStore

    bucket = f"sagas_{uuid.uuid4().hex[:6]}"
    await bus.ensure_stream(SHOP_STREAM)
    saga = f"cli-{uuid.uuid4().hex[:6]}"
    await bus.emit(SHOP_STREAM, ev.OrderCreated(order_id=saga), saga_id=saga, saga_type="order")
    await bus.emit(SHOP_STREAM, ev.OrderCompleted(order_id=saga), saga_id=saga, saga_type="order")
    args = [
        "saga",
        "track",
        "examples.shop.flow:ORDER_SAGA",
        "--stream",
        "examples.shop.flow:SHOP_STREAM",
        "--duration",
        "2",
        "--bucket",
        bucket,
        "--nats-url",
        nats_server_module.url,
    ]
    rc = await asyncio.to_thread(cli, args)
    out = capsys.readouterr().out
    assert (
        rc == 0 and "tracking order sagas on stream SHOP" in out and "tracker stopped after" in out
    )
    status = await (await SagaStore.open(bus, bucket)).get(saga)
    assert status is not None and state_name(status.state) == "COMPLETED"
    assert (
        cli(["saga", "track", "nope:X", "--stream", "nope:Y", "--nats-url", nats_server_module.url])
        == 2
    )
