"""benchmarks/fewshot.py: sampling, aggregation and reports on tiny made-up data (no training)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import fewshot
from prompts.data import Example, TaskData


def _full() -> TaskData:
    labels = ["a", "b", "c"]
    train = [Example(f"{label} train {i}", label) for label in labels for i in range(20)]
    train += [Example(f"rare {i}", "rare") for i in range(3)]  # fewer than K rows
    dev = [Example(f"{label} dev {i}", label) for label in [*labels, "rare"] for i in range(12)]
    test = [Example(f"{label} test {i}", label) for label in [*labels, "rare"] for i in range(30)]
    return TaskData(labels=[*labels, "rare"], train=train, dev=dev, test=test, source="made up")


def test_sampling_is_per_label_seeded_and_shares_the_test_rows() -> None:
    full = _full()
    data = fewshot.fewshot_data(full, k=8, seed=0, dev_per_label=8, max_test=60)
    assert Counter(e.label for e in data.train) == {"a": 8, "b": 8, "c": 8, "rare": 3}
    assert Counter(e.label for e in data.dev) == {"a": 8, "b": 8, "c": 8, "rare": 8}
    assert len(data.test) == 60 and data.labels == full.labels
    assert fewshot.fewshot_data(full, 8, 0, 8, 60).train == data.train  # repeatable
    other = fewshot.fewshot_data(full, 8, 1, 8, 60)
    assert other.train != data.train
    assert other.test == data.test == fewshot.fewshot_data(full, 16, 3, 8, 60).test  # same rows for all
    assert set(map(id, fewshot.sample_per_label(full.train, full.labels, 4, 0))) <= set(map(id, full.train))


def test_labels_missing_from_the_sample_leave_dev_and_test() -> None:
    full = _full()
    full.train = [e for e in full.train if e.label != "rare"]
    data = fewshot.fewshot_data(full, 4, 0, 8, None)
    assert data.labels == ["a", "b", "c"]
    assert {e.label for e in data.dev} == {e.label for e in data.test} == {"a", "b", "c"}
    assert len(data.test) == 90


def test_banking77_runs_only_from_32_per_label() -> None:
    grid = fewshot.cells(["banking77", "trec"], [8, 16, 32, 64], [0, 1])
    assert [c for c in grid if c[0] == "banking77"] == [
        ("banking77", 32, 0),
        ("banking77", 32, 1),
        ("banking77", 64, 0),
        ("banking77", 64, 1),
    ]
    assert len([c for c in grid if c[0] == "trec"]) == 8


def _runs() -> list[dict[str, object]]:
    runs: list[dict[str, object]] = []
    for dataset, base in (("sst2", 0.6), ("trec", 0.8), ("comment_zh", 0.3)):
        for seed, delta in ((0, 0.0), (1, 0.1)):
            for method, shift in (("default", 0.05), ("probe", 0.0)):
                runs.append(
                    {
                        "dataset": dataset,
                        "k": 8,
                        "seed": seed,
                        "method": method,
                        "accuracy": base + delta + shift,
                        "macro_f1": 0.5,
                        "seconds": 2.0 + seed,
                    }
                )
            runs.append(
                {"dataset": dataset, "k": 8, "seed": seed, "method": "setfit", "status": "not installed"}
            )
    return runs


def test_aggregate_means_over_seeds_and_keeps_what_did_not_run() -> None:
    rows = {(r["dataset"], r["method"]): r for r in fewshot.aggregate(_runs())}
    assert rows[("sst2", "default")]["accuracy"] == pytest.approx(0.7)
    assert rows[("sst2", "default")]["seconds"] == 2.5 and rows[("sst2", "default")]["seeds"] == 2
    assert rows[("trec", "probe")]["accuracy"] == pytest.approx(0.85)
    assert rows[("sst2", "setfit")] == {
        "dataset": "sst2",
        "k": 8,
        "method": "setfit",
        "seeds": 0,
        "status": "not installed",
    }
    means = fewshot.english_means(_runs(), ["default", "probe", "setfit"])
    assert means[(8, "probe")] == pytest.approx((0.75, 2, 4))  # sst2 and trec; comment_zh is not English
    assert (8, "setfit") not in means  # not installed: left out, it does not empty the comparison


def test_english_means_compare_every_method_on_the_same_runs() -> None:
    setfit = {"k": 8, "method": "setfit", "macro_f1": 0.9, "seconds": 1.0}
    runs = [*_runs(), {**setfit, "dataset": "trec", "seed": 0, "accuracy": 0.95}]
    by = {fewshot.run_key(r): r["accuracy"] for r in runs if "accuracy" in r}
    means = fewshot.english_means(runs, ["default", "probe", "setfit"])
    # SetFit ran TREC seed 0 only: every method's mean is its TREC seed-0 figure.
    assert means[(8, "setfit")] == pytest.approx((0.95, 1, 1))
    assert means[(8, "default")] == pytest.approx((by[("trec", 8, 0, "default")], 1, 1))
    assert means[(8, "probe")] == pytest.approx((by[("trec", 8, 0, "probe")], 1, 1))
    # Without SetFit in the comparison the others are compared on both sets and both seeds.
    assert fewshot.english_means(runs, ["default", "probe"])[(8, "probe")] == pytest.approx((0.75, 2, 4))
    # Seeds are averaged per dataset first: three SST-2 seeds weigh as much as one TREC seed.
    more = [{**setfit, "dataset": "sst2", "seed": s, "accuracy": 0.5} for s in (0, 1, 2)]
    more += [{**setfit, "method": "probe", "dataset": "sst2", "seed": 2, "accuracy": 0.5}]
    mean, sets, cells = fewshot.english_means([*runs, *more], ["probe", "setfit"])[(8, "setfit")]
    assert (mean, sets, cells) == pytest.approx(((0.5 + 0.95) / 2, 2, 4))


def test_reports_are_written(tmp_path: Path) -> None:
    methods = ["default", "probe", "setfit"]
    payload = {"model": "m", "dev_per_label": 8, "max_test": 1000, "torch_threads": 1, "runs": _runs()}
    fewshot.write_outputs(tmp_path, payload, methods)
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    assert len(saved["runs"]) == 18 and len(saved["summary"]) == 9
    md = (tmp_path / "fewshot.md").read_text()
    assert "| sst2 | 8 | 0.700 | 0.650 | not installed |" in md
    assert (
        "| **mean, English (the same runs)** | 8 | **0.800** (2 sets, 4 runs) | "
        "**0.750** (2 sets, 4 runs) | – |" in md
    )
    assert "| trec | 8 | 2.5 | 2.5 | – |" in md
    message = fewshot.plot(saved["runs"], methods, tmp_path / "fewshot.png")
    assert message.startswith("plot skipped") or (tmp_path / "fewshot.png").stat().st_size > 0


def test_plot_series_spread_over_seeds_and_the_english_mean_of_the_main_lines() -> None:
    ablation = {"dataset": "sst2", "k": 8, "seed": 0, "method": "default_nolora", "accuracy": 0.2}
    finetune = {"dataset": "trec", "k": 64, "seed": 0, "method": "finetune", "accuracy": 0.99}
    methods = ["default", "probe", "setfit", "default_nolora", "finetune"]
    panels = fewshot.plot_series([*_runs(), ablation, finetune], methods)
    assert list(panels) == ["sst2", "trec", "comment_zh", fewshot.MEAN_PANEL]
    # Seeds 0 and 1 differ by 0.1: mean in the middle, population spread 0.05; SetFit did not run.
    assert panels["sst2"]["default"] == [pytest.approx((8, 0.7, 0.05))]
    assert panels["sst2"]["probe"] == [pytest.approx((8, 0.65, 0.05))]
    assert panels["sst2"]["default_nolora"] == [pytest.approx((8, 0.2, 0.0))]
    assert "setfit" not in panels["sst2"] and panels["trec"]["finetune"] == [pytest.approx((64, 0.99, 0.0))]
    # The English mean: SST-2 and TREC (comment_zh is not English), the main lines only, no fine-tuning.
    assert panels[fewshot.MEAN_PANEL] == {
        "default": [pytest.approx((8, 0.8, 0.0))],
        "probe": [pytest.approx((8, 0.75, 0.0))],
    }


def test_each_column_against_default_row_uses_every_run_the_two_have() -> None:
    """A third method run on fewer seeds shrinks the all-methods mean; the row of each column against
    the default keeps every run those two share (the target compares default with SetFit), and is left
    out when it would repeat the all-methods row."""
    setfit = {"k": 8, "method": "setfit", "macro_f1": 0.9, "seconds": 1.0}
    runs = [r for r in _runs() if r["method"] != "setfit"]
    runs = [r for r in runs if not (r["method"] == "probe" and r["seed"] == 1)]
    runs += [{**setfit, "dataset": d, "seed": s, "accuracy": 0.9} for d in ("sst2", "trec") for s in (0, 1)]
    md = fewshot.markdown(runs, ["default", "probe", "setfit"], "# t")
    # default: sst2 0.65 / 0.75, trec 0.85 / 0.95 -> seed 0 only 0.75, both seeds 0.80
    assert "| **mean, English (the same runs)** | 8 | **0.750** (2 sets, 2 runs) | " in md
    assert (
        "| **mean, English: each column / default (the runs the two have)** | 8 | – | "
        "**0.700** / 0.750 (2 sets, 2 runs) | **0.900** / 0.800 (2 sets, 4 runs) |" in md
    )
    full = [*runs, *({**r, "seed": 1, "accuracy": 0.5} for r in runs if r["method"] == "probe")]
    assert "each column / default" not in fewshot.markdown(full, ["default", "probe", "setfit"], "# t")


def test_a_column_sharing_no_cell_is_left_out_of_the_same_runs_row() -> None:
    """Full fine-tuning on banking77 alone, where SetFit never ran, shares no cell with SetFit: it is
    left out of the all-methods row (which compares the rest on their shared cells) and still compared
    with the default on its own runs."""
    setfit = {"k": 8, "method": "setfit", "macro_f1": 0.9, "seconds": 1.0}
    runs = [r for r in _runs() if r["method"] != "setfit"]
    runs += [{**setfit, "dataset": d, "seed": s, "accuracy": 0.9} for d in ("sst2", "trec") for s in (0, 1)]
    banking = {"dataset": "banking77", "k": 8, "seed": 0, "macro_f1": 0.9, "seconds": 1.0}
    runs += [
        {**banking, "method": "default", "accuracy": 0.6},
        {**banking, "method": "finetune", "accuracy": 0.7},
    ]
    methods = ["default", "probe", "setfit", "finetune"]
    means = fewshot.english_means(runs, methods)
    assert (8, "finetune") not in means
    assert means[(8, "default")] == pytest.approx((0.8, 2, 4)) and means[(8, "setfit")] == pytest.approx(
        (0.9, 2, 4)
    )
    md = fewshot.markdown(runs, methods, "# t")
    assert (
        "| **mean, English (the same runs)** | 8 | **0.800** (2 sets, 4 runs) | **0.750** (2 sets, 4 runs) | "
        "**0.900** (2 sets, 4 runs) | – |" in md
    )
    assert md.count("**0.700** / 0.600 (1 set, 1 run)") == 1  # finetune against default on banking77
    # Two columns of as many runs on different sets: the later one is left out.
    disjoint = [
        r for r in _runs() if r["method"] == "default" or (r["method"] == "probe" and r["dataset"] == "trec")
    ]
    disjoint += [{**setfit, "dataset": "sst2", "seed": s, "accuracy": 0.9} for s in (0, 1)]
    means = fewshot.english_means(disjoint, ["default", "probe", "setfit"])
    # default: sst2 0.65 / 0.75, trec 0.85 / 0.95; probe trec 0.80 / 0.90
    assert means == {(8, "default"): pytest.approx((0.9, 1, 2)), (8, "probe"): pytest.approx((0.85, 1, 2))}
    # Each column against the default still reads every run the two share.
    assert (
        "| **mean, English: each column / default (the runs the two have)** | 8 | – | "
        "**0.850** / 0.900 (1 set, 2 runs) | **0.900** / 0.700 (1 set, 2 runs) |"
        in fewshot.markdown(disjoint, ["default", "probe", "setfit"], "# t")
    )


def test_ablations_get_their_own_table_beside_the_default() -> None:
    """The issue's columns stay one readable table; an ablation that ran gets a second table with the
    default beside it, and one that never ran gets no column."""
    ablation = [
        {"dataset": "sst2", "k": 8, "seed": s, "method": "default_nolora", "accuracy": 0.5, "macro_f1": 0.5}
        | {"seconds": 9.0}
        for s in (0, 1)
    ]
    md = fewshot.markdown([*_runs(), *ablation], ["default", "probe", "default_nolora", "pairs"], "# t")
    main, rest = md.split("### Earlier defaults and ablations")[:2]
    assert "| dataset | K | ptserve default (auto) | linear probe (fitted) |" in main
    assert "| sst2 | 8 | 0.700 | 0.650 |" in main and "no LoRA" not in main.split("Training seconds")[0]
    assert "| dataset | K | ptserve default (auto) | default, no LoRA |" in rest
    assert "| sst2 | 8 | 0.700 | 0.500 |" in rest and "| trec | 8 | 0.900 | not run |" in rest
    assert "pairs" not in md.replace("pairs,", "")  # never run: no column
    assert md.count("Training seconds") == 1 and "| sst2 | 8 | 2.5 | 9.0 |" in md.split("Training seconds")[1]
