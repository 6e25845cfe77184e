"""The shop across a SIGKILL of the SHOP stream's leader, repeated (issue #17).

Each run starts a fresh 3-node JetStream cluster on loopback, the shop with two
processes per saga participant on R3 streams and buckets (``MESHKIT_NATS_REPLICAS=3``
and the server list, nothing else), places orders at a steady rate, kills the node
leading ``SHOP`` a second into them, restarts it once those sagas are final, and
places a last batch (``examples/shop/chaos.py``). Per run: sagas started, completed,
compensated, lost or left pending, wrong final states, invariant problems,
duplicated effects, and the stall (the longest time after the kill in which no
saga finished). Writes bench/results/chaos_cluster.json.

    .venv/bin/python -m bench.chaos_cluster [--runs 20] [--during 150] [--rate 25]

Not part of ``make bench`` (a run takes ~30-40 s on 2 cores); exits 1 when any run
lost a saga, broke an invariant or did something twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def one_run(args: argparse.Namespace, index: int) -> dict[str, Any]:
    from examples.shop.chaos import leader_kill_run
    from meshkit.nats import NatsCluster

    with tempfile.TemporaryDirectory(prefix="meshkit-chaos-") as tmp:
        async with NatsCluster(size=3, store_dir=Path(tmp) / "nats", start_timeout=60) as nats:
            res = await leader_kill_run(
                nats,
                Path(tmp) / "shop",
                before=args.before,
                during=args.during,
                after=args.after,
                rate=args.rate,
                within=args.within,
            )
        if not res.ok and args.keep:
            keep = Path(args.keep) / f"run-{index}"
            import shutil

            shutil.copytree(Path(tmp) / "shop", keep, dirs_exist_ok=True)
            print(f"  kept the shop's databases and logs in {keep}", flush=True)
    print(f"run {index}: {'OK' if res.ok else 'FAILED'}: {res.summary()}", flush=True)
    print(f"    phases: {res.phases}", flush=True)
    for what in (res.pending, list(res.wrong.items()), res.problems, res.duplicates):
        for item in what[:10]:
            print(f"    {item}", flush=True)
    doc = res.to_json()
    doc["run"] = index
    return doc


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from examples.shop._gen import ensure_generated

    ensure_generated()
    os.environ["MESHKIT_NATS_REPLICAS"] = "3"  # this process's tracker bucket too
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    for i in range(1, args.runs + 1):
        runs.append(await one_run(args, i))
    stalls = [r["stall"] for r in runs]
    return {
        "bench": "chaos_cluster",
        "what": "shop saga, 2 instances per participant, R3, SIGKILL of the SHOP leader",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "before": args.before,
            "during": args.during,
            "after": args.after,
            "rate_per_s": args.rate,
        },
        "summary": {
            "runs": len(runs),
            "ok": sum(1 for r in runs if r["ok"]),
            "sagas": sum(r["started"] for r in runs),
            "lost_or_pending": sum(r["lost"] for r in runs),
            "wrong": sum(len(r["wrong"]) for r in runs),
            "stall_s": {
                "min": round(min(stalls), 2),
                "median": round(statistics.median(stalls), 2),
                "max": round(max(stalls), 2),
            },
        },
        "runs": runs,
        "bench_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--before", type=int, default=30, help="orders before the kill phase")
    parser.add_argument("--during", type=int, default=150, help="orders in the kill phase")
    parser.add_argument("--after", type=int, default=20, help="orders after the restart")
    parser.add_argument("--rate", type=float, default=25.0, help="orders per second")
    parser.add_argument("--within", type=float, default=90.0, help="bound on each wait (s)")
    parser.add_argument("--keep", default="", help="copy a failed run's shop data here")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos_cluster.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    res = asyncio.run(main(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"]))
    print(f"wrote {out} ({res['bench_seconds']}s)")
    bad = res["summary"]["runs"] - res["summary"]["ok"]
    sys.exit(1 if bad else 0)
