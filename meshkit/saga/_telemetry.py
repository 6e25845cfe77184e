"""OpenTelemetry glue for the bus: trace context in NATS headers, messaging spans.

Spans follow the messaging semantic conventions: a PRODUCER span ``send
<subject>`` around each publish and a CONSUMER span ``process <subject>``
around each handled event, parented on the producer's context carried in the
``traceparent`` header. The saga id is the conversation id. With no
OpenTelemetry SDK configured these are the API's no-op spans, and the
incoming trace context still flows through to the outgoing events.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import (
    INVALID_SPAN,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)

from meshkit.saga.envelope import TRACEPARENT, TRACESTATE, Envelope

_tracer = trace.get_tracer("meshkit.saga")


_installed = False


def tracing() -> bool:
    """True once an OpenTelemetry SDK (any real tracer provider) is installed."""
    global _installed
    # Asked on every event. The global provider can be set only once, so a real one,
    # once seen, stays: later calls skip the lookup.
    if _installed:
        return True
    provider = trace.get_tracer_provider()
    _installed = not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider))
    return _installed


def _attrs(subject: str, env: Envelope, operation: str, size: int) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {
        "messaging.system": "nats",
        "messaging.operation.type": operation,
        "messaging.destination.name": subject,
        "messaging.message.id": env.event_id,
        "messaging.message.body.size": size,
        "meshkit.event.type": env.event_type,
    }
    if env.saga_id:
        attrs["messaging.message.conversation_id"] = env.saga_id
    return attrs


@contextmanager
def producer_span(
    subject: str, env: Envelope, size: int, *, template: str = "", count: int = 1
) -> Iterator[Envelope]:
    """A PRODUCER span for one publish; yields the envelope with the trace context set.

    ``template``: the destination with its variable part named
    (``orders.shop:v1:OrderCreated.order.{id}``),
    which then names the span, as the conventions ask for low-cardinality names;
    ``count`` > 1: one span for a batch of that many messages.
    """
    if not tracing():
        # No SDK: no spans to record, but the caller's trace context still flows on.
        if not env.traceparent and trace.get_current_span().get_span_context().is_valid:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            if carrier.get(TRACEPARENT):
                env = env.with_trace(carrier[TRACEPARENT], carrier.get(TRACESTATE, ""))
        yield env
        return
    attrs = {**_attrs(subject, env, "send", size), "messaging.operation.name": "publish"}
    if template:
        attrs["messaging.destination.template"] = template
    if count > 1:
        attrs["messaging.batch.message_count"] = count
    with _tracer.start_as_current_span(
        f"send {template or subject}", kind=SpanKind.PRODUCER, attributes=attrs
    ) as span:
        out: dict[str, str] = {}
        propagate.inject(out)
        traceparent = out.get(TRACEPARENT, "") or env.traceparent
        tracestate = out.get(TRACESTATE, "") or env.tracestate
        try:
            yield env.with_trace(traceparent, tracestate)
        except BaseException as exc:
            _fail(span, exc)
            raise


@contextmanager
def consumer_span(
    subject: str, env: Envelope, consumer: str, size: int, headers: Mapping[str, str]
) -> Iterator[Span]:
    """A CONSUMER span for handling one event, parented on the trace in its headers.

    An event read where an event store appended it (its subject ends with its
    aggregate's id) names the span by the subject with ``{id}`` for the id, as the
    conventions ask for low-cardinality names.
    """
    if not tracing():
        yield INVALID_SPAN
        return
    from meshkit.saga.eventstore.events import AGGREGATE_ID  # the store imports this module

    attributes = {
        **_attrs(subject, env, "process", size),
        "messaging.operation.name": "process",
        "messaging.consumer.group.name": consumer,
        "messaging.destination.subscription.name": consumer,
    }
    destination = subject
    aggregate_id = headers.get(AGGREGATE_ID, "")
    if aggregate_id and subject.endswith("." + aggregate_id):
        destination = subject[: -len(aggregate_id)] + "{id}"
        attributes["messaging.destination.template"] = destination
    parent = propagate.extract(dict(headers))
    token = otel_context.attach(parent)
    try:
        with _tracer.start_as_current_span(
            f"process {destination}", kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            try:
                yield span
            except BaseException as exc:
                _fail(span, exc)
                raise
    finally:
        otel_context.detach(token)


def _fail(span: Span, exc: BaseException) -> None:
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.set_attribute("error.type", type(exc).__name__)


class SagaMetrics:
    """OpenTelemetry counters for participants and the tracker (no-ops without an SDK).

    ``meshkit.saga.events``       events a participant finished with, by ``outcome``:
                                  handled, duplicate, ignored, dead_lettered, retried
    ``meshkit.saga.emitted``      events participants published
    ``meshkit.saga.transitions``  saga state changes recorded by a tracker, by ``state``
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        m = meter or metrics.get_meter("meshkit.saga")
        self.events = m.create_counter(
            "meshkit.saga.events", unit="{event}", description="Events participants finished with"
        )
        self.emitted = m.create_counter(
            "meshkit.saga.emitted", unit="{event}", description="Events participants published"
        )
        self.transitions = m.create_counter(
            "meshkit.saga.transitions", unit="{saga}", description="Saga state changes"
        )
        self._attrs: dict[tuple[str, ...], dict[str, str]] = {}

    def attrs(self, *pairs: str) -> dict[str, str]:
        """An attribute dict for ``k1, v1, k2, v2, ...``, built once and reused."""
        found = self._attrs.get(pairs)
        if found is None:
            if len(self._attrs) > 10_000:  # bounded: event types and states are few
                self._attrs.clear()
            found = self._attrs[pairs] = dict(zip(pairs[::2], pairs[1::2], strict=True))
        return found

    def event(self, consumer: str, event_type: str, outcome: str, count: int = 1) -> None:
        self.events.add(
            count,
            self.attrs(
                "messaging.consumer.group.name",
                consumer,
                "meshkit.event.type",
                event_type,
                "outcome",
                outcome,
            ),
        )

    def emit(self, consumer: str, count: int) -> None:
        self.emitted.add(count, self.attrs("messaging.consumer.group.name", consumer))

    def transition(self, saga_type: str, state: str) -> None:
        self.transitions.add(1, self.attrs("meshkit.saga.type", saga_type, "state", state))


_metrics: SagaMetrics | None = None


def saga_metrics() -> SagaMetrics:
    """The process-wide :class:`SagaMetrics` (created on first use)."""
    global _metrics
    if _metrics is None:
        _metrics = SagaMetrics()
    return _metrics


def use_meter(meter: metrics.Meter | None) -> SagaMetrics:
    """Record saga metrics on ``meter`` from now on (tests; None: the global meter)."""
    global _metrics
    _metrics = SagaMetrics(meter)
    return _metrics
