"""TrainingWorker in-process on a real Redis: publishing, giving a job back, losing a job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from prompts.artifact import parse_artifact
from prompts.backbone import Backbone
from prompts.errors import StoreUnavailableError, TaskNotFoundError
from prompts.jobs import JobQueue, JobSpec
from prompts.redis_store import RedisPromptStore
from prompts.worker import JobProgress, TrainingWorker
from tests.synthetic import job_request

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

DEADLINE_S = 60.0


@pytest.fixture
def queue(private_redis: RedisServer) -> Iterator[JobQueue]:
    q = JobQueue(private_redis.url, claim_idle_s=0.2)
    yield q
    q.close()


def _worker(private_redis: RedisServer, backbone: Backbone, queue: JobQueue) -> TrainingWorker:
    store = RedisPromptStore(private_redis.url)
    return TrainingWorker(backbone, queue, store, heartbeat_s=0.05, data_root=None, name="inproc")


@pytest.mark.parametrize("task", ["keywords", "team-a/keywords"])
def test_worker_trains_reports_progress_and_publishes(
    private_redis: RedisServer, backbone: Backbone, queue: JobQueue, task: str
) -> None:
    worker = _worker(private_redis, backbone, queue)
    job_id = queue.submit(JobSpec.model_validate({**job_request(epochs=3), "task": task}))
    lease = queue.take(worker.name, block_s=0.1)
    assert lease is not None
    assert worker.run_job(lease, threading.Event()) == "succeeded"
    status = queue.status(job_id)
    assert status.state == "succeeded" and status.progress is not None and status.metrics is not None
    assert status.progress["epoch"] == 3 and status.progress["dev_accuracy"] is not None
    # A tenant's job (its name confined by the API) publishes into the tenant's namespace.
    assert worker.store.current_version(task) == status.version
    assert [r.task for r in worker.store.list_tasks()] == [task]


def test_worker_stopping_gives_the_job_back(
    private_redis: RedisServer, backbone: Backbone, queue: JobQueue
) -> None:
    worker = _worker(private_redis, backbone, queue)
    job_id = queue.submit(JobSpec.model_validate(job_request(epochs=3)))
    lease = queue.take(worker.name, block_s=0.1)
    assert lease is not None
    stop = threading.Event()
    stop.set()
    assert worker.run_job(lease, stop) == "released"
    assert queue.status(job_id).state == "queued"
    with pytest.raises(TaskNotFoundError):
        worker.store.current_version("keywords")


def test_worker_that_lost_its_job_publishes_nothing(
    private_redis: RedisServer, backbone: Backbone, queue: JobQueue
) -> None:
    worker = _worker(private_redis, backbone, queue)
    job_id = queue.submit(JobSpec.model_validate(job_request(epochs=3)))
    lease = queue.take(worker.name, block_s=0.1)
    assert lease is not None
    # Another worker takes the job over (as after a stall past the claim timeout).
    deadline = time.monotonic() + DEADLINE_S
    while (queue.pending_idle_s(lease) or 0.0) < queue.claim_idle_s:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert queue.take("other", block_s=0.1) is not None
    assert worker.run_job(lease, threading.Event()) == "lost"
    assert queue.status(job_id).worker == "other"
    with pytest.raises(TaskNotFoundError):
        worker.store.current_version("keywords")


def test_a_store_outage_at_publish_leaves_the_job_to_be_taken_again(
    private_redis: RedisServer, backbone: Backbone, queue: JobQueue, dead_redis_url: str
) -> None:
    # The queue's Redis works; the prompt store's does not (refused at publish time).
    worker = TrainingWorker(
        backbone, queue, RedisPromptStore(dead_redis_url), heartbeat_s=0.05, data_root=None, name="inproc"
    )
    job_id = queue.submit(JobSpec.model_validate(job_request(epochs=2)))
    lease = queue.take(worker.name, block_s=0.1)
    assert lease is not None
    with pytest.raises(StoreUnavailableError):
        worker.run_job(lease, threading.Event())
    # Not failed for good: the entry stays pending, so this or another worker takes it again.
    assert queue.status(job_id).state == "running"
    deadline = time.monotonic() + DEADLINE_S
    while (queue.pending_idle_s(lease) or 0.0) < queue.claim_idle_s:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    again = queue.take("other", block_s=0.1)
    assert again is not None and again.job_id == job_id and again.attempt == 2


def test_progress_is_best_effort_when_the_queue_redis_fails(
    backbone: Backbone, queue: JobQueue, dead_redis_url: str
) -> None:
    job_id = queue.submit(JobSpec.model_validate(job_request(epochs=1)))
    lease = queue.take("inproc", block_s=0.1)
    assert lease is not None and lease.job_id == job_id
    down = JobQueue(dead_redis_url, socket_timeout=0.5)
    progress = JobProgress(down, lease, threading.Event(), threading.Event())
    progress.start(total_steps=10, epochs=1)  # reports, fails to reach Redis, and training goes on
    progress.step(0.5)
    assert progress.state["step"] == 1
    down.close()


def test_worker_trains_a_verbalizer_job_with_its_label_words(
    private_redis: RedisServer, mlm_backbone: Backbone, queue: JobQueue
) -> None:
    worker = _worker(private_redis, mlm_backbone, queue)
    hyperparameters = {
        "epochs": 2,
        "patience": 2,
        "batch_size": 8,
        "prefix_length": 4,
        "head": "verbalizer",
        "label_words": {"book": ["book", "movie"]},  # phone and shirt: their own names
    }
    spec = JobSpec.model_validate(job_request(epochs=2, method="auto", hyperparameters=hyperparameters))
    job_id = queue.submit(spec)
    lease = queue.take(worker.name, block_s=0.1)
    assert lease is not None
    assert worker.run_job(lease, threading.Event()) == "succeeded"
    status = queue.status(job_id)
    manifest = parse_artifact(worker.store.get("keywords", status.version).data).manifest
    # Method auto with head verbalizer trains P-tuning with label words ([MASK] in the input prompt).
    assert manifest.method == "p-tuning" and manifest.labels == ["book", "phone", "shirt"]
    verbalizer = manifest.head.verbalizer
    assert verbalizer is not None
    assert verbalizer.words == [["book", "movie"], ["phone"], ["shirt"]]
    tokens = [mlm_backbone.tokenizer.convert_ids_to_tokens(ids) for ids in verbalizer.token_ids]
    assert tokens == verbalizer.words
    assert verbalizer.mlm_fingerprint == mlm_backbone.spec.mlm_fingerprint
