"""The ``ptserve worker`` process: settings, signals, the store and the job queue around a TrainingWorker."""

from __future__ import annotations

import logging
import threading

from prompts.worker import TrainingWorker
from service.errors import JobsDisabledError
from service.settings import Settings

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, stop: threading.Event | None = None) -> None:
    """The ``ptserve worker`` process: load the backbone once, then run jobs until SIGTERM/SIGINT."""
    from prompts.backbone import load_backbone
    from service.runtime import open_job_queue, open_store

    queue = open_job_queue(settings)
    if queue is None:
        raise JobsDisabledError(
            "no job queue: give --jobs-url redis://... (PTSERVE_JOBS_URL) or a redis:// --store"
        )
    stop = stop if stop is not None else threading.Event()
    if threading.current_thread() is threading.main_thread():
        import signal

        def on_signal(signum: int, _: object) -> None:
            logger.info("worker: %s received, stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    store = open_store(settings.store, settings.keep_versions, settings.write_replicas)
    try:
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # Training runs in float32 whatever the serving dtype: half-precision gradients lose the small
        # prompt updates.
        backbone = load_backbone(settings.model, device=settings.device, dtype="float32")
        TrainingWorker(
            backbone,
            queue,
            store,
            heartbeat_s=settings.worker_heartbeat_s,
            data_root=settings.data_root,
            name=settings.worker_name,
        ).run(stop)
    finally:
        queue.close()
        store.close()
