"""What every backbone family owes the rest of ptserve, checked on a tiny model of each architecture.

- With no prompt, the family's loop is Hugging Face's own model (every real token, 1e-5).
- A mixed batch of many tasks (every method, several prefix and prompt lengths, label counts and
  poolings) gives each row what the row gives alone.
- Gradients reach the prompt tensors and nothing of the backbone; no prefix or prompt is ever
  dropped silently (changing one changes the logits).
- Artifacts name the family and its conventions; another family's artifact is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prompts.artifact import check_compatible
from prompts.backbone import Backbone, load_backbone
from prompts.backbones import FAMILIES, SUPPORTED_MODEL_TYPES
from prompts.errors import IncompatibleArtifactError
from prompts.forward import TaskPrompt, prompted_forward
from tests.conftest import KINDS
from tests.factories import random_artifact
from tests.prompts.backbones.mixed_batch import make_task, ptserve_hidden, text_ids

TEXTS = [
    "this phone is great",
    "terrible battery and the screen is broken and the delivery was slow",
    "what time is the game",
    "free offer call now",
    "a",
    "love it",
]


def _ids(backbone: Backbone) -> list[list[int]]:
    return text_ids(backbone, TEXTS)


def test_every_supported_model_type_has_one_family() -> None:
    expected = {"bert", "roberta", "xlm-roberta", "camembert", "llama", "mistral", "qwen2", "qwen3"}
    assert expected | {"deberta-v2", "modernbert"} == SUPPORTED_MODEL_TYPES
    assert sum(len(f.model_types) for f in FAMILIES) == len(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_without_prompts_the_loop_is_hugging_faces_model(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    ids = _ids(backbone)
    width = max(map(len, ids))
    x = torch.tensor([row + [backbone.pad_token_id] * (width - len(row)) for row in ids])  # [B, S]
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])  # [B, S]
    theirs = backbone.model(input_ids=x, attention_mask=mask).last_hidden_state  # [B, S, hidden]

    # Every real token of every row, in a batch of distinct tasks with no prefix and no prompt.
    plain = [make_task(backbone, task=f"plain-{b}", prefix_length=0, seed=b) for b in range(len(ids))]
    hidden = ptserve_hidden(backbone, ids, plain)  # [B, S, hidden]
    assert hidden.shape == theirs.shape
    tokens = mask.bool()  # [B, S]: the real tokens
    torch.testing.assert_close(hidden[tokens], theirs[tokens], rtol=0, atol=1e-5)

    identity = TaskPrompt(
        None, None, torch.eye(backbone.spec.hidden_size), torch.zeros(backbone.spec.hidden_size)
    )
    for position in ("cls", "last", "mean"):
        identity.pooling = position
        ours = prompted_forward(backbone, ids, [identity] * len(ids))  # [B, hidden]: the pooled states
        for b, row in enumerate(ids):
            real = theirs[b, : len(row)]
            want = {"cls": real[0], "last": real[-1], "mean": real.mean(0)}[position]
            torch.testing.assert_close(ours[b], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_a_mixed_batch_of_many_tasks_equals_each_row_alone(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    pooled = "last" if backbone.spec.family == "decoder" else "cls"
    tasks = [
        make_task(backbone, task="deep", num_labels=3, prefix_length=4, pooling=pooled, seed=1),
        make_task(backbone, task="long", num_labels=5, prefix_length=9, pooling="mean", seed=2),
        make_task(
            backbone, task="both", num_labels=4, prefix_length=2, prompt_length=3, pooling=pooled, seed=3
        ),
        make_task(
            backbone, task="prompt", num_labels=2, prefix_length=0, prompt_length=5, pooling="first", seed=4
        ),
        make_task(
            backbone,
            task="zero",
            num_labels=6,
            prefix_length=3,
            positions="from_zero",
            pooling=pooled,
            seed=5,
        ),
        make_task(
            backbone, task="probe", num_labels=2, prefix_length=0, prompt_length=0, pooling="mean", seed=6
        ),
    ]
    ids = _ids(backbone)
    rows = [tasks[i % len(tasks)] for i in range(len(ids) * 2)]
    row_ids = [ids[(i * 5) % len(ids)] for i in range(len(rows))]  # every task meets several lengths
    mixed = prompted_forward(backbone, row_ids, rows)
    assert mixed.shape == (len(rows), 6)
    for r, (task, text) in enumerate(zip(rows, row_ids, strict=True)):
        alone = prompted_forward(backbone, [text], [task])[0]
        c = task.num_labels
        torch.testing.assert_close(mixed[r, :c], alone[:c], rtol=0, atol=1e-5)
        assert torch.isfinite(mixed[r, :c]).all() and torch.isneginf(mixed[r, c:]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_prompt_tensors_and_nothing_else(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    task = make_task(backbone, prefix_length=3, prompt_length=2, seed=3)
    assert task.prefix is not None and task.prompt is not None
    tensors = (task.prefix, task.prompt, task.head_weight, task.head_bias)
    for t in tensors:
        t.requires_grad_(True)
    logits = prompted_forward(backbone, _ids(backbone)[:4], [task] * 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for t in tensors:
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_no_prompt_part_is_ever_dropped(kind: str, kind_backbone: Callable[[str], Backbone]) -> None:
    """Guards against a loop that silently ignores prefixes, input prompts or the position offset."""
    backbone = kind_backbone(kind)
    ids = _ids(backbone)[:3]
    base = make_task(backbone, prefix_length=4, prompt_length=2, seed=7)
    ref = prompted_forward(backbone, ids, [base] * 3)
    assert base.prefix is not None and base.prompt is not None
    w, b = base.head_weight, base.head_bias
    variants = {
        "prefix": TaskPrompt(torch.randn_like(base.prefix), base.prompt, w, b),
        "prompt": TaskPrompt(base.prefix, torch.randn_like(base.prompt), w, b),
    }
    # DeBERTa-v3 has no absolute positions and scores prefixes by content only: there the offset
    # cannot matter. Everywhere else the prefix's position rule shows in the logits.
    if kind != "deberta-v3":
        variants["positions"] = TaskPrompt(base.prefix, base.prompt, w, b, positions_after_prefix=False)
    for name, variant in variants.items():
        out = prompted_forward(backbone, ids, [variant] * 3)
        assert (out - ref).abs().max() > 1e-3, name


@pytest.mark.parametrize(
    ("kind", "other"), [("bert", "qwen3"), ("qwen3", "llama"), ("deberta-v3", "modernbert")]
)
def test_artifacts_name_their_family_and_another_family_refuses_them(
    kind: str, other: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone, foreign = kind_backbone(kind), kind_backbone(other)
    artifact = random_artifact(backbone.spec, prefix_length=2)
    m = artifact.manifest
    assert m.backbone.family == backbone.spec.family
    assert m.backbone.num_kv_heads == backbone.spec.num_kv_heads
    assert m.conventions == backbone.family.conventions()
    assert artifact.tensors["prefix"].shape[2] == backbone.spec.num_kv_heads
    check_compatible(artifact, backbone.spec)
    with pytest.raises(IncompatibleArtifactError) as info:
        check_compatible(artifact, foreign.spec)
    theirs, mine = backbone.spec, foreign.spec
    field = "family" if theirs.family != mine.family else "model_type"
    assert f"built for a backbone with {field}={getattr(theirs, field)}" in str(info.value)
    assert f"({field}={getattr(mine, field)})" in str(info.value)


@pytest.mark.parametrize("kind", ["qwen3", "mistral", "deberta-v3", "modernbert"])
@torch.inference_mode()
def test_bfloat16_serving_stays_close_to_float32(
    kind: str, kind_dir: Callable[[str], Path], kind_backbone: Callable[[str], Backbone]
) -> None:
    full = kind_backbone(kind)
    half = load_backbone(kind_dir(kind), dtype="bfloat16")
    assert half.spec.fingerprint == full.spec.fingerprint  # artifacts trained in fp32 serve in bf16
    artifact = random_artifact(full.spec, prefix_length=4, prompt_length=2, pooling="mean", scale=0.5, seed=2)
    ids = _ids(full)
    probs = []
    for backbone in (full, half):
        task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
        probs.append(torch.softmax(prompted_forward(backbone, ids, [task] * len(ids)).float(), -1))
    assert torch.isfinite(probs[1]).all()
    torch.testing.assert_close(probs[1], probs[0], rtol=0, atol=0.05)


def test_configs_a_family_cannot_run_exactly_are_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, LlamaConfig

    from prompts.errors import BackboneError

    small = {"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    LlamaConfig(
        **small, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    ).save_pretrained(tmp_path / "dynamic")
    BertConfig(**small, position_embedding_type="relative_key").save_pretrained(tmp_path / "relative")
    for name, fragment in [
        ("dynamic", "rope_type 'dynamic' is not supported"),
        ("relative", "'relative_key'"),
    ]:
        with pytest.raises(BackboneError, match=fragment):
            load_backbone(tmp_path / name)
