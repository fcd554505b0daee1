"""Two tenants on one replica: does a polite tenant keep its latency while another one floods?

One real ``ptserve serve`` (auth on) serves tasks of three tenants. The polite tenant sends
single-text requests as Poisson arrivals at ``--polite-load`` x the replica's measured capacity; a
flooding tenant runs a closed loop of ``--flood-concurrency`` clients, as fast as it is answered.
The polite tenant's p50/p99 are measured three ways, each from its own load-generator process:

- solo: nobody else;
- flood, no limit: the flooder's key has no rate limit, so its requests fill the batch queue and
  the polite rows wait behind them;
- flood, limited: the flooder's key has a token bucket at ``--flood-limit`` x capacity (429 with
  Retry-After beyond it), so the engine keeps headroom for everyone else.

Reported: p99 ÷ solo p99 for both flood runs (the target: ≤ 1.5 with limits), each tenant's achieved
rate, the flooder's 429s, and CPU of the server and of the load generators. Both load generators share
this machine's cores with the server: on a 2-core CPU their own CPU is part of what the polite tenant
feels, which the report states.

    .venv/bin/python -m benchmarks.perf_tenants --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import DEFAULT_DATA_ROOT, load_texts, machine, markdown_table, percentile, write_report
from benchmarks.perf_http import (
    make_bodies,
    process_cpu_s,
    run_loadgens,
    running_server,
    upload_tasks,
    wait_ready,
)
from prompts.backbone import load_backbone
from service.auth import hash_key

PLATFORM_KEY = "bench-platform-admin"


def job(
    url: str, bodies: list[str], headers: dict[str, str], args: argparse.Namespace, **loop: Any
) -> dict[str, Any]:
    return {
        "url": url,
        "bodies": bodies,
        "rows_per_request": 1,
        "duration_s": args.duration,
        "warmup_s": 1.0,
        "drain_s": 10.0,
        "headers": headers,
        "timeout_s": 30.0,
        **loop,
    }


def summary(name: str, outcome: dict[str, Any]) -> dict[str, Any]:
    latencies = [x * 1000 for x in outcome["latencies_s"]]
    return {
        "run": name,
        "achieved_rps": outcome["window_requests"] / outcome["window_s"],
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "ok": outcome["ok"],
        "errors": outcome["errors"],
        "client_cpu_s": outcome["client_cpu_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per run")
    parser.add_argument("--polite-load", type=float, default=0.2, help="polite arrivals, x capacity")
    parser.add_argument("--flood-concurrency", type=int, default=48)
    parser.add_argument("--flood-limit", type=float, default=0.2, help="flooder's key rate, x capacity")
    parser.add_argument("--flood-burst", type=int, default=2, help="the flooder's key's token-bucket size")
    parser.add_argument(
        "--flood-pause",
        type=float,
        default=1.0,
        help="seconds a flood client waits after a 429 (Retry-After); 0: it retries at once",
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--pipeline-depth", type=int, default=None)
    parser.add_argument("--server-threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/tenants"))
    args = parser.parse_args()

    backbone = load_backbone(args.model, device="cpu", dtype="float32")  # to build the artifacts
    texts = [t for t in load_texts(args.data_root, args.dataset, limit=2000) if len(t) < 300]
    env = {
        "PTSERVE_AUTH": "on",
        "PTSERVE_API_KEYS": f"admin:{hash_key(PLATFORM_KEY)}",
        "PTSERVE_TENANT_CONCURRENCY_SHARE": "0.5",
        "PTSERVE_MAX_CONCURRENT_REQUESTS": "256",
    }
    platform = {"Authorization": f"Bearer {PLATFORM_KEY}"}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        with running_server(args, work / "store", work / "serve.log", env) as server:
            ready_s = wait_ready(server, 300)
            tenants = ("polite", "flood", "capped")
            tasks = {
                t: upload_tasks(server, backbone, 4, 16, 4, prefix=f"{t}/task-", headers=platform)
                for t in tenants
            }
            keys: dict[str, dict[str, str]] = {}

            def make_key(tenant: str, rate: float | None) -> dict[str, str]:
                body: dict[str, Any] = {"name": f"bench {tenant}", "scope": "classify", "tenant": tenant}
                if rate is not None:
                    body |= {"rate_per_s": rate, "burst": args.flood_burst}
                r = httpx.post(f"{server.url}/v1/keys", json=body, headers=platform, timeout=30)
                r.raise_for_status()
                return {"Authorization": f"Bearer {r.json()['key']}"}

            keys["polite"], keys["flood"] = make_key("polite", None), make_key("flood", None)
            bodies = {t: make_bodies(tasks[t], texts, 1, 512, seed=i) for i, t in enumerate(tenants)}

            # Capacity: single-text requests of one tenant, closed loop, as many as the flood will send.
            probe = job(
                server.url,
                bodies["flood"],
                keys["flood"],
                args,
                mode="closed",
                concurrency=args.flood_concurrency,
            )
            probe["duration_s"] = max(5.0, args.duration / 2)
            capacity = summary("capacity", run_loadgens([probe], work, 0)[0])["achieved_rps"]
            keys["capped"] = make_key("capped", args.flood_limit * capacity)
            rate = args.polite_load * capacity
            limit = args.flood_limit * capacity
            print(f"capacity {capacity:.1f} req/s; polite at {rate:.1f} req/s; flood limit {limit:.1f}/s")

            polite = job(server.url, bodies["polite"], keys["polite"], args, mode="open", rate=rate, seed=1)
            runs: list[dict[str, Any]] = []
            for name, flooder in [("solo", None), ("flood, no limit", "flood"), ("flood, limited", "capped")]:
                jobs = [polite]
                if flooder is not None:
                    jobs.append(
                        job(
                            server.url,
                            bodies[flooder],
                            keys[flooder],
                            args,
                            mode="closed",
                            concurrency=args.flood_concurrency,
                            pause_after_429_s=args.flood_pause,
                        )
                    )
                cpu0, t0 = process_cpu_s(server.process.pid), time.perf_counter()
                outcomes = run_loadgens(jobs, work, 0)
                wall = time.perf_counter() - t0
                run: dict[str, Any] = {
                    "polite": summary(name, outcomes[0]),
                    "server_cpu_cores": (process_cpu_s(server.process.pid) - cpu0) / wall,
                }
                if flooder is not None:
                    run["flood"] = summary(name, outcomes[1])
                runs.append(run)
                print(name, json.dumps({k: v for k, v in run["polite"].items() if k != "errors"}))

    solo_p99 = runs[0]["polite"]["p99_ms"]
    for run in runs:
        run["p99_over_solo"] = run["polite"]["p99_ms"] / solo_p99
    table = [
        [
            r["polite"]["run"],
            r["polite"]["achieved_rps"],
            r["polite"]["p50_ms"],
            r["polite"]["p99_ms"],
            f"{r['p99_over_solo']:.2f}",
            r["flood"]["achieved_rps"] if "flood" in r else "-",
            r["flood"]["errors"].get("429", 0) if "flood" in r else "-",
            f"{r['server_cpu_cores']:.2f}",
            f"{r['polite']['client_cpu_s'] + r.get('flood', {}).get('client_cpu_s', 0.0):.1f}",
        ]
        for r in runs
    ]
    spec = backbone.spec
    markdown = "\n".join(
        [
            f"## Two tenants on one replica ({spec.model_type}, {spec.family} family, "
            f"{args.device}/{args.dtype})",
            "",
            f"Capacity {capacity:.1f} single-text requests/s (closed loop, {args.flood_concurrency} "
            f"clients). The polite tenant: Poisson arrivals at {args.polite_load:g} x capacity "
            f"({rate:.1f} req/s). The flooder: {args.flood_concurrency} closed-loop clients; 'limited': "
            f"its key's token bucket at {args.flood_limit:g} x capacity, burst {args.flood_burst}. "
            "Tenant concurrency share 0.5 of "
            f"256 slots; a flood client waits {args.flood_pause:g} s after a 429 (Retry-After). "
            f"{args.duration:g} s measured per run, {args.dataset} texts; the server and both load "
            "generators share this machine's cores (load-generator CPU in the last column). Rows of "
            "different tenants share batches in round robin (service/batcher.py).",
            "",
            markdown_table(
                [
                    "run",
                    "polite req/s",
                    "polite p50 ms",
                    "polite p99 ms",
                    "p99 ÷ solo",
                    "flood req/s",
                    "flood 429s",
                    "server cores",
                    "client CPU s",
                ],
                table,
            ),
        ]
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {
        "machine": machine(),
        "args": settings,
        "capacity_rps": capacity,
        "server_ready_s": ready_s,
        "runs": runs,
    }
    write_report(args.out, f"tenants_{args.device}", report, markdown)


if __name__ == "__main__":
    main()
