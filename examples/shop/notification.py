"""The notification service: tells the customer how their order ended (no compensation)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.api import httpbody_pb2

from examples.shop._service import ServiceContext, main
from examples.shop.flow import SHOP_STREAM, consumer_spec
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.gen.shop.v1 import notification_pb2, notification_pb2_grpc
from examples.shop.store import Store
from meshkit.saga import Context, Participant

SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    channel INTEGER NOT NULL,
    message TEXT NOT NULL
);
"""


def send(
    conn: sqlite3.Connection, n: notification_pb2.Notification, order_id: str
) -> notification_pb2.Notification:
    if not n.notification_id:
        n.notification_id = uuid.uuid4().hex
    conn.execute(
        "INSERT OR IGNORE INTO notifications VALUES (?, ?, ?, ?, ?)",
        (n.notification_id, order_id, n.customer_id, int(n.channel), n.message),
    )
    return n


PARTICIPANT = Participant("notification", SHOP_STREAM, consumer=consumer_spec())


def _notify(ctx: Context, order_id: str, customer_id: str, message: str) -> ev.CustomerNotified:
    n = send(
        ctx.tx,
        notification_pb2.Notification(
            notification_id=uuid.uuid5(uuid.NAMESPACE_URL, f"notification/{ctx.event_id}").hex,
            customer_id=customer_id,
            channel=notification_pb2.CHANNEL_EMAIL,
            message=message,
        ),
        order_id,
    )
    return ev.CustomerNotified(order_id=order_id, notification_id=n.notification_id)


# Idempotent by construction (no inbox record): the notification's id is derived from
# the event's, its insert ignores a repeat, and the output is the same on every run.
@PARTICIPANT.on(ev.OrderCompleted, emits=[ev.CustomerNotified], idempotent=True)
async def notify_completed(event: ev.OrderCompleted, ctx: Context) -> ev.CustomerNotified:
    return _notify(
        ctx, event.order_id, event.customer_id, f"Your order {event.order_id} is on its way."
    )


@PARTICIPANT.on(ev.OrderCancelled, emits=[ev.CustomerNotified], idempotent=True)
async def notify_cancelled(event: ev.OrderCancelled, ctx: Context) -> ev.CustomerNotified:
    return _notify(
        ctx,
        event.order_id,
        event.customer_id,
        f"Your order {event.order_id} was cancelled: {event.reason}.",
    )


class NotificationService(notification_pb2_grpc.NotificationServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def Send(
        self, request: notification_pb2.SendNotificationRequest, context: grpc.aio.ServicerContext
    ) -> notification_pb2.Notification:
        if not request.customer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "customer_id: required")
        async with self.store.tx() as conn:
            return send(
                conn,
                notification_pb2.Notification(
                    customer_id=request.customer_id,
                    channel=request.channel,
                    message=request.message,
                ),
                request.order_id,
            )

    async def RenderReceipt(
        self, request: notification_pb2.RenderReceiptRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        rows = self.store.query(
            "SELECT message FROM notifications WHERE order_id = ? ORDER BY rowid",
            (request.order_id,),
        )
        if not rows:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no receipt for order {request.order_id!r}"
            )
        text = f"Receipt for order {request.order_id}\n" + "\n".join(str(r[0]) for r in rows) + "\n"
        return httpbody_pb2.HttpBody(content_type="text/plain; charset=utf-8", data=text.encode())

    async def Chat(
        self,
        request_iterator: AsyncIterator[notification_pb2.ChatMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[notification_pb2.ChatMessage]:
        async for message in request_iterator:
            yield notification_pb2.ChatMessage(
                **{"from": "support", "text": f"you said: {message.text}"}
            )


def commands(store: Store) -> Any:
    """The notification service's command handler for the orchestrated saga."""
    from examples.shop.orchestration import once
    from meshkit.saga.commands import CommandContext, CommandParticipant

    part = CommandParticipant("notification")

    @part.handles(notification_pb2.SendNotificationRequest)
    async def notify_cmd(cmd: notification_pb2.SendNotificationRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            n = send(
                conn,
                notification_pb2.Notification(
                    notification_id=uuid.uuid5(
                        uuid.NAMESPACE_URL, f"notification/{c.command_id}"
                    ).hex,
                    customer_id=cmd.customer_id,
                    channel=notification_pb2.CHANNEL_EMAIL,
                    message=cmd.message,
                ),
                cmd.order_id,
            )
            return ev.CustomerNotified(order_id=cmd.order_id, notification_id=n.notification_id)

        return await once(store, c, work)

    return part


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    service = NotificationService(ctx.store)
    if ctx.mode == "orchestrated":
        from examples.shop.orchestration import serve_commands

        serve_commands(ctx, commands(ctx.store))

    def add(server: grpc.aio.Server) -> None:
        notification_pb2_grpc.add_NotificationServiceServicer_to_server(service, server)

    return add, PARTICIPANT


if __name__ == "__main__":
    main("notification", SCHEMA, build)
