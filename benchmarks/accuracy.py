"""Accuracy benchmark: every prompt method against a linear probe and full fine-tuning, per dataset.

Reads ``<data-root>/<name>/{train,dev,test}.jsonl`` (the shared datasets, see ../shared/data/README.md),
trains each method on the same capped train set with the same backbone, and reports test accuracy,
macro-F1, trainable parameters and training time. Writes ``results.json``, ``results.md`` and
``accuracy.png`` under ``--out``; results are saved after every run, so an interrupted benchmark keeps
what it measured.

    .venv/bin/python benchmarks/accuracy.py --data-root ../shared/data --datasets trec \\
        --methods probe,prefix --max-train-rows 1000

Methods: ``probe`` (linear probe), ``prompt`` (prompt tuning), ``ptuning`` (P-tuning), ``prefix``
(P-tuning v2, the default), all trained by :func:`prompts.trainer.train_task` through the serving
forward, and ``finetune``: an unfrozen copy of the backbone with a linear head on [CLS], the ceiling.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompts.backbone import Backbone, load_backbone
from prompts.data import TaskData, cap_rows, load_task_data
from prompts.methods import HeadStyle
from prompts.metrics import Report, evaluate
from prompts.trainer import PROBE_HEADS, TrainConfig, seed_everything, train_task

DATASETS = ["sst2", "agnews", "trec", "banking77", "sms_spam", "emotion", "comment_zh"]
# comment_zh is Chinese with 63 train rows on an English vocabulary: reported on its own.
SEPARATE = {"comment_zh"}
METHODS = {
    "probe": "linear-probe",
    "prompt": "prompt-tuning",
    "ptuning": "p-tuning",
    "prefix": "p-tuning-v2",
    "prefix-mean": "p-tuning-v2",
    "finetune": "full fine-tuning",
}
LABELS = {
    "probe": "linear probe (mean)",
    "prompt": "prompt tuning",
    "ptuning": "P-tuning",
    "prefix": "P-tuning v2, [CLS] head (decoders: last token)",
    "prefix-mean": "P-tuning v2, mean head (default on MiniLM)",
    "finetune": "full fine-tuning",
}
# Both P-tuning v2 rows name their head, so they do not depend on the model directory: "prefix" reads
# the text [CLS]; "prefix-mean" the mean of the text tokens, the pooling all-MiniLM-L6-v2 was trained
# for and what `ptserve train` picks by default on a backbone declaring it (prompts.trainer.for_backbone).
HEADS: dict[str, HeadStyle] = {"prefix": "cls", "prefix-mean": "mean"}


def _head(method: str, backbone: Backbone) -> HeadStyle | None:
    """The method's head on ``backbone``: a decoder's first token has seen nothing of the text, so its
    "prefix" row pools the last token instead of [CLS] (the family's default, as for every method)."""
    if backbone.spec.family == "decoder" and method == "prefix":
        return None
    return HEADS.get(method)


DEFAULT_METHODS = "probe,prompt,ptuning,prefix,prefix-mean,finetune"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="folder holding <name>/train.jsonl ... (required to train)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: all)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated from {list(METHODS)}")
    p.add_argument(
        "--max-train-rows",
        type=int,
        help="same train cap for every method (default: whole train sets, as the TF-IDF baseline had)",
    )
    p.add_argument("--max-dev-rows", type=int, default=1000, help="dev rows used for early stopping")
    p.add_argument("--max-test-rows", type=int, help="cap the test set (default: all of it)")
    p.add_argument(
        "--epochs", type=int, help="epochs for prompt, ptuning and prefix (default: each method's own)"
    )
    p.add_argument(
        "--probe-head",
        choices=PROBE_HEADS,
        help="how the probe's head is fitted (default: ptserve's, 'standardized' since session 31; the "
        "committed H100 probe column is 'trained')",
    )
    p.add_argument(
        "--probe-epochs",
        type=int,
        help="epochs for the probe's head trained by epochs (--probe-head trained; default 200: it trains "
        "on cached features); the fitted head reads none",
    )
    p.add_argument("--finetune-epochs", type=int, default=10, help="early stopping on dev (patience 2)")
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument(
        "--model",
        help="local Hugging Face model directory of any supported family (default: packaged MiniLM); "
        "its name and family are recorded with every result",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-seconds", type=float, help="time budget per training run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/accuracy"))
    p.add_argument(
        "--report",
        type=Path,
        help="only rebuild results.md and accuracy.png under --out from this results.json",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run (dataset, method) pairs in this many processes at once (one GPU runs several well)",
    )
    args = p.parse_args(argv)
    if args.data_root is None and args.report is None:
        p.error("--data-root is required (unless --report rebuilds a report)")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    return args


def load(args: argparse.Namespace, name: str) -> TaskData:
    data = load_task_data(args.data_root / name, seed=args.seed, max_train_rows=args.max_train_rows)
    if len(data.dev) > args.max_dev_rows:
        data.dev = cap_rows(data.dev, args.max_dev_rows, args.seed)
    if args.max_test_rows is not None and len(data.test) > args.max_test_rows:
        data.test = cap_rows(data.test, args.max_test_rows, args.seed)
    return data


# ---------------------------------------------------------------------------------- full fine-tuning


class FineTuned(nn.Module):
    """The whole backbone, trainable (dropout on), with a linear head on [CLS] (decoders: on the last
    real token, as their sequence classifiers pool)."""

    def __init__(self, backbone: Backbone, num_labels: int) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(backbone.model).float()
        self.encoder.requires_grad_(True)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(backbone.spec.hidden_size, num_labels)
        self.last_token = backbone.spec.family == "decoder"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at = attention_mask.sum(1) - 1 if self.last_token else torch.zeros_like(rows)  # [B]
        logits: torch.Tensor = self.head(self.dropout(hidden[rows, at]))  # [B, C]
        return logits


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _ft_predict(model: FineTuned, backbone: Backbone, ids: list[list[int]], batch: int) -> list[int]:
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0] * len(ids)
    for start in range(0, len(ids), batch):
        idx = order[start : start + batch]
        x, mask = _pad([ids[i] for i in idx], backbone.pad_token_id, backbone.device)
        for i, p in zip(idx, model(x, mask).argmax(-1).tolist(), strict=True):
            out[i] = p
    model.train()
    return out


def finetune(
    backbone: Backbone, data: TaskData, args: argparse.Namespace
) -> tuple[Report, Report, int, float, int, bool]:
    """(dev, test, trainable parameters, seconds, epochs run, stopped by the time budget): AdamW,
    warmup + linear decay, early stopping on dev accuracy (patience 2), best epoch restored."""
    seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = FineTuned(backbone, len(data.labels)).to(backbone.device).train()
    encode = lambda rows: [e.input_ids for e in backbone.encode([r.text for r in rows], args.max_length)]  # noqa: E731
    train_ids, dev_ids, test_ids = encode(data.train), encode(data.dev), encode(data.test)
    y = torch.tensor(data.label_ids(data.train), device=backbone.device)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": args.finetune_lr},
            {"params": model.head.parameters(), "lr": 1e-3},
        ],
        weight_decay=0.01,
    )
    steps = math.ceil(len(train_ids) / args.batch_size) * args.finetune_epochs
    warmup = max(1, int(0.06 * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)),
    )
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] = {}
    stale, epochs = 0, 0
    out_of_time = False
    started = time.perf_counter()
    for epoch in range(1, args.finetune_epochs + 1):
        epochs = epoch
        perm = torch.randperm(len(train_ids), generator=generator).tolist()
        for start in range(0, len(perm), args.batch_size):
            batch = perm[start : start + args.batch_size]
            x, mask = _pad([train_ids[i] for i in batch], backbone.pad_token_id, backbone.device)
            loss = F.cross_entropy(model(x, mask), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                out_of_time = True
                break
        dev = evaluate(data.label_ids(data.dev), _ft_predict(model, backbone, dev_ids, 128), data.labels)
        key = (dev.accuracy, dev.macro_f1)
        if best is None or key > best:
            best, stale = key, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        print(f"    finetune epoch {epoch}: dev accuracy {dev.accuracy:.4f}", flush=True)
        if stale >= 2 or out_of_time:
            break
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    dev = evaluate(data.label_ids(data.dev), _ft_predict(model, backbone, dev_ids, 128), data.labels)
    test = evaluate(data.label_ids(data.test), _ft_predict(model, backbone, test_ids, 128), data.labels)
    trainable = sum(p.numel() for p in model.parameters())
    return dev, test, trainable, seconds, epochs, out_of_time


# ------------------------------------------------------------------------------------------ reports


def run_one(
    backbone: Backbone, name: str, data: TaskData, method: str, args: argparse.Namespace
) -> dict[str, Any]:
    row: dict[str, Any] = {"dataset": name, "method": method, "train_rows": len(data.train)}
    row |= {"dev_rows": len(data.dev), "test_rows": len(data.test), "labels": len(data.labels)}
    if method == "finetune":
        dev, test, trainable, seconds, epochs, out_of_time = finetune(backbone, data, args)
        row |= {"trainable_parameters": trainable, "artifact_parameters": trainable, "epochs_run": epochs}
    else:
        config = TrainConfig(
            method=METHODS[method],
            epochs=args.probe_epochs if method == "probe" else args.epochs,
            probe_head=args.probe_head if method == "probe" else None,
            seed=args.seed,
            batch_size=args.batch_size,
            max_length=args.max_length,
            max_seconds=args.max_seconds,
            head=_head(method, backbone),
        )
        result = train_task(backbone, f"bench-{method}", data, config)
        assert result.test is not None
        dev, test, seconds = result.dev, result.test, result.seconds
        out_of_time = result.stopped_by_budget
        training = result.artifact.manifest.training or {}
        row |= {
            "trainable_parameters": result.trainable_parameters,
            "artifact_parameters": training.get("artifact_parameters"),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "hyperparameters": training.get("hyperparameters"),
        }
    backbone_parameters = sum(p.numel() for p in backbone.model.parameters())
    row |= {
        "dev_accuracy": round(dev.accuracy, 4),
        "test_accuracy": round(test.accuracy, 4),
        "test_macro_f1": round(test.macro_f1, 4),
        "trainable_percent": round(100 * row["trainable_parameters"] / backbone_parameters, 3),
        "train_seconds": round(seconds, 1),
        "out_of_time": out_of_time,
    }
    return row


def tfidf_baselines(data_root: Path) -> dict[str, tuple[float, float]]:
    """The TF-IDF + logistic regression (accuracy, macro-F1) per dataset from the data README's table."""
    readme = data_root / "README.md"
    if not readme.is_file():
        return {}
    found: dict[str, tuple[float, float]] = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        parts = cells[-1].split("/")
        try:
            found[cells[0].strip("`")] = (float(parts[0]), float(parts[1]))
        except (IndexError, ValueError):
            continue
    return found


def _row(results: list[dict[str, Any]], dataset: str, method: str) -> dict[str, Any] | None:
    hits = [r for r in results if r["dataset"] == dataset and r["method"] == method]
    return hits[-1] if hits else None


def targets(results: list[dict[str, Any]], tfidf: dict[str, tuple[float, float]]) -> list[str]:
    """The issue's targets for P-tuning v2 (head on [CLS]), and the same checks for the mean head."""
    lines: list[str] = []
    datasets = [d for d in dict.fromkeys(r["dataset"] for r in results) if d not in SEPARATE]
    for method in ("prefix", "prefix-mean"):
        if not any(_row(results, d, method) for d in datasets):
            continue
        lines += [
            f"### Targets: {LABELS[method]}",
            "",
            "| dataset | test acc | ÷ full FT | − probe | − TF-IDF acc | macro-F1 − TF-IDF macro-F1 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        ratios: list[float] = []
        above_probe: list[bool] = []
        above_tfidf: list[bool] = []
        for d in datasets:
            row = _row(results, d, method)
            if row is None:
                continue
            acc, f1 = row["test_accuracy"], row["test_macro_f1"]
            ft, probe = _row(results, d, "finetune"), _row(results, d, "probe")
            ratio = acc / ft["test_accuracy"] if ft else None
            if ratio is not None:
                ratios.append(ratio)
            vs_probe = acc - probe["test_accuracy"] if probe else None
            if vs_probe is not None:
                above_probe.append(vs_probe > 0)
            base = tfidf.get(d)
            if base is not None:
                above_tfidf.append(acc > base[0])
            lines.append(
                f"| {d} | {acc:.4f} | {'' if ratio is None else f'{ratio:.3f}'} "
                f"| {'' if vs_probe is None else f'{vs_probe:+.4f}'} "
                f"| {'' if base is None else f'{acc - base[0]:+.4f}'} "
                f"| {'' if base is None else f'{f1 - base[1]:+.4f}'} |"
            )
        lines.append("")
        measured = sum(1 for d in datasets if _row(results, d, method) is not None)

        def verdict(ok: bool, compared: int, measured: int = measured) -> str:
            if compared < measured:
                return f"{compared} of {measured} datasets have the row to compare with: not judged"
            return "met" if ok else "not met"

        if ratios:
            mean = sum(ratios) / len(ratios)
            lines.append(
                f"- mean ÷ full fine-tuning: **{mean:.4f}** "
                f"(target ≥ 0.98: {verdict(mean >= 0.98, len(ratios))})"
            )
        if above_probe:
            lines.append(
                f"- above the linear probe on {sum(above_probe)} of {len(above_probe)} datasets "
                f"(target: all: {verdict(all(above_probe), len(above_probe))})"
            )
        if above_tfidf:
            lines.append(
                f"- test accuracy above TF-IDF on {sum(above_tfidf)} of {len(above_tfidf)} datasets "
                f"(target: all: {verdict(all(above_tfidf), len(above_tfidf))})"
            )
        lines.append("")
    return lines


def markdown(
    results: list[dict[str, Any]], meta: dict[str, Any], tfidf: dict[str, tuple[float, float]]
) -> str:
    cap = meta["max_train_rows"] or "none (whole train sets)"
    lines = [
        "# Accuracy benchmark",
        "",
        f"Backbone `{meta['backbone']}` on `{meta['device']}`, train cap {cap}, seed {meta['seed']}, "
        f"{meta['date']}. Test accuracy / macro-F1. TF-IDF: the TF-IDF + logistic regression baseline of "
        "the data README (word n-grams; character n-grams for comment_zh; trained on the whole train set).",
        "",
    ]
    if meta.get("note"):
        lines += [str(meta["note"]), ""]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    for title, keep in (
        ("Datasets", lambda n: n not in SEPARATE),
        ("Reported separately", lambda n: n in SEPARATE),
    ):
        names = [d for d in dict.fromkeys(r["dataset"] for r in results) if keep(d)]
        if not names:
            continue
        lines += [f"## {title}", ""]
        lines.append("| dataset | train rows | " + " | ".join(LABELS[m] for m in methods) + " | TF-IDF |")
        lines.append("|---|---:|" + "---:|" * (len(methods) + 1))
        for d in names:
            cells = []
            for m in methods:
                row = _row(results, d, m)
                cells.append(
                    "" if row is None else f"{row['test_accuracy']:.3f} / {row['test_macro_f1']:.3f}"
                )
            base = tfidf.get(d)
            first = next(r for r in results if r["dataset"] == d)
            lines.append(
                f"| {d} | {first['train_rows']:,} | "
                + " | ".join(cells)
                + f" | {'' if base is None else f'{base[0]:.3f} / {base[1]:.3f}'} |"
            )
        lines.append("")
    lines += [
        "## Cost",
        "",
        "Trainable parameters while training (% of the backbone), training seconds, epochs run (best epoch);"
        " runs stopped by the time budget are marked ⏱.",
        "",
        "| dataset | method | trainable | train s | epochs (best) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        timed = " ⏱" if r.get("out_of_time") else ""
        best = f" ({r['best_epoch']})" if r.get("best_epoch") else ""
        lines.append(
            f"| {r['dataset']} | {LABELS[r['method']]} | {r['trainable_parameters']:,} "
            f"({r['trainable_percent']}%) | {r['train_seconds']}{timed} | {r['epochs_run']}{best} |"
        )
    lines.append("")
    lines += targets(results, tfidf)
    if any(r["dataset"] == "comment_zh" for r in results):
        lines.append(
            "comment_zh is Chinese with 63 train rows and 2 test labels absent from train; the English "
            "vocabulary covers ~26% of its characters, so its figures say little about the methods."
        )
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(datasets) + 3.5), 4.5))
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, name in enumerate(datasets):
            row = _row(results, name, method)
            if row is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(row["test_accuracy"])
        ax.bar(xs, ys, width, label=LABELS[method])
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    ax.set_title("ptserve methods vs linear probe and full fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _child_argv(args: argparse.Namespace, dataset: str, method: str, out: Path) -> list[str]:
    """The argument list that runs one (dataset, method) pair in its own process, other options kept."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--data-root", str(args.data_root)]
    argv += ["--datasets", dataset, "--methods", method, "--out", str(out), "--jobs", "1"]
    for name in (
        "max_train_rows",
        "max_dev_rows",
        "max_test_rows",
        "epochs",
        "probe_epochs",
        "probe_head",
        "finetune_epochs",
        "finetune_lr",
        "model",
        "device",
        "seed",
        "batch_size",
        "max_length",
        "max_seconds",
    ):
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def run_parallel(args: argparse.Namespace, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (dataset, method) pair in its own process, ``args.jobs`` at a time, biggest train set first.

    Each child writes its own results under ``<out>/runs/<dataset>-<method>/`` with a log; a child that
    fails is reported and the others go on. Pairs whose results there were made with the same options
    are kept, so an interrupted benchmark is resumed by running the same command again.
    """
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(d, m) for d in args.datasets.split(",") for m in args.methods.split(",")]
    sizes = {
        d: len((args.data_root / d / "train.jsonl").read_text(encoding="utf-8").splitlines())
        for d in {p[0] for p in pairs}
    }
    cost = {"probe": 0.1, "finetune": 0.6}  # relative to one prompt method's run
    pairs.sort(key=lambda p: -min(sizes[p[0]], args.max_train_rows or sizes[p[0]]) * cost.get(p[1], 1.0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def one(pair: tuple[str, str]) -> tuple[str, str, int]:
        dataset, method = pair
        out = args.out / "runs" / f"{dataset}-{method}"
        argv = _child_argv(args, dataset, method, out)
        saved = out / "results.json"
        # An earlier, interrupted invocation finished this pair with the same options: keep it.
        if saved.is_file() and json.loads(saved.read_text())["meta"].get("argv") == argv[2:]:
            print(f"  kept {dataset} {method} from an earlier run", flush=True)
            return dataset, method, 0
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "w", encoding="utf-8") as log:
            code = subprocess.run(
                _child_argv(args, dataset, method, out),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            ).returncode
        print(f"  {time.strftime('%H:%M:%S')} done {dataset} {method}: exit {code}", flush=True)
        return dataset, method, code

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(one, pairs))
    results: list[dict[str, Any]] = []
    order = {m: i for i, m in enumerate(METHODS)}
    for dataset in args.datasets.split(","):
        for method in sorted(args.methods.split(","), key=order.__getitem__):
            path = args.out / "runs" / f"{dataset}-{method}" / "results.json"
            if path.is_file():
                results.extend(json.loads(path.read_text())["results"])
    failed = [f"{d}/{m} (exit {c})" for d, m, c in codes if c != 0]
    if failed:
        print(f"failed runs: {', '.join(failed)}; see their log.txt under {args.out / 'runs'}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        (args.out / "results.md").write_text(
            markdown(saved["results"], saved["meta"], saved["meta"]["tfidf"])
        )
        bar_chart(saved["results"], args.out / "accuracy.png")
        print(f"wrote {args.out / 'results.md'}, accuracy.png")
        return 0
    tfidf = tfidf_baselines(args.data_root)
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "max_train_rows": args.max_train_rows,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "argv": sys.argv[1:] if argv is None else argv,
        "tfidf": tfidf,
    }
    if args.jobs > 1:
        started = time.perf_counter()
        results = run_parallel(args, meta)
        if not results:
            print("no run finished", flush=True)
            return 1
        first = json.loads(
            (
                args.out / "runs" / f"{results[0]['dataset']}-{results[0]['method']}" / "results.json"
            ).read_text()
        )["meta"]
        meta |= {k: first[k] for k in ("backbone", "device", "threads")}
        meta["wall_seconds"] = round(time.perf_counter() - started, 1)
        meta["jobs"] = args.jobs
    else:
        backbone = load_backbone(args.model, device=args.device, dtype="float32")
        meta |= {
            "backbone": backbone.spec.fingerprint,
            "backbone_family": backbone.spec.family,
            "device": str(backbone.device)
            + (f" ({torch.cuda.get_device_name()})" if backbone.device.type == "cuda" else ""),
            "threads": torch.get_num_threads(),
        }
        results = []
        for name in args.datasets.split(","):
            data = load(args, name)
            print(
                f"{name}: {len(data.train)} train, {len(data.dev)} dev, {len(data.test)} test, "
                f"{len(data.labels)} labels"
            )
            for method in args.methods.split(","):
                print(f"  {LABELS[method]} ...", flush=True)
                row = run_one(backbone, name, data, method, args)
                print(
                    f"  {LABELS[method]}: test accuracy {row['test_accuracy']:.4f}, "
                    f"macro-F1 {row['test_macro_f1']:.4f}, {row['trainable_parameters']:,} trainable, "
                    f"{row['train_seconds']}s, {row['epochs_run']} epochs",
                    flush=True,
                )
                results.append(row)
                (args.out / "results.json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
                )
                (args.out / "results.md").write_text(markdown(results, meta, tfidf))
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, meta, tfidf))
    bar_chart(results, args.out / "accuracy.png")
    print(f"wrote {args.out / 'results.json'}, results.md, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
