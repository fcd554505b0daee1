"""Redis-specific behaviour of ``RedisPromptStore``; the shared contract is in test_store_contract.py.

Everything runs against a real ``redis-server`` (see tests/redis_server.py). Tests that stop the
server or change its configuration get a private one.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis
from redis.connection import Connection

from prompts.errors import (
    InvalidTaskNameError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from prompts.redis_store import ChangeEvent, RedisPromptStore, changes_channel, redact_url
from prompts.store import PromptStore

if TYPE_CHECKING:
    # Only for annotations: importing it at run time would beat pytest_plugins to the import and
    # keep pytest from rewriting its asserts.
    from tests.redis_server import RedisServer

# The Redis fixtures (redis_url, redis_prefix, private_redis) live with the server helper.
pytest_plugins = ("tests.redis_server",)

V1, V2, V3, V4, V5 = (f"{i:08x}" for i in range(0xA1, 0xA6))


def manifest(task: str = "t", **extra: Any) -> str:
    return json.dumps({"task": task, "labels": ["a", "b"], **extra})


def data_for(version: str) -> bytes:
    return f"artifact-{version}".encode() * 3


def put(store: PromptStore, task: str, version: str) -> None:
    store.put(task, version, data_for(version), manifest(task, v=version))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> Iterator[RedisPromptStore]:
    s = RedisPromptStore(redis_url, prefix=redis_prefix)
    yield s
    s.close()


# ------------------------------------------------------------------------------ layout and basics


def test_constructor_checks_arguments(redis_url: str) -> None:
    with pytest.raises(ValueError, match="keep_versions"):
        RedisPromptStore(redis_url, keep_versions=0)
    with pytest.raises(ValueError, match="prefix"):
        RedisPromptStore(redis_url, prefix="")
    with pytest.raises(StoreError, match="invalid prompt store URL"):
        RedisPromptStore("http://example.com/")


def test_key_layout(store: RedisPromptStore, client: redis.Redis, redis_prefix: str) -> None:
    # Pinned because other tools (and the change-notification subscriber) rely on these names.
    p = redis_prefix
    put(store, "t", V1)
    put(store, "t", V2)
    assert sorted(k.decode() for k in client.scan_iter(match=f"{p}:*")) == sorted(
        [
            f"{p}:art:t:{V1}",
            f"{p}:art:t:{V2}",
            f"{p}:man:t:{V1}",
            f"{p}:man:t:{V2}",
            f"{p}:cur:t",
            f"{p}:hist:t",
            f"{p}:tasks",
        ]
    )
    assert client.get(f"{p}:art:t:{V1}") == data_for(V1)
    assert client.get(f"{p}:man:t:{V2}") == manifest("t", v=V2).encode()
    assert client.get(f"{p}:cur:t") == V2.encode()
    assert client.lrange(f"{p}:hist:t", 0, -1) == [V2.encode(), V1.encode()]
    assert client.smembers(f"{p}:tasks") == {b"t"}
    assert store.channel == changes_channel(p) == f"{p}:changes"


def test_prefixes_isolate_stores(redis_url: str, redis_prefix: str) -> None:
    a = RedisPromptStore(redis_url, prefix=f"{redis_prefix}:a")
    b = RedisPromptStore(redis_url, prefix=f"{redis_prefix}:b")
    put(a, "t", V1)
    assert b.list_tasks() == []
    with pytest.raises(TaskNotFoundError):
        b.get("t")


def test_redact_url() -> None:
    assert redact_url("redis://user:s3cret@db.example:6380/2") == "redis://db.example:6380/2"
    assert redact_url("redis://:s3cret@10.0.0.1/0?password=x") == "redis://10.0.0.1/0"
    assert redact_url("rediss://[::1]:6379") == "rediss://[::1]:6379"
    assert redact_url("unix:///run/redis.sock?password=x") == "unix:///run/redis.sock"


def test_change_event_json() -> None:
    event = ChangeEvent("t", V1, "put")
    assert json.loads(event.to_json()) == {"task": "t", "version": V1, "op": "put"}
    assert ChangeEvent.from_json(event.to_json().encode()) == event
    assert ChangeEvent.from_json('{"task": "t", "version": null, "op": "delete"}') == ChangeEvent(
        "t", None, "delete"
    )
    for bad in ("[]", '{"task": "T", "op": "put"}', '{"task": "t", "op": "nuke"}', '{"task": "t"}'):
        with pytest.raises(ValueError):
            ChangeEvent.from_json(bad)


# ------------------------------------------------------------------------------------ corruption


def test_corrupt_pointer(store: RedisPromptStore, client: redis.Redis, redis_prefix: str) -> None:
    put(store, "t", V1)
    put(store, "other", V2)
    client.set(f"{redis_prefix}:cur:t", b"garbage!\xff")
    with pytest.raises(StoreError, match="corrupt current-version pointer for task 't'"):
        store.get("t")
    with pytest.raises(StoreError, match="corrupt current-version pointer"):
        store.current_version("t")
    with pytest.raises(StoreError, match="corrupt current-version pointer"):
        store.record("t")
    # One damaged task is left out of the listing instead of failing it for every task.
    assert [r.task for r in store.list_tasks()] == ["other"]
    # An explicit version still reads, and set_current repairs the pointer.
    assert store.get("t", V1).data == data_for(V1)
    store.set_current("t", V1)
    assert store.get("t").version == V1


def test_pointer_to_missing_version(store: RedisPromptStore, client: redis.Redis, redis_prefix: str) -> None:
    put(store, "t", V1)
    client.set(f"{redis_prefix}:cur:t", V4)
    with pytest.raises(StoreError, match=f"names version '{V4}'"):
        store.get("t")
    with pytest.raises(StoreError, match="not in the store"):
        store.current_version("t")
    with pytest.raises(StoreError, match="not in the store"):
        store.record("t")
    assert store.list_tasks() == []
    put(store, "t", V2)  # a re-put repairs it
    assert store.versions("t") == [V2, V1]


def test_corrupt_manifest(store: RedisPromptStore, client: redis.Redis, redis_prefix: str) -> None:
    put(store, "t", V1)
    client.set(f"{redis_prefix}:man:t:{V1}", "{not json")
    with pytest.raises(StoreError, match="corrupt manifest for task 't'"):
        store.record("t")
    assert store.list_tasks() == []
    client.delete(f"{redis_prefix}:man:t:{V1}")
    with pytest.raises(StoreError, match="is missing"):
        store.record("t")


def test_wrong_key_type_is_a_store_error(
    store: RedisPromptStore, client: redis.Redis, redis_prefix: str
) -> None:
    put(store, "t", V1)
    client.delete(f"{redis_prefix}:hist:t")
    client.set(f"{redis_prefix}:hist:t", "not a list")
    with pytest.raises(StoreError, match="failed to store version") as info:
        put(store, "t", V2)
    assert not isinstance(info.value, StoreUnavailableError | StoreFullError)
    # The script failed on its first command, a read, so it wrote nothing.
    assert client.get(f"{redis_prefix}:cur:t") == V1.encode()
    assert not client.exists(f"{redis_prefix}:art:t:{V2}")


# ------------------------------------------------------------------------------------ concurrency


def _put_many(url: str, prefix: str, worker: int, count: int) -> None:
    # keep_versions=1: every put prunes the version it replaces, so a reader that followed the
    # pointer in two steps would soon find the artifact gone.
    writer = RedisPromptStore(url, keep_versions=1, prefix=prefix)
    try:
        for i in range(count):
            put(writer, "shared", f"{worker:04x}{i:04x}")
    finally:
        writer.close()


def test_concurrent_writers_never_expose_a_missing_artifact(redis_url: str, redis_prefix: str) -> None:
    count = 30
    reader = RedisPromptStore(redis_url, prefix=redis_prefix)
    reads = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_put_many, redis_url, redis_prefix, w, count) for w in (1, 2)]
        # Read while they write: every read must return a complete version, and the pointer must
        # never name a version a concurrent put has pruned.
        while not all(f.done() for f in futures):
            try:
                got = reader.get("shared")
                record = reader.record("shared")
            except TaskNotFoundError:
                continue
            assert got.data == data_for(got.version)
            assert record.manifest["v"] == record.version
            assert record.size_bytes == len(data_for(record.version))
            assert record.versions == (record.version,)
            reads += 1
        for f in futures:
            f.result()  # re-raises a writer's exception
    assert reads > 0
    written = {f"{w:04x}{i:04x}" for w in (1, 2) for i in range(count)}
    current = reader.current_version("shared")
    assert current in written
    assert reader.versions("shared") == [current]
    assert reader.get("shared", current).data == data_for(current)
    reader.close()


# ---------------------------------------------------------------------------------- notifications


def _next_messages(pubsub: Any, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next ``count`` channel messages, waiting at most ``timeout`` seconds in all."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None and message["type"] == "message":
            got.append(json.loads(message["data"]))
    return got


def test_changes_are_published(store: RedisPromptStore, client: redis.Redis) -> None:
    pubsub: Any = cast(Any, client).pubsub()  # redis-py leaves pubsub() unannotated
    pubsub.subscribe(store.channel)
    # Wait for the subscription to be active, or the first messages could be missed.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "subscribe":
            break
    else:
        pytest.fail("no subscribe confirmation")
    try:
        put(store, "t", V1)
        put(store, "t", V2)
        store.set_current("t", V1)
        put(store, "t", V2)  # a re-put is a change too
        # Failed operations publish nothing.
        with pytest.raises(VersionNotFoundError):
            store.set_current("t", V3)
        with pytest.raises(TaskNotFoundError):
            store.delete("nope")
        store.delete("t")
        assert _next_messages(pubsub, 5) == [
            {"task": "t", "version": V1, "op": "put"},
            {"task": "t", "version": V2, "op": "put"},
            {"task": "t", "version": V1, "op": "rollback"},
            {"task": "t", "version": V2, "op": "put"},
            {"task": "t", "version": None, "op": "delete"},
        ]
        assert _next_messages(pubsub, 1, timeout=0.2) == []
    finally:
        pubsub.close()


# ------------------------------------------------------------------------------------- listing


def test_list_tasks_scales_with_few_round_trips(
    private_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = RedisPromptStore(private_redis.url, prefix="big")
    n = 2000
    names = [f"task-{i:05d}" for i in range(n)]
    for name in reversed(names):
        store.put(name, V1, b"x" * (len(name) + 7), manifest(name, i=name))
    put(store, names[0], V2)
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_resetstat()

    sends = 0
    real_send: Any = Connection.send_packed_command

    def counting_send(self: Connection, command: Any, check_health: bool = True) -> None:
        nonlocal sends
        sends += 1
        real_send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting_send)
    started = time.perf_counter()
    records = store.list_tasks()
    elapsed = time.perf_counter() - started
    monkeypatch.undo()

    assert [r.task for r in records] == names
    assert records[0].version == V2
    assert records[0].versions == (V2, V1)
    assert records[1].manifest == {"task": names[1], "labels": ["a", "b"], "i": names[1]}
    assert all(r.size_bytes == len(r.task) + 7 for r in records[1:])
    # SMEMBERS, SCRIPT EXISTS and one pipeline: a constant, not one round trip per task.
    assert sends <= 4, sends
    stats = admin.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 2  # 2,000 tasks in chunks of 1,000
    assert stats["cmdstat_smembers"]["calls"] == 1
    assert elapsed < 5.0, elapsed
    admin.close()
    store.close()


# ------------------------------------------------------------------------------------- failures


def test_invalid_names_are_rejected_before_any_redis_call(dead_redis_url: str) -> None:
    # Nothing listens there: a Redis call would raise StoreUnavailableError instead.
    store = RedisPromptStore(dead_redis_url, socket_timeout=0.5)
    for call in (
        lambda: store.put("../x", V1, b"x", manifest()),
        lambda: store.get("Bad"),
        lambda: store.get("Bad", V1),
        lambda: store.current_version("a/b/c"),
        lambda: store.versions(""),
        lambda: store.record("x" * 65),
        lambda: store.set_current("a:b", V1),
        lambda: store.delete(".."),
    ):
        with pytest.raises(InvalidTaskNameError):
            call()
    with pytest.raises(VersionNotFoundError):
        store.put("t", "../x", b"x", manifest())


def test_unreachable_url_is_redacted(dead_redis_url: str) -> None:
    with_password = dead_redis_url.replace("redis://", "redis://admin:s3cret@")
    store = RedisPromptStore(with_password, socket_timeout=0.5)
    with pytest.raises(StoreUnavailableError) as info:
        store.ping()
    assert info.value.message.startswith(f"prompt store {dead_redis_url} is unreachable: ")
    assert "s3cret" not in info.value.message
    assert "s3cret" not in repr(store)


def test_outage_raises_unavailable_and_recovers(private_redis: RedisServer) -> None:
    store = RedisPromptStore(private_redis.url, socket_timeout=1.0)
    put(store, "t", V1)
    put(store, "t", V2)
    private_redis.stop()
    calls: dict[str, Callable[[], object]] = {
        "ping": lambda: store.ping(),
        "put": lambda: put(store, "t", V3),
        "get": lambda: store.get("t"),
        "get version": lambda: store.get("t", V1),
        "get bad version": lambda: store.get("t", "nope"),
        "current_version": lambda: store.current_version("t"),
        "set_current": lambda: store.set_current("t", V1),
        "set_current bad version": lambda: store.set_current("t", "nope"),
        "versions": lambda: store.versions("t"),
        "list_tasks": lambda: store.list_tasks(),
        "record": lambda: store.record("t"),
        "delete": lambda: store.delete("t"),
    }
    for name, call in calls.items():
        with pytest.raises(StoreUnavailableError, match="is unreachable") as info:
            call()
        assert info.value.message.startswith(f"prompt store {private_redis.url} is unreachable"), name
    # The same store object works once the server is back on the same port (it restarts empty).
    private_redis.start()
    store.ping()
    with pytest.raises(TaskNotFoundError):
        store.get("t")
    put(store, "t", V3)
    assert store.get("t").data == data_for(V3)
    assert [r.task for r in store.list_tasks()] == ["t"]
    store.close()


def test_restart_while_idle_is_invisible(private_redis: RedisServer) -> None:
    # Pooled connections go stale across a restart; the first call after it must not fail.
    store = RedisPromptStore(private_redis.url)
    put(store, "t", V1)
    private_redis.restart()
    put(store, "t", V2)
    assert store.versions("t") == [V2]
    store.close()


def test_out_of_memory_is_store_full_and_keeps_previous(private_redis: RedisServer) -> None:
    store = RedisPromptStore(private_redis.url)
    put(store, "t", V1)
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1mb")
    big = b"\x01" * (2 * 1024 * 1024)
    with pytest.raises(StoreFullError, match="is full") as info:
        store.put("t", V2, big, manifest("t", v=V2))
    assert info.value.message.startswith(f"prompt store {private_redis.url} is full")
    assert store.current_version("t") == V1
    assert store.get("t").data == data_for(V1)
    assert store.versions("t") == [V1]
    with pytest.raises(VersionNotFoundError):
        store.get("t", V2)
    assert not admin.exists(f"ptserve:art:t:{V2}", f"ptserve:man:t:{V2}")
    # Reads and deletes still work when full; with memory back, so do writes.
    assert [r.version for r in store.list_tasks()] == [V1]
    admin.config_set("maxmemory", "0")
    store.put("t", V2, big, manifest("t", v=V2))
    assert store.get("t").data == big
    admin.close()
    store.close()


def test_timeout_is_unavailable(private_redis: RedisServer) -> None:
    # A server that accepts connections but does not answer (here: paused by DEBUG SLEEP).
    store = RedisPromptStore(private_redis.url, socket_timeout=0.2)
    put(store, "t", V1)
    admin: Any = redis.Redis.from_url(private_redis.url)  # execute_command is unannotated
    sleeper = threading.Thread(target=lambda: admin.execute_command("DEBUG", "SLEEP", "0.6"))
    sleeper.start()
    time.sleep(0.1)
    try:
        with pytest.raises(StoreUnavailableError, match="is unreachable"):
            store.get("t")
    finally:
        sleeper.join()
        admin.close()
    assert store.get("t").version == V1
    store.close()
