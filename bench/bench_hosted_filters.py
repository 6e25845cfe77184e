"""nats-server's cost of serving a consumer whose filters mix saga subjects with an
event store's per-aggregate subjects, as the number of aggregates grows.

A participant of a :class:`~meshkit.saga.HostedStore` filters on its saga subjects
(literal: ``ev.<type>``) and on the store's subjects for the types it handles
(``st.*.*.<type>``: aggregate and id in between, the store's layout). This drains a
backlog of N aggregates' events (one per aggregate, one saga event beside each) through
one pull consumer per filter set and reports nats-server CPU per delivered message:

* ``literal``: two literal filters (what a participant of a copied store has);
* ``one wildcard``: the store's wildcard subject alone;
* ``mixed, aggregate first``: a literal filter and ``st.*.*.<type>`` (a hosted store's
  participant, the store's layout ``<prefix>.<aggregate>.<id>.<type>``);
* ``mixed, type first``: a literal filter and ``st.<type>.>`` over subjects laid out
  ``<prefix>.<type>.<aggregate>.<id>`` (the layout that would avoid the cost).

Found in #15 (stop 15): the third filter set costs the server per message in
proportion to the aggregates in the stream (it walks every aggregate's subject to find
the next block with a match), the others do not. Writes
``bench/results/hosted_filters.json``.

    .venv/bin/python -m bench.bench_hosted_filters [--aggregates 1000 4000]
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

RESULTS = ROOT / "bench" / "results" / "hosted_filters.json"
CREATED, CANCELLED, RESERVED = (
    "shop.v1.OrderCreated",
    "shop.v1.OrderCancelled",
    "shop.v1.StockReserved",
)

# name -> (layout of the store's subjects, the consumer's filters)
CASES: dict[str, tuple[str, list[str]]] = {
    "literal": ("aggregate first", [f"ev.{RESERVED}", f"ev.{CANCELLED}"]),
    "one wildcard": ("aggregate first", [f"st.*.*.{CREATED}"]),
    "mixed, aggregate first": ("aggregate first", [f"ev.{RESERVED}", f"st.*.*.{CANCELLED}"]),
    "mixed, type first": ("type first", [f"ev.{RESERVED}", f"st.{CANCELLED}.>"]),
}


def _store_subject(layout: str, aggregate_id: str) -> str:
    if layout == "aggregate first":
        return f"st.order.{aggregate_id}.{CREATED}"
    return f"st.{CREATED}.order.{aggregate_id}"


async def one_case(name: str, aggregates: int) -> dict[str, Any]:
    import nats
    from nats.js import api

    from meshkit.nats import NatsServer

    layout, filters = CASES[name]
    async with NatsServer() as server:
        nc = await nats.connect(server.url, name="bench-hosted-filters")
        js = nc.jetstream()
        await js.add_stream(name="S", subjects=["ev.>", "st.>"])
        pending = []
        for _ in range(aggregates):
            pending.append(js.publish(_store_subject(layout, uuid.uuid4().hex), b"s"))
            pending.append(js.publish(f"ev.{RESERVED}", b"e"))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        config = api.ConsumerConfig(
            durable_name="c",
            filter_subjects=filters,
            ack_policy=api.AckPolicy.NONE,
            max_ack_pending=-1,
        )
        await js.add_consumer("S", config)
        sub = await js.pull_subscribe_bind("c", stream="S")
        before = _cpu_seconds(server.pid or 0)
        delivered = 0
        while delivered < aggregates:
            delivered += len(await sub.fetch(500, timeout=30))
        spent = _cpu_seconds(server.pid or 0) - before
        await nc.close()
    per_msg = round(spent / delivered * 1e6, 1)
    print(f"{aggregates:7d} aggregates  {name:24s} {per_msg:9.1f} us per message", flush=True)
    return {
        "aggregates": aggregates,
        "case": name,
        "layout": layout,
        "filters": filters,
        "delivered": delivered,
        "server_cpu_us_per_message": per_msg,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [await one_case(name, n) for n in args.aggregates for name in CASES]
    return {
        "benchmark": "hosted_filters",
        "description": (
            "nats-server CPU per delivered message, draining a backlog through one pull "
            "consumer per filter set, by the number of per-aggregate subjects in the stream"
        ),
        "note": (
            "CPU is read from /proc at 10 ms resolution: figures under ~10 us per message "
            "are at the floor of what a few thousand messages can show"
        ),
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aggregates", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    write(args.out, asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
