"""Optional OpenTelemetry for the shop's processes.

With ``SHOP_OTEL_FILE=<path>`` a process installs the OpenTelemetry SDK, instruments
its grpc.aio servers and channels, and appends every finished span to that file as
one JSON line (trace id, span id, parent, name, kind, service, attributes), so a
test can check that one trace runs from the REST request through gRPC and every
event hop. Without it nothing is installed and only the trace context is carried.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any


def setup(service: str) -> bool:
    """Install the SDK and the grpc instrumentation when ``SHOP_OTEL_FILE`` is set."""
    path = os.environ.get("SHOP_OTEL_FILE")
    if not path:
        return False
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    lock = threading.Lock()

    class JsonLinesExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            lines = []
            for s in spans:
                ctx = s.get_span_context()
                assert ctx is not None
                lines.append(
                    json.dumps(
                        {
                            "service": service,
                            "trace_id": format(ctx.trace_id, "032x"),
                            "span_id": format(ctx.span_id, "016x"),
                            "parent_id": format(s.parent.span_id, "016x") if s.parent else "",
                            "name": s.name,
                            "kind": s.kind.name,
                            "attributes": {k: _plain(v) for k, v in (s.attributes or {}).items()},
                        }
                    )
                )
            with lock, open(path, "a") as f:
                f.write("\n".join(lines) + "\n")
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    provider = TracerProvider(resource=Resource.create({"service.name": f"shop-{service}"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter()))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()
    GrpcAioInstrumentorClient().instrument()
    return True


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
