"""Prometheus metrics of one app, in a registry of its own (several apps can live in one process).

Request and batch metrics are pushed as things happen; cache, queue and training-job figures are
read from the runtime when ``/metrics`` is scraped, so they never drift from the real values.
"""

from __future__ import annotations

import logging
from collections import Counter as Counter_
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.batcher import BatchStats
from service.health import OK
from service.logs import RequestRecord
from service.tenancy import Principal, tenant_label

if TYPE_CHECKING:
    from service.engine import Row
    from service.runtime import Runtime

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """Every metric of one app; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, runtime: Callable[[], Runtime | None], max_tenant_series: int = 100) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Tenants named in per-tenant series, first come first named; the rest count as "other".
        self._tenants: set[str] = set()
        self._max_tenants = max_tenant_series
        # ``task`` is set only once a request resolved a real task (routes put it on request.state),
        # so unknown or malformed task names cannot grow the label set.
        self.requests = Counter(
            "ptserve_requests",
            "HTTP requests by route, task and status",
            ["route", "task", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ptserve_request_duration_seconds",
            "HTTP request latency by route, task and status",
            ["route", "task", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "ptserve_batches",
            "forward passes by what closed the batch (size, tokens, time, drain)",
            ["closed_by"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ptserve_batch_size", "rows per forward pass", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "ptserve_batch_tasks",
            "distinct task versions per forward pass",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "ptserve_batch_padding_ratio",
            "share of a batch's padded tokens that are padding (1 - real / padded)",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.forward = Histogram(
            "ptserve_forward_seconds", "wall time of one forward pass", buckets=_FORWARD_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "ptserve_queue_wait_seconds",
            "how long the oldest row of a batch waited before its forward started",
            buckets=_FORWARD_BUCKETS,
            registry=r,
        )
        self.tenant_requests = Counter(
            "ptserve_tenant_requests",
            "HTTP requests by the key's tenant ('platform' for platform keys) and status",
            ["tenant", "status"],
            registry=r,
        )
        self.tenant_rows = Counter(
            "ptserve_tenant_rows", "texts classified, by the task's tenant", ["tenant"], registry=r
        )
        self.tenant_refusals = Counter(
            "ptserve_tenant_refusals",
            "requests refused by a tenant's limits (rate_limited, too_many_requests), by tenant",
            ["tenant", "reason"],
            registry=r,
        )
        self.registry.register(RuntimeCollector(runtime, self.tenant))
        # (route, task, status) -> that series' counter and histogram children (request_series).
        self._request_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._tenant_series: dict[tuple[str, str], Any] = {}  # (tenant label, status) -> its counter

    def tenant(self, tenant: str | None) -> str:
        """The label of ``tenant`` (None or "": the platform), bounded by ``max_tenant_series``."""
        if not tenant:
            return "platform"
        if tenant not in self._tenants:
            if len(self._tenants) >= self._max_tenants:
                return "other"
            self._tenants.add(tenant)
        return tenant

    def observe_request(self, record: RequestRecord) -> None:
        self.observe_requests(
            record.route, record.task, record.status, record.key, record.tenant, (record.latency_ms,)
        )

    def observe_requests(
        self,
        route: str | None,
        task: str | None,
        status_code: int,
        key: str | None,
        tenant: str | None,
        latencies_ms: Sequence[float],
    ) -> None:
        """Requests of one series, one per latency (a front end's tally, or one request here)."""
        status = str(status_code)
        labels = (route or "unmatched", task or "", status)
        # The series' children, looked up once: ``labels()`` costs twice the increments, and the
        # engine of serve --frontends N counts every front end's requests on its one loop.
        series = self._request_series.get(labels)
        if series is None:
            series = self._request_series[labels] = (
                self.requests.labels(*labels),
                self.latency.labels(*labels),
            )
        series[0].inc(len(latencies_ms))
        for latency_ms in latencies_ms:
            series[1].observe(latency_ms / 1000.0)
        if key is not None:
            group = (self.tenant(tenant), status)
            counter = self._tenant_series.get(group)
            if counter is None:
                counter = self._tenant_series[group] = self.tenant_requests.labels(*group)
            counter.inc(len(latencies_ms))

    def observe_refusal(self, principal: Principal, reason: str, count: int = 1) -> None:
        self.tenant_refusals.labels(self.tenant(principal.tenant), reason).inc(count)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batches.labels(stats.closed_by).inc()
        self.batch_size.observe(stats.size)
        self.forward.observe(stats.run_s)
        self.queue_wait.observe(stats.queue_wait_s)
        if stats.padded_tokens > 0:
            self.padding_ratio.observe(1.0 - stats.real_tokens / stats.padded_tokens)

    def observe_rows(self, rows: Sequence[Row]) -> None:
        """Called from the forward thread with each batch's rows (prometheus-client is thread-safe)."""
        self.batch_tasks.observe(len({(row.task.task, row.task.version) for row in rows}))
        per_tenant = Counter_(tenant_label(row.task.task) for row in rows)
        for tenant, count in per_tenant.items():
            self.tenant_rows.labels(self.tenant(tenant)).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """Reads the cache, batcher and job queue at scrape time (no job queue: no job figures)."""

    def __init__(self, runtime: Callable[[], Runtime | None], tenant: Callable[[str | None], str]) -> None:
        self._runtime = runtime
        self._tenant = tenant

    def describe(self) -> list[Metric]:
        # Nothing up front: what exists depends on the runtime, which appears in the lifespan.
        return []

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime()
        if runtime is None:
            return
        yield _gauge("ptserve_queue_depth", "rows waiting for a batch", runtime.batcher.queue_depth)
        # Runs in the scrape's thread (see install_metrics_route); at most one ping per second.
        store_up = runtime.store_health.probe(runtime.store) == OK
        yield _gauge(
            "ptserve_store_up", "1 if this replica reaches the prompt store, else 0", float(store_up)
        )
        if runtime.watcher is not None:
            yield _gauge(
                "ptserve_store_watch_connected",
                "1 while this replica follows the store's changes (subscription or disk poll up), else 0",
                float(runtime.watcher.connected),
            )
        cache = runtime.cache
        yield _gauge("ptserve_cache_entries", "task versions in the device prompt cache", len(cache))
        yield _gauge("ptserve_cache_bytes", "bytes of task tensors in the device prompt cache", cache.nbytes)
        yield _gauge(
            "ptserve_cache_host_bytes", "bytes of parsed artifacts in the host cache tier", cache.host_nbytes
        )
        yield _counter("ptserve_cache_hits", "prompt-cache lookups served from the cache", cache.hits)
        yield _counter(
            "ptserve_cache_misses", "prompt-cache lookups that loaded from the store", cache.misses
        )
        yield _counter(
            "ptserve_cache_evictions", "task versions evicted from the device cache", cache.evictions
        )
        yield _counter("ptserve_swaps", "times this replica saw a task's current version change", cache.swaps)
        per_tenant = GaugeMetricFamily(
            "ptserve_tenant_cache_bytes",
            "bytes of a tenant's tasks in the device prompt cache",
            labels=["tenant"],
        )
        totals: dict[str, int] = {}
        for tenant, nbytes in cache.tenant_bytes().items():
            label = self._tenant(tenant)
            totals[label] = totals.get(label, 0) + nbytes
        for label, nbytes in sorted(totals.items()):
            per_tenant.add_metric([label], nbytes)
        yield per_tenant
        jobs = runtime.jobs
        if jobs is not None:
            family = GaugeMetricFamily("ptserve_training_jobs", "training jobs by state", labels=["state"])
            try:
                counts: dict[str, int] = jobs.counts_by_state()
            except Exception as exc:  # a scrape must not fail because Redis is down
                logger.warning("training-job counts unavailable: %s", exc)
                counts = {}
            for state, count in sorted(counts.items()):
                family.add_metric([state], count)
            yield family


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)
