"""DeBERTa-v2/v3 with deep prefixes against Hugging Face's own model.

Proven here, for both the v3 layout (log-bucketed relative positions, shared keys, no absolute
positions) and the v2 layout (absolute positions, separate position projections, the convolution):

- without a prompt, ptserve's layer loop gives Hugging Face's hidden states on every real token;
- a mixed batch (different prefix lengths, input prompts, a ``from_zero`` row, random values in the
  padded prefix slots) equals a row-by-row reference: ``DebertaV2Model`` itself, with
  ``DisentangledSelfAttention.forward`` patched to apply the P-tuning v2 authors' rules (prefix keys in
  the content-to-content scores only, relative positions among the sequence tokens only, text numbered
  after the prefix);
- a row whose prefix is fully masked gives what it gives in a batch with no prefix at all;
- the comparison can fail: counting relative positions over ``[prefix | text]`` changes the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from prompts.backbone import Backbone, load_backbone
from prompts.backbones import Layout
from prompts.forward import PromptBatch, TaskPrompt, batch_from_tasks, run_prompted
from tests.factories import random_artifact

KINDS = ("deberta-v3", "deberta-v2")
# 6, 21, 3, 9, 10 and 8 tokens with [CLS]/[SEP]: rows longer and shorter than the prefixes.
TEXTS = [
    "this phone is great",
    "the delivery was slow but the quality of the shirt is fine and the price was cheap",
    "a",
    "terrible battery and the screen is broken",
    "what time is the game",
    "free offer call now hello world",
]
ATOL = 1e-5
# How the reference scores prefix slots: the stated rules, or relative positions over [prefix | text].
Rule = Literal["stated", "positions_over_prefix"]


@pytest.fixture(scope="module")
def deberta(
    kind_backbone: Callable[[str], Backbone], kind_dir: Callable[[str], Path]
) -> Callable[[str], Backbone]:
    """The backbone of a kind. The tiny v2's relative embeddings are N(0, 0.02) and not normalised (v3
    layer-norms them), so its position bias is ~1e-4 of the scores and a wrong position rule would pass
    unseen: this module's own copy gets them at unit scale, as a layer-normed table has."""
    v2 = load_backbone(kind_dir("deberta-v2"))
    table = v2.model.encoder.rel_embeddings.weight  # [2 * span, hidden]
    with torch.no_grad():
        table.div_(table.std())
    return lambda kind: v2 if kind == "deberta-v2" else kind_backbone(kind)


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


def _patched_attention(backbone: Backbone, row: _RowPrefix, rule: Rule) -> Callable[..., Any]:
    """A ``DisentangledSelfAttention.forward`` that puts ``row.prefix`` in front of the keys and values,
    built from Hugging Face's own projections, scale and disentangled bias."""
    layers = [layer.attention.self for layer in backbone.model.encoder.layer]

    def forward(
        self: Any,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        output_attentions: bool = False,
        query_states: torch.Tensor | None = None,
        relative_pos: torch.Tensor | None = None,
        rel_embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        assert query_states is None and not output_attentions
        index = next(i for i, module in enumerate(layers) if module is self)
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        rows, seq, _ = hidden_states.shape
        query = self.transpose_for_scores(self.query_proj(hidden_states), heads)  # [B * heads, T, d]
        key = self.transpose_for_scores(self.key_proj(hidden_states), heads)
        value = self.transpose_for_scores(self.value_proj(hidden_states), heads)
        if row.prefix is None:
            prefix_key = key.new_zeros(rows * heads, 0, head_dim)
            prefix_value = prefix_key
        else:
            prefix_key = row.prefix[index, 0].repeat(rows, 1, 1)  # [B * heads, P, d]
            prefix_value = row.prefix[index, 1].repeat(rows, 1, 1)
        slots = prefix_key.shape[1]
        keys = torch.cat([prefix_key, key], dim=1)  # [B * heads, P + T, d]
        values = torch.cat([prefix_value, value], dim=1)

        factor = 1 + int("c2p" in self.pos_att_type) + int("p2c" in self.pos_att_type)
        scale = hf_deberta.scaled_size_sqrt(query, factor)
        scores = torch.bmm(query, keys.transpose(-1, -2) / scale.to(query.dtype))  # [B * heads, T, P + T]
        rel = self.pos_dropout(rel_embeddings)
        if rule == "stated":
            # Relative positions among the sequence only (relative_pos is the encoder's, over T);
            # the prefix columns get no position bias.
            text_bias = self.disentangled_attention_bias(query, key, relative_pos, rel, factor)  # [B*h, T, T]
            bias = torch.cat([text_bias.new_zeros(rows * heads, seq, slots), text_bias], dim=2)
        else:
            # The wrong rule: prefix slots numbered 0..P-1 and the text after them, so prefix columns
            # get c2p/p2c scores too. Zero queries stand in for the prefix rows, dropped afterwards.
            padded_query = torch.cat([query.new_zeros(rows * heads, slots, head_dim), query], dim=1)
            over_all = hf_deberta.build_relative_position(
                keys, keys, bucket_size=self.position_buckets, max_position=self.max_relative_positions
            )  # [1, P + T, P + T]
            bias = self.disentangled_attention_bias(padded_query, keys, over_all, rel, factor)[:, slots:]
        scores = (scores + bias).view(rows, heads, seq, slots + seq)

        # attention_mask: [B, 1, T, T] of 0/1 over the text; every prefix slot of the row is visible.
        visible = torch.cat([attention_mask.new_ones(rows, 1, seq, slots), attention_mask], dim=3).bool()
        scores = scores.masked_fill(~visible, torch.finfo(query.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        context = torch.bmm(probs.view(rows * heads, seq, slots + seq), values)  # [B * heads, T, d]
        context = context.view(rows, heads, seq, head_dim).permute(0, 2, 1, 3).reshape(rows, seq, -1)
        return context, None

    return forward


def _reference_hidden(
    backbone: Backbone,
    monkeypatch: pytest.MonkeyPatch,
    ids: Sequence[Sequence[int]],
    tasks: Sequence[TaskPrompt],
    rule: Rule = "stated",
) -> list[torch.Tensor]:
    """Row by row through ``DebertaV2Model`` with the patched attention: [K_b + T_b, hidden] per row."""
    row = _RowPrefix()
    out: list[torch.Tensor] = []
    with monkeypatch.context() as patch:
        patch.setattr(
            hf_deberta.DisentangledSelfAttention, "forward", _patched_attention(backbone, row, rule)
        )
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


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_loop_without_prompt_equals_hugging_face(kind: str, deberta: Callable[[str], Backbone]) -> None:
    backbone = deberta(kind)
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


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_mixed_prefixes_equal_patched_hugging_face(
    kind: str, deberta: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = deberta(kind)
    ids, tasks = _ids(backbone), _mixed_tasks(backbone)
    ours = _ptserve_hidden(backbone, ids, tasks)  # [B, S, hidden]
    reference = _reference_hidden(backbone, monkeypatch, ids, tasks)

    for b, (text, task) in enumerate(zip(ids, tasks, strict=True)):
        # Every position of the row: its input prompt (K_b) and its text (T_b).
        assert reference[b].shape[0] == task.prompt_length + len(text)
        torch.testing.assert_close(ours[b, : reference[b].shape[0]], reference[b], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_fully_masked_prefix_equals_no_prefix(kind: str, deberta: Callable[[str], Backbone]) -> None:
    backbone = deberta(kind)
    ids = _ids(backbone)[:2]
    plain = _task(backbone, task="plain", prefix_length=0, prompt_length=2, seed=7)
    longest = _task(backbone, task="longest", prefix_length=5, seed=8)
    other = _task(backbone, task="other", prefix_length=0, seed=9)

    # Row 0 has no prefix; in the first batch its 5 slots hold random values (padding), masked.
    with_prefix = _ptserve_hidden(backbone, ids, [plain, longest])
    without = _ptserve_hidden(backbone, ids, [plain, other])
    rows = plain.prompt_length + len(ids[0])
    torch.testing.assert_close(with_prefix[0, :rows], without[0, :rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_position_bias_on_prefix_slots_would_be_caught(
    kind: str, deberta: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = deberta(kind)
    ids, tasks = _ids(backbone), _mixed_tasks(backbone)
    ours = _ptserve_hidden(backbone, ids, tasks)
    # ptserve equals the stated rules' reference (test_mixed_prefixes_equal_patched_hugging_face).
    wrong = _reference_hidden(backbone, monkeypatch, ids, tasks, rule="positions_over_prefix")

    with_prefix = [b for b, task in enumerate(tasks) if task.prefix_length]
    without = [b for b, task in enumerate(tasks) if not task.prefix_length]
    assert _max_error(ours, wrong, with_prefix) > 1e-3
    # Without a prefix both rules are the same: relative positions are shift-invariant.
    assert _max_error(ours, wrong, without) <= ATOL
