"""The training-job queue against a real Redis: submit, take, finish, take-over of idle jobs, counts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from prompts.data import DataError
from prompts.errors import InvalidInputError
from prompts.jobs import JobNotFoundError, JobQueue, JobSpec, Lease, job_task_data, resolve_data_path
from tests.synthetic import make_examples, write_data_dir

pytest_plugins = ("tests.redis_server",)

DEADLINE_S = 10.0


def rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    return [{"text": e.text, "label": e.label} for e in make_examples(count, seed)]


def spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {"task": "keywords", "train": rows(12), **overrides}
    return JobSpec.model_validate(fields)


@pytest.fixture
def queue(redis_url: str, redis_prefix: str) -> Iterator[JobQueue]:
    q = JobQueue(redis_url, prefix=redis_prefix, claim_idle_s=60.0)
    yield q
    q.close()


def take(queue: JobQueue, consumer: str) -> Lease:
    lease = queue.take(consumer, block_s=0.1)
    assert lease is not None
    return lease


def wait_idle(queue: JobQueue, lease: Lease, seconds: float) -> None:
    """Poll until the lease's stream entry has been idle for ``seconds`` (the claim condition)."""
    deadline = time.monotonic() + DEADLINE_S
    while (queue.pending_idle_s(lease) or 0.0) < seconds:
        assert time.monotonic() < deadline, "entry never became idle"
        time.sleep(0.02)


def test_submit_take_succeed(queue: JobQueue) -> None:
    job_id = queue.submit(spec(hyperparameters={"epochs": 3, "lr": 0.01}))
    status = queue.status(job_id)
    assert (status.state, status.task, status.method, status.attempts) == ("queued", "keywords", "auto", 0)
    assert status.worker is None and status.started_at is None and status.version is None

    lease = take(queue, "w1")
    assert lease.job_id == job_id and lease.attempt == 1
    assert lease.spec.hyperparameters.epochs == 3 and lease.spec.train is not None
    assert len(lease.spec.train) == 12
    running = queue.status(job_id)
    assert (running.state, running.worker, running.attempts) == ("running", "w1", 1)
    assert running.started_at is not None

    queue.report_progress(lease, {"epoch": 1, "loss": 0.5})
    assert queue.status(job_id).progress == {"epoch": 1, "loss": 0.5}
    assert queue.succeed(lease, version="abc123", metrics={"dev": {"accuracy": 1.0}})
    done = queue.status(job_id)
    assert (done.state, done.version, done.metrics) == ("succeeded", "abc123", {"dev": {"accuracy": 1.0}})
    assert done.finished_at is not None and done.error is None
    # Acknowledged: nobody takes it again, even once it would be idle long enough.
    assert queue.pending_idle_s(lease) is None
    assert queue.take("w2", block_s=0.05) is None


def test_fail_records_the_error_and_is_not_retried(redis_url: str, redis_prefix: str) -> None:
    queue = JobQueue(redis_url, prefix=redis_prefix, claim_idle_s=0.05)
    try:
        job_id = queue.submit(spec())
        lease = take(queue, "w1")
        assert queue.fail(lease, "train.jsonl:3: not valid JSON")
        status = queue.status(job_id)
        assert (status.state, status.error) == ("failed", "train.jsonl:3: not valid JSON")
        assert queue.take("w2", block_s=0.05) is None
        assert queue.counts_by_state() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 1}
    finally:
        queue.close()


def test_counts_by_state_follow_every_transition(queue: JobQueue) -> None:
    assert queue.counts_by_state() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    ids = [queue.submit(spec()) for _ in range(4)]
    assert queue.counts_by_state() == {"queued": 4, "running": 0, "succeeded": 0, "failed": 0}
    leases = [take(queue, "w1") for _ in range(3)]
    assert [lease.job_id for lease in leases] == ids[:3]  # first in, first out
    assert queue.counts_by_state() == {"queued": 1, "running": 3, "succeeded": 0, "failed": 0}
    queue.succeed(leases[0], version="v1", metrics={})
    queue.fail(leases[1], "boom")
    assert queue.counts_by_state() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1}
    # A finished job cannot be finished again (counts must not drift).
    assert not queue.fail(leases[0], "late")
    assert queue.status(leases[0].job_id).state == "succeeded"
    assert queue.counts_by_state() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1}


def test_release_puts_the_job_back_without_counting_the_attempt(queue: JobQueue) -> None:
    job_id = queue.submit(spec())
    lease = take(queue, "w1")
    assert queue.release(lease)
    status = queue.status(job_id)
    assert (status.state, status.attempts, status.worker) == ("queued", 0, None)
    again = take(queue, "w2")
    assert again.job_id == job_id and again.attempt == 1
    assert queue.status(job_id).worker == "w2"


def test_idle_job_of_a_dead_worker_is_taken_by_another(redis_url: str, redis_prefix: str) -> None:
    queue = JobQueue(redis_url, prefix=redis_prefix, claim_idle_s=0.2)
    try:
        job_id = queue.submit(spec())
        first = take(queue, "dead-worker")
        wait_idle(queue, first, 0.2)
        second = take(queue, "w2")
        assert (second.job_id, second.attempt) == (job_id, 2)
        status = queue.status(job_id)
        assert (status.state, status.worker, status.attempts) == ("running", "w2", 2)
        # The first worker lost the job: it may neither report nor finish it.
        assert not queue.heartbeat(first)
        with pytest.raises(Exception, match="no longer held"):
            queue.report_progress(first, {"epoch": 9})
        assert not queue.succeed(first, version="stale", metrics={})
        assert queue.succeed(second, version="v2", metrics={})
        assert queue.status(job_id).version == "v2"
        assert queue.counts_by_state() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0}
    finally:
        queue.close()


def test_heartbeat_keeps_a_long_job_from_being_stolen(redis_url: str, redis_prefix: str) -> None:
    claim_s = 1.0
    queue = JobQueue(redis_url, prefix=redis_prefix, claim_idle_s=claim_s)
    try:
        job_id = queue.submit(spec())
        lease = take(queue, "alive")
        for _ in range(2):
            # Each time the entry would be claimable, a heartbeat renews it, and nobody can take it.
            wait_idle(queue, lease, claim_s)
            assert queue.heartbeat(lease)
            idle = queue.pending_idle_s(lease)
            assert idle is not None and idle < claim_s
            assert queue.take("thief", block_s=0.01) is None
        assert queue.status(job_id).worker == "alive"
        # Without heartbeats it is taken over: the assertions above could fail.
        wait_idle(queue, lease, claim_s)
        assert take(queue, "thief").job_id == job_id
    finally:
        queue.close()


def test_jobs_whose_workers_keep_dying_fail_after_max_attempts(redis_url: str, redis_prefix: str) -> None:
    queue = JobQueue(redis_url, prefix=redis_prefix, claim_idle_s=0.05, max_attempts=2)
    try:
        job_id = queue.submit(spec())
        lease = take(queue, "w1")
        wait_idle(queue, lease, 0.05)
        lease = take(queue, "w2")
        assert lease.attempt == 2
        wait_idle(queue, lease, 0.05)
        assert queue.take("w3", block_s=0.01) is None
        status = queue.status(job_id)
        assert status.state == "failed"
        assert status.error is not None and "gave up after 2 attempts" in status.error
        assert queue.counts_by_state()["failed"] == 1
    finally:
        queue.close()


def test_unknown_and_malformed_job_ids_are_not_found(queue: JobQueue) -> None:
    with pytest.raises(JobNotFoundError, match="no training job"):
        queue.status("0" * 32)
    with pytest.raises(JobNotFoundError, match="32 hex characters"):
        queue.status("../../etc")


def test_unreachable_queue_is_reported_as_unavailable(dead_redis_url: str) -> None:
    from prompts.errors import StoreUnavailableError

    queue = JobQueue(dead_redis_url, socket_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailableError, match=r"job queue .* is unreachable"):
            queue.submit(spec())
    finally:
        queue.close()


# ---------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"task": "Bad Name"}, "invalid task name"),
        ({"method": "finetune"}, "method"),
        ({"hyperparameters": {"lr": -0.1}}, "greater than 0"),
        ({"hyperparameters": {"epochs": 0}}, "greater than or equal to 1"),
        ({"hyperparameters": {"batch_size": 0}}, "batch_size"),
        ({"hyperparameters": {"dev_fraction": 1.5}}, "dev_fraction"),
        ({"hyperparameters": {"learning_rate": 0.1}}, "learning_rate"),
        ({"hyperparameters": {"head": "max"}}, "head"),
        ({"train": []}, "at least 1 item"),
        ({"train": [{"text": "   ", "label": "a"}]}, "whitespace"),
        ({"data_path": "x.jsonl"}, "exactly one of 'train'"),
        ({"train": None}, "exactly one of 'train'"),
    ],
)
def test_invalid_specs_name_the_problem(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        spec(**fields)


def test_a_job_may_choose_the_head() -> None:
    from prompts.training import job_train_config

    assert job_train_config(spec()).head is None  # the trainer's default (follows the backbone)
    assert job_train_config(spec(hyperparameters={"head": "cls"})).head == "cls"
    assert job_train_config(spec(method="probe", hyperparameters={"head": "peft"})).head == "peft"


def test_inline_data_is_checked_like_files() -> None:
    data = job_task_data(spec(train=rows(30), test=rows(6, seed=5)), None)
    assert data.labels == ["book", "phone", "shirt"]
    assert len(data.train) + len(data.dev) == 30 and len(data.test) == 6 and data.dev
    with pytest.raises(DataError, match="'tablet'"):
        job_task_data(spec(dev=[{"text": "a new tablet", "label": "tablet"}]), None)
    with pytest.raises(DataError, match="at least two labels"):
        job_task_data(spec(train=[{"text": f"phone {i}", "label": "phone"} for i in range(8)]), None)
    capped = job_task_data(spec(train=rows(30), hyperparameters={"max_train_rows": 9}), None)
    assert len(capped.train) == 9


def test_data_paths_must_lie_inside_the_data_root(tmp_path: Path) -> None:
    root = write_data_dir(tmp_path / "root" / "keywords").parent
    (tmp_path / "secret.jsonl").write_text('{"text": "x", "label": "y"}\n')
    (root / "link").symlink_to(tmp_path)
    assert resolve_data_path(root, "keywords") == (root / "keywords").resolve()
    assert resolve_data_path(root, str(root / "keywords" / "train.jsonl")).name == "train.jsonl"
    for outside in ("../secret.jsonl", str(tmp_path / "secret.jsonl"), "link/secret.jsonl"):
        with pytest.raises(InvalidInputError, match="outside the server's data root"):
            resolve_data_path(root, outside)
    with pytest.raises(InvalidInputError, match=r"'nothing\.jsonl' does not exist"):
        resolve_data_path(root, "nothing.jsonl")
    with pytest.raises(InvalidInputError, match="not a usable path"):
        resolve_data_path(root, "a\x00b")
    with pytest.raises(InvalidInputError, match="no data root configured"):
        resolve_data_path(None, "keywords")
    data = job_task_data(spec(train=None, data_path="keywords"), root)
    assert data.labels == ["book", "phone", "shirt"] and data.test


def test_finished_jobs_expire_after_the_retention_and_running_ones_do_not(
    redis_url: str, redis_prefix: str
) -> None:
    queue = JobQueue(redis_url, prefix=redis_prefix, retention_s=3600)
    raw = redis.Redis.from_url(redis_url)
    try:
        done_id, failed_id, running_id = (queue.submit(spec()) for _ in range(3))
        done, failed, running = (take(queue, f"w{i}") for i in range(3))
        assert {done.job_id, failed.job_id, running.job_id} == {done_id, failed_id, running_id}
        assert queue.succeed(done, version="v", metrics={})
        assert queue.fail(failed, "bad data")
        assert 0 < raw.ttl(queue.job_key(done.job_id)) <= 3600
        assert 0 < raw.ttl(queue.job_key(failed.job_id)) <= 3600
        assert raw.ttl(queue.job_key(running.job_id)) == -1  # no expiry while it runs
        assert queue.status(done.job_id).state == "succeeded"  # still readable until then
    finally:
        raw.close()
        queue.close()
