"""``serve --frontends N`` with real processes: N front ends on one port, one engine behind them.

Requests spread over the front ends; uploads through any of them are served by all at once (they
change the engine's caches, as with one process), with zero failed requests under load; a front end
killed with SIGKILL is replaced; an engine killed with SIGKILL makes the replica exit non-zero
(its orchestrator restarts it); SIGTERM drains: every admitted request is answered, then exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prompts.backbone import Backbone
from service.auth import hash_key
from service.frontends.app import FRONTEND_HEADER
from service.frontends.supervisor import ENGINE_EXIT_CODE
from tests.factories import random_artifact
from tests.processes import LoadThreads, PtserveProcess, clean_environment, eventually, free_port

pytestmark = pytest.mark.integration


def start(tmp_path: Path, tiny_bert_dir: Path, frontends: int, **extra: str) -> tuple[PtserveProcess, str]:
    port = free_port()
    settings = {
        "PTSERVE_AUTH": "off",
        "PTSERVE_MODEL": str(tiny_bert_dir),
        "PTSERVE_STORE": str(tmp_path / "store"),
        "PTSERVE_PORT": str(port),
        "PTSERVE_FRONTENDS": str(frontends),
        "PTSERVE_MAX_WAIT_MS": "2",
        "PTSERVE_TORCH_THREADS": "1",
    }
    env = clean_environment(**{**settings, **extra})
    server = PtserveProcess(["serve"], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(base)
    return server, base


@pytest.fixture
def two(tmp_path: Path, tiny_bert_dir: Path) -> Iterator[tuple[PtserveProcess, str]]:
    server, base = start(tmp_path, tiny_bert_dir, 2)
    try:
        yield server, base
    finally:
        server.stop()


def upload(base: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/prompts", files={"file": ("a.safetensors", data)}, timeout=30)


def classify(base: str, task: str = "swap", texts: int = 2) -> httpx.Response:
    # A fresh connection per request: the kernel picks a front end per connection (SO_REUSEPORT).
    body = {"task": task, "texts": ["a b c", "d e"][:texts]}
    return httpx.post(f"{base}/v1/classify", json=body, timeout=30)


def metric(base: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class Load(LoadThreads):
    """Threads classifying until stopped; every outcome, the versions seen and the front ends."""

    def __init__(self, base: str, threads: int) -> None:
        self.base = base
        self.statuses: Counter[str] = Counter()
        self.frontends: Counter[str] = Counter()
        self.versions: list[list[str]] = [[] for _ in range(threads)]
        self.lock = threading.Lock()
        super().__init__([(i,) for i in range(threads)])

    def _loop(self, *args: object) -> None:
        index = int(str(args[0]))
        # Even threads send one text, odd threads two: the engine answers either from the batcher's
        # callbacks while the version is on the device, and through its coroutine path when a swap
        # makes it read the pointer or load. Both must see versions move only forward.
        texts = 1 + index % 2
        while not self._stop.is_set():
            try:
                r = classify(self.base, texts=texts)
                status = str(r.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with self.lock:
                self.statuses[status] += 1
                if status == "200":
                    self.frontends[r.headers[FRONTEND_HEADER]] += 1
                    self.versions[index].append(r.json()["version"])

    def served(self) -> int:
        with self.lock:
            return self.statuses["200"]


def test_three_front_ends_share_the_load_and_swap_versions_without_a_failed_request(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    server, base = start(tmp_path, tiny_bert_dir, 3)
    try:
        versions = [random_artifact(backbone.spec, task="swap", seed=seed) for seed in range(6)]
        assert upload(base, versions[0].data).status_code == 201
        with Load(base, threads=3) as load:
            for artifact in versions[1:]:
                at = load.served()
                eventually(lambda at=at: load.served() >= at + 10, "requests between uploads")
                # Through whichever front end the connection lands on; the engine's cache moves.
                assert upload(base, artifact.data).status_code == 201
                # The next request on any front end gets the new version.
                r = classify(base)
                assert r.status_code == 200 and r.json()["version"] == artifact.version
            at = load.served()
            eventually(lambda: load.served() >= at + 10, "requests after the last upload")
        assert set(load.statuses) == {"200"}, load.statuses
        assert set(load.frontends) == {"0", "1", "2"}, load.frontends
        # Within a thread, versions only move forward in upload order.
        order = {a.version: i for i, a in enumerate(versions)}
        for seen in load.versions:
            ranks = [order[v] for v in seen]
            assert ranks == sorted(ranks)
        # One scrape covers every front end's requests (counted in the engine's registry).
        eventually(
            lambda: (
                metric(base, "ptserve_requests_total", route="/v1/classify", status="200")
                >= load.statuses["200"] + len(versions) - 1
            ),
            "classify requests of every front end in /metrics",
        )
        assert metric(base, "ptserve_batches_total") >= 1
    finally:
        assert server.stop() == 0


def frontend_pids(base: str, frontends: int) -> dict[str, str]:
    """index -> pid of every front end, from /healthz over fresh connections."""
    seen: dict[str, str] = {}

    def all_seen() -> bool:
        checks = httpx.get(f"{base}/healthz", timeout=30).json()["checks"]
        seen[checks["frontend"]] = checks["pid"]
        return len(seen) == frontends

    eventually(all_seen, "every front end to answer /healthz")
    return seen


def test_a_killed_front_end_is_replaced_and_the_others_keep_serving(
    two: tuple[PtserveProcess, str], backbone: Backbone
) -> None:
    server, base = two
    assert upload(base, random_artifact(backbone.spec, task="swap", seed=1).data).status_code == 201
    before = frontend_pids(base, 2)
    os.kill(int(before["0"]), signal.SIGKILL)

    def replaced() -> bool:
        try:
            checks = httpx.get(f"{base}/healthz", timeout=30).json()["checks"]
        except httpx.TransportError:  # a connection that raced the dead front end's socket closing
            return False
        return checks["frontend"] == "0" and checks["pid"] != before["0"]

    eventually(replaced, "front end 0 to be replaced")
    assert frontend_pids(base, 2)["1"] == before["1"]  # the other one was left alone
    outcomes = Counter(classify(base).status_code for _ in range(20))
    assert outcomes == {200: 20}
    server.check_alive()
    assert "front end 0 exited" in server.output()


def test_a_killed_engine_makes_the_replica_exit_non_zero(two: tuple[PtserveProcess, str]) -> None:
    server, _ = two
    found = re.search(r"engine process started \(pid (\d+)\)", server.output())
    assert found is not None, server.output()
    os.kill(int(found.group(1)), signal.SIGKILL)
    assert server.proc.wait(timeout=120) == ENGINE_EXIT_CODE
    assert "engine process exited" in server.output()


def test_sigterm_drains_admitted_requests_then_exits_zero(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    # Batches wait up to 3 s to fill, so requests are still admitted and unanswered at SIGTERM.
    slow = {"PTSERVE_MAX_WAIT_MS": "3000", "PTSERVE_MAX_BATCH_SIZE": "64"}
    server, base = start(tmp_path, tiny_bert_dir, 2, **slow)
    assert upload(base, random_artifact(backbone.spec, task="swap", seed=1).data).status_code == 201
    answers: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        status = classify(base).status_code
        with lock:
            answers.append(status)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    # 8 requests x 2 texts waiting in the engine's batcher.
    eventually(lambda: metric(base, "ptserve_queue_depth") >= 16, "requests waiting for a batch")
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert answers == [200] * 8
    assert server.proc.wait(timeout=60) == 0


def test_keys_are_checked_by_the_front_end_for_classify_and_by_the_engine_for_the_rest(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    keys = {
        "PTSERVE_AUTH": "on",
        "PTSERVE_API_KEYS": f"admin:{hash_key('fe-admin')},classify:{hash_key('fe-user')}",
    }
    server, base = start(tmp_path, tiny_bert_dir, 2, **keys)
    try:
        admin = {"Authorization": "Bearer fe-admin"}
        user = {"Authorization": "Bearer fe-user"}
        data = random_artifact(backbone.spec, task="swap", seed=1).data
        files = {"file": ("a.safetensors", data)}
        assert httpx.post(f"{base}/v1/prompts", files=files, headers=user, timeout=30).status_code == 403
        assert httpx.post(f"{base}/v1/prompts", files=files, headers=admin, timeout=30).status_code == 201
        body = {"task": "swap", "text": "a b c"}
        refused = httpx.post(f"{base}/v1/classify", json=body, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert httpx.post(f"{base}/v1/classify", json=body, headers=user, timeout=30).status_code == 200
        # An error the engine answers keeps its status, code and message.
        missing = httpx.post(
            f"{base}/v1/classify", json={"task": "nope", "text": "a"}, headers=user, timeout=30
        )
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"
        assert missing.headers["X-Request-ID"] == missing.json()["error"]["request_id"]
    finally:
        assert server.stop() == 0


def test_a_keys_rate_holds_across_front_ends_and_refusals_are_counted_once_under_the_engines_routes(
    tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    """A key's rate holds across front ends (a directory store's buckets are the engine's), and
    refusals reach the engine's one registry once each, under the route the engine would have counted
    them: a classify over its key's rate (the request and the refusal, as one process counts them)
    and a relayed route's body over max_body_bytes (refused by a front end, never relayed)."""
    settings = {
        "PTSERVE_AUTH": "on",
        "PTSERVE_API_KEYS": f"admin:{hash_key('fe-admin')},classify:{hash_key('fe-user')}",
        "PTSERVE_KEY_RATE_PER_S": "0.001",
        "PTSERVE_KEY_BURST": "1",
        "PTSERVE_MAX_BODY_BYTES": "1024",
    }
    server, base = start(tmp_path, tiny_bert_dir, 2, **settings)
    try:
        admin = {"Authorization": "Bearer fe-admin"}
        user = {"Authorization": "Bearer fe-user"}
        data = random_artifact(backbone.spec, task="swap", seed=1).data
        files = {"file": ("a.safetensors", data)}
        assert httpx.post(f"{base}/v1/prompts", files=files, headers=admin, timeout=30).status_code == 201
        body = {"task": "swap", "text": "a b c"}
        statuses = [
            httpx.post(f"{base}/v1/classify", json=body, headers=user, timeout=30).status_code
            for _ in range(4)
        ]
        # A directory store's buckets live in the engine, which every front end asks: one token.
        served, refused = statuses.count(200), statuses.count(429)
        assert (served, refused) == (1, 3)
        again = httpx.post(f"{base}/v1/classify", json=body, headers=user, timeout=30)
        assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limited"
        assert int(again.headers["Retry-After"]) > 60  # the bucket's due time, not retry_after_s (1)
        refused += 1
        large = httpx.post(
            f"{base}/v1/training-jobs",
            content=b"{" + b" " * 2048 + b"}",
            headers={**admin, "Content-Type": "application/json"},
            timeout=30,
        )
        assert large.status_code == 413 and large.json()["error"]["code"] == "payload_too_large"

        def arrived() -> bool:
            return (
                metric(base, "ptserve_tenant_refusals_total", tenant="platform", reason="rate_limited")
                == refused
                and metric(base, "ptserve_requests_total", route="/v1/classify", status="200") == served
                and metric(base, "ptserve_requests_total", route="/v1/training-jobs", status="413") == 1
            )

        eventually(arrived, "every front end's records in the engine's metrics", deadline_s=30)
        # A refused request's two records (the refusal, the request) travel in one message.
        assert metric(base, "ptserve_requests_total", route="/v1/classify", status="429") == refused
        assert metric(base, "ptserve_tenant_requests_total", tenant="platform", status="429") == refused
    finally:
        assert server.stop() == 0
