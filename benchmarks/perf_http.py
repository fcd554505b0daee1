"""HTTP end to end: the real ``ptserve serve`` process under load, against the raw backbone forward.

The benchmark starts ``python -m service.cli serve`` as a subprocess on a free loopback port with a
temporary prompt store (batching set through ``PTSERVE_*``), uploads ``--tasks`` random prefix
artifacts through ``POST /v1/prompts`` and waits for ``/readyz``. Load comes from another process
(``benchmarks/loadgen.py``: asyncio with a minimal HTTP/1.1 keep-alive client, or ``--client
httpx``), request tasks cycling over every uploaded task so the server's batches are mixed:

- closed loop to saturation: C clients each sending its next request as soon as the last answered;
- open loop: Poisson arrivals at fixed rates (``--open-levels`` x the closed-loop peak of that
  request shape), latency from each request's scheduled time;

for single-text requests ``{"task", "text"}`` and ``--batch-texts``-text requests ``{"task", "texts"}``.
Between load phases, while the server is idle, this process times the raw backbone forward
(``Backbone.model``, no prompts, batches of ``--raw-batch`` of the same texts with the same token
counts, ``torch.inference_mode``); HTTP ÷ raw is taken within this run against the median raw rate.
The server is stopped with SIGTERM at the end, also when something fails.

    .venv/bin/python -m benchmarks.perf_http --data-root ../shared/data
    .venv/bin/python -m benchmarks.perf_http --server-threads 1 --raw-threads 2 --client httpx

``--server-root DIR`` serves another checkout's code (``benchmarks/ab_http.py`` compares two commits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    DEFAULT_DATA_ROOT,
    free_port,
    load_texts,
    machine,
    markdown_table,
    median,
    percentile,
    sync,
    write_report,
)
from prompts.artifact import build_artifact, max_text_tokens
from prompts.backbone import DTYPES, Backbone, load_backbone
from service.batcher import FORWARD_THREAD

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- server


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_server(
    args: argparse.Namespace,
    store: Path,
    log_path: Path,
    env_extra: dict[str, str] | None = None,
    frontends: int = 1,
) -> Iterator[Server]:
    """``ptserve serve`` on a free loopback port; SIGTERM (then SIGKILL after 30 s) on the way out.
    ``env_extra`` sets (or overrides) the server's environment, e.g. auth and tenant settings."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "PTSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "PTSERVE_MAX_WAIT_MS": str(args.max_wait_ms),
            "PTSERVE_MAX_BATCH_TOKENS": str(args.max_batch_tokens),
            "PTSERVE_LOG_LEVEL": args.log_level,
            "PTSERVE_AUTH": "off",  # a loopback benchmark server; auth has its own tests
            "PTSERVE_FRONTENDS": str(frontends),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(env_extra or {})
    if args.pipeline_depth is not None:
        env["PTSERVE_PIPELINE_DEPTH"] = str(args.pipeline_depth)
    if args.server_threads > 0:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(args.server_threads)
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--store",
        str(store),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    if args.model is not None:
        command += ["--model", str(args.model)]
    with log_path.open("wb") as log:
        # ``-m`` puts the working directory first on sys.path: a checkout given as --server-root serves
        # its own ``service`` and ``prompts`` (the editable install's finder comes after it).
        root = getattr(args, "server_root", None) or REPO_ROOT
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        yield server
    finally:
        stop_server(server)


def stop_server(server: Server) -> None:
    process = server.process
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print("server did not stop within 30 s of SIGTERM; killing it", file=sys.stderr)
        process.kill()
        process.wait(timeout=10)


def wait_ready(server: Server, timeout_s: float) -> float:
    """Seconds until ``/readyz`` answered 200; raises if the process dies or the time runs out."""
    start = time.perf_counter()
    with httpx.Client(timeout=5.0) as client:
        while time.perf_counter() - start < timeout_s:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {server.process.returncode} before it was ready:\n"
                    f"{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.url}/readyz").status_code == 200:
                    return time.perf_counter() - start
            time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


def upload_tasks(
    server: Server | httpx.Client,
    backbone: Backbone,
    count: int,
    prefix_length: int,
    num_labels: int,
    *,
    prefix: str = "http-bench-",
    headers: dict[str, str] | None = None,
) -> list[str]:
    """Random prefix artifacts through ``POST /v1/prompts`` of a server, or of an open client (whose
    base URL and transport are its own: benchmarks/perf_link.py reaches the engine's unix socket)."""
    spec = backbone.spec
    g = torch.Generator().manual_seed(0)
    names = []
    client = httpx.Client(base_url=server.url, timeout=60.0) if isinstance(server, Server) else server
    own = client is not server
    try:
        for i in range(count):
            artifact = build_artifact(
                task=f"{prefix}{i}",
                labels=[f"l{j}" for j in range(num_labels)],
                spec=spec,
                prefix=torch.randn(
                    spec.num_layers, 2, spec.num_kv_heads, prefix_length, spec.head_dim, generator=g
                )
                * 0.1,
                head_weight=torch.randn(num_labels, spec.hidden_size, generator=g) * 0.02,
                head_bias=torch.zeros(num_labels),
            )
            response = client.post(
                "/v1/prompts",
                files={"file": ("artifact.safetensors", artifact.data, "application/octet-stream")},
                headers=headers,
            )
            if response.status_code != 201:
                raise RuntimeError(
                    f"upload of {artifact.task} failed: {response.status_code} {response.text[:300]}"
                )
            names.append(artifact.task)
    finally:
        if own:
            client.close()
    return names


# --------------------------------------------------------------------------------------------- load


def make_bodies(tasks: list[str], texts: list[str], per_request: int, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        chosen = [texts[rng.randrange(len(texts))] for _ in range(per_request)]
        body: dict[str, Any] = (
            {"task": task, "text": chosen[0]} if per_request == 1 else {"task": task, "texts": chosen}
        )
        bodies.append(json.dumps(body))
    return bodies


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc): serve --frontends N is a supervisor, an engine and
    N front ends, and the server's CPU is theirs together."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def process_name(pid: int) -> str:
    """/proc/PID/comm: serve --frontends names its engine ``ptserve-engine`` and its front ends
    ``ptserve-fe-N``; the supervisor and multiprocessing's resource tracker read ``python``."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def tree_cpu_s(pids: list[int]) -> dict[int, float]:
    return {pid: process_cpu_s(pid) for pid in pids}


def thread_role(pid: int, tid: int, name: str) -> str:
    """What one thread of the engine process is: its main thread runs the event loop (uvicorn), the
    batcher names its forward threads (service.batcher.FORWARD_THREAD), libzmq its I/O threads
    (``ZMQbg/...``); the rest (torch's intra-op pool, the watcher) carry the process's name."""
    if tid == pid:
        return "loop"
    if name == FORWARD_THREAD[:15]:
        return "forward"
    if name.startswith("ZMQbg"):
        return "zmq"
    return "other"


def threads_cpu_s(pid: int) -> dict[str, float]:
    """User + system CPU seconds of ``pid``'s live threads, summed by :func:`thread_role` (Linux)."""
    roles: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return roles
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        role = thread_role(pid, int(task.name), name)
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return roles


def start_profile(
    pid: int, seconds: float, stem: Path, native: bool
) -> tuple[subprocess.Popen[bytes], Path] | None:
    """py-spy sampling ``pid`` for ``seconds`` into ``stem``.txt (raw stacks, one line per distinct
    stack with its count), without pausing it; None (and a message) where py-spy is missing."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("  py-spy not on PATH: no engine profile")
        return None
    stem.parent.mkdir(parents=True, exist_ok=True)
    raw = stem.with_suffix(".txt")
    command = [exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "200"]
    command += ["--format", "raw", "-o", str(raw), "--threads"]
    # Native unwinding needs the process paused per sample (py-spy refuses it with --nonblocking).
    command.append("--native" if native else "--nonblocking")
    with stem.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), raw


def finish_profile(process: subprocess.Popen[bytes], raw: Path) -> None:
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if raw.is_file():
        top = top_frames(raw.read_text())
        raw.with_suffix(".top.md").write_text(top)
        print(f"  engine profile: {raw}\n{top}")
    else:
        print(f"  engine profile: py-spy wrote nothing (see {raw.with_suffix('.log')})")


def top_frames(raw: str, limit: int = 25) -> str:
    """py-spy's raw format (``frame;frame;... count`` per line) as a markdown table: per thread, the
    share of its samples in which each function ran (inclusive) and was the innermost frame (self)."""
    inclusive: dict[str, dict[str, int]] = {}
    innermost: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread ", "process ")) else "all"
        functions = [f.split(" (")[0] for f in frames if f != thread]
        totals[thread] = totals.get(thread, 0) + count
        seen = inclusive.setdefault(thread, {})
        for name in set(functions):
            seen[name] = seen.get(name, 0) + count
        if functions:
            own = innermost.setdefault(thread, {})
            own[functions[-1]] = own.get(functions[-1], 0) + count
    parts = []
    for thread, total in sorted(totals.items(), key=lambda t: -t[1]):
        rows = sorted(inclusive[thread].items(), key=lambda t: -t[1])[:limit]
        own = innermost.get(thread, {})
        table = markdown_table(
            ["function", "inclusive", "self"],
            [[name, f"{n / total:.1%}", f"{own.get(name, 0) / total:.1%}"] for name, n in rows],
        )
        parts.append(f"### {thread}: {total} samples\n\n{table}\n")
    return "\n".join(parts)


def batch_counters(metrics_text: str) -> dict[str, float]:
    """From a /metrics scrape: rows and forward passes so far, and passes per reason that closed them
    (``closed:<reason>``)."""
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "ptserve_batch_size_sum":
                counters["rows"] = sample.value
            elif sample.name == "ptserve_batch_size_count":
                counters["batches"] = sample.value
            elif sample.name == "ptserve_batches_total":
                key = f"closed:{sample.labels.get('closed_by', '?')}"
                counters[key] = counters.get(key, 0.0) + sample.value
    return counters


def scrape_batches(url: str) -> dict[str, float]:
    try:
        return batch_counters(httpx.get(f"{url}/metrics", timeout=10.0).text)
    except httpx.HTTPError:
        return {}


def batching_md(before: dict[str, float], after: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Rows per forward pass over a phase, and the share of its passes each reason closed."""
    batches = after.get("batches", 0.0) - before.get("batches", 0.0)
    if batches <= 0:
        return math.nan, {}
    rows = after.get("rows", 0.0) - before.get("rows", 0.0)
    shares = {
        key.split(":", 1)[1]: (after[key] - before.get(key, 0.0)) / batches
        for key in after
        if key.startswith("closed:") and after[key] - before.get(key, 0.0) > 0
    }
    return rows / batches, shares


def engine_pid(pids: list[int]) -> int:
    """The process that runs the batcher: ``ptserve-engine`` with front ends, else the server itself."""
    return next((pid for pid in pids if process_name(pid) == "ptserve-engine"), pids[0])


def rows_per_batch_md(rows: float, closed_by: dict[str, float]) -> str:
    if math.isnan(rows):
        return ""
    ranked = sorted(closed_by.items(), key=lambda t: -t[1])
    reasons = ", ".join(f"{reason} {share:.0%}" for reason, share in ranked)
    return f"{rows:.1f} ({reasons})" if reasons else f"{rows:.1f}"


def threads_md(threads: dict[str, float]) -> str:
    order = ["loop", "forward", "zmq", "other"]
    return ", ".join(f"{role} {threads[role]:.2f}" for role in order if role in threads)


def per_process_md(per_process: dict[str, float], threads: dict[str, float] | None = None) -> str:
    """The engine's cores (and its threads' in brackets), then the front ends' (largest first), then
    the rest of the tree's."""
    engine = [c for name, c in per_process.items() if name.startswith("ptserve-engine")]
    frontends = sorted((c for name, c in per_process.items() if name.startswith("ptserve-fe-")), reverse=True)
    rest = sum(c for name, c in per_process.items() if not name.startswith(("ptserve-engine", "ptserve-fe-")))
    inside = f" ({threads_md(threads)})" if threads else ""
    if not engine:  # one process: it is the engine and the front end
        return f"{rest:.2f}{inside}"
    return (
        f"engine {engine[0]:.2f}{inside}; front ends "
        + " + ".join(f"{c:.2f}" for c in frontends)
        + f"; rest {rest:.2f}"
    )


def run_loadgen(
    job: dict[str, Any], workdir: Path, client_threads: int, processes: int = 1
) -> dict[str, Any]:
    """Run one job in ``processes`` separate ``benchmarks.loadgen`` processes at once (its clients or
    its arrival rate shared among them); returns their merged outcome. One asyncio process tops out
    at a few thousand requests/s, below what several front ends on a GPU answer."""
    return merge_outcomes(run_loadgens(split_job(job, processes), workdir, client_threads))


def split_job(job: dict[str, Any], processes: int) -> list[dict[str, Any]]:
    """``job`` as at most ``processes`` jobs with the same window: a closed loop's clients dealt out
    (no process without one), an open loop's rate divided; each its own seed."""
    if job["mode"] == "closed":
        count = max(1, min(processes, job["concurrency"]))
        shares = [job["concurrency"] // count + (i < job["concurrency"] % count) for i in range(count)]
        return [job | {"concurrency": c, "seed": job["seed"] * 1000 + i} for i, c in enumerate(shares)]
    count = max(1, processes)
    return [job | {"rate": job["rate"] / count, "seed": job["seed"] * 1000 + i} for i in range(count)]


def merge_outcomes(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """One outcome of several load generators that ran the same window at once: counts, clients,
    rates and CPU add up, latencies pool (percentiles are of every request), errors add by status."""
    merged = dict(outcomes[0])
    for key in ("concurrency", "offered_rate", "sent", "ok", "rows", "window_requests", "dropped"):
        merged[key] = sum(o[key] for o in outcomes)
    merged["unfinished"] = sum(o["unfinished"] for o in outcomes)
    merged["client_cpu_s"] = sum(o["client_cpu_s"] for o in outcomes)
    merged["window_s"] = max(o["window_s"] for o in outcomes)
    merged["latencies_s"] = [x for o in outcomes for x in o["latencies_s"]]
    errors: dict[str, int] = {}
    for o in outcomes:
        for status, n in o["errors"].items():
            errors[status] = errors.get(status, 0) + n
    merged["errors"] = errors
    return merged


def run_loadgens(jobs: list[dict[str, Any]], workdir: Path, client_threads: int) -> list[dict[str, Any]]:
    """Run several jobs at once, one ``benchmarks.loadgen`` process each; returns their outcomes."""
    env = dict(os.environ)
    if client_threads > 0:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(client_threads)
    running = []
    for i, job in enumerate(jobs):
        job_path = workdir / f"job-{i}.json"
        result_path = workdir / f"result-{i}.json"
        result_path.unlink(missing_ok=True)
        job_path.write_text(json.dumps(job))
        command = [sys.executable, "-m", "benchmarks.loadgen", str(job_path), str(result_path)]
        limit = job["warmup_s"] + job["duration_s"] + job["drain_s"] + 60.0
        running.append((subprocess.Popen(command, cwd=REPO_ROOT, env=env), result_path, limit))
    outcomes = []
    for process, result_path, limit in running:
        code = process.wait(timeout=limit)
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"load generator failed with exit code {code}")
        outcomes.append(json.loads(result_path.read_text()))
    return outcomes


@dataclass
class Point:
    shape: str  # "single" or "batch"
    mode: str  # "closed" or "open"
    concurrency: int
    offered_rps: float  # requests/s (open loop)
    rows_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    ok: int
    errors: dict[str, int]
    dropped: int
    unfinished: int
    client_cpu_s: float
    server_cpu_cores: float  # server CPU seconds / wall seconds over the whole phase
    client_cpu_cores: float
    raw_adjacent: float = math.nan  # closed loop: mean raw batch rate timed just before and after
    raw_spread: float = math.nan  # the larger of those two raw rates ÷ the smaller: > 1.5 means noise
    frontends: int = 1  # serve --frontends of the server measured
    server_cpu_per_process: dict[str, float] | None = None  # cores per process of the server's tree
    engine_threads: dict[str, float] | None = None  # cores per thread role of the engine process
    rows_per_batch: float = math.nan  # mean rows per forward pass over the phase (/metrics)
    closed_by: dict[str, float] | None = None  # share of the phase's passes each reason closed

    @property
    def label(self) -> str:
        where = f"{self.frontends} front ends, " if self.frontends > 1 else ""
        if self.mode == "closed":
            return f"{where}{self.shape} closed C={self.concurrency}"
        return f"{where}{self.shape} open {self.offered_rps:.1f} req/s"


def to_point(
    shape: str, outcome: dict[str, Any], rows_per_request: int, server_cpu_s: float, wall_s: float
) -> Point:
    latencies = [x * 1000 for x in outcome["latencies_s"]]
    window = outcome["window_s"]
    return Point(
        shape=shape,
        mode=outcome["mode"],
        concurrency=outcome["concurrency"],
        offered_rps=outcome["offered_rate"],
        rows_per_s=outcome["rows"] / window,
        requests_per_s=outcome["rows"] / rows_per_request / window,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        ok=outcome["ok"],
        errors=outcome["errors"],
        dropped=outcome["dropped"],
        unfinished=outcome["unfinished"],
        client_cpu_s=outcome["client_cpu_s"],
        server_cpu_cores=server_cpu_s / wall_s,
        client_cpu_cores=outcome["client_cpu_s"] / wall_s,
    )


# --------------------------------------------------------------------------------------------- raw


class RawForward:
    """The backbone alone (no prompts): padded batches of the same token lists, under inference_mode."""

    def __init__(self, backbone: Backbone, encodings: list[list[int]], batch: int) -> None:
        self.backbone = backbone
        self.batch = batch
        rng = random.Random(1)
        self.batches = [[rng.choice(encodings) for _ in range(batch)] for _ in range(16)]

    def _run(self, rows: list[list[int]]) -> None:
        b = self.backbone
        width = max(len(x) for x in rows)
        ids = torch.tensor([x + [b.pad_token_id] * (width - len(x)) for x in rows], device=b.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows], device=b.device)
        with torch.inference_mode():
            b.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float().cpu()

    def rate(self, seconds: float, batch: int | None = None) -> float:
        """Rows/s over about ``seconds`` (at least two batches)."""
        size = batch or self.batch
        sync(self.backbone.device)
        start = time.perf_counter()
        rows = calls = 0
        while calls < 2 or time.perf_counter() - start < seconds:
            chunk = self.batches[calls % len(self.batches)][:size]
            self._run(chunk)
            rows += len(chunk)
            calls += 1
        sync(self.backbone.device)
        return rows / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- report


def plot(path: Path, bars: list[tuple[str, float]], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars)), 4.5))
    names = [b[0] for b in bars]
    values = [b[1] for b in bars]
    colors = ["tab:grey" if n.startswith("raw") else "tab:blue" for n in names]
    ax.bar(range(len(bars)), values, color=colors)
    ax.set_xticks(range(len(bars)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("rows/s")
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def ints(text: str) -> list[int]:
    """Comma-separated client counts; empty skips the shape, a count below 1 is refused."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise SystemExit(f"client counts must be at least 1 (an empty list skips the shape), got {text!r}")
    return values


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--texts", type=int, default=1000, help="distinct texts drawn from")
    parser.add_argument(
        "--model", type=Path, default=None, help="encoder directory (default: packaged MiniLM)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="OMP/MKL threads of the server process (0: torch's default, every core)",
    )
    parser.add_argument("--client-threads", type=int, default=1, help="OMP/MKL threads of the load generator")
    parser.add_argument(
        "--loadgens",
        type=int,
        default=1,
        help="load generator processes per phase, sharing its clients or rate (one tops out at a few "
        "thousand requests/s)",
    )
    parser.add_argument(
        "--frontends",
        default="1",
        help="serve --frontends values, one server each, measured in turn (e.g. 1,2,4)",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator's HTTP client: raw asyncio HTTP/1.1 keep-alive (cheap) or httpx.AsyncClient",
    )
    parser.add_argument(
        "--raw-threads",
        type=int,
        default=0,
        help="torch threads for the raw forward here (0: --server-threads)",
    )
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32, help="PTSERVE_MAX_BATCH_SIZE")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="PTSERVE_MAX_WAIT_MS")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="PTSERVE_MAX_BATCH_TOKENS")
    parser.add_argument(
        "--pipeline-depth", type=int, default=None, help="PTSERVE_PIPELINE_DEPTH (default: the service's)"
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        help="PTSERVE_LOG_LEVEL (info logs every request: the ptserve.access line)",
    )
    parser.add_argument("--batch-texts", type=int, default=32, help="texts per multi-text request")
    parser.add_argument("--closed-single", default="16,64", help="concurrent clients, single-text requests")
    parser.add_argument("--closed-batch", default="2,4", help="concurrent clients, multi-text requests")
    parser.add_argument(
        "--open-levels", default="0.5,0.8", help="open-loop rates as fractions of the closed peak"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per load phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each phase")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds a phase may wait for late answers")
    parser.add_argument("--raw-batch", type=int, default=32)
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="per raw measurement")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="py-spy (if on PATH) samples the engine process for this long in each closed single-text "
        "phase: raw stacks and the top frames per phase under --out (0: off)",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too, but it pauses the engine per sample (that phase's figures drop)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/http"))
    parser.add_argument(
        "--server-root",
        type=Path,
        default=None,
        help="serve this checkout's code (a git worktree of an older commit: benchmarks/ab_http.py)",
    )
    args = parser.parse_args()

    # SIGTERM to this benchmark unwinds normally, so the server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raw_threads = args.raw_threads or args.server_threads
    if raw_threads > 0:
        torch.set_num_threads(raw_threads)
    backbone = load_backbone(args.model, device=args.device, dtype=args.dtype)
    texts = load_texts(args.data_root, args.dataset, limit=args.texts)
    texts = [t for t in texts if t.strip()]

    # The server cuts each text to the room its task leaves: the raw forward gets the same tokens.
    probe = build_artifact(
        task="probe",
        labels=["a", "b"],
        spec=backbone.spec,
        prefix=torch.zeros(
            backbone.spec.num_layers,
            2,
            backbone.spec.num_kv_heads,
            args.prefix_length,
            backbone.spec.head_dim,
        ),
        head_weight=torch.zeros(2, backbone.spec.hidden_size),
        head_bias=torch.zeros(2),
    )
    room = max_text_tokens(probe.manifest, backbone.spec)
    encodings = [e.input_ids for e in backbone.encode(texts, room)]
    mean_tokens = sum(len(x) for x in encodings) / len(encodings)
    raw = RawForward(backbone, encodings, args.raw_batch)
    raw.rate(0.5)  # warm-up

    raw_b32: list[float] = []
    raw_b1: list[float] = []
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="ptserve-http-bench-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "server.log"
        stop_codes: dict[int, int | None] = {}
        for frontends in ints(args.frontends):
            with running_server(
                args, workdir / f"store-{frontends}", log_path, frontends=frontends
            ) as server:
                try:
                    ready_s = wait_ready(server, args.startup_timeout)
                    print(f"server ready at {server.url} after {ready_s:.1f} s")
                    tasks = upload_tasks(server, backbone, args.tasks, args.prefix_length, args.labels)
                    print(f"uploaded {len(tasks)} tasks (prefix {args.prefix_length})")
                    shapes = {
                        "single": (1, make_bodies(tasks, texts, 1, 2000, seed=2)),
                        "batch": (args.batch_texts, make_bodies(tasks, texts, args.batch_texts, 200, seed=3)),
                    }
                    concurrencies = {"single": ints(args.closed_single), "batch": ints(args.closed_batch)}

                    def job(shape: str, mode: str, concurrency: int = 1, rate: float = 0.0) -> dict[str, Any]:
                        rows, bodies = shapes[shape]  # noqa: B023 (called in this iteration only)
                        return {
                            "url": server.url,
                            "mode": mode,
                            "bodies": bodies,
                            "rows_per_request": rows,
                            "duration_s": args.duration,
                            "warmup_s": args.warmup,
                            "drain_s": args.drain,
                            "concurrency": concurrency,
                            "rate": rate,
                            "seed": len(points),
                            "client": args.client,
                        }

                    def phase(shape: str, spec: dict[str, Any], rows: int) -> Point:
                        pids = process_tree(server.process.pid)
                        engine = engine_pid(pids)
                        profile = None
                        if args.profile_seconds > 0 and shape == "single" and spec["mode"] == "closed":
                            stem = args.out / f"engine_profile_fe{frontends}_c{spec['concurrency']}"  # noqa: B023
                            profile = start_profile(engine, args.profile_seconds, stem, args.profile_native)
                        batches0 = scrape_batches(server.url)
                        cpu0, threads0, t0 = tree_cpu_s(pids), threads_cpu_s(engine), time.perf_counter()
                        outcome = run_loadgen(spec, workdir, args.client_threads, args.loadgens)
                        cpu1, threads1 = tree_cpu_s(pids), threads_cpu_s(engine)
                        wall = time.perf_counter() - t0
                        batches1 = scrape_batches(server.url)
                        if profile is not None:
                            finish_profile(*profile)
                        per_process = {
                            f"{process_name(pid)} {pid}": (cpu1[pid] - cpu0[pid]) / wall
                            for pid in pids
                            if not math.isnan(cpu1[pid] - cpu0[pid])
                        }
                        cpu_s = sum(per_process.values()) * wall
                        point = to_point(shape, outcome, rows, cpu_s, wall)
                        point.frontends = frontends  # noqa: B023 (called in this iteration only)
                        point.server_cpu_per_process = per_process
                        point.rows_per_batch, point.closed_by = batching_md(batches0, batches1)
                        # A role whose threads ended during the phase could read below 0: floored.
                        point.engine_threads = {
                            role: max(0.0, (threads1.get(role, 0.0) - threads0.get(role, 0.0)) / wall)
                            for role in threads1
                        }
                        return point

                    def measure_raw() -> None:
                        raw_b32.append(raw.rate(args.raw_seconds))
                        raw_b1.append(raw.rate(args.raw_seconds / 2, batch=1))
                        print(
                            f"  raw forward: batch {args.raw_batch} {raw_b32[-1]:.1f} rows/s, "
                            f"batch 1 {raw_b1[-1]:.1f} rows/s"
                        )

                    # Warm the server: every task loaded, kernels and allocator warm.
                    with httpx.Client(timeout=60.0) as client:
                        for body in shapes["batch"][1][: len(tasks)]:
                            client.post(
                                f"{server.url}/v1/classify",
                                content=body,
                                headers={"content-type": "application/json"},
                            )
                    measure_raw()
                    peaks: dict[str, float] = {}
                    closed = [
                        (shape, c)
                        for i in range(max(len(v) for v in concurrencies.values()))
                        for shape in ("batch", "single")
                        if i < len(concurrencies[shape])
                        for c in [concurrencies[shape][i]]
                    ]
                    for shape, c in closed:  # shapes interleaved, the raw forward timed between phases
                        rows = shapes[shape][0]
                        before = raw_b32[-1]
                        point = phase(shape, job(shape, "closed", concurrency=c), rows)
                        points.append(point)
                        peaks[shape] = max(peaks.get(shape, 0.0), point.requests_per_s)
                        measure_raw()
                        point.raw_adjacent = (before + raw_b32[-1]) / 2
                        point.raw_spread = max(before, raw_b32[-1]) / min(before, raw_b32[-1])
                        print(
                            f"  {point.label}: {point.rows_per_s:.1f} rows/s, p50 {point.p50_ms:.0f} ms, "
                            f"p99 {point.p99_ms:.0f} ms, errors {point.errors}, "
                            f"÷ adjacent raw {point.rows_per_s / point.raw_adjacent:.2f}, "
                            f"CPU server {point.server_cpu_cores:.2f} "
                            f"client {point.client_cpu_cores:.2f} cores"
                        )
                    for shape in ("batch", "single"):
                        if shape not in peaks:  # no closed phase of this shape: no rate to scale
                            continue
                        rows = shapes[shape][0]
                        for level in floats(args.open_levels):
                            rate = max(0.1, level * peaks[shape])
                            point = phase(shape, job(shape, "open", rate=rate), rows)
                            points.append(point)
                            print(
                                f"  {point.label}: {point.rows_per_s:.1f} rows/s, p50 {point.p50_ms:.0f} ms, "
                                f"p99 {point.p99_ms:.0f} ms, errors {point.errors}, dropped {point.dropped}"
                            )
                        measure_raw()
                except BaseException:
                    print(f"--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
                    raise
                process = server.process
            # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -15 is the normal exit here.
            stop_codes[frontends] = process.returncode

    raw_rate = median(raw_b32)
    raw_one = median(raw_b1)
    ratios: dict[str, float] = {}
    for frontends in ints(args.frontends):
        where = "" if frontends == 1 else f"frontends_{frontends}_"
        for shape in ("single", "batch"):
            closed = [
                p for p in points if p.shape == shape and p.mode == "closed" and p.frontends == frontends
            ]
            if not closed:  # the shape was skipped (an empty --closed-* list)
                continue
            best = max(closed, key=lambda p: p.rows_per_s)
            ratios[f"{where}{shape}_http_over_raw"] = best.rows_per_s / raw_rate
            ratios[f"{where}{shape}_http_over_adjacent_raw"] = best.rows_per_s / best.raw_adjacent
    threads = {
        "server": args.server_threads
        or f"torch default ({torch.get_num_threads()} here, os.cpu_count()={os.cpu_count()})",
        "load_generator": args.client_threads,
        "raw_forward": torch.get_num_threads(),
    }
    payload: dict[str, Any] = {
        "benchmark": "http_end_to_end",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "threads": threads,
        "mean_text_tokens": mean_tokens,
        "raw_rows_per_s": {f"batch {args.raw_batch}": raw_b32, "batch 1": raw_b1},
        "raw_median_rows_per_s": {f"batch {args.raw_batch}": raw_rate, "batch 1": raw_one},
        "points": [p.__dict__ | {"label": p.label} for p in points],
        "ratios": ratios,
        "server_exit_code": stop_codes,
    }
    rows_md = [
        [
            p.label,
            round(p.rows_per_s, 1),
            round(p.requests_per_s, 1),
            f"{p.p50_ms:.0f}",
            f"{p.p99_ms:.0f}",
            p.rows_per_s / raw_rate,
            ""
            if math.isnan(p.raw_adjacent)
            else f"{p.rows_per_s / p.raw_adjacent:.3f}" + (" noisy" if p.raw_spread > 1.5 else ""),
            round(p.server_cpu_cores, 2),
            per_process_md(p.server_cpu_per_process or {}, p.engine_threads),
            rows_per_batch_md(p.rows_per_batch, p.closed_by or {}),
            round(p.client_cpu_cores, 2),
            sum(p.errors.values()) + p.unfinished + p.dropped,
        ]
        for p in points
    ]
    table = markdown_table(
        [
            "load",
            "rows/s",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "÷ raw median",
            "÷ adjacent raw",
            "server CPU (cores)",
            "per server process",
            "rows per batch (closed by)",
            "client CPU (cores)",
            "errors",
        ],
        rows_md,
    )
    depth = "as the service defaults" if args.pipeline_depth is None else args.pipeline_depth
    setup = (
        f"`ptserve serve` subprocess, {args.tasks} tasks (prefix {args.prefix_length}, "
        f"{args.labels} labels) mixed round-robin; max batch {args.max_batch_size}, "
        f"max wait {args.max_wait_ms:g} ms, pipeline depth {depth}, log level {args.log_level}. "
        f"{args.dataset} test texts (mean {mean_tokens:.1f} tokens). "
        f"Load generator: {args.loadgens} separate process{'es' if args.loadgens > 1 else ''}, "
        f"asyncio, {args.client} HTTP client; "
        f"{args.duration:g} s measured per phase after {args.warmup:g} s warm-up. "
        f"Threads: server {threads['server']}, load generator {args.client_threads}, "
        f"raw forward {torch.get_num_threads()}."
    )
    first = ints(args.frontends)[0]
    where = "" if first == 1 else f"frontends_{first}_"

    def ratio(key: str) -> float:
        return ratios.get(key, math.nan)  # nan: that shape was not measured

    md = (
        f"## HTTP end to end ({backbone.spec.model_type}, {args.device}/{args.dtype})\n\n{setup}\n\n"
        f"Raw backbone forward (no prompts, server idle), median of {len(raw_b32)}: "
        f"batch {args.raw_batch} **{raw_rate:.1f} rows/s**, batch 1 {raw_one:.1f} rows/s.\n\n{table}\n\n"
        f"Best closed loop ÷ raw batch {args.raw_batch} (median of the run; in brackets ÷ the raw "
        f"rate timed just before and after that phase): {args.batch_texts}-text requests "
        f"**{ratio(where + 'batch_http_over_raw'):.2f}** "
        f"({ratio(where + 'batch_http_over_adjacent_raw'):.2f}; "
        f"target ≥ 0.90), single-text **{ratio(where + 'single_http_over_raw'):.2f}** "
        f'({ratio(where + "single_http_over_adjacent_raw"):.2f}; target ≥ 0.75). "errors" counts non-200 '
        "answers, unanswered requests and open-loop arrivals dropped at the in-flight cap. CPU columns: "
        f"CPU seconds ÷ wall seconds of each process over the phase ({os.cpu_count()} cores here); in "
        "brackets the engine process's threads: its event loop, its forward threads, ZeroMQ's I/O "
        "threads and the rest (torch's intra-op pool among them). "
        '"noisy": the raw rates timed just before and after the phase differ by more than 1.5×.\n'
    )
    if len(ints(args.frontends)) > 1:
        summary = [
            [
                n,
                ratio(("" if n == 1 else f"frontends_{n}_") + "single_http_over_raw"),
                ratio(("" if n == 1 else f"frontends_{n}_") + "batch_http_over_raw"),
            ]
            for n in ints(args.frontends)
        ]
        md += "\n" + markdown_table(
            ["front ends", "single-text ÷ raw (best closed)", f"{args.batch_texts}-text ÷ raw"], summary
        )
        md += "\n"
    tag = f"{args.device.replace(':', '')}_{args.dtype}"
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"http_{tag}.png"
    bars = [(f"raw batch {args.raw_batch}", raw_rate), ("raw batch 1", raw_one)] + [
        (p.label, p.rows_per_s) for p in points
    ]
    plotted = plot(png, bars, f"ptserve HTTP vs raw forward ({args.device}/{args.dtype})")
    payload["plot"] = str(png) if plotted else None
    write_report(args.out, f"http_{tag}", payload, md)
    if plotted:
        print(f"plot saved to {png}")


if __name__ == "__main__":
    main()
