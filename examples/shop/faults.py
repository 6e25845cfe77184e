"""Fault hooks for the fault-injection tests, switched on by environment variables.

``SHOP_HANDLER_DELAY=<seconds>``: every handler prints ``HANDLING <event id>`` and
sleeps that long in the middle of its transaction (a test kills the process then).
``SHOP_CRASH_AFTER_COMMIT=<file>``: if the file exists, delete it and exit at once
after the next handler's transaction commits, before its outputs are published
and its input is acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any


@functools.cache
def _handler_delay() -> float:
    # Read once: mid_handler runs for every event.
    from examples.shop.flow import env_float

    return env_float("SHOP_HANDLER_DELAY", 0.0)


async def mid_handler(ctx: Any) -> None:
    delay = _handler_delay()
    if delay > 0:
        print(f"HANDLING {ctx.event_id} {ctx.envelope.event_type}", flush=True)
        await asyncio.sleep(delay)


def after_commit_hook() -> Callable[[Any], Awaitable[None]] | None:
    path = os.environ.get("SHOP_CRASH_AFTER_COMMIT")
    if not path:
        return None

    async def hook(env: Any) -> None:
        try:
            os.unlink(path)  # only the first commit after the file appears crashes
        except FileNotFoundError:
            return
        print(f"CRASHING after commit of {env.event_id}", flush=True)
        os._exit(137)

    return hook
