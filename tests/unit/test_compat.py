"""meshkit._compat: private internals only behind a version gate, public fallbacks.

- Under the locked versions (uv.lock) every fast path is on; a lock that moves past a
  gate fails here, naming the module, the version and the gate.
- Under other versions (``make test-latest``) the gate decides, and outside it every
  fast path is off (the public fallbacks then serve; the integration tests in
  tests/integration/test_compat_fallbacks.py run both ways).
- ``MESHKIT_COMPAT=off`` turns every fast path off.
- No module outside meshkit/_compat touches grpcio's or nats-py's private names.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import meshkit._compat
from meshkit._compat import grpcio as grpcio_compat
from meshkit._compat import nats as nats_compat

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "uv.lock"

# (module, distribution, name of its gate constant)
MODULES = [
    (grpcio_compat, "grpcio", "TESTED_GRPCIO"),
    (nats_compat, "nats-py", "TESTED_NATS_PY"),
]


def _locked(distribution: str) -> str:
    if not LOCK.exists():
        pytest.skip(f"{LOCK} does not exist yet: no locked versions to check the gates against")
    data = tomllib.loads(LOCK.read_text())
    for package in data.get("package", []):
        if package.get("name") == distribution:
            return str(package["version"])
    pytest.fail(f"{LOCK.name} locks no {distribution}")


def _path(module: ModuleType) -> str:
    return "meshkit/_compat/" + module.__name__.rsplit(".", 1)[-1] + ".py"


def _gate(module: ModuleType) -> str:
    return " or ".join(f"{prefix}x" for prefix in module.TESTED)


@pytest.mark.parametrize(("module", "distribution", "constant"), MODULES)
def test_the_locked_version_runs_every_fast_path(
    module: ModuleType, distribution: str, constant: str
) -> None:
    locked = _locked(distribution)
    installed: str = module.INSTALLED
    if not meshkit._compat.ENABLED:
        assert not any(module.FAST_PATHS.values()), module.describe()
        pytest.skip("MESHKIT_COMPAT=off: every fast path is off by request")
    if installed == locked:
        off = [name for name, on in module.FAST_PATHS.items() if not on]
        assert not off, "\n".join(
            f"{_path(module)}: fast path {name!r} is off for {distribution} {installed} "
            f"(gate {_gate(module)}); re-test the private path against {installed} and "
            f"widen {constant}, or accept the slower public path by removing it"
            for name in off
        )
    else:
        # The versions moved (a run against the newest releases): no failure for that,
        # but outside the gate nothing private may run.
        if not installed.startswith(module.TESTED):
            assert not any(module.FAST_PATHS.values()), module.describe()


@pytest.mark.parametrize(("module", "distribution", "constant"), MODULES)
def test_each_module_reports_its_gate_and_version(
    module: ModuleType, distribution: str, constant: str
) -> None:
    assert getattr(module, constant) == module.TESTED
    assert meshkit._compat.installed_version(distribution) == module.INSTALLED
    assert module.active() == module.FAST_PATHS and module.active() is not module.FAST_PATHS
    line = module.describe()
    assert _path(module) in line and module.INSTALLED in line and _gate(module) in line
    for name in module.FAST_PATHS:
        assert name in line


def test_the_gate_is_a_version_prefix_and_honours_the_kill_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(meshkit._compat, "ENABLED", True)
    assert meshkit._compat.gate_open("1.85.4", ("1.85.",))
    assert not meshkit._compat.gate_open("1.850.0", ("1.85.",))
    assert not meshkit._compat.gate_open("1.86.0", ("1.85.",))
    monkeypatch.setattr(meshkit._compat, "ENABLED", False)
    assert not meshkit._compat.gate_open("1.85.4", ("1.85.",))


def test_the_kill_switch_turns_every_fast_path_off() -> None:
    code = (
        "import json, nats.aio.client as n\n"
        "from meshkit._compat import grpcio, nats\n"
        "from meshkit.saga import _client\n"
        "print(json.dumps({'grpcio': grpcio.FAST_PATHS, 'nats': nats.FAST_PATHS,"
        " 'plain_client': _client.Client is n.Client}))\n"
    )
    env = {**os.environ, "MESHKIT_COMPAT": "off"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got["grpcio"]) == set(grpcio_compat.FAST_PATHS)
    assert set(got["nats"]) == set(nats_compat.FAST_PATHS)
    assert not any(got["grpcio"].values()) and not any(got["nats"].values())
    assert got["plain_client"]  # the saga bus connects with nats-py's own client


def test_the_bus_client_is_nats_py_s_own_when_the_fast_paths_are_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nats.aio.client import Client as NatsClient

    from meshkit.saga._client import encode_headers, parse_header_lines

    monkeypatch.setitem(nats_compat.FAST_PATHS, "publish", False)
    monkeypatch.setitem(nats_compat.FAST_PATHS, "parse_headers", False)
    monkeypatch.setitem(nats_compat.FAST_PATHS, "direct_dispatch", False)
    plain = nats_compat.client_class(encode_headers, parse_header_lines)
    assert plain is NatsClient
    # Nothing is dispatched directly on nats-py's own client: callbacks get everything.
    assert not nats_compat.dispatch_directly(plain(), object(), lambda msg: None)


def test_no_sync_future_invoker_when_its_fast_path_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(grpcio_compat.FAST_PATHS, "sync_future", False)

    class Owner:
        _thunk = staticmethod(lambda method: None)

    self = Owner()

    def continuation(details: Any, request: Any) -> Any:
        return self  # a closure over ``self``, as grpcio's continuation is

    assert grpcio_compat.sync_future_invoker(continuation) is None


def test_future_calls_are_told_only_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    class MultiCallable:
        def future(self) -> Any:
            def continuation(details: Any, request: Any) -> None: ...

            return continuation

        def _with_call(self) -> Any:
            def continuation(details: Any, request: Any) -> None: ...

            return continuation

    mc = MultiCallable()
    if grpcio_compat.FAST_PATHS["sync_future"]:
        assert grpcio_compat.future_call(mc.future())
        assert not grpcio_compat.future_call(mc._with_call())
    monkeypatch.setitem(grpcio_compat.FAST_PATHS, "sync_future", False)
    assert not grpcio_compat.future_call(mc.future())


async def test_unary_calls_fall_back_to_the_public_api_when_grpc_internals_differ(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The gateway's fast path drives grpc.aio's internal call object; a grpc release the
    # gate lets through that changes it must cost speed, not correctness: nothing is sent
    # twice, answers still come.
    from meshkit.gateway.upstream import _unary

    class InternalChannel:
        def call(self, *args: object) -> None:
            raise TypeError("call() takes 4 arguments")

    monkeypatch.setattr(grpcio_compat, "_AioChannel", InternalChannel)
    monkeypatch.setattr(grpcio_compat, "_census", lambda: None)
    monkeypatch.setitem(grpcio_compat.FAST_PATHS, "aio_unary", True)

    class PublicCall:
        def __await__(self):  # type: ignore[no-untyped-def]
            yield from ()
            return "response"

        async def initial_metadata(self) -> tuple[()]:
            return ()

        async def trailing_metadata(self) -> tuple[tuple[str, str]]:
            return (("k", "v"),)

    class MultiCallable:
        _interceptors = None
        _channel = InternalChannel()
        _method = b"/pkg.S/M"
        _request_serializer = staticmethod(lambda r: r.encode())
        _response_deserializer = staticmethod(lambda b: b.decode())
        _registered_call_handle = 1
        sent: list[str] = []

        def __call__(self, request: str, **kw: object) -> PublicCall:
            self.sent.append(request)
            return PublicCall()

    mc = MultiCallable()
    invoke = _unary.unary_invoker(mc)
    assert await invoke("a", (), 1.0) == ("response", (), (("k", "v"),))
    assert await invoke("b", (), None) == ("response", (), (("k", "v"),))
    assert mc.sent == ["a", "b"]  # each request went out once, through the public API
    assert "public API" in caplog.text


# -- the guard: private names only inside meshkit/_compat ----------------------------------

PRIVATE_MODULES = (
    "grpc._",  # grpc._cython, grpc._common, grpc._channel, grpc._interceptor, ...
    "grpc.aio._",
    "nats.protocol",
)
UVICORN_INTERNALS = ("uvicorn.protocols", "uvicorn.middleware")
# grpcio's and nats-py's private attributes meshkit has used (or stuck on their objects).
PRIVATE_NAMES = frozenset(
    {
        "_channel",
        "_method",
        "_request_serializer",
        "_response_deserializer",
        "_registered_call_handle",
        "_interceptors",
        "_thunk",
        "__closure__",
        "_server_info",
        "_current_server",
        "_send_publish",
        "_send_command",
        "_flush_queue",
        "_flush_pending",
        "_parse_header_lines",
        "_meshkit_replies",
        "_meshkit_calls",  # once stuck on grpc.aio channels
        "_server_status",  # grpcio-health-checking's servicer map
        "_TRACER_PROVIDER",  # OpenTelemetry API's global
        "_replace",  # grpcio's method handlers happen to be namedtuples
        "_done_writing_flag",  # what grpc.aio's write() reads from an interceptor's call
    }
)


def _sources() -> list[Path]:
    pkg = ROOT / "meshkit"
    skip = {pkg / "_pb", pkg / "_compat"}
    return [p for p in sorted(pkg.rglob("*.py")) if not any(p.is_relative_to(s) for s in skip)]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # ``from grpc import _common`` names a private module too
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _offences(
    paths: list[Path], prefixes: tuple[str, ...], names: frozenset[str], root: Path = ROOT
) -> list[str]:
    found = []
    for path in paths:
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(path))
        for line, module in _imports(tree):
            if module.startswith(prefixes):
                found.append(f"{rel}:{line}: imports {module}")
        if not names:
            continue
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = node.name  # overriding a private method is using it
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value  # getattr(obj, "_server_info")
            if name in names:
                found.append(f"{rel}:{getattr(node, 'lineno', 0)}: uses {name}")
    return found


def test_only_meshkit_compat_touches_grpcio_or_nats_py_internals() -> None:
    found = _offences(_sources(), PRIVATE_MODULES, PRIVATE_NAMES)
    assert not found, "private grpcio/nats-py use outside meshkit/_compat:\n" + "\n".join(found)


def test_no_module_imports_uvicorn_internals() -> None:
    found = _offences(_sources(), UVICORN_INTERNALS, frozenset())
    assert not found, "uvicorn internals imported:\n" + "\n".join(found)


def test_the_guard_sees_what_it_guards_against(tmp_path: Path) -> None:
    # The scan itself: each kind of offence is found in a sample module.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from grpc import _common\n"
        "import grpc._cython.cygrpc\n"
        "from nats.protocol import command\n"
        "x = nc._server_info\n"
        "y = getattr(mc, '_thunk')\n"
        "class C:\n"
        "    async def _send_publish(self): ...\n"
    )
    found = _offences([sample], PRIVATE_MODULES, PRIVATE_NAMES, root=tmp_path)
    assert sorted(found) == [
        "sample.py:1: imports grpc._common",
        "sample.py:2: imports grpc._cython.cygrpc",
        "sample.py:3: imports nats.protocol",
        "sample.py:3: imports nats.protocol.command",
        "sample.py:4: uses _server_info",
        "sample.py:5: uses _thunk",
        "sample.py:7: uses _send_publish",
    ]
