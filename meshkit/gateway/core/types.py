"""Types shared by the ASGI app, HTTP streaming and WebSocket handlers.

The handlers in :mod:`~meshkit.gateway.core.streaming` and
:mod:`~meshkit.gateway.core.websocket` see a snapshot only through :class:`StateView`,
which :class:`~meshkit.gateway.core.app.GatewayState` satisfies: they import this module,
not the app, so app → streaming/websocket → app is no longer a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from meshkit.gateway._asgi import ASGIApp, Receive, Scope, Send
from meshkit.gateway.core.config import GatewayOptions
from meshkit.gateway.core.descriptors import Catalog
from meshkit.gateway.core.errors import GatewayError
from meshkit.gateway.core.metadata import RequestHeaders
from meshkit.gateway.core.routing import Router
from meshkit.gateway.core.transcoding import Binding, JsonCodec, Transcoder


@dataclass(slots=True)
class Route:
    """A routable binding with its compiled ASGI handler chain."""

    binding: Binding
    app: ASGIApp

    @property
    def method_name(self) -> str:
        """``pkg.Service.Method``."""
        return self.binding.method.full_name


RouteMiddleware = Callable[[Route, ASGIApp], ASGIApp]


class StateView(Protocol):
    """What the streaming and WebSocket handlers use of a compiled gateway snapshot."""

    catalog: Catalog
    options: GatewayOptions
    codec: JsonCodec
    transcoder: Transcoder
    router: Router[Route]

    def _callable(self, channel: grpc.aio.Channel, b: Binding, kind: str) -> Any: ...

    def _upstream_channel(self, b: Binding, scope: Scope) -> grpc.aio.Channel: ...

    def _timeout(self, b: Binding, hdrs: RequestHeaders) -> float | None: ...

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes: ...

    def request_id_header(self, hdrs: RequestHeaders | None) -> list[tuple[bytes, bytes]]: ...

    async def send_error(
        self,
        send: Send,
        err: GatewayError,
        hdrs: RequestHeaders | None = None,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None: ...

    async def send_rpc_error(
        self, send: Send, err: grpc.aio.AioRpcError, hdrs: RequestHeaders | None = None
    ) -> None: ...
