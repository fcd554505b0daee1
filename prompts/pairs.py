"""Training a deep prefix on sentence pairs, then fitting its head: few-shot tasks on a frozen backbone.

SetFit (Tunstall et al., 2022, "Efficient Few-Shot Learning Without Prompts") fine-tunes a
sentence-transformer body on pairs of training sentences, pulling the embeddings of same-label pairs
together and pushing different-label pairs apart (cosine similarity regressed onto 1 or 0), then fits
logistic regression on the embeddings. Every pair is a training signal, so 8 rows per label give
hundreds of them. Here the body stays frozen and shared: the pairs train the task's P-tuning v2 prefix
instead, and the head is fitted on the prefixed pooled vectors: each label's mean direction
(:func:`fit_prototype_head`, the default) or SetFit's logistic regression (:func:`fit_logistic_head`).
The result is an ordinary P-tuning v2 artifact (prefix + linear head) that the service batches with
every other task.

Measured on the packaged MiniLM in README "Few-shot data" and benchmarks/FEWSHOT.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from prompts.backbone import Backbone
from prompts.forward import TaskPrompt, prompted_forward

__all__ = [
    "Pair",
    "encoder_prompt",
    "fit_logistic_head",
    "fit_prototype_head",
    "fit_standardized_head",
    "in_batch_loss",
    "sentence_pairs",
    "standardized_logistic",
    "train_on_pairs",
]


@dataclasses.dataclass(frozen=True)
class Pair:
    left: int  # row index into the train set
    right: int
    same: bool  # the two rows share a label


def sentence_pairs(labels: Sequence[int], iterations: int, rng: random.Random) -> list[Pair]:
    """Per iteration, every row with one partner of its own label and one of another label, shuffled.

    SetFit's pair generation with ``num_iterations`` (its default 20): balanced positives and
    negatives whatever the label count, ``2 * iterations * len(labels)`` pairs. A row may be its own
    positive partner when its label has one row (the pair then only anchors the embedding).
    """
    by_label: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        by_label.setdefault(label, []).append(row)
    if len(by_label) < 2:
        raise ValueError("pairs need at least two labels")
    pairs: list[Pair] = []
    for _ in range(iterations):
        for row, label in enumerate(labels):
            pairs.append(Pair(row, rng.choice(by_label[label]), True))
            other = rng.choice([x for x in by_label if x != label])
            pairs.append(Pair(row, rng.choice(by_label[other]), False))
    rng.shuffle(pairs)
    return pairs


def encoder_prompt(task: TaskPrompt) -> TaskPrompt:
    """``task`` with an identity head: ``prompted_forward`` then returns its pooled vectors
    ``[B, hidden]`` themselves (each "logit" is one feature times 1 plus 0)."""
    hidden = task.head_weight.shape[-1]
    device = task.head_weight.device
    return dataclasses.replace(
        task,
        head_weight=torch.eye(hidden, device=device),  # [hidden, hidden]
        head_bias=torch.zeros(hidden, device=device),
    )


def train_on_pairs(
    backbone: Backbone,
    task_prompt: Callable[[], TaskPrompt],
    parameters: Sequence[nn.Parameter],
    train_ids: Sequence[Sequence[int]],
    pairs: Sequence[Pair],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    labels: Sequence[int] | None = None,
    max_seconds: float | None = None,
    on_step: Callable[[float], None] | None = None,
) -> tuple[list[float], bool]:
    """Train ``parameters`` (the prefix) so that the cosine similarity of pooled vectors approaches 1
    for same-label pairs and 0 otherwise (mean squared error, SetFit's default loss).

    One pass over ``pairs`` in batches of ``batch_size`` pairs, with the caller's optimizer and
    schedule (stepped once per batch); each distinct row of a batch is run once; gradients clipped at
    1.0. Without ``labels`` (the train rows' label ids) the loss is SetFit's, over the sampled pairs
    only. With them it is over every pair of distinct rows the step ran ("in-batch"): the sampled
    pairs choose the rows, and the mean error over same-label pairs and the mean over different-label
    pairs count equally (balanced as SetFit's sampling is). The same forward pass gives about R^2 / 2
    pairs instead of R / 2 for R rows. Returns the per-step losses and whether ``max_seconds`` cut the
    pass short.
    """
    steps = math.ceil(len(pairs) / batch_size)
    started = time.perf_counter()
    losses: list[float] = []
    for step in range(steps):
        chunk = pairs[step * batch_size : (step + 1) * batch_size]
        rows = sorted({i for p in chunk for i in (p.left, p.right)})
        where = {row: k for k, row in enumerate(rows)}
        encoder = encoder_prompt(task_prompt())  # rebuilt per step: a function of the parameters
        pooled = prompted_forward(
            backbone, [train_ids[i] for i in rows], [encoder] * len(rows)
        )  # [R, hidden]
        if labels is None:
            left = pooled[torch.tensor([where[p.left] for p in chunk], device=pooled.device)]  # [B, hidden]
            right = pooled[torch.tensor([where[p.right] for p in chunk], device=pooled.device)]  # [B, hidden]
            target = torch.tensor([float(p.same) for p in chunk], device=pooled.device)  # [B]
            loss = F.mse_loss(F.cosine_similarity(left, right, dim=-1), target)
        else:
            loss = in_batch_loss(pooled, [labels[i] for i in rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(parameters), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(losses[-1])
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            return losses, True
    return losses, False


def in_batch_loss(pooled: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """SetFit's loss over every pair of distinct rows of ``pooled`` ``[R, hidden]``: squared error of
    the cosine similarity against 1 (same label) or 0, the mean over same-label pairs and the mean over
    different-label pairs averaged (either alone where the other kind is absent)."""
    unit = F.normalize(pooled, dim=-1)
    cosines = unit @ unit.T  # [R, R]
    y = torch.tensor(list(labels), device=pooled.device)
    same = y[:, None] == y[None, :]  # [R, R]
    distinct = ~torch.eye(len(labels), dtype=torch.bool, device=pooled.device)
    errors = (cosines - same.float()) ** 2  # [R, R]
    kinds = [errors[mask] for mask in (same & distinct, ~same) if bool(mask.any())]
    if not kinds:  # one row: nothing to compare, no gradient to give
        return cosines.sum() * 0.0
    return torch.stack([kind.mean() for kind in kinds]).mean()


def fit_logistic_head(
    features: torch.Tensor, labels: Sequence[int], num_labels: int, c: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on the pooled vectors scaled to unit length, L2-regularised as
    scikit-learn's default (minimise ``0.5 * |W|^2 + c * sum of cross-entropies``), fitted to
    convergence by L-BFGS. Returns weight ``[C, hidden]`` and bias ``[C]`` for the *raw* vectors.

    SetFit's sentence-transformer normalises its embeddings, and on the prefixed vectors it matters
    (SST-2, 8 rows per label: 0.567 normalised against 0.512 raw; their norms vary from row to row).
    The service's head reads the raw vector, so the fit has no bias: then ``W @ (x / |x|)`` and
    ``W @ x`` differ by a positive factor per row and rank the labels identically, the served label is
    the fitted one. The weight is divided by the train rows' mean norm, so the served probabilities
    are the fitted ones for a row of that norm (sharper for longer vectors, softer for shorter).
    A full-batch convex fit has no epochs to pick and no dev set to trust, which is the point at a few
    rows per label.
    """
    x = features.detach().float()
    norms = x.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [N, 1]
    x = x / norms
    y = torch.tensor(list(labels), device=x.device)
    weight = torch.zeros(num_labels, x.shape[1], device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight], lr=1.0, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = c * F.cross_entropy(x @ weight.T, y, reduction="sum") + 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach() / norms.mean(), torch.zeros(num_labels, device=x.device)


def fit_prototype_head(
    features: torch.Tensor,
    labels: Sequence[int],
    num_labels: int,
    calibration: tuple[torch.Tensor, Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class mean by cosine: each label's weight is the mean of its train rows' unit vectors,
    scaled to unit length, times one temperature. Returns weight ``[C, hidden]`` and a zero bias ``[C]``
    for the raw vectors (as :func:`fit_logistic_head`, no bias keeps the served ranking exact).

    Pairs train the vectors so that a label's rows point one way; the prototype reads exactly that and
    fits nothing else, so a few rows per label cannot overfit it. The temperature only sets how
    confident the probabilities are (never which label wins): fitted by cross-entropy on
    ``calibration`` (the dev rows) when given, else on the train rows.
    """
    x = F.normalize(features.detach().float(), dim=-1)  # [N, hidden]
    y = torch.tensor(list(labels), device=x.device)
    prototypes = torch.zeros(num_labels, x.shape[1], device=x.device).index_add_(0, y, x)  # [C, hidden]
    prototypes = F.normalize(prototypes, dim=-1)
    cx, cy = (
        (x, y)
        if calibration is None or len(calibration[1]) == 0
        else (
            F.normalize(calibration[0].detach().float(), dim=-1),
            torch.tensor(list(calibration[1]), device=x.device),
        )
    )
    cosines = cx @ prototypes.T  # [M, C]
    temperature = _fit_temperature(cosines, cy)
    mean_norm = features.detach().float().norm(dim=-1).mean().clamp(min=1e-12)
    return prototypes * (temperature / mean_norm), torch.zeros(num_labels, device=x.device)


def fit_standardized_head(
    features: torch.Tensor,
    labels: Sequence[int],
    num_labels: int,
    c: float,
    calibration: tuple[torch.Tensor, Sequence[int]] | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`standardized_logistic` times one temperature fitted on ``calibration`` (the dev rows)
    when given, else on the train rows: it sets how confident the probabilities are, never the label.
    Returns weight ``[C, hidden]`` and bias ``[C]`` for the *raw* vectors."""
    weight, bias = standardized_logistic(features, labels, num_labels, c, class_weights)
    x = features.detach().float()
    cx, cy = x, torch.tensor(list(labels), device=x.device)
    if calibration is not None and len(calibration[1]) > 0:
        cx = calibration[0].detach().float()
        cy = torch.tensor(list(calibration[1]), device=x.device)
    temperature = _fit_temperature(cx @ weight.T + bias, cy)  # scores [M, C]
    return weight * temperature, bias * temperature


def standardized_logistic(
    features: torch.Tensor,
    labels: Sequence[int],
    num_labels: int,
    c: float,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an intercept on the pooled vectors standardised per
    dimension (the train rows' mean and standard deviation), L2-regularised (minimise
    ``0.5 * |W|^2 / c + sum of cross-entropies``; the intercept is not penalised), fitted to
    convergence by L-BFGS; ``class_weights`` ``[C]`` weigh each row's cross-entropy by its label
    (``class_balanced``). Returns weight ``[C, hidden]`` and bias ``[C]`` for the *raw* vectors.

    Standardising is affine, so the fit folds into the service's plain linear head exactly:
    ``W @ ((x - mu) / sd) + b = (W / sd) @ x + (b - (W / sd) @ mu)``. Unlike the prototypes (every
    dimension of a unit vector weighed alike, no intercept) it weighs each dimension by how it
    separates the labels relative to its spread over the train rows; measured against them in README
    "Few-shot data", step 10. With a small ``c`` the weights stay small, near each label's mean
    offset in standardised units (the limit as ``c`` goes to 0), so a few rows per label cannot
    overfit them.
    """
    x = features.detach().float()  # [N, hidden]
    mean = x.mean(0)  # [hidden]
    std = x.std(0).clamp(min=1e-6)  # [hidden]
    z = (x - mean) / std
    y = torch.tensor(list(labels), device=x.device)
    weight = torch.zeros(num_labels, x.shape[1], device=x.device, requires_grad=True)  # [C, hidden]
    bias = torch.zeros(num_labels, device=x.device, requires_grad=True)  # [C]
    weights = class_weights.to(x.device).float() if class_weights is not None else None  # [C]
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        scores = z @ weight.T + bias  # [N, C]
        loss = F.cross_entropy(scores, y, weight=weights, reduction="sum") + 0.5 / c * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    raw_weight = weight.detach() / std  # [C, hidden]
    return raw_weight, bias.detach() - raw_weight @ mean


def _fit_temperature(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The factor ``t`` (at most e^6) minimising the cross-entropy of ``scores * t`` ``[M, C]``."""
    log_t = torch.zeros((), device=scores.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scores * log_t.clamp(max=6.0).exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return float(log_t.detach().clamp(max=6.0).exp())
