"""DeBERTa-v2/v3 with deep prefixes against Hugging Face's own model.

Proven here, for both the v3 layout (log-bucketed relative positions, shared keys, no absolute
positions) and the v2 layout (absolute positions, separate position projections, the convolution):

- a mixed batch (different prefix lengths, input prompts, a ``from_zero`` row, random values in the
  padded prefix slots) equals a row-by-row reference: ``DebertaV2Model`` itself, with
  ``DisentangledSelfAttention.forward`` patched to apply the P-tuning v2 authors' rules (prefix keys in
  the content-to-content scores only, relative positions among the sequence tokens only, text numbered
  after the prefix);
- a row whose prefix is fully masked gives what it gives in a batch with no prefix at all;
- the comparison can fail: counting relative positions over ``[prefix | text]`` changes the result.

Without a prompt, the loop equals Hugging Face's model on every real token for every family
(test_families.py). The texts (mixed_batch.TEXTS) are longer and shorter than the prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from prompts.backbone import Backbone, load_backbone
from prompts.forward import TaskPrompt
from tests.prompts.backbones.mixed_batch import (
    ATOL,
    RowPrefix,
    assert_fully_masked_prefix_is_no_prefix,
    assert_rows_equal_reference,
    mixed_tasks,
    prefixed_and_plain_errors,
    ptserve_hidden,
    reference_rows,
    text_ids,
)

KINDS = ("deberta-v3", "deberta-v2")
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


def _patched_attention(backbone: Backbone, row: RowPrefix, rule: Rule) -> Callable[..., Any]:
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
    row = RowPrefix()
    with monkeypatch.context() as patch:
        patch.setattr(
            hf_deberta.DisentangledSelfAttention, "forward", _patched_attention(backbone, row, rule)
        )
        return reference_rows(backbone, ids, tasks, row)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_mixed_prefixes_equal_patched_hugging_face(
    kind: str, deberta: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = deberta(kind)
    ids, tasks = text_ids(backbone), mixed_tasks(backbone)
    ours = ptserve_hidden(backbone, ids, tasks)  # [B, S, hidden]
    reference = _reference_hidden(backbone, monkeypatch, ids, tasks)
    assert_rows_equal_reference(ours, reference, ids, tasks)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_fully_masked_prefix_equals_no_prefix(kind: str, deberta: Callable[[str], Backbone]) -> None:
    backbone = deberta(kind)
    # Row 0 has no prefix; next to a row with 5 prefix slots, its own 5 slots hold random values.
    assert_fully_masked_prefix_is_no_prefix(backbone)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_position_bias_on_prefix_slots_would_be_caught(
    kind: str, deberta: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = deberta(kind)
    ids, tasks = text_ids(backbone), mixed_tasks(backbone)
    ours = ptserve_hidden(backbone, ids, tasks)
    # ptserve equals the stated rules' reference (test_mixed_prefixes_equal_patched_hugging_face).
    wrong = _reference_hidden(backbone, monkeypatch, ids, tasks, rule="positions_over_prefix")

    with_prefix, without = prefixed_and_plain_errors(ours, wrong, tasks)
    assert with_prefix > 1e-3
    # Without a prefix both rules are the same: relative positions are shift-invariant.
    assert without <= ATOL
