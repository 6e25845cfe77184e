"""Builders (channels and servers), per-service isolation and telemetry, over loopback gRPC."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import meshkit.deadline
import meshkit.grpc
import meshkit.grpc.aio
import meshkit.telemetry
from meshkit import Policy
from meshkit.grpc import TLS, Keepalive, parse_pushback
from meshkit.grpc._builders import channel_options, lb_target
from tests.integration._echo import (
    OTHER_UNARY,
    UNARY,
    AioEcho,
    Script,
    SyncEcho,
    SyncServer,
    dumps,
    loads,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


def echo_server(policy: Any = None, **kw: Any) -> tuple[meshkit.grpc.MeshServer, Script]:
    script = Script(0)
    echo = SyncEcho(script)
    echo.policy = policy
    srv = meshkit.grpc.server(
        policy=policy, services=echo.handlers(), handle_signals=False, grace=1.0, **kw
    )
    script.port = srv.port
    return srv.start(), script


def unary(ch: grpc.Channel, method: str = UNARY) -> Any:
    return ch.unary_unary(method, request_serializer=dumps, response_deserializer=loads)


# -- channel builder -----------------------------------------------------------------


def test_lb_target_and_options() -> None:
    assert lb_target("host:1") == "host:1"
    assert lb_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert lb_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="dns:///"):
        lb_target(["a.example:1", "b.example:1"])
    opts = dict(
        channel_options(
            round_robin=True, health_check=True, keepalive=Keepalive(time=20, timeout=5), tls=None
        )
    )
    config = json.loads(opts["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert opts["grpc.keepalive_time_ms"] == 20000
    assert opts["grpc.keepalive_timeout_ms"] == 5000


def test_round_robin_and_client_side_health_checks() -> None:
    a, _ = echo_server()
    b, _ = echo_server()
    try:
        targets = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
        ch = meshkit.grpc.channel(targets, policy=Policy.from_dict({}), health_check=True)
        call = unary(ch)
        ports = Counter(call({"key": "rr"}, timeout=5)["port"] for _ in range(20))
        assert set(ports) == {a.port, b.port}  # both served: round robin
        b.set_serving(False)  # client-side health checking steers calls away from b
        deadline = time.monotonic() + 10
        streak = 0
        while streak < 10 and time.monotonic() < deadline:
            streak = streak + 1 if call({"key": "hc"}, timeout=5)["port"] == a.port else 0
        assert streak >= 10
        ch.close()
    finally:
        a.stop(0).wait()
        b.stop(0).wait()


# -- server builder ------------------------------------------------------------------


def test_server_builder_health_reflection_and_drain() -> None:
    srv, script = echo_server()
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    try:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "meshkit.test.Echo"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(refl.ServerReflectionInfo(iter([req]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {"meshkit.test.Echo", "meshkit.test.Other", "grpc.health.v1.Health"} <= names
        # A call in flight when the drain starts still completes.
        slow = unary(ch).future({"key": "slow", "delay": 0.4}, timeout=5)
        assert _wait(lambda: script.in_flight == 1)
        drainer = threading.Thread(target=srv.drain)
        drainer.start()
        assert slow.result()["key"] == "slow"
        drainer.join(5)
        assert not drainer.is_alive()
    finally:
        ch.close()
        srv.stop(0)


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def test_sigterm_drains_gracefully() -> None:
    script = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, {root!r})
        import meshkit.grpc
        from tests.integration._echo import Script, SyncEcho
        echo = SyncEcho(Script(0))
        srv = meshkit.grpc.server(services=echo.handlers(), grace=3.0).start()
        print(srv.port, flush=True)
        srv.wait_for_termination()
        print("drained", flush=True)
        """
    ).format(root=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        slow = unary(ch).future({"key": "slow", "delay": 0.5}, timeout=10)
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        time.sleep(0.1)  # let the slow call reach the handler
        proc.send_signal(signal.SIGTERM)
        assert slow.result()["key"] == "slow"  # finished within the grace period
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().strip() == "drained"
        ch.close()
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_aio_server_builder_and_channel() -> None:
    script = Script(0)
    echo = AioEcho(script)
    srv = meshkit.grpc.aio.server(services=echo.handlers(), handle_signals=False)
    await srv.start()
    try:
        target = f"127.0.0.1:{srv.port}"
        p = Policy.from_dict(
            {
                "rules": [
                    {
                        "match": "meshkit.test.Echo",
                        "retry": {"max_attempts": 3, "initial_backoff": "1ms"},
                    }
                ]
            }
        )
        ch = meshkit.grpc.aio.channel([target, target], policy=p, health_check=True)
        call = ch.unary_unary(UNARY, request_serializer=dumps, response_deserializer=loads)
        out = await call({"key": "a", "fail": [{"code": "UNAVAILABLE", "times": 1}]}, timeout=5)
        assert out["n"] == 2
        plain = grpc.aio.insecure_channel(target)
        health = health_pb2_grpc.HealthStub(plain)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="meshkit.test.Echo"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(plain)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [a async for a in refl.ServerReflectionInfo(iter([req]))]
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"meshkit.test.Echo", "grpc.health.v1.Health"} <= names
        await srv.set_serving(False)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="meshkit.test.Echo"))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:  # client-side health checks: no backend
            await call({"key": "b"}, timeout=2)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        await plain.close()
        await ch.close()
    finally:
        await srv.stop(0)


# -- TLS -------------------------------------------------------------------------------


def _certs(tmp: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(name: str, issuer: Any, issuer_key: Any, *, ca: bool, san: str | None) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("meshkit test CA", None, None, ca=True, san=None)
    out: dict[str, Path] = {}

    def save(label: str, key: Any, cert: Any) -> None:
        out[f"{label}.key"] = tmp / f"{label}.key"
        out[f"{label}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out[f"{label}.crt"] = tmp / f"{label}.crt"
        out[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    save("ca", ca_key, ca_cert)
    for label in ("server", "client"):
        key, cert = make(label, ca_cert.subject, ca_key, ca=False, san="localhost")
        save(label, key, cert)
    return out


def test_mtls_channel_and_server(tmp_path: Path) -> None:
    c = _certs(tmp_path)
    server_tls = TLS(
        ca=c["ca.crt"], cert=c["server.crt"], key=c["server.key"], require_client_cert=True
    )
    srv, _ = echo_server(tls=server_tls)
    target = f"127.0.0.1:{srv.port}"
    try:
        good = meshkit.grpc.channel(
            target,
            policy=Policy.from_dict({}),
            tls=TLS(
                ca=c["ca.crt"], cert=c["client.crt"], key=c["client.key"], server_name="localhost"
            ),
        )
        assert unary(good)({"key": "tls"}, timeout=5)["n"] == 1
        good.close()
        anonymous = meshkit.grpc.channel(target, tls=TLS(ca=c["ca.crt"], server_name="localhost"))
        with pytest.raises(grpc.RpcError) as info:
            unary(anonymous)({"key": "tls"}, timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        anonymous.close()
    finally:
        srv.stop(0)


# -- per-service isolation (sync servers) --------------------------------------------


def test_isolation_pool_rejects_fast_and_spares_other_services() -> None:
    srv = SyncServer(meshkit.grpc.server_interceptors(None, isolate={"meshkit.test.Other": 1}))
    srv.start()
    ch = grpc.insecure_channel(srv.target)
    try:
        other, echo = unary(ch, OTHER_UNARY), unary(ch)
        slow = other.future({"key": "slow", "delay": 0.8}, timeout=5)
        assert _wait(lambda: srv.script.in_flight == 1)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            other({"key": "extra"}, timeout=5)
        assert time.monotonic() - start < 0.3
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert parse_pushback(info.value.trailing_metadata()) is not None
        assert echo({"key": "echo"}, timeout=5)["n"] == 1  # another service is unaffected
        assert slow.result()["key"] == "slow"
        # A handler that outlives its deadline frees the grpc worker at the deadline.
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            other({"key": "hang", "delay": 1.0}, timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 0.9
    finally:
        ch.close()
        srv.stop()


# -- telemetry ---------------------------------------------------------------------------


def test_metrics_and_span_events() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader = InMemoryMetricReader()
    meshkit.telemetry.configure(MeterProvider(metric_readers=[reader]))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    srv = SyncServer().start()
    try:
        p = Policy.from_dict(
            {
                "rules": [
                    {
                        "match": "meshkit.test.Echo",
                        "retry": {"max_attempts": 4, "initial_backoff": "1ms"},
                    }
                ]
            }
        )
        ch = grpc.intercept_channel(
            grpc.insecure_channel(srv.target),
            *meshkit.grpc.client_interceptors(p, target="metrics-test"),
        )
        with tracer.start_as_current_span("call"):
            out = unary(ch)({"key": "m", "fail": [{"code": "UNAVAILABLE", "times": 2}]}, timeout=5)
        assert out["n"] == 3
        ch.close()
    finally:
        srv.stop()
        meshkit.telemetry.configure(None)
    data = reader.get_metrics_data()
    values: dict[str, float] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                values[metric.name] = sum(
                    pt.value
                    for pt in metric.data.data_points
                    if pt.attributes.get("target") == "metrics-test"
                )
    assert values["meshkit.rpc.attempts"] == 3
    assert values["meshkit.rpc.retries"] == 2
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["meshkit.retry", "meshkit.retry"]
    assert span.events[0].attributes is not None and span.events[0].attributes["attempt"] == 2


def test_noop_policy_takes_the_fast_path() -> None:
    p = Policy.from_dict({"rules": [{"match": "meshkit.test.Other", "timeout": "1s"}]})
    ic = meshkit.grpc.client_interceptors(p, target="t")[0]
    assert ic.plan(UNARY).level == 0  # nothing configured for Echo: straight through
    assert ic.plan(OTHER_UNARY).level == 1  # a timeout only


def test_span_events_land_on_the_instrumentation_span() -> None:
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = SyncServer().start()
    try:
        p = Policy.from_dict(
            {
                "rules": [
                    {
                        "match": "meshkit.test.Echo",
                        "retry": {"max_attempts": 4, "initial_backoff": "1ms"},
                    }
                ]
            }
        )
        # opentelemetry-instrumentation-grpc outermost: one span per call, meshkit's
        # events on it.
        inner = meshkit.grpc.channel(srv.target, policy=p, name="otel-test")
        ch = grpcext.intercept_channel(inner, client_interceptor(tracer_provider=provider))
        out = unary(ch)({"key": "o", "fail": [{"code": "UNAVAILABLE", "times": 1}]}, timeout=5)
        assert out["n"] == 2
        inner.close()
    finally:
        srv.stop()
    (span,) = exporter.get_finished_spans()
    assert span.name == "/meshkit.test.Echo/Unary"
    assert [e.name for e in span.events] == ["meshkit.retry"]


def test_every_policy_outcome_is_counted() -> None:
    # One run that trips each instrument the issue names, then the collected values.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meshkit.telemetry.configure(MeterProvider(metric_readers=[reader]))
    client_policy = Policy.from_dict(
        {
            "rules": [
                {
                    "match": "meshkit.test.Echo",
                    "retry": {
                        "max_attempts": 3,
                        "initial_backoff": "1ms",
                        "budget": {"ratio": 0.01, "min_per_second": 0.01},
                    },
                    "circuit_breaker": {
                        "window": {"type": "count", "size": 2},
                        "minimum_calls": 2,
                        "failure_rate_threshold": 0.5,
                        "open_duration": "30s",
                    },
                },
                {"match": "meshkit.test.Other", "bulkhead": {"max_concurrent": 1}},
            ]
        }
    )
    server_policy = Policy.from_dict(
        {
            "rules": [
                {"match": OTHER_UNARY, "rate_limit": {"rate": 1, "per": "60s", "burst": 1}},
                {
                    "match": "meshkit.test.Echo",
                    "fault": {"abort": {"percent": 100, "code": "UNAVAILABLE"}},
                },
            ]
        }
    )
    srv, script = echo_server(server_policy)
    ch = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{srv.port}"),
        *meshkit.grpc.client_interceptors(client_policy, target="metrics-all"),
    )
    codes: list[grpc.StatusCode] = []

    def call(method: str, req: dict[str, Any], timeout: float = 5) -> None:
        try:
            unary(ch, method)(req, timeout=timeout)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())

    try:
        call(UNARY, {"key": "a"})  # the server's fault aborts it; the budget refuses a retry
        call(UNARY, {"key": "b"})  # a second failure opens the breaker
        call(UNARY, {"key": "c"})  # refused by the open breaker, never sent
        slow = unary(ch, OTHER_UNARY).future({"key": "slow", "delay": 0.5}, timeout=5)
        assert _wait(lambda: script.in_flight == 1)
        call(OTHER_UNARY, {"key": "extra"})  # the client bulkhead is full
        assert slow.result()["key"] == "slow"
        call(OTHER_UNARY, {"key": "limited"})  # the server's rate limit (burst 1) is spent
        with meshkit.deadline.scope(0.001):
            time.sleep(0.01)
            call(OTHER_UNARY, {"key": "late"})  # the propagated deadline is spent
    finally:
        ch.close()
        srv.stop(None)
        meshkit.telemetry.configure(None)
    assert codes == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ]
    totals: Counter[str] = Counter()
    transitions: list[tuple[str, str]] = []
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for pt in metric.data.data_points:
                    attrs = dict(pt.attributes or {})
                    if attrs.get("target", "metrics-all") != "metrics-all":
                        continue  # attempts are tallied process-wide; keep this test's
                    totals[metric.name] += pt.value
                    if metric.name == "meshkit.circuit_breaker.transitions" and pt.value:
                        transitions.append((str(attrs["from"]), str(attrs["to"])))
    # a, b, the slow call and the rate-limited one reached the server; the rest never left
    assert totals["meshkit.rpc.attempts"] == 4
    assert totals["meshkit.retry_budget.exhausted"] == 2
    assert transitions == [("CLOSED", "OPEN")]
    assert totals["meshkit.bulkhead.rejections"] == 1
    assert totals["meshkit.rate_limit.rejections"] == 1
    assert totals["meshkit.faults"] == 2
    assert totals["meshkit.rpc.failed_before_send"] == 3  # breaker, bulkhead, deadline


def test_future_calls_do_not_block_and_keep_their_policy() -> None:
    # grpcio's `.future()` goes through the same interceptor: it must return at once, hold
    # the bulkhead permit until the call ends, and still retry.
    p = Policy.from_dict(
        {
            "rules": [
                {
                    "match": "meshkit.test.Echo",
                    "bulkhead": {"max_concurrent": 2},
                    "retry": {"max_attempts": 3, "initial_backoff": "1ms"},
                }
            ]
        }
    )
    srv, script = echo_server()
    ch = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{srv.port}"),
        *meshkit.grpc.client_interceptors(p, target="futures"),
    )
    try:
        call = unary(ch)
        started = time.monotonic()
        slow = [call.future({"key": f"s{i}", "delay": 0.6}, timeout=5) for i in range(2)]
        assert time.monotonic() - started < 0.3  # neither waited for its answer
        assert not any(f.done() for f in slow)
        (bulkhead,) = p.registry.bulkheads().values()
        assert bulkhead.in_flight == 2
        with pytest.raises(grpc.RpcError) as info:
            call({"key": "third"}, timeout=5)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        done: list[str] = []
        slow[0].add_done_callback(lambda f: done.append(f.result()["key"]))
        assert [f.result(timeout=5)["key"] for f in slow] == ["s0", "s1"]
        assert _wait(lambda: done == ["s0"] and bulkhead.in_flight == 0)
        # A failing future is retried in the background and ends with the answer.
        flaky = call.future({"key": "f", "fail": [{"code": "UNAVAILABLE", "times": 2}]}, timeout=5)
        assert flaky.result(timeout=5)["n"] == 3
        assert flaky.code() is grpc.StatusCode.OK and script.total("f") == 3
        assert _wait(lambda: bulkhead.in_flight == 0)
        # A caller error is final at once, also through a future.
        bad = call.future({"key": "bad", "code": "INVALID_ARGUMENT"}, timeout=5)
        assert bad.exception(timeout=5).code() is grpc.StatusCode.INVALID_ARGUMENT
        assert script.total("bad") == 1
        # Cancelling a pending future ends it, unretried, and frees its permit.
        hung = call.future({"key": "hung", "delay": 3.0}, timeout=5)
        assert _wait(lambda: script.total("hung") == 1)  # it reached the server
        assert bulkhead.in_flight == 1
        assert hung.cancel()
        assert _wait(hung.done) and hung.cancelled()
        assert _wait(lambda: bulkhead.in_flight == 0)
        assert script.total("hung") == 1
    finally:
        ch.close()
        srv.stop(None)
