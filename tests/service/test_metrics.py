from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from prompts.backbone import Backbone
from prompts.jobs import JobQueue
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.factories import random_artifact
from tests.synthetic import job_request

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

Labels = tuple[tuple[str, str], ...]


def scrape(client: TestClient) -> dict[tuple[str, Labels], float]:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(tmp_path: Path, backbone: Backbone) -> Iterator[TestClient]:
    settings = Settings(store=str(tmp_path / "store"), max_wait_ms=1)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        for task, seed in (("alpha", 1), ("beta", 2)):
            artifact = random_artifact(backbone.spec, task=task, seed=seed)
            assert c.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code == 201
        yield c


CLASSIFY = "/v1/classify"


def test_request_counters_and_latency_move_with_traffic(client: TestClient) -> None:
    before = scrape(client)
    for _ in range(3):
        assert client.post(CLASSIFY, json={"task": "alpha", "text": "one"}).status_code == 200
    assert client.post(CLASSIFY, json={"task": "beta", "texts": ["a", "b"]}).status_code == 200
    assert client.post(CLASSIFY, json={"task": "nope", "text": "x"}).status_code == 404
    assert client.post(CLASSIFY, json={"task": "alpha", "text": ""}).status_code == 422
    assert client.get("/v1/prompts/{task}").status_code == 422
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ptserve_requests_total", route=CLASSIFY, task="alpha", status="200") == 3
    assert delta("ptserve_requests_total", route=CLASSIFY, task="beta", status="200") == 1
    # Unknown or rejected tasks are counted without a task label, so they cannot grow the label set.
    assert delta("ptserve_requests_total", route=CLASSIFY, task="", status="404") == 1
    assert delta("ptserve_requests_total", route=CLASSIFY, task="", status="422") == 1
    assert not any(labels and ("task", "nope") in labels for _, labels in after)
    # Routes are labelled by their template, not by the raw path.
    assert delta("ptserve_requests_total", route="/v1/prompts/{task}", task="", status="422") == 1
    latency = "ptserve_request_duration_seconds"
    assert delta(f"{latency}_count", route=CLASSIFY, task="alpha", status="200") == 3
    assert delta(f"{latency}_sum", route=CLASSIFY, task="alpha", status="200") > 0
    assert delta(f"{latency}_bucket", route=CLASSIFY, task="alpha", status="200", le="+Inf") == 3


def test_batch_metrics_follow_the_forwards(client: TestClient) -> None:
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    before = scrape(client)
    batches_before = runtime.engine.batches
    texts = ["a short one", "a much longer text than the short one, to be padded against"]
    assert client.post(CLASSIFY, json={"task": "alpha", "texts": texts}).status_code == 200
    assert client.post(CLASSIFY, json={"task": "beta", "text": "b"}).status_code == 200
    after = scrape(client)
    forwards = runtime.engine.batches - batches_before

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert forwards >= 1
    assert delta("ptserve_batch_size_count") == forwards
    assert delta("ptserve_batch_size_sum") == 3  # every text ran in exactly one forward
    assert delta("ptserve_batch_tasks_count") == forwards
    assert 2 <= delta("ptserve_batch_tasks_sum") <= 3  # alpha and beta, together or apart
    assert delta("ptserve_forward_seconds_count") == forwards
    assert delta("ptserve_forward_seconds_sum") > 0
    assert delta("ptserve_queue_wait_seconds_count") == forwards
    assert delta("ptserve_batch_padding_ratio_count") == forwards
    closed = sum(delta("ptserve_batches_total", closed_by=why) for why in ("size", "tokens", "time", "drain"))
    assert closed == forwards


def test_cache_and_queue_figures_are_read_at_scrape_time(client: TestClient) -> None:
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    cache = runtime.cache
    assert client.post(CLASSIFY, json={"task": "alpha", "text": "warm"}).status_code == 200
    samples = scrape(client)
    assert value(samples, "ptserve_cache_hits_total") == cache.hits >= 1
    assert value(samples, "ptserve_cache_misses_total") == cache.misses
    assert value(samples, "ptserve_cache_evictions_total") == cache.evictions
    assert value(samples, "ptserve_cache_entries") == len(cache) == 2
    assert value(samples, "ptserve_cache_bytes") == cache.nbytes > 0
    assert ("ptserve_queue_depth", ()) in samples
    hits = cache.hits
    assert client.post(CLASSIFY, json={"task": "alpha", "text": "again"}).status_code == 200
    assert value(scrape(client), "ptserve_cache_hits_total") == hits + 1


def test_evictions_and_misses_show_up(tmp_path: Path, backbone: Backbone) -> None:
    one = random_artifact(backbone.spec, task="one", seed=1)
    two = random_artifact(backbone.spec, task="two", seed=2)
    settings = Settings(store=str(tmp_path / "s"), max_wait_ms=1, cache_bytes=1)  # room for one task
    with TestClient(create_app(settings, backbone=backbone)) as c:
        for artifact in (one, two):
            assert c.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)}).status_code == 201
        before = scrape(c)
        assert c.post(CLASSIFY, json={"task": "one", "text": "x"}).json()["version"] == one.version
        after = scrape(c)
        assert value(after, "ptserve_cache_misses_total") == value(before, "ptserve_cache_misses_total") + 1
        assert (
            value(after, "ptserve_cache_evictions_total")
            >= value(before, "ptserve_cache_evictions_total") + 1
        )
        assert value(after, "ptserve_cache_entries") == 1


def test_swaps_and_host_bytes_follow_the_cache(client: TestClient, backbone: Backbone) -> None:
    before = scrape(client)
    newer = random_artifact(backbone.spec, task="alpha", seed=11)
    assert client.post("/v1/prompts", files={"file": ("a.safetensors", newer.data)}).status_code == 201
    after = scrape(client)
    assert value(after, "ptserve_swaps_total") == value(before, "ptserve_swaps_total") + 1
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert value(after, "ptserve_cache_host_bytes") == runtime.cache.host_nbytes


def test_training_jobs_by_state_come_from_the_real_queue(
    tmp_path: Path, backbone: Backbone, private_redis: RedisServer
) -> None:
    settings = Settings(store=str(tmp_path / "store"), jobs_url=private_redis.url, max_wait_ms=1)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        runtime: Runtime = c.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.jobs is not None
        before = scrape(c)
        assert ("ptserve_training_jobs", (("state", "queued"),)) in before
        body = job_request(epochs=1)
        assert c.post("/v1/training-jobs", json=body).status_code == 202
        assert c.post("/v1/training-jobs", json=body).status_code == 202
        after = scrape(c)
        queued = value(after, "ptserve_training_jobs", state="queued")
        assert queued == value(before, "ptserve_training_jobs", state="queued") + 2
        assert queued == runtime.jobs.counts_by_state()["queued"]


def test_a_failing_job_queue_does_not_break_the_scrape(client: TestClient, dead_redis_url: str) -> None:
    # The queue's Redis is down: nothing listens on its port.
    client.app.state.runtime.jobs = JobQueue(dead_redis_url, socket_timeout=0.5)  # type: ignore[attr-defined]
    samples = scrape(client)
    assert ("ptserve_cache_entries", ()) in samples
    assert not any(name == "ptserve_training_jobs" for name, _ in samples)


def test_two_apps_in_one_process_keep_their_own_registries(tmp_path: Path, backbone: Backbone) -> None:
    a = create_app(Settings(store=str(tmp_path / "a"), max_wait_ms=1), backbone=backbone)
    b = create_app(Settings(store=str(tmp_path / "b"), max_wait_ms=1), backbone=backbone)
    with TestClient(a) as ca, TestClient(b) as cb:
        for _ in range(2):
            assert ca.get("/v1/prompts").status_code == 200
        route = "/v1/prompts"
        assert value(scrape(ca), "ptserve_requests_total", route=route, task="", status="200") == 2
        assert value(scrape(cb), "ptserve_requests_total", route=route, task="", status="200") == 0


def test_requests_refused_before_routing_are_counted_under_their_route(
    tmp_path: Path, backbone: Backbone
) -> None:
    settings = Settings(store=str(tmp_path / "s"), max_wait_ms=1, max_body_bytes=1024)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        big = b'{"task": "x", "text": "' + b"y" * 2000 + b'"}'
        r = c.post(CLASSIFY, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.request("DELETE", "/v1/prompts/some_task", content=b"z" * 2000)
        assert r.status_code == 413
        samples = scrape(c)
        assert value(samples, "ptserve_requests_total", route=CLASSIFY, task="", status="413") == 1
        assert (
            value(samples, "ptserve_requests_total", route="/v1/prompts/{task}", task="", status="413") == 1
        )
