"""Test backends for the gateway: the shop services and gwtest.v1.EchoService,
served by grpc.aio on a free loopback port, built on dynamic message classes
from the same descriptor set the gateway reads (no generated code)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from meshkit.gateway.core.descriptors import Catalog, build_catalog

ROOT = Path(__file__).resolve().parents[2]


def compile_descriptor_sets(out: Path) -> dict[str, Path]:
    """Descriptor sets for shop (proto/shop) and gwtest (tests/protos), via meshkit.codegen."""
    from meshkit.codegen import generate

    shop = out / "shop.binpb"
    gwtest = out / "gwtest.binpb"
    generate(ROOT / "proto", out / "gen", package="gw_shop_gen", descriptor_set=shop, only=["shop"])
    generate(ROOT / "tests" / "protos", out / "gen", package="gw_test_gen", descriptor_set=gwtest)
    return {"shop": shop, "gwtest": gwtest}


_CACHE: dict[str, Path] = {}


def descriptor_sets() -> dict[str, Path]:
    """``compile_descriptor_sets`` once per test process (into a private temp dir)."""
    if not _CACHE:
        import atexit
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix="meshkit-gw-")
        atexit.register(shutil.rmtree, tmp, True)
        _CACHE.update(compile_descriptor_sets(Path(tmp)))
    return dict(_CACHE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Handler = Callable[..., Any]


class Backend:
    """A grpc.aio server serving handlers keyed by ``pkg.Service.Method``."""

    def __init__(self, catalog: Catalog, handlers: dict[str, Handler]) -> None:
        self.catalog = catalog
        self.handlers = handlers
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.cancelled = asyncio.Event()
        self.stream_started = asyncio.Event()
        # A unary call that blocks until cancelled: that it started (and with what
        # deadline), that its handler was cancelled, that the RPC then terminated.
        self.blocked = asyncio.Event()
        self.blocked_deadline: float | None = None
        self.unary_cancelled = asyncio.Event()
        self.unary_terminated = asyncio.Event()
        self.sent = 0
        self.calls = 0

    def cls(self, name: str) -> Any:
        return self.catalog.message_class(name)

    async def start(self, port: int = 0, *, reflection: bool = False) -> int:
        server = grpc.aio.server()
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for m in self.catalog.methods:
            fn = self.handlers.get(m.full_name)
            if fn is None:
                continue
            kw = {
                "request_deserializer": m.input_type.FromString,
                "response_serializer": m.output_type.SerializeToString,
            }
            if m.client_streaming and m.server_streaming:
                h = grpc.stream_stream_rpc_method_handler(fn, **kw)
            elif m.client_streaming:
                h = grpc.stream_unary_rpc_method_handler(fn, **kw)
            elif m.server_streaming:
                h = grpc.unary_stream_rpc_method_handler(fn, **kw)
            else:
                h = grpc.unary_unary_rpc_method_handler(fn, **kw)
            by_service.setdefault(m.service, {})[m.name] = h
        for svc, hs in by_service.items():
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc, hs),))
        if reflection:
            from grpc_reflection.v1alpha import reflection as refl

            refl.enable_server_reflection(
                [*by_service, refl.SERVICE_NAME], server, pool=self.catalog.pool
            )
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self.server = server
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


# --------------------------------------------------------------------------- shop


FIXED_TS = "2024-05-01T12:00:00Z"


def shop_backend(catalog: Catalog) -> Backend:
    b = Backend(catalog, {})
    Order = b.cls("shop.v1.Order")
    orders: dict[str, Any] = {}
    C = b.cls

    def seed() -> None:
        o = Order(order_id="o-1", customer_id="c-1", status=2)
        o.items.add(sku="sku-1", quantity=2).unit_price.CopyFrom(
            C("shop.v1.Money")(currency="KRW", amount_minor=1500)
        )
        o.total.currency = "KRW"
        o.total.amount_minor = 3000
        o.created_at.FromJsonString(FIXED_TS)
        o.labels["tier"] = "gold"
        orders["o-1"] = o

    seed()

    async def create_order(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if not req.customer_id:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "customer_id is required")
        oid = "o-" + (req.request_id or req.customer_id)
        o = Order(order_id=oid, customer_id=req.customer_id, status=1)
        o.items.extend(req.items)
        o.shipping_address.CopyFrom(req.shipping_address)
        o.total.currency = "KRW"
        o.total.amount_minor = sum(i.quantity * i.unit_price.amount_minor for i in req.items)
        o.created_at.FromJsonString(FIXED_TS)
        orders[oid] = o
        return o

    async def get_order(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        o = orders.get(req.order_id)
        if o is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"order {req.order_id} not found")
        if req.customer_id and o.customer_id != req.customer_id:
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "not your order")
        return o

    async def list_orders(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        resp = C("shop.v1.ListOrdersResponse")()
        for o in sorted(orders.values(), key=lambda o: o.order_id):
            if req.customer_id and o.customer_id != req.customer_id:
                continue
            if req.status and o.status != req.status:
                continue
            if req.order_ids and o.order_id not in req.order_ids:
                continue
            resp.orders.append(o)
        # Echo the query so tests can see how it was parsed.
        resp.next_page_token = (
            f"size={req.page_size};token={req.page_token};status={req.status};"
            f"ids={','.join(req.order_ids)};after={req.created_after.ToJsonString() if req.HasField('created_after') else ''}"
        )
        return resp

    async def update_order(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        o = orders.get(req.order.order_id)
        if o is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"order {req.order.order_id} not found")
        o = Order.FromString(o.SerializeToString())
        if req.HasField("update_mask"):
            req.update_mask.MergeMessage(req.order, o, replace_repeated_field=True)
        else:
            o.MergeFrom(req.order)
        o.cancel_reason = "mask=" + ",".join(req.update_mask.paths)
        return o

    async def cancel_order(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        oid = req.name.removeprefix("orders/")
        o = orders.get(oid)
        if o is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"order {oid} not found")
        if o.status == 4:
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "already cancelled")
        o = Order.FromString(o.SerializeToString())
        o.status = 4
        o.cancel_reason = req.reason
        return o

    async def watch_orders(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        Ev = C("shop.v1.OrderEvent")
        limit = req.limit or 3
        b.stream_started.set()
        try:
            i = 0
            while limit < 0 or i < limit:
                ev = Ev(order_id=req.order_id or "o-1", status=(i % 4) + 1, detail=f"event {i}")
                ev.at.FromJsonString(FIXED_TS)
                b.sent += 1
                yield ev
                i += 1
                if limit < 0:
                    await asyncio.sleep(0.005)
            if req.order_id == "fail":
                await ctx.abort(grpc.StatusCode.INTERNAL, "watch broke")
        except (asyncio.CancelledError, GeneratorExit):
            # A cancel that lands while grpc writes a yielded message is raised in
            # grpc's task, not here: the generator is then closed (GeneratorExit).
            b.cancelled.set()
            raise

    async def get_stock(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        return C("shop.v1.Stock")(sku=req.sku, available=10, reserved=2)

    async def adjust_stock(it: Any, ctx: grpc.aio.ServicerContext) -> Any:
        resp = C("shop.v1.AdjustStockSummary")()
        totals: dict[str, int] = {}
        async for adj in it:
            resp.adjustments += 1
            totals[adj.sku] = totals.get(adj.sku, 0) + adj.delta
        for sku, delta in sorted(totals.items()):
            resp.stock.add(sku=sku, available=delta)
        return resp

    async def send(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        return C("shop.v1.Notification")(
            notification_id=f"n-{req.order_id}",
            customer_id=req.customer_id,
            channel=req.channel,
            message=req.message + (" (urgent)" if req.urgent.value else ""),
        )

    async def render_receipt(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if req.order_id not in orders:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"order {req.order_id} not found")
        return C("google.api.HttpBody")(
            content_type="text/html; charset=utf-8",
            data=f"<h1>Receipt {req.order_id}</h1>".encode(),
        )

    async def chat(it: Any, ctx: grpc.aio.ServicerContext) -> Any:
        async for m in it:
            yield C("shop.v1.ChatMessage")(**{"from": "bot", "text": m.text.upper()})

    async def schedule_shipment(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        s = C("shop.v1.Shipment")()
        s.CopyFrom(req.shipment)
        s.shipment_id = "s-" + req.shipment.order_id
        s.status = 1
        s.eta.FromSeconds(3600 if req.express else 86400)
        return s

    async def cancel_shipment(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if req.shipment_id == "missing":
            await ctx.abort(grpc.StatusCode.NOT_FOUND, "no such shipment")
        return C("google.protobuf.Empty")()

    async def get_shipment(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        s = C("shop.v1.Shipment")(
            shipment_id=req.shipment_id or f"s-{req.order_id}", order_id=req.order_id, status=1
        )
        s.eta.FromJsonString("1.500s")
        return s

    async def charge(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if req.amount.amount_minor <= 0:
            st = status_pb2.Status(code=3, message="amount must be positive")
        else:
            return C("shop.v1.Payment")(
                payment_id="p-" + req.order_id, order_id=req.order_id, amount=req.amount, status=1
            )
        br = error_details_pb2.BadRequest()
        br.field_violations.add(field="amount.amount_minor", description="must be > 0")
        st.details.add().Pack(br)
        await ctx.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            st.message,
            trailing_metadata=(("grpc-status-details-bin", st.SerializeToString()),),
        )

    async def get_payment(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        return C("shop.v1.Payment")(
            payment_id=req.payment_id or "p-" + req.order_id, order_id=req.order_id, status=1
        )

    b.handlers.update(
        {
            "shop.v1.OrderService.CreateOrder": create_order,
            "shop.v1.OrderService.GetOrder": get_order,
            "shop.v1.OrderService.ListOrders": list_orders,
            "shop.v1.OrderService.UpdateOrder": update_order,
            "shop.v1.OrderService.CancelOrder": cancel_order,
            "shop.v1.OrderService.WatchOrders": watch_orders,
            "shop.v1.InventoryService.GetStock": get_stock,
            "shop.v1.InventoryService.AdjustStock": adjust_stock,
            "shop.v1.NotificationService.Send": send,
            "shop.v1.NotificationService.RenderReceipt": render_receipt,
            "shop.v1.NotificationService.Chat": chat,
            "shop.v1.ShippingService.ScheduleShipment": schedule_shipment,
            "shop.v1.ShippingService.CancelShipment": cancel_shipment,
            "shop.v1.ShippingService.GetShipment": get_shipment,
            "shop.v1.PaymentService.Charge": charge,
            "shop.v1.PaymentService.GetPayment": get_payment,
        }
    )
    return b


# --------------------------------------------------------------------------- gwtest


#: What Count (with ``trailers``) and Bidi (after a message with ``flag``) end with.
_TRAILING_METADATA = (
    ("x-done", "yes"),
    ("x-multi", "a"),
    ("x-multi", "b"),
    ("x-raw-bin", b"\x00\xff"),
)


def gwtest_backend(catalog: Catalog) -> Backend:
    b = Backend(catalog, {})
    Msg = b.cls("gwtest.v1.Msg")

    async def echo(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        b.calls += 1
        return req

    async def headers(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if req.name == "block":
            # Runs until the call is cancelled. grpc.aio cancels a handler's task when its
            # RPC is cancelled (by the client, or by a deadline: hence the deadline is
            # recorded); its context's cancelled() stays False for a client's cancel.
            ctx.add_done_callback(lambda _: b.unary_terminated.set())
            b.blocked_deadline = ctx.time_remaining()
            b.blocked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                b.unary_cancelled.set()
                raise
        if req.i32 > 0:
            await asyncio.sleep(req.i32 / 1000)  # a slow call: i32 milliseconds
        out = Msg(i32=req.i32)
        for k, v in ctx.invocation_metadata() or ():
            out.labels[k] = base64.b64encode(v).decode() if isinstance(v, bytes) else v
        remaining = ctx.time_remaining()
        out.dbl = remaining if remaining is not None else -1.0
        await ctx.send_initial_metadata((("x-initial", "1"), ("x-initial-bin", b"\x01\x02")))
        ctx.set_trailing_metadata((("x-trailer", "2"),))
        return out

    async def update(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        return req

    async def upload(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        return b.cls("google.api.HttpBody")(
            content_type=req.file.content_type + "; echoed",
            data=req.name.encode() + b":" + req.file.data,
        )

    async def fail(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if req.code == 0:
            return Msg(name="ok")
        code = next(c for c in grpc.StatusCode if c.value[0] == req.code)
        msg = req.message or f"failed with {code.name}"
        if not req.details:
            await ctx.abort(code, msg)
        st = status_pb2.Status(code=req.code, message=msg)
        br = error_details_pb2.BadRequest()
        br.field_violations.add(field="name", description="too short")
        ei = error_details_pb2.ErrorInfo(reason="QUOTA", domain="gwtest", metadata={"k": "v"})
        ri = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
        for d in (br, ei, ri):
            a = any_pb2.Any()
            a.Pack(d)
            st.details.append(a)
        await ctx.abort(
            code, msg, trailing_metadata=(("grpc-status-details-bin", st.SerializeToString()),)
        )

    async def count(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        b.stream_started.set()
        if req.trailers:
            ctx.set_trailing_metadata(_TRAILING_METADATA)
        try:
            i = 0
            while req.count < 0 or i < req.count:
                if req.fail_after and i == req.fail_after:
                    await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stream quota")
                b.sent += 1
                yield Msg(name=str(i), path=req.payload, i32=i)
                i += 1
                if req.delay_ms:
                    await asyncio.sleep(req.delay_ms / 1000)
        except (asyncio.CancelledError, GeneratorExit):
            # A cancel that lands while grpc writes a yielded message is raised in
            # grpc's task, not here: the generator is then closed (GeneratorExit).
            b.cancelled.set()
            raise

    async def collect(it: Any, ctx: grpc.aio.ServicerContext) -> Any:
        out = Msg()
        names = []
        async for m in it:
            out.i32 += m.i32
            out.i64 += 1
            names.append(m.name)
        out.name = ",".join(names)
        return out

    async def bidi(it: Any, ctx: grpc.aio.ServicerContext) -> Any:
        async for m in it:
            if m.flag:  # the stream ends with trailing metadata
                ctx.set_trailing_metadata(_TRAILING_METADATA)
            if m.name == "fail":
                await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stream quota")
            yield Msg(name=m.name.upper(), i32=m.i32 * 2)

    b.handlers.update(
        {
            "gwtest.v1.EchoService.Echo": echo,
            "gwtest.v1.EchoService.Headers": headers,
            "gwtest.v1.EchoService.Update": update,
            "gwtest.v1.EchoService.Upload": upload,
            "gwtest.v1.EchoService.Fail": fail,
            "gwtest.v1.EchoService.Count": count,
            "gwtest.v1.EchoService.Collect": collect,
            "gwtest.v1.EchoService.Bidi": bidi,
            "gwtest.v1.EchoService.NoRule": echo,
        }
    )
    return b


def load_catalog(path: Path) -> Catalog:
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    return build_catalog(fds)


@contextlib.asynccontextmanager
async def serving(kind: str) -> AsyncIterator[Backend]:
    """The ``"shop"`` or ``"gwtest"`` backend, started on a free port for the block."""
    make = {"shop": shop_backend, "gwtest": gwtest_backend}[kind]
    b = make(load_catalog(descriptor_sets()[kind]))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
