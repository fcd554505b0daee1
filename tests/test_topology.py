"""What docker-compose starts, as real processes on loopback, and the user's path through it end to end.

Redis, two service replicas and one training worker run with compose's own environment blocks
(tests/compose.py maps the Redis host, the bind address and the training-data volume onto this
machine). The only departure: the tiny test BERT replaces the MiniLM baked into the image, for speed.
Auth stays on, as compose configures it: every call carries a key.

The path: submit a training job over the first replica naming a file on the training-data volume,
wait for the worker to publish it, classify on both replicas, upload a new version on the second,
see both serve it, roll back on the first, and read each replica's /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prompts.backbone import Backbone
from service.auth import hash_key
from tests.compose import compose_environment, load_compose, local_environment
from tests.factories import random_artifact
from tests.processes import PtserveProcess, clean_environment, eventually, free_port
from tests.synthetic import KEYWORDS, write_data_dir

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

ADMIN_KEY = "topology-admin-key"
CLASSIFY_KEY = "topology-classify-key"
TASK = "keywords"


def command_of(service: str) -> list[str]:
    command: list[str] = load_compose()["services"][service]["command"]
    return command


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture
def topology(
    tmp_path: Path, tiny_bert_dir: Path, private_redis: RedisServer
) -> Iterator[tuple[list[str], Path]]:
    """Two replicas and a worker up (replicas ready); yields the replicas' base URLs and the data root."""
    data_root = tmp_path / "training"
    data_root.mkdir()
    caller = {"PTSERVE_API_KEYS": f"admin:{hash_key(ADMIN_KEY)},classify:{hash_key(CLASSIFY_KEY)}"}
    paths = {"/data/training": str(data_root)}
    processes: list[PtserveProcess] = []
    bases = []
    try:
        for i in range(2):
            port = free_port()
            env = local_environment(
                "service", redis_url=private_redis.url, port=port, paths=paths, env=caller
            )
            env["PTSERVE_MODEL"] = str(tiny_bert_dir)
            processes.append(
                PtserveProcess(command_of("service"), clean_environment(**env), tmp_path / f"service-{i}.log")
            )
            bases.append(f"http://127.0.0.1:{port}")
        worker_env = local_environment("worker", redis_url=private_redis.url, paths=paths, env=caller)
        worker_env["PTSERVE_MODEL"] = str(tiny_bert_dir)
        processes.append(
            PtserveProcess(command_of("worker"), clean_environment(**worker_env), tmp_path / "worker.log")
        )
        for proc, base in zip(processes, bases, strict=False):
            proc.wait_ready(base)
        yield bases, data_root
    finally:
        for proc in processes:
            proc.stop()


def served_version(client: httpx.Client, base: str) -> str | None:
    r = client.post(f"{base}/v1/classify", json={"task": TASK, "text": "alpha"})
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    version: str = r.json()["version"]
    return version


@pytest.mark.integration
def test_compose_topology_trains_serves_swaps_and_reports(
    topology: tuple[list[str], Path], backbone: Backbone
) -> None:
    bases, data_root = topology
    a, b = bases
    # Compose's environment is what ran: auth on, JSON logs, the Redis store shared by all.
    assert compose_environment("service")["PTSERVE_AUTH"] == "on"
    admin = httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    user = httpx.Client(headers={"X-API-Key": CLASSIFY_KEY}, timeout=30)
    anonymous = httpx.Client(timeout=30)

    # Training data sits on the volume both the replicas and the worker mount.
    write_data_dir(data_root / TASK)
    job = {
        "task": TASK,
        "method": "prefix",
        "hyperparameters": {"epochs": 3, "batch_size": 8, "prefix_length": 4},
        "data_path": TASK,
    }
    assert anonymous.post(f"{a}/v1/training-jobs", json=job).status_code == 401
    assert user.post(f"{a}/v1/training-jobs", json=job).status_code == 403
    submitted = admin.post(f"{a}/v1/training-jobs", json=job)
    assert submitted.status_code == 202, submitted.text
    job_url = f"{a}{submitted.headers['Location']}"

    status: dict[str, Any] = {}

    def job_done() -> bool:
        status.update(admin.get(job_url).json())
        assert status["state"] != "failed", status
        return bool(status["state"] == "succeeded")

    eventually(job_done, "the training job to succeed", deadline_s=120)
    trained = status["version"]
    assert trained and status["metrics"]["test"]["accuracy"] >= 0.0

    # Both replicas serve the worker's version (the one that took the job and the other one).
    for base in (a, b):
        eventually(lambda base=base: served_version(user, base) == trained, f"{base} to serve the job")
        r = user.post(f"{base}/v1/classify", json={"task": TASK, "texts": ["alpha beta", "gamma"]})
        assert r.status_code == 200 and set(r.json()["results"][0]["scores"]) == set(KEYWORDS)

    # A new version uploaded on B is served by both; a rollback on A brings the trained one back.
    artifact = random_artifact(backbone.spec, task=TASK, seed=7)
    assert user.post(f"{b}/v1/prompts", files={"file": ("t.safetensors", artifact.data)}).status_code == 403
    uploaded = admin.post(f"{b}/v1/prompts", files={"file": ("t.safetensors", artifact.data)})
    assert uploaded.status_code == 201, uploaded.text
    for base in (a, b):
        eventually(lambda base=base: served_version(user, base) == artifact.version, f"{base} to swap")
    rolled = admin.post(f"{a}/v1/prompts/{TASK}/rollback", json={})
    assert rolled.status_code == 200 and rolled.json()["version"] == trained
    for base in (a, b):
        eventually(lambda base=base: served_version(user, base) == trained, f"{base} to roll back")

    # Each replica's metrics: its own requests, the swaps it saw, and the shared job counts.
    for base in (a, b):
        text = anonymous.get(f"{base}/metrics").text
        assert metric(text, "ptserve_requests_total", route="/v1/classify", task=TASK, status="200") >= 3
        assert metric(text, "ptserve_swaps_total") >= 2
        assert metric(text, "ptserve_training_jobs", state="succeeded") == 1
        assert metric(text, "ptserve_batch_size_count") >= 1
