from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from prompts.disk_store import DiskPromptStore
from prompts.errors import InvalidTaskNameError, StoreUnavailableError, TaskNotFoundError
from prompts.store import PromptStore, StoredArtifact
from service.cache import PromptCache, artifact_nbytes
from service.errors import TaskUnavailableError
from service.pool import PromptPool
from tests.factories import random_artifact

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)


class CountingStore(DiskPromptStore):
    """A real disk store that records which threads read artifacts, and can hold reads at a gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[tuple[str, str | None, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def get(self, task: str, version: str | None = None) -> StoredArtifact:
        self.gets.append((task, version, threading.get_ident()))
        assert self.gate.wait(10)
        return super().get(task, version)


def put(store: PromptStore, artifact: PromptArtifact) -> None:
    store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())


def make_cache(store: PromptStore, backbone: Backbone, **kwargs: float) -> PromptCache:
    options = {"budget_bytes": 1 << 30, "max_artifact_bytes": 1 << 26, "pointer_ttl_s": 60.0} | kwargs
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype)
    return PromptCache(store, backbone, pool, **options)  # type: ignore[arg-type]


async def test_concurrent_misses_load_once_off_the_event_loop(tmp_path: Path, backbone: Backbone) -> None:
    store = CountingStore(tmp_path)
    artifact = random_artifact(backbone.spec, task="hot")
    put(store, artifact)
    cache = make_cache(store, backbone)
    store.gate.clear()
    waiters = [asyncio.create_task(cache.resolve("hot")) for _ in range(20)]
    # Every waiter counts its miss before awaiting the load, which is held at the gate meanwhile.
    async with asyncio.timeout(10):
        while cache.misses < 20:
            await asyncio.sleep(0.001)
    store.gate.set()
    loaded = await asyncio.gather(*waiters)
    assert len(store.gets) == 1
    assert store.gets[0][2] != threading.get_ident()
    assert all(x is loaded[0] for x in loaded)
    assert loaded[0].version == artifact.version
    assert cache.misses == 20 and cache.hits == 0
    assert await cache.resolve("hot") is loaded[0] and cache.hits == 1


async def test_a_cancelled_requester_does_not_cancel_the_load(tmp_path: Path, backbone: Backbone) -> None:
    store = CountingStore(tmp_path)
    put(store, random_artifact(backbone.spec, task="t"))
    cache = make_cache(store, backbone)
    store.gate.clear()
    first = asyncio.create_task(cache.resolve("t"))
    while not store.gets:
        await asyncio.sleep(0)
    second = asyncio.create_task(cache.resolve("t"))
    await asyncio.sleep(0)
    first.cancel()
    store.gate.set()
    assert (await second).task == "t"
    assert len(store.gets) == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_lru_eviction_stays_within_budget(tmp_path: Path, backbone: Backbone) -> None:
    store = DiskPromptStore(tmp_path)
    artifacts = [random_artifact(backbone.spec, task=f"t{i}", prefix_length=4, seed=i) for i in range(3)]
    for a in artifacts:
        put(store, a)
    probe = make_cache(store, backbone)
    size = (await probe.resolve("t0")).nbytes
    cache = make_cache(store, backbone, budget_bytes=2 * size)
    t0 = await cache.resolve("t0")
    await cache.resolve("t1")
    await cache.resolve("t0")  # t0 becomes most recent; t1 is now the eviction candidate
    await cache.resolve("t2")
    assert len(cache) == 2 and cache.nbytes == 2 * size and cache.evictions == 1
    misses = cache.misses
    assert await cache.resolve("t0") is t0 and cache.misses == misses
    await cache.resolve("t1")
    assert cache.misses == misses + 1


async def test_versions_are_keys_and_install_switches_the_pointer(tmp_path: Path, backbone: Backbone) -> None:
    store = DiskPromptStore(tmp_path)
    v1 = random_artifact(backbone.spec, task="t", seed=1)
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(store, v1)
    cache = make_cache(store, backbone)
    old = await cache.resolve("t")
    put(store, v2)
    await cache.install(v2)
    new = await cache.resolve("t")
    assert (old.version, new.version) == (v1.version, v2.version)
    assert old.slot != new.slot  # both stay usable: a request pinned to v1 still reads v1's slot
    cache.forget("t")
    assert len(cache) == 0 and cache.nbytes == 0


async def test_resolve_now_answers_only_what_resolve_would_without_waiting(
    tmp_path: Path, backbone: Backbone
) -> None:
    store = DiskPromptStore(tmp_path)
    v1 = random_artifact(backbone.spec, task="t", seed=1)
    put(store, v1)
    cache = make_cache(store, backbone)
    assert cache.resolve_now("t") is None  # no pointer yet: only resolve reads the store
    assert cache.resolve_now("../etc") is None  # never a pointer: resolve raises the name error
    loaded = await cache.resolve("t")
    hits = cache.hits
    assert cache.resolve_now("t") is loaded and cache.hits == hits + 1
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(store, v2)
    await cache.install(v2)
    now = cache.resolve_now("t")
    assert now is not None and now.version == v2.version
    cache.forget("t")
    assert cache.resolve_now("t") is None
    expiring = make_cache(store, backbone, pointer_ttl_s=0.0)
    assert (await expiring.resolve("t")).version == v2.version
    assert expiring.resolve_now("t") is None  # the pointer is due for a store read


async def test_pointer_changes_by_other_processes_are_seen_after_the_ttl(
    tmp_path: Path, backbone: Backbone
) -> None:
    store = DiskPromptStore(tmp_path)
    other_process = DiskPromptStore(tmp_path)
    put(store, random_artifact(backbone.spec, task="t", seed=1))
    fresh = make_cache(store, backbone, pointer_ttl_s=0.0)
    trusting = make_cache(store, backbone, pointer_ttl_s=3600.0)
    first = await fresh.resolve("t")
    assert (await trusting.resolve("t")).version == first.version
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(other_process, v2)
    assert (await fresh.resolve("t")).version == v2.version
    assert (await trusting.resolve("t")).version == first.version
    other_process.delete("t")
    with pytest.raises(TaskNotFoundError):
        await fresh.resolve("t")


async def test_unknown_invalid_and_corrupt_tasks(tmp_path: Path, backbone: Backbone) -> None:
    store = DiskPromptStore(tmp_path)
    cache = make_cache(store, backbone)
    with pytest.raises(TaskNotFoundError, match="unknown task 'ghost'"):
        await cache.resolve("ghost")
    with pytest.raises(InvalidTaskNameError):
        await cache.resolve("../etc")
    store.put("broken", "0123456789abcdef", b"definitely not safetensors", '{"task": "broken"}')
    with pytest.raises(TaskUnavailableError, match="stored version 0123456789abcdef of task 'broken'"):
        await cache.resolve("broken")


async def test_device_misses_are_served_from_the_host_tier(tmp_path: Path, backbone: Backbone) -> None:
    store = CountingStore(tmp_path)
    for i in range(3):
        put(store, random_artifact(backbone.spec, task=f"t{i}", seed=i))
    probe = make_cache(store, backbone)
    size = (await probe.resolve("t0")).nbytes
    host_size = artifact_nbytes(random_artifact(backbone.spec, task="t0", seed=0))
    # Room for one task on the device and two in host memory.
    cache = make_cache(store, backbone, budget_bytes=size, host_budget_bytes=2 * host_size)
    store.gets.clear()
    await cache.resolve("t0")
    await cache.resolve("t1")  # evicts t0 from the device; its parsed artifact stays in host memory
    assert len(cache) == 1 and cache.evictions == 1 and cache.host_nbytes == 2 * host_size
    again = await cache.resolve("t0")
    assert again.version == random_artifact(backbone.spec, task="t0", seed=0).version
    assert [g[0] for g in store.gets] == ["t0", "t1"] and cache.host_hits == 1
    await cache.resolve("t2")  # host memory holds two: the least recently used one (t1) goes
    assert cache.host_nbytes == 2 * host_size
    await cache.resolve("t1")
    assert [g[0] for g in store.gets] == ["t0", "t1", "t2", "t1"]
    cache.forget("t1")
    assert cache.host_nbytes == host_size


class SlowPointerStore(DiskPromptStore):
    """A real disk store whose pointer reads answer only once ``gate`` is set (a slow store).

    Each read counts itself and sets ``read`` as soon as it has the pointer, before waiting.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0
        self.read = threading.Event()
        self.gate = threading.Event()

    def current_version(self, task: str) -> str:
        version = super().current_version(task)
        self.reads += 1
        self.read.set()
        assert self.gate.wait(10)
        return version


async def test_a_pointer_read_older_than_a_change_message_is_not_kept(
    tmp_path: Path, backbone: Backbone
) -> None:
    store = SlowPointerStore(tmp_path)
    v1 = random_artifact(backbone.spec, task="t", seed=1)
    v2 = random_artifact(backbone.spec, task="t", seed=2)
    put(store, v1)
    cache = make_cache(store, backbone)
    first = asyncio.create_task(cache.resolve("t"))
    assert await asyncio.to_thread(store.read.wait, 10)
    put(store, v2)
    cache.apply_change("t", v2.version)  # the message arrives while the older read is in flight
    store.gate.set()
    # The request that started first may get v1, but v1 must not become this replica's pointer.
    assert (await first).version == v1.version
    assert cache.current("t") is None
    assert (await cache.resolve("t")).version == v2.version and cache.current("t") == v2.version


async def test_store_outage_serves_cached_tasks_and_refuses_uncached_ones(
    private_redis: RedisServer, backbone: Backbone
) -> None:
    from prompts.redis_store import RedisPromptStore

    store = RedisPromptStore(private_redis.url)
    try:
        put(store, random_artifact(backbone.spec, task="cached", seed=1))
        put(store, random_artifact(backbone.spec, task="uncached", seed=2))
        # TTL 0: every request asks the store for the pointer, so each one meets the outage.
        cache = make_cache(store, backbone, pointer_ttl_s=0.0)
        served = await cache.resolve("cached")
        redis.Redis.from_url(private_redis.url).save()  # the restarted server gets the same data
        private_redis.stop()
        for _ in range(3):
            assert await cache.resolve("cached") is served
        with pytest.raises(StoreUnavailableError, match="'uncached' is not cached on this replica"):
            await cache.resolve("uncached")
        private_redis.start()
        assert (await cache.resolve("uncached")).task == "uncached"
        assert await cache.resolve("cached") is served
    finally:
        store.close()


async def test_change_messages_preload_hot_tasks_only(tmp_path: Path, backbone: Backbone) -> None:
    store = CountingStore(tmp_path)
    put(store, random_artifact(backbone.spec, task="cold", seed=1))
    put(store, random_artifact(backbone.spec, task="hot", seed=2))
    probe = make_cache(store, backbone)
    size = (await probe.resolve("hot")).nbytes
    cache = make_cache(store, backbone, budget_bytes=size)  # one task on the device
    await cache.resolve("cold")
    await cache.resolve("hot")  # pushes "cold" off the device
    cold2 = random_artifact(backbone.spec, task="cold", seed=3)
    hot2 = random_artifact(backbone.spec, task="hot", seed=4)
    put(store, cold2)
    put(store, hot2)
    store.gets.clear()
    cache.apply_change("cold", cold2.version)
    cache.apply_change("hot", hot2.version)
    cache.apply_change("unknown", hot2.version)
    assert (cache.current("cold"), cache.current("hot")) == (cold2.version, hot2.version)
    assert cache.current("unknown") is None and cache.swaps == 2
    # Only the hot task's new version is being loaded ahead of its first request.
    assert set(cache._loading) == {("hot", hot2.version)}
    assert (await cache.resolve("hot")).version == hot2.version
    # The request joined (or found) the preload: one store read in all.
    assert [g[:2] for g in store.gets] == [("hot", hot2.version)]


async def test_an_upload_overtaken_by_a_newer_change_does_not_bring_its_version_back(
    tmp_path: Path, backbone: Backbone
) -> None:
    store = DiskPromptStore(tmp_path)
    v1, v2, v3 = (random_artifact(backbone.spec, task="t", seed=s) for s in (1, 2, 3))
    put(store, v1)
    cache = make_cache(store, backbone)
    assert (await cache.resolve("t")).version == v1.version
    with cache.changing("t") as since:
        put(store, v2)  # this replica's upload...
        other = DiskPromptStore(tmp_path)
        put(other, v3)  # ...overtaken by another replica's, whose message arrives first
        cache.apply_change("t", v3.version)
        await cache.install(v2, since)
    # Not v2: the pointer is re-read from the store, which says v3.
    assert (await cache.resolve("t")).version == v3.version


async def test_unknown_task_names_leave_no_bookkeeping_behind(tmp_path: Path, backbone: Backbone) -> None:
    store = DiskPromptStore(tmp_path)
    cache = make_cache(store, backbone)
    for i in range(50):
        with pytest.raises(TaskNotFoundError):
            await cache.resolve(f"nope-{i}")
    put(store, random_artifact(backbone.spec, task="real"))
    await cache.resolve("real")
    cache.forget("real")
    assert cache._written_at == {} and cache._reading == {}  # the tables unknown names would grow


async def test_a_load_that_finishes_after_a_delete_is_not_cached(tmp_path: Path, backbone: Backbone) -> None:
    store = CountingStore(tmp_path)
    artifact = random_artifact(backbone.spec, task="gone")
    put(store, artifact)
    cache = make_cache(store, backbone)
    store.gate.clear()
    waiter = asyncio.create_task(cache.resolve("gone"))
    async with asyncio.timeout(10):
        while not store.gets:  # the load is held at the gate
            await asyncio.sleep(0.01)
    cache.forget("gone")  # deleted while it loads
    store.gate.set()
    served = await waiter
    assert served.version == artifact.version  # the admitted request is still served
    assert len(cache) == 0 and cache.nbytes == 0 and cache.host_nbytes == 0


async def test_concurrent_pointer_reads_of_one_task_share_one_store_read(
    tmp_path: Path, backbone: Backbone
) -> None:
    store = SlowPointerStore(tmp_path)
    artifact = random_artifact(backbone.spec, task="t")
    put(store, artifact)
    cache = make_cache(store, backbone, pointer_ttl_s=0.0)
    waiters = [asyncio.create_task(cache.resolve("t")) for _ in range(20)]
    assert await asyncio.to_thread(store.read.wait, 10)  # one read is at the gate
    store.gate.set()
    served = await asyncio.gather(*waiters)
    assert {t.version for t in served} == {artifact.version}
    assert store.reads == 1  # not one thread per request
