from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from prompts.artifact import build_artifact
from prompts.backbone import Backbone, load_backbone
from prompts.forward import TaskPrompt, prompted_forward
from tests.factories import random_artifact
from tests.models import make_tiny_roberta
from tests.peft_support import cache_kwargs, peft_prefix_refusal

TEXTS = [
    "this phone is great",
    "terrible battery and the screen is broken",
    "what time is the game",
    "free offer call now",
    "a",
    "the delivery was slow but the quality of the shirt is fine and the price was cheap okay",
    "love it",
]


def _task(backbone: Backbone, **kwargs: object) -> TaskPrompt:
    artifact = random_artifact(backbone.spec, **kwargs)  # type: ignore[arg-type]
    return TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)


def _encode(backbone: Backbone, texts: list[str]) -> list[list[int]]:
    return [e.input_ids for e in backbone.encode(texts, 40)]


@torch.inference_mode()
def test_mixed_batch_equals_each_task_alone(backbone: Backbone) -> None:
    tasks = [
        _task(backbone, task="a", num_labels=3, prefix_length=4, seed=1),
        _task(backbone, task="b", num_labels=5, prefix_length=7, prompt_length=3, seed=2),
        _task(backbone, task="c", num_labels=2, prefix_length=0, prompt_length=2, pooling="mean", seed=3),
        _task(
            backbone,
            task="d",
            num_labels=4,
            prefix_length=2,
            positions="from_zero",
            pooler="backbone",
            pooling="first",
            prompt_length=1,
            seed=4,
        ),
        _task(backbone, task="e", num_labels=2, prefix_length=0, prompt_length=0, seed=5),
    ]
    ids = _encode(backbone, TEXTS)
    # Interleave tasks over rows so neighbouring rows differ in every length.
    rows = [tasks[i % len(tasks)] for i in range(len(ids) * 2)]
    row_ids = [ids[i % len(ids)] for i in range(len(rows))]

    mixed = prompted_forward(backbone, row_ids, rows)
    assert mixed.shape == (len(rows), 5)
    for r, (task, text_ids) in enumerate(zip(rows, row_ids, strict=True)):
        alone = prompted_forward(backbone, [text_ids], [task])[0]
        c = task.num_labels
        torch.testing.assert_close(mixed[r, :c], alone[:c], rtol=0, atol=1e-5)
        assert torch.isinf(mixed[r, c:]).all() and (mixed[r, c:] < 0).all()
        assert torch.isfinite(mixed[r, :c]).all()

    # Same task alone over all its texts (a padded single-task batch) agrees too.
    for task in tasks:
        picked = [r for r, t in enumerate(rows) if t is task]
        single = prompted_forward(backbone, [row_ids[r] for r in picked], [task] * len(picked))
        torch.testing.assert_close(
            mixed[picked, : task.num_labels], single[:, : task.num_labels], rtol=0, atol=1e-5
        )


@torch.inference_mode()
def test_each_prompt_component_changes_the_logits(backbone: Backbone) -> None:
    """Guards against a forward that silently ignores prefixes, prompts or positions."""
    ids = _encode(backbone, TEXTS[:3])
    torch.manual_seed(0)
    base = _task(backbone, prefix_length=4, prompt_length=2, seed=7)
    ref = prompted_forward(backbone, ids, [base] * 3)
    assert base.prefix is not None and base.prompt is not None
    variants = {
        "prefix": TaskPrompt(torch.randn_like(base.prefix), base.prompt, base.head_weight, base.head_bias),
        "prompt": TaskPrompt(base.prefix, torch.randn_like(base.prompt), base.head_weight, base.head_bias),
        "positions": TaskPrompt(
            base.prefix, base.prompt, base.head_weight, base.head_bias, positions_after_prefix=False
        ),
    }
    for name, variant in variants.items():
        out = prompted_forward(backbone, ids, [variant] * 3)
        assert (out - ref).abs().max() > 1e-3, name


@torch.inference_mode()
def test_prefix_matches_manual_attention_reference(backbone: Backbone) -> None:
    """A one-row reference built from HF's own API: inputs_embeds + default positions + cache."""
    from transformers import DynamicCache

    task = _task(backbone, prefix_length=3, seed=11, positions="after_prefix")
    ids = _encode(backbone, ["hello world this is a test"])[0]
    ours = prompted_forward(backbone, [ids], [task])[0]
    assert task.prefix is not None
    prefix = task.prefix.unsqueeze(0)  # [1, layers, 2, heads, P, head_dim]
    cache = DynamicCache(ddp_cache_data=[(prefix[:, i, 0], prefix[:, i, 1]) for i in range(prefix.shape[1])])
    input_ids = torch.tensor([ids])
    mask = torch.ones(1, 3 + len(ids), dtype=torch.long)
    # Without explicit position ids, HF BERT numbers the text from the cache length: the "after_prefix" rule.
    out = backbone.model(input_ids=input_ids, attention_mask=mask, **cache_kwargs(backbone.model, cache))
    ref = out.last_hidden_state[0, 0] @ task.head_weight.T + task.head_bias
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_gradients_reach_prompt_tensors(backbone: Backbone) -> None:
    """The trainer's path: same function, differentiable in the task tensors only."""
    task = _task(backbone, prefix_length=3, prompt_length=2, seed=3)
    assert task.prefix is not None and task.prompt is not None
    for t in (task.prefix, task.prompt, task.head_weight, task.head_bias):
        t.requires_grad_(True)
    ids = _encode(backbone, TEXTS[:4])
    logits = prompted_forward(backbone, ids, [task] * 4)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for t in (task.prefix, task.prompt, task.head_weight, task.head_bias):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


@torch.inference_mode()
def test_roberta_positions_offset_by_padding_idx(tmp_path: Path) -> None:
    backbone = load_backbone(make_tiny_roberta(tmp_path / "roberta"))
    assert backbone.spec.position_base == backbone.model.config.pad_token_id + 1
    task = TaskPrompt.from_artifact(
        random_artifact(backbone.spec, prefix_length=0, prompt_length=0, seed=2),
        backbone.device,
        backbone.dtype,
    )
    ids = _encode(backbone, TEXTS[:3])
    ours = prompted_forward(backbone, ids, [task] * 3)
    # HF RoBERTa derives positions from input ids when none are given: the reference.
    for r, row in enumerate(ids):
        out = backbone.model(input_ids=torch.tensor([row]))
        ref = out.last_hidden_state[0, 0] @ task.head_weight.T + task.head_bias
        torch.testing.assert_close(ours[r], ref, rtol=0, atol=1e-5)


# --- PEFT: artifacts follow the conventions PEFT users already have -----------------------------


def _peft_texts(backbone: Backbone) -> dict[str, torch.Tensor]:
    enc = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.inference_mode()
def test_peft_prefix_tuning_logits_match(tiny_bert_dir: Path, backbone: Backbone) -> None:
    peft = pytest.importorskip("peft")
    if (reason := peft_prefix_refusal()) is not None:
        pytest.skip(reason)  # test_peft_io.py checks the same files against HF's own forward
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=3, attn_implementation="sdpa"
    )
    config = peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=5)
    model = peft.get_peft_model(base, config).eval()
    spec = backbone.spec
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
        model.base_model.classifier.weight.normal_(0, 1.0)
    expected = model(**_peft_texts(backbone)).logits

    # PEFT's table is [P, layers * 2 * hidden], read as [P, layers, 2 (key, value), heads, head_dim].
    table = model.prompt_encoder["default"].embedding.weight.detach()
    prefix = table.view(5, spec.num_layers, 2, spec.num_heads, spec.head_dim).permute(1, 2, 3, 0, 4)
    artifact = build_artifact(
        task="peft-prefix",
        labels=["a", "b", "c"],
        spec=spec,
        prefix=prefix,
        head_weight=model.base_model.classifier.weight,
        head_bias=model.base_model.classifier.bias,
        pooling="first",
        pooler="backbone",
        positions="after_prefix",
    )
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode(TEXTS, 64)]
    ours = prompted_forward(backbone, ids, [task] * len(ids))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # ... and mixed with another task the PEFT rows still match.
    other = TaskPrompt.from_artifact(
        random_artifact(spec, num_labels=2, prefix_length=2, prompt_length=3), backbone.device, backbone.dtype
    )
    mixed = prompted_forward(
        backbone, [x for i in ids for x in (i, i)], [t for _ in ids for t in (task, other)]
    )
    torch.testing.assert_close(mixed[0::2], expected, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_peft_prompt_tuning_logits_match(tiny_bert_dir: Path, backbone: Backbone) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=4, attn_implementation="sdpa"
    )
    config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=3)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
        model.base_model.classifier.weight.normal_(0, 1.0)
    expected = model(**_peft_texts(backbone)).logits

    artifact = build_artifact(
        task="peft-prompt",
        labels=["a", "b", "c", "d"],
        spec=backbone.spec,
        prompt=model.prompt_encoder["default"].embedding.weight,
        head_weight=model.base_model.classifier.weight,
        head_bias=model.base_model.classifier.bias,
        method="prompt-tuning",
        pooling="first",  # PEFT's classifier reads sequence position 0: the first virtual token
        pooler="backbone",
    )
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    ids = [e.input_ids for e in backbone.encode(TEXTS, 60)]
    ours = prompted_forward(backbone, ids, [task] * len(ids))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
