"""Padding efficiency: real ÷ padded tokens per batch, FIFO vs length-aware grouping.

Token lengths are those of real texts from ../shared/data (all six English test sets, interleaved at
random, tokenised by the serving backbone's tokenizer). The real DynamicBatcher forms the batches; its
forward is simulated (a sleep proportional to padded tokens), since only batch composition matters.
Two regimes: saturation (a deep queue) and an open-loop Poisson stream at 70% of capacity.

    .venv/bin/python -m benchmarks.perf_padding --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_DATA_ROOT, load_texts, machine, markdown_table, write_report
from prompts.backbone import load_backbone
from service.batcher import BatchStats, DynamicBatcher

DATASETS = ("sst2", "agnews", "trec", "banking77", "emotion", "sms_spam")


async def run_stream(
    lengths: list[int], *, window: int | None, batch_size: int, per_token_s: float, rate: float | None
) -> list[BatchStats]:
    """Push every length through a real batcher; ``rate=None`` queues them all at once (saturation)."""
    stats: list[BatchStats] = []

    def forward(items: list[int]) -> list[int]:
        time.sleep(len(items) * max(items) * per_token_s)  # stands in for a forward's cost
        return items

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        forward,
        max_batch_size=batch_size,
        max_batch_tokens=batch_size * 512,
        max_wait_ms=10,
        cost=lambda n: n,
        on_batch=stats.append,
        group_window=window,
    )
    batcher.start()
    rng = random.Random(1)
    pending = []
    for n in lengths:
        pending.append(asyncio.create_task(batcher.submit(n)))
        if rate is not None:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*pending)
    await batcher.stop()
    return stats


def efficiency(stats: list[BatchStats]) -> tuple[float, float]:
    real = sum(s.real_tokens for s in stats)
    padded = sum(s.padded_tokens for s in stats)
    return real / padded, sum(s.size for s in stats) / len(stats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--per-dataset", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--per-token-us", type=float, default=20.0, help="simulated forward cost per padded token"
    )
    parser.add_argument("--window-factor", type=int, default=32, help="grouping window in batches")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/padding"))
    args = parser.parse_args()

    backbone = load_backbone(args.model)
    texts = [t for d in DATASETS for t in load_texts(args.data_root, d, limit=args.per_dataset)]
    random.Random(0).shuffle(texts)
    lengths = [len(e.input_ids) for e in backbone.encode(texts, args.max_tokens)]
    per_token = args.per_token_us / 1e6
    # Capacity of the simulated forward with FIFO batches at saturation sets the open-loop rate.
    fifo_sat = asyncio.run(
        run_stream(lengths, window=None, batch_size=args.batch_size, per_token_s=0, rate=None)
    )
    mean_padded_row = sum(s.padded_tokens for s in fifo_sat) / len(lengths)
    rate = 0.7 / (mean_padded_row * per_token)

    results: dict[str, Any] = {}
    rows = []
    for regime, regime_rate in (("saturation", None), ("open loop, 70% load", rate)):
        for name, window in (("FIFO", None), ("length-grouped", args.window_factor * args.batch_size)):
            stats = asyncio.run(
                run_stream(
                    lengths,
                    window=window,
                    batch_size=args.batch_size,
                    per_token_s=per_token,
                    rate=regime_rate,
                )
            )
            eff, mean_size = efficiency(stats)
            results[f"{regime} / {name}"] = {
                "efficiency": eff,
                "mean_batch_size": mean_size,
                "batches": len(stats),
            }
            rows.append([regime, name, eff, round(mean_size, 1), len(stats)])

    payload = {
        "benchmark": "padding_efficiency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "texts": len(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
        "open_loop_rate_rows_per_s": rate,
        "results": results,
    }
    table = markdown_table(["regime", "batching", "real ÷ padded", "mean batch", "batches"], rows)
    md = (
        f"## Padding efficiency\n\n{len(lengths)} texts from {', '.join(DATASETS)} (test splits, shuffled; "
        f"mean {payload['mean_tokens']:.1f} tokens, cut at {args.max_tokens}), batches of up to "
        f"{args.batch_size}, grouping window {args.window_factor * args.batch_size}.\n\n{table}\n"
    )
    write_report(args.out, "padding", payload, md)


if __name__ == "__main__":
    main()
