"""meshkit: service-mesh resilience and edge features for Python gRPC services.

The public names:

- :class:`meshkit.Policy`: the policy document (retries, deadlines, breakers,
  bulkheads, rate limits, fallbacks, faults) compiled per method.
- :mod:`meshkit.grpc` and :mod:`meshkit.grpc.aio`: interceptors and builders.
- :mod:`meshkit.deadline`: the deadline propagated from the incoming call.
- :mod:`meshkit.gateway`: the REST/JSON gateway (an ASGI app).
- :mod:`meshkit.saga`: choreographed sagas over NATS JetStream.
- :mod:`meshkit.codegen`: ``meshkit gen``.
- :mod:`meshkit.nats`: an embedded nats-server for development and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshkit.errors import (
    BulkheadFullError,
    CallRejectedError,
    CircuitOpenError,
    ConcurrencyError,
    ConfigError,
    DeadlineExceededError,
    MeshkitError,
    RateLimitedError,
)

if TYPE_CHECKING:
    from meshkit.config import Policy

__version__ = "0.1.0"

__all__ = [
    "BulkheadFullError",
    "CallRejectedError",
    "CircuitOpenError",
    "ConcurrencyError",
    "ConfigError",
    "DeadlineExceededError",
    "MeshkitError",
    "Policy",
    "RateLimitedError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so `import meshkit` stays light for the CLI and codegen.
    if name == "Policy":
        from meshkit.config import Policy

        return Policy
    raise AttributeError(f"module 'meshkit' has no attribute {name!r}")
