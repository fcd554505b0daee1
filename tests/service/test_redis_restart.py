"""Redis restarted under load, with a real ``ptserve serve`` process: no failed request for a cached
task, a clear 503 for an uncached one while Redis is down, and full service back without a restart.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from prompts.backbone import Backbone
from prompts.redis_store import RedisPromptStore
from tests.factories import random_artifact
from tests.processes import LoadThreads, PtserveProcess, clean_environment, eventually, free_port

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)
pytestmark = pytest.mark.integration


class Load(LoadThreads):
    """Threads classifying one task as fast as the server answers, counting every outcome."""

    def __init__(self, base: str, task: str, threads: int = 4) -> None:
        self.base, self.task = base, task
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        super().__init__([()] * threads, join_timeout_s=30)

    def _loop(self, *args: object) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.base}/v1/classify", json={"task": self.task, "text": "steady"})
                    outcome = str(r.status_code)
                    detail = r.text
                except httpx.HTTPError as exc:
                    outcome, detail = "transport", repr(exc)
                with self._lock:
                    self.outcomes[outcome] += 1
                    if outcome != "200":
                        self.failures.append(f"{outcome}: {detail[:200]}")

    def served(self) -> int:
        with self._lock:
            return self.outcomes["200"]


def test_redis_restart_under_load_fails_no_cached_request_and_recovers(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone, private_redis: RedisServer
) -> None:
    store = RedisPromptStore(private_redis.url)
    cached = random_artifact(backbone.spec, task="cached", seed=1)
    uncached = random_artifact(backbone.spec, task="uncached", seed=2)
    for artifact in (cached, uncached):
        store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    store.close()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = clean_environment(
        PTSERVE_AUTH="off",
        PTSERVE_STORE=private_redis.url,
        PTSERVE_MODEL=str(tiny_bert_dir),
        PTSERVE_PORT=str(port),
        PTSERVE_MAX_WAIT_MS="2",
        # Pointers re-read from Redis every 0.2 s: the load meets the outage on the request path.
        PTSERVE_POINTER_TTL_S="0.2",
        PTSERVE_WATCH_MAX_BACKOFF_S="0.2",
    )
    server = PtserveProcess(["serve"], env, tmp_path / "serve.log")
    try:
        server.wait_ready(base)
        with Load(base, "cached") as load:
            eventually(lambda: load.served() >= 20, "load on the cached task")
            raw = redis.Redis.from_url(private_redis.url)
            raw.save()  # the test server has no persistence configured; a deployed one (AOF) would
            raw.close()
            private_redis.stop()

            at_outage = load.served()
            eventually(lambda: load.served() >= at_outage + 50, "cached requests served during the outage")
            r = httpx.post(f"{base}/v1/classify", json={"task": "uncached", "text": "hi"}, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
            assert "'uncached' is not cached on this replica" in r.json()["error"]["message"]
            assert r.headers.get("Retry-After")

            # Still ready (cached tasks serve); the store's state is reported beside readiness, as of
            # a ping at most a second old.
            def degraded() -> bool:
                ready = httpx.get(f"{base}/readyz", timeout=30)
                assert ready.status_code == 200, ready.text
                return bool(ready.json()["status"] == "degraded")

            eventually(degraded, "/readyz to report the store down")
            assert "unreachable" in httpx.get(f"{base}/readyz", timeout=30).json()["checks"]["store"]
            assert "ptserve_store_up 0.0" in httpx.get(f"{base}/metrics", timeout=30).text
            server.check_alive()

            private_redis.start()
            eventually(
                lambda: httpx.get(f"{base}/readyz", timeout=30).json()["checks"]["store"] == "ok",
                "/readyz reports the store back",
            )
            assert "ptserve_store_up 1.0" in httpx.get(f"{base}/metrics", timeout=30).text
            eventually(
                lambda: (
                    httpx.post(
                        f"{base}/v1/classify", json={"task": "uncached", "text": "hi"}, timeout=30
                    ).status_code
                    == 200
                ),
                "the uncached task served after the restart",
            )
            after = load.served()
            eventually(lambda: load.served() >= after + 20, "load after the restart")
        assert load.failures == [], load.failures[:5]
        assert load.outcomes["200"] >= 90
        server.check_alive()
    finally:
        server.stop()
