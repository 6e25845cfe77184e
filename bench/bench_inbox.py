"""What the inbox's exactly-once record costs per event, against the same work without it.

A participant with :class:`~meshkit.saga.SqliteInbox` commits, with each event's
effect, a record of it (its key and its outputs, so a redelivery after a crash
republishes them instead of running the handler again). The hand-written peer of
``bench_saga`` has no such record: it relies on its handlers being idempotent. This
benchmark isolates that difference from NATS and processes: the shop's payment
handler (``examples/shop/payment.py``'s ``charge``, same schema, WAL and
``synchronous=NORMAL`` as the shop's ``Store``) runs for the same events

* **inbox**: through ``SqliteInbox.run_once``, ``batch`` events handled concurrently
  (so they share one transaction, as under load);
* **peer**: the same ``charge`` calls in one plain ``BEGIN IMMEDIATE ... COMMIT``
  per ``batch`` events, as ``bench/_saga_peer.py`` does.

Rounds alternate which side goes first; figures are CPU microseconds per event
(process time), medians over rounds, and the ratio inbox / peer. Writes
``bench/results/inbox.json``.

    .venv/bin/python -m bench.bench_inbox [--events 6000] [--rounds 5] [--batches 1,10,64]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench._results import write
from examples.shop.gen.shop.v1 import common_pb2
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.payment import SCHEMA, charge, charge_outcome
from meshkit.saga import SqliteInbox
from meshkit.saga.envelope import derive_event_id, type_name
from meshkit.saga.inbox import Outbound

RESULTS = Path(__file__).resolve().parent / "results" / "inbox.json"


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


def _events(n: int) -> list[tuple[str, ev.StockReserved]]:
    return [
        (
            uuid.uuid4().hex,
            ev.StockReserved(
                order_id=uuid.uuid4().hex,
                customer_id="c-1",
                total=common_pb2.Money(currency="EUR", amount_minor=1999),
            ),
        )
        for _ in range(n)
    ]


def _outputs(event_id: str, e: ev.StockReserved, conn: sqlite3.Connection) -> list[Outbound]:
    payment = charge(conn, e.order_id, e.customer_id, e.total, f"order/{e.order_id}")
    out = charge_outcome(payment, e.customer_id)
    return [
        Outbound(type_name(out), derive_event_id(event_id, "charge", 0), out.SerializeToString())
    ]


async def _inbox_side(path: Path, events: list[tuple[str, Any]], batch: int) -> float:
    conn = _connect(path)
    inbox = SqliteInbox(conn, max_batch=batch)

    def work_for(event_id: str, e: Any) -> Any:
        async def work(tx: sqlite3.Connection) -> list[Outbound]:
            return _outputs(event_id, e, tx)

        return work

    started = time.process_time()
    for at in range(0, len(events), batch):
        chunk = events[at : at + batch]
        await asyncio.gather(
            *(inbox.run_once(f"payment/{eid}", work_for(eid, e)) for eid, e in chunk)
        )
    spent = time.process_time() - started
    conn.close()
    return spent / len(events) * 1e6


async def _peer_side(path: Path, events: list[tuple[str, Any]], batch: int) -> float:
    conn = _connect(path)
    started = time.process_time()
    for at in range(0, len(events), batch):
        conn.execute("BEGIN IMMEDIATE")
        out: list[Outbound] = []
        for eid, e in events[at : at + batch]:
            out.extend(_outputs(eid, e, conn))
        conn.execute("COMMIT")
        await asyncio.sleep(0)  # one loop turn per batch, as the inbox side takes
    spent = time.process_time() - started
    conn.close()
    return spent / len(events) * 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshkit-bench-inbox-") as tmp:
        for batch in batches:
            inbox_us: list[float] = []
            peer_us: list[float] = []
            for r in range(args.rounds):
                order = ("inbox", "peer") if r % 2 == 0 else ("peer", "inbox")
                for side in order:
                    path = Path(tmp) / f"{side}-{batch}-{r}.sqlite"
                    events = _events(args.events)
                    if side == "inbox":
                        inbox_us.append(await _inbox_side(path, events, batch))
                    else:
                        peer_us.append(await _peer_side(path, events, batch))
            ratios = [i / p for i, p in zip(inbox_us, peer_us, strict=True)]
            row = {
                "inbox_cpu_us_per_event": round(statistics.median(inbox_us), 1),
                "peer_cpu_us_per_event": round(statistics.median(peer_us), 1),
                "record_cost_us_per_event": round(
                    statistics.median(i - p for i, p in zip(inbox_us, peer_us, strict=True)), 1
                ),
                "cpu_ratio": round(statistics.median(ratios), 3),
            }
            results[f"batch_{batch}"] = row
            print(
                f"batch {batch:3d}: inbox {row['inbox_cpu_us_per_event']:6.1f} us/event, "
                f"peer {row['peer_cpu_us_per_event']:6.1f} us/event, record "
                f"+{row['record_cost_us_per_event']:.1f} us (ratio {row['cpu_ratio']})",
                flush=True,
            )
    return {
        "benchmark": "inbox",
        "description": "the shop's payment handler through SqliteInbox (effect + record in "
        "one transaction per batch) vs the same handler in plain transactions of the same "
        "size (bench/_saga_peer.py's way); CPU per event, process time",
        "events_per_round": args.events,
        "rounds": args.rounds,
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=6000, help="events per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument(
        "--batches", default="1,10,64", help="events per transaction, comma-separated"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    write(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
