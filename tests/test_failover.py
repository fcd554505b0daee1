"""Losing the Redis primary under load, with real processes: Sentinel and Cluster.

Two ``ptserve serve`` replicas and a training worker run on a Sentinel set (primary + two
replicas, three sentinels) or a nine-node Cluster. While both replicas serve a cached task and a
client uploads new versions of another task through both, a training job is queued; then the
primary holding ptserve's keys is SIGKILLed. Afterwards:

* no accepted upload is lost: every version answered 201 is in the store, and the last one is
  what both replicas serve; pointers are never re-read on the request path here, so that comes from
  their watchers, which resubscribed and re-read the pointers (``ptserve_store_watch_connected``);
* no accepted job is lost: the job queued before the kill succeeds and its version is served;
* the cached task answered 200 throughout; uploads during the failover got 503 with
  ``store_unavailable`` (never a 5xx without a body) and nothing else.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from prompts.backbone import Backbone
from prompts.redis_store import RedisPromptStore
from tests.factories import random_artifact
from tests.processes import LoadThreads, PtserveProcess, clean_environment, eventually, free_port
from tests.synthetic import write_data_dir

if TYPE_CHECKING:
    from tests.redis_ha import ClusterSet, SentinelSet

pytest_plugins = ("tests.redis_server", "tests.redis_ha")

CACHED, UPLOADS, TRAINED = "cached", "uploads", "trained"


class Traffic(LoadThreads):
    """Classify the cached task on every replica; upload new versions of UPLOADS, alternating replicas."""

    def __init__(self, bases: list[str], backbone: Backbone) -> None:
        self.bases = bases
        self.backbone = backbone
        self.classified: Counter[int] = Counter()
        self.classify_failures: list[str] = []
        self.accepted: list[str] = []  # versions answered 201, in order
        self.refused: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__([("classify", base) for base in bases] + [("upload", "")])

    def _loop(self, *args: object) -> None:
        role, base = str(args[0]), str(args[1])
        with httpx.Client(timeout=30) as client:
            seed = 100
            while not self._stop.is_set():
                if role == "classify":
                    r = client.post(f"{base}/v1/classify", json={"task": CACHED, "text": "alpha"})
                    with self.lock:
                        self.classified[r.status_code] += 1
                        if r.status_code != 200:
                            self.classify_failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                artifact = random_artifact(self.backbone.spec, task=UPLOADS, seed=seed)
                target = self.bases[seed % len(self.bases)]
                r = client.post(f"{target}/v1/prompts", files={"file": ("a.safetensors", artifact.data)})
                with self.lock:
                    if r.status_code == 201:
                        self.accepted.append(artifact.version)
                        seed += 1
                    else:
                        code = (
                            r.json()["error"]["code"]
                            if r.headers.get("content-type") == "application/json"
                            else ""
                        )
                        self.refused[f"{r.status_code} {code}"] += 1

    def accepted_count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def served(self) -> int:
        with self.lock:
            return self.classified[200]


def served_version(base: str, task: str) -> str | None:
    r = httpx.post(f"{base}/v1/classify", json={"task": task, "text": "alpha"}, timeout=30)
    if r.status_code != 200:
        return None
    version: str = r.json()["version"]
    return version


def watching(base: str) -> bool:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return "ptserve_store_watch_connected 1.0" in text


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_primary_killed_under_load_loses_no_accepted_upload_or_job(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_bert_dir: Path, backbone: Backbone
) -> None:
    topology: SentinelSet | ClusterSet = request.getfixturevalue(f"fresh_{kind}_set")
    url = topology.url()
    data_root = tmp_path / "training"
    write_data_dir(data_root / TRAINED)
    common = {
        "PTSERVE_AUTH": "off",
        "PTSERVE_STORE": url,
        "PTSERVE_MODEL": str(tiny_bert_dir),
        "PTSERVE_DATA_ROOT": str(data_root),
        "PTSERVE_KEEP_VERSIONS": "1000",  # every accepted version stays, so the test can find it
        "PTSERVE_MAX_WAIT_MS": "2",
        # Pointers are never re-read on the request path: a replica learns of the other's uploads only
        # through its watcher, which must resubscribe after the failover and re-read what it serves.
        "PTSERVE_POINTER_TTL_S": "3600",
        "PTSERVE_WATCH_MAX_BACKOFF_S": "0.2",
    }
    processes: list[PtserveProcess] = []
    bases: list[str] = []
    try:
        for i in range(2):
            port = free_port()
            env = clean_environment(**common, PTSERVE_PORT=str(port))
            processes.append(PtserveProcess(["serve"], env, tmp_path / f"serve-{i}.log"))
            bases.append(f"http://127.0.0.1:{port}")
        processes.append(PtserveProcess(["worker"], clean_environment(**common), tmp_path / "worker.log"))
        for proc, base in zip(processes, bases, strict=False):
            proc.wait_ready(base)
        a, b = bases
        cached = random_artifact(backbone.spec, task=CACHED, seed=1)
        assert (
            httpx.post(f"{a}/v1/prompts", files={"file": ("c.safetensors", cached.data)}).status_code == 201
        )
        for base in bases:
            eventually(lambda base=base: served_version(base, CACHED) == cached.version, f"{base} serves")

        with Traffic(bases, backbone) as traffic:
            eventually(lambda: traffic.accepted_count() >= 3, "uploads before the kill")
            job = {
                "task": TRAINED,
                "method": "prefix",
                "hyperparameters": {"epochs": 2, "batch_size": 8, "prefix_length": 4},
                "data_path": TRAINED,
            }
            submitted = httpx.post(f"{b}/v1/training-jobs", json=job, timeout=30)
            assert submitted.status_code == 202, submitted.text
            job_path = submitted.headers["Location"]

            # On a Cluster: the primary of the slot of every key ptserve keeps (hash tag {ptserve}).
            topology.kill_primary("{ptserve}:tasks")
            at_failover, served_at_failover = traffic.accepted_count(), traffic.served()
            eventually(lambda: traffic.accepted_count() >= at_failover + 3, "uploads after the failover")
            eventually(lambda: traffic.served() >= served_at_failover + 10, "classification after it")

        status: dict[str, Any] = {}

        def job_done() -> bool:
            status.update(httpx.get(f"{a}{job_path}", timeout=30).json())
            assert status["state"] != "failed", f"{status}\nworker log:\n{processes[-1].output()[-3000:]}"
            return bool(status["state"] == "succeeded")

        eventually(job_done, "the job queued before the kill to succeed", deadline_s=180)
        for proc in processes:
            proc.check_alive()

        store = RedisPromptStore(url, keep_versions=1000)
        try:
            stored = set(store.versions(UPLOADS))
            lost = [v for v in traffic.accepted if v not in stored]
            assert lost == [], f"accepted uploads missing after the failover: {lost}"
            assert store.current_version(UPLOADS) == traffic.accepted[-1]
        finally:
            store.close()
        for base in bases:
            eventually(lambda base=base: watching(base), f"{base} to follow the store's changes again")
            eventually(
                lambda base=base: served_version(base, UPLOADS) == traffic.accepted[-1],
                f"{base} to converge on the last accepted upload",
            )
            eventually(lambda base=base: served_version(base, TRAINED) == status["version"], f"{base} job")
        assert traffic.classify_failures == [], traffic.classify_failures[:5]
        # Refusals during the failover say what happened; nothing else failed.
        assert set(traffic.refused) <= {"503 store_unavailable"}, traffic.refused
        print(  # the figures the closing note quotes (pytest -s)
            f"{kind}: {len(traffic.accepted)} uploads accepted ({at_failover} before the kill), "
            f"refused {dict(traffic.refused)}, classify {dict(traffic.classified)}"
        )
    finally:
        for proc in processes:
            proc.stop()
