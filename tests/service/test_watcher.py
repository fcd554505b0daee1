from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from prompts.disk_store import DiskPromptStore
from prompts.errors import TaskNotFoundError
from prompts.redis_store import RedisPromptStore
from prompts.store import PromptStore
from service.cache import PromptCache
from service.pool import PromptPool
from service.watcher import ChangeWatcher, DiskChangeWatcher, RedisChangeWatcher
from tests.factories import random_artifact

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

DEADLINE_S = 15.0


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` on the event loop until it holds, or fail after a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def put(store: PromptStore, artifact: PromptArtifact) -> None:
    store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())


def make_cache(store: PromptStore, backbone: Backbone) -> PromptCache:
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype)
    # An hour of pointer TTL: every change seen in these tests comes through the watcher.
    return PromptCache(
        store, backbone, pool, budget_bytes=1 << 30, max_artifact_bytes=1 << 26, pointer_ttl_s=3600
    )


@asynccontextmanager
async def watching(watcher: ChangeWatcher) -> AsyncIterator[ChangeWatcher]:
    watcher.start()
    try:
        await eventually(lambda: watcher.connected, "the watcher to connect")
        yield watcher
    finally:
        await watcher.stop()


@pytest.fixture
async def redis_store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisPromptStore]:
    store = RedisPromptStore(redis_url, prefix=redis_prefix)
    yield store
    store.close()


async def test_redis_messages_move_pointers_preload_and_forget(
    redis_store: RedisPromptStore, redis_url: str, redis_prefix: str, backbone: Backbone
) -> None:
    other_replica = RedisPromptStore(redis_url, prefix=redis_prefix)
    v1 = random_artifact(backbone.spec, task="t", seed=1)
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(redis_store, v1)
    put(redis_store, random_artifact(backbone.spec, task="never_served", seed=3))
    cache = make_cache(redis_store, backbone)
    async with watching(RedisChangeWatcher(redis_store, cache)) as watcher:
        assert (await cache.resolve("t")).version == v1.version
        put(other_replica, v2)
        await eventually(lambda: cache.current("t") == v2.version, "the put message")
        # The new version is loaded ahead of the first request that wants it.
        await eventually(lambda: len(cache) == 2, "the preload")
        misses = cache.misses
        assert (await cache.resolve("t")).version == v2.version and cache.misses == misses
        assert cache.swaps == 1

        other_replica.set_current("t", v1.version)
        await eventually(lambda: cache.current("t") == v1.version, "the rollback message")
        assert cache.swaps == 2

        # A task this replica never served is not loaded just because it changed.
        put(other_replica, random_artifact(backbone.spec, task="never_served", seed=4))
        events = watcher.events
        other_replica.delete("t")
        await eventually(lambda: watcher.events >= events + 1 and cache.current("t") is None, "the delete")
        assert len(cache) == 0 and cache.current("never_served") is None
        with pytest.raises(TaskNotFoundError):
            await cache.resolve("t")
    other_replica.close()


async def test_redis_reconnect_reconciles_changes_whose_messages_were_missed(
    private_redis: RedisServer, backbone: Backbone
) -> None:
    store = RedisPromptStore(private_redis.url)
    raw = redis.Redis.from_url(private_redis.url)
    v1 = random_artifact(backbone.spec, task="t", seed=1)
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(store, v1)
    put(store, v2)
    put(store, random_artifact(backbone.spec, task="gone", seed=3))
    cache = make_cache(store, backbone)
    try:
        async with watching(RedisChangeWatcher(store, cache, max_backoff_s=0.2)) as watcher:
            assert (await cache.resolve("t")).version == v2.version
            assert (await cache.resolve("gone")).task == "gone"
            reconciles = watcher.reconciles
            # Changes nobody announces (as if their messages were published while this replica
            # was disconnected): moved and deleted behind the channel's back.
            raw.set("ptserve:cur:t", v1.version)
            raw.delete("ptserve:cur:gone")
            assert cache.current("t") == v2.version
            # Cut the subscription; the watcher must reconnect and read the pointers again.
            assert raw.client_kill_filter(_type="pubsub") >= 1
            await eventually(
                lambda: watcher.reconciles > reconciles and watcher.connected,
                "a reconcile after reconnecting",
            )
            assert cache.current("t") == v1.version and cache.current("gone") is None
            assert watcher.connected

            # A real outage: the server stops, the watcher notices, then recovers on its own.
            raw.save()  # so the restarted server has the same data (like a persistent Redis)
            private_redis.stop()
            await eventually(lambda: not watcher.connected, "the watcher to notice the outage")
            private_redis.start()
            await eventually(lambda: watcher.connected, "the watcher to reconnect")
            put(store, v2)
            await eventually(lambda: cache.current("t") == v2.version, "a message after the restart")
    finally:
        raw.close()
        store.close()


async def test_disk_changes_by_other_processes_are_noticed(tmp_path: Path, backbone: Backbone) -> None:
    store = DiskPromptStore(tmp_path)
    other_process = DiskPromptStore(tmp_path)  # the worker or the CLI: no messages, only the store
    v1 = random_artifact(backbone.spec, task="t", seed=1)
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(store, v1)
    cache = make_cache(store, backbone)
    async with watching(DiskChangeWatcher(store, cache, poll_s=0.01)) as watcher:
        assert (await cache.resolve("t")).version == v1.version
        token = store.change_token()
        put(other_process, v2)
        assert store.change_token() != token
        await eventually(lambda: cache.current("t") == v2.version, "the disk put")
        other_process.set_current("t", v1.version)
        await eventually(lambda: cache.current("t") == v1.version, "the disk rollback")
        other_process.delete("t")
        await eventually(lambda: cache.current("t") is None, "the disk delete")
        assert len(cache) == 0 and watcher.reconciles >= 3
        with pytest.raises(TaskNotFoundError):
            await cache.resolve("t")
