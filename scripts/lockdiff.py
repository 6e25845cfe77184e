"""Print the installed distributions whose versions differ from uv.lock.

`make test-latest` runs it in its throwaway venv, so the log of a failing run starts
with what moved since the lock.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "uv.lock"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def main() -> int:
    locked = {
        _canonical(p["name"]): p["version"]
        for p in tomllib.loads(LOCK.read_text())["package"]
        if "version" in p
    }
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    moved = sorted(
        (name, locked[name], version)
        for name, version in installed.items()
        if name in locked and locked[name] != version and name != "meshkit"
    )
    if not moved:
        print("lockdiff: every installed package is at its locked version")
        return 0
    print(f"lockdiff: {len(moved)} packages newer (or older) than uv.lock:")
    width = max(len(name) for name, _, _ in moved)
    for name, old, new in moved:
        print(f"  {name:<{width}}  {old} -> {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
