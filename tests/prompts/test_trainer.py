"""Training every method through prompted_forward, and exporting exactly what was trained."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from prompts.artifact import parse_artifact
from prompts.backbone import Backbone, load_backbone
from prompts.data import Example, TaskData
from prompts.forward import TaskPrompt, prompted_forward
from prompts.pairs import fit_standardized_head
from prompts.trainer import (
    PROBE_HEAD_C,
    EpochStats,
    TrainConfig,
    TrainResult,
    _class_weights,
    eval_batches,
    for_backbone,
    padded_tokens,
    predict,
    search,
    train_task,
)
from tests.factories import random_artifact
from tests.synthetic import make_learnable_bert, make_task_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Fast, decisive settings for the tiny model (the real defaults are tuned for BERT-size backbones).
FAST = TrainConfig(
    epochs=12, batch_size=16, lr=0.05, head_lr=0.05, patience=100, prefix_length=4, prompt_length=4
)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(make_learnable_bert(tmp_path_factory.mktemp("models") / "learnable"))


@pytest.fixture(scope="module")
def data() -> TaskData:
    return make_task_data(train=60, dev=30, test=30)


def test_the_probe_trained_by_epochs_learns_the_keyword_task(learnable: Backbone, data: TaskData) -> None:
    config = dataclasses.replace(FAST, method="linear-probe", probe_head="trained")
    result = train_task(learnable, "probe", data, config)
    losses = [h.train_loss for h in result.history]
    assert len(losses) > 1 and losses[-1] < 0.6 * losses[0], losses
    assert result.dev.accuracy >= 0.75 and result.test is not None and result.test.accuracy >= 0.7
    hp = (result.artifact.manifest.training or {})["hyperparameters"]
    assert "probe_head" not in hp and hp["epochs"] == FAST.epochs  # manifests as before session 31


@pytest.fixture(scope="module")
def trained(learnable: Backbone, data: TaskData) -> dict[str, TrainResult]:
    """Each method trained once for the module (the tests below only inspect the results)."""
    return {
        method: train_task(learnable, f"task-{method}", data, dataclasses.replace(FAST, method=method))
        for method in ("p-tuning-v2", "p-tuning", "prompt-tuning", "linear-probe")
    }


METHODS = ["p-tuning-v2", "p-tuning", "prompt-tuning", "linear-probe"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_the_keyword_task(trained: dict[str, TrainResult], method: str) -> None:
    result = trained[method]
    losses = [h.train_loss for h in result.history]
    if method == "linear-probe":  # its default head is fitted once, not trained by epochs
        assert len(losses) == 1 and result.epochs_run == 1, losses
    else:
        assert losses[-1] < 0.6 * losses[0], losses
    # Three balanced labels: chance is 1/3.
    assert result.dev.accuracy >= 0.75, result.dev
    assert result.test is not None and result.test.accuracy >= 0.7, result.test
    m = result.artifact.manifest
    assert m.method == method and m.labels == ["book", "phone", "shirt"]
    assert m.metrics is not None and m.metrics["dev"]["accuracy"] == pytest.approx(
        result.dev.accuracy, abs=1e-6
    )
    assert set(m.metrics["test"]) >= {"accuracy", "macro_f1", "per_class_f1"}
    assert m.training is not None
    assert m.training["method"] == method and m.training["seed"] == 0 and m.training["train_rows"] == 60
    assert m.training["epochs_run"] == len(result.history) == result.epochs_run
    assert m.training["trainable_parameters"] == result.trainable_parameters > 0
    # The fitted probe head reads no learning rate, so its manifest records none.
    assert m.training["hyperparameters"].get("lr") == (None if method == "linear-probe" else 0.05)
    assert m.training["duration_seconds"] >= 0
    expected = {"p-tuning-v2": (4, 0), "p-tuning": (0, 4), "prompt-tuning": (0, 4), "linear-probe": (0, 0)}
    assert (m.prefix_length, m.prompt_length) == expected[method]
    assert (m.head.pooling, m.head.pooler) == ("mean" if method == "linear-probe" else "cls", "none")


@pytest.mark.parametrize("method", METHODS)
def test_served_artifact_gives_the_trainers_logits(
    trained: dict[str, TrainResult], learnable: Backbone, data: TaskData, method: str
) -> None:
    result = trained[method]
    texts = [e.text for e in data.test[:12]]
    ids = [e.input_ids for e in learnable.encode(texts, 60)]
    module = result.module.eval()
    with torch.no_grad():
        ours = prompted_forward(learnable, ids, [module.task_prompt()] * len(ids))
        # The engine path: uploaded bytes parsed, tensors loaded, run in a batch mixed with another task.
        served = TaskPrompt.from_artifact(
            parse_artifact(result.artifact.data), learnable.device, learnable.dtype
        )
        other = TaskPrompt.from_artifact(
            random_artifact(learnable.spec, num_labels=5, prefix_length=3, prompt_length=2),
            learnable.device,
            learnable.dtype,
        )
        mixed = prompted_forward(learnable, [i for x in ids for i in (x, x)], [served, other] * len(ids))
    torch.testing.assert_close(mixed[0::2, :3], ours, rtol=0, atol=1e-5)
    assert torch.isinf(mixed[0::2, 3:]).all()


def test_training_leaves_the_backbone_frozen(trained: dict[str, TrainResult], learnable: Backbone) -> None:
    assert not learnable.model.training
    assert all(not p.requires_grad and p.grad is None for p in learnable.model.parameters())


def test_same_seed_same_tensors(learnable: Backbone, data: TaskData) -> None:
    config = dataclasses.replace(FAST, epochs=2, method="p-tuning-v2", reparam=True, reparam_hidden=16)
    a = train_task(learnable, "t", data, config).artifact.tensors
    b = train_task(learnable, "t", data, config).artifact.tensors
    c = train_task(learnable, "t", data, dataclasses.replace(config, seed=1)).artifact.tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["prefix"], c["prefix"])


class Recorder:
    def __init__(self) -> None:
        self.total = 0
        self.steps = 0
        self.epochs: list[EpochStats] = []
        self.closed = False

    def start(self, total_steps: int, epochs: int) -> None:
        self.total = total_steps

    def step(self, loss: float) -> None:
        self.steps += 1

    def epoch(self, stats: EpochStats) -> None:
        self.epochs.append(stats)

    def close(self) -> None:
        self.closed = True


def test_early_stopping_restores_the_best_epoch(learnable: Backbone, data: TaskData) -> None:
    # Nothing can improve with zero learning rates: epoch 1 stays best, patience 2 stops after epoch 3.
    config = dataclasses.replace(FAST, method="prompt-tuning", epochs=10, lr=0.0, head_lr=0.0, patience=2)
    recorder = Recorder()
    result = train_task(learnable, "t", data, config, progress=recorder)
    assert result.epochs_run == 3 and result.best_epoch == 1
    assert [s.best for s in recorder.epochs] == [True, False, False]
    assert recorder.total == 4 * 10 and recorder.steps == 4 * 3 and recorder.closed


def test_time_budget_stops_training(learnable: Backbone, data: TaskData) -> None:
    config = dataclasses.replace(FAST, method="p-tuning-v2", max_seconds=0.0)
    recorder = Recorder()
    result = train_task(learnable, "t", data, config, progress=recorder)
    assert result.epochs_run == 1 and recorder.steps == 1


def test_class_balanced_loss_weights() -> None:
    weights = _class_weights([0, 0, 0, 1], 3, torch.device("cpu"))
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 0.0]))


def test_class_balanced_training_on_skewed_data(learnable: Backbone) -> None:
    base = make_task_data(train=90, dev=30, test=0, seed=4)
    skewed = [e for e in base.train if e.label != "book"] + [e for e in base.train if e.label == "book"][:5]
    data = TaskData(labels=base.labels, train=skewed, dev=base.dev)
    config = dataclasses.replace(FAST, method="linear-probe", epochs=60)
    plain = train_task(learnable, "t", data, config)
    result = train_task(learnable, "t", data, dataclasses.replace(config, class_balanced=True))
    # The rare label is found more often when its examples weigh more.
    assert result.dev.per_class["book"].recall > plain.dev.per_class["book"].recall
    assert result.artifact.manifest.training is not None
    assert result.artifact.manifest.training["hyperparameters"]["class_balanced"] is True
    # The fitted head weighs the rows too (it used to ignore the setting).
    fitted = TrainConfig(method="linear-probe", probe_head="standardized")
    plain_fit = train_task(learnable, "t", data, fitted)
    balanced_fit = train_task(learnable, "t", data, dataclasses.replace(fitted, class_balanced=True))
    assert balanced_fit.dev.per_class["book"].recall > plain_fit.dev.per_class["book"].recall
    hp = (balanced_fit.artifact.manifest.training or {})["hyperparameters"]
    assert hp["class_balanced"] is True and hp["probe_head"] == "standardized"


def test_search_keeps_the_best_dev_accuracy(learnable: Backbone, data: TaskData) -> None:
    config = dataclasses.replace(FAST, method="linear-probe", epochs=20, probe_head="trained")
    result = search(learnable, "t", data, config, lrs=[0.0, 0.05], lengths=[8, 16])
    assert [t["lr"] for t in result.trials] == [0.0, 0.05]  # lengths mean nothing to a probe
    assert result.dev.accuracy == max(t["dev_accuracy"] for t in result.trials)
    assert result.config.head_lr == 0.05
    for fitted in (
        dataclasses.replace(config, probe_head="standardized"),
        dataclasses.replace(FAST, method="probe"),
    ):
        # The fitted head reads no learning rate: one trial, not one per lr.
        once = search(learnable, "t", data, fitted, lrs=[0.0, 0.05], lengths=[8, 16])
        assert len(once.trials) == 1 and once.config.probe_head == "standardized"


def test_prompts_must_leave_room_for_text(learnable: Backbone, data: TaskData) -> None:
    with pytest.raises(ValueError, match="leave no room for text"):
        train_task(learnable, "t", data, dataclasses.replace(FAST, method="prompt-tuning", prompt_length=63))


def test_invalid_task_name_is_refused_before_training(learnable: Backbone, data: TaskData) -> None:
    from prompts.errors import InvalidTaskNameError

    with pytest.raises(InvalidTaskNameError):
        train_task(learnable, "Bad Name", data, FAST)


def test_data_labels_drive_the_head(learnable: Backbone, tmp_path: Path) -> None:
    data = TaskData(
        labels=["a", "b", "unused"],
        train=[Example("phone battery", "a"), Example("shirt size", "b")] * 4,
        dev=[Example("phone screen", "a"), Example("shirt color", "b")],
    )
    result = train_task(learnable, "t", data, dataclasses.replace(FAST, method="linear-probe", epochs=2))
    assert result.artifact.manifest.labels == ["a", "b", "unused"]
    assert result.artifact.tensors["head.weight"].shape[0] == 3


def test_prefix_head_follows_the_backbones_declared_pooling(learnable: Backbone, data: TaskData) -> None:
    learnable_pooling = learnable.pooling
    try:
        learnable.pooling = "mean"
        assert for_backbone(TrainConfig(), learnable).resolved().head == "mean"
        assert for_backbone(TrainConfig(head="cls"), learnable).resolved().head == "cls"  # asked for
        assert for_backbone(TrainConfig(method="prompt-tuning"), learnable).resolved().head == "cls"
        assert for_backbone(TrainConfig(method="linear-probe"), learnable).resolved().head == "mean"
        result = train_task(learnable, "pooled", data, dataclasses.replace(FAST, epochs=1))
        assert result.config.head == "mean"
        assert result.artifact.manifest.head.pooling == "mean"
        assert (result.artifact.manifest.training or {})["hyperparameters"]["head"] == "mean"
        learnable.pooling = None
        assert for_backbone(TrainConfig(), learnable).resolved().head == "cls"
    finally:
        learnable.pooling = learnable_pooling


def test_scoring_groups_rows_by_length_and_keeps_their_order(learnable: Backbone) -> None:
    long_text = "phone battery screen great price " * 8
    texts = [long_text if i % 4 == 0 else "a book" if i % 2 else "shirt size okay fine" for i in range(24)]
    ids = [e.input_ids for e in learnable.encode(texts, 60)]
    task = TaskPrompt.from_artifact(random_artifact(learnable.spec), learnable.device, learnable.dtype)
    grouped = predict(learnable, task, ids, batch_size=4)
    # The file-order path: batches of consecutive rows, each padded to its longest.
    with torch.no_grad():
        in_order = torch.cat(
            [
                prompted_forward(learnable, ids[i : i + 4], [task] * len(ids[i : i + 4]))
                for i in range(0, 24, 4)
            ]
        )
    torch.testing.assert_close(grouped, in_order, rtol=0, atol=1e-5)

    lengths = [len(x) for x in ids]
    batches = eval_batches(lengths, 4)
    assert sorted(i for b in batches for i in b) == list(range(24)) and all(len(b) <= 4 for b in batches)
    file_order = [list(range(i, min(i + 4, 24))) for i in range(0, 24, 4)]
    # Every file-order batch holds a long row; sorted, only the long rows' own batches are long.
    assert padded_tokens(lengths, file_order) == 24 * max(lengths)
    assert padded_tokens(lengths, batches) < 0.5 * padded_tokens(lengths, file_order)
    assert padded_tokens(lengths, batches) == sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_probe_duration_includes_its_feature_pass(
    learnable: Backbone, data: TaskData, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that jumps 100 s on each feature pass: the duration must contain both jumps.
    import prompts.trainer as trainer

    skipped = [0.0]
    real_features = trainer._features

    def slow_features(*args: Any, **kwargs: Any) -> torch.Tensor:
        skipped[0] += 100.0
        return real_features(*args, **kwargs)

    monkeypatch.setattr(trainer, "_features", slow_features)
    monkeypatch.setattr(
        trainer, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0])
    )
    result = train_task(learnable, "probe", data, dataclasses.replace(FAST, method="linear-probe", epochs=2))
    assert 200.0 <= result.seconds < 260.0
    assert result.artifact.manifest.training is not None
    assert result.artifact.manifest.training["duration_seconds"] >= 200.0


def test_standardized_probe_is_the_convex_fit_on_the_frozen_vectors(
    learnable: Backbone, data: TaskData
) -> None:
    """Probe head "standardized": the served head is exactly the standardised logistic regression on the
    frozen pooled vectors (temperature from dev), whatever the seed, with nothing trained by epochs."""
    import prompts.trainer as trainer

    config = TrainConfig(method="linear-probe", probe_head="standardized")
    first = train_task(learnable, "probe", data, config)
    reseeded = train_task(learnable, "probe", data, dataclasses.replace(config, seed=7))

    def pooled(rows: list[Example]) -> torch.Tensor:
        ids = trainer._encode(learnable, [e.text for e in rows], 128)
        return trainer._features(learnable, first.module, ids, 64)  # [N, hidden]

    dev = (pooled(data.dev), data.label_ids(data.dev))
    weight, bias = fit_standardized_head(
        pooled(data.train), data.label_ids(data.train), len(data.labels), PROBE_HEAD_C, dev
    )
    torch.testing.assert_close(first.artifact.tensors["head.weight"].float(), weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.artifact.tensors["head.bias"].float(), bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        reseeded.artifact.tensors["head.weight"], first.artifact.tensors["head.weight"]
    )
    # What the task scores on test is that head on the test rows' frozen vectors.
    expected = (pooled(data.test) @ weight.T + bias).argmax(-1)  # [T]
    accuracy = float((expected == torch.tensor(data.label_ids(data.test))).float().mean())
    assert first.test is not None and first.test.accuracy == pytest.approx(accuracy)
    assert first.test.accuracy >= 0.6  # well above chance (1/3): learnable from frozen vectors
    training = first.artifact.manifest.training or {}
    assert training["hyperparameters"]["probe_head"] == "standardized"
    assert "epochs" not in training["hyperparameters"] and training["epochs_run"] == 1
    # The method's default since session 31; the head trained by epochs is asked for by name.
    assert dataclasses.replace(FAST, method="linear-probe").resolved().probe_head == "standardized"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TrainConfig(method="linear-probe", probe_head="closed-form"), "probe_head must be one of"),
        (TrainConfig(method="p-tuning-v2", probe_head="standardized"), "use method linear-probe"),
        (TrainConfig(objective="pairs", probe_head="standardized"), "use method linear-probe"),
    ],
)
def test_probe_head_is_checked(config: TrainConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.resolved()
