"""Where a Redis-backed store or job queue lives: one server, a Sentinel-watched primary, or a Cluster.

URL forms (``rediss`` instead of ``redis`` for TLS)::

    redis://[[user]:password@]host:port/db                      one server (also unix://path)
    redis+sentinel://[[user]:password@]h1:26379,h2:26379/name/db  the primary Sentinel calls ``name``
    redis+cluster://[[user]:password@]h1:6379,h2:6379             a Redis Cluster (database 0 only)

The credentials are the data nodes'; sentinels that want their own password take
``?sentinel_password=...``.

Everything ptserve keeps in Redis stays on one Cluster slot: key prefixes carry a hash tag
(``{ptserve}:...``), so every Lua script and transaction touches one slot and the job stream and
its consumer group sit beside the jobs they queue. The data then lives on one shard with its
replicas: Cluster here buys failover, not capacity, which a prompt store (kilobytes to megabytes per
task) does not need.

Failover loses the writes a primary acknowledged but had not yet shipped to a replica (replication
is asynchronous). Writers therefore ask ``WAIT`` for ``replicas_to_wait`` replica acknowledgements
(1 by default under Sentinel and Cluster; the
``write_replicas`` setting) before a write counts as done; see :class:`Replicated`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterDownError, ReadOnlyError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

logger = logging.getLogger(__name__)

__all__ = [
    "UNAVAILABLE",
    "RedisKind",
    "RedisTarget",
    "Replicated",
    "ReplicationError",
    "is_redis_url",
    "redact_url",
]

RedisKind = Literal["single", "sentinel", "cluster"]
_SCHEMES: dict[str, tuple[RedisKind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
T = TypeVar("T")

# Errors that mean "Redis cannot be used right now", not "this request is wrong": a lost connection or
# a timeout, and what a failover shows for a moment: a Cluster without a primary for a slot
# (CLUSTERDOWN, MASTERDOWN, TRYAGAIN, no node for a slot) or a demoted primary (READONLY). They map to
# 503 store_unavailable with Retry-After, and a worker keeps its job rather than failing it.
UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    RedisClusterException,
)


def is_redis_url(location: str) -> bool:
    """True for every URL form above (anything else names a directory)."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme in _SCHEMES


def redact_url(url: str) -> str:
    """``url`` without user, password or query string, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid redis url>"
    hosts = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{hosts}{parts.path}"


class ReplicationError(Exception):
    """A write reached the primary but not the replicas asked for within the timeout."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed store URL: what kind of deployment, and how to connect to it."""

    kind: RedisKind
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """ValueError (with the reason) for a URL that is not one of the module's forms."""
        scheme = url.partition("://")[0]
        if scheme not in _SCHEMES:
            raise ValueError(f"unknown Redis URL scheme {scheme!r} (expected one of {', '.join(_SCHEMES)})")
        kind, tls = _SCHEMES[scheme]
        if kind == "single":
            return cls("single", url, tls=tls)
        parts = urlsplit(url)
        credentials, _, hostlist = parts.netloc.rpartition("@")
        username = password = None
        if credentials:
            user, _, secret = credentials.partition(":")
            username, password = unquote(user) or None, unquote(secret) or None
        hosts = tuple(_host_port(item, 26379 if kind == "sentinel" else 6379) for item in hostlist.split(","))
        if not hosts:
            raise ValueError(f"{scheme} URL names no hosts")
        query = parse_qs(parts.query)
        sentinel_password = query.get("sentinel_password", [None])[0]
        segments = [s for s in parts.path.split("/") if s]
        if kind == "sentinel":
            if not segments or len(segments) > 2:
                raise ValueError("a Sentinel URL ends in /<service name>[/<db>], e.g. /mymaster/0")
            name, db = segments[0], _db(segments[1] if len(segments) > 1 else "0")
            return cls(kind, url, hosts, name, db, username, password, sentinel_password, tls)
        if segments and segments != ["0"]:
            raise ValueError("Redis Cluster has only database 0: drop the path from the URL")
        return cls(kind, url, hosts, None, 0, username, password, None, tls)

    @property
    def shown(self) -> str:
        return redact_url(self.url)

    def replicas_to_wait(self, asked: int | None = None) -> int:
        """Replica acknowledgements a write waits for: ``asked``, else none on one server and one
        where failover exists (Sentinel, Cluster)."""
        if asked is not None:
            return asked
        return 0 if self.kind == "single" else 1

    def key_prefix(self, prefix: str) -> str:
        """The prefix as keys carry it: hash-tagged on a Cluster so all of ptserve's keys share a slot."""
        return f"{{{prefix}}}" if self.kind == "cluster" else prefix

    def client(
        self,
        *,
        socket_timeout: float,
        retry: Retry | None = None,
        health_check_interval: int = 0,
        max_connections: int | None = None,
    ) -> redis.Redis:
        """A client of this deployment. Sentinel's follows the primary through failovers; Cluster's
        follows slot moves. Typed as ``redis.Redis``: the commands ptserve uses exist on all three."""
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "health_check_interval": health_check_interval,
        }
        if retry is not None:
            common["retry"] = retry
        if max_connections is not None:
            common["max_connections"] = max_connections
        if self.kind == "single":
            return redis.Redis.from_url(self.url, **common)
        auth: dict[str, Any] = {"username": self.username, "password": self.password, "ssl": self.tls}
        if self.kind == "sentinel":
            sentinel = Sentinel(
                list(self.hosts),
                sentinel_kwargs={
                    "socket_timeout": socket_timeout,
                    "socket_connect_timeout": socket_timeout,
                    "password": self.sentinel_password,
                },
                **common,
            )
            assert self.service_name is not None
            return cast(redis.Redis, sentinel.master_for(self.service_name, db=self.db, **auth))
        nodes = [ClusterNode(host, port) for host, port in self.hosts]
        cluster = RedisCluster(startup_nodes=nodes, **auth, **common)
        return cast(redis.Redis, cluster)


class Replicated:
    """Writes that count as done only once ``replicas`` replicas acknowledged them (``WAIT``).

    ``WAIT`` covers the writes of the connection it is sent on, so writes go through a client of
    their own with one connection (per node), taken under a lock: writes (uploads, job transitions)
    are rare next to reads, which keep the shared pool.
    """

    def __init__(
        self,
        target: RedisTarget,
        replicas: int,
        *,
        socket_timeout: float,
        timeout_ms: int = 2000,
        refused_retry_s: float = 5.0,
    ) -> None:
        self.target = target
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.refused_retry_s = refused_retry_s
        self._socket_timeout = socket_timeout + timeout_ms / 1000
        self._lock = threading.Lock()
        self.client = self._new_client()

    def _new_client(self) -> redis.Redis:
        # No silent retries by redis-py: a write whose reply a dying primary never sent may have run
        # (a job queued twice); run() retries only what provably never left this process.
        return self.target.client(
            socket_timeout=self._socket_timeout, retry=Retry(NoBackoff(), 0), max_connections=1
        )

    def run(self, key: str, write: Callable[[redis.Redis], T]) -> T:
        """``write(client)``, then wait for the replicas of the node that owns ``key``.

        ``write`` must be one command, one script or one MULTI/EXEC transaction, so that a write
        refused at connect time did nothing: those are retried on a rebuilt client for up to
        ``refused_retry_s`` (a failover in progress: the primary this client knew is gone and its
        successor is being elected). Any other connection error is raised at once: the write may
        have run. ReplicationError if too few replicas acknowledged in time: the write is on the
        primary and will most likely reach the replicas, but a failover now could lose it, so it is
        not reported done.
        """
        with self._lock:
            result = self._write(write)
            try:
                acked = self._wait(key) if self.replicas else 0
            except (RedisConnectionError, RedisTimeoutError):
                self._renew()
                raise
            if acked < self.replicas:
                raise ReplicationError(
                    f"{self.target.shown}: the write reached {acked} of {self.replicas} replica(s) "
                    f"within {self.timeout_ms} ms"
                )
            return result

    def _write(self, write: Callable[[redis.Redis], T]) -> T:
        deadline = time.monotonic() + self.refused_retry_s
        delay = 0.05
        while True:
            try:
                return write(self.client)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # A client made before or during a failover keeps the dead primary in its slot map
                # (Cluster) until an error makes it look again, and a one-connection client can be
                # left wedged; each failed write starts afresh from the seeds. Seen on a Cluster:
                # without the retry, a worker whose store client was last rebuilt mid-failover failed
                # its next write a minute later, and the job with it.
                self._renew()
                if not _refused(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.info("%s: write refused (%s); retrying on a new connection", self.target.shown, exc)
                time.sleep(delay)  # backoff while the deployment elects a new primary
                delay = min(2 * delay, 1.0)

    def _renew(self) -> None:
        old, self.client = self.client, self._new_client()
        try:
            old.close()
        except redis.RedisError:
            logger.debug("closing the replaced write client failed", exc_info=True)

    def _wait(self, key: str) -> int:
        if self.target.kind == "cluster":
            cluster = cast(RedisCluster, self.client)
            node = cluster.get_node_from_key(key)
            return int(cluster.execute_command("WAIT", self.replicas, self.timeout_ms, target_nodes=node))
        return int(self.client.execute_command("WAIT", self.replicas, self.timeout_ms))

    def close(self) -> None:
        self.client.close()


def _refused(exc: BaseException) -> bool:
    """True when the connection was refused while connecting: the command was never sent."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep:
        host, port = port, str(default_port)
    if not host:
        raise ValueError(f"empty host in {item!r}")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"bad port in {item!r}") from None


def _db(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ValueError(f"database must be a number, got {text!r}") from None
    if db < 0:
        raise ValueError(f"database must be >= 0, got {db}")
    return db
