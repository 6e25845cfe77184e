"""EventStoreSource, HostedStore and the typed event-store subjects without a network:
the stream-sourcing transforms, config validation with exact paths, StreamSpec's
``sources`` and ``hosted_stores``, and the nats-server version guard of the event
store."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import ServerVersion
from nats.js import api

from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit.errors import ConfigError
from meshkit.saga import EventStoreSource as ExportedSource
from meshkit.saga import Participant
from meshkit.saga.eventstore import EventStore, EventStoreConfig, EventStoreError, Version
from meshkit.saga.streams import EventStoreSource, HostedStore, StreamSpec

pytestmark = pytest.mark.unit

ORDERS = EventStoreConfig(stream="ORDERS", prefix="orders")
CREATED = "shop.v1.OrderCreated"
PAID = "shop.v1.PaymentCompleted"


def _pairs(source: api.StreamSource) -> list[tuple[str, str]]:
    return [(t.src, t.dest) for t in source.subject_transforms or []]


# -- to_source ----------------------------------------------------------------


def test_listed_types_map_from_any_aggregate_to_the_stream_subject_of_the_type() -> None:
    source = EventStoreSource(ORDERS, (CREATED, PAID)).to_source("shop.events")
    assert source.name == "ORDERS"
    assert source.filter_subject is None  # the transforms alone pick the subjects
    assert _pairs(source) == [
        ("orders.shop:v1:OrderCreated.*.*", "shop.events.shop.v1.OrderCreated"),
        ("orders.shop:v1:PaymentCompleted.*.*", "shop.events.shop.v1.PaymentCompleted"),
    ]


def test_no_types_copies_every_type_with_one_wildcard_transform() -> None:
    source = EventStoreSource(ORDERS).to_source("shop.events")
    assert source.name == "ORDERS"
    assert _pairs(source) == [("orders.*.*.*", "shop.events.{{split(1,:)}}")]


def test_the_store_prefix_defaults_to_the_stream_name_in_lower_case() -> None:
    source = EventStoreSource(EventStoreConfig(stream="SHOP_ORDERS"), (CREATED,))
    assert _pairs(source.to_source("bus")) == [
        ("shop_orders.shop:v1:OrderCreated.*.*", "bus.shop.v1.OrderCreated")
    ]


def test_message_classes_become_full_protobuf_names() -> None:
    source = EventStoreSource(ORDERS, (ev.OrderCreated, PAID, ev.StockReserved))
    assert source.types == (CREATED, PAID, "shop.v1.StockReserved")
    assert all(isinstance(t, str) for t in source.types)
    # equal to a source built from names: the classes are not kept
    assert source == EventStoreSource(ORDERS, (CREATED, PAID, "shop.v1.StockReserved"))


def test_each_destination_is_where_stream_spec_publishes_that_type() -> None:
    spec = StreamSpec(
        name="SHOP",
        prefix="shop.events",
        sources=(EventStoreSource(ORDERS, (ev.OrderCreated, ev.OrderCompleted)),),
    )
    (source,) = spec.to_config().sources or []
    dests = [t.dest for t in source.subject_transforms or []]
    assert dests == [spec.subject_for(ev.OrderCreated), spec.subject_for(ev.OrderCompleted)]
    # and every destination is inside the stream's own subjects
    assert all(d.startswith(spec.prefix + ".") for d in dests)


def test_the_source_is_exported_from_meshkit_saga() -> None:
    assert ExportedSource is EventStoreSource


@pytest.mark.parametrize("bad", ["bad name", "shop.*", "shop.>", "a..b", "", ".a", "a."])
def test_a_bad_type_name_names_its_index(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        EventStoreSource(ORDERS, (CREATED, bad))
    assert err.value.path == "source.types[1]"
    assert repr(bad) in str(err.value) and "subject tokens" in str(err.value)


# -- from_dict ----------------------------------------------------------------


def test_from_dict_builds_the_store_config_and_the_types() -> None:
    source = EventStoreSource.from_dict(
        {"stream": "ORDERS", "prefix": "orders.store", "types": [CREATED, PAID]}
    )
    assert source.store == EventStoreConfig(stream="ORDERS", prefix="orders.store")
    assert source.types == (CREATED, PAID)
    assert _pairs(source.to_source("bus"))[0] == (
        "orders.store.shop:v1:OrderCreated.*.*",
        "bus.shop.v1.OrderCreated",
    )
    # prefix and types are optional: the stream's default prefix, every type
    bare = EventStoreSource.from_dict({"stream": "ORDERS"})
    assert bare.store.subject_prefix == "orders" and bare.types == ()


@pytest.mark.parametrize(
    ("doc", "path", "message"),
    [
        ({"stream": "ORDERS", "filter": "x"}, "src.filter", "unknown key"),
        ({"prefix": "orders"}, "src.stream", "required"),
        ({"stream": "ORDERS", "types": CREATED}, "src.types", "expected a list"),
        ({"stream": "ORDERS", "types": {"a": 1}}, "src.types", "expected a list"),
        ({"stream": "ORDERS", "types": 3}, "src.types", "expected a list"),
        ({"stream": "bad name"}, "src.stream", "must match"),
        ({"stream": "ORDERS", "prefix": "a.*"}, "src.prefix", "no wildcards"),
        ({"stream": "ORDERS", "types": [CREATED, "a b"]}, "src.types[1]", "subject tokens"),
    ],
)
def test_from_dict_errors_name_the_exact_path(doc: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        EventStoreSource.from_dict(doc, "src")
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_from_dict_rejects_what_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as err:
        EventStoreSource.from_dict(["ORDERS"], "src")  # type: ignore[arg-type]
    assert err.value.path == "src" and "expected a mapping, got list" in str(err.value)


# -- StreamSpec.hosted_stores ----------------------------------------------------

SHOP_ORDERS = EventStoreConfig(stream="SHOP", prefix="shop_orders")


def test_a_hosted_store_adds_its_subjects_and_filters_for_its_types() -> None:
    spec = StreamSpec(
        name="SHOP",
        prefix="shop.events",
        hosted_stores=(HostedStore(SHOP_ORDERS, (ev.OrderCreated,)),),
    )
    assert spec.subjects == ("shop.events.>", "shop_orders.>")
    assert spec.event_subjects == ("shop.events.>", "shop_orders.>")
    assert spec.to_config().subjects == ["shop.events.>", "shop_orders.>"]
    assert spec.to_config().sources is None
    # Published through the bus on its saga subject; consumed there and from the store.
    assert spec.subject_for(ev.OrderCreated) == f"shop.events.{CREATED}"
    assert spec.filters_for(ev.OrderCreated) == (
        f"shop.events.{CREATED}",
        "shop_orders.shop:v1:OrderCreated.*.*",
    )
    assert spec.filters_for(PAID) == (f"shop.events.{PAID}",)  # not a store type
    every = StreamSpec(name="SHOP", prefix="shop.events", hosted_stores=(HostedStore(SHOP_ORDERS),))
    assert every.filters_for(PAID) == (
        f"shop.events.{PAID}",
        "shop_orders.shop:v1:PaymentCompleted.*.*",
    )

    inventory = Participant("inventory", spec)
    inventory.on(ev.OrderCreated)(_noop)
    inventory.on(ev.PaymentCompleted)(_noop)
    assert inventory.subjects() == [
        f"shop.events.{CREATED}",
        f"shop.events.{PAID}",
        "shop_orders.shop:v1:OrderCreated.*.*",
    ]


async def _noop(event: Any, ctx: Any) -> None:
    return None


def test_stream_spec_from_dict_builds_hosted_stores() -> None:
    spec = StreamSpec.from_dict(
        {
            "name": "SHOP",
            "prefix": "shop.events",
            "hosted_stores": [{"stream": "SHOP", "prefix": "shop_orders", "types": [CREATED]}],
        }
    )
    assert spec.hosted_stores == (HostedStore(SHOP_ORDERS, (CREATED,)),)


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        ({"hosted_stores": [{"stream": "ORDERS"}]}, "stream.hosted_stores[0].stream", "lives in"),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "shop.events.orders"}]},
            "stream.hosted_stores[0].prefix",
            "overlaps 'shop.events'",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "shop"}]},
            "stream.hosted_stores[0].prefix",
            "overlaps",
        ),
        (
            {
                "hosted_stores": [
                    {"stream": "SHOP", "prefix": "o"},
                    {"stream": "SHOP", "prefix": "o"},
                ]
            },
            "stream.hosted_stores[1].prefix",
            "overlaps 'o'",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "orders", "storage": "memory"}]},
            "stream.hosted_stores[0].storage",
            "stream's storage is 'file'",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "orders", "types": ["a.*"]}]},
            "stream.hosted_stores[0].types[0]",
            "",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "orders"}], "max_age": "1h"},
            "stream.max_age",
            "keeps every",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "orders"}], "max_msgs": 10},
            "stream.max_msgs",
            "keeps every",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "orders"}], "retention": "workqueue"},
            "stream.retention",
            "keeps every",
        ),
        (
            {"hosted_stores": [{"stream": "SHOP", "prefix": "orders"}], "allow_direct": False},
            "stream.allow_direct",
            "",
        ),
        ({"hosted_stores": "SHOP"}, "stream.hosted_stores", "expected a list"),
        ({"hosted_stores": [3]}, "stream.hosted_stores[0]", "expected a hosted store"),
    ],
)
def test_hosted_store_errors_name_their_path(doc: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        StreamSpec.from_dict({"name": "SHOP", "prefix": "shop.events", **doc})
    assert err.value.path == path
    assert words in str(err.value)


# -- StreamSpec.sources ----------------------------------------------------------


def test_stream_spec_from_dict_builds_event_store_sources() -> None:
    spec = StreamSpec.from_dict(
        {
            "name": "SHOP",
            "prefix": "shop.events",
            "sources": [
                {"stream": "ORDERS", "prefix": "orders", "types": [CREATED]},
                {"stream": "PAYMENTS"},
            ],
        }
    )
    assert spec.sources == (
        EventStoreSource(ORDERS, (CREATED,)),
        EventStoreSource(EventStoreConfig(stream="PAYMENTS")),
    )
    assert all(isinstance(s, EventStoreSource) for s in spec.sources)
    sources = spec.to_config().sources
    assert sources is not None
    assert [(s.name, _pairs(s)) for s in sources] == [
        ("ORDERS", [("orders.shop:v1:OrderCreated.*.*", "shop.events.shop.v1.OrderCreated")]),
        ("PAYMENTS", [("payments.*.*.*", "shop.events.{{split(1,:)}}")]),
    ]


def test_stream_spec_takes_source_objects_and_mappings_together() -> None:
    spec = StreamSpec(
        name="SHOP",
        prefix="shop.events",
        sources=(
            EventStoreSource(ORDERS, (ev.OrderCreated,)),
            {"stream": "PAYMENTS", "types": [PAID]},  # type: ignore[arg-type]
        ),
    )
    assert spec.sources[1] == EventStoreSource(EventStoreConfig(stream="PAYMENTS"), (PAID,))
    assert [s.name for s in spec.to_config().sources or []] == ["ORDERS", "PAYMENTS"]


def test_a_stream_without_sources_has_none_in_its_config() -> None:
    spec = StreamSpec.from_dict({"name": "SHOP", "prefix": "shop.events"})
    assert spec.sources == ()
    assert spec.to_config().sources is None


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ({"stream": "ORDERS", "typo": 1}, "stream.sources[1].typo"),
        ({"types": [CREATED]}, "stream.sources[1].stream"),
        ({"stream": "ORDERS", "types": CREATED}, "stream.sources[1].types"),
        ({"stream": "bad name"}, "stream.sources[1].stream"),
        ({"stream": "ORDERS", "types": ["shop.*"]}, "stream.sources[1].types[0]"),
    ],
)
def test_stream_spec_errors_in_a_source_name_its_path(source: dict[str, Any], path: str) -> None:
    doc = {"name": "SHOP", "prefix": "shop.events", "sources": [{"stream": "OK"}, source]}
    with pytest.raises(ConfigError) as err:
        StreamSpec.from_dict(doc)
    assert err.value.path == path
    with pytest.raises(ConfigError) as err2:
        StreamSpec.from_dict(doc, "streams.shop")
    assert err2.value.path == "streams.shop" + path[len("stream") :]


def test_a_source_that_is_not_a_mapping_is_a_config_error() -> None:
    refused: list[ConfigError] = []
    try:
        StreamSpec.from_dict({"name": "SHOP", "prefix": "shop.events", "sources": ["ORDERS"]})
    except ConfigError as exc:
        refused.append(exc)
    assert [e.path for e in refused] == ["stream.sources[0]"]


def test_a_type_that_is_not_a_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        EventStoreSource.from_dict({"stream": "ORDERS", "types": [5]}, "src")
    assert err.value.path == "src.types[0]"


# -- the event store's subjects and server guard -----------------------------------


class _Touched(Exception):
    """The store tried to talk to the server."""


class _NoIO:
    """Stands for a connection's JetStream context: any use of it is I/O."""

    def __init__(self, calls: list[str]) -> None:
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        self._calls.append(f"js.{name}")
        raise _Touched(name)


class _NC:
    """A connection to a server of ``version`` on which any call counts as I/O."""

    def __init__(self, version: str) -> None:
        self.connected_server_version = ServerVersion(version)
        self.calls: list[str] = []
        self.timeouts: list[float] = []

    def jetstream(self, timeout: float = 5.0) -> _NoIO:
        self.timeouts.append(timeout)
        return _NoIO(self.calls)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_meshkit"):  # where a connection keeps meshkit's helpers
            raise AttributeError(name)
        self.calls.append(name)
        raise _Touched(name)


def _store(version: str, **config: Any) -> tuple[EventStore, _NC]:
    nc = _NC(version)
    return EventStore(nc, EventStoreConfig(stream="ES", prefix="es", **config)), nc  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["2.10.4", "2.9.25", "garbage"])
async def test_a_server_older_than_2_11_is_refused_before_any_io(version: str) -> None:
    store, nc = _store(version)
    with pytest.raises(EventStoreError, match=r"2\.11") as err:
        await store.append("order", "o-1", [ev.OrderCreated()], expected=Version())
    assert "Nats-Expected-Last-Subject-Sequence-Subject" in str(err.value)
    if version == "garbage":  # not "0.0 is too old": the version is not known
        assert "nats-server version is unknown" in str(err.value)
    else:
        assert f"nats-server {'.'.join(version.split('.')[:2])} is too old" in str(err.value)
    with pytest.raises(EventStoreError, match=r"2\.11"):
        await store.append("order", "o-1", [ev.OrderCreated(), ev.OrderCompleted()], expected=3)
    with pytest.raises(EventStoreError, match=r"2\.11"):
        await store.ensure()
    assert nc.calls == []  # refused before touching the connection


@pytest.mark.parametrize("version", ["2.11.0", "2.12.1", "3.0.0"])
async def test_a_server_of_2_11_or_newer_passes_the_guard(version: str) -> None:
    store, nc = _store(version, timeout=1.5)
    assert nc.timeouts == [1.5]
    with pytest.raises(_Touched):
        await store.append("order", "o-1", [ev.OrderCreated()], expected=Version())
    assert nc.calls  # got as far as the connection


def test_subject_helpers_name_one_aggregate_and_its_event_subjects() -> None:
    store, nc = _store("2.12.0")
    assert store.aggregate_name("order", "o-1") == "es.order.o-1"
    assert store.aggregate_filter("order", "o-1") == "es.*.order.o-1"
    assert store.event_subject("order", "o-1", CREATED) == "es.shop:v1:OrderCreated.order.o-1"
    assert store.event_subject("order", "o=1", "Flat") == "es.Flat.order.o=1"
    assert store.subjects == "es.>"
    assert nc.calls == []


@pytest.mark.parametrize("bad", ["shop.*", "shop.>", "a..b", "", "a b", ".x", "shop.v1.X\n"])
def test_event_subject_refuses_an_event_type_that_is_not_subject_tokens(bad: str) -> None:
    store, _ = _store("2.12.0")
    with pytest.raises(ValueError, match="event type") as err:
        store.event_subject("order", "o-1", bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize(
    ("aggregate_type", "aggregate_id", "what"),
    [
        ("ord.er", "o-1", "aggregate type"),
        ("order", "o.1", "aggregate id"),
        ("order", "*", "id"),
        # A line break would end the protocol line the subject is sent on.
        ("order", "o-1\n", "aggregate id"),
        ("order\n", "o-1", "aggregate type"),
    ],
)
def test_aggregate_names_refuse_dots_and_wildcards(
    aggregate_type: str, aggregate_id: str, what: str
) -> None:
    store, _ = _store("2.12.0")
    for method in (store.aggregate_name, store.aggregate_filter):
        with pytest.raises(ValueError, match=what):
            method(aggregate_type, aggregate_id)
    with pytest.raises(ValueError, match=what):
        store.event_subject(aggregate_type, aggregate_id, CREATED)


async def test_aggregate_ids_refuses_a_bad_type_before_any_io() -> None:
    store, nc = _store("2.12.0")
    with pytest.raises(ValueError, match="aggregate type"):
        await store.aggregate_ids("ord.er")
    assert nc.calls == []


def test_from_dict_takes_the_stores_own_settings_for_creating_it() -> None:
    src = EventStoreSource.from_dict(
        {"stream": "ORDERS", "storage": "memory", "replicas": 3, "duplicate_window": "2m"}, "src"
    )
    assert (src.store.storage, src.store.replicas, src.store.duplicate_window) == (
        "memory",
        3,
        120.0,
    )


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"stream": "ORDERS", "storage": "disk"}, "src.storage"),
        ({"stream": "ORDERS", "replicas": 0}, "src.replicas"),
        ({"stream": "ORDERS", "replicas": "3"}, "src.replicas"),
        ({"stream": "ORDERS", "duplicate_window": "soon"}, "src.duplicate_window"),
    ],
)
def test_bad_store_settings_name_their_key(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        EventStoreSource.from_dict(doc, "src")
    assert err.value.path == path
