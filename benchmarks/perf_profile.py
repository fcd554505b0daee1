"""Where one batch's time goes: tokenising, pool gather, assembly, the backbone's own forward, readout.

The optimisation list of the performance issue (pipelining the next batch's assembly with the current
forward, fewer Python loops on the hot path) only pays where the steps around the forward are a
measurable share of a batch. This script measures each step on the serving path (``Engine.run_batch``
over 100 tasks, the same texts at each batch size) and reports its share of the batch.

Steps, per batch:
- tokenise: ``Backbone.encode`` of the batch's texts (done per request before the batcher, on the
  event loop for short requests, else in a worker thread; listed for scale);
- gather: ``Engine.gather``, the pool's ``index_select`` of the rows' slots (prefix, prompt, heads);
- assembly + readout: the rest of ``run_prompted`` (ids, embeddings lookup, positions, mask, pooling,
  heads) and the softmax and copy to host in ``run_batch``;
- backbone forward: the family's layer loop (``BackboneFamily.layers``: embeddings to the last
  layer), timed by wrapping it.

(Earlier versions also timed Hugging Face's ``model(...)`` with a cache against the loop: 1.04-1.10x
slower on MiniLM, benchmarks/RESULTS.md. That path is gone: every family now runs its own loop, the
only way to give each row of a batch its own prefix length.)

Then it measures what overlapping actually wins: a ``DynamicBatcher`` over ``Engine.run_batch`` is
given a deep queue (``--pipeline-batches`` full batches at once, already tokenised) and drained with
``pipeline_depth`` 1 and 2, interleaved over ``--pipeline-rounds`` rounds; rows/s of each, median.

    .venv/bin/python -m benchmarks.perf_profile --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_DATA_ROOT,
    load_texts,
    machine,
    markdown_table,
    median,
    sync,
    write_report,
)
from benchmarks.perf_engine import make_tasks
from prompts.backbone import load_backbone
from service.batcher import DynamicBatcher
from service.engine import Engine, Row
from service.pool import PromptPool


class ForwardClock:
    """Adds up the wall time of the family's layer loop (synced on CUDA), by wrapping ``layers``."""

    def __init__(self, family: Any, device: torch.device) -> None:
        self.device = device
        self.enabled = True  # off while the graphed engine runs: a capture must not synchronize
        self.total = 0.0
        loop = family.layers

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not self.enabled:
                return loop(*args, **kwargs)  # type: ignore[no-any-return]
            sync(self.device)
            start = time.perf_counter()
            out = loop(*args, **kwargs)
            sync(self.device)
            self.total += time.perf_counter() - start
            return out  # type: ignore[no-any-return]

        family.layers = timed


def drain_rate(engine: Engine, rows: list[Row], batch_size: int, depth: int) -> float:
    """Rows per second of a batcher draining ``rows``, all queued at once, ``depth`` batches in flight."""

    async def drain() -> float:
        batcher: DynamicBatcher[Row, list[float]] = DynamicBatcher(
            engine.run_batch,
            max_batch_size=batch_size,
            max_batch_tokens=1 << 30,
            max_wait_ms=0,
            cost=Row.cost,
            pipeline_depth=depth,
        )
        batcher.start()
        t0 = time.perf_counter()
        await batcher.submit_many(rows)
        took = time.perf_counter() - t0
        await batcher.stop()
        return len(rows) / took

    return asyncio.run(drain())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="agnews")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10, help="batches timed per batch size")
    parser.add_argument("--pipeline-sizes", default="8,32,64", help="batch sizes of the depth 1 vs 2 runs")
    parser.add_argument("--pipeline-batches", type=int, default=8, help="full batches queued per run")
    parser.add_argument("--pipeline-rounds", type=int, default=5, help="interleaved runs per depth")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/profile"))
    args = parser.parse_args()

    backbone = load_backbone(args.model, device=args.device, dtype=args.dtype)
    device = backbone.device
    pool = PromptPool(backbone.spec, device, backbone.dtype)
    tasks = make_tasks(backbone, pool, args.tasks, args.prefix_length, num_labels=4)
    # The step breakdown needs the eager forward: hooks do not run inside a CUDA graph's replay.
    engine = Engine(backbone, pool, cuda_graphs=False)
    graphed = Engine(backbone, pool) if device.type == "cuda" else None  # what the service runs
    served = graphed or engine
    clock = ForwardClock(backbone.family, device)
    texts = load_texts(args.data_root, args.dataset, limit=512)
    rng = random.Random(0)

    results = []
    for size in [int(x) for x in args.batch_sizes.split(",")]:
        steps: dict[str, list[float]] = {"tokenise": [], "gather": [], "assembly+readout": [], "forward": []}
        totals: list[float] = []
        with_graphs: list[float] = []
        for repeat in range(args.repeats + 1):  # the first batch of each size warms up
            batch_texts = [texts[rng.randrange(len(texts))] for _ in range(size)]
            t0 = time.perf_counter()
            encodings = backbone.encode(batch_texts, args.max_tokens)
            tokenise = time.perf_counter() - t0
            rows = [Row(tasks[rng.randrange(len(tasks))], e.input_ids) for e in encodings]
            with torch.inference_mode():
                sync(device)
                t0 = time.perf_counter()
                engine.gather(rows)
                sync(device)
                gather = time.perf_counter() - t0
            clock.total = 0.0
            sync(device)
            t0 = time.perf_counter()
            engine.run_batch(rows)  # gathers again: its own gather is part of this total
            total = time.perf_counter() - t0
            forward = clock.total
            if graphed is not None:
                clock.enabled = False
                t0 = time.perf_counter()
                graphed.run_batch(rows)
                with_graphs.append(time.perf_counter() - t0)
                clock.enabled = True
            if repeat == 0:
                del with_graphs[:]
                continue
            steps["tokenise"].append(tokenise)
            steps["gather"].append(gather)
            steps["forward"].append(forward)
            steps["assembly+readout"].append(total - forward - gather)
            totals.append(total)
        batch_ms = median(totals) * 1000
        row: dict[str, Any] = {
            "batch_size": size,
            "run_batch_ms": batch_ms,
        }
        if with_graphs:
            row["graphs_run_batch_ms"] = median(with_graphs) * 1000
            row["eager_over_graphs"] = median(totals) / median(with_graphs)
        for name, values in steps.items():
            row[f"{name}_ms"] = median(values) * 1000
            row[f"{name}_share"] = median(values) * 1000 / batch_ms
        results.append(row)
        print(row)

    headers = [
        "batch",
        "run_batch ms",
        "forward ms",
        "gather ms",
        "assembly+readout ms",
        "outside forward",
        "tokenise ms",
    ]
    table = [
        [
            r["batch_size"],
            r["run_batch_ms"],
            r["forward_ms"],
            r["gather_ms"],
            r["assembly+readout_ms"],
            f"{(r['gather_share'] + r['assembly+readout_share']):.1%}",
            r["tokenise_ms"],
        ]
        for r in results
    ]
    if graphed is not None:
        headers += ["with CUDA graphs ms", "eager ÷ graphs"]
        for line, r in zip(table, results, strict=True):
            line += [r["graphs_run_batch_ms"], f"{r['eager_over_graphs']:.2f}"]
    clock.enabled = False
    pipelined = []
    for size in [int(x) for x in args.pipeline_sizes.split(",")]:
        sample = [texts[rng.randrange(len(texts))] for _ in range(size * 4)]
        encodings = backbone.encode(sample, args.max_tokens)
        rows = [
            Row(tasks[rng.randrange(len(tasks))], encodings[i % len(encodings)].input_ids)
            for i in range(size * args.pipeline_batches)
        ]
        drain_rate(served, rows[: size * 2], size, 2)  # warm-up
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.pipeline_rounds):
            for depth in (1, 2):
                rates[depth].append(drain_rate(served, rows, size, depth))
        entry = {
            "batch_size": size,
            "depth1_rows_s": median(rates[1]),
            "depth2_rows_s": median(rates[2]),
            "depth2_over_depth1": median(rates[2]) / median(rates[1]),
            "runs": {str(k): v for k, v in rates.items()},
        }
        pipelined.append(entry)
        print({k: v for k, v in entry.items() if k != "runs"})
    pipeline_table = [
        [e["batch_size"], e["depth1_rows_s"], e["depth2_rows_s"], f"{e['depth2_over_depth1']:.2f}"]
        for e in pipelined
    ]

    name = f"profile_{device.type}_{args.dtype}"
    markdown = "\n".join(
        [
            f"## Where a batch's time goes ({backbone.spec.model_type}, {backbone.spec.family} family, "
            f"{device.type}/{args.dtype})",
            "",
            f"{args.tasks} tasks, prefix length {args.prefix_length}, {args.dataset} test texts "
            f"(≤{args.max_tokens} tokens), median of {args.repeats} batches per size. 'outside forward' "
            "is the share of `Engine.run_batch` spent around the backbone's own forward: the most that "
            "overlapping the next batch's assembly with the current forward could win. "
            "On a GPU, 'with CUDA graphs' is `run_batch` as the service runs it (the layer loop "
            "replayed from `prompts/graphs.py`); the other columns time the eager loop, since the "
            "clock cannot run inside a replay.",
            "",
            markdown_table(headers, table),
            "",
            f"**What overlapping wins** (`pipeline_depth`): a batcher over `Engine.run_batch` drains "
            f"{args.pipeline_batches} full batches queued at once (tokenised beforehand) with one batch in "
            f"flight, then with two (the second starts while the first runs); median of "
            f"{args.pipeline_rounds} interleaved rounds.",
            "",
            markdown_table(
                ["batch", "depth 1 rows/s", "depth 2 rows/s", "depth 2 ÷ depth 1"], pipeline_table
            ),
        ]
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"machine": machine(), "args": settings, "results": results, "pipeline": pipelined}
    write_report(args.out, name, report, markdown)


if __name__ == "__main__":
    main()
