"""Redis URL forms, replica-acknowledged writes, and everything else ptserve keeps in Redis on a
Sentinel set and a Cluster (keys, audit trail, rate limits, the job queue)."""

from __future__ import annotations

import json
import threading
import uuid
from typing import TYPE_CHECKING

import pytest
import redis

from prompts.errors import StoreError, StoreUnavailableError
from prompts.jobs import JobQueue, JobSpec
from prompts.redis_store import RedisPromptStore
from prompts.redis_target import RedisTarget, Replicated, is_redis_url, redact_url
from service.runtime import open_tenancy
from service.settings import Settings
from service.tenancy import Principal
from tests.synthetic import KEYWORDS

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server", "tests.redis_ha")


def test_url_forms_parse_into_targets() -> None:
    sentinel = RedisTarget.parse("redis+sentinel://:pw@s1:26379,s2,s3:26380/mymaster/2?sentinel_password=sp")
    assert sentinel.kind == "sentinel" and sentinel.service_name == "mymaster" and sentinel.db == 2
    assert sentinel.hosts == (("s1", 26379), ("s2", 26379), ("s3", 26380))
    assert (sentinel.password, sentinel.sentinel_password) == ("pw", "sp")
    assert sentinel.replicas_to_wait() == 1 and sentinel.replicas_to_wait(0) == 0
    cluster = RedisTarget.parse("rediss+cluster://u:pw@n1:7000,n2:7001")
    assert cluster.kind == "cluster" and cluster.tls and cluster.hosts == (("n1", 7000), ("n2", 7001))
    assert cluster.key_prefix("ptserve") == "{ptserve}" and sentinel.key_prefix("ptserve") == "ptserve"
    single = RedisTarget.parse("redis://localhost:6379/0")
    assert single.kind == "single" and single.replicas_to_wait() == 0
    assert all(map(is_redis_url, ["unix:///run/r.sock", "redis+sentinel://h/m", "redis+cluster://h:1"]))
    assert not any(map(is_redis_url, ["./ptserve-data", "/srv/prompts", "http://x", "redis:/x"]))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://h1:26379", "ends in /<service name>"),
        ("redis+sentinel://h1:26379/m/x", "database must be a number"),
        ("redis+cluster://h1:7000/3", "only database 0"),
        ("redis+cluster://h1:port", "bad port"),
        ("memcached://h1", "unknown Redis URL scheme"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RedisTarget.parse(url)
    if is_redis_url(url):
        with pytest.raises(StoreError, match=why):
            RedisPromptStore(url)


def test_redacted_urls_keep_hosts_and_drop_secrets() -> None:
    assert redact_url("redis+sentinel://:s3cret@h1:1,h2:2/m/0?sentinel_password=x") == (
        "redis+sentinel://h1:1,h2:2/m/0"
    )
    assert "s3cret" not in RedisTarget.parse("redis+cluster://u:s3cret@n1:7000").shown


def test_a_write_no_replica_acknowledges_is_not_reported_done(sentinel_set: object) -> None:
    url = sentinel_set.url()  # type: ignore[attr-defined]
    prefix = f"wait-{uuid.uuid4().hex[:8]}"
    manifest = json.dumps({"task": "t", "labels": ["a", "b"]})
    # Two replicas exist: asking for both succeeds, asking for three cannot.
    RedisPromptStore(url, prefix=prefix, write_replicas=2).put("t", "000000a1", b"x", manifest)
    store = RedisPromptStore(url, prefix=prefix, write_replicas=3)
    with pytest.raises(StoreUnavailableError, match="reached 2 of 3 replica"):
        store.put("t", "000000a2", b"y", manifest)
    assert store.current_version("t") == "000000a2"  # on the primary, but not confirmed
    # API keys kept beside the prompts wait for the replicas the same way.
    keys = open_tenancy(Settings(store=url), store).keys
    assert keys is not None
    with pytest.raises(StoreUnavailableError, match="reached 2 of 3 replica"):
        keys.create(name="ci", scope="classify", tenant=None, created_by="test")


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_keys_audit_rate_limits_and_jobs_work_on_each_topology(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{kind}_set").url()
    prefix = f"ha-{uuid.uuid4().hex[:8]}"
    store = RedisPromptStore(url, prefix=prefix)
    tenancy = open_tenancy(Settings(store=url), store)
    assert tenancy.keys is not None and tenancy.audit is not None
    _, record = tenancy.keys.create(name="ci", scope="classify", tenant="acme", created_by="test")
    assert [r.id for r in tenancy.keys.records()] == [record.id]
    principal = Principal(record.id, "classify", "acme")
    tenancy.audit.record(principal, "upload", tenant="acme", task="acme/t", version="000000a1")
    [entry] = tenancy.audit.newest(10, "acme")
    assert (entry.action, entry.task) == ("upload", "acme/t")
    verdicts = [tenancy.limiter.take(record.id, 1.0, 2).allowed for _ in range(3)]
    assert verdicts == [True, True, False]  # a burst of two, then the bucket is empty

    queue = JobQueue(url, prefix=prefix)
    spec = JobSpec.model_validate(
        {"task": "t", "method": "prefix", "train": [{"text": k, "label": k} for k in KEYWORDS] * 2}
    )
    job_id = queue.submit(spec)
    lease = queue.take("worker-1", block_s=1.0)
    assert lease is not None and lease.job_id == job_id
    assert queue.succeed(lease, version="000000b1", metrics={})
    assert queue.status(job_id).state == "succeeded"
    if kind == "cluster":
        # Everything on one slot: the hash tag of the prefix.
        assert queue.stream == f"{{{prefix}}}:jobs:stream" and store.prefix == f"{{{prefix}}}"
    queue.close()
    store.close()


def test_a_write_refused_at_connect_is_retried_until_the_primary_is_back(private_redis: RedisServer) -> None:
    """A refused connection sent nothing, so the write is retried on a new client (a failover in
    progress) and lands once a server answers again; the caller sees only the success."""
    target = RedisTarget.parse(private_redis.url)
    replicated = Replicated(target, 0, socket_timeout=0.5, refused_retry_s=60.0)
    first = replicated.client
    private_redis.stop()
    calls: list[int] = []
    retrying = threading.Event()

    def write(client: redis.Redis) -> object:
        calls.append(1)
        if len(calls) >= 2:
            retrying.set()  # the first attempt was refused: the server is down
        return client.set("k", "landed")

    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=replicated.run("k", write)))
    thread.start()
    assert retrying.wait(30), "the refused write was not retried"
    private_redis.start()
    thread.join(60)
    assert not thread.is_alive() and outcome == {"result": True}
    assert replicated.client is not first
    with redis.Redis.from_url(private_redis.url) as check:
        assert check.get("k") == b"landed"
    replicated.close()


def test_a_write_cut_after_it_was_sent_is_not_retried(private_redis: RedisServer) -> None:
    """A connection lost after sending may have run the write (a job queued twice if retried): the
    error reaches the caller after one attempt, and the write client is replaced."""
    replicated = Replicated(RedisTarget.parse(private_redis.url), 0, socket_timeout=0.5)
    first = replicated.client
    calls: list[int] = []

    def write(client: redis.Redis) -> None:
        calls.append(1)
        client.set("k", "sent")
        raise redis.ConnectionError("Connection closed by server.")  # the reply never came

    with pytest.raises(redis.ConnectionError):
        replicated.run("k", write)
    assert calls == [1] and replicated.client is not first
    # Nothing listens: refused each time until the retry budget is spent, then raised.
    from tests.redis_server import free_port  # a plugin module here: imported late, not rewritten

    dead = Replicated(
        RedisTarget.parse(f"redis://127.0.0.1:{free_port()}/0"), 0, socket_timeout=0.5, refused_retry_s=0.0
    )
    with pytest.raises(redis.ConnectionError):
        dead.run("k", lambda client: client.set("k", "v"))
    replicated.close()
    dead.close()
