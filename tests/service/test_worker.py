"""Real ``ptserve worker`` processes against a real Redis, with the service app running in-process.

Jobs go in through ``POST /v1/training-jobs``; the worker trains them on the tiny BERT and publishes to
the Redis store the service reads, so the service answers for a task it did not know at start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from prompts.artifact import parse_artifact
from prompts.backbone import Backbone
from prompts.errors import TaskNotFoundError
from prompts.jobs import JobQueue, JobSpec, JobStatus
from prompts.redis_store import RedisPromptStore
from service.app import create_app
from service.settings import Settings
from tests.synthetic import job_request, write_data_dir

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

REPO = Path(__file__).resolve().parents[2]
# Generous: a worker process imports torch and transformers before it takes its first job.
DEADLINE_S = 120.0
# Tiny BERT, 24 rows, batch 8: ~15 ms an epoch on one thread, so this job runs for seconds, long
# enough to kill its worker mid-training, short enough for the next worker to finish it.
LONG_EPOCHS = 200


class Worker:
    """A ``python -m service.cli worker`` subprocess logging to a file (shown when a test fails)."""

    def __init__(self, name: str, model: Path, redis_url: str, log_dir: Path, *extra: str) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "service.cli", "worker",
                    "--model", str(model), "--store", redis_url, "--device", "cpu",
                    "--name", name, "--torch-threads", "1", "--log-level", "info", *extra,
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.output()}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def wait_for(
    read: Callable[[], JobStatus | dict[str, Any]], done: Callable[[Any], bool], worker: Worker
) -> Any:
    """Poll ``read`` until ``done`` holds (a condition, not a fixed sleep), while the worker lives."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = read()
        if done(value):
            return value
        worker.assert_alive()
        assert time.monotonic() < deadline, f"gave up waiting; last {value}\n{worker.output()}"
        time.sleep(0.05)


@pytest.mark.integration
def test_job_round_trip_ends_with_the_task_served_and_bad_data_failing(
    private_redis: RedisServer,
    tiny_bert_dir: Path,
    backbone: Backbone,
    tmp_path: Path,
    workers: list[Worker],
) -> None:
    root = tmp_path / "data"
    write_data_dir(root / "keywords")
    (root / "broken").mkdir()
    (root / "broken" / "train.jsonl").write_text('{"text": "phone", "label": "phone"}\n{"text": oops\n')
    settings = Settings(store=private_redis.url, data_root=root, max_wait_ms=1, pointer_ttl_s=0)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        # The service runs before the task exists.
        r = client.post("/v1/classify", json={"task": "keywords", "text": "phone battery"})
        assert r.status_code == 404, r.text

        bad = client.post("/v1/training-jobs", json={"task": "broken", "data_path": "broken"})
        good = client.post("/v1/training-jobs", json=job_request(epochs=6))
        assert bad.status_code == 202 and good.status_code == 202, (bad.text, good.text)

        worker = Worker("worker-1", tiny_bert_dir, private_redis.url, tmp_path, "--data-root", str(root))
        workers.append(worker)

        def get(job_id: str) -> Callable[[], dict[str, Any]]:
            return lambda: client.get(f"/v1/training-jobs/{job_id}").json()

        finished = ("succeeded", "failed")
        failed = wait_for(get(bad.json()["id"]), lambda s: s["state"] in finished, worker)
        assert failed["state"] == "failed", failed
        assert "train.jsonl:2: not valid JSON" in failed["error"], failed
        assert failed["version"] is None

        done = wait_for(get(good.json()["id"]), lambda s: s["state"] in finished, worker)
        assert done["state"] == "succeeded", done
        assert done["worker"] == "worker-1" and done["attempts"] == 1 and done["error"] is None
        assert done["progress"]["epoch"] == 6 and done["progress"]["epochs"] == 6
        assert done["progress"]["step"] == done["progress"]["total_steps"] == 6 * 3
        assert done["metrics"]["epochs_run"] == 6 and done["metrics"]["rows"]["train"] == 24
        assert 0.0 <= done["metrics"]["test"]["accuracy"] <= 1.0

        # Hot swap: the running service now serves the published version.
        r = client.post("/v1/classify", json={"task": "keywords", "texts": ["phone battery", "red shirt"]})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == done["version"]
        assert set(r.json()["results"][0]["scores"]) == {"book", "phone", "shirt"}

        # SIGTERM mid-job: the worker gives the job back to the queue and exits cleanly.
        long = client.post("/v1/training-jobs", json=job_request(epochs=10_000, task="long"))
        long_id = long.json()["id"]
        wait_for(get(long_id), lambda s: s["state"] == "running" and s["progress"] is not None, worker)
        assert worker.stop(signal.SIGTERM) == 0, worker.output()
        requeued = client.get(f"/v1/training-jobs/{long_id}").json()
        assert (requeued["state"], requeued["attempts"], requeued["worker"]) == ("queued", 0, None)


@pytest.mark.integration
def test_job_of_a_killed_worker_is_finished_by_another(
    private_redis: RedisServer, tiny_bert_dir: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    queue = JobQueue(private_redis.url)
    store = RedisPromptStore(private_redis.url)
    try:
        job_id = queue.submit(JobSpec.model_validate(job_request(epochs=LONG_EPOCHS)))
        first = Worker("worker-a", tiny_bert_dir, private_redis.url, tmp_path)
        workers.append(first)
        wait_for(
            lambda: queue.status(job_id),
            lambda s: s.state == "running" and s.progress is not None and s.progress["step"] > 0,
            first,
        )
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = queue.status(job_id)
        assert (killed.state, killed.worker, killed.version) == ("running", "worker-a", None)
        # Killed mid-training: nothing was published.
        with pytest.raises(TaskNotFoundError):
            store.versions("keywords")

        second = Worker(
            "worker-b",
            tiny_bert_dir,
            private_redis.url,
            tmp_path,
            "--claim-idle-s",
            "1",
            "--heartbeat-s",
            "0.3",
        )
        workers.append(second)
        done = wait_for(lambda: queue.status(job_id), lambda s: s.state in ("succeeded", "failed"), second)
        assert done.state == "succeeded", (done, second.output())
        assert (done.worker, done.attempts) == ("worker-b", 2)
        assert done.metrics is not None and done.metrics["epochs_run"] == LONG_EPOCHS
        # Exactly one complete version: the one worker-b published.
        assert store.versions("keywords") == [done.version]
        artifact = parse_artifact(store.get("keywords").data)
        assert artifact.version == done.version and artifact.manifest.labels == ["book", "phone", "shirt"]
        assert queue.counts_by_state() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0}
        assert second.stop(signal.SIGTERM) == 0, second.output()
    finally:
        queue.close()
        store.close()


def test_worker_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import build_parser, main, settings_from_args

    monkeypatch.setenv("PTSERVE_JOBS_URL", "redis://env:6379/0")
    monkeypatch.setenv("PTSERVE_WORKER_CLAIM_IDLE_S", "30")
    args = build_parser().parse_args(["worker", "--heartbeat-s", "2", "--name", "w7"])
    settings = settings_from_args(args)
    assert (settings.jobs_url, settings.worker_claim_idle_s) == ("redis://env:6379/0", 30.0)
    assert (settings.worker_heartbeat_s, settings.worker_name) == (2.0, "w7")
    assert settings.job_queue_url() == "redis://env:6379/0"
    assert main(["worker", "--heartbeat-s", "40"]) == 2  # not below the claim timeout of 30 s
    monkeypatch.delenv("PTSERVE_JOBS_URL")
    assert Settings(store="redis://s:1/0").job_queue_url() == "redis://s:1/0"
    assert Settings(store="./dir").job_queue_url() is None


def test_worker_without_a_job_queue_stops_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    assert main(["worker", "--store", str(tmp_path / "store")]) == 1
    assert "no job queue" in capsys.readouterr().err
