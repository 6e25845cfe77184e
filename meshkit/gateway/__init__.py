"""meshkit's REST/JSON edge gateway: ``google.api.http`` transcoding to gRPC.

Build the ASGI app from a descriptor set and upstream targets::

    from meshkit.gateway import create_app
    app = create_app("build/api.binpb", ["127.0.0.1:50051"])

then serve it with any ASGI server (uvicorn, granian, hypercorn), or mount it into
Starlette/FastAPI; ``meshkit gateway`` serves it on meshkit's own HTTP/1.1 server, with
workers, SIGHUP reload and the guarantees listed in docs/gateway.md.
"""

from typing import Any

from meshkit.gateway._asgi import ASGIApp, Middleware
from meshkit.gateway.core.app import GatewayApp, GatewayState, create_app, load_catalog
from meshkit.gateway.core.config import GatewayConfig, GatewayOptions, load_config
from meshkit.gateway.core.descriptors import Catalog, MethodInfo, build_catalog, load_descriptor_set
from meshkit.gateway.core.errors import HTTP_STATUS, GatewayError
from meshkit.gateway.core.httprule import PathTemplate, TemplateError, parse_template
from meshkit.gateway.core.routing import Router, RoutingError
from meshkit.gateway.core.transcoding import Binding, HttpRuleError
from meshkit.gateway.core.types import Route, RouteMiddleware
from meshkit.gateway.upstream.upstreams import Upstream, UpstreamRegistry, make_channel

# The edge (auth, limits, cache, canary, BFF, OpenAPI) loads PyJWT, cryptography and the
# Prometheus exporter: imported on first use so a plain transcoding gateway stays light.
_EDGE_NAMES = {
    "EdgeApp": "meshkit.gateway.edge.edge",
    "create_edge_app": "meshkit.gateway.edge.edge",
    "EdgeConfig": "meshkit.gateway.edge.profiles",
    "load_edge_config": "meshkit.gateway.edge.profiles",
    "generate_openapi": "meshkit.gateway.openapi",
}


def __getattr__(name: str) -> Any:
    module = _EDGE_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'meshkit.gateway' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "HTTP_STATUS",
    "ASGIApp",
    "Binding",
    "Catalog",
    "EdgeApp",
    "EdgeConfig",
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
    "create_edge_app",
    "generate_openapi",
    "load_catalog",
    "load_config",
    "load_descriptor_set",
    "load_edge_config",
    "make_channel",
    "parse_template",
]
