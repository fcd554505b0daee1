"""The processes of ``serve --frontends N`` and their lifecycle.

* The **engine** (one): the whole app (backbone, device pool, batcher, caches, CUDA graphs, watcher)
  on a unix socket private to this server, plus the ZeroMQ endpoint for tokenised classify calls.
* **Front ends** (N): each binds the service port with ``SO_REUSEPORT``, so the kernel spreads
  connections over them, and runs the front-end app (service/frontends/app.py).
* This **supervisor** starts them, replaces a front end that dies (only that front end's in-flight
  requests are lost), and exits non-zero when the engine dies, after stopping the front ends: an
  engine that crashed may have left the device in any state, and the orchestrator that restarts the
  replica (Kubernetes, compose's restart policy) is the one place that already handles a dead
  replica. On SIGTERM or SIGINT it drains: front ends stop accepting and finish what they admitted
  (uvicorn's graceful shutdown), then the engine finishes its calls and batches and exits.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from service.osnames import name_os_thread
from service.settings import Settings

logger = logging.getLogger(__name__)

# A front end that dies this soon after its start is not replaced again at once (a crash loop).
RESTART_BACKOFF_S = 1.0
ENGINE_EXIT_CODE = 3  # the supervisor's exit status when the engine process died


def _context() -> multiprocessing.context.SpawnContext:
    # spawn: a fork of a process that imported torch (or started threads) is not safe.
    return multiprocessing.get_context("spawn")


def run_engine(settings: Settings, engine_socket: str, engine_address: str) -> None:
    """The engine process: today's app on a unix socket, plus the ZeroMQ endpoint."""
    import uvicorn

    name_os_thread("ptserve-engine")  # the main thread: the process
    from service.app import create_app
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, engine_address=engine_address, freeze_gc=True)
    uvicorn.run(
        app,
        uds=engine_socket,
        log_level=settings.log_level,
        log_config=None,
        http="h11",
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
    )


def run_frontend(settings: Settings, index: int, engine_socket: str, engine_address: str) -> None:
    """Front end ``index``: the service port shared with its siblings through SO_REUSEPORT."""
    import uvicorn

    name_os_thread(f"ptserve-fe-{index}")
    from service.frontends.app import create_frontend_app
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per relayed request otherwise
    listener = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((settings.host, settings.port))
    app = create_frontend_app(settings, index, engine_address, engine_socket, freeze_gc=True)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        log_config=None,
        http="h11",
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
    )
    uvicorn.Server(config).run(sockets=[listener])


class Supervisor:
    """Starts the engine and the front ends, keeps the front ends up, and drains them in order."""

    def __init__(self, settings: Settings) -> None:
        if settings.frontends is None:
            raise ValueError("the number of front ends must be decided first (service.cli.with_frontends)")
        self.settings = settings
        self.count = settings.frontends
        # A directory only this user can enter: whoever reaches the sockets is trusted (link.py).
        self._dir = Path(tempfile.mkdtemp(prefix="ptserve-engine-"))
        os.chmod(self._dir, 0o700)
        self.engine_socket = str(self._dir / "engine-http.sock")
        self.engine_address = f"ipc://{self._dir / 'engine-calls.sock'}"
        self.engine: BaseProcess | None = None
        self.frontends: dict[int, BaseProcess] = {}
        self._started_at: dict[int, float] = {}
        self._stopping = threading.Event()

    def _start_frontend(self, index: int) -> None:
        process = _context().Process(
            target=run_frontend,
            args=(self.settings, index, self.engine_socket, self.engine_address),
            name=f"ptserve-frontend-{index}",
        )
        process.start()
        self.frontends[index] = process
        self._started_at[index] = time.monotonic()
        logger.info("front end %d started (pid %d)", index, process.pid)

    def run(self) -> int:
        """Until SIGTERM/SIGINT (exit 0 after draining) or the engine's death (ENGINE_EXIT_CODE)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self._stopping.set())
        self.engine = _context().Process(
            target=run_engine,
            args=(self.settings, self.engine_socket, self.engine_address),
            name="ptserve-engine",
        )
        self.engine.start()
        logger.info("engine process started (pid %d)", self.engine.pid)
        for index in range(self.count):
            self._start_frontend(index)
        try:
            return self._watch()
        finally:
            self._shutdown()

    def _watch(self) -> int:
        assert self.engine is not None
        while not self._stopping.is_set():
            sentinels = [self.engine.sentinel, *(p.sentinel for p in self.frontends.values())]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            if not self.engine.is_alive():
                logger.error(
                    "engine process exited (status %s): stopping the front ends and exiting with %d",
                    self.engine.exitcode,
                    ENGINE_EXIT_CODE,
                )
                return ENGINE_EXIT_CODE
            for index, process in list(self.frontends.items()):
                if process.is_alive() or self._stopping.is_set():
                    continue
                logger.warning("front end %d exited (status %s): replacing it", index, process.exitcode)
                if time.monotonic() - self._started_at[index] < RESTART_BACKOFF_S:
                    self._stopping.wait(RESTART_BACKOFF_S)
                self._start_frontend(index)
        return 0

    def _shutdown(self) -> None:
        """Front ends first (they finish admitted requests, which need the engine), then the engine."""
        grace = self.settings.request_timeout_s + 5.0
        for process in self.frontends.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.frontends.values():
            _join(process, grace)
        if self.engine is not None:
            if self.engine.is_alive() and self.engine.pid is not None:
                os.kill(self.engine.pid, signal.SIGTERM)
            _join(self.engine, grace)
        for path in self._dir.iterdir():
            path.unlink(missing_ok=True)
        self._dir.rmdir()


def _join(process: BaseProcess, timeout: float) -> None:
    process.join(timeout)
    if process.is_alive():
        logger.warning("%s did not stop within %.0f s: killing it", process.name, timeout)
        process.kill()
        process.join()
