"""Scale: bytes per task, replica memory with 1,000 cached tasks, cold-load latency of an uncached task.

Tasks are real artifacts (deep prefix + head) in a real disk store, resolved through the service's
PromptCache (store read, validation, copy into the device pool), exactly as a request would.

    .venv/bin/python -m benchmarks.perf_scale
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, markdown_table, percentile, write_report
from prompts.artifact import build_artifact
from prompts.backbone import load_backbone
from prompts.disk_store import DiskPromptStore
from service.cache import PromptCache
from service.pool import PromptPool


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def resolve_all(cache: PromptCache, names: list[str]) -> list[float]:
    latencies = []
    for name in names:
        start = time.perf_counter()
        await cache.resolve(name)
        latencies.append(time.perf_counter() - start)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/scale"))
    args = parser.parse_args()

    backbone = load_backbone(args.model, device=args.device, dtype=args.dtype)
    spec = backbone.spec
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    root = Path(tempfile.mkdtemp(prefix="ptserve-scale-"))
    store = DiskPromptStore(root)
    g = torch.Generator().manual_seed(0)
    artifact_bytes = 0
    names = [f"task-{i:05d}" for i in range(args.tasks)]
    for name in names:
        artifact = build_artifact(
            task=name,
            labels=[f"l{j}" for j in range(args.labels)],
            spec=spec,
            prefix=torch.randn(
                spec.num_layers, 2, spec.num_kv_heads, args.prefix_length, spec.head_dim, generator=g
            ),
            head_weight=torch.randn(args.labels, spec.hidden_size, generator=g) * 0.02,
            head_bias=torch.zeros(args.labels),
        )
        store.put(name, artifact.version, artifact.data, artifact.manifest_json())
        artifact_bytes = len(artifact.data)
    del artifact
    gc.collect()

    pool = PromptPool(spec, backbone.device, backbone.dtype)
    cache = PromptCache(
        store, backbone, pool, budget_bytes=1 << 40, max_artifact_bytes=1 << 26, pointer_ttl_s=3600
    )
    rss_before = rss_bytes()
    cold = asyncio.run(resolve_all(cache, names))
    gc.collect()
    rss_after = rss_bytes()
    hot = asyncio.run(resolve_all(cache, names))
    entry_bytes = asyncio.run(cache.resolve(names[0])).nbytes

    full_copy = backbone_bytes + (args.labels * (spec.hidden_size + 1)) * 4
    results: dict[str, Any] = {
        "task_tensor_bytes": entry_bytes,
        "artifact_file_bytes": artifact_bytes,
        "backbone_bytes": backbone_bytes,
        "full_finetuned_copy_bytes_per_task": full_copy,
        "task_share_of_backbone": entry_bytes / backbone_bytes,
        "rss_before_bytes": rss_before,
        "rss_after_cached_bytes": rss_after,
        "rss_growth_per_task_bytes": (rss_after - rss_before) / args.tasks,
        "pool_bytes": pool.nbytes,
        "cold_load_ms": {"p50": percentile(cold, 50) * 1e3, "p99": percentile(cold, 99) * 1e3},
        "hot_resolve_us": {"p50": percentile(hot, 50) * 1e6, "p99": percentile(hot, 99) * 1e6},
    }
    rows = [
        ["task tensors in memory (prefix + head)", f"{entry_bytes / 1024:.1f} KiB"],
        ["artifact file", f"{artifact_bytes / 1024:.1f} KiB"],
        [
            "one fine-tuned model copy per task",
            f"{full_copy / 2**20:.1f} MiB ({full_copy / entry_bytes:.0f}× a task)",
        ],
        ["task ÷ backbone", f"{entry_bytes / backbone_bytes * 100:.2f}%"],
        [
            f"resident memory, backbone only → {args.tasks} tasks cached",
            f"{rss_before / 2**20:.0f} → {rss_after / 2**20:.0f} MiB",
        ],
        ["growth per cached task", f"{(rss_after - rss_before) / args.tasks / 1024:.1f} KiB"],
        ["device pool", f"{pool.nbytes / 2**20:.1f} MiB"],
        [
            "cold load of an uncached task (disk store → pool), p50 / p99",
            f"{results['cold_load_ms']['p50']:.2f} / {results['cold_load_ms']['p99']:.2f} ms",
        ],
        [
            "resolve of a cached task, p50 / p99",
            f"{results['hot_resolve_us']['p50']:.0f} / {results['hot_resolve_us']['p99']:.0f} µs",
        ],
    ]
    payload = {
        "benchmark": "scale",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    md = (
        f"## Scale ({spec.model_type}, {args.device}/{args.dtype}, prefix {args.prefix_length}, "
        f"{args.labels} labels, {args.tasks} tasks)\n\n{markdown_table(['measure', 'value'], rows)}\n"
    )
    write_report(args.out, f"scale_{args.device.replace(':', '')}", payload, md)


if __name__ == "__main__":
    main()
