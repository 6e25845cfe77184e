"""Make sure the shop's generated protobuf modules exist (``examples.shop.gen``).

``make proto`` / ``make setup`` generate them; the demo, tests and bench call
:func:`ensure_generated` so a fresh checkout works without that step.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
DESCRIPTOR_SET = REPO_ROOT / "examples" / "shop" / "gen" / "shop.binpb"


def ensure_generated() -> Path:
    """Generate ``examples/shop/gen`` (and ``build/shop.binpb``) when missing or stale."""
    from meshkit.codegen import generate

    generate(
        PROTO_ROOT,
        REPO_ROOT,
        package="examples.shop.gen",
        descriptor_set=DESCRIPTOR_SET,
        only=["shop"],
    )
    return DESCRIPTOR_SET
