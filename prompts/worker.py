"""The training worker: takes jobs from the queue, trains, publishes to the store.

One backbone is loaded once and shared by every job. While a job trains, a heartbeat thread keeps the
job's queue entry fresh so no other worker takes it over; training progress goes to the job's hash.
The artifact is published with the store's atomic ``put`` only once training has finished, so a
worker killed mid-job leaves nothing visible: its job is taken over by another worker after the claim
timeout. On ``stop`` (SIGTERM in the ``ptserve worker`` process) the job in training is given back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Literal

from prompts.backbone import Backbone
from prompts.errors import PtserveError, StoreUnavailableError
from prompts.jobs import JobQueue, JobQueueError, Lease, LeaseLostError, job_task_data
from prompts.store import PromptStore
from prompts.trainer import EpochStats, TrainConfig
from prompts.training import job_train_config, result_metrics, run_training, store_result

logger = logging.getLogger(__name__)

Outcome = Literal["succeeded", "failed", "released", "lost"]
# Progress is written at most this often between epochs (every step would be a Redis write per batch).
PROGRESS_INTERVAL_S = 0.5
# How long the worker waits after the queue's Redis failed before trying again.
RETRY_DELAY_S = 1.0


class JobInterruptedError(PtserveError):
    """The worker is stopping; the job goes back to the queue."""

    code = "job_interrupted"


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class JobProgress:
    """Training callbacks that report to the job hash and stop training when the job must stop."""

    def __init__(self, queue: JobQueue, lease: Lease, stop: threading.Event, lost: threading.Event) -> None:
        self.queue = queue
        self.lease = lease
        self.stop = stop
        self.lost = lost
        self.state: dict[str, float | int | None] = {
            "epoch": 0,
            "epochs": None,
            "step": 0,
            "total_steps": None,
            "loss": None,
            "dev_accuracy": None,
        }
        self.reported_at = 0.0

    def _check(self) -> None:
        if self.lost.is_set():
            raise LeaseLostError(f"job {self.lease.job_id} was taken over by another worker")
        if self.stop.is_set():
            raise JobInterruptedError(f"worker {self.lease.consumer} is stopping")

    def _report(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.reported_at >= PROGRESS_INTERVAL_S:
            try:
                self.queue.report_progress(self.lease, dict(self.state))
            except (StoreUnavailableError, JobQueueError) as exc:
                # Progress is best-effort: a Redis hiccup must not abort the training it describes.
                logger.warning("job %s: progress not recorded: %s", self.lease.job_id, exc.message)
            self.reported_at = now

    def start(self, total_steps: int, epochs: int) -> None:
        # A phase starts (objective "pairs", then its refinement): steps count within the phase.
        self.state.update(total_steps=total_steps, epochs=epochs, step=0)
        self._report(force=True)

    def step(self, loss: float) -> None:
        self._check()
        step = self.state["step"]
        assert isinstance(step, int)
        self.state.update(step=step + 1, loss=round(loss, 6))
        self._report(force=False)

    def epoch(self, stats: EpochStats) -> None:
        self.state.update(
            epoch=stats.epoch, loss=round(stats.train_loss, 6), dev_accuracy=round(stats.dev_accuracy, 6)
        )
        self._report(force=True)

    def close(self) -> None:
        pass


class Heartbeat:
    """A thread that renews the lease every ``interval_s`` and sets ``lost`` if another worker has it."""

    def __init__(self, queue: JobQueue, lease: Lease, interval_s: float, lost: threading.Event) -> None:
        self.queue = queue
        self.lease = lease
        self.interval_s = interval_s
        self.lost = lost
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                if not self.queue.heartbeat(self.lease):
                    self.lost.set()
                    return
            except (StoreUnavailableError, JobQueueError) as exc:
                # Keep trying: if Redis comes back before the claim timeout nothing is lost.
                logger.warning("heartbeat for job %s failed: %s", self.lease.job_id, exc.message)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


class TrainingWorker:
    """Takes jobs from ``queue`` one at a time, trains them on ``backbone`` and publishes to ``store``."""

    def __init__(
        self,
        backbone: Backbone,
        queue: JobQueue,
        store: PromptStore,
        *,
        heartbeat_s: float,
        data_root: Path | None,
        name: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.queue = queue
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.data_root = data_root
        self.name = name or default_worker_name()

    def run(self, stop: threading.Event) -> None:
        """Take and run jobs until ``stop`` is set."""
        logger.info("worker %s waiting for training jobs on %r", self.name, self.queue)
        while not stop.is_set():
            try:
                lease = self.queue.take(self.name, block_s=1.0)
            except (StoreUnavailableError, JobQueueError) as exc:
                logger.warning("cannot take a job: %s", exc.message)
                stop.wait(RETRY_DELAY_S)
                continue
            if lease is None:
                continue
            try:
                self.run_job(lease, stop)
            except (StoreUnavailableError, JobQueueError) as exc:
                # The job's entry stays pending: another worker (or this one) takes it after the claim
                # timeout.
                logger.warning("job %s: the job queue failed: %s", lease.job_id, exc.message)
                stop.wait(RETRY_DELAY_S)

    def run_job(self, lease: Lease, stop: threading.Event) -> Outcome:
        spec = lease.spec
        logger.info(
            "job %s: training task %r (%s), attempt %d", lease.job_id, spec.task, spec.method, lease.attempt
        )
        lost = threading.Event()
        progress = JobProgress(self.queue, lease, stop, lost)

        def progress_factory(_: TrainConfig) -> JobProgress:
            return progress

        try:
            with Heartbeat(self.queue, lease, self.heartbeat_s, lost):
                data = job_task_data(spec, self.data_root)
                config = job_train_config(spec)
                result = run_training(
                    self.backbone, spec.task, data, config, progress_factory=progress_factory
                )
                if lost.is_set():
                    raise LeaseLostError(f"job {lease.job_id} was taken over by another worker")
                version = store_result(self.store, result)
            if not self.queue.succeed(lease, version=version, metrics=result_metrics(result, data)):
                logger.warning(
                    "job %s: published version %s, but another worker holds the job", lease.job_id, version
                )
                return "lost"
            logger.info("job %s: task %r version %s published", lease.job_id, spec.task, version)
            return "succeeded"
        except JobInterruptedError:
            self.queue.release(lease)
            logger.info("job %s: given back to the queue (worker stopping)", lease.job_id)
            return "released"
        except LeaseLostError as exc:
            logger.warning("job %s: %s; abandoning it", lease.job_id, exc.message)
            return "lost"
        except (StoreUnavailableError, JobQueueError):
            # Redis failed, not the job: its entry stays pending and is taken again (run() retries).
            raise
        except PtserveError as exc:
            # Bad data or hyperparameters: the same job would fail the same way again, so no retry.
            logger.warning("job %s failed: %s", lease.job_id, exc.message)
            self.queue.fail(lease, exc.message)
            return "failed"
        except Exception as exc:
            logger.exception("job %s failed unexpectedly", lease.job_id)
            self.queue.fail(lease, f"internal error: {type(exc).__name__}: {exc}")
            return "failed"
