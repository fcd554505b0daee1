"""Hot swap end to end: rollback over HTTP, two real replicas on one Redis, a Redis outage, scale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from prompts.redis_store import RedisPromptStore
from prompts.store import PromptStore
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.factories import random_artifact
from tests.processes import LoadThreads
from tests.processes import eventually as wait_until

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 30.0


def eventually(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    wait_until(condition, what, deadline_s)


def upload(client: TestClient | httpx.Client, artifact: PromptArtifact) -> Any:
    return client.post("/v1/prompts", files={"file": ("a.safetensors", artifact.data)})


def put(store: PromptStore, artifact: PromptArtifact) -> None:
    store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())


def served_version(client: TestClient | httpx.Client, task: str) -> str | None:
    r = client.post("/v1/classify", json={"task": task, "text": "hello there"})
    return str(r.json()["version"]) if r.status_code == 200 else None


# ------------------------------------------------------------------------------ rollback over HTTP


def check_rollback(client: TestClient, backbone: Backbone) -> None:
    v1, v2, v3 = (random_artifact(backbone.spec, task="rb", seed=s) for s in (1, 2, 3))
    for artifact in (v1, v2, v3):
        assert upload(client, artifact).status_code == 201
    assert served_version(client, "rb") == v3.version

    r = client.post("/v1/prompts/rb/rollback")  # no body: the previous version
    assert r.status_code == 200, r.text
    assert r.json() == {"task": "rb", "version": v2.version, "previous": v3.version}
    assert served_version(client, "rb") == v2.version  # at once on this replica
    assert client.get("/v1/prompts/rb").json()["version"] == v2.version

    r = client.post("/v1/prompts/rb/rollback", json={})
    assert r.status_code == 200 and r.json()["version"] == v1.version
    r = client.post("/v1/prompts/rb/rollback")
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    assert "no version older" in r.json()["error"]["message"]

    r = client.post("/v1/prompts/rb/rollback", json={"version": v3.version})  # forward again, by name
    assert r.status_code == 200 and r.json() == {"task": "rb", "version": v3.version, "previous": v1.version}
    assert served_version(client, "rb") == v3.version

    r = client.post("/v1/prompts/rb/rollback", json={"version": "0" * 16})
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    r = client.post("/v1/prompts/ghost/rollback")
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    r = client.post("/v1/prompts/rb/rollback", json={"version": 7})
    assert r.status_code == 422
    assert served_version(client, "rb") == v3.version


def test_rollback_over_http_on_the_disk_store(tmp_path: Path, backbone: Backbone) -> None:
    with TestClient(
        create_app(Settings(store=str(tmp_path / "store"), max_wait_ms=1), backbone=backbone)
    ) as c:
        check_rollback(c, backbone)


def test_rollback_over_http_on_the_redis_store(redis_url: str, redis_prefix: str, backbone: Backbone) -> None:
    store = RedisPromptStore(redis_url, prefix=redis_prefix)
    try:
        app = create_app(Settings(store=redis_url, max_wait_ms=1), backbone=backbone, store=store)
        with TestClient(app) as c:
            check_rollback(c, backbone)
    finally:
        store.close()


# -------------------------------------------------------------------------- Redis outage, in process


def test_redis_outage_keeps_cached_tasks_and_recovers_without_a_restart(
    private_redis: RedisServer, backbone: Backbone
) -> None:
    store = RedisPromptStore(private_redis.url)
    cached = random_artifact(backbone.spec, task="cached", seed=1)
    uncached = random_artifact(backbone.spec, task="uncached", seed=2)
    put(store, cached)
    put(store, uncached)
    # TTL 0 so every request asks Redis for the pointer and meets the outage head on.
    settings = Settings(store=private_redis.url, max_wait_ms=1, pointer_ttl_s=0.0, watch_max_backoff_s=0.2)
    try:
        with TestClient(create_app(settings, backbone=backbone, store=store)) as client:
            runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
            assert runtime.watcher is not None
            eventually(lambda: runtime.watcher is not None and runtime.watcher.connected, "subscription")
            assert served_version(client, "cached") == cached.version
            raw = redis.Redis.from_url(private_redis.url)
            raw.save()  # so the restarted server has the data, like a persistent Redis
            raw.close()
            private_redis.stop()

            for _ in range(5):
                assert served_version(client, "cached") == cached.version
            r = client.post("/v1/classify", json={"task": "uncached", "text": "hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert "'uncached' is not cached on this replica" in r.json()["error"]["message"]
            assert "unreachable" in r.json()["error"]["message"]
            # The store's state is re-checked at most once a second; readiness holds throughout.
            eventually(
                lambda: "unreachable" in client.get("/readyz").json()["checks"]["store"], "outage seen"
            )
            assert client.get("/readyz").status_code == 200
            eventually(lambda: runtime.watcher is not None and not runtime.watcher.connected, "cut noticed")
            assert client.get("/healthz").status_code == 200

            private_redis.start()
            eventually(
                lambda: client.get("/readyz").json()["checks"]["store"] == "ok", "store back in /readyz"
            )
            eventually(lambda: served_version(client, "uncached") == uncached.version, "uncached served")
            assert served_version(client, "cached") == cached.version
            eventually(lambda: runtime.watcher is not None and runtime.watcher.connected, "resubscribed")
            # Changes are followed again without restarting the replica.
            other = RedisPromptStore(private_redis.url)
            newer = random_artifact(backbone.spec, task="cached", seed=3)
            put(other, newer)
            other.close()
            eventually(lambda: runtime.cache.current("cached") == newer.version, "a change after the outage")
    finally:
        store.close()


# ---------------------------------------------------------------------------------- scale: 10,000


def test_ten_thousand_registered_tasks_cost_only_what_is_cached(
    redis_url: str, redis_prefix: str, backbone: Backbone
) -> None:
    store = RedisPromptStore(redis_url, prefix=redis_prefix)
    served = range(0, 10_000, 250)  # the 40 tasks requests will ask for
    filler = random_artifact(backbone.spec, task="filler", num_labels=2)
    try:
        for i in range(10_000):
            name = f"t{i:05d}"
            if i in served:
                put(store, random_artifact(backbone.spec, task=name, seed=i, num_labels=2))
            else:  # registered, listed, never requested: the payload is never parsed
                manifest = filler.manifest_json().replace('"filler"', f'"{name}"')
                store.put(name, filler.version, filler.data, manifest)
        size = 2 * len(filler.data)  # a loaded task's device bytes are below its artifact's
        budget = 4 * size
        settings = Settings(store=redis_url, cache_bytes=budget, host_cache_bytes=budget, max_wait_ms=1)
        with TestClient(create_app(settings, backbone=backbone, store=store)) as client:
            runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
            entry_size = 0
            for i in served:
                name = f"t{i:05d}"
                r = client.post("/v1/classify", json={"task": name, "text": "x"})
                assert r.status_code == 200 and r.json()["task"] == name
                entry_size = entry_size or runtime.cache.nbytes
                assert runtime.cache.nbytes <= budget and runtime.cache.host_nbytes <= budget
            fits = budget // entry_size
            assert 2 <= len(runtime.cache) <= fits and runtime.cache.evictions == len(served) - len(
                runtime.cache
            )
            listed = client.get("/v1/prompts").json()["tasks"]
            assert len(listed) == 10_000 and listed[-1]["task"] == "t09999"
    finally:
        store.close()


# ------------------------------------------------------------------ two real replicas on one Redis


@contextmanager
def replica(tiny_bert_dir: Path, store_url: str, port: int) -> Iterator[str]:
    """A real ``ptserve serve`` process; yields its base URL once /readyz answers 200."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PTSERVE_MAX_WAIT_MS": "1",
        "PTSERVE_TORCH_THREADS": "1",
        "PTSERVE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--model", str(tiny_bert_dir)]
    command += ["--store", store_url, "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(ready, f"replica on port {port}", deadline_s=90)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


class Load(LoadThreads):
    """Threads sending classify requests to every replica until stopped, recording every outcome."""

    def __init__(self, bases: list[str], task: str, phase: Callable[[], int]) -> None:
        self._task = task
        self._phase = phase
        # (phase when sent, phase when answered, status or exception text, version or None)
        self.outcomes: list[tuple[int, int, str, str | None]] = []
        self._lock = threading.Lock()
        super().__init__([(b,) for b in bases])

    def _loop(self, *args: object) -> None:
        (base,) = args
        with httpx.Client(base_url=str(base), timeout=30) as client:
            while not self._stop.is_set():
                sent = self._phase()
                try:
                    r = client.post("/v1/classify", json={"task": self._task, "texts": ["a b c", "d e"]})
                    status, version = str(r.status_code), r.json().get("version")
                except (httpx.HTTPError, ValueError) as exc:
                    status, version = f"{type(exc).__name__}: {exc}", None
                with self._lock:
                    self.outcomes.append((sent, self._phase(), status, version))


@pytest.mark.integration
def test_two_replicas_on_one_redis_swap_under_load_without_a_failed_request(
    private_redis: RedisServer, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    from tests.redis_server import free_port

    with ExitStack() as stack:
        base_a = stack.enter_context(replica(tiny_bert_dir, private_redis.url, free_port()))
        base_b = stack.enter_context(replica(tiny_bert_dir, private_redis.url, free_port()))
        a = stack.enter_context(httpx.Client(base_url=base_a, timeout=30))
        b = stack.enter_context(httpx.Client(base_url=base_b, timeout=30))

        # Uploaded to A, served by B; rolled back on B, served by A.
        v0, v1 = (random_artifact(backbone.spec, task="swap", seed=s) for s in (100, 101))
        assert upload(a, v0).status_code == 201
        assert served_version(b, "swap") == v0.version  # B never saw it: read from Redis
        assert upload(a, v1).status_code == 201
        assert served_version(a, "swap") == v1.version
        eventually(lambda: served_version(b, "swap") == v1.version, "B to serve A's upload")
        r = b.post("/v1/prompts/swap/rollback")
        assert r.status_code == 200 and r.json()["version"] == v0.version
        assert served_version(b, "swap") == v0.version
        eventually(lambda: served_version(a, "swap") == v0.version, "A to serve B's rollback")

        # 20 swaps under continuous load on both replicas: uploads of new versions on either
        # replica, and every fourth a rollback to the version before.
        versions = [v0.version]
        phase = [0]
        with Load([base_a, base_b], "swap", lambda: phase[0]) as load:
            eventually(lambda: len(load.outcomes) >= 10, "load to start")
            for i in range(20):
                writer, other = (a, b) if i % 2 == 0 else (b, a)
                if i % 4 == 3:
                    r = writer.post("/v1/prompts/swap/rollback", json={"version": versions[-2]})
                    assert r.status_code == 200, r.text
                    new = versions[-2]
                else:
                    artifact = random_artifact(backbone.spec, task="swap", seed=200 + i)
                    assert upload(writer, artifact).status_code == 201
                    new = artifact.version
                versions.append(new)
                assert served_version(writer, "swap") == new
                eventually(
                    lambda o=other, n=new: served_version(o, "swap") == n,  # type: ignore[misc]
                    f"swap {i} on the other replica",
                )
                phase[0] = i + 1
            eventually(lambda: sum(1 for o in load.outcomes if o[0] == 20) >= 4, "load after the last swap")

    outcomes = list(load.outcomes)
    failed = [o for o in outcomes if o[2] != "200"]
    assert not failed, failed[:5]
    for sent, answered, _, version in outcomes:
        # Sent during swap `sent` (old: versions[sent], new: versions[sent + 1]); answered during
        # swap `answered`: any version current between the two is right, nothing else is.
        allowed = set(versions[sent : min(answered + 2, len(versions))])
        assert version in allowed, (sent, answered, version)
    assert len(outcomes) >= 40
