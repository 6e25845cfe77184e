"""The one place where the shop's gRPC servers and channels get meshkit's interceptors.

When ``meshkit.grpc.aio`` is available the servers get its server interceptors and
every channel the client interceptors for ``POLICY``; until then they run bare.
Keeping the wiring here keeps that switch a one-file change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("examples.shop")

POLICY_FILE = Path(os.environ.get("SHOP_POLICY", Path(__file__).with_name("policy.yaml")))
# The shop's resilience policy (meshkit.config.Policy), loaded once per process.
POLICY: Any = None


def _policy() -> Any:
    global POLICY
    if POLICY is None:
        try:
            from meshkit.config import Policy

            POLICY = Policy.load(POLICY_FILE) if POLICY_FILE.exists() else Policy()
        except ImportError:  # pragma: no cover - meshkit.config not there yet
            POLICY = False
    return POLICY or None


def server_interceptors() -> list[Any]:
    """meshkit's server interceptors for the shop's policy, or [] when unavailable."""
    try:
        from meshkit.grpc import aio as mk_aio

        return list(mk_aio.server_interceptors(_policy()))
    except ImportError as exc:
        log.debug("meshkit server interceptors unavailable (%s); running bare", exc)
        return []


def client_interceptors(target: str) -> list[Any]:
    """meshkit's client interceptors for calls to ``target``, or [] when unavailable."""
    try:
        from meshkit.grpc import aio as mk_aio

        return list(mk_aio.client_interceptors(_policy(), target=target))
    except ImportError as exc:
        log.debug("meshkit client interceptors unavailable (%s); running bare", exc)
        return []


def server() -> grpc.aio.Server:
    """A grpc.aio server with the shop's interceptors."""
    return grpc.aio.server(interceptors=server_interceptors())


def channel(address: str) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to ``address`` with the shop's client interceptors."""
    return grpc.aio.insecure_channel(address, interceptors=client_interceptors(address))
