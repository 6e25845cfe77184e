"""A local nats-server cluster with JetStream, for trying replicated streams on one machine.

Each node is a :class:`~meshkit.nats.NatsServer` on loopback with its own client,
route and monitoring ports, its own ``server_name`` and store directory; every
node lists every route, so they form one cluster whatever order they come up in.
:meth:`NatsCluster.start` returns once JetStream's meta group has a leader that
every node agrees on and sees every peer as current: an R3 stream can be placed
from then on. :meth:`kill` and :meth:`restart` are for chaos tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshkit.nats import NatsServer, NatsServerError, _Lifecycle

__all__ = ["NatsCluster"]

log = logging.getLogger("meshkit.nats")


# Starts on fresh port picks after a picked port was taken (see NatsCluster.start).
_PORT_ATTEMPTS = 3


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NatsCluster(_Lifecycle):
    """``size`` nats-server processes with JetStream forming one cluster on ``host``.

    ::

        with NatsCluster(size=3) as cluster:
            print(cluster.url)        # nats://127.0.0.1:4101,nats://127.0.0.1:4102,...
            cluster.kill(0)           # SIGKILL node 0 (its store is kept)
            cluster.restart(0)        # same ports, same store, same name

    ``ports``: the nodes' client ports (free ones when omitted); route and
    monitoring ports are always free ones picked at start. ``store_dir``: the
    root of the nodes' stores (``<store_dir>/<server name>``), kept across runs;
    a temporary directory, removed on :meth:`stop`, when omitted.
    ``start_timeout`` bounds the whole start, the meta leader election included.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        cluster_name: str = "meshkit",
        name_prefix: str = "meshkit-n",
        binary: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if not 1 <= size <= 9:
            raise NatsServerError(f"cluster size {size!r}: expected 1 to 9 nodes")
        if ports is not None and len(ports) != size:
            raise NatsServerError(f"{len(ports)} client ports for {size} nodes")
        self.size = size
        self.host = host
        self.cluster_name = cluster_name
        self.start_timeout = start_timeout
        self._ports = list(ports) if ports is not None else [0] * size
        self._names = [f"{name_prefix}{i + 1}" for i in range(size)]
        self._binary = binary
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.store_dir: Path | None = Path(store_dir) if store_dir is not None else None
        self.nodes: list[NatsServer] = []
        self.monitor_ports: list[int] = []
        self.route_ports: list[int] = []

    # -- addresses ----------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, in node order."""
        if not self.nodes:
            raise NatsServerError("the cluster has not been started yet")
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The server list as one string (``nats://a:1,nats://b:2,...``), as ``NATS_URL``
        and ``--nats-url`` take it."""
        return ",".join(self.urls)

    @property
    def names(self) -> list[str]:
        """The nodes' ``server_name`` s, in node order (stream info names leaders by them)."""
        return list(self._names)

    def index_of(self, server_name: str) -> int:
        """The node index of ``server_name`` (e.g. a stream's ``cluster.leader``)."""
        try:
            return self._names.index(server_name)
        except ValueError:
            raise NatsServerError(
                f"no node named {server_name!r} in this cluster ({', '.join(self._names)})"
            ) from None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> NatsCluster:
        """Start every node and wait until JetStream's meta group has a leader.

        Raises :class:`NatsServerError` with the failing node's log tail when a node
        exits or the cluster does not form within ``start_timeout``.
        """
        if self.nodes:
            return self
        deadline = time.monotonic() + self.start_timeout
        if self.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="meshkit-nats-cluster-")
            self.store_dir = Path(self._tmp.name)
        # Route and monitoring ports must be known before any node starts (each lists
        # all routes), so they are picked free here; another process can take one
        # before its node binds it. Then the nodes start again on fresh picks.
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._start_nodes(deadline)
                break
            except NatsServerError as exc:
                self._stop_nodes()
                if "address already in use" not in str(exc) or attempt + 1 == _PORT_ATTEMPTS:
                    self.stop()
                    raise
                log.info("a picked port was taken before its node bound it; picking again")
            except BaseException:
                self.stop()
                raise
        log.info("nats cluster %s of %d nodes at %s", self.cluster_name, self.size, self.url)
        return self

    def _start_nodes(self, deadline: float) -> None:
        assert self.store_dir is not None
        self.route_ports = [_free_port(self.host) for _ in range(self.size)]
        self.monitor_ports = [_free_port(self.host) for _ in range(self.size)]
        routes = ",".join(f"nats://{self.host}:{p}" for p in self.route_ports)
        for i in range(self.size):
            args = (
                "--cluster_name",
                self.cluster_name,
                "--cluster",
                f"nats://{self.host}:{self.route_ports[i]}",
                "--routes",
                routes,
                "-m",
                str(self.monitor_ports[i]),
            )
            self.nodes.append(
                NatsServer(
                    port=self._ports[i],
                    host=self.host,
                    store_dir=self.store_dir / self._names[i],
                    binary=self._binary,
                    extra_args=args,
                    start_timeout=max(1.0, deadline - time.monotonic()),
                    server_name=self._names[i],
                )
            )
        for node in self.nodes:
            node.start_timeout = max(1.0, deadline - time.monotonic())
            node.start()
        self._wait_formed(deadline)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``, as a crash would; its store and ports are kept."""
        self._node(index).kill()

    def restart(self, index: int, *, graceful: bool = False, timeout: float | None = None) -> None:
        """Start node ``index`` again (killing it first unless it is down) on the same
        ports with the same store, and wait until it has rejoined the meta group."""
        node = self._node(index)
        if node.running:
            node.restart(graceful=graceful)
        else:
            node.start()
        self._wait_formed(time.monotonic() + (timeout or self.start_timeout))

    def wait_formed(self, timeout: float | None = None) -> None:
        """Wait until the running nodes agree on a meta leader that sees them current."""
        self._wait_formed(time.monotonic() + (timeout or self.start_timeout))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove a temporary store."""
        self._stop_nodes(timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.store_dir = None

    def _stop_nodes(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(timeout)
        self.nodes = []

    @property
    def running(self) -> list[bool]:
        """Whether each node's process is alive."""
        return [node.running for node in self.nodes]

    def _node(self, index: int) -> NatsServer:
        if not self.nodes:
            raise NatsServerError("the cluster has not been started yet")
        if not 0 <= index < len(self.nodes):
            raise NatsServerError(f"no node {index}: the cluster has nodes 0 to {self.size - 1}")
        return self.nodes[index]

    # -- health -------------------------------------------------------------

    def jsz(self, index: int) -> dict[str, Any]:
        """Node ``index``'s ``/jsz`` monitoring document (JetStream and meta group)."""
        url = f"http://{self.host}:{self.monitor_ports[index]}/jsz"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def _formed(self) -> str:
        """Why the cluster is not formed yet ("" when it is)."""
        up = [i for i, node in enumerate(self.nodes) if node.running]
        if not up:
            return "no node is running"
        leaders: set[str] = set()
        docs: dict[str, dict[str, Any]] = {}
        for i in up:
            try:
                meta = self.jsz(i).get("meta_cluster") or {}
            except (OSError, urllib.error.URLError, ValueError) as exc:
                return f"{self._names[i]}: monitoring not answering ({exc})"
            leader = str(meta.get("leader") or "")
            if not leader:
                return f"{self._names[i]}: no JetStream meta leader yet"
            leaders.add(leader)
            docs[self._names[i]] = meta
        if len(leaders) > 1:
            return f"nodes disagree on the meta leader: {sorted(leaders)}"
        leader = leaders.pop()
        meta = docs.get(leader)
        if meta is None:
            return f"the meta leader {leader} is not a running node"
        current = {str(r.get("name")) for r in meta.get("replicas") or [] if r.get("current")}
        behind = [
            self._names[i] for i in up if self._names[i] != leader and self._names[i] not in current
        ]
        if behind:
            return f"meta leader {leader} does not see {', '.join(behind)} as current yet"
        return ""

    def _wait_formed(self, deadline: float) -> None:
        why = "not checked"
        while True:
            for i, node in enumerate(self.nodes):
                if node.exited:
                    raise NatsServerError(
                        f"node {self._names[i]} exited; log tail:\n{node.log_tail()}"
                    )
            why = self._formed()
            if not why:
                return
            if time.monotonic() >= deadline:
                raise NatsServerError(
                    f"the nats cluster did not form in time: {why}; log tail of "
                    f"{self._names[0]}:\n{self.nodes[0].log_tail() if self.nodes else ''}"
                )
            time.sleep(0.1)
