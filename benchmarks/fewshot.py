"""Few-shot benchmark: K examples per label, every ptserve method against the linear probe and SetFit.

For each (dataset, K, seed): K rows per label sampled from train (seeded), at most ``--dev-per-label``
rows per label from dev for early stopping (seeded), and test accuracy on up to ``--max-test`` test rows
(a stratified sample fixed per dataset: the same rows for every K, seed and method). Methods:

- ``default``: what ``ptserve train`` does without ``--method`` (method "auto", chosen from the data);
  ``default_nolora`` the same without LoRA (``--lora-rank 0``: the default until session 20, and until
  session 23 on tasks of 5 labels or more from 48 rows per label), ``default_lora`` with rank-8 LoRA at
  any size (``--lora-rank 8``), ``default_lora_refined`` with rank-8 LoRA and the cross-entropy refinement
  (what ``default_lora`` trained at K=64 until session 23), ``default_r8`` with rank-8 LoRA on SetFit's
  sampled pairs (the default until session 23 on tasks of 5 labels or more from 24 rows per label),
  ``default_noscales`` without (IA)^3 scales or LoRA (``--no-scales --lora-rank 0``: the default until
  session 16), ``default_scales`` with scales at any size (``--scales``);
- ``prefix``, ``ptuning``, ``prompt``, ``probe``: each ptserve method with its defaults (``prefix`` is
  the default before "auto"; ``probe`` is the linear probe on the mean of the frozen backbone's tokens,
  its head fitted by standardised logistic regression since session 31; ``probe_trained`` the head
  trained by epochs, the default before: ``probe`` runs of sessions 8-30 are ``probe_trained``);
- ``pairs``: P-tuning v2 with objective "pairs" (prompts/pairs.py: SetFit's sentence pairs train the
  prefix, then a prototype head), what "auto" trains below 100 rows per label; ``pairs_lr`` the same
  with SetFit's logistic-regression head, ``pairs_p16`` with 16 prefix positions, ``pairs_inbatch``
  with the loss over every pair of a step's rows (``pair_loss="in-batch"``);
- ``setfit``: SetFit with its defaults (contrastive fine-tuning of the whole sentence-transformer body,
  then logistic regression) on the same model directory. It trains the backbone, so each task would be
  a copy of the model. Installed by the benchmark's extra: ``pip install -e '.[fewshot]'``; without it
  the rows say "not installed";
- ``finetune``: the whole backbone trained with a linear head on the same rows (benchmarks/accuracy.py's
  full fine-tuning: lr 5e-5, at most 10 epochs, early stopping on the same dev rows), the ceiling the
  issue's "0.98 of full fine-tuning from 64 per label" is measured against.

Writes ``fewshot.json`` (every run, saved after each one; running again skips the runs it holds),
``fewshot.md`` (mean over seeds per dataset x K x method, and training seconds per task) and
``fewshot.png`` (accuracy against K per dataset; skipped with a message without matplotlib).

    .venv/bin/python benchmarks/fewshot.py --data-root ../shared/data --datasets sst2,trec --k 8,32 \\
        --seeds 0,1 --methods default,prefix,probe,setfit --torch-threads 1

Not part of the test run (tests/benchmarks/test_fewshot.py checks the sampling and the tables).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompts.data import Example, TaskData, cap_rows, read_examples

DATASETS = ["sst2", "agnews", "trec", "emotion", "sms_spam", "banking77", "comment_zh"]
ENGLISH = {"sst2", "agnews", "trec", "emotion", "sms_spam", "banking77"}
# banking77 has 77 labels: at 8 and 16 per label it is left out (the issue asks for 32 and 64).
MIN_K = {"banking77": 32}
KS = [8, 16, 32, 64]
SEEDS = [0, 1, 2, 3, 4]
# Benchmark name -> ptserve method (None: not trained by ptserve).
METHODS: dict[str, str | None] = {
    "default": "auto",
    "default_nolora": "auto",  # the TrainConfig settings of DEFAULT_VARIANTS below
    "default_lora": "auto",
    "default_lora_refined": "auto",
    "default_refined": "auto",
    "default_prototype": "auto",
    "default_standardized": "auto",
    "default_r8": "auto",
    "default_noscales": "auto",
    "default_noscales_refined": "auto",
    "default_scales": "auto",
    "default_trainedprobe": "auto",
    "prefix": "p-tuning-v2",
    "pairs": "p-tuning-v2",  # objective "pairs" (PAIRS below)
    "pairs_lr": "p-tuning-v2",
    "pairs_p16": "p-tuning-v2",
    "pairs_inbatch": "p-tuning-v2",
    "ptuning": "p-tuning",
    "prompt": "prompt-tuning",
    "probe": "linear-probe",
    "probe_trained": "linear-probe",
    "setfit": None,
    "finetune": None,
}
LABELS = {
    "default": "ptserve default (auto)",
    "default_nolora": "default, no LoRA",
    "default_lora": "default, LoRA at every K",
    "default_lora_refined": "default, rank-8 LoRA, refined",
    "default_refined": "default, refined from 48 rows per label",
    "default_prototype": "default, prototype head",
    "default_standardized": "default, standardised head",
    "default_r8": "default, rank-8 LoRA on sampled pairs",
    "default_noscales": "default, no (IA)³ scales or LoRA",
    "default_noscales_refined": "default, no scales or LoRA, refined",
    "default_scales": "default, (IA)³ scales at every K",
    "default_trainedprobe": "default, probe candidate trained by epochs",
    "prefix": "P-tuning v2 (old default)",
    "pairs": "P-tuning v2 on pairs",
    "pairs_lr": "pairs, logistic head",
    "pairs_p16": "pairs, prefix 16 (session 9)",
    "pairs_inbatch": "pairs, in-batch loss",
    "ptuning": "P-tuning",
    "prompt": "prompt tuning",
    "probe": "linear probe (fitted)",
    "probe_trained": "linear probe trained by epochs (default until session 31)",
    "setfit": "SetFit",
    "finetune": "full fine-tuning",
}
NOT_INSTALLED = "not installed"
# TrainConfig settings of a benchmark method: ``auto`` as an earlier default trained it where that differs
# from today's, and the linear probe fitted as ``auto``'s probe candidate is.
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "default_nolora": {"lora_rank": 0},
    "default_lora": {"lora_rank": 8},
    "default_lora_refined": {"lora_rank": 8, "refine_epochs": 20},  # prompts.trainer.REFINE_EPOCHS
    "default_refined": {"refine_epochs": 20},  # what auto trained on < 5 labels at K=64 before session 24
    "default_prototype": {"pair_head": "prototype"},  # auto on 5+ labels before session 25 (26 at K=8, 16)
    "default_standardized": {"pair_head": "standardized"},
    "default_r8": {"lora_rank": 8, "pair_loss": "sampled"},
    "default_noscales": {"scales": False, "lora_rank": 0},
    "default_noscales_refined": {"scales": False, "lora_rank": 0, "refine_epochs": 20},
    "default_scales": {"scales": True},
    "default_trainedprobe": {"probe_head": "trained"},  # auto's probe candidate before session 30
    "probe_trained": {"probe_head": "trained"},  # linear-probe's head until session 31
}
# Benchmark methods trained with the pairs objective (prompts/pairs.py): prefix on SetFit's pairs, then
# the head fitted on the prefixed vectors (its pair_head), the prefix length (None: the trainer's) and
# the pair_loss.
PAIRS: dict[str, tuple[str, int | None, str]] = {
    "pairs": ("prototype", None, "sampled"),
    "pairs_lr": ("logistic", None, "sampled"),
    "pairs_p16": ("prototype", 16, "sampled"),  # the default before PAIRS_PREFIX_LENGTH became 32
    "pairs_inbatch": ("prototype", None, "in-batch"),
}


# ------------------------------------------------------------------------------------------ sampling


def sample_per_label(examples: Sequence[Example], labels: Sequence[str], k: int, seed: int) -> list[Example]:
    """Up to ``k`` rows of every label, drawn with ``seed`` (a label with fewer rows gives all it has),
    in a seeded shuffled order. The same (rows, k, seed) always gives the same sample."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    chosen: list[Example] = []
    for label in labels:
        rows = by_label.get(label, [])
        chosen.extend(rng.sample(rows, min(k, len(rows))))
    rng.shuffle(chosen)
    return chosen


def test_rows(test: Sequence[Example], max_test: int | None) -> list[Example]:
    """The test rows every run of a dataset is scored on: a stratified sample fixed by seed 0."""
    if max_test is None or len(test) <= max_test:
        return list(test)
    return cap_rows(test, max_test, 0)


def fewshot_data(full: TaskData, k: int, seed: int, dev_per_label: int, max_test: int | None) -> TaskData:
    """One cell's data: K per label from train, at most ``dev_per_label`` per label from dev, the
    dataset's fixed test rows. Labels absent from the sampled train set are dropped from dev and test
    (as ``ptserve train`` would refuse them) and the label list keeps the dataset's order."""
    train = sample_per_label(full.train, full.labels, k, seed)
    present = {e.label for e in train}
    labels = [label for label in full.labels if label in present]
    dev = sample_per_label([e for e in full.dev if e.label in present], labels, dev_per_label, seed)
    test = [e for e in test_rows(full.test, max_test) if e.label in present]
    return TaskData(labels=labels, train=train, dev=dev, test=test, source=f"{full.source} K={k} seed={seed}")


def load_dataset(data_root: Path, name: str) -> TaskData:
    folder = data_root / name
    labels_file = folder / "labels.json"
    train = read_examples(folder / "train.jsonl")
    raw = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    if isinstance(raw, dict):
        raw = raw.get("labels")
    labels = [str(x) for x in raw] if isinstance(raw, list) else sorted({e.label for e in train})
    return TaskData(
        labels=labels,
        train=train,
        dev=read_examples(folder / "dev.jsonl"),
        test=read_examples(folder / "test.jsonl"),
        source=str(folder),
    )


# ------------------------------------------------------------------------------------------- running


def setfit_available() -> bool:
    return importlib.util.find_spec("setfit") is not None


def run_ptserve(
    backbone: Any,
    data: TaskData,
    method: str,
    seed: int,
    pairs: tuple[str, int | None, str] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``pairs`` set: objective "pairs" with that (head, prefix length, pair loss); ``settings``: other
    TrainConfig fields (those not given: the method's own choice)."""
    from prompts.trainer import TrainConfig, train_task

    config = TrainConfig(method=method, seed=seed, **(settings or {}))
    if pairs is not None:
        pair_head, length, loss = pairs
        config = TrainConfig(
            method=method,
            seed=seed,
            objective="pairs",
            pair_head=pair_head,
            prefix_length=length,
            pair_loss=loss,
        )
    result = train_task(backbone, "fewshot", data, config)
    assert result.test is not None
    training = result.artifact.manifest.training or {}
    plan = training.get("plan")
    return {
        "accuracy": result.test.accuracy,
        "macro_f1": result.test.macro_f1,
        "dev_accuracy": result.dev.accuracy,
        "seconds": round(result.seconds, 2),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "regime": plan.get("regime") if plan else None,
        "objective": plan.get("objective") if plan else None,  # auto on few-shot data: what it trained
        "kept": plan.get("kept") if plan else None,  # auto: pairs or the probe, by McNemar on dev
        "mcnemar_z": plan.get("mcnemar_z") if plan else None,
        "refine_epochs": plan.get("refine_epochs") if plan else None,  # auto: cross-entropy after the pairs
        "scales": result.artifact.manifest.scales is not None,  # (IA)^3 scales in the artifact
        "lora_rank": 0 if result.artifact.manifest.lora is None else result.artifact.manifest.lora.rank,
    }


def run_setfit(model_dir: Path, data: TaskData, seed: int) -> dict[str, Any]:
    """SetFit with its defaults on ``model_dir`` (contrastive body fine-tuning, then logistic regression)."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from prompts.metrics import evaluate

    index = {label: i for i, label in enumerate(data.labels)}
    train = Dataset.from_dict(
        {"text": [e.text for e in data.train], "label": [index[e.label] for e in data.train]}
    )
    model = SetFitModel.from_pretrained(str(model_dir))
    # Its defaults, but checkpoints in a temporary folder instead of ./checkpoints.
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trainer = Trainer(
            model=model, args=TrainingArguments(seed=seed, output_dir=scratch), train_dataset=train
        )
        trainer.train()
        seconds = time.perf_counter() - started
    predicted = [int(p) for p in model.predict([e.text for e in data.test])]
    report = evaluate([index[e.label] for e in data.test], predicted, data.labels)
    return {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "seconds": round(seconds, 2)}


def run_finetune(backbone: Any, data: TaskData, seed: int) -> dict[str, Any]:
    """benchmarks/accuracy.py's full fine-tuning with its defaults on the few-shot rows."""
    from benchmarks.accuracy import finetune

    args = argparse.Namespace(
        seed=seed, max_length=128, batch_size=16, finetune_lr=5e-5, finetune_epochs=10, max_seconds=None
    )
    dev, test, _, seconds, epochs, _ = finetune(backbone, data, args)
    return {
        "accuracy": test.accuracy,
        "macro_f1": test.macro_f1,
        "dev_accuracy": dev.accuracy,
        "seconds": round(seconds, 2),
        "epochs_run": epochs,
    }


def run_key(record: dict[str, Any]) -> tuple[str, int, int, str]:
    return (record["dataset"], int(record["k"]), int(record["seed"]), record["method"])


def cells(datasets: Sequence[str], ks: Sequence[int], seeds: Sequence[int]) -> list[tuple[str, int, int]]:
    """(dataset, K, seed) to run: banking77 only from its MIN_K up."""
    return [(d, k, s) for d in datasets for k in ks if k >= MIN_K.get(d, 0) for s in seeds]


# ----------------------------------------------------------------------------------------- reporting


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean test accuracy, macro-F1 and training seconds over seeds per (dataset, K, method); runs that
    did not train (SetFit not installed) give a row with ``status`` and no numbers."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["dataset"], int(record["k"]), record["method"])].append(record)
    rows: list[dict[str, Any]] = []
    for (dataset, k, method), runs in sorted(groups.items()):
        done = [r for r in runs if r.get("accuracy") is not None]
        row: dict[str, Any] = {"dataset": dataset, "k": k, "method": method, "seeds": len(done)}
        if done:
            row["accuracy"] = statistics.fmean(r["accuracy"] for r in done)
            row["macro_f1"] = statistics.fmean(r["macro_f1"] for r in done)
            row["seconds"] = statistics.fmean(r["seconds"] for r in done)
        else:
            row["status"] = runs[0].get("status", "not run")
        rows.append(row)
    return rows


def english_means(
    records: Sequence[dict[str, Any]], methods: Sequence[str]
) -> dict[tuple[int, str], tuple[float, int, int]]:
    """(K, method) -> (mean accuracy over the English datasets, how many sets, how many runs each), over
    the same (dataset, seed) cells for every method compared at that K: the cells all of ``methods``
    with an English result at K ran (a method run on fewer sets or seeds would otherwise be compared on
    other samples). Where those share no cell, the method with the fewest runs (on ties the later one)
    is left out until the rest share one: full fine-tuning run on banking77 alone, where SetFit never
    ran, must not empty the comparison of the others. Seeds are averaged per dataset first, so each
    dataset weighs the same."""
    acc: dict[tuple[str, int, int, str], float] = {
        run_key(record): float(record["accuracy"])
        for record in records
        if record["dataset"] in ENGLISH and record.get("accuracy") is not None and record["method"] in methods
    }
    means: dict[tuple[int, str], tuple[float, int, int]] = {}
    for k in sorted({key[1] for key in acc}):
        ran = {m: {(d, s) for d, kk, s, mm in acc if kk == k and mm == m} for m in methods}
        present = [m for m in methods if ran[m]]
        common = set.intersection(*(ran[m] for m in present))
        while not common:
            present.remove(min(reversed(present), key=lambda m: len(ran[m])))
            common = set.intersection(*(ran[m] for m in present))
        datasets = sorted({d for d, _ in common})
        for method in present:
            per_set = [
                statistics.fmean(acc[(d, k, s, method)] for dd, s in common if dd == d) for d in datasets
            ]
            means[(k, method)] = (statistics.fmean(per_set), len(datasets), len(common))
    return means


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _mean_row(label: str, k: int, entries: Sequence[tuple[float, int, int] | None]) -> str:
    cells = (
        "–" if e is None else f"**{e[0]:.3f}** ({_count(e[1], 'set')}, {_count(e[2], 'run')})"
        for e in entries
    )
    return f"| **{label}** | {k} | " + " | ".join(cells) + " |"


def _versus_cell(column: tuple[float, int, int], default: tuple[float, int, int]) -> str:
    """A column's mean against the default's on the same runs: "**column** / default (sets, runs)"."""
    return f"**{column[0]:.3f}** / {default[0]:.3f} ({_count(column[1], 'set')}, {_count(column[2], 'run')})"


def _by_cell(
    records: Sequence[dict[str, Any]],
) -> tuple[dict[tuple[str, int, str], dict[str, Any]], list[tuple[str, int]]]:
    """The aggregated rows by (dataset, K, method), and the (dataset, K) cells by K, then dataset."""
    rows = aggregate(records)
    by_cell = {(r["dataset"], r["k"], r["method"]): r for r in rows}
    return by_cell, sorted({(r["dataset"], r["k"]) for r in rows}, key=lambda c: (c[1], DATASETS.index(c[0])))


def _table_head(methods: Sequence[str]) -> list[str]:
    return [
        "| dataset | K | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]


def _accuracy_table(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """Test accuracy per (dataset, K) and column, each K closed by the English means."""
    by_cell, cells_seen = _by_cell(records)

    def acc(row: dict[str, Any] | None) -> str:
        if row is None:
            return "not run"
        if "accuracy" not in row:
            return str(row["status"])
        return f"{row['accuracy']:.3f}"

    lines = _table_head(methods)
    means = english_means(records, methods)
    # Each column against the default on every run the two share: the row above shrinks to the cells
    # every column ran (a method run on a few cells would shrink it to those), and the target compares
    # the default with SetFit on all of theirs.
    versus = (
        {m: english_means(records, ["default", m]) for m in methods if m != "default"}
        if "default" in methods
        else {}
    )
    for k in sorted({c[1] for c in cells_seen}):
        for dataset, kk in cells_seen:
            if kk != k:
                continue
            found = [by_cell.get((dataset, k, m)) for m in methods]
            if all(r is None for r in found):
                continue
            seeds = {r["seeds"] for r in found if r is not None and "accuracy" in r}
            note = f" ({'/'.join(str(s) for s in sorted(seeds))} seeds)" if len(seeds) > 1 else ""
            lines.append(f"| {dataset}{note} | {k} | " + " | ".join(acc(r) for r in found) + " |")
        english = [means.get((k, m)) for m in methods]
        if any(e is not None for e in english):  # no English run at this K: nothing to compare
            lines.append(_mean_row("mean, English (the same runs)", k, english))
        pairs = {m: (v[(k, m)], v[(k, "default")]) for m, v in versus.items() if (k, m) in v}
        shrunk = any(pairs[m] != (means.get((k, m)), means.get((k, "default"))) for m in pairs)
        if shrunk:
            cells = (_versus_cell(*pairs[m]) if m in pairs else "–" for m in methods)
            lines.append(
                f"| **mean, English: each column / default (the runs the two have)** | {k} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def _seconds_table(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    by_cell, cells_seen = _by_cell(records)
    lines = _table_head(methods)
    for dataset, k in cells_seen:
        found = [by_cell.get((dataset, k, m)) for m in methods]
        if all(r is None or "seconds" not in r for r in found):
            continue
        lines.append(
            f"| {dataset} | {k} | "
            + " | ".join("–" if r is None or "seconds" not in r else f"{r['seconds']:.1f}" for r in found)
            + " |"
        )
    return lines


def markdown(records: Sequence[dict[str, Any]], methods: Sequence[str], header: str) -> str:
    """The issue's columns (``default``, each ptserve method, the probe, SetFit, full fine-tuning) in one
    table; earlier defaults and ablations, each beside ``default``, in a second one when run."""
    main = [m for m in methods if m in PLOTTED]
    ran = {r["method"] for r in records}
    rest = [m for m in methods if m not in PLOTTED and m in ran]
    groups = [("", main or list(methods))]
    if main and rest:
        groups.append(
            (
                "Earlier defaults and ablations, beside today's default (benchmarks/FEWSHOT.md)",
                ["default", *rest],
            )
        )
    lines = [
        header,
        "",
        "Test accuracy, mean over seeds (seeds per cell in brackets when not all alike).",
        "",
    ]
    for title, columns in groups:
        lines += ([f"### {title}", ""] if title else []) + _accuracy_table(records, columns) + [""]
    lines += ["Training seconds per task (mean over seeds; test scoring not included).", ""]
    for title, columns in groups:
        lines += ([f"### {title}", ""] if title else []) + _seconds_table(records, columns) + [""]
    return "\n".join(lines).rstrip("\n")


# The lines the issue asks for, each in one colour and marker in every panel; every other method (earlier
# defaults, ablations: FEWSHOT.md) is drawn thin and grey, so the picture stays readable as they pile up.
PLOTTED: dict[str, tuple[str, str]] = {
    "default": ("black", "o"),
    "setfit": ("tab:orange", "s"),
    "probe": ("tab:blue", "^"),
    "prefix": ("tab:green", "v"),
    "ptuning": ("tab:purple", "D"),
    "prompt": ("tab:brown", "P"),
    "finetune": ("tab:red", "*"),
}
MEAN_PANEL = "mean, English"
GREY = "earlier defaults and ablations (FEWSHOT.md)"  # the legend's one entry for every other method


def plot_series(
    records: Sequence[dict[str, Any]], methods: Sequence[str]
) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """Panel -> method -> [(K, mean accuracy, standard deviation over seeds)], what :func:`plot` draws:
    one panel per dataset, then :data:`MEAN_PANEL`, the English sets' mean on the runs every plotted
    method at that K has (:func:`english_means`; full fine-tuning, run at one K, is left out of it so
    that it does not shrink the other Ks' runs), with no spread."""
    runs: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["method"] in methods and record.get("accuracy") is not None:
            runs[(record["dataset"], record["method"])][int(record["k"])].append(float(record["accuracy"]))
    panels: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for dataset in DATASETS:
        lines = {
            method: [
                (k, statistics.fmean(accs), statistics.pstdev(accs))
                for k, accs in sorted(runs[(dataset, method)].items())
            ]
            for method in methods
            if (dataset, method) in runs
        }
        if lines:
            panels[dataset] = lines
    compared = [m for m in methods if m in PLOTTED and m != "finetune"]
    mean_lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (k, method), (mean, _, _) in sorted(english_means(records, compared).items()):
        mean_lines[method].append((k, mean, 0.0))
    if mean_lines:
        panels[MEAN_PANEL] = {m: mean_lines[m] for m in compared if m in mean_lines}
    return panels


def plot(records: Sequence[dict[str, Any]], methods: Sequence[str], path: Path) -> str:
    """Accuracy against K, one panel per dataset and one for the English mean, error bars one standard
    deviation over seeds; returns what was done (matplotlib may be missing)."""
    if importlib.util.find_spec("matplotlib") is None:
        return "plot skipped: matplotlib is not installed"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_series(records, methods)
    columns = 4
    rows_needed = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows_needed, columns, figsize=(4.0 * columns, 3.4 * rows_needed + 0.8), squeeze=False
    )
    cells = list(axes.flat)
    handles: dict[str, Any] = {}
    for ax, (panel, lines) in zip(cells, panels.items(), strict=False):
        for method, points in lines.items():
            ks, means, spreads = zip(*points, strict=True)
            color, marker = PLOTTED.get(method, ("0.7", "."))
            main = method in PLOTTED
            drawn = ax.errorbar(
                ks,
                means,
                yerr=spreads if main and any(spreads) else None,
                color=color,
                marker=marker,
                linewidth=2.0 if method == "default" else 1.2 if main else 0.7,
                markersize=6 if main else 3,
                capsize=2,
                zorder=3 if main else 1,
                label=LABELS[method] if main else GREY,
            )
            handles.setdefault(drawn.get_label(), drawn)
        ax.set_xscale("log", base=2)
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_xlim(KS[0] / 1.2, KS[-1] * 1.2)
        ax.set_title(panel if panel != MEAN_PANEL else "English mean (the runs all lines share)")
        ax.set_xlabel("examples per label (K)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test accuracy")
    for ax in cells[len(panels) :]:
        ax.axis("off")
    order = [LABELS[m] for m in PLOTTED if LABELS[m] in handles] + [GREY] * (GREY in handles)
    fig.legend(
        [handles[label] for label in order], order, loc="lower center", ncol=4, fontsize=9, frameon=False
    )
    fig.tight_layout(rect=(0, 0.8 / (3.4 * rows_needed + 0.8), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"saved {path}"


def write_outputs(out: Path, payload: dict[str, Any], methods: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload["summary"] = aggregate(payload["runs"])
    (out / "fewshot.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = (
        f"# Few-shot benchmark\n\nBackbone: {payload['model']}; dev: at most {payload['dev_per_label']} "
        f"rows per label; test: up to {payload['max_test']} rows per dataset, the same for every run; "
        f"torch threads: {payload['torch_threads']}."
    )
    (out / "fewshot.md").write_text(markdown(payload["runs"], methods, header) + "\n")


# ------------------------------------------------------------------------------------------------ main


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding <name>/train.jsonl ...")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: all)")
    p.add_argument("--k", default=",".join(map(str, KS)), help="examples per label, comma-separated")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {list(METHODS)}")
    p.add_argument("--max-test", type=int, default=1000, help="test rows per dataset (stratified, fixed)")
    p.add_argument("--dev-per-label", type=int, default=8, help="dev rows per label for early stopping")
    p.add_argument("--model", type=Path, help="model directory (default: the packaged MiniLM)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/fewshot"))
    p.add_argument("--report", action="store_true", help="only rebuild fewshot.md and the plot from --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = _csv(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    datasets = _csv(args.datasets)
    for name in datasets:
        if not (args.data_root / name / "train.jsonl").is_file():
            raise SystemExit(f"{args.data_root / name}: no train.jsonl")
    ks = [int(k) for k in _csv(args.k)]
    seeds = [int(s) for s in _csv(args.seeds)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from prompts.backbone import default_model_path, load_backbone

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model_dir = args.model or default_model_path()
    results = args.out / "fewshot.json"
    payload: dict[str, Any] = (
        json.loads(results.read_text())
        if results.is_file()
        else {
            "model": str(model_dir),
            "dev_per_label": args.dev_per_label,
            "max_test": args.max_test,
            "torch_threads": torch.get_num_threads(),
            "runs": [],
        }
    )
    if args.report:
        write_outputs(args.out, payload, methods)
        print(plot(payload["runs"], methods, args.out / "fewshot.png"))
        return 0
    done = {run_key(r) for r in payload["runs"]}
    backbone = load_backbone(str(model_dir) if args.model else None, device=args.device)
    have_setfit = setfit_available()
    for dataset in datasets:
        full = load_dataset(args.data_root, dataset)
        for _, k, seed in cells([dataset], ks, seeds):
            data = fewshot_data(full, k, seed, args.dev_per_label, args.max_test)
            for method in methods:
                key = (dataset, k, seed, method)
                if key in done:
                    continue
                record: dict[str, Any] = {
                    "dataset": dataset,
                    "k": k,
                    "seed": seed,
                    "method": method,
                    "train_rows": len(data.train),
                    "dev_rows": len(data.dev),
                    "test_rows": len(data.test),
                    "torch_threads": torch.get_num_threads(),  # training seconds depend on it
                }
                ptserve_method = METHODS[method]
                if ptserve_method is not None:
                    record |= run_ptserve(
                        backbone, data, ptserve_method, seed, PAIRS.get(method), DEFAULT_VARIANTS.get(method)
                    )
                elif method == "finetune":
                    record |= run_finetune(backbone, data, seed)
                elif have_setfit:
                    record |= run_setfit(model_dir, data, seed)
                else:
                    record["status"] = NOT_INSTALLED
                payload["runs"].append(record)
                done.add(key)
                write_outputs(args.out, payload, methods)
                shown = (
                    f"{record['accuracy']:.3f} in {record['seconds']:.1f}s"
                    if "accuracy" in record
                    else record["status"]
                )
                print(f"{dataset} K={k} seed={seed} {method}: {shown}", flush=True)
    write_outputs(args.out, payload, methods)
    print((args.out / "fewshot.md").read_text())
    print(plot(payload["runs"], methods, args.out / "fewshot.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
