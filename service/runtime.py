"""The components one replica runs, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from prompts.backbone import Backbone
from prompts.disk_store import DiskPromptStore
from prompts.jobs import JobQueue
from prompts.redis_store import RedisPromptStore
from prompts.redis_target import is_redis_url
from prompts.store import PromptStore
from service.audit import AuditLog, DiskAuditBackend, RedisAuditBackend
from service.batcher import BatchStats, DynamicBatcher, group_window
from service.cache import PromptCache
from service.engine import Engine, Row
from service.health import StoreHealth
from service.keystore import DiskKeyBackend, KeyStore, RedisKeyBackend
from service.memory import HeapTrimmer
from service.pool import PromptPool
from service.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from service.settings import Settings
from service.watcher import ChangeWatcher, make_watcher


@dataclass
class Runtime:
    settings: Settings
    backbone: Backbone
    store: PromptStore
    cache: PromptCache
    engine: Engine
    batcher: DynamicBatcher[Row, list[float]]
    watcher: ChangeWatcher | None = None
    upload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    jobs: JobQueue | None = None  # None: training jobs are disabled on this replica
    keys: KeyStore | None = None  # stored API keys (None: a store that keeps none)
    audit: AuditLog | None = None
    limiter: RateLimiter = field(default_factory=LocalRateLimiter)
    store_health: StoreHealth = field(default_factory=StoreHealth)
    draining: bool = False  # set at shutdown: /readyz answers 503 while admitted requests finish


@dataclass(frozen=True)
class Tenancy:
    """What a store's backend keeps besides prompts: API keys, the audit trail, rate-limit buckets."""

    keys: KeyStore | None
    audit: AuditLog | None
    limiter: RateLimiter


def open_tenancy(settings: Settings, store: PromptStore) -> Tenancy:
    """Keys, audit trail and rate limits in the same backend as ``store`` (Redis or the disk root)."""
    if isinstance(store, RedisPromptStore):
        client, prefix = store.client, store.prefix
        return Tenancy(
            KeyStore(RedisKeyBackend(client, prefix, store.durable), settings.key_refresh_s),
            AuditLog(RedisAuditBackend(client, prefix, settings.audit_max_entries)),
            RedisRateLimiter(client, prefix),
        )
    if isinstance(store, DiskPromptStore):
        return Tenancy(
            KeyStore(DiskKeyBackend(store.root), settings.key_refresh_s),
            AuditLog(DiskAuditBackend(store.root)),
            LocalRateLimiter(),
        )
    return Tenancy(None, None, LocalRateLimiter())


def open_store(location: str, keep_versions: int = 10, write_replicas: int | None = None) -> PromptStore:
    """The store a ``store`` setting or flag names: a Redis URL (any form), or else a directory path."""
    if is_redis_url(location):
        return RedisPromptStore(location, keep_versions=keep_versions, write_replicas=write_replicas)
    return DiskPromptStore(location, keep_versions=keep_versions)


def open_job_queue(settings: Settings) -> JobQueue | None:
    """The training-job queue the settings name, or None when jobs are disabled (no Redis to use)."""
    url = settings.job_queue_url()
    if url is None:
        return None
    return JobQueue(
        url,
        claim_idle_s=settings.worker_claim_idle_s,
        max_attempts=settings.worker_max_attempts,
        retention_s=settings.job_retention_s,
        write_replicas=settings.write_replicas,
    )


def pipeline_depth(settings: Settings, engine: Engine) -> int:
    """Batches in flight: the setting, else 2 where the engine replays CUDA graphs, else 1.

    Overlap pays only where a forward leaves the host idle: a replayed graph does (H100, MiniLM:
    x1.03-1.14 rows/s at 8-64 rows per batch); an eager GPU forward keeps the host busy launching
    kernels, and on a CPU both batches would share the same cores (benchmarks/RESULTS.md).
    """
    if settings.pipeline_depth is not None:
        return settings.pipeline_depth
    return 2 if engine.graphs is not None else 1


def build_runtime(
    settings: Settings,
    backbone: Backbone,
    store: PromptStore,
    *,
    on_batch: Callable[[BatchStats], None] | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> Runtime:
    """Wire the components; the caller starts the batcher and the watcher inside the event loop.

    ``on_batch`` gets every batch's stats (on the event loop), ``on_rows`` every batch's rows just
    before its forward (in the forward thread): the metrics hooks.
    """
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype)
    cache = PromptCache(
        store,
        backbone,
        pool,
        budget_bytes=settings.cache_bytes,
        max_artifact_bytes=settings.max_artifact_bytes,
        pointer_ttl_s=settings.pointer_ttl_s,
        host_budget_bytes=settings.host_cache_bytes,
        tenant_share=settings.tenant_cache_share,
    )
    engine = Engine(
        backbone,
        pool,
        HeapTrimmer(settings.heap_trim_interval_s),
        cuda_graphs=settings.cuda_graphs,
        max_rows=settings.max_batch_size,
    )
    run_batch = engine.run_batch
    if on_rows is not None:
        observe = on_rows

        def run_batch(rows: list[Row]) -> list[list[float]]:
            observe(rows)
            return engine.run_batch(rows)

    batcher: DynamicBatcher[Row, list[float]] = DynamicBatcher(
        run_batch,
        on_batch=on_batch,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_wait_ms,
        cost=Row.cost,
        max_queue=settings.max_queue,
        group_window=group_window(settings.max_batch_size) if settings.length_grouping else None,
        pipeline_depth=pipeline_depth(settings, engine),
        # Rows of different tenants (task namespaces) share batches in round robin while several wait.
        fair_group=lambda row: row.task.tenant,
    )
    watcher = None
    if settings.watch_changes:
        watcher = make_watcher(
            store, cache, disk_poll_s=settings.disk_change_poll_s, max_backoff_s=settings.watch_max_backoff_s
        )
    return Runtime(settings, backbone, store, cache, engine, batcher, watcher)
