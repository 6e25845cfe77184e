"""A stream created a moment ago by another process: on a cluster, its info can say
"stream not found" (10059) until its Raft group has a leader. Seen when the shop's
eleven processes start at once on R3: one of them died in ``EventStore.ensure``.
Every ``ensure`` that knows the stream exists retries that answer; without NATS."""

from __future__ import annotations

from typing import Any

import nats.js.errors
import pytest
from nats.js import api

from meshkit.saga import EventBus, StreamSpec, cluster

pytestmark = pytest.mark.unit


def _not_found() -> nats.js.errors.NotFoundError:
    return nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found")


class FakeJS:
    """Says "not found" to the first lookups, then that the stream exists with ``config``;
    a create is refused because the stream exists (another process made it)."""

    def __init__(self, config: api.StreamConfig, misses: int) -> None:
        self.config = config
        self.misses = misses
        self.lookups = 0
        self.creates = 0
        self.updates: list[api.StreamConfig] = []
        self.opened = 0

    async def stream_info(self, name: str, **_: Any) -> api.StreamInfo:
        self.lookups += 1
        if self.lookups <= self.misses:
            raise _not_found()
        return api.StreamInfo(config=self.config, state=api.StreamState(0, 0, 0, 0, 0, 0))

    async def add_stream(self, config: api.StreamConfig) -> None:
        self.creates += 1
        raise nats.js.errors.BadRequestError(
            code=400, err_code=cluster.STREAM_NAME_IN_USE, description="stream name already in use"
        )

    async def update_stream(self, config: api.StreamConfig) -> None:
        self.updates.append(config)

    async def create_key_value(self, config: Any) -> None:
        await self.add_stream(api.StreamConfig(name=f"KV_{config.bucket}"))

    async def key_value(self, bucket: str) -> str:
        self.opened += 1
        try:
            await self.stream_info(f"KV_{bucket}")
        except nats.js.errors.NotFoundError:
            raise nats.js.errors.BucketNotFoundError from None
        return f"kv {bucket}"


class FakeNC:
    def __init__(self, js: FakeJS) -> None:
        self.js = js

    def jetstream(self) -> FakeJS:
        return self.js

    def new_inbox(self) -> str:
        return "_INBOX.fake"


async def test_stream_info_existing_retries_not_found() -> None:
    js = FakeJS(api.StreamConfig(name="S"), misses=3)
    info = await cluster.stream_info_existing(js, "S", window=5)  # type: ignore[arg-type]
    assert info.config.name == "S" and js.lookups == 4
    gone = FakeJS(api.StreamConfig(name="S"), misses=10**6)
    with pytest.raises(cluster.JetStreamUnavailable, match="stream not found"):
        await cluster.stream_info_existing(gone, "S", window=0.2)  # type: ignore[arg-type]


async def test_ensure_stream_created_elsewhere_rides_out_not_found() -> None:
    spec = StreamSpec(name="SHOP_X", prefix="shopx", replicas=3)
    # Missing at our lookup; our create refused (someone made it); then "not found"
    # once more (no leader yet), then there with the spec's config.
    js = FakeJS(spec.to_config(), misses=2)
    bus = EventBus(FakeNC(js))  # type: ignore[arg-type]
    await bus.ensure_stream(spec)
    assert js.creates == 1 and js.lookups == 3 and js.updates == []


async def test_a_bucket_created_elsewhere_opens_after_not_found() -> None:
    js = FakeJS(api.StreamConfig(name="KV_b", max_msgs_per_subject=1), misses=3)
    kv = await cluster.ensure_key_value(js, "b", replicas_=3)  # type: ignore[arg-type]
    assert kv == "kv b" and js.creates == 1 and js.opened == 3
