"""Every method trains and serves on every backbone family, through the same prompted forward.

The trainer's own evaluation (its module's task prompt) and the artifact as the service loads it, in a
batch mixed with another task, give the same logits; the head pools as the family does by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from prompts.artifact import parse_artifact
from prompts.backbone import Backbone
from prompts.data import TaskData
from prompts.forward import TaskPrompt, prompted_forward
from prompts.trainer import TrainConfig, TrainResult, train_task
from tests.factories import random_artifact
from tests.synthetic import make_task_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = TrainConfig(
    epochs=4, batch_size=16, lr=0.05, head_lr=0.05, patience=100, prefix_length=3, prompt_length=3
)
METHODS = ("p-tuning-v2", "p-tuning", "prompt-tuning", "linear-probe")
KINDS = ("llama", "qwen3", "deberta-v3", "modernbert")


@pytest.fixture(scope="module")
def data() -> TaskData:
    return make_task_data(train=48, dev=18, test=18)


@pytest.fixture(scope="module")
def trained(kind_backbone: Callable[[str], Backbone], data: TaskData) -> dict[tuple[str, str], TrainResult]:
    return {
        (kind, method): train_task(
            kind_backbone(kind), f"t-{method}", data, dataclasses.replace(FAST, method=method)
        )
        for kind in KINDS
        for method in METHODS
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_trains_and_serves_what_it_evaluated(
    kind: str,
    method: str,
    trained: dict[tuple[str, str], TrainResult],
    kind_backbone: Callable[[str], Backbone],
    data: TaskData,
) -> None:
    backbone = kind_backbone(kind)
    result = trained[(kind, method)]
    m = result.artifact.manifest
    assert m.method == method and m.backbone.family == backbone.spec.family
    assert m.conventions == backbone.family.conventions()
    losses = [h.train_loss for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # The probe's default head is fitted once (one entry); every other method trains by epochs.
    assert (len(losses) == 1) if method == "linear-probe" else (losses[-1] < losses[0]), losses
    expected_pooling = {"decoder": "last"}.get(backbone.spec.family)
    if expected_pooling is not None:
        assert m.head.pooling == expected_pooling
    if method == "p-tuning-v2":
        assert result.artifact.tensors["prefix"].shape == (
            backbone.spec.num_layers,
            2,
            backbone.spec.num_kv_heads,
            3,
            backbone.spec.head_dim,
        )

    ids = [e.input_ids for e in backbone.encode([e.text for e in data.test[:8]], 60)]
    module = result.module.eval()
    with torch.no_grad():
        evaluated = prompted_forward(backbone, ids, [module.task_prompt()] * len(ids))
        served = TaskPrompt.from_artifact(
            parse_artifact(result.artifact.data), backbone.device, backbone.dtype
        )
        other = TaskPrompt.from_artifact(
            random_artifact(backbone.spec, num_labels=5, prefix_length=4, prompt_length=2),
            backbone.device,
            backbone.dtype,
        )
        mixed = prompted_forward(backbone, [i for x in ids for i in (x, x)], [served, other] * len(ids))
    torch.testing.assert_close(mixed[0::2, :3], evaluated, rtol=0, atol=1e-5)
    # The metrics the artifact records were measured on its own served tensors.
    assert m.metrics is not None and m.metrics["dev"]["accuracy"] == pytest.approx(
        result.dev.accuracy, abs=1e-6
    )
