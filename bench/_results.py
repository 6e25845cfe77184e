"""Writing a benchmark's results document (``bench/results/<name>.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write(out: Path, result: dict[str, Any]) -> None:
    """``result`` as indented JSON at ``out`` (its directory made when missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
