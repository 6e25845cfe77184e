"""meshkit's REST/JSON edge gateway: ``google.api.http`` transcoding to gRPC.

Build the ASGI app from a descriptor set and upstream targets::

    from meshkit.gateway import create_app
    app = create_app("build/api.binpb", ["127.0.0.1:50051"])

then serve it with uvicorn (``meshkit gateway`` does that, with workers and
SIGHUP reload), or mount it into Starlette/FastAPI. See docs/gateway.md.
"""

from meshkit.gateway.app import (
    ASGIApp,
    GatewayApp,
    GatewayState,
    Middleware,
    Route,
    RouteMiddleware,
    create_app,
    load_catalog,
)
from meshkit.gateway.config import GatewayConfig, GatewayOptions, load_config
from meshkit.gateway.descriptors import Catalog, MethodInfo, build_catalog, load_descriptor_set
from meshkit.gateway.errors import HTTP_STATUS, GatewayError
from meshkit.gateway.httprule import PathTemplate, TemplateError, parse_template
from meshkit.gateway.routing import Router, RoutingError
from meshkit.gateway.transcoding import Binding, HttpRuleError
from meshkit.gateway.upstreams import Upstream, UpstreamRegistry, make_channel

__all__ = [
    "HTTP_STATUS",
    "ASGIApp",
    "Binding",
    "Catalog",
    "GatewayApp",
    "GatewayConfig",
    "GatewayError",
    "GatewayOptions",
    "GatewayState",
    "HttpRuleError",
    "MethodInfo",
    "Middleware",
    "PathTemplate",
    "Route",
    "RouteMiddleware",
    "Router",
    "RoutingError",
    "TemplateError",
    "Upstream",
    "UpstreamRegistry",
    "build_catalog",
    "create_app",
    "load_catalog",
    "load_config",
    "load_descriptor_set",
    "make_channel",
    "parse_template",
]
