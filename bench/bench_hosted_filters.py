"""nats-server's cost of serving a consumer whose filters mix saga subjects with an
event store's per-aggregate subjects, as the aggregates grow, by the store's layout.

A participant of a :class:`~meshkit.saga.HostedStore` filters on its saga subjects
(literal: ``ev.<type>``) and on the store's subjects for the types it handles. Each
aggregate here has three events in the store (created, paid, completed) and two saga
events beside them; a consumer that handles ``ev.shop.v1.PaymentFailed`` and the
store's OrderCreated drains a backlog of ``--backlog`` sagas, either from the stream's
start or after ``--history`` sagas it had already passed, and this reports nats-server
CPU per delivered message:

* ``literal``: the events on literal subjects (what a participant of a copied store
  filters on);
* ``one wildcard``: the store's filter alone (today's layout);
* ``mixed, aggregate first``: literal plus ``st.*.*.<type>`` over the layout before
  #15's stop 16, ``<prefix>.<aggregate>.<id>.<type>``;
* ``mixed, type first``: literal plus ``st.<type token>.*.*`` over the store's layout,
  ``<prefix>.<type token>.<aggregate>.<id>``.

Found in #15 (stop 15): the mixed filters cost the server per message in proportion to
the subjects their wildcards walk (nats-server matches a consumer's several filters
against the stream's subject tree), the others do not; type first walks one type's
subjects instead of every aggregate's. Writes ``bench/results/hosted_filters.json``.

    .venv/bin/python -m bench.bench_hosted_filters [--history 0 30000] [--backlog 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write  # noqa: E402
from bench.bench_saga import _cpu_seconds  # noqa: E402
from meshkit.saga.eventstore.events import type_filter, type_token  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hosted_filters.json"
STORED = ("shop.v1.OrderCreated", "shop.v1.PaymentCompleted", "shop.v1.OrderCompleted")
SAGA = ("shop.v1.StockReserved", "shop.v1.ShipmentScheduled")
HANDLED_SAGA = "ev.shop.v1.PaymentFailed"  # the participant's saga type: none in the backlog
CREATED = STORED[0]


def _aggregate_first(event_type: str, aggregate_id: str) -> str:
    return f"st.order.{aggregate_id}.{event_type}"


def _type_first(event_type: str, aggregate_id: str) -> str:
    return f"st.{type_token(event_type)}.order.{aggregate_id}"


def _literal(event_type: str, aggregate_id: str) -> str:
    return f"ev.{event_type}"


# name -> (where a stored event goes, the consumer's filters)
CASES: dict[str, tuple[Any, list[str]]] = {
    "literal": (_literal, [HANDLED_SAGA, f"ev.{CREATED}"]),
    "one wildcard": (_type_first, [type_filter("st", CREATED)]),
    "mixed, aggregate first": (_aggregate_first, [HANDLED_SAGA, f"st.*.*.{CREATED}"]),
    "mixed, type first": (_type_first, [HANDLED_SAGA, type_filter("st", CREATED)]),
}


async def _fill(js: Any, stored_on: Any, sagas: int) -> None:
    pending = []
    for _ in range(sagas):
        aggregate_id = uuid.uuid4().hex
        for event_type in STORED:
            pending.append(js.publish(stored_on(event_type, aggregate_id), b"s" * 200))
        for event_type in SAGA:
            pending.append(js.publish(f"ev.{event_type}", b"e" * 200))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def one_case(name: str, history: int, backlog: int) -> dict[str, Any]:
    import nats
    from nats.js import api

    from meshkit.nats import NatsServer

    stored_on, filters = CASES[name]
    async with NatsServer() as server:
        nc = await nats.connect(server.url, name="bench-hosted-filters")
        js = nc.jetstream()
        await js.add_stream(name="S", subjects=["ev.>", "st.>"])
        await _fill(js, stored_on, history)
        start = (await js.stream_info("S")).state.last_seq + 1
        config = api.ConsumerConfig(
            durable_name="c",
            filter_subjects=filters,
            ack_policy=api.AckPolicy.NONE,
            max_ack_pending=-1,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
        )
        await js.add_consumer("S", config)
        await _fill(js, stored_on, backlog)
        sub = await js.pull_subscribe_bind("c", stream="S")
        before = _cpu_seconds(server.pid or 0)
        delivered = 0
        while delivered < backlog:
            delivered += len(await sub.fetch(100, timeout=30))
        spent = _cpu_seconds(server.pid or 0) - before
        await nc.close()
    per_msg = round(spent / delivered * 1e6, 1)
    print(
        f"history {history:6d}  backlog {backlog:5d}  {name:24s} {per_msg:9.1f} us per message",
        flush=True,
    )
    return {
        "history_sagas": history,
        "backlog_sagas": backlog,
        "aggregates": history + backlog,
        "case": name,
        "filters": filters,
        "delivered": delivered,
        "server_cpu_us_per_message": per_msg,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [
        await one_case(name, history, args.backlog) for history in args.history for name in CASES
    ]
    return {
        "benchmark": "hosted_filters",
        "description": (
            "nats-server CPU per delivered message, draining a backlog of sagas through "
            "one pull consumer per filter set, from the stream's start or after a history "
            "of sagas, by the store's subject layout"
        ),
        "note": (
            "CPU is read from /proc at 10 ms resolution: figures under ~10 us per message "
            "are at the floor of what a few thousand messages can show"
        ),
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, nargs="+", default=[0, 5000, 30000])
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    write(args.out, asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
