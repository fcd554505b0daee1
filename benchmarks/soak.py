"""Soak: a real ``ptserve serve`` under steady mixed traffic over many tasks, with swaps, for minutes.

    .venv/bin/python -m benchmarks.soak                          # packaged MiniLM, 50 tasks, 600 s
    .venv/bin/python -m benchmarks.soak --duration 60 --model tests-tiny-model-dir

Steps: start the server (a subprocess on a free port, temporary disk store), upload ``--tasks``
random P-tuning v2 tasks, warm every task, then measure capacity with a short closed loop
(``--capacity-seconds``, ``--concurrency`` clients) on the same request mix. The soak itself offers
Poisson arrivals at ``--load`` x that capacity for ``--duration`` seconds, as open-loop windows of
``--window`` seconds started back to back on the clock, each run by ``benchmarks/loadgen.py`` in its
own process (a window's late answers drain while the next one's arrivals run; each window loses the
~0.3 s its process takes to start). The request
mix cycles over every task: ``--multi-share`` of the requests carry ``--multi-texts`` texts, the rest
one. Meanwhile a thread here re-uploads one task (round robin, a new artifact each time) every
``--swap-every`` seconds. Per window: requests sent and answered, non-200 answers, unanswered
requests, p50 / p99 latency (from each request's scheduled time), the server's resident memory.
Everything goes to ``--out`` (default ``benchmarks/out/soak``): ``soak.json``, ``soak.md``, ``soak.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import DEFAULT_DATA_ROOT, load_texts, machine, markdown_table, percentile, write_report
from benchmarks.perf_http import REPO_ROOT, Server, process_cpu_s, run_loadgen, running_server, wait_ready
from prompts.artifact import PromptArtifact, build_artifact
from prompts.backbone import Backbone, load_backbone

FALLBACK_TEXTS = [
    "the battery lasts two days and the screen is sharp",
    "this novel kept me up all night",
    "the sneakers fell apart after a week",
    "my toddler loves these wooden blocks",
    "is there a cheaper plan for students",
    "how do I reset my password",
    "refund please, the blender arrived broken",
    "free entry in a weekly prize draw, text now",
]


def task_artifact(
    backbone: Backbone, task: str, seed: int, prefix_length: int, labels: int
) -> PromptArtifact:
    spec = backbone.spec
    g = torch.Generator().manual_seed(seed)
    return build_artifact(
        task=task,
        labels=[f"l{j}" for j in range(labels)],
        spec=spec,
        # [layers, 2, heads, P, head_dim]
        prefix=torch.randn(spec.num_layers, 2, spec.num_kv_heads, prefix_length, spec.head_dim, generator=g)
        * 0.1,
        head_weight=torch.randn(labels, spec.hidden_size, generator=g) * 0.02,
        head_bias=torch.zeros(labels),
    )


def upload(client: httpx.Client, url: str, artifact: PromptArtifact) -> int:
    files = {"file": ("artifact.safetensors", artifact.data, "application/octet-stream")}
    return client.post(f"{url}/v1/prompts", files=files).status_code


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def make_bodies(tasks: list[str], texts: list[str], args: argparse.Namespace, count: int) -> list[str]:
    rng = random.Random(args.seed)
    bodies = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        if rng.random() < args.multi_share:
            body: dict[str, Any] = {"task": task, "texts": rng.sample(texts, args.multi_texts)}
        else:
            body = {"task": task, "text": rng.choice(texts)}
        bodies.append(json.dumps(body))
    return bodies


@dataclass
class Swapper:
    """Re-uploads one task every ``every`` seconds until stopped; records each upload's outcome."""

    url: str
    backbone: Backbone
    tasks: list[str]
    every: float
    prefix_length: int
    labels: int
    t0: float
    stop: threading.Event = field(default_factory=threading.Event)
    swaps: list[dict[str, Any]] = field(default_factory=list)

    def run(self) -> None:
        n = 0
        with httpx.Client(timeout=60.0) as client:
            while not self.stop.wait(self.every):
                task = self.tasks[n % len(self.tasks)]
                artifact = task_artifact(self.backbone, task, 10_000 + n, self.prefix_length, self.labels)
                start = time.perf_counter()
                try:
                    status = str(upload(client, self.url, artifact))
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.swaps.append(
                    {
                        "at_s": round(start - self.t0, 2),
                        "task": task,
                        "version": artifact.version,
                        "status": status,
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                )
                n += 1


def launch_loadgen(
    job: dict[str, Any], workdir: Path, client_threads: int
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one ``benchmarks.loadgen`` process for ``job``; its outcome lands in the returned path."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = workdir / "job.json", workdir / "result.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    if client_threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(client_threads)
    command = [sys.executable, "-m", "benchmarks.loadgen", str(job_path), str(result_path)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env), result_path


def window_row(index: int, start_s: float, outcome: dict[str, Any], rss: float, swaps: int) -> dict[str, Any]:
    latencies = [x * 1000 for x in outcome["latencies_s"]]
    errors = sum(outcome["errors"].values())
    return {
        "window": index,
        "start_s": round(start_s, 1),
        "end_s": round(start_s + outcome["window_s"], 1),
        "sent": outcome["sent"],
        "ok": outcome["ok"],
        "errors": errors,
        "error_kinds": outcome["errors"],
        "unfinished": outcome["unfinished"],
        "dropped": outcome["dropped"],
        "answered_rps": outcome["ok"] / outcome["window_s"],
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "rss_mb": rss,
        "swaps": swaps,
    }


def plot(path: Path, windows: list[dict[str, Any]], rss_start: float, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [(w["start_s"] + w["end_s"]) / 2 for w in windows]  # latency: at each window's middle
    fig, (lat, mem) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    lat.plot(t, [w["p50_ms"] for w in windows], marker="o", label="p50")
    lat.plot(t, [w["p99_ms"] for w in windows], marker="o", label="p99")
    bad = [w for w in windows if w["errors"] + w["unfinished"] + w["dropped"]]
    if bad:
        lat.scatter(
            [(w["start_s"] + w["end_s"]) / 2 for w in bad],
            [w["p99_ms"] for w in bad],
            color="red",
            zorder=3,
            label="errors",
        )
    lat.set_ylabel("latency (ms)")
    lat.legend()
    lat.set_title(title)
    ends = [0.0, *(w["end_s"] for w in windows)]  # memory: sampled at each window's end
    mem.plot(ends, [rss_start, *(w["rss_mb"] for w in windows)], marker="o", color="tab:green")
    mem.set_ylabel("server RSS (MiB)")
    mem.set_xlabel("seconds into the soak")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    parser.add_argument("--swap-every", type=float, default=30.0, help="seconds between task re-uploads")
    parser.add_argument("--load", type=float, default=0.7, help="offered rate as a fraction of capacity")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--multi-share", type=float, default=0.2, help="share of multi-text requests")
    parser.add_argument("--multi-texts", type=int, default=8, help="texts in a multi-text request")
    parser.add_argument("--capacity-seconds", type=float, default=15.0, help="closed-loop capacity run")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument(
        "--model", type=Path, default=None, help="encoder directory (default: packaged MiniLM)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="sst2", help="texts come from its test split")
    parser.add_argument("--max-batch-size", type=int, default=32, help="PTSERVE_MAX_BATCH_SIZE")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="PTSERVE_MAX_WAIT_MS")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="PTSERVE_MAX_BATCH_TOKENS")
    parser.add_argument(
        "--server-threads", type=int, default=0, help="OMP/MKL threads of the server (0: all)"
    )
    parser.add_argument("--client-threads", type=int, default=1, help="OMP/MKL threads of the load generator")
    parser.add_argument("--log-level", default="warning", help="PTSERVE_LOG_LEVEL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/soak"))
    args = parser.parse_args()
    if args.window <= 0 or args.duration < args.window:
        parser.error("--duration must be at least one --window")

    # SIGTERM to the soak unwinds normally, so the server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    backbone = load_backbone(args.model, device="cpu")
    try:
        texts = [t for t in load_texts(args.data_root, args.dataset, limit=2000) if t.strip()]
    except OSError:
        print(f"no {args.dataset} texts under {args.data_root}; using built-in sentences", file=sys.stderr)
        texts = FALLBACK_TEXTS
    texts = texts if len(texts) >= args.multi_texts else texts * args.multi_texts

    with tempfile.TemporaryDirectory(prefix="ptserve-soak-") as tmp:
        workdir = Path(tmp)
        with running_server(args, workdir / "store", workdir / "server.log") as server:
            try:
                payload = soak(args, server, backbone, texts, workdir)
            except BaseException:
                print(f"--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
                raise
    report(args, payload, backbone)


def soak(
    args: argparse.Namespace, server: Server, backbone: Backbone, texts: list[str], workdir: Path
) -> dict[str, Any]:
    ready_s = wait_ready(server, args.startup_timeout)
    pid = server.process.pid
    tasks = [f"soak-{i}" for i in range(args.tasks)]
    with httpx.Client(timeout=60.0) as client:
        for i, task in enumerate(tasks):
            status = upload(
                client, server.url, task_artifact(backbone, task, i, args.prefix_length, args.labels)
            )
            if status != 201:
                raise RuntimeError(f"upload of {task} answered {status}")
        for task in tasks:  # every task loaded on the device, the allocator warm
            client.post(f"{server.url}/v1/classify", json={"task": task, "texts": texts[:4]})
    print(f"server ready in {ready_s:.1f} s; {len(tasks)} tasks uploaded and warm")
    bodies = make_bodies(tasks, texts, args, 4000)
    rows_per_request = 1 + args.multi_share * (args.multi_texts - 1)

    def job(mode: str, duration: float, **extra: Any) -> dict[str, Any]:
        return {
            "url": server.url,
            "mode": mode,
            "bodies": bodies,
            "rows_per_request": round(rows_per_request),
            "duration_s": duration,
            "drain_s": 30.0,
            "max_requests": 10_000_000,
            "seed": args.seed,
            **extra,
        }

    capacity_outcome = run_loadgen(
        job("closed", args.capacity_seconds, warmup_s=2.0, concurrency=args.concurrency),
        workdir,
        args.client_threads,
    )
    capacity = capacity_outcome["window_requests"] / args.capacity_seconds
    if capacity <= 0:
        raise RuntimeError(f"capacity run answered nothing: {capacity_outcome['errors']}")
    rate = args.load * capacity
    print(
        f"capacity {capacity:.1f} requests/s (closed loop, {args.concurrency} clients); offering {rate:.1f}/s"
    )

    rss_start = rss_mb(pid)
    cpu_start = process_cpu_s(pid)
    t0 = time.perf_counter()
    swapper = Swapper(server.url, backbone, tasks, args.swap_every, args.prefix_length, args.labels, t0)
    thread = threading.Thread(target=swapper.run, name="swapper", daemon=True)
    thread.start()
    starts = [k * args.window for k in range(math.ceil(args.duration / args.window - 1e-9))]
    launched: list[tuple[subprocess.Popen[bytes], Path, float, float]] = []
    rss_at: list[float] = []  # server RSS at each window's end
    try:
        for index, start in enumerate(starts):
            # Windows follow each other on the clock, not on the previous window's last answer: its
            # late answers drain while the next window's arrivals already run.
            time.sleep(max(0.0, t0 + start - time.perf_counter()))
            if index:
                rss_at.append(rss_mb(pid))
            length = min(args.window, args.duration - start)
            spec = job("open", length, warmup_s=0.0, rate=rate, seed=args.seed + index)
            launched.append(
                (*launch_loadgen(spec, workdir / f"window-{index}", args.client_threads), start, length)
            )
        time.sleep(max(0.0, t0 + args.duration - time.perf_counter()))
        rss_at.append(rss_mb(pid))
        windows = []
        for index, (proc, result, start, length) in enumerate(launched):
            if proc.wait(timeout=length + 120) != 0 or not result.exists():
                raise RuntimeError(f"load generator of window {index} failed ({proc.returncode})")
            outcome = json.loads(result.read_text())
            swaps = sum(1 for s in swapper.swaps if start <= s["at_s"] < start + length)
            row = window_row(index, start, outcome, rss_at[index], swaps)
            windows.append(row)
            print(
                f"  [{row['start_s']:6.1f} s] {row['ok']} ok, {row['errors']} errors, "
                f"{row['unfinished']} unanswered, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                f"RSS {row['rss_mb']:.0f} MiB"
            )
    finally:
        swapper.stop.set()
        thread.join(timeout=120)
        for proc, *_ in launched:
            if proc.poll() is None:
                proc.kill()
    wall = time.perf_counter() - t0
    return {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "model": backbone.spec.describe(),
        "ready_s": ready_s,
        "capacity_rps": capacity,
        "capacity_p99_ms": percentile([x * 1000 for x in capacity_outcome["latencies_s"]], 99),
        "capacity_errors": capacity_outcome["errors"],
        "offered_rps": rate,
        "wall_s": wall,
        "server_cpu_cores": (process_cpu_s(pid) - cpu_start) / wall,
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_mb(pid),
        "windows": windows,
        "swaps": swapper.swaps,
        "server_alive": server.process.poll() is None,
    }


def report(args: argparse.Namespace, payload: dict[str, Any], backbone: Backbone) -> None:
    windows = payload["windows"]
    sent = sum(w["sent"] for w in windows)
    ok = sum(w["ok"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    lost = sum(w["unfinished"] + w["dropped"] for w in windows)
    swaps = payload["swaps"]
    swaps_failed = [s for s in swaps if s["status"] != "201"]
    growth = payload["rss_end_mb"] - payload["rss_start_mb"]
    payload["totals"] = {
        "sent": sent,
        "ok": ok,
        "errors": errors,
        "lost": lost,
        "swaps": len(swaps),
        "swaps_failed": len(swaps_failed),
        "rss_growth_mb": growth,
    }
    headers = ["window start (s)", "sent", "200", "errors", "unanswered", "answered req/s"]
    headers += ["p50 ms", "p99 ms", "RSS MiB", "swaps"]
    rows = [
        [
            w["start_s"],
            w["sent"],
            w["ok"],
            w["errors"],
            w["unfinished"] + w["dropped"],
            round(w["answered_rps"], 1),
            f"{w['p50_ms']:.0f}",
            f"{w['p99_ms']:.0f}",
            f"{w['rss_mb']:.0f}",
            w["swaps"],
        ]
        for w in windows
    ]
    table = markdown_table(headers, rows)
    md = (
        f"## Soak ({backbone.spec.model_type}, {args.device}, {args.tasks} tasks, {args.duration:g} s)\n\n"
        f"`ptserve serve` subprocess, {args.tasks} P-tuning v2 tasks (prefix {args.prefix_length}, "
        f"{args.labels} labels); requests cycle over every task, {args.multi_share:.0%} of them with "
        f"{args.multi_texts} texts. Capacity (closed loop, {args.concurrency} clients, "
        f"{args.capacity_seconds:g} s): **{payload['capacity_rps']:.1f} requests/s**; soak offered "
        f"{payload['offered_rps']:.1f} requests/s ({args.load:.0%}, Poisson) in {len(windows)} windows "
        f"of {args.window:g} s, one task re-uploaded every {args.swap_every:g} s.\n\n"
        f"**Requests: {sent} sent, {ok} answered 200, {errors} errors, {lost} unanswered** (target 0). "
        f"Swaps: {len(swaps)}, {len(swaps_failed)} failed. Server RSS {payload['rss_start_mb']:.0f} MiB at "
        f"the start of the soak, {payload['rss_end_mb']:.0f} MiB at the end ({growth:+.0f} MiB); "
        f"server CPU {payload['server_cpu_cores']:.2f} cores. Latency from each request's scheduled "
        f"time.\n\n{table}\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "soak.png"
    plotted = plot(
        png,
        windows,
        payload["rss_start_mb"],
        f"ptserve soak: {args.tasks} tasks, {payload['offered_rps']:.0f} req/s",
    )
    payload["plot"] = str(png) if plotted else None
    write_report(args.out, "soak", payload, md)
    if not payload["server_alive"]:
        print("the server process died during the soak", file=sys.stderr)
    if errors or lost or swaps_failed or not payload["server_alive"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
