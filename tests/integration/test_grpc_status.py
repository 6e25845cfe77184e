"""Status and metadata helpers, and the errors a client gets for refused calls."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshkit.errors import BulkheadFullError, CircuitOpenError, DeadlineExceededError
from meshkit.grpc import (
    LocalRpcError,
    code_of,
    error_status,
    parse_pushback,
    pushback_metadata,
    rich_trailers,
)
from meshkit.grpc._status import STOP

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250", 0.25),
        (b"1000", 1.0),
        ("0", 0.0),
        ("-1", STOP),
        ("soon", STOP),
        (" 12 ", 0.012),
    ],
)
def test_parse_pushback(value: str | bytes, expected: float) -> None:
    assert parse_pushback([("other", "x"), ("grpc-retry-pushback-ms", value)]) == expected


def test_parse_pushback_absent() -> None:
    assert parse_pushback(None) is None
    assert parse_pushback([("x", "1")]) is None


def test_pushback_metadata_rounds_up() -> None:
    assert pushback_metadata(0.0101) == (("grpc-retry-pushback-ms", "11"),)
    assert pushback_metadata(None) == ()


def test_error_status_maps_meshkit_errors_and_hides_others() -> None:
    assert error_status(CircuitOpenError("open", pushback=1.5)) == (
        grpc.StatusCode.UNAVAILABLE,
        "open",
        1.5,
    )
    assert error_status(BulkheadFullError("full"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_status(DeadlineExceededError("late"))[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    code, message, pushback = error_status(KeyError("secret internals"))
    assert (code, message, pushback) == (grpc.StatusCode.INTERNAL, "internal error", None)
    assert code_of("NOPE") is grpc.StatusCode.UNKNOWN


def test_rich_trailers_carry_retry_info() -> None:
    trailers = dict(rich_trailers(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", pushback=0.25))
    assert trailers["grpc-retry-pushback-ms"] == "250"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status.message == "busy"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 250


def test_local_rpc_error_is_a_call_and_a_future() -> None:
    err = LocalRpcError.from_exception(CircuitOpenError("open", pushback=0.1))
    assert isinstance(err, grpc.RpcError)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert err.details() == "open"
    assert parse_pushback(err.trailing_metadata()) == 0.1
    assert err.done() and err.exception() is err
    with pytest.raises(grpc.RpcError):
        err.result()
    with pytest.raises(grpc.RpcError):
        next(iter(err))
