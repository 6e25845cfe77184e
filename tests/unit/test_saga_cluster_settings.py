"""The cluster settings (replicas default, retry window) and the retry loop, without NATS."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
import pytest

from meshkit.errors import ConfigError
from meshkit.saga import StreamSpec, cluster
from meshkit.saga.eventstore import EventStoreConfig
from meshkit.saga.orchestrator import OrchestratorConfig
from meshkit.saga.snapshots import SnapshotStore

pytestmark = pytest.mark.unit


def test_replicas_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHKIT_NATS_REPLICAS", raising=False)
    assert cluster.default_replicas() == 1
    spec = StreamSpec(name="S", prefix="s")
    assert spec.replicas is None
    assert spec.to_config().num_replicas == 1
    monkeypatch.setenv("MESHKIT_NATS_REPLICAS", "3")
    # Read when the spec becomes a server config, not when it was declared.
    assert spec.to_config().num_replicas == 3
    assert StreamSpec(name="S", prefix="s", replicas=1).to_config().num_replicas == 1
    assert cluster.replicas(None) == 3 and cluster.replicas(2) == 2


@pytest.mark.parametrize("raw", ["0", "6", "three", "3.0", "-1"])
def test_a_bad_replicas_default_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("MESHKIT_NATS_REPLICAS", raw)
    with pytest.raises(
        ConfigError, match=r"MESHKIT_NATS_REPLICAS: .*expected an integer from 1 to 5"
    ):
        cluster.default_replicas()


def test_explicit_replicas_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ConfigError, match=r"stream\.replicas"):
        StreamSpec(name="S", prefix="s", replicas=6)
    with pytest.raises(ConfigError, match=r"eventstore\.replicas"):
        EventStoreConfig(replicas=0)
    with pytest.raises(ConfigError, match=r"orchestrator\.replicas"):
        OrchestratorConfig(replicas=9)
    with pytest.raises(ConfigError, match=r"snapshots\.replicas"):
        SnapshotStore(object(), replicas=True)  # type: ignore[arg-type]


def test_replicas_only_go_up(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHKIT_NATS_REPLICAS", raising=False)
    assert cluster.replicas_target("stream S", 3, None) is None
    assert cluster.replicas_target("stream S", 1, 3) == 3
    assert cluster.replicas_target("stream S", 3, 1) is None
    assert "stream S: replicas is 3 on the server, the spec wants 1; left at 3" in caplog.text
    monkeypatch.setenv("MESHKIT_NATS_REPLICAS", "3")
    assert cluster.replicas_target("stream S", 1, None) == 3


def test_retry_window_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHKIT_NATS_RETRY_WINDOW", raising=False)
    assert cluster.retry_window() == cluster.DEFAULT_RETRY_WINDOW >= 10
    monkeypatch.setenv("MESHKIT_NATS_RETRY_WINDOW", "20s")
    assert cluster.retry_window() == 20.0
    monkeypatch.setenv("MESHKIT_NATS_RETRY_WINDOW", "soon")
    with pytest.raises(ConfigError, match="MESHKIT_NATS_RETRY_WINDOW"):
        cluster.retry_window()


async def test_retrying_rides_out_transient_errors_then_says_what_failed() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats.errors.NoRespondersError
        return "ok"

    assert await cluster.retrying("publishing", flaky, window=5) == "ok"
    assert calls == 3

    async def down() -> None:
        raise nats.js.errors.ServiceUnavailableError(
            code=503, err_code=10008, description="JetStream system temporarily unavailable"
        )

    with pytest.raises(cluster.JetStreamUnavailable) as info:
        await cluster.retrying("looking up stream S", down, window=0.2)
    text = str(info.value)
    assert text.startswith("looking up stream S: JetStream did not answer within 0.2s")
    assert "JetStream system temporarily unavailable (code 503, err_code 10008)" in text
    assert isinstance(info.value, TimeoutError)

    async def refused() -> None:
        raise nats.js.errors.BadRequestError(code=400, err_code=10005, description="no peers")

    with pytest.raises(nats.js.errors.BadRequestError):  # not transient: raised at once
        await asyncio.wait_for(cluster.retrying("x", refused, window=5), 1)
