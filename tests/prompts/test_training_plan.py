"""Method "auto": the method and schedule chosen from the data's size, recorded in the manifest, and the
few-shot pieces it turns on (the pairs objective; the robust choice of the kept epoch where labels or a
head the pairs cannot fit were asked for)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest
import torch

from prompts.backbone import Backbone, load_backbone
from prompts.data import Example, TaskData
from prompts.errors import InvalidInputError
from prompts.jobs import JobSpec, ProbeHead
from prompts.trainer import (
    AUTO_LORA_FROM_LABELS,
    AUTO_LORA_FROM_ROWS_PER_LABEL,
    AUTO_LORA_RANK,
    AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL,
    AUTO_LORA_WIDE_RANK,
    AUTO_PROBE_HEAD,
    FEW_SHOT_ROWS_PER_LABEL,
    LORA_LR,
    PROBE_HEADS,
    PROBE_Z,
    REFINE_EPOCHS,
    REFINE_FROM_ROWS_PER_LABEL,
    STANDARDIZED_HEAD_FROM_LABELS,
    EpochStats,
    NullProgress,
    TrainConfig,
    mcnemar_z,
    plan_for_data,
    train_task,
)
from prompts.training import job_train_config, make_train_config
from tests.synthetic import make_learnable_bert, make_task_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(per_label: int, labels: int = 2) -> TaskData:
    names = [f"l{i}" for i in range(labels)]
    train = [Example(f"text {i} {name}", name) for name in names for i in range(per_label)]
    dev = [Example(f"dev {name}", name) for name in names]
    return TaskData(labels=names, train=train, dev=dev, source="made up")


def test_auto_keeps_todays_defaults_from_the_threshold_up() -> None:
    planned = plan_for_data(TrainConfig(method="auto"), _data(FEW_SHOT_ROWS_PER_LABEL))
    assert planned == dataclasses.replace(TrainConfig(method="p-tuning-v2"), plan=planned.plan)
    assert planned.plan is not None and planned.plan["regime"] == "full"
    assert planned.plan["train_rows_per_label"] == FEW_SHOT_ROWS_PER_LABEL
    resolved = planned.resolved()
    assert (resolved.epochs, resolved.patience, resolved.lr) == (30, 5, 1e-2)


def test_auto_below_the_threshold_trains_on_pairs() -> None:
    planned = plan_for_data(TrainConfig(method="auto"), _data(FEW_SHOT_ROWS_PER_LABEL - 1, 4))
    assert planned == dataclasses.replace(
        TrainConfig(method="p-tuning-v2"),
        objective="pairs",
        refine_epochs=0,  # 4 labels: the pass alone, at any few-shot size
        scales=True,
        lora_rank=0,  # fewer than 5 labels
        pair_loss="sampled",  # no refinement follows the pass
        pair_head="prototype",  # 4 labels: no wide LoRA beside it
        plan=planned.plan,
    )
    assert planned.plan is not None and planned.plan["regime"] == "few-shot"
    assert planned.plan["objective"] == "pairs"
    assert planned.plan["train_rows_per_label"] == FEW_SHOT_ROWS_PER_LABEL - 1
    assert planned.plan["dev_rows"] == 4
    resolved = planned.resolved()
    assert (resolved.epochs, resolved.prefix_init, resolved.objective) == (1, "random", "pairs")
    # A head the pairs can give is kept.
    assert plan_for_data(TrainConfig(method="auto", head="cls"), _data(8)).objective == "pairs"


@pytest.mark.parametrize(
    ("per_label", "labels", "lora_rank", "head"),
    [
        (8, STANDARDIZED_HEAD_FROM_LABELS, None, "standardized"),  # no LoRA below 12 rows per label
        (8, STANDARDIZED_HEAD_FROM_LABELS - 1, None, "prototype"),
        (AUTO_LORA_FROM_ROWS_PER_LABEL, 6, None, "standardized"),  # rank-8 LoRA, sampled pairs
        (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL, 6, None, "standardized"),  # the wide LoRA
        (REFINE_FROM_ROWS_PER_LABEL, 6, None, "standardized"),
        (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL, 6, 4, "standardized"),
        (REFINE_FROM_ROWS_PER_LABEL, 6, 0, "prototype"),  # refined: starts from the prototypes
        (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL, 6, 0, "standardized"),  # no LoRA, no refinement below 48
        (FEW_SHOT_ROWS_PER_LABEL - 1, STANDARDIZED_HEAD_FROM_LABELS - 1, None, "prototype"),
        (FEW_SHOT_ROWS_PER_LABEL - 1, 2, None, "prototype"),
    ],
)
def test_auto_fits_the_standardized_head_on_many_labels_unrefined(
    per_label: int, labels: int, lora_rank: int | None, head: str
) -> None:
    planned = plan_for_data(TrainConfig(method="auto", lora_rank=lora_rank), _data(per_label, labels))
    assert planned.pair_head == head and planned.plan is not None and planned.plan["pair_head"] == head
    standardized = labels >= STANDARDIZED_HEAD_FROM_LABELS and planned.refine_epochs == 0
    assert (head == "standardized") == standardized
    words = "logistic regression on standardised vectors" if head == "standardized" else "label prototypes"
    assert words in planned.plan["reason"]
    assert planned.resolved().pair_head == head


def test_a_pair_head_asked_for_is_kept() -> None:
    for head in ("prototype", "logistic", "standardized"):
        for per_label, labels in ((8, 3), (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL, 6)):
            planned = plan_for_data(TrainConfig(method="auto", pair_head=head), _data(per_label, labels))
            assert (
                planned.pair_head == head and planned.plan is not None and planned.plan["pair_head"] == head
            )
    # Outside "auto" a pass fits the prototypes unless told otherwise.
    assert TrainConfig(method="p-tuning-v2", objective="pairs").resolved().pair_head == "prototype"
    with pytest.raises(ValueError, match="pair_head must be one of 'prototype', 'logistic', 'standardized'"):
        TrainConfig(method="p-tuning-v2", objective="pairs", pair_head="svm").resolved()


def test_auto_refines_the_pairs_only_on_many_labels_without_lora() -> None:
    below = plan_for_data(TrainConfig(method="auto"), _data(REFINE_FROM_ROWS_PER_LABEL - 1, 4))
    assert below.refine_epochs == 0 and below.plan is not None and below.plan["refine_epochs"] == 0
    assert "no epoch is chosen" in below.plan["reason"]
    # Every few-shot pairs plan trains (IA)^3 scales beside the prefix, refined or not; full data does not.
    assert below.scales is True and below.plan["scales"] is True and "(IA)^3" in below.plan["reason"]
    refined = plan_for_data(TrainConfig(method="auto"), _data(REFINE_FROM_ROWS_PER_LABEL, 4))
    assert refined.scales is True and refined.plan is not None and refined.plan["scales"] is True
    full = plan_for_data(TrainConfig(method="auto"), _data(FEW_SHOT_ROWS_PER_LABEL, 4))
    assert full.scales is None and full.plan is not None and "scales" not in full.plan
    asked_off = plan_for_data(TrainConfig(method="auto", scales=False), _data(8))
    assert (
        asked_off.scales is False and asked_off.plan is not None and "(IA)^3" not in asked_off.plan["reason"]
    )
    asked_off = plan_for_data(TrainConfig(method="auto", scales=False), _data(REFINE_FROM_ROWS_PER_LABEL, 4))
    assert asked_off.scales is False
    with pytest.raises(ValueError, match="linear probe trains on features pooled once"):
        TrainConfig(method="linear-probe", scales=True).resolved()
    with pytest.raises(InvalidInputError, match="linear probe"):
        make_train_config("probe", scales=True)
    with pytest.raises(InvalidInputError, match="PEFT adapter holds no"):
        make_train_config("prefix", scales=True, head="peft")
    # The pass alone reads the sampled pairs; a pass the refinement follows, every pair of its rows.
    # Refined: from 48 rows per label, tasks of 5 labels or more whose LoRA is turned off. Not refined:
    # fewer labels (SST-2's 2, AG News's 4) at any size, fewer rows per label, or the LoRA left on.
    assert below.plan["pair_loss"] == below.resolved().pair_loss == "sampled"
    for per_label, labels, lora_rank, refined_expected in (
        (REFINE_FROM_ROWS_PER_LABEL, 5, 0, True),
        (FEW_SHOT_ROWS_PER_LABEL - 1, 77, 0, True),
        (REFINE_FROM_ROWS_PER_LABEL - 1, 5, 0, False),
        (REFINE_FROM_ROWS_PER_LABEL, 4, 0, False),
        (FEW_SHOT_ROWS_PER_LABEL - 1, 2, 0, False),
        (FEW_SHOT_ROWS_PER_LABEL - 1, 4, None, False),
        (REFINE_FROM_ROWS_PER_LABEL, 6, None, False),
    ):
        planned = plan_for_data(TrainConfig(method="auto", lora_rank=lora_rank), _data(per_label, labels))
        epochs = REFINE_EPOCHS if refined_expected else 0
        assert (planned.objective, planned.refine_epochs) == ("pairs", epochs)
        assert planned.plan is not None and planned.plan["refine_epochs"] == epochs
        assert ("cross-entropy" in planned.plan["reason"]) == refined_expected
        assert ("no epoch is chosen" in planned.plan["reason"]) == (not refined_expected)
        loss = "in-batch" if refined_expected or planned.lora_rank == AUTO_LORA_WIDE_RANK else "sampled"
        assert planned.plan["pair_loss"] == planned.resolved().pair_loss == loss
    enough = _data(REFINE_FROM_ROWS_PER_LABEL, 6)
    asked = plan_for_data(TrainConfig(method="auto", lora_rank=0, pair_loss="sampled"), enough)
    assert asked.refine_epochs == REFINE_EPOCHS and asked.plan is not None
    assert asked.plan["pair_loss"] == asked.resolved().pair_loss == "sampled"
    # A refinement asked for is kept on any task.
    asked = plan_for_data(TrainConfig(method="auto", refine_epochs=3), _data(REFINE_FROM_ROWS_PER_LABEL, 2))
    assert asked.refine_epochs == 3 and asked.resolved().pair_loss == "in-batch"
    with pytest.raises(ValueError, match="refine_epochs continues objective 'pairs'"):
        TrainConfig(method="p-tuning-v2", refine_epochs=3).resolved()
    with pytest.raises(ValueError, match="refine_epochs must be >= 0"):
        TrainConfig(method="p-tuning-v2", objective="pairs", refine_epochs=-1).resolved()


def test_auto_trains_lora_on_few_shot_tasks_of_enough_labels() -> None:
    assert (AUTO_LORA_FROM_LABELS, AUTO_LORA_FROM_ROWS_PER_LABEL) == (5, 12)
    assert (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL, AUTO_LORA_WIDE_RANK) == (24, 16)
    # (rows per label, labels, rank, pair loss): K=16, 32 and 64 of 6 labels (TREC, emotion), each
    # threshold itself and the size below it, many labels, and the refinement's sizes, where the wide
    # LoRA's pass is not refined.
    for per_label, labels, rank, loss in (
        (16, 6, AUTO_LORA_RANK, "sampled"),
        (12, 5, AUTO_LORA_RANK, "sampled"),
        (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL - 1, 5, AUTO_LORA_RANK, "sampled"),
        (AUTO_LORA_WIDE_FROM_ROWS_PER_LABEL, 5, 16, "in-batch"),
        (32, 6, 16, "in-batch"),
        (32, 77, 16, "in-batch"),
        (REFINE_FROM_ROWS_PER_LABEL, 5, 16, "in-batch"),
        (64, 6, 16, "in-batch"),
        (FEW_SHOT_ROWS_PER_LABEL - 1, 6, 16, "in-batch"),
    ):
        planned = plan_for_data(TrainConfig(method="auto"), _data(per_label, labels))
        assert planned.lora_rank == rank and planned.plan is not None
        assert planned.plan["train_rows"] == per_label * labels
        assert planned.plan["lora_rank"] == rank and f"rank-{rank} LoRA" in planned.plan["reason"]
        assert planned.refine_epochs == planned.plan["refine_epochs"] == 0
        assert "no epoch is chosen" in planned.plan["reason"]
        assert planned.resolved().lora_lr == LORA_LR
        assert planned.plan["pair_loss"] == planned.resolved().pair_loss == loss
        assert ("every pair of each step's rows" in planned.plan["reason"]) == (loss == "in-batch")
    # A pair loss or rank asked for is kept; without LoRA, or with a refinement asked for, the wide
    # band trains the prefix and scales alone (the sampled pairs below 48 rows per label, the
    # refinement from there).
    asked_loss = plan_for_data(TrainConfig(method="auto", pair_loss="sampled"), _data(32, 6))
    assert (asked_loss.lora_rank, asked_loss.resolved().pair_loss) == (16, "sampled")
    asked_rank = plan_for_data(TrainConfig(method="auto", lora_rank=4), _data(64, 6))
    assert (asked_rank.lora_rank, asked_rank.refine_epochs, asked_rank.resolved().pair_loss) == (
        4,
        0,
        "in-batch",
    )
    no_lora = plan_for_data(TrainConfig(method="auto", lora_rank=0), _data(32, 6))
    assert (no_lora.lora_rank, no_lora.refine_epochs, no_lora.resolved().pair_loss) == (0, 0, "sampled")
    no_lora = plan_for_data(TrainConfig(method="auto", lora_rank=0), _data(64, 6))
    assert (no_lora.lora_rank, no_lora.refine_epochs, no_lora.resolved().pair_loss) == (
        0,
        REFINE_EPOCHS,
        "in-batch",
    )
    refined = plan_for_data(TrainConfig(method="auto", refine_epochs=3), _data(32, 6))
    assert (refined.lora_rank, refined.refine_epochs, refined.resolved().pair_loss) == (0, 3, "in-batch")
    # Too few labels (SST-2's 2, AG News's 4, at any few-shot size) and too few rows per label (K=8 of
    # 6 labels, 11 of 77): no LoRA, and no refinement: the pass alone on the sampled pairs.
    for per_label, labels in (
        (32, 2),
        (16, 4),
        (32, 4),
        (REFINE_FROM_ROWS_PER_LABEL - 1, 4),
        (REFINE_FROM_ROWS_PER_LABEL, 4),
        (FEW_SHOT_ROWS_PER_LABEL - 1, 2),
        (8, 6),
        (11, 77),
    ):
        below = plan_for_data(TrainConfig(method="auto"), _data(per_label, labels))
        assert below.lora_rank == 0 and below.plan is not None and below.plan["lora_rank"] == 0
        assert "LoRA" not in below.plan["reason"] and below.resolved().lora_lr is None
        assert below.refine_epochs == below.plan["refine_epochs"] == 0
        assert below.resolved().pair_loss == "sampled"
    asked = plan_for_data(TrainConfig(method="auto", lora_rank=8), _data(8))
    assert asked.lora_rank == 8 and asked.plan is not None and "rank-8 LoRA" in asked.plan["reason"]
    full = plan_for_data(TrainConfig(method="auto"), _data(FEW_SHOT_ROWS_PER_LABEL, 4))
    assert full.lora_rank is None and full.plan is not None and "lora_rank" not in full.plan
    assert full.resolved().lora_lr is None
    off = plan_for_data(TrainConfig(method="auto", lora_rank=0), _data(32))
    assert off.lora_rank == 0 and off.plan is not None and "LoRA" not in off.plan["reason"]
    other = plan_for_data(TrainConfig(method="auto", lora_rank=4, lora_lr=3e-3), _data(8))
    assert (other.lora_rank, other.resolved().lora_lr) == (4, 3e-3)
    asked = plan_for_data(TrainConfig(method="auto", lora_rank=8), _data(REFINE_FROM_ROWS_PER_LABEL, 4))
    assert asked.lora_rank == 8 and asked.refine_epochs == 0  # the rank asked for is kept, unrefined
    # Labels asked for: cross-entropy with the robust epoch and no LoRA unless asked.
    assert plan_for_data(TrainConfig(method="auto", objective="labels"), _data(8)).lora_rank is None
    with pytest.raises(ValueError, match="linear probe trains on features pooled once"):
        TrainConfig(method="linear-probe", lora_rank=4).resolved()
    with pytest.raises(InvalidInputError, match="PEFT prompt adapter holds no LoRA"):
        make_train_config("prefix", lora_rank=4, head="peft")
    with pytest.raises(InvalidInputError, match="lora_rank must be 0"):
        make_train_config("prefix", lora_rank=-1)
    job = {"task": "t", "train": [{"text": "a", "label": "x"}], "hyperparameters": {"lora_rank": 2}}
    spec = JobSpec.model_validate(job)
    assert job_train_config(spec).lora_rank == 2


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"head": "peft"}, "head 'peft'"),
        ({"objective": "labels"}, "labels"),
        ({"epochs": 4}, "epochs, patience or head_lr"),
        ({"head_lr": 0.1}, "epochs, patience or head_lr"),
    ],
)
def test_auto_few_shot_with_labels_or_a_peft_head_keeps_cross_entropy(
    changes: dict[str, str], why: str
) -> None:
    """PEFT export needs PEFT's own head, which the pairs' logistic regression is not."""
    planned = plan_for_data(dataclasses.replace(TrainConfig(method="auto"), **changes), _data(8))  # type: ignore[arg-type]
    assert planned.objective in (None, "labels") and planned.selection == "robust"
    assert (
        planned.plan is not None and planned.plan["objective"] == "labels" and why in planned.plan["reason"]
    )


def test_auto_keeps_what_the_caller_set_and_leaves_other_methods_alone() -> None:
    planned = plan_for_data(TrainConfig(method="auto", epochs=7, patience=2, lr=0.5), _data(8))
    assert (planned.epochs, planned.patience, planned.lr, planned.method) == (7, 2, 0.5, "p-tuning-v2")
    prefix = TrainConfig(method="p-tuning-v2")
    assert plan_for_data(prefix, _data(8)) is prefix
    verbalizer = plan_for_data(TrainConfig(method="auto", head="verbalizer"), _data(8))
    assert verbalizer.method == "p-tuning" and verbalizer.plan is not None


def test_auto_is_the_default_of_jobs_and_is_checked_like_the_others() -> None:
    spec = JobSpec.model_validate({"task": "t", "train": [{"text": "a", "label": "x"}]})
    assert spec.method == "auto" and job_train_config(spec).method == "auto"
    assert make_train_config("auto", epochs=3).epochs == 3
    with pytest.raises(InvalidInputError, match="batch_size"):
        make_train_config("auto", batch_size=0)
    with pytest.raises(ValueError, match="plan_for_data"):
        TrainConfig(method="auto").resolved()


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(make_learnable_bert(tmp_path_factory.mktemp("models") / "learnable"))


TINY = TrainConfig(batch_size=16, lr=0.05, head_lr=0.05, prefix_length=4)
# What "auto" is given to train pairs: no epochs, patience or head_lr (those ask for cross-entropy).
TINY_AUTO = TrainConfig(method="auto", batch_size=16, lr=0.05, prefix_length=4, pair_iterations=4)


def test_auto_on_few_rows_trains_pairs_and_records_the_plan(learnable: Backbone) -> None:
    data = make_task_data(train=12, dev=6, test=6)  # 4 rows per label: few-shot
    result = train_task(learnable, "tiny", data, TINY_AUTO)
    training = result.artifact.manifest.training
    assert training is not None
    plan = training["plan"]
    assert (
        plan["regime"] == "few-shot" and plan["train_rows_per_label"] == 4.0 and plan["objective"] == "pairs"
    )
    # The probe was the other candidate; what was kept follows McNemar's z on the dev rows.
    assert set(plan["candidates"]) == {"p-tuning-v2", "linear-probe"}
    right = plan["dev_disagreements"]
    b, c = right["probe_right"], right["pairs_right"]
    assert plan["mcnemar_z"] == pytest.approx((b - c) / (b + c) ** 0.5 if b + c else 0.0, abs=1e-3)
    assert plan["kept"] == ("linear-probe" if plan["mcnemar_z"] >= PROBE_Z else "p-tuning-v2")
    assert training["method"] == result.artifact.manifest.method == plan["kept"] == "p-tuning-v2"
    assert training["hyperparameters"]["objective"] == "pairs" and result.config.plan == plan
    # With (IA)^3 scales beside the prefix, as the plan says; the artifact holds them.
    assert plan["scales"] is True and training["hyperparameters"]["scales"] is True
    assert result.artifact.manifest.scales == "ia3"
    spec = learnable.spec
    assert result.artifact.tensors["scales"].shape == (spec.num_layers, spec.scales_width)
    assert not torch.equal(result.artifact.tensors["scales"], torch.ones(spec.num_layers, spec.scales_width))
    # No LoRA: three labels and 4 rows per label are below both AUTO_LORA_FROM_LABELS and
    # AUTO_LORA_FROM_ROWS_PER_LABEL.
    assert plan["lora_rank"] == 0 and "lora_rank" not in training["hyperparameters"]
    assert result.artifact.manifest.lora is None
    assert training["duration_seconds"] == round(result.seconds, 2)
    assert training["duration_seconds"] == pytest.approx(
        sum(c["seconds"] for c in plan["candidates"].values()), abs=0.02
    )
    # Scored on test on the artifact's own tensors.
    metrics = result.artifact.manifest.metrics
    assert result.test is not None and metrics is not None
    assert metrics["test"]["accuracy"] == pytest.approx(result.test.accuracy)
    # The other paths' manifests are as they were: no plan, no new hyperparameters.
    plain = train_task(learnable, "tiny", data, dataclasses.replace(TINY, method="p-tuning-v2", epochs=1))
    plain_training = plain.artifact.manifest.training or {}
    assert "plan" not in plain_training
    assert not {"selection", "objective", "pair_iterations", "scales", "lora_rank", "lora_lr"} & set(
        plain_training["hyperparameters"]
    )
    assert plain.artifact.manifest.scales is None and "scales" not in plain.artifact.tensors
    assert plain.artifact.manifest.lora is None
    assert plain_training["hyperparameters"]["prefix_init"] == "tokens"


def test_lora_is_trained_and_recorded_where_asked(learnable: Backbone) -> None:
    data = make_task_data(train=12, dev=6, test=6)
    result = train_task(learnable, "tiny", data, dataclasses.replace(TINY_AUTO, lora_rank=8))
    training = result.artifact.manifest.training or {}
    assert training["plan"]["lora_rank"] == 8 and training["hyperparameters"]["lora_rank"] == 8
    assert training["hyperparameters"]["lora_lr"] == LORA_LR
    lora = result.artifact.manifest.lora
    assert lora is not None and lora.rank == 8
    assert lora.targets == list(learnable.family.lora_targets(learnable.spec.shape()))
    # Trained: every target's "up" moved from its zero start.
    for target in lora.targets:
        assert result.artifact.tensors[f"lora.{target}.up"].abs().max() > 0
    # Scored on test through the artifact's own tensors, LoRA included.
    metrics = result.artifact.manifest.metrics
    assert result.test is not None and metrics is not None
    assert metrics["test"]["accuracy"] == pytest.approx(result.test.accuracy)


def test_auto_on_enough_rows_trains_prefix_only(learnable: Backbone) -> None:
    data = make_task_data(train=3 * FEW_SHOT_ROWS_PER_LABEL, dev=6, test=6)
    result = train_task(learnable, "tiny", data, dataclasses.replace(TINY, method="auto", epochs=1))
    training = result.artifact.manifest.training or {}
    assert training["method"] == "p-tuning-v2" and training["plan"]["regime"] == "full"
    assert "candidates" not in training["plan"] and "selection" not in training["hyperparameters"]


def test_refined_pairs_train_cross_entropy_after_the_pass_and_keep_the_best_dev_epoch(
    learnable: Backbone,
) -> None:
    data = make_task_data(train=12, dev=12, test=12)
    pairs = TrainConfig(method="p-tuning-v2", objective="pairs", batch_size=16, lr=0.05, prefix_length=4)
    config = dataclasses.replace(pairs, pair_iterations=2, refine_epochs=3)
    epochs: list[int] = []

    class Epochs(NullProgress):
        def epoch(self, stats: EpochStats) -> None:
            epochs.append(stats.epoch)

    result = train_task(learnable, "tiny", data, config, progress=Epochs())
    # Epoch 1 is the pass over the pairs; 2.. the cross-entropy epochs, numbered on.
    assert [h.epoch for h in result.history] == epochs == list(range(1, result.epochs_run + 1))
    assert 2 <= result.epochs_run <= 4 and 2 <= result.best_epoch <= result.epochs_run
    assert [h.seconds for h in result.history] == sorted(h.seconds for h in result.history)
    kept = result.history[result.best_epoch - 1]
    assert kept.dev_accuracy == max(h.dev_accuracy for h in result.history[1:])
    assert result.dev.accuracy == pytest.approx(kept.dev_accuracy)  # the artifact is the kept epoch
    training = result.artifact.manifest.training or {}
    assert training["hyperparameters"]["refine_epochs"] == 3
    assert training["hyperparameters"]["pair_loss"] == "in-batch"
    assert training["duration_seconds"] == round(result.seconds, 2)
    assert result.seconds >= result.history[-1].seconds - 1e-6
    # Without it the pass alone, as before, and nothing new in the manifest.
    alone = train_task(learnable, "tiny", data, dataclasses.replace(config, refine_epochs=0))
    alone_training = alone.artifact.manifest.training or {}
    assert alone.epochs_run == 1 and "refine_epochs" not in alone_training["hyperparameters"]
    assert alone_training["hyperparameters"]["pair_loss"] == "sampled"


def test_robust_selection_keeps_the_later_epoch_on_ties(learnable: Backbone) -> None:
    """Nothing trains (both learning rates 0): every epoch ties on dev. "dev" keeps epoch 1 (as before);
    "robust" keeps the last, which on real data is the one that trained longest."""
    data = make_task_data(train=12, dev=6, test=6)
    frozen = dataclasses.replace(TINY, method="p-tuning-v2", lr=0.0, head_lr=0.0, epochs=3, patience=10)
    assert train_task(learnable, "tiny", data, frozen).best_epoch == 1
    robust = train_task(learnable, "tiny", data, dataclasses.replace(frozen, selection="robust"))
    assert robust.best_epoch == robust.epochs_run == 3


def test_cli_default_is_auto(tmp_path: Path) -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(["train", "--task", "t", "--data", str(tmp_path)])
    assert args.method == "auto"


def test_auto_with_a_search_grid_searches_the_planned_objective(learnable: Backbone) -> None:
    from prompts.training import SearchGrid, run_training

    data = make_task_data(train=12, dev=6, test=6)
    config = dataclasses.replace(TINY_AUTO, pair_iterations=2)
    result = run_training(learnable, "tiny", data, config, grid=SearchGrid([0.05, 0.1], [4]))
    training = result.artifact.manifest.training or {}
    assert training["method"] == "p-tuning-v2" and len(result.trials) == 2
    assert training["plan"]["regime"] == "few-shot" and training["plan"]["objective"] == "pairs"
    assert training["hyperparameters"]["objective"] == "pairs"
    assert {t["lr"] for t in result.trials} == {0.05, 0.1}


def test_mcnemar_z_counts_only_the_rows_the_two_disagree_on() -> None:
    first = [True, True, False, False, False, True, False]
    second = [True, False, True, True, True, True, False]
    assert mcnemar_z(first, second) == (pytest.approx(1.0), 3, 1)  # (3 - 1) / sqrt(4)
    assert mcnemar_z(second, first) == (pytest.approx(-1.0), 1, 3)
    assert mcnemar_z(first, first) == (0.0, 0, 0)
    with pytest.raises(ValueError, match="same rows"):
        mcnemar_z(first, second[:-1])


# A prefix learning rate that wrecks the pairs' prefix (the probe has none), so the probe is the better
# candidate: whether auto keeps it is then up to how much the dev rows can show.
WRECKED = dataclasses.replace(TINY_AUTO, lr=100.0, pair_iterations=1)


def test_auto_keeps_the_probe_where_many_dev_rows_show_it_is_better(learnable: Backbone) -> None:
    data = make_task_data(train=12, dev=240, test=30)
    result = train_task(learnable, "tiny", data, WRECKED)
    plan = (result.artifact.manifest.training or {})["plan"]
    candidates = plan["candidates"]
    assert candidates["linear-probe"]["dev_accuracy"] > candidates["p-tuning-v2"]["dev_accuracy"]
    assert plan["mcnemar_z"] >= PROBE_Z and plan["kept"] == "linear-probe"
    assert result.artifact.manifest.method == "linear-probe" and "prefix" not in result.artifact.tensors
    # The candidate's head is the standardised fit, recorded in the plan and the hyperparameters.
    assert plan["probe_head"] == AUTO_PROBE_HEAD == "standardized"
    hyperparameters = (result.artifact.manifest.training or {})["hyperparameters"]
    assert hyperparameters["probe_head"] == "standardized" and "epochs" not in hyperparameters
    assert result.test is not None and result.artifact.manifest.metrics is not None
    assert result.artifact.manifest.metrics["test"]["accuracy"] == pytest.approx(result.test.accuracy)


def test_auto_keeps_the_pairs_where_a_few_dev_rows_cannot_tell(learnable: Backbone) -> None:
    """Three dev rows: even if the probe gets all three right and the pairs none, z = sqrt(3) < 3."""
    data = make_task_data(train=12, dev=3, test=30)
    result = train_task(learnable, "tiny", data, WRECKED)
    plan = (result.artifact.manifest.training or {})["plan"]
    assert plan["mcnemar_z"] < PROBE_Z and plan["kept"] == "p-tuning-v2"
    assert result.artifact.manifest.method == "p-tuning-v2" and "prefix" in result.artifact.tensors


def test_a_head_asked_for_has_no_probe_candidate(learnable: Backbone) -> None:
    data = make_task_data(train=12, dev=90, test=6)
    result = train_task(learnable, "tiny", data, dataclasses.replace(WRECKED, head="cls"))
    plan = (result.artifact.manifest.training or {})["plan"]
    assert plan["probe_candidate"] is False and "candidates" not in plan
    assert result.artifact.manifest.method == "p-tuning-v2"


def test_auto_records_the_probe_candidates_head_and_takes_the_one_asked_for() -> None:
    few = _data(8, 77)
    planned = plan_for_data(TrainConfig(method="auto"), few)
    assert planned.plan is not None and planned.plan["probe_head"] == AUTO_PROBE_HEAD
    assert planned.probe_head is None  # the prefix's config does not carry it
    planned.resolved()
    asked = plan_for_data(TrainConfig(method="auto", probe_head="trained"), few)
    assert asked.plan is not None and asked.plan["probe_head"] == "trained"
    # No probe candidate: nothing recorded, and the config still resolves.
    for config, data in (
        (TrainConfig(method="auto", probe_head="trained", head="cls"), few),
        (TrainConfig(method="auto", probe_head="trained"), _data(FEW_SHOT_ROWS_PER_LABEL)),
    ):
        other = plan_for_data(config, data)
        assert other.plan is not None and "probe_head" not in other.plan
        assert other.resolved().probe_head is None


def test_probe_head_is_asked_for_by_the_cli_and_jobs_and_checked_there() -> None:
    assert get_args(ProbeHead) == PROBE_HEADS  # the jobs API's and the CLI's choices are the trainer's
    assert make_train_config("probe", probe_head="standardized").resolved().probe_head == "standardized"
    assert make_train_config("probe").resolved().probe_head == "standardized"  # the default since session 31
    assert make_train_config("probe", probe_head="trained").resolved().probe_head == "trained"
    # Auto passes it to its probe candidate; the prefix it checks against does not carry it.
    assert make_train_config("auto", probe_head="trained").probe_head == "trained"
    with pytest.raises(InvalidInputError, match="use method linear-probe"):
        make_train_config("prefix", probe_head="standardized")
    with pytest.raises(InvalidInputError, match="probe_head must be one of 'trained', 'standardized'"):
        make_train_config("auto", probe_head="svm")
    job = {"task": "t", "train": [{"text": "a", "label": "x"}], "method": "probe"}
    spec = JobSpec.model_validate(job | {"hyperparameters": {"probe_head": "standardized"}})
    assert job_train_config(spec).probe_head == "standardized"
    assert job_train_config(JobSpec.model_validate(job)).probe_head is None
