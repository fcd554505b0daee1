"""A/B of the HTTP path: this checkout's server against an older commit's, interleaved, same machine.

One ``perf_http`` run of each side is too noisy on a shared CPU to tell a 3 % change from the
machine's drift (runs of the same code differ by 10-30 % here). This driver checks the older commit
out into a temporary ``git worktree``, then runs ``benchmarks.perf_http`` ``--rounds`` times per
side in the order A B B A A B ... (so a slow drift of the machine falls on both sides equally), each
run with ``--server-root`` set to its side's checkout; the load generator, the raw forward and the
benchmark code are this checkout's for both. Per round it takes new ÷ old of the best closed-loop
rows/s of each request shape, and the same ratio after dividing each run by the raw forward timed
next to it (which takes the machine's speed at that moment out).

    .venv/bin/python -m benchmarks.ab_http --ref 3b69ff4 --rounds 4 -- \\
        --data-root ../shared/data --open-levels 0 --duration 6 --closed-single 16 --closed-batch 2

Everything after ``--`` goes to every ``perf_http`` run. Writes ``ab_http.json`` / ``ab_http.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, markdown_table, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("single", "batch")


def best_closed(report: dict[str, Any], shape: str) -> dict[str, float]:
    """The best closed-loop point of ``shape`` (one front-end setting per run): rows/s and raw next to it."""
    closed = [p for p in report["points"] if p["shape"] == shape and p["mode"] == "closed"]
    best = max(closed, key=lambda p: p["rows_per_s"])
    return {"rows_per_s": best["rows_per_s"], "raw_adjacent": best["raw_adjacent"], "p99_ms": best["p99_ms"]}


def run_side(label: str, root: Path, index: int, passthrough: list[str], out: Path) -> dict[str, Any]:
    run_out = out / f"{label}-{index}"
    command = [sys.executable, "-m", "benchmarks.perf_http", *passthrough, "--server-root", str(root)]
    command += ["--out", str(run_out)]
    print(f"--- {label} run {index}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    (report_path,) = sorted(run_out.glob("http_*.json"))
    report = json.loads(report_path.read_text())
    return {"side": label, "index": index, **{shape: best_closed(report, shape) for shape in SHAPES}}


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "geomean": math.exp(statistics.fmean(math.log(v) for v in values)),
        "min": min(values),
        "max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", required=True, help="the older commit (side 'old')")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/ab_http"))
    args, passthrough = parser.parse_known_args()
    passthrough = [a for a in passthrough if a != "--"]
    if any(a.startswith(("--out", "--server-root", "--frontends")) for a in passthrough):
        parser.error("--out, --server-root and --frontends are set per run by this driver")

    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{args.ref}^{{commit}}"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ptserve-ab-") as tmp:
        old_root = Path(tmp) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old_root), commit], cwd=REPO_ROOT, check=True
        )
        try:
            sides = {"old": old_root, "new": REPO_ROOT}
            for i in range(args.rounds):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for label in order:
                    runs.append(run_side(label, sides[label], i, passthrough, args.out))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(old_root)], cwd=REPO_ROOT, check=False
            )

    ratios: dict[str, dict[str, list[float]]] = {s: {"rows": [], "rows_over_raw": []} for s in SHAPES}
    for i in range(args.rounds):
        old = next(r for r in runs if r["side"] == "old" and r["index"] == i)
        new = next(r for r in runs if r["side"] == "new" and r["index"] == i)
        for shape in SHAPES:
            o, n = old[shape], new[shape]
            ratios[shape]["rows"].append(n["rows_per_s"] / o["rows_per_s"])
            ratios[shape]["rows_over_raw"].append(
                (n["rows_per_s"] / n["raw_adjacent"]) / (o["rows_per_s"] / o["raw_adjacent"])
            )
    summary = {shape: {kind: spread(v) for kind, v in ratios[shape].items()} for shape in SHAPES}
    payload = {
        "benchmark": "ab_http",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "old": commit,
        "new": head + (" (with uncommitted changes)" if dirty else ""),
        "perf_http_args": passthrough,
        "runs": runs,
        "ratios": ratios,
        "summary": summary,
    }
    run_rows = [
        [
            r["index"],
            r["side"],
            round(r["single"]["rows_per_s"], 1),
            round(r["single"]["raw_adjacent"], 1),
            round(r["batch"]["rows_per_s"], 1),
            round(r["batch"]["raw_adjacent"], 1),
        ]
        for r in runs
    ]
    ratio_rows = [
        [
            f"{shape}, {'rows/s' if kind == 'rows' else 'rows/s ÷ adjacent raw'}",
            " / ".join(f"{v:.3f}" for v in ratios[shape][kind]),
            summary[shape][kind]["median"],
            summary[shape][kind]["geomean"],
        ]
        for shape in SHAPES
        for kind in ("rows", "rows_over_raw")
    ]
    md = (
        f"## HTTP A/B: {head[:7]}{' + changes' if dirty else ''} (new) against {commit[:7]} (old)\n\n"
        f"`perf_http {' '.join(passthrough)}`, {args.rounds} runs per side in the order A B B A ...; "
        "best closed-loop rows/s per run, with the raw batch forward timed next to that phase.\n\n"
        + markdown_table(
            ["round", "side", "single rows/s", "raw next to it", "multi-text rows/s", "raw next to it"],
            run_rows,
        )
        + "\n\nNew ÷ old per round:\n\n"
        + markdown_table(["measure", "per round", "median", "geometric mean"], ratio_rows)
        + "\n"
    )
    write_report(args.out, "ab_http", payload, md)


if __name__ == "__main__":
    main()
