"""Real ``ptserve`` processes for integration tests: started with a given environment, output to a file.

Output goes to a log file rather than a pipe: a chatty server (one access line per request) would
fill an unread pipe and block.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

import httpx

from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]
__all__ = ["PtserveProcess", "clean_environment", "eventually", "free_port"]


def eventually(condition: Callable[[], bool], what: str, deadline_s: float = 90.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class PtserveProcess:
    """``python -m service.cli ARGS`` with exactly ``env`` as its environment."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.args = list(args)
        self.log = log
        self._out = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *self.args],
            cwd=REPO,
            env=dict(env),
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def check_alive(self) -> None:
        assert self.proc.poll() is None, f"ptserve {self.args[0]} exited:\n{self.output()[-4000:]}"

    def wait_ready(self, base: str, deadline_s: float = 90.0) -> None:
        def ready() -> bool:
            self.check_alive()
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, f"{self.args[0]} at {base} to be ready", deadline_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


class LoadThreads:
    """Client threads that run ``_loop(*args)`` until the ``with`` block ends (stop, then join).

    Subclasses build their state, then call ``super().__init__`` with one argument tuple per thread;
    ``_loop`` checks ``self._stop`` between requests.
    """

    def __init__(self, per_thread: Sequence[tuple[object, ...]], join_timeout_s: float = 60.0) -> None:
        self._stop = threading.Event()
        self._join_timeout_s = join_timeout_s
        self._threads = [threading.Thread(target=self._loop, args=args, daemon=True) for args in per_thread]

    def _loop(self, *args: object) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self._join_timeout_s)


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any PTSERVE_ setting (pytest's defaults included), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTSERVE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env
