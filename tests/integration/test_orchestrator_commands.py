"""Command participants on a real nats-server: a command that can never run (bad
envelope, unknown type, undecodable payload, a handler failing on every delivery)
goes to the dead-letter subject with its reason instead of vanishing, and does not
block the commands behind it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.message import Message

from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.gen.shop.v1 import orders_pb2
from meshkit.nats import NatsServer
from meshkit.saga import ConsumerSpec, Envelope, EventBus, list_dead_letters, replay_dead_letters
from meshkit.saga.commands import CommandContext, CommandParticipant
from meshkit.saga.envelope import saga_id_of
from meshkit.saga.orchestrator import OrchestratorConfig

pytestmark = pytest.mark.integration

FAST = ConsumerSpec(
    ack_wait=5.0, max_deliver=2, nak_backoff=(0.05,), idle_heartbeat=0.2, pull_expires=5.0
)


@pytest.fixture
async def bus(nats_server_module: NatsServer) -> AsyncIterator[EventBus]:
    b = await EventBus.connect(nats_server_module.url, name="test", source="test")
    yield b
    await b.close()


async def _wait(pred: Any, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not await pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_commands_that_cannot_run_are_dead_lettered_with_a_reason(bus: EventBus) -> None:
    tag = uuid.uuid4().hex[:8]
    cfg = OrchestratorConfig(stream=f"ORCH{tag}", prefix=f"o{tag}", bucket=f"b{tag}")
    part = CommandParticipant("inventory")
    calls: dict[str, int] = {}
    fixed = False

    @part.handles(orders_pb2.CancelOrderRequest)
    async def cancel(cmd: orders_pb2.CancelOrderRequest, ctx: CommandContext) -> Message:
        calls[ctx.saga_id] = calls.get(ctx.saga_id, 0) + 1
        if cmd.reason == "boom" and not fixed:
            raise RuntimeError("database down")
        return ev.OrderCancelled(order_id=ctx.saga_id, reason=cmd.reason)

    await part.start(bus, cfg, spec=FAST)
    replies: list[Envelope] = []

    async def on_reply(msg: Any) -> None:
        replies.append(Envelope.from_headers(msg.headers))

    sub = await bus.nc.subscribe(f"{cfg.prefix}.reply.>", cb=on_reply)

    async def send(saga: str, data: bytes, etype: str, headers: bool = True) -> None:
        env = Envelope.new(etype, saga_id=saga, saga_type="order")
        h = env.to_headers() if headers else {}
        await bus.publish_raw(cfg.command_subject("inventory", saga), data, h)

    cancel_type = "shop.v1.CancelOrderRequest"
    await send("nohdr", b"", cancel_type, headers=False)
    await send("unknown", b"", "shop.v1.ReserveStockRequest")
    await send("garbled", b"\xff\xff\xff", cancel_type)
    await send(
        "flaky", orders_pb2.CancelOrderRequest(reason="boom").SerializeToString(), cancel_type
    )
    await send("good", orders_pb2.CancelOrderRequest(reason="ok").SerializeToString(), cancel_type)

    async def four_letters() -> bool:
        return len(await list_dead_letters(bus, stream=cfg.stream)) == 4

    await _wait(four_letters)
    await _wait(lambda: _true(any(r.saga_id == "good" for r in replies)))
    letters = await list_dead_letters(bus, stream=cfg.stream)
    reasons = {saga_id_of(e.letter.headers) or "nohdr": e.letter.reason for e in letters}
    assert reasons["nohdr"].startswith("invalid envelope: header Meshkit-Event-Id")
    assert reasons["unknown"] == "inventory has no handler for command shop.v1.ReserveStockRequest"
    assert reasons["garbled"].startswith("undecodable shop.v1.CancelOrderRequest payload")
    assert "failed shop.v1.CancelOrderRequest 2 times (max_deliver)" in reasons["flaky"]
    assert "database down" in reasons["flaky"]
    assert {e.letter.consumer for e in letters} == {"cmd-inventory"}
    assert calls == {"flaky": 2, "good": 1}
    assert [r.saga_id for r in replies] == ["good"]

    # Fixed: the dead-lettered command replays and answers, once.
    fixed = True
    flaky = next(e for e in letters if saga_id_of(e.letter.headers) == "flaky")
    await replay_dead_letters(bus, seqs=[flaky.seq])
    await _wait(lambda: _true(any(r.saga_id == "flaky" for r in replies)))
    assert calls["flaky"] == 3
    await sub.unsubscribe()
    await part.stop()


async def _true(value: bool) -> bool:
    return value
