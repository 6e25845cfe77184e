"""Run every benchmark (``make bench``) or the ones named: ``python -m bench gateway saga``.

Each ``bench/bench_<name>.py`` runs meshkit and its peer (bare grpcio, Envoy, raw
JetStream) in the same run, prints medians and ratios, and writes
``bench/results/<name>.json``. Machines are shared and noisy: read the ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ratios(data: object, prefix: str = "") -> dict[str, object]:
    """Every key containing 'ratio' anywhere in a results document, flattened."""
    found: dict[str, object] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if "ratio" in str(key).lower() and not isinstance(value, (dict, list)):
                found[path] = value
            else:
                found.update(_ratios(value, path))
    return found


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    failed: list[str] = []
    for name in names:
        print(f"\n=== bench {name}", flush=True)
        started = time.monotonic()
        # A separate interpreter each: benchmarks must not share warm caches or threads.
        code = subprocess.call([sys.executable, "-m", f"bench.bench_{name}"], cwd=HERE.parent)
        print(f"=== bench {name}: exit {code} in {time.monotonic() - started:.0f}s", flush=True)
        if code:
            failed.append(name)
    print("\nratios (meshkit / peer), from bench/results/*.json:")
    for path in sorted((HERE / "results").glob("*.json")):
        try:
            ratios = _ratios(json.loads(path.read_text()))
        except ValueError:
            continue
        for key, value in ratios.items():
            print(f"  {path.stem:12} {key:50} {value}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
