"""Mixed vs single task: engine throughput (no HTTP) with 1, 10, 100 and 1,000 tasks mixed uniformly.

Every configuration runs the same batches of the same texts with the same prefix length and pooling;
only the task each row belongs to changes. Configurations are interleaved batch by batch over several
rounds so machine noise hits them alike, and ratios are taken within this one run.

Any backbone family runs: prefixes are ``[layers, 2, kv_heads, P, head_dim]`` and the heads pool as a
trained task on that backbone would (``--pooling auto``: decoders the last token, MiniLM and
ModernBERT-base the mean, DeBERTa [CLS]). ``--shape NAME`` runs on a random-weight model of a real
architecture's shape (benchmarks/shapes.py; speed only).

    .venv/bin/python -m benchmarks.perf_engine --data-root ../shared/data
    .venv/bin/python -m benchmarks.perf_engine --shape qwen3-0.6b --tasks 1,10,100 --batch-size 16

``--scaled`` adds, per task count, a configuration where every other task also has (IA)^3 scales (the
few-shot default's tasks until session 20): what a batch that gathers and applies them costs beside one
that does not. ``--lora R`` adds one where every other task has scales and rank-R LoRA on every
projection (the few-shot default's tasks since session 20, R = 8).
"""

from __future__ import annotations

import argparse
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, cast, get_args

import torch

from benchmarks.common import (
    DEFAULT_DATA_ROOT,
    load_texts,
    machine,
    markdown_table,
    median,
    timed,
    write_report,
)
from benchmarks.shapes import (
    add_model_arguments,
    backbone_info,
    backbone_summary,
    model_path,
    plain_forward_kwargs,
    report_tag,
    task_pooling,
)
from prompts.artifact import Pooling, build_artifact
from prompts.backbone import Backbone, load_backbone
from prompts.forward import TaskPrompt, prompted_forward
from service.cache import LoadedTask, prepare_task
from service.engine import Engine, Row
from service.pool import PromptPool
from tests.factories import random_lora  # random LoRA on every target of the family (speed, mixed check)

# Head poolings a random task can use ("mask" needs a masked-LM head and label words).
POOLINGS = tuple(p for p in get_args(Pooling) if p != "mask")  # "cls", "first", "mean", "last"


def make_tasks(
    backbone: Backbone,
    pool: PromptPool,
    count: int,
    prefix_length: int,
    num_labels: int,
    pooling: Pooling = "cls",
    scaled_every: int = 0,
    lora_rank: int = 0,
) -> list[LoadedTask]:
    """``scaled_every`` k > 0: every k-th task has (IA)^3 scales (multipliers near 1), and LoRA of
    ``lora_rank`` where that is > 0."""
    spec = backbone.spec
    tasks = []
    g = torch.Generator().manual_seed(count)
    for i in range(count):
        artifact = build_artifact(
            task=f"bench-{i}",
            labels=[f"l{j}" for j in range(num_labels)],
            spec=spec,
            prefix=torch.randn(
                spec.num_layers, 2, spec.num_kv_heads, prefix_length, spec.head_dim, generator=g
            )
            * 0.1,
            head_weight=torch.randn(num_labels, spec.hidden_size, generator=g) * 0.02,
            head_bias=torch.zeros(num_labels),
            pooling=pooling,
            # [layers, 2 * kv_dim + ffn]
            scales=1 + 0.1 * torch.randn(spec.num_layers, spec.scales_width, generator=g)
            if scaled_every and i % scaled_every == 0
            else None,
            lora=random_lora(spec, lora_rank, g) if lora_rank and i % scaled_every == 0 else None,
        )
        tasks.append(prepare_task(artifact, backbone, pool))
    return tasks


def mixed_vs_alone_max_diff(
    backbone: Backbone, pool: PromptPool, encodings: list[list[int]], pooling: Pooling = "cls"
) -> float:
    """Largest |logit| difference: the serving path on one mixed batch vs the reference path per row alone."""
    spec = backbone.spec
    g = torch.Generator().manual_seed(7)
    shapes = [(16, 0, 4), (4, 2, 7), (0, 8, 2), (40, 0, 3), (8, 4, 5)]  # (prefix, prompt, labels)
    # (IA)^3 scales on the first and the fourth task, LoRA on the second and the fourth: the batch mixes
    # rows with and without either.
    served, reference = [], []
    for i, (p, k, c) in enumerate(shapes):
        artifact = build_artifact(
            task=f"check-{i}",
            labels=[f"l{j}" for j in range(c)],
            spec=spec,
            prefix=torch.randn(spec.num_layers, 2, spec.num_kv_heads, p, spec.head_dim, generator=g)
            if p
            else None,
            prompt=torch.randn(k, spec.hidden_size, generator=g) * 0.05 if k else None,
            head_weight=torch.randn(c, spec.hidden_size, generator=g) * 0.1,
            head_bias=torch.zeros(c),
            method="custom",
            pooling=pooling,
            scales=1 + 0.1 * torch.randn(spec.num_layers, spec.scales_width, generator=g)
            if i % 3 == 0
            else None,
            lora=random_lora(spec, 4, g) if i in (1, 3) else None,
        )
        served.append(prepare_task(artifact, backbone, pool))
        reference.append(TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype))
    engine = Engine(backbone, pool)
    picks = [i % len(shapes) for i in range(len(encodings))]
    with torch.inference_mode():
        mixed = engine.logits([Row(served[i], ids) for i, ids in zip(picks, encodings, strict=True)]).float()
        worst = 0.0
        for r, (i, ids) in enumerate(zip(picks, encodings, strict=True)):
            alone = prompted_forward(backbone, [ids], [reference[i]]).float()[0]
            c = reference[i].num_labels
            worst = max(worst, float((mixed[r, :c] - alone[:c]).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="agnews")
    add_model_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="batches per configuration per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--tasks", default="1,10,100,1000")
    parser.add_argument(
        "--pooling",
        choices=["auto", *POOLINGS],
        default="auto",
        help="the heads' pooling; auto: what the trainer gives a p-tuning-v2 task on this backbone",
    )
    parser.add_argument(
        "--scaled", action="store_true", help="also each task count with (IA)^3 scales on every other task"
    )
    parser.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="RANK",
        help="also each task count with scales and LoRA of this rank on every other task",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/engine"))
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(model_path(args), device=args.device, dtype=args.dtype)
    info = backbone_info(backbone, args.shape)
    pooling = cast(Pooling, task_pooling(backbone, "p-tuning-v2", args.pooling))
    print(f"{backbone.spec.describe()}; pooling {pooling}")
    texts = load_texts(args.data_root, args.dataset, limit=args.batch_size * args.batches)
    encodings = [e.input_ids for e in backbone.encode(texts, args.max_tokens)]
    batches = [encodings[i : i + args.batch_size] for i in range(0, len(encodings), args.batch_size)]
    counts = [int(x) for x in args.tasks.split(",")]
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype)
    task_sets = {f"{n} tasks": make_tasks(backbone, pool, n, args.prefix_length, 4, pooling) for n in counts}
    if args.scaled:
        for n in counts:
            # Every other task scaled, starting with the first (so "1 tasks" is the scaled one).
            task_sets[f"{n} tasks, every other scaled"] = make_tasks(
                backbone, pool, n, args.prefix_length, 4, pooling, scaled_every=2
            )
    if args.lora:
        for n in counts:
            task_sets[f"{n} tasks, every other scales + LoRA r{args.lora}"] = make_tasks(
                backbone, pool, n, args.prefix_length, 4, pooling, scaled_every=2, lora_rank=args.lora
            )
    rng = random.Random(0)
    plans = {
        name: [[Row(rng.choice(tasks), ids) for ids in batch] for batch in batches]
        for name, tasks in task_sets.items()
    }
    engine = Engine(backbone, pool)
    device = backbone.device
    plain = plain_forward_kwargs(backbone)

    def raw_forward(batch: list[list[int]]) -> None:
        width = max(len(x) for x in batch)
        pad = backbone.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
        with torch.inference_mode():
            backbone.model(input_ids=ids, attention_mask=mask, **plain)

    for plan in plans.values():  # warm-up: allocator, kernels, thread pools
        engine.run_batch(plan[0])
    raw_forward(batches[0])

    rows_total = sum(len(b) for b in batches)
    raw_name = "raw backbone (no prompts)"
    names = [raw_name, *plans]
    plan_of = plans

    def run(name: str, i: int) -> None:
        if name == raw_name:
            raw_forward(batches[i])
        else:
            engine.run_batch(plan_of[name][i])

    seconds: dict[str, list[float]] = {name: [] for name in names}
    # Interleaved batch by batch, in an order rotated each round: this machine's noise comes in
    # bursts of a second or more, which then land on every configuration alike instead of on one.
    started = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        spent = dict.fromkeys(names, 0.0)
        for i in range(len(batches)):
            for name in order:
                spent[name] += timed(partial(run, name, i), device)
        for name in names:
            seconds[name].append(spent[name])
        print(  # a round of a large backbone on a CPU takes minutes
            f"round {r + 1}/{args.rounds} ({time.perf_counter() - started:.0f} s): "
            + ", ".join(f"{name} {spent[name] / len(batches):.3g} s/batch" for name in names),
            flush=True,
        )

    max_diff = mixed_vs_alone_max_diff(backbone, pool, encodings[: args.batch_size], pooling)
    throughput = {name: rows_total / median(values) for name, values in seconds.items()}
    single = throughput["1 tasks"]
    # Each round's ratio compares timings interleaved batch by batch; their median is reported.
    ratio = {
        name: median([one / t for one, t in zip(seconds["1 tasks"], values, strict=True)])
        for name, values in seconds.items()
    }
    rows = [
        [
            name,
            round(value, 1) if value >= 100 else float(f"{value:.3g}"),
            ratio[name],
            float(f"{median(seconds[name]) / len(batches):.3g}"),
            len(batches),
            args.batch_size,
        ]
        for name, value in throughput.items()
    ]
    padded = sum(len(b) * max(len(x) for x in b) for b in batches)
    real = sum(len(x) for b in batches for x in b)
    payload: dict[str, Any] = {
        "benchmark": "engine_mixed_vs_single",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine() | {"torch_threads": torch.get_num_threads()},
        "config": {k: str(v) for k, v in vars(args).items()},
        "backbone": info,
        "pooling": pooling,
        "rows_per_round": rows_total,
        "seconds_per_round": seconds,
        "throughput_rows_per_s": throughput,
        "ratio_vs_single_task": ratio,
        "ratio_of_median_throughputs": {k: v / single for k, v in throughput.items()},
        "padding_efficiency": real / padded,
        "mean_text_tokens": real / rows_total,
        "mixed_vs_alone_max_abs_logit_diff": max_diff,
    }
    table = markdown_table(["configuration", "rows/s", "÷ 1 task", "s/batch", "batches", "batch size"], rows)
    md = (
        f"## Engine: mixed vs single task ({info['name']}, {backbone.spec.family} family, "
        f"{args.device}/{args.dtype}, {torch.get_num_threads()} torch threads)\n\n"
        f"{backbone_summary(info)}\n\n"
        f"{len(batches)} batches of {args.batch_size} {args.dataset} texts (≤{args.max_tokens} tokens, "
        f"mean {real / rows_total:.1f}, padding efficiency {real / padded:.2f}), "
        f"prefix length {args.prefix_length}, {pooling} pooling, median of "
        f'{args.rounds} rounds interleaved batch by batch; "÷ 1 task" is the median of the '
        f"per-round ratios.\n\n{table}\n\n"
        f"Mixed batch (5 tasks: prefix 0-40, prompt 0-8, 2-7 labels, two with (IA)^3 scales, two with "
        f"LoRA) vs each row alone: max |Δ logit| "
        f"= {max_diff:.2e}\n"
    )
    tag = report_tag(backbone, args.shape)
    write_report(
        args.out, f"engine_{tag}_{args.device.replace(':', '')}_{args.dtype}_b{args.batch_size}", payload, md
    )


if __name__ == "__main__":
    main()
