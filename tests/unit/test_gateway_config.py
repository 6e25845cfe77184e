"""gateway.yaml (the transcoder's sections and the edge's) read like a policy document:
the same YAML loader, one Policy built at load and shared, the policy validator's errors
(``file:line:col``, key path, value, what was expected, did-you-mean), one set of value
readers (sizes with units, durations)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from meshkit.config import Policy
from meshkit.errors import ConfigError
from meshkit.gateway.core.config import load_config
from meshkit.gateway.edge.profiles import load_edge_config
from meshkit.gateway.upstream import upstreams as upstreams_mod
from meshkit.gateway.upstream.upstreams import Upstream, UpstreamRegistry
from meshkit.resilience.fallback import FallbackTrigger

# `on:` is the fallback's trigger key (docs/policy.md); YAML 1.1 would read it as True.
FALLBACK_ON = """\
upstreams: {default: 127.0.0.1:50051}
policy:
  defaults:
    circuit_breaker: {}
    fallback: {on: [circuit_open]}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    return p


def _error(load: Any, p: Path) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load(p)
    return ei.value


@pytest.mark.parametrize("load", [load_config, load_edge_config])
def test_policy_section_is_built_at_load_and_on_stays_a_key(tmp_path: Path, load: Any) -> None:
    cfg = load(_write(tmp_path, FALLBACK_ON))
    assert isinstance(cfg.policy, Policy)
    fb = cfg.policy.for_method("/a.S/M").fallback
    assert fb is not None and fb.on == frozenset({FallbackTrigger.CIRCUIT_OPEN})


@pytest.mark.parametrize("load", [load_config, load_edge_config])
def test_bad_policy_stops_the_load_with_key_path_line_and_column(tmp_path: Path, load: Any) -> None:
    p = _write(tmp_path, "policy:\n  defaults:\n    retry: {max_attempts: four}\n")
    err = _error(load, p)
    assert err.path == "policy.defaults.retry.max_attempts"
    assert str(err) == (
        f'{p}:3:27: policy.defaults.retry.max_attempts: expected an integer >= 1, got "four"'
    )


@pytest.mark.parametrize("load", [load_config, load_edge_config])
def test_duplicate_keys_are_errors(tmp_path: Path, load: Any) -> None:
    p = _write(tmp_path, "gateway:\n  strict: true\n  strict: false\n")
    err = _error(load, p)
    assert str(err) == f"{p}:3:3: duplicate key 'strict'"


@pytest.mark.parametrize("load", [load_config, load_edge_config])
def test_yaml11_booleans_are_strings(tmp_path: Path, load: Any) -> None:
    # `strict: yes` is not silently true: booleans are true/false only.
    p = _write(tmp_path, "gateway:\n  strict: yes\n")
    assert str(_error(load, p)) == f'{p}:2:11: gateway.strict: expected true or false, got "yes"'
    p = _write(tmp_path, "edge:\n  metrics: off\n")
    assert str(_error(load_edge_config, p)) == (
        f'{p}:2:12: edge.metrics: expected true or false, got "off"'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "gateway:\n  stirct: true\n",
            "2:3: gateway.stirct: unknown key; did you mean 'strict'?",
        ),
        ("upstream: {}\n", "1:1: upstream: unknown key; did you mean 'upstreams'?"),
        (
            "edge:\n  profiles:\n    web: {prefx: /web}\n",
            "3:11: edge.profiles.web.prefx: unknown key; did you mean 'prefix'?",
        ),
        (
            "edge:\n  cache: {max_bytes: lots}\n",
            '2:22: edge.cache.max_bytes: expected a size in bytes like 65536, "64KiB" or '
            '"1MiB", got "lots"',
        ),
        (
            "gateway: {max_body_bytes: 4 MB please}\n",
            "1:27: gateway.max_body_bytes: expected a size in bytes",
        ),
        (
            "upstreams: {default: 'nowhere'}\n",
            "1:22: upstreams.default: expected HOST:PORT, got 'nowhere'",
        ),
    ],
)
def test_errors_name_file_line_column_key_value_and_a_suggestion(
    tmp_path: Path, text: str, message: str
) -> None:
    p = _write(tmp_path, text)
    load = load_edge_config if text.startswith("edge") else load_config
    assert str(_error(load, p)).startswith(f"{p}:{message}")


def test_sizes_take_the_policy_documents_units(tmp_path: Path) -> None:
    p = _write(tmp_path, "gateway: {max_body_bytes: 4MiB}\nedge: {cache: {max_bytes: 512KiB}}\n")
    assert load_config(p).options.max_body_bytes == 4 * 1024 * 1024
    edge = load_edge_config(p)
    assert edge.options.max_body_bytes == 4 * 1024 * 1024
    assert edge.cache_max_bytes == 512 * 1024
    p = _write(tmp_path, "gateway: {max_body_bytes: 1MB}\n")
    assert load_config(p).options.max_body_bytes == 1_000_000


def test_one_policy_shared_by_every_upstream_channel_on_every_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _write(
        tmp_path,
        "upstreams: {default: '127.0.0.1:1,127.0.0.1:2', a.S: 127.0.0.1:3}\n"
        + FALLBACK_ON.split("\n", 1)[1],
    )
    cfg = load_config(p)
    seen: list[Any] = []

    def fake_channel(target: str, policy: Any = None) -> Any:
        seen.append(policy)
        return object()

    monkeypatch.setattr(upstreams_mod, "make_channel", fake_channel)
    registry = UpstreamRegistry.from_specs(cfg.upstreams, policy=cfg.policy)

    async def use_all() -> None:
        for up in registry.upstreams.values():
            for _ in range(2):
                up.channel()

    asyncio.run(use_all())
    asyncio.run(use_all())  # a second event loop
    assert len(seen) == 6  # 3 targets x 2 loops
    assert all(s is cfg.policy for s in seen)


def test_reload_keeps_an_unchanged_policy_and_its_breakers(tmp_path: Path) -> None:
    p = _write(tmp_path, FALLBACK_ON)
    first = load_config(p)
    assert first.policy is not None
    again = load_config(p, previous=first)
    assert again.policy is first.policy
    p.write_text(FALLBACK_ON.replace("circuit_breaker: {}", "circuit_breaker: {minimum_calls: 5}"))
    changed = load_config(p, previous=first)
    assert changed.policy is not None and changed.policy is not first.policy
    # The edge does the same for the document's and each upstream's own policy.
    text = FALLBACK_ON + "edge:\n  upstreams:\n    own: {targets: [h:1], policy: {}}\n"
    p.write_text(text)
    e1 = load_edge_config(p)
    e2 = load_edge_config(p).carry_policies(e1)
    assert e2.policy is e1.policy
    assert e2.upstreams["own"].policy is e1.upstreams["own"].policy is not None


def test_reload_with_a_changed_policy_hands_on_the_registry(tmp_path: Path) -> None:
    """#16: the live state outlives the document, for the gateway's policy and for the
    edge's shared and per-upstream policies alike."""
    p = _write(tmp_path, FALLBACK_ON)
    first = load_config(p)
    assert first.policy is not None
    p.write_text(FALLBACK_ON + "  rules: [{match: a.S, timeout: 1s}]\n")
    changed = load_config(p, previous=first)
    assert changed.policy is not None and changed.policy is not first.policy
    assert changed.policy.registry is first.policy.registry
    edge = "edge:\n  upstreams:\n    own: {targets: [h:1], policy: {defaults: {timeout: %s}}}\n"
    p.write_text(FALLBACK_ON + edge % "1s")
    e1 = load_edge_config(p)
    p.write_text(FALLBACK_ON + "  rules: [{match: a.S, timeout: 1s}]\n" + edge % "2s")
    e2 = load_edge_config(p).carry_policies(e1)
    assert e1.policy is not None and e2.policy is not None and e2.policy is not e1.policy
    assert e2.policy.registry is e1.policy.registry
    own1, own2 = e1.upstreams["own"].policy, e2.upstreams["own"].policy
    assert own1 is not None and own2 is not None and own2 is not own1
    assert own2.registry is own1.registry is not e1.policy.registry


def test_upstream_list_is_used_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def fake_channel(target: str, policy: Any = None) -> Any:
        made.append(target)
        return target

    monkeypatch.setattr(upstreams_mod, "make_channel", fake_channel)
    up = Upstream("default", ["127.0.0.1:1", "127.0.0.1:2"])

    async def pick() -> list[Any]:
        return [up.channel() for _ in range(4)]

    assert asyncio.run(pick()) == ["127.0.0.1:1", "127.0.0.1:2"] * 2
    assert made == ["127.0.0.1:1", "127.0.0.1:2"]  # one channel per target and loop


def test_policy_warnings_come_once_with_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = _write(tmp_path, "policy:\n  defaults: {fallback: {on: [circuit_open]}}\n")
    with caplog.at_level(logging.WARNING, logger="meshkit.config"):
        load_config(p)
    warnings = [r.getMessage() for r in caplog.records if "circuit_open" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(str(p)), warnings


def test_policy_check_and_the_gateway_read_the_policy_alike(tmp_path: Path) -> None:
    """`meshkit policy check` on the policy section and the gateway's load agree: the
    same loader, so `on:` is the trigger key for both (it is valid, docs/policy.md)."""
    import subprocess
    import sys

    section = FALLBACK_ON.split("policy:\n", 1)[1]
    policy_file = tmp_path / "mesh.yaml"
    policy_file.write_text("\n".join(line[2:] for line in section.splitlines()) + "\n")
    checked = subprocess.run(
        [sys.executable, "-m", "meshkit.cli", "policy", "check", str(policy_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    gateway = load_config(_write(tmp_path, FALLBACK_ON)).policy
    assert gateway is not None
    method = "/a.S/M"
    assert gateway.for_method(method) == Policy.load(policy_file).for_method(method)


def test_a_new_event_loop_never_gets_a_closed_loops_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loop allocated at a closed loop's address has the same id(); channels are bound
    # to the loop that made them, so keying them by id() handed the new loop dead ones.
    made: list[object] = []

    def fake_channel(target: str, policy: Any = None) -> Any:
        made.append(object())
        return made[-1]

    monkeypatch.setattr(upstreams_mod, "make_channel", fake_channel)
    up = upstreams_mod.Upstream("default", ["127.0.0.1:1"])
    monkeypatch.setattr(upstreams_mod, "id", lambda _obj: 42, raising=False)  # every loop alike

    async def get() -> Any:
        return up.channel()

    first = asyncio.run(get())
    second = asyncio.run(get())
    assert first is not second and len(made) == 2
