"""Envelope headers, deterministic ids, stream and consumer specs (no network)."""

from __future__ import annotations

import pytest

from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.errors import ConfigError
from meshkit.saga import (
    ConsumerSpec,
    Envelope,
    EnvelopeError,
    StreamSpec,
    derive_event_id,
    type_name,
)
from meshkit.saga import envelope as E

pytestmark = pytest.mark.unit


def test_headers_round_trip_every_field() -> None:
    env = Envelope(
        event_id="e1",
        event_type="shop.v1.OrderCreated",
        saga_id="s1",
        causation_id="c0",
        timestamp_ms=1_700_000_000_123,
        source="order",
        saga_type="order",
        deadline_ms=1500,
        saga_deadline_ms=1_700_000_030_000,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="k=v",
        extra={"X-Custom": "1"},
    )
    headers = env.to_headers()
    assert headers[E.MSG_ID] == "e1"  # JetStream dedupe uses the event id
    # One header for the envelope; trace context and the event's own headers by name.
    assert headers == {
        E.MSG_ID: "e1",
        E.ENVELOPE: "1;shop.v1.OrderCreated;s1;order;c0;1700000000123;order;1500;1700000030000",
        E.TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        E.TRACESTATE: "k=v",
        "X-Custom": "1",
    }
    assert Envelope.from_headers(headers) == env
    assert E.event_type_of(headers) == "shop.v1.OrderCreated"
    assert E.saga_id_of(headers) == "s1"


def test_optional_fields_are_left_off_and_parse_as_none() -> None:
    env = Envelope(event_id="e1", event_type="t.T", timestamp_ms=5)
    headers = env.to_headers()
    assert headers == {E.MSG_ID: "e1", E.ENVELOPE: "1;t.T;;;;5;"}
    parsed = Envelope.from_headers(headers)
    assert parsed.deadline_ms is None and parsed.saga_deadline_ms is None and parsed.saga_id == ""
    assert parsed == env
    # A saga deadline without a request deadline keeps the latter's field, empty.
    with_saga_deadline = Envelope(event_id="e1", event_type="t.T", saga_deadline_ms=9)
    assert with_saga_deadline.to_headers()[E.ENVELOPE].endswith(";;9")
    assert Envelope.from_headers(with_saga_deadline.to_headers()) == with_saga_deadline
    only_deadline = Envelope(event_id="e1", event_type="t.T", deadline_ms=0)
    assert only_deadline.to_headers()[E.ENVELOPE].endswith(";0")
    assert Envelope.from_headers(only_deadline.to_headers()).deadline_ms == 0


def test_the_per_field_layout_of_earlier_releases_is_still_read() -> None:
    headers = {
        E.MSG_ID: "e1",
        E.EVENT_TYPE: "shop.v1.OrderCreated",
        E.SAGA_ID: "s1",
        E.SAGA_TYPE: "order",
        E.CAUSATION_ID: "c0",
        E.TIMESTAMP: "1700000000123",
        E.SOURCE: "order",
        E.DEADLINE: "1500",
        E.SAGA_DEADLINE: "1700000030000",
    }
    env = Envelope.from_headers(headers)
    assert env == Envelope(
        event_id="e1",
        event_type="shop.v1.OrderCreated",
        saga_id="s1",
        saga_type="order",
        causation_id="c0",
        timestamp_ms=1_700_000_000_123,
        source="order",
        deadline_ms=1500,
        saga_deadline_ms=1_700_000_030_000,
    )
    assert E.event_type_of(headers) == "shop.v1.OrderCreated" and E.saga_id_of(headers) == "s1"
    # Written again, it takes the one-header layout.
    assert E.ENVELOPE in env.to_headers() and E.EVENT_TYPE not in env.to_headers()


def test_a_field_holding_the_separator_is_written_one_header_per_field() -> None:
    env = Envelope(event_id="e1", event_type="t.T", saga_id="a;b", source="x", timestamp_ms=5)
    headers = env.to_headers()
    assert E.ENVELOPE not in headers
    assert (headers[E.SAGA_ID], headers[E.EVENT_TYPE], headers[E.SOURCE]) == ("a;b", "t.T", "x")
    assert Envelope.from_headers(headers) == env
    assert E.saga_id_of(headers) == "a;b"


def test_fields_a_later_release_appends_are_skipped() -> None:
    headers = {E.MSG_ID: "e1", E.ENVELOPE: "1;t.T;s;order;c;5;src;;;future;fields"}
    env = Envelope.from_headers(headers)
    assert (env.event_type, env.saga_id, env.source, env.timestamp_ms) == ("t.T", "s", "src", 5)
    assert env.deadline_ms is None and env.saga_deadline_ms is None


@pytest.mark.parametrize(
    ("headers", "culprit"),
    [
        (None, E.EVENT_ID),
        ({E.EVENT_TYPE: "a.B"}, E.EVENT_ID),
        ({E.EVENT_ID: "x"}, E.EVENT_TYPE),
        ({E.EVENT_ID: "x", E.EVENT_TYPE: "a.B", E.TIMESTAMP: "soon"}, E.TIMESTAMP),
        ({E.EVENT_ID: "x", E.EVENT_TYPE: "a.B", E.DEADLINE: "1.5s"}, E.DEADLINE),
        ({E.MSG_ID: "x", E.ENVELOPE: "2;a.B;s;t;c;5;src"}, E.ENVELOPE),
        ({E.MSG_ID: "x", E.ENVELOPE: "1;a.B;s;t;c;5"}, E.ENVELOPE),
        ({E.MSG_ID: "x", E.ENVELOPE: "1;;s;t;c;5;src"}, E.ENVELOPE),
        ({E.MSG_ID: "x", E.ENVELOPE: "1;a.B;s;t;c;soon;src"}, E.ENVELOPE),
        ({E.MSG_ID: "x", E.ENVELOPE: "1;a.B;s;t;c;5;src;1.5s"}, E.ENVELOPE),
        ({E.ENVELOPE: "1;a.B;s;t;c;5;src"}, E.EVENT_ID),
    ],
)
def test_bad_headers_name_the_culprit(headers: dict[str, str] | None, culprit: str) -> None:
    with pytest.raises(EnvelopeError) as err:
        Envelope.from_headers(headers)
    assert err.value.header == culprit
    assert culprit in str(err.value)


def test_caused_carries_correlation_and_points_causation_at_the_input() -> None:
    start = Envelope.new(saga_pb2.SagaTimedOut, saga_type="order", saga_deadline_ms=99, source="a")
    start = start.with_trace("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert start.saga_id == start.event_id  # a new saga is named after its first event
    nxt = start.caused("shop.v1.StockReserved", event_id="e2", source="inventory", deadline_ms=10)
    assert (nxt.saga_id, nxt.saga_type, nxt.saga_deadline_ms) == (start.saga_id, "order", 99)
    assert nxt.causation_id == start.event_id
    assert (nxt.event_id, nxt.source, nxt.deadline_ms) == ("e2", "inventory", 10)
    assert nxt.traceparent == start.traceparent  # the producer span replaces it when tracing


def test_remaining_deadline_subtracts_the_time_in_flight() -> None:
    env = Envelope(event_id="e", event_type="t.T", timestamp_ms=10_000, deadline_ms=2_000)
    assert env.remaining_deadline(now=10_500) == pytest.approx(1.5)
    assert env.remaining_deadline(now=20_000) == 0.0
    assert Envelope(event_id="e", event_type="t.T").remaining_deadline() is None


def test_derived_ids_are_deterministic_and_distinct() -> None:
    a = derive_event_id("in-1", "payment.charge", 0)
    assert a == derive_event_id("in-1", "payment.charge", 0)
    others = {
        derive_event_id("in-1", "payment.charge", 1),
        derive_event_id("in-2", "payment.charge", 0),
        derive_event_id("in-1", "payment.refund", 0),
    }
    assert a not in others and len(others) == 3
    assert len(a) == 32 and int(a, 16) >= 0
    with pytest.raises(ValueError):
        derive_event_id("x", "h", -1)


def test_type_name_is_the_protobuf_full_name() -> None:
    assert type_name(saga_pb2.SagaTimedOut) == "meshkit.v1.SagaTimedOut"
    assert type_name(saga_pb2.SagaTimedOut()) == "meshkit.v1.SagaTimedOut"


def test_metadata_message_mirrors_the_envelope() -> None:
    env = Envelope(event_id="e", event_type="t.T", saga_id="s", timestamp_ms=1234, deadline_ms=7)
    md = env.to_metadata()
    assert (md.event_id, md.saga_id, md.deadline_ms) == ("e", "s", 7)
    assert md.occurred_at.ToMilliseconds() == 1234


def test_stream_spec_subjects_and_validation() -> None:
    spec = StreamSpec(name="SHOP", prefix="shop.events")
    assert spec.subjects == ("shop.events.>",)
    assert spec.subject_for(saga_pb2.SagaTimedOut) == "shop.events.meshkit.v1.SagaTimedOut"
    cfg = spec.to_config()
    assert cfg.duplicate_window == 120.0 and cfg.subjects == ["shop.events.>"]
    for kwargs, path in [
        ({"name": "a.b", "prefix": "p"}, "stream.name"),
        ({"name": "A", "prefix": "p.*"}, "stream.prefix"),
        ({"name": "A", "prefix": "p", "duplicate_window": 0}, "stream.duplicate_window"),
        ({"name": "A", "prefix": "p", "replicas": 7}, "stream.replicas"),
        ({"name": "A", "prefix": "p", "storage": "disk"}, "stream.storage"),
    ]:
        with pytest.raises(ConfigError) as err:
            StreamSpec(**kwargs)  # type: ignore[arg-type]
        assert err.value.path == path


def test_consumer_spec_backoff_schedule_and_validation() -> None:
    spec = ConsumerSpec(nak_backoff=(0.1, 1.0, 5.0))
    assert [spec.nak_delay(n) for n in (0, 1, 2, 3, 4, 10)] == [0.1, 0.1, 1.0, 5.0, 5.0, 5.0]
    for kwargs, path in [
        ({"ack_wait": 0}, "consumer.ack_wait"),
        ({"max_deliver": 0}, "consumer.max_deliver"),
        ({"nak_backoff": ()}, "consumer.nak_backoff"),
        ({"max_in_flight": 0}, "consumer.max_in_flight"),
        ({"idle_heartbeat": 40.0}, "consumer.idle_heartbeat"),
        ({"batch_overlap": -0.1}, "consumer.batch_overlap"),
    ]:
        with pytest.raises(ConfigError) as err:
            ConsumerSpec(**kwargs)  # type: ignore[arg-type]
        assert err.value.path == path


def test_specs_from_config_documents() -> None:
    spec = StreamSpec.from_dict(
        {
            "name": "SHOP",
            "prefix": "shop.events",
            "duplicate_window": "2m",
            "max_age": "1h",
            "replicas": 3,
        }
    )
    assert (spec.duplicate_window, spec.max_age, spec.replicas) == (120.0, 3600.0, 3)
    consumer = ConsumerSpec.from_dict(
        {
            "ack_wait": "2s",
            "nak_backoff": ["100ms", "1s"],
            "max_deliver": 4,
            "batch_overlap": "50ms",
        }
    )
    assert (consumer.ack_wait, consumer.nak_backoff, consumer.max_deliver) == (2.0, (0.1, 1.0), 4)
    assert consumer.batch_overlap == 0.05
    with pytest.raises(ConfigError) as err:
        StreamSpec.from_dict({"name": "S", "prefix": "p", "dupe_window": 1}, "saga.streams[0]")
    assert err.value.path == "saga.streams[0].dupe_window"
    with pytest.raises(ConfigError) as err:
        StreamSpec.from_dict(
            {"name": "S", "prefix": "p", "duplicate_window": "soon"}, "saga.streams[0]"
        )
    assert err.value.path == "saga.streams[0].duplicate_window"
    with pytest.raises(ConfigError) as err:
        ConsumerSpec.from_dict({"max_deliver": 0}, "saga.consumer")
    assert err.value.path == "saga.consumer.max_deliver" and "must be >= 1" in str(err.value)
    with pytest.raises(ConfigError) as err:
        StreamSpec.from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert err.value.path == "stream"


def test_the_event_id_travels_once_and_is_pinned_before_its_msg_id_is_replaced() -> None:
    headers = Envelope(event_id="e1", event_type="t.T", timestamp_ms=5).to_headers()
    # Nats-Msg-Id is the event id: a second header with the same value is not sent.
    assert headers[E.MSG_ID] == "e1" and E.EVENT_ID not in headers
    assert E.event_id_of(headers) == "e1"
    assert Envelope.from_headers(headers).event_id == "e1"
    # A dead letter's replay gets a new Nats-Msg-Id; the event keeps its id.
    pinned = E.pin_event_id(dict(headers))
    pinned[E.MSG_ID] = "e1:replay:7"
    assert Envelope.from_headers(pinned).event_id == "e1"
    # Headers that name the id explicitly (older events, replays) keep it.
    both = {E.MSG_ID: "m", E.EVENT_ID: "e", E.EVENT_TYPE: "t.T"}
    assert E.event_id_of(both) == "e" and E.pin_event_id(dict(both))[E.EVENT_ID] == "e"
    assert E.event_id_of({}) == ""


def test_the_positional_constructor_is_the_dataclass_init() -> None:
    import dataclasses
    import inspect

    names = [f.name for f in dataclasses.fields(Envelope)]
    assert list(inspect.signature(Envelope._of).parameters) == names  # every field, in order
    values: dict[str, object] = {
        "event_id": "e",
        "event_type": "shop.v1.OrderCreated",
        "saga_id": "s",
        "causation_id": "c",
        "timestamp_ms": 12,
        "source": "src",
        "saga_type": "order",
        "deadline_ms": 5,
        "saga_deadline_ms": 7,
        "traceparent": "tp",
        "tracestate": "ts",
        "extra": {"X-A": "1"},
    }
    made = Envelope._of(*(values[n] for n in names))  # type: ignore[arg-type]
    assert made == Envelope(**values)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.saga_id = "other"  # type: ignore[misc]
    parsed = Envelope.from_headers(Envelope(**values).to_headers())  # type: ignore[arg-type]
    assert parsed == Envelope(**values)  # type: ignore[arg-type]
