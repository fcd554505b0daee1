"""The engine process of ``serve --frontends N`` alone: its CPU per classify call, fed at full speed.

On a GPU host the engine's event loop is what bounds ``serve --frontends N`` (benchmarks/RESULTS.md,
H200: 1.14 cores at 4,401 single-text requests/s, each front end half idle). This benchmark puts the
engine in that regime on any machine: it starts the real engine process
(``service.frontends.supervisor.run_engine``: the whole app on a unix socket plus the ZeroMQ
endpoint), uploads ``--tasks`` random prefix artifacts through the engine's own HTTP API, and feeds
it from ``--drivers`` processes that act as front ends without HTTP: each holds a real
``EngineClient`` (the same coalescing) and keeps ``--concurrency`` calls of pre-tokenised rows in
flight, closed loop, tasks cycling so that batches are mixed, and hands every answered call's record
to the engine's metrics as a front end's request log does. The engine's threads are timed
through /proc by role (event loop, forward threads, ZeroMQ I/O, other), so the figure that bounds a
GPU host, **the event loop's CPU per call**, is measured directly, beside calls/s and p50/p99.

With the default tiny backbone (2 layers, hidden 32, the packaged MiniLM's tokenizer, random weights)
the forward costs ~1 ms a batch and the loop's own work shows.

    .venv/bin/python -m benchmarks.perf_link --data-root ../shared/data
    .venv/bin/python -m benchmarks.perf_link --rows 1,32 --drivers 2 --concurrency 64 --duration 8

Linux only (/proc). An A/B of two commits: copy this file into the other checkout and run it there.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import (
    DEFAULT_DATA_ROOT,
    load_texts,
    machine,
    markdown_table,
    median,
    percentile,
    write_report,
)
from benchmarks.perf_http import batch_counters, threads_cpu_s, upload_tasks
from prompts.backbone import DTYPES, default_model_path, load_backbone
from service.settings import Settings

ROLES = ("loop", "forward", "zmq", "other")


def make_tiny_model(directory: Path, source: Path) -> Path:
    """``source``'s architecture and tokenizer (the packaged MiniLM's), shrunk to 2 layers of width 32,
    with random weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    shrunk = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    config = AutoConfig.from_pretrained(source, **shrunk)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


@contextmanager
def running_engine(
    settings: Settings, workdir: Path
) -> Iterator[tuple[multiprocessing.context.SpawnProcess, httpx.Client, str]]:
    """The engine process on sockets in ``workdir``; its HTTP client (unix socket) and ZeroMQ address."""
    from service.frontends.supervisor import run_engine

    http_socket, address = str(workdir / "engine-http.sock"), f"ipc://{workdir / 'engine-calls.sock'}"
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine, args=(settings, http_socket, address), name="ptserve-engine"
    )
    process.start()
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=http_socket), base_url="http://engine", timeout=60.0
    )
    try:
        deadline = time.monotonic() + 120.0
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the engine did not become ready (exit code {process.exitcode})")
            time.sleep(0.2)
        yield process, client, address
    finally:
        client.close()
        process.terminate()  # SIGTERM: the engine drains and exits
        process.join(30.0)
        if process.is_alive():
            process.kill()
            process.join()


def drive(
    address: str,
    index: int,
    tasks: list[str],
    rows: list[list[int]],
    per_call: int,
    concurrency: int,
    seconds: float,
    coalesce_ms: float,
    start: multiprocessing.synchronize.Event,
    results: Any,
) -> None:
    """One driver process: a front end without HTTP, ``concurrency`` calls in flight for ``seconds``."""
    from service.frontends.link import EngineClient
    from service.frontends.protocol import Observed
    from service.tenancy import Principal

    async def main() -> dict[str, Any]:
        client = EngineClient(address, f"bench-{index}-{os.getpid()}", coalesce_s=coalesce_ms / 1000.0)
        client.start()
        principal = Principal("bench", "classify", None)
        latencies: list[float] = []
        errors = 0
        counter = 0
        stop_at = 0.0

        async def worker(w: int) -> None:
            nonlocal errors, counter
            while time.monotonic() < stop_at:
                counter += 1
                task = tasks[(index * 7919 + w * 31 + counter) % len(tasks)]
                start_row = (w * 131 + counter * per_call) % len(rows)
                chosen = [rows[(start_row + r) % len(rows)] for r in range(per_call)]
                t0 = time.monotonic()
                reply = await client.classify(f"b{index}-{w}-{counter}", task, principal, chosen)
                latency = time.monotonic() - t0
                # What a front end's request log hands the engine's metrics after every request.
                status = reply.error_status or 200
                client.observe(
                    Observed("/v1/classify", reply.task or None, status, 1000 * latency, "bench", None)
                )
                if reply.error_status:
                    errors += 1
                else:
                    latencies.append(latency)

        await client.classify("warm", tasks[0], principal, [rows[0]])  # connected before the clock
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        stop_at = time.monotonic() + seconds
        began = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.monotonic() - began
        await client.close()
        return {"latencies": latencies, "errors": errors, "elapsed": elapsed}

    results.put(asyncio.run(main()))


def run_phase(
    engine_pid: int,
    client: httpx.Client,
    address: str,
    tasks: list[str],
    rows: list[list[int]],
    args: argparse.Namespace,
    per_call: int,
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    drivers = [
        context.Process(
            target=drive,
            args=(
                address,
                i,
                tasks,
                rows,
                per_call,
                args.concurrency,
                args.duration,
                args.coalesce_ms,
                start,
                results,
            ),
        )
        for i in range(args.drivers)
    ]
    for driver in drivers:
        driver.start()
    time.sleep(args.warmup)  # spawned drivers import and connect; nothing is measured yet
    before_batches = batch_counters(client.get("/metrics").text)
    before = threads_cpu_s(engine_pid)
    t0 = time.monotonic()
    start.set()
    outcomes = [results.get(timeout=args.duration + 120.0) for _ in drivers]
    wall = time.monotonic() - t0
    after = threads_cpu_s(engine_pid)
    after_batches = batch_counters(client.get("/metrics").text)
    for driver in drivers:
        driver.join(30.0)
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    calls = len(latencies)
    cpu = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in ROLES}
    elapsed = max(o["elapsed"] for o in outcomes)
    batches = after_batches.get("batches", 0.0) - before_batches.get("batches", 0.0)
    forward_rows = after_batches.get("rows", 0.0) - before_batches.get("rows", 0.0)
    return {
        "rows_per_call": per_call,
        "calls": calls,
        "errors": sum(o["errors"] for o in outcomes),
        "calls_per_s": calls / elapsed,
        "rows_per_s": calls * per_call / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50) if latencies else float("nan"),
        "p99_ms": 1000 * percentile(latencies, 99) if latencies else float("nan"),
        "rows_per_batch": forward_rows / batches if batches else float("nan"),
        # CPU of the engine's threads per answered call, by role; wall covers the drivers' spread.
        "cpu_us_per_call": {role: 1e6 * cpu[role] / calls if calls else float("nan") for role in ROLES},
        "cpu_cores": {role: cpu[role] / wall for role in ROLES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--texts", type=int, default=1000, help="distinct texts drawn from")
    parser.add_argument(
        "--model", type=Path, default=None, help="encoder directory (default: a tiny random BERT)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--torch-threads", type=int, default=1, help="the engine's torch threads")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rows", default="1,32", help="rows per call, one phase each")
    parser.add_argument("--drivers", type=int, default=2, help="driver processes (front ends without HTTP)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight per driver")
    parser.add_argument("--coalesce-ms", type=float, default=1.0, help="the front ends' frontend_coalesce_ms")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds for the drivers to start")
    parser.add_argument("--repeat", type=int, default=1, help="phases per row count, reported each")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/perf_link"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ptserve-link-"))
    try:
        model = args.model
        if model is None:
            model = make_tiny_model(workdir / "tiny", default_model_path())
        backbone = load_backbone(model, device="cpu")
        texts = load_texts(args.data_root, args.dataset, "test", args.texts)
        rows = [backbone.text.truncate(ids, 128).input_ids for ids in backbone.text.untruncated(texts)]
        settings = Settings(
            model=model,
            store=str(workdir / "store"),
            device=args.device,
            dtype=args.dtype,
            auth="off",
            torch_threads=args.torch_threads,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            log_level="warning",
        )
        points = []
        with running_engine(settings, workdir) as (process, client, address):
            assert process.pid is not None
            tasks = upload_tasks(client, backbone, args.tasks, args.prefix_length, args.labels)
            for per_call in (int(x) for x in args.rows.split(",") if x.strip()):
                for _ in range(args.repeat):
                    point = run_phase(process.pid, client, address, tasks, rows, args, per_call)
                    points.append(point)
                    us = point["cpu_us_per_call"]
                    print(
                        f"rows/call {per_call}: {point['calls_per_s']:,.0f} calls/s, "
                        f"{point['rows_per_batch']:.1f} rows/batch, loop {us['loop']:.0f} µs/call, "
                        f"forward {us['forward']:.0f}, zmq {us['zmq']:.0f}, p99 {point['p99_ms']:.1f} ms",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    headers = [
        "rows/call",
        "calls/s",
        "rows/s",
        "p50 / p99 ms",
        "rows/batch",
        "engine CPU µs per call: loop / forward / zmq / other",
        "engine cores: loop / forward",
    ]
    table = [
        [
            p["rows_per_call"],
            f"{p['calls_per_s']:,.0f}",
            f"{p['rows_per_s']:,.0f}",
            f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f}",
            f"{p['rows_per_batch']:.1f}",
            " / ".join(f"{p['cpu_us_per_call'][r]:.0f}" for r in ROLES),
            f"{p['cpu_cores']['loop']:.2f} / {p['cpu_cores']['forward']:.2f}",
        ]
        for p in points
    ]
    loops = [p["cpu_us_per_call"]["loop"] for p in points if p["rows_per_call"] == 1]
    markdown = (
        f"# Engine link: {args.drivers} drivers x {args.concurrency} calls in flight, "
        f"{'tiny BERT' if args.model is None else args.model}, {args.tasks} tasks\n\n"
        + markdown_table(headers, table)
        + (
            f"\n\nSingle-row calls: the event loop's median {median(loops):.0f} µs per call.\n"
            if loops
            else "\n"
        )
    )
    write_report(
        args.out,
        "perf_link",
        {
            "machine": machine(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "points": points,
        },
        markdown,
    )


if __name__ == "__main__":
    main()
