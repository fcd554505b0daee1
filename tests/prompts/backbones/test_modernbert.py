"""ModernBERT with deep prefixes against Hugging Face's own model.

Proven here, on a tiny ModernBERT with a global first layer and two local layers (window of 4 tokens,
so texts of more than 6 tokens have keys out of reach):

- a mixed batch (different prefix lengths, input prompts, a ``from_zero`` row, random values in the
  padded prefix slots) equals a row-by-row reference: ``ModernBertModel`` itself, with
  ``ModernBertAttention.forward`` patched to apply ptserve's convention (prefix keys never rotated,
  text positions after the prefix, prefix slots visible in global and local layers, the window limiting
  sequence keys only);
- a row whose prefix is fully masked gives what it gives in a batch with no prefix at all;
- the comparison can fail: rotating the prefix keys, or hiding the prefix from local layers, changes
  the result.

Without a prompt, the loop equals Hugging Face's model on every real token for every family
(test_families.py). Four of the texts (mixed_batch.TEXTS: 6, 21, 3, 9, 10 and 8 tokens) reach past the
local window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest
import torch
from transformers.models.modernbert import modeling_modernbert as hf_modernbert

from prompts.backbone import Backbone
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

KIND = "modernbert"
# How the reference treats prefix slots: as stated, rotated like keys at positions 0..P-1, or hidden
# from the local (sliding-window) layers.
Rule = Literal["stated", "rotated_prefix", "local_hides_prefix"]


def _text_visible(attention_mask: torch.Tensor | None, rows: int, seq: int) -> torch.Tensor:
    """Hugging Face's mask as [B, 1, T, T] bool. SDPA gets None (nothing masked) or a bool mask (True:
    visible); eager an additive one (0: visible). Sliding layers get the window over text keys only."""
    if attention_mask is None:
        return torch.ones(rows, 1, seq, seq, dtype=torch.bool)
    if attention_mask.dtype == torch.bool:
        return attention_mask.expand(rows, 1, seq, seq)
    return (attention_mask == 0).expand(rows, 1, seq, seq)


def _patched_attention(backbone: Backbone, row: RowPrefix, rule: Rule) -> Callable[..., Any]:
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
    row = RowPrefix()
    with monkeypatch.context() as patch:
        patch.setattr(hf_modernbert.ModernBertAttention, "forward", _patched_attention(backbone, row, rule))
        return reference_rows(backbone, ids, tasks, row)


def test_tiny_model_has_global_and_local_layers(kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(KIND)
    # What the other tests rely on: both layer kinds, and a window shorter than most texts.
    assert set(backbone.model.config.layer_types) == {"full_attention", "sliding_attention"}
    assert backbone.model.config.sliding_window == 2
    assert sum(len(row) > 6 for row in text_ids(backbone)) >= 3


@torch.inference_mode()
def test_mixed_prefixes_equal_patched_hugging_face(
    kind_backbone: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = kind_backbone(KIND)
    ids, tasks = text_ids(backbone), mixed_tasks(backbone)
    ours = ptserve_hidden(backbone, ids, tasks)  # [B, S, hidden]
    reference = _reference_hidden(backbone, monkeypatch, ids, tasks)
    assert_rows_equal_reference(ours, reference, ids, tasks)


@torch.inference_mode()
def test_fully_masked_prefix_equals_no_prefix(kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(KIND)
    # Row 0 has no prefix; next to a row with 5 prefix slots, its own 5 slots hold random values.
    assert_fully_masked_prefix_is_no_prefix(backbone)


@pytest.mark.parametrize("rule", ["rotated_prefix", "local_hides_prefix"])
@torch.inference_mode()
def test_wrong_prefix_rule_would_be_caught(
    rule: Rule, kind_backbone: Callable[[str], Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = kind_backbone(KIND)
    ids, tasks = text_ids(backbone), mixed_tasks(backbone)
    ours = ptserve_hidden(backbone, ids, tasks)
    # ptserve equals the stated rules' reference (test_mixed_prefixes_equal_patched_hugging_face).
    wrong = _reference_hidden(backbone, monkeypatch, ids, tasks, rule=rule)

    with_prefix, without = prefixed_and_plain_errors(ours, wrong, tasks)
    assert with_prefix > 1e-3
    # Rows without a prefix are untouched by either rule.
    assert without <= ATOL
