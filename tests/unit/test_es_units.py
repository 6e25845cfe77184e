"""Event sourcing pieces without a network: aggregates' apply tables, upcasters,
snapshot encoding, read model stores, the saga state machine and its persisted form."""

from __future__ import annotations

import pytest
from nats.aio.client import ServerVersion

from examples.es_orders.saga import ORDER_SAGA, order_request
from examples.shop.gen.shop.v1 import events_pb2
from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.errors import ConcurrencyError, ConfigError
from meshkit.saga.envelope import Envelope
from meshkit.saga.eventstore import (
    AggregateConflict,
    Appliers,
    EventStoreConfig,
    EventStoreError,
    StoredEvent,
    Upcasters,
)
from meshkit.saga.eventstore._wire import (
    _ack_seq,
    _Duplicate,
    _server_supports_atomic,
    _WrongLastSequence,
)
from meshkit.saga.machine import Command, PendingCommand, SagaInstance, SagaMachine, State, Step
from meshkit.saga.readmodels import CheckpointMoved, MemoryReadModelStore, SqliteReadModelStore
from meshkit.saga.snapshots import Snapshot

pytestmark = pytest.mark.unit


class Account:
    def __init__(self, account_id: str) -> None:
        self.balance = 0

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.balance += e.amount.amount_minor

    def apply_refunded(self, e: events_pb2.PaymentRefunded) -> None:
        self.balance = 0

    def helper(self, x: int) -> int:  # not an apply method: ignored
        return x


def test_appliers_map_event_types_to_typed_methods() -> None:
    table = Appliers(Account)
    assert set(table.methods) == {"shop.v1.PaymentCompleted", "shop.v1.PaymentRefunded"}
    acc = Account("a")
    e = events_pb2.PaymentCompleted()
    e.amount.amount_minor = 5
    table.apply(acc, e)
    table.apply(acc, e)
    assert acc.balance == 10
    with pytest.raises(EventStoreError, match=r"no apply method for shop\.v1\.OrderCreated"):
        table.apply(acc, events_pb2.OrderCreated())
    assert "PaymentCompleted -> apply_paid" in repr(table)


def test_appliers_reject_a_class_without_apply_methods_and_duplicates() -> None:
    class Empty:
        pass

    with pytest.raises(ConfigError, match="no apply methods"):
        Appliers(Empty)

    class Twice:
        def apply_a(self, e: events_pb2.OrderCreated) -> None: ...
        def apply_b(self, e: events_pb2.OrderCreated) -> None: ...

    with pytest.raises(ConfigError, match="second apply method"):
        Appliers(Twice)


def _stored(event_type: str, data: bytes, schema: int) -> StoredEvent:
    return StoredEvent("t", "1", 1, 1, event_type, schema, data, Envelope.new(event_type))


def test_upcasters_chain_versions_and_renames() -> None:
    up = Upcasters()
    up.register("v.Old", 1, lambda d: d + b"2")
    up.register("v.Old", 2, lambda d: ("v.New", d + b"3"))
    up.register("v.New", 3, lambda d: d + b"4")
    out = up.upcast(_stored("v.Old", b"1", 1))
    assert (out.event_type, out.schema_version, out.data) == ("v.New", 4, b"1234")
    assert out.envelope.event_type == "v.New"
    current = up.upcast(_stored("v.New", b"x", 4))
    assert current.data == b"x"
    with pytest.raises(ValueError, match="already registered"):
        up.register("v.Old", 1, lambda d: d)


def test_snapshot_round_trip_keeps_binary_state() -> None:
    snap = Snapshot("order", "o-1", 100, 4242, 1700, 3, b"\x00\n\xff state")
    assert Snapshot.decode(snap.encode()) == snap
    with pytest.raises(ValueError):
        Snapshot.decode(b"no newline")


def test_conflict_is_a_concurrency_error_naming_everything() -> None:
    err = AggregateConflict("es.order.o-1", 3, 5)
    assert isinstance(err, ConcurrencyError) and err.code == "ABORTED"
    assert str(err) == "aggregate es.order.o-1: expected version 3, found version 5"


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"eventstore\.stream"):
        EventStoreConfig(stream="bad name")
    with pytest.raises(ConfigError, match=r"eventstore\.prefix"):
        EventStoreConfig(prefix="a.*")
    assert EventStoreConfig(stream="ORDERS").subject_prefix == "orders"


class _NC:
    def __init__(self, version: str) -> None:
        self.connected_server_version = ServerVersion(version)


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        (b'{"stream":"S","seq":7}', 7),
        (b'{"stream":"S_1-x","seq":12345678901234567890}', 12345678901234567890),
        (b'{"stream": "S", "seq": 7}', 7),
        (b'{"stream":"S","seq":7,"domain":"hub"}', 7),
        (b'{"stream":"S","seq":0}', 0),
        (b'{"stream":"S","seq":07}', EventStoreError),
        (b'{"stream":"S","seq":7,"duplicate":true}', _Duplicate),
        (
            b'{"error":{"err_code":10071,"description":"wrong last sequence: 1"}}',
            _WrongLastSequence,
        ),
        (b'{"stream":"S","seq":7', EventStoreError),
    ],
)
def test_a_stream_ack_reads_as_json_would(raw: bytes, answer: int | type[Exception]) -> None:
    # Plain acks skip json.loads; every other spelling must still go through it.
    if isinstance(answer, int):
        assert _ack_seq(raw) == answer
    else:
        with pytest.raises(answer):
            _ack_seq(raw)


def test_atomic_batches_need_server_2_12() -> None:
    assert _server_supports_atomic(_NC("2.15.1"))  # type: ignore[arg-type]
    assert _server_supports_atomic(_NC("2.12.0"))  # type: ignore[arg-type]
    assert not _server_supports_atomic(_NC("2.11.9"))  # type: ignore[arg-type]
    with pytest.raises(EventStoreError, match="version is unknown"):
        _server_supports_atomic(_NC("garbage"))  # type: ignore[arg-type]
    with pytest.raises(EventStoreError, match="version is unknown"):
        _server_supports_atomic(_NC("0.0.0-unknown"))  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [MemoryReadModelStore, SqliteReadModelStore])
def test_read_model_store_commits_with_checkpoint_or_not_at_all(make: type) -> None:
    store = make()

    def put(tx: object) -> None:
        tx.put("orders", "o1", {"status": "CREATED", "n": 1})  # type: ignore[attr-defined]

    store.apply("p", {"S": 0}, {"S": 5}, put)
    assert store.checkpoints("p") == {"S": 5}
    assert store.get("p", "orders", "o1") == {"status": "CREATED", "n": 1}

    def boom(tx: object) -> None:
        tx.put("orders", "o2", {"status": "X"})  # type: ignore[attr-defined]
        tx.put("orders", "o1", {"status": "CHANGED"})  # type: ignore[attr-defined]
        tx.delete("orders", "o1")  # type: ignore[attr-defined]
        tx.put("orders", "o2", {"status": "Y"})  # type: ignore[attr-defined]
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        store.apply("p", {"S": 5}, {"S": 9}, boom)
    assert store.checkpoints("p") == {"S": 5} and store.get("p", "orders", "o2") is None
    assert store.get("p", "orders", "o1") == {"status": "CREATED", "n": 1}

    with pytest.raises(CheckpointMoved) as moved:
        store.apply("p", {"S": 3}, {"S": 7}, put)
    assert (moved.value.expected, moved.value.actual) == (3, 5)

    store.apply("p", {"S": 5}, {"S": 6}, lambda tx: tx.put("orders", "o3", {"status": "CREATED"}))
    assert [d.get("n") for d in store.find("p", "orders", status="CREATED")] == [1, None]
    assert store.find("other", "orders") == []
    store.reset("p")
    assert store.checkpoints("p") == {} and store.find("p", "orders") == []


def test_sqlite_find_rejects_odd_field_names() -> None:
    store = SqliteReadModelStore()
    with pytest.raises(ValueError, match="not an identifier"):
        store.find("p", "orders", **{"a') OR 1=1 --": 1})


def test_machine_definition_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown state"):
        SagaMachine(
            "s",
            "A",
            {"A": State(on={"E": "B"})},
            {"E": events_pb2.OrderCreated},
            events_pb2.OrderCreated,
        )
    with pytest.raises(ConfigError, match="unknown event"):
        SagaMachine("s", "A", {"A": State(on={"X": "A"})}, {}, events_pb2.OrderCreated)
    with pytest.raises(ConfigError, match="nothing leaves it"):
        SagaMachine("s", "A", {"A": State()}, {}, events_pb2.OrderCreated)
    with pytest.raises(ConfigError, match="already event"):
        SagaMachine(
            "s",
            "A",
            {"A": State(final=True)},
            {"E": events_pb2.OrderCreated, "F": events_pb2.OrderCreated},
            events_pb2.OrderCreated,
        )
    with pytest.raises(ConfigError, match="participant"):
        Command("bad name", lambda ctx: events_pb2.OrderCreated())
    twice = (Command("a", lambda ctx: events_pb2.OrderCreated()),) * 2
    with pytest.raises(ConfigError, match="one command per participant"):
        SagaMachine("s", "A", {"A": State(commands=twice, final=True)}, {}, events_pb2.OrderCreated)


def test_the_seed_machine_has_the_seed_states_and_finals() -> None:
    assert set(ORDER_SAGA.states) == {
        "PENDING",
        "ORDER_CREATED",
        "STOCK_RESERVED",
        "RELEASING_STOCK",
        "CANCELLING_ORDER",
        "PAYMENT_COMPLETED",
        "COMPLETED",
        "FAILED",
    }
    assert {n for n, s in ORDER_SAGA.states.items() if s.final} == {"COMPLETED", "FAILED"}
    assert {n for n, s in ORDER_SAGA.states.items() if s.compensation} == {
        "RELEASING_STOCK",
        "CANCELLING_ORDER",
    }
    assert ORDER_SAGA.event_name("shop.v1.PaymentFailed") == "PROCESS_PAYMENT_FAILURE"
    assert "STOCK_RESERVED --> RELEASING_STOCK: PROCESS_PAYMENT_FAILURE" in ORDER_SAGA.to_mermaid()


def test_instance_round_trip_and_status() -> None:
    start = order_request("c", ("apple", 1, 10))
    inst = SagaInstance(
        saga_id="s1",
        saga_type="order",
        state="CANCELLING_ORDER",
        start_type="shop.v1.CreateOrderRequest",
        start=start.SerializeToString(),
        replies=(("CREATE_ORDER", "shop.v1.OrderCreated", b"\x01\x02"),),
        history=(
            Step("PENDING", "PENDING", "(start)", "s1", 1000, "c0"),
            Step("PENDING", "ORDER_CREATED", "CREATE_ORDER", "e1", 1100, "c1"),
            Step("ORDER_CREATED", "CANCELLING_ORDER", "!RESERVE_STOCK_FAILURE", "e2", 1200, "c2"),
        ),
        pending=(
            PendingCommand(
                "c2", "order", "CancelOrder", "shop.v1.CancelOrderRequest", "x.y", b"\x00", "e2"
            ),
        ),
        started_ms=1000,
        updated_ms=1200,
    )
    again = SagaInstance.decode(inst.encode())
    assert again == inst
    assert again.seen("e1") and not again.seen("e3")
    status = again.to_status()
    assert status.state == saga_pb2.SAGA_STATE_COMPENSATING
    assert [s.compensation for s in status.steps] == [False, False, True]
    done = SagaInstance.decode(inst.encode())
    from dataclasses import replace

    failed = replace(done, state="FAILED", final=True)
    assert failed.to_status().state == saga_pb2.SAGA_STATE_COMPENSATED
    ok = replace(done, state="COMPLETED", final=True, succeeded=True, history=done.history[:2])
    assert ok.to_status().state == saga_pb2.SAGA_STATE_COMPLETED
    plain_fail = replace(done, state="FAILED", final=True, history=done.history[:2])
    assert plain_fail.to_status().state == saga_pb2.SAGA_STATE_FAILED


async def test_snapshot_reads_and_writes_ride_out_an_election() -> None:
    # During a leader election the KV answers 503 for a while: each operation is tried
    # again within the retry window instead of failing the caller.
    import nats.js.errors

    from meshkit.saga.snapshots import SnapshotStore

    class FlakyKv:
        def __init__(self) -> None:
            self.data: dict[str, bytes] = {}
            self.failures = 0

        def _maybe_fail(self) -> None:
            if self.failures < 2:
                self.failures += 1
                raise nats.js.errors.ServiceUnavailableError()

        async def put(self, key: str, value: bytes) -> None:
            self._maybe_fail()
            self.data[key] = value

        async def get(self, key: str) -> object:
            self._maybe_fail()
            if key not in self.data:
                raise nats.js.errors.KeyNotFoundError()
            return type("Entry", (), {"value": self.data[key]})()

        async def purge(self, key: str) -> None:
            self._maybe_fail()
            self.data.pop(key, None)

    class FakeNc:
        def jetstream(self) -> object:
            return object()

    store = SnapshotStore(FakeNc())  # type: ignore[arg-type]
    kv = FlakyKv()
    store._kv = kv
    snap = Snapshot("order", "o-1", 3, 42, 1700, 1, b"state")
    assert await store.get("order", "o-1") is None  # two 503s, then "not found"
    kv.failures = 0
    await store.put(snap)
    assert await store.get("order", "o-1") == snap
    kv.failures = 0
    await store.delete("order", "o-1")
    assert await store.get("order", "o-1") is None
