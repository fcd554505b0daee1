"""ModernBERT with deep prefixes against Hugging Face's own model.

Proven here, on a tiny ModernBERT with a global first layer and two local layers (window of 4 tokens,
so texts of more than 6 tokens have keys out of reach):

- without a prompt, ptserve's layer loop gives Hugging Face's hidden states on every real token;
- a mixed batch (different prefix lengths, input prompts, a ``from_zero`` row, random values in the
  padded prefix slots) equals a row-by-row reference: ``ModernBertModel`` itself, with
  ``ModernBertAttention.forward`` patched to apply ptserve's convention (prefix keys never rotated,
  text positions after the prefix, prefix slots visible in global and local layers, the window limiting
  sequence keys only);
- a row whose prefix is fully masked gives what it gives in a batch with no prefix at all;
- the comparison can fail: rotating the prefix keys, or hiding the prefix from local layers, changes
  the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest
import torch
from transformers.models.modernbert import modeling_modernbert as hf_modernbert

from prompts.backbone import Backbone
from prompts.backbones import Layout
from prompts.forward import PromptBatch, TaskPrompt, batch_from_tasks, run_prompted
from tests.factories import random_artifact

KIND = "modernbert"
# 6, 21, 3, 9, 10 and 8 tokens with [CLS]/[SEP]: four rows reach past the local window (4 tokens).
TEXTS = [
    "this phone is great",
    "the delivery was slow but the quality of the shirt is fine and the price was cheap",
    "a",
    "terrible battery and the screen is broken",
    "what time is the game",
    "free offer call now hello world",
]
ATOL = 1e-5
# How the reference treats prefix slots: as stated, rotated like keys at positions 0..P-1, or hidden
# from the local (sliding-window) layers.
Rule = Literal["stated", "rotated_prefix", "local_hides_prefix"]


def _task(backbone: Backbone, **kwargs: Any) -> TaskPrompt:
    artifact = random_artifact(backbone.spec, **kwargs)
    return TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)


def _ids(backbone: Backbone) -> list[list[int]]:
    return [e.input_ids for e in backbone.encode(TEXTS, 40)]


def _mixed_tasks(backbone: Backbone) -> list[TaskPrompt]:
    """One task per text: prefix lengths 0 to 5 (the longest), input prompts, a from_zero row."""
    return [
        _task(backbone, task="none", prefix_length=0, seed=1),
        _task(backbone, task="short", prefix_length=2, seed=2),
        _task(backbone, task="longest", prefix_length=5, seed=3),
        _task(backbone, task="both", prefix_length=3, prompt_length=2, seed=4),
        _task(backbone, task="prompt", prefix_length=0, prompt_length=3, seed=5),
        _task(backbone, task="zero", prefix_length=4, positions="from_zero", seed=6),
    ]


def _noisy_padding(batch: PromptBatch, seed: int) -> PromptBatch:
    """The batch with random values in every padded prefix slot: masking, not zeros, must hide them."""
    if batch.prefix is None:
        return batch
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.prefix.shape, generator=g).to(batch.prefix)  # [B, layers, 2, heads, P, d]
    slot = torch.arange(batch.prefix.shape[4], device=batch.prefix.device)
    real = (slot < batch.prefix_len[:, None]).view(-1, 1, 1, 1, slot.shape[0], 1)  # [B, 1, 1, 1, P, 1]
    return dataclasses.replace(batch, prefix=torch.where(real, batch.prefix, noise))


def _ptserve_hidden(
    backbone: Backbone, ids: Sequence[Sequence[int]], tasks: Sequence[TaskPrompt]
) -> torch.Tensor:
    """ptserve's final hidden states [B, S, hidden] for a mixed batch, read from inside run_prompted so
    the prompt gathering, positions and layout are ptserve's own."""
    family = backbone.family
    captured: list[torch.Tensor] = []

    def encoder(
        embeds: torch.Tensor, positions: torch.Tensor, layout: Layout, prefix: torch.Tensor | None
    ) -> torch.Tensor:
        hidden = family.layers(embeds, positions, family.masks(layout, embeds.dtype), prefix)
        captured.append(hidden)
        return hidden

    batch = _noisy_padding(batch_from_tasks(tasks, backbone.device), seed=99)
    run_prompted(backbone, ids, batch, encoder)
    return captured[0]


class _RowPrefix:
    """The prefix [layers, 2, heads, P, head_dim] of the row the reference is running (None: none)."""

    prefix: torch.Tensor | None = None


def _text_visible(attention_mask: torch.Tensor | None, rows: int, seq: int) -> torch.Tensor:
    """Hugging Face's mask as [B, 1, T, T] bool. SDPA gets None (nothing masked) or a bool mask (True:
    visible); eager an additive one (0: visible). Sliding layers get the window over text keys only."""
    if attention_mask is None:
        return torch.ones(rows, 1, seq, seq, dtype=torch.bool)
    if attention_mask.dtype == torch.bool:
        return attention_mask.expand(rows, 1, seq, seq)
    return (attention_mask == 0).expand(rows, 1, seq, seq)


def _patched_attention(backbone: Backbone, row: _RowPrefix, rule: Rule) -> Callable[..., Any]:
    """A ``ModernBertAttention.forward`` that puts ``row.prefix`` in front of the keys and values, built
    from Hugging Face's own projections and rotary embedding; the softmax is written out (eager)."""
    model = backbone.model
    layers = [layer.attn for layer in model.layers]

    def forward(
        self: Any,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        assert position_embeddings is not None
        index = next(i for i, module in enumerate(layers) if module is self)
        layer_type = model.config.layer_types[index]
        rows, seq, _ = hidden_states.shape
        qkv = self.Wqkv(hidden_states).view(rows, seq, 3, -1, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # [B, heads, T, d]
        cos, sin = position_embeddings  # [B, T, d]
        query, key = hf_modernbert.apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        if row.prefix is None:
            prefix_key = key.new_zeros(rows, key.shape[1], 0, self.head_dim)
            prefix_value = prefix_key
        else:
            prefix_key = row.prefix[index, 0].expand(rows, -1, -1, -1)  # [B, heads, P, d]
            prefix_value = row.prefix[index, 1].expand(rows, -1, -1, -1)
        slots = prefix_key.shape[2]
        if rule == "rotated_prefix":
            # The wrong rule: prefix keys rotated as if they sat at positions 0..P-1.
            slot_positions = torch.arange(slots)[None].expand(rows, -1)  # [B, P]
            cos_p, sin_p = model.rotary_emb(hidden_states, slot_positions, layer_type)  # [B, P, d]
            _, prefix_key = hf_modernbert.apply_rotary_pos_emb(prefix_key, prefix_key, cos_p, sin_p)
        keys = torch.cat([prefix_key, key], dim=2)  # [B, heads, P + T, d]
        values = torch.cat([prefix_value, value], dim=2)

        hide = rule == "local_hides_prefix" and layer_type == "sliding_attention"
        prefix_visible = torch.full((rows, 1, seq, slots), not hide)  # [B, 1, T, P]
        visible = torch.cat([prefix_visible, _text_visible(attention_mask, rows, seq)], dim=3)
        scores = torch.matmul(query, keys.transpose(2, 3)) * self.head_dim**-0.5  # [B, heads, T, P + T]
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        context = torch.matmul(probs, values).transpose(1, 2).reshape(rows, seq, -1)  # [B, T, hidden]
        return self.out_drop(self.Wo(context)), None

    return forward


def _reference_hidden(
    backbone: Backbone,
    monkeypatch: pytest.MonkeyPatch,
    ids: Sequence[Sequence[int]],
    tasks: Sequence[TaskPrompt],
    rule: Rule = "stated",
) -> list[torch.Tensor]:
    """Row by row through ``ModernBertModel`` with the patched attention: [K_b + T_b, hidden] per row."""
    row = _RowPrefix()
    out: list[torch.Tensor] = []
    with monkeypatch.context() as patch:
        patch.setattr(hf_modernbert.ModernBertAttention, "forward", _patched_attention(backbone, row, rule))
        for text, task in zip(ids, tasks, strict=True):
            row.prefix = task.prefix
            tokens = backbone.word_embeddings(torch.tensor([text]))  # [1, T, hidden]
            embeds = tokens if task.prompt is None else torch.cat([task.prompt[None], tokens], dim=1)
            length = embeds.shape[1]  # K + T
            offset = task.prefix_length if task.positions_after_prefix else 0
            hidden = backbone.model(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, length, dtype=torch.long),
                position_ids=offset + torch.arange(length)[None],  # [1, K + T]
            ).last_hidden_state
            out.append(hidden[0])
    return out


def _max_error(ours: torch.Tensor, reference: list[torch.Tensor], rows: Sequence[int]) -> float:
    return max(float((ours[b, : len(reference[b])] - reference[b]).abs().max()) for b in rows)


def test_tiny_model_has_global_and_local_layers(kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(KIND)
    # What the other tests rely on: both layer kinds, and a window shorter than most texts.
    assert set(backbone.model.config.layer_types) == {"full_attention", "sliding_attention"}
    assert backbone.model.config.sliding_window == 2
    assert sum(len(row) > 6 for row in _ids(backbone)) >= 3


@torch.inference_mode()
def test_loop_without_prompt_equals_hugging_face(kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(KIND)
    family = backbone.family
    ids = _ids(backbone)
    lengths = torch.tensor([len(row) for row in ids])  # [B]
    seq = int(lengths.max())
    padded = torch.tensor([[*row, *[backbone.pad_token_id] * (seq - len(row))] for row in ids])  # [B, T]
    attention_mask = (torch.arange(seq)[None] < lengths[:, None]).long()  # [B, T]

    layout = Layout(prefix=0, seq=seq, prefix_len=torch.zeros_like(lengths), seq_len=lengths)
    positions = family.positions(torch.zeros_like(lengths), seq)  # [B, T]
    ours = family.layers(
        family.word_embeddings(padded), positions, family.masks(layout, backbone.dtype), None
    )
    theirs = backbone.model(input_ids=padded, attention_mask=attention_mask).last_hidden_state

    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_mixed_prefixes_equal_patched_hugging_face(
    kind_backbone: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = kind_backbone(KIND)
    ids, tasks = _ids(backbone), _mixed_tasks(backbone)
    ours = _ptserve_hidden(backbone, ids, tasks)  # [B, S, hidden]
    reference = _reference_hidden(backbone, monkeypatch, ids, tasks)

    for b, (text, task) in enumerate(zip(ids, tasks, strict=True)):
        # Every position of the row: its input prompt (K_b) and its text (T_b).
        assert reference[b].shape[0] == task.prompt_length + len(text)
        torch.testing.assert_close(ours[b, : reference[b].shape[0]], reference[b], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_fully_masked_prefix_equals_no_prefix(kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(KIND)
    ids = _ids(backbone)[:2]
    plain = _task(backbone, task="plain", prefix_length=0, prompt_length=2, seed=7)
    longest = _task(backbone, task="longest", prefix_length=5, seed=8)
    other = _task(backbone, task="other", prefix_length=0, seed=9)

    # Row 0 has no prefix; in the first batch its 5 slots hold random values (padding), masked.
    with_prefix = _ptserve_hidden(backbone, ids, [plain, longest])
    without = _ptserve_hidden(backbone, ids, [plain, other])
    rows = plain.prompt_length + len(ids[0])
    torch.testing.assert_close(with_prefix[0, :rows], without[0, :rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule", ["rotated_prefix", "local_hides_prefix"])
@torch.inference_mode()
def test_wrong_prefix_rule_would_be_caught(
    rule: Rule, kind_backbone: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = kind_backbone(KIND)
    ids, tasks = _ids(backbone), _mixed_tasks(backbone)
    ours = _ptserve_hidden(backbone, ids, tasks)
    # ptserve equals the stated rules' reference (test_mixed_prefixes_equal_patched_hugging_face).
    wrong = _reference_hidden(backbone, monkeypatch, ids, tasks, rule=rule)

    with_prefix = [b for b, task in enumerate(tasks) if task.prefix_length]
    without = [b for b, task in enumerate(tasks) if not task.prefix_length]
    assert _max_error(ours, wrong, with_prefix) > 1e-3
    # Rows without a prefix are untouched by either rule.
    assert _max_error(ours, wrong, without) <= ATOL
