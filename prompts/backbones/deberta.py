"""DeBERTa-v2 and DeBERTa-v3 (``model_type`` "deberta-v2").

Disentangled attention scores a query against a key by content (content-to-content) and by their
relative position (content-to-position, position-to-content). A prefix has content but no position,
so ptserve follows the rules of the P-tuning v2 authors' DeBERTa code:

- prefix keys take part in the content-to-content scores only; the position-bias columns of the
  prefix slots are zero;
- relative positions are computed among the sequence tokens only (input prompt and text), exactly as
  without a prefix;
- absolute position embeddings (DeBERTa-v2 checkpoints with ``position_biased_input``; v3 has none)
  number the text after the prefix unless the manifest says ``from_zero``.

The loop calls the model's own projections, embeddings, relative embeddings and output blocks; the
attention scores are assembled as Hugging Face's ``DisentangledSelfAttention`` assembles them, with the
position bias passed to SDPA as part of its additive mask.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from prompts.backbones.base import (
    BackboneFamily,
    Collected,
    Layout,
    LowRank,
    Shape,
    attend,
    dense_norm,
    encoder_lora_targets,
    key_mask,
    layer_scales,
    project,
)
from prompts.errors import BackboneError


class DebertaFamily(BackboneFamily):
    name: ClassVar[str] = "deberta-v2"
    model_types: ClassVar[frozenset[str]] = frozenset({"deberta-v2"})
    # DebertaV2Model has no SDPA attention of its own; the loop below calls SDPA.
    attn_implementation: ClassVar[str] = "eager"

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        encoder = model.encoder
        self.relative = bool(getattr(encoder, "relative_attention", False))
        self.buckets = int(getattr(encoder, "position_buckets", -1)) if self.relative else -1
        self.max_relative = int(getattr(encoder, "max_relative_positions", -1)) if self.relative else -1
        types = getattr(self.config, "pos_att_type", None) or []
        self.c2p, self.p2c = "c2p" in types, "p2c" in types
        self._reaches: dict[int, int] = {}

    @classmethod
    def check_config(cls, config: Any) -> None:
        types = set(getattr(config, "pos_att_type", None) or [])
        if types - {"c2p", "p2c"}:
            raise BackboneError(f"pos_att_type {sorted(types)} is not supported (only 'c2p' and 'p2c')")

    @classmethod
    def read_shape(cls, config: Any) -> Shape:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "attention_head_size", None) or int(config.hidden_size) // heads)
        return Shape(
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            hidden_size=int(config.hidden_size),
            max_positions=int(config.max_position_embeddings),
            position_base=0,
            ffn_size=int(config.intermediate_size),
        )

    @classmethod
    def conventions(cls) -> dict[str, str]:
        return {
            "attention": "bidirectional",
            "prefix_keys": "as_stored",
            "position_encoding": "relative_among_sequence",
            "prefix_scores": "content_to_content",  # zero position bias for prefix slots
        }

    @classmethod
    def lora_targets(cls, shape: Shape) -> dict[str, tuple[int, int]]:
        # The content projections only: with share_att_key the same query/key projections also map
        # the relative-position embeddings, which every row shares; those stay the backbone's.
        return encoder_lora_targets(shape)

    def masks(self, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        masks = {
            "keys": key_mask(layout, dtype),  # [B, 1, 1, P + S]
            "valid": layout.valid_queries().to(dtype),  # [B, S]: the embeddings zero padded tokens
        }
        if self.relative:
            masks["relative"] = relative_positions(
                layout.seq, self.buckets, self.max_relative, layout
            )  # [S, S]
        return masks

    def layers(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[str, torch.Tensor],
        prefix: torch.Tensor | None,
        scale_delta: torch.Tensor | None = None,
        collect: Collected | None = None,
        lora: LowRank | None = None,
    ) -> torch.Tensor:
        model = self.model
        encoder = model.encoder
        rows, seq, _ = embeds.shape
        valid = masks["valid"]  # [B, S]
        token_types = torch.zeros_like(positions)  # [B, S]
        embedded: torch.Tensor = model.embeddings(
            inputs_embeds=embeds, token_type_ids=token_types, position_ids=positions, mask=valid
        )  # [B, S, hidden]
        rel_embeddings = encoder.get_rel_embedding() if self.relative else None  # [2 * span, hidden]
        hidden = embedded
        for index, layer in enumerate(encoder.layer):
            attention = layer.attention.self
            heads, head_dim = attention.num_attention_heads, attention.attention_head_size

            def split(x: torch.Tensor, heads: int = heads, head_dim: int = head_dim) -> torch.Tensor:
                return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)  # [b, heads, n, head_dim]

            ia3 = layer_scales(scale_delta, index, heads * head_dim)
            query = split(
                project(attention.query_proj, hidden, lora, "query", index)
            )  # [B, heads, S, head_dim]
            key = project(attention.key_proj, hidden, lora, "key", index)  # [B, S, hidden]
            value = project(attention.value_proj, hidden, lora, "value", index)
            if ia3 is not None:
                # The content keys only: the relative-position keys are shared by every row.
                key, value = key.addcmul(key, ia3[0]), value.addcmul(value, ia3[1])
            key, value = split(key), split(value)  # [B, heads, S, head_dim]
            factor = 1 + int(self.c2p) + int(self.p2c)
            scale = math.sqrt(head_dim * factor)
            mask = masks["keys"]
            if rel_embeddings is not None:
                bias = self._position_bias(attention, query, key, masks["relative"], rel_embeddings, scale)
                prefix_cols = 0 if prefix is None else prefix.shape[4]
                zeros = bias.new_zeros(rows, heads, seq, prefix_cols)
                mask = mask + torch.cat([zeros, bias], dim=3)  # [B, heads, S, P + S]
            if collect is not None:
                collect.append((key, value))
            layer_prefix = None if prefix is None else prefix[:, index]  # [B, 2, heads, P, head_dim]
            context = attend(query, key, value, layer_prefix, mask, 1.0 / scale)
            context = context.transpose(1, 2).reshape(rows, seq, heads * head_dim)  # [B, S, hidden]
            out = dense_norm(layer.attention.output, context, hidden, lora, "attention_output", index)
            intermediate = layer.intermediate
            inner = intermediate.intermediate_act_fn(
                project(intermediate.dense, out, lora, "ffn_in", index)
            )  # [B, S, ffn]
            if ia3 is not None:
                inner = inner.addcmul(inner, ia3[2])
            out = dense_norm(layer.output, inner, out, lora, "ffn_out", index)
            if index == 0 and encoder.conv is not None:
                out = encoder.conv(embedded, out, valid)
            hidden = out
        return hidden

    def _position_bias(
        self,
        attention: Any,
        query: torch.Tensor,  # [B, heads, S, head_dim]
        key: torch.Tensor,  # [B, heads, S, head_dim]
        relative: torch.Tensor,  # [S, S] long: bucketed query - key
        rel_embeddings: torch.Tensor,  # [2 * span, hidden]
        scale: float,
    ) -> torch.Tensor:
        """Content-to-position plus position-to-content scores among sequence tokens [B, heads, S, S],
        already divided by ``scale`` (Hugging Face's ``disentangled_attention_bias``)."""
        span = int(attention.pos_ebd_size)
        rows, heads, seq, head_dim = query.shape
        # Hugging Face projects all 2 * span relative embeddings (512 on v3) and scores every query
        # against them; tokens of one sequence only ever use the window of relative positions they
        # span. Projecting that window alone gives the same scores (the gather picks the same dot
        # products) for a fraction of the work: on DeBERTa-v3-base at 25 tokens the full table was
        # ~20% of the forward.
        reach = self._reach(seq)
        lo, hi = max(0, span - reach), min(2 * span - 1, span + reach)
        rel = rel_embeddings[lo : hi + 1].unsqueeze(0)  # [1, W, hidden]

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(1, -1, heads, head_dim).transpose(1, 2)  # [1, heads, W, head_dim]

        bias = query.new_zeros(rows, heads, seq, seq)
        if self.c2p:
            pos_key = split(
                attention.key_proj(rel) if attention.share_att_key else attention.pos_key_proj(rel)
            )
            c2p = torch.matmul(query, pos_key.transpose(-1, -2))  # [B, heads, S, W]
            index = (torch.clamp(relative + span, 0, span * 2 - 1) - lo).expand(rows, heads, seq, seq)
            bias = bias + torch.gather(c2p, -1, index) / scale
        if self.p2c:
            pos_query = split(
                attention.query_proj(rel) if attention.share_att_key else attention.pos_query_proj(rel)
            )
            p2c = torch.matmul(key, pos_query.transpose(-1, -2))  # [B, heads, S (key), W]
            index = (torch.clamp(-relative + span, 0, span * 2 - 1) - lo).expand(rows, heads, seq, seq)
            bias = bias + torch.gather(p2c, -1, index).transpose(-1, -2) / scale
        return bias

    def _reach(self, seq: int) -> int:
        """The largest |bucketed relative position| among ``seq`` tokens, on the host (no device sync,
        so the slice it sets is fixed for a CUDA graph's bucket)."""
        found = self._reaches.get(seq)
        if found is None:
            far = torch.tensor([seq - 1])
            found = self._reaches[seq] = int(bucketed(far, self.buckets, self.max_relative).abs().max())
        return found


def relative_positions(seq: int, buckets: int, max_position: int, layout: Layout) -> torch.Tensor:
    """Query position minus key position among ``seq`` tokens [S, S], log-bucketed as DeBERTa does
    when ``buckets`` > 0 (exact within half the buckets, logarithmic beyond)."""
    ids = torch.arange(seq, device=layout.seq_len.device)
    return bucketed(ids.unsqueeze(1) - ids.unsqueeze(0), buckets, max_position)  # [S, S]


def bucketed(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log buckets of relative positions (long in, long out); unchanged when ``buckets`` <= 0."""
    if buckets <= 0 or max_position <= 0:
        return relative
    # float32 throughout, as Hugging Face computes it: bucket boundaries then agree to the last bit.
    sign = torch.sign(relative)
    mid = buckets // 2
    near = (relative < mid) & (relative > -mid)
    magnitude = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())
    top = torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32, device=relative.device))
    log_pos = torch.ceil(torch.log(magnitude / mid) / top * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative.to(log_pos.dtype), log_pos * sign).long()
