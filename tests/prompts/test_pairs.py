"""prompts/pairs.py and the trainer's objective "pairs": SetFit's sentence pairs train a P-tuning v2
prefix on the frozen backbone, then logistic regression on the prefixed pooled vectors is the head."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

from prompts.artifact import max_text_tokens
from prompts.backbone import Backbone, load_backbone
from prompts.data import Example, TaskData
from prompts.forward import TaskPrompt
from prompts.pairs import (
    encoder_prompt,
    fit_logistic_head,
    fit_prototype_head,
    fit_standardized_head,
    in_batch_loss,
    sentence_pairs,
    standardized_logistic,
)
from prompts.trainer import (
    PAIR_BUDGET,
    PAIR_ITERATIONS,
    STANDARDIZED_HEAD_C,
    TrainConfig,
    TrainResult,
    pair_iterations_for,
    predict,
    train_task,
)
from tests.synthetic import make_learnable_bert, make_task_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pairs_are_balanced_and_labelled_by_the_rows_labels() -> None:
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pairs = sentence_pairs(labels, iterations=5, rng=random.Random(0))
    assert len(pairs) == 2 * 5 * len(labels)
    assert sum(p.same for p in pairs) == len(pairs) // 2
    for p in pairs:
        assert p.same == (labels[p.left] == labels[p.right])
    # Every row anchors the same number of pairs: one positive and one negative per iteration.
    assert set(Counter(p.left for p in pairs).values()) == {10}
    assert sentence_pairs(labels, 5, random.Random(0)) == pairs  # seeded
    with pytest.raises(ValueError, match="two labels"):
        sentence_pairs([1, 1, 1], 2, random.Random(0))


def test_pair_iterations_follow_the_data_size() -> None:
    assert pair_iterations_for(32) == PAIR_ITERATIONS  # 8 rows per label, 4 labels: SetFit's 20
    assert pair_iterations_for(384) == 4  # 64 rows per label, 6 labels
    assert 2 * 384 * pair_iterations_for(384) <= PAIR_BUDGET + 2 * 384
    assert pair_iterations_for(100_000) == 1


def test_pairs_train_a_longer_prefix_unless_one_is_asked_for() -> None:
    pairs = TrainConfig(method="p-tuning-v2", objective="pairs").resolved()
    labels = TrainConfig(method="p-tuning-v2").resolved()
    asked = TrainConfig(method="p-tuning-v2", objective="pairs", prefix_length=8).resolved()
    assert (pairs.prefix_length, labels.prefix_length, asked.prefix_length) == (32, 16, 8)
    assert pairs.resolved() == pairs  # resolving twice changes nothing
    assert pairs.as_manifest()["prefix_length"] == 32


def _objective_gradient(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, c: float) -> float:
    """The largest gradient entry of the regularised logistic loss (no bias) at ``w``."""
    w = w.clone().requires_grad_(True)
    loss = c * F.cross_entropy(x @ w.T, y, reduction="sum") + 0.5 * (w**2).sum()
    loss.backward()
    assert w.grad is not None
    return float(w.grad.abs().max())


def test_logistic_head_fits_unit_vectors_and_ranks_raw_ones_the_same() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 2
    y = torch.arange(3).repeat_interleave(10)  # [30]
    raw = (centres[y] + torch.randn(30, 16, generator=g)) * torch.rand(30, 1, generator=g) * 9  # norms vary
    weight, bias = fit_logistic_head(raw, y.tolist(), 3, c=1.0)
    assert weight.shape == (3, 16) and torch.equal(bias, torch.zeros(3))
    # The fit ran on unit vectors: at the optimum the gradient there is ~0.
    unit = raw / raw.norm(dim=-1, keepdim=True)
    mean_norm = float(raw.norm(dim=-1).mean())
    assert _objective_gradient(unit, y, weight * mean_norm, 1.0) < 1e-3
    # Served on the raw vectors: every row ranks the labels as the fitted model does on its unit vector.
    served, fitted = raw @ weight.T, unit @ (weight * mean_norm).T
    assert torch.equal(served.argsort(-1), fitted.argsort(-1))
    assert (served.argmax(-1) == y).float().mean() >= 0.9
    # A row of the mean norm gets exactly the fitted probabilities.
    row = unit[0] * mean_norm
    torch.testing.assert_close(row @ weight.T, fitted[0], atol=1e-5, rtol=1e-5)
    # Scaling every vector changes nothing the service shows: same logits.
    w10, _ = fit_logistic_head(raw * 10, y.tolist(), 3, c=1.0)
    torch.testing.assert_close(raw * 10 @ w10.T, served, atol=1e-4, rtol=1e-4)
    # Stronger regularisation (smaller c) gives a smaller weight.
    small, _ = fit_logistic_head(raw, y.tolist(), 3, c=0.01)
    assert float(small.norm()) < float(weight.norm())


def test_prototype_head_is_each_labels_mean_direction() -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 16, generator=g) * 2
    y = torch.arange(3).repeat_interleave(6)  # [18]
    raw = (centres[y] + torch.randn(18, 16, generator=g)) * torch.rand(18, 1, generator=g) * 5  # norms vary
    weight, bias = fit_prototype_head(raw, y.tolist(), 3)
    assert torch.equal(bias, torch.zeros(3))
    unit = raw / raw.norm(dim=-1, keepdim=True)
    directions = torch.stack([unit[y == c].mean(0) for c in range(3)])
    directions = directions / directions.norm(dim=-1, keepdim=True)
    # One positive factor (temperature / mean norm) times the unit mean directions.
    factor = weight.norm(dim=-1)
    torch.testing.assert_close(factor, factor[:1].expand(3))
    torch.testing.assert_close(weight / factor.unsqueeze(1), directions, atol=1e-5, rtol=1e-5)
    # Served on raw vectors, each row's label is its nearest mean direction by cosine.
    assert torch.equal((raw @ weight.T).argmax(-1), (unit @ directions.T).argmax(-1))
    # The temperature comes from the calibration rows: confident on clean ones, soft on shuffled labels.
    clean, _ = fit_prototype_head(raw, y.tolist(), 3, calibration=(raw, y.tolist()))
    noisy, _ = fit_prototype_head(
        raw, y.tolist(), 3, calibration=(raw, y[torch.randperm(18, generator=g)].tolist())
    )
    assert float(clean.norm()) > 2 * float(noisy.norm())


def test_standardized_head_is_logistic_regression_on_z_scores_folded_into_a_linear_head() -> None:
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(3, 4, generator=g) * 2
    y = torch.arange(3).repeat_interleave(12)  # [36]

    def rows() -> torch.Tensor:
        # Pooled vectors' dimensions differ in scale and offset: here the labels live in four small
        # dimensions, and four large ones (offset, 1000x the spread) carry only noise.
        signal = (centres[y] + 0.3 * torch.randn(36, 4, generator=g)) * 0.01  # [36, 4]
        noise = torch.randn(36, 4, generator=g) * 10 + torch.linspace(-50, 50, 4)  # [36, 4]
        return torch.cat([signal, noise], dim=1)  # [36, 8]

    raw, test = rows(), rows()
    weight, bias = standardized_logistic(raw, y.tolist(), 3, c=0.01)
    assert weight.shape == (3, 8) and bias.shape == (3,)
    # The served logits W x + b are the penalised logistic model's on the train z-scores, at its optimum.
    mean, std = raw.mean(0), raw.std(0)
    w_z = (weight * std).requires_grad_(True)  # [3, 8] the weight in z units
    b_z = (bias + weight @ mean).requires_grad_(True)
    z = (raw - mean) / std
    torch.testing.assert_close(z @ w_z.T + b_z, raw @ weight.T + bias, atol=1e-3, rtol=1e-4)
    objective = F.cross_entropy(z @ w_z.T + b_z, y, reduction="sum") + 0.5 / 0.01 * (w_z**2).sum()
    objective.backward()
    assert w_z.grad is not None and b_z.grad is not None
    start = torch.zeros(3, 8, requires_grad=True)  # the gradient where the fit starts, for scale
    F.cross_entropy(z @ start.T, y, reduction="sum").backward()
    assert start.grad is not None and float(start.grad.abs().max()) > 1.0
    assert float(w_z.grad.abs().max()) < 1e-2 and float(b_z.grad.abs().max()) < 1e-2
    # Blind to each dimension's units: rescaled and shifted features give the same labels on rescaled
    # test rows. The prototypes' cosine is not, and reads the large dimensions' noise here.
    a, shift = torch.rand(8, generator=g) * 10 + 0.1, torch.randn(8, generator=g) * 100
    w2, b2 = standardized_logistic(raw * a + shift, y.tolist(), 3, c=0.01)
    assert torch.equal(((test * a + shift) @ w2.T + b2).argmax(-1), (test @ weight.T + bias).argmax(-1))
    assert float((test @ weight.T + bias).argmax(-1).eq(y).float().mean()) >= 0.9
    prototypes, _ = fit_prototype_head(raw, y.tolist(), 3)
    assert float((test @ prototypes.T).argmax(-1).eq(y).float().mean()) < 0.6
    # Stronger regularisation (smaller c) gives a smaller weight.
    small, _ = standardized_logistic(raw, y.tolist(), 3, c=0.001)
    assert float(small.norm()) < float(weight.norm())
    # The head is that fit times one temperature from the calibration rows: confident on clean ones,
    # soft on shuffled labels; the labels it gives are the same.
    clean_w, clean_b = fit_standardized_head(raw, y.tolist(), 3, c=0.01, calibration=(raw, y.tolist()))
    ratio = clean_w / weight
    torch.testing.assert_close(ratio, ratio[:1, :1].expand(3, 8), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(clean_b / bias, ratio[0, :1].expand(3), atol=1e-4, rtol=1e-4)
    noisy_w, _ = fit_standardized_head(
        raw, y.tolist(), 3, c=0.01, calibration=(raw, y[torch.randperm(36, generator=g)].tolist())
    )
    assert float(clean_w.norm()) > 2 * float(noisy_w.norm())


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return load_backbone(make_learnable_bert(tmp_path_factory.mktemp("models") / "learnable"))


PAIRS = TrainConfig(method="p-tuning-v2", objective="pairs", batch_size=16, lr=0.05, prefix_length=4)


def _pooled(backbone: Backbone, result: TrainResult, examples: list[Example]) -> torch.Tensor:
    """The trained prefix's served pooled vectors ``[N, hidden]`` of ``examples``, as the head saw them."""
    room = max_text_tokens(result.artifact.manifest, backbone.spec)
    ids = [e.input_ids for e in backbone.encode([e.text for e in examples], room)]
    with torch.inference_mode():
        return predict(backbone, encoder_prompt(result.module.task_prompt()), ids, 64)


def test_pairs_train_the_prefix_and_fit_the_head(learnable: Backbone) -> None:
    data = make_task_data(train=24, dev=12, test=12)
    result = train_task(learnable, "pairs", data, dataclasses.replace(PAIRS, pair_iterations=4))
    manifest = result.artifact.manifest
    training = manifest.training or {}
    hp = training["hyperparameters"]
    assert manifest.method == training["method"] == "p-tuning-v2"
    assert hp["objective"] == "pairs" and hp["pair_iterations"] == 4 and hp["prefix_init"] == "random"
    assert hp["head"] == "mean"
    assert not {"epochs", "head_lr", "patience", "selection"} & set(hp)
    assert result.epochs_run == result.best_epoch == 1 and len(result.history) == 1
    # The head is the logistic regression on the served pooled vectors of the train rows.
    module = result.module
    features, dev_features = _pooled(learnable, result, data.train), _pooled(learnable, result, data.dev)
    weight, bias = fit_prototype_head(
        features, data.label_ids(data.train), len(data.labels), (dev_features, data.label_ids(data.dev))
    )
    assert hp["pair_head"] == "prototype"
    torch.testing.assert_close(module.head.weight.detach(), weight, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(module.head.bias.detach(), bias, atol=1e-4, rtol=1e-3)
    # The keyword task is learnable: the served artifact classifies it well above chance (1/3).
    assert result.test is not None and result.test.accuracy >= 0.8
    assert manifest.metrics is not None and manifest.metrics["test"]["accuracy"] == pytest.approx(
        result.test.accuracy
    )


def test_pairs_move_the_prefix_from_its_start(learnable: Backbone) -> None:
    data = make_task_data(train=24, dev=12, test=0)
    trained = train_task(learnable, "pairs", data, dataclasses.replace(PAIRS, pair_iterations=8))
    untrained = train_task(learnable, "pairs", data, dataclasses.replace(PAIRS, pair_iterations=8, lr=0.0))
    a, b = trained.artifact.tensors["prefix"], untrained.artifact.tensors["prefix"]
    assert float((a - b).abs().max()) > 1e-3
    # Same pairs, same start: training lowered their loss below that of the prefix left at its start.
    assert trained.history[0].train_loss < 0.8 * untrained.history[0].train_loss


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "prompt-tuning"}, "trains a prefix"),
        ({"head": "peft"}, "cannot train head 'peft'"),
        ({"pair_iterations": 0}, "pair_iterations"),
        ({"objective": "triplets"}, "objective must be"),
        ({"epochs": 3}, "no epochs, patience or head learning rate"),
        ({"head_lr": 0.1}, "no epochs, patience or head learning rate"),
        ({"pair_head": "svm"}, "pair_head must be"),
        ({"pair_loss": "triplet"}, "pair_loss must be"),
    ],
)
def test_pairs_config_refusals(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PAIRS, **changes).resolved()  # type: ignore[arg-type]


def test_the_in_batch_loss_reads_every_pair_and_weighs_both_kinds_equally() -> None:
    pooled = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [1.0, 1.0]])  # [R=4, hidden=2]
    labels = [0, 0, 1, 0]
    unit = F.normalize(pooled, dim=-1)
    cos = unit @ unit.T
    same = [(0, 1), (0, 3), (1, 3)]  # each unordered pair once: the matrix counts both orders alike
    different = [(0, 2), (1, 2), (2, 3)]
    expected = (
        sum((cos[i, j] - 1) ** 2 for i, j in same) / len(same) + sum(cos[i, j] ** 2 for i, j in different) / 3
    ) / 2
    torch.testing.assert_close(in_batch_loss(pooled, labels), expected)
    # Two labels, each row on its label's own axis: nothing left to learn.
    aligned = torch.tensor([[2.0, 0.0], [0.5, 0.0], [0.0, 3.0]])
    assert float(in_batch_loss(aligned, [0, 0, 1])) == pytest.approx(0.0, abs=1e-7)
    # One kind only: its mean alone (no zero for the missing kind pulling it down).
    torch.testing.assert_close(in_batch_loss(pooled[:2], [0, 1]), cos[0, 1] ** 2)
    lone = torch.ones(1, 2, requires_grad=True)
    loss = in_batch_loss(lone, [0])
    loss.backward()
    assert float(loss.detach()) == 0.0 and lone.grad is not None and float(lone.grad.abs().sum()) == 0.0


def test_the_pair_loss_is_recorded_and_changes_what_is_trained(learnable: Backbone) -> None:
    data = make_task_data(train=24, dev=12, test=12)
    sampled = train_task(learnable, "pairs", data, dataclasses.replace(PAIRS, pair_iterations=4))
    in_batch = train_task(
        learnable, "pairs", data, dataclasses.replace(PAIRS, pair_iterations=4, pair_loss="in-batch")
    )
    assert TrainConfig(method="p-tuning-v2", objective="pairs").resolved().pair_loss == "sampled"
    for result, loss in ((in_batch, "in-batch"), (sampled, "sampled")):
        assert (result.artifact.manifest.training or {})["hyperparameters"]["pair_loss"] == loss
        assert result.test is not None and result.test.accuracy >= 0.8
    # Same seed, same pairs and rows per step: only the loss differs, and so do the prefixes.
    a, b = in_batch.artifact.tensors["prefix"], sampled.artifact.tensors["prefix"]
    assert float((a - b).abs().max()) > 1e-4


def test_encoder_prompt_returns_the_pooled_vectors(learnable: Backbone) -> None:
    hidden = learnable.spec.hidden_size
    task = TaskPrompt(
        prefix=None, prompt=None, head_weight=torch.randn(3, hidden), head_bias=torch.zeros(3), pooling="mean"
    )
    ids = [e.input_ids for e in learnable.encode(["alpha beta", "gamma"], 32)]
    pooled = predict(learnable, encoder_prompt(task), ids, 8)  # [2, hidden]
    logits = predict(learnable, task, ids, 8)  # [2, 3]
    torch.testing.assert_close(pooled @ task.head_weight.T, logits, atol=1e-5, rtol=1e-4)


def test_pairs_with_the_logistic_head(learnable: Backbone) -> None:
    data = make_task_data(train=24, dev=12, test=12)
    config = dataclasses.replace(PAIRS, pair_iterations=4, pair_head="logistic")
    result = train_task(learnable, "pairs", data, config)
    assert (result.artifact.manifest.training or {})["hyperparameters"]["pair_head"] == "logistic"
    features = _pooled(learnable, result, data.train)
    weight, _ = fit_logistic_head(features, data.label_ids(data.train), len(data.labels))
    torch.testing.assert_close(result.module.head.weight.detach(), weight, atol=1e-4, rtol=1e-3)
    assert result.test is not None and result.test.accuracy >= 0.8


def test_pairs_with_the_standardized_head(learnable: Backbone) -> None:
    data = make_task_data(train=24, dev=12, test=12)
    config = dataclasses.replace(PAIRS, pair_iterations=4, pair_head="standardized")
    result = train_task(learnable, "pairs", data, config)
    assert (result.artifact.manifest.training or {})["hyperparameters"]["pair_head"] == "standardized"
    features = {split: _pooled(learnable, result, getattr(data, split)) for split in ("train", "dev", "test")}
    weight, bias = fit_standardized_head(
        features["train"],
        data.label_ids(data.train),
        len(data.labels),
        STANDARDIZED_HEAD_C,
        (features["dev"], data.label_ids(data.dev)),
    )
    torch.testing.assert_close(result.module.head.weight.detach(), weight, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(result.module.head.bias.detach(), bias, atol=1e-4, rtol=1e-3)
    assert float(bias.abs().max()) > 0  # an intercept, unlike the other two heads
    # The artifact as served scores the test rows by that affine head on their pooled vectors.
    predicted = (features["test"] @ weight.T + bias).argmax(-1)
    expected = sum(int(p == t) for p, t in zip(predicted.tolist(), data.label_ids(data.test), strict=True))
    assert result.test is not None and result.test.accuracy == pytest.approx(expected / len(data.test))
    assert result.test.accuracy >= 0.8


def test_the_standardized_pairs_head_weighs_rows_when_class_balanced(learnable: Backbone) -> None:
    base = make_task_data(train=36, dev=12, test=12)
    rare = base.labels[0]
    skewed = [e for e in base.train if e.label != rare] + [e for e in base.train if e.label == rare][:3]
    data = TaskData(labels=base.labels, train=skewed, dev=base.dev)
    config = dataclasses.replace(PAIRS, pair_iterations=4, pair_head="standardized", class_balanced=True)
    result = train_task(learnable, "pairs", data, config)
    features = _pooled(learnable, result, data.train)
    y = data.label_ids(data.train)
    calibration = (_pooled(learnable, result, data.dev), data.label_ids(data.dev))
    counts = torch.bincount(torch.tensor(y), minlength=len(data.labels)).float()
    weights = len(y) / (len(data.labels) * counts)  # [C]: the rare label's rows weigh 4x more
    weighted = fit_standardized_head(features, y, len(data.labels), STANDARDIZED_HEAD_C, calibration, weights)
    plain = fit_standardized_head(features, y, len(data.labels), STANDARDIZED_HEAD_C, calibration)
    torch.testing.assert_close(result.module.head.bias.detach(), weighted[1], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(result.module.head.weight.detach(), weighted[0], atol=1e-4, rtol=1e-3)
    # The weights move the fit: the rare label's intercept rises against the unweighted one.
    assert float(weighted[1][0] - weighted[1][1:].mean()) > float(plain[1][0] - plain[1][1:].mean()) + 1e-3
