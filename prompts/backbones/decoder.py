"""Decoder LLMs used as classifiers: Llama, Mistral, Qwen2, Qwen3.

Conventions (those of Hugging Face's ``*ForSequenceClassification`` with a prefix in the cache, and of
PEFT's prefix tuning):

- prefix ``[layers, 2, kv_heads, P, head_dim]``: grouped-query attention stores keys and values for
  the key/value heads only; the keys are used as stored (no rotary embedding, no Qwen3 key norm is
  applied to them: a cache holds keys after both);
- text positions start at ``P`` (Hugging Face numbers a sequence from the cache length);
- causal attention over the sequence, every prefix slot visible to every token, except that a
  sliding-window layer (Mistral, Qwen2/Qwen3 with ``use_sliding_window``) sees a key only when its
  index in ``[prefix | text]`` lies inside the window, as Hugging Face's cache indexes keys;
- the head pools the last real token (Hugging Face's classifiers pool the last non-pad token).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from prompts.backbones.base import (
    BackboneFamily,
    Collected,
    Layout,
    LowRank,
    Shape,
    attend,
    layer_scales,
    project,
    rotate,
    window_mask,
)
from prompts.errors import BackboneError


class DecoderFamily(BackboneFamily):
    name: ClassVar[str] = "decoder"
    model_types: ClassVar[frozenset[str]] = frozenset({"llama", "mistral", "qwen2", "qwen3"})
    default_pooling: ClassVar[str] = "last"

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.windows = layer_windows(self.config)

    @classmethod
    def check_config(cls, config: Any) -> None:
        rope = getattr(config, "rope_parameters", None) or {}
        kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if kind == "dynamic":
            # Dynamic NTK changes the rotation with the longest position in the batch: a row's logits
            # would depend on its neighbours.
            raise BackboneError(
                "rope_type 'dynamic' is not supported: rows of one batch would not be independent"
            )
        if getattr(config, "num_attention_heads", 0) % max(1, getattr(config, "num_key_value_heads", 1) or 1):
            raise BackboneError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def read_shape(cls, config: Any) -> Shape:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return Shape(
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            max_positions=int(config.max_position_embeddings),
            position_base=0,
            ffn_size=int(config.intermediate_size),
        )

    @classmethod
    def conventions(cls) -> dict[str, str]:
        return {
            "attention": "causal",
            "prefix_keys": "as_stored",  # no rotary embedding, no key norm applied to them
            "position_encoding": "rotary",
            "sliding_window": "prefix_by_cache_index",  # slot p visible while p > query index - window
        }

    @classmethod
    def lora_targets(cls, shape: Shape) -> dict[str, tuple[int, int]]:
        h, q, kv, f = shape.hidden_size, shape.num_heads * shape.head_dim, shape.kv_dim, shape.ffn_size
        return {
            "query": (h, q),
            "key": (h, kv),
            "value": (h, kv),
            "attention_output": (q, h),
            "ffn_gate": (h, f),
            "ffn_up": (h, f),
            "ffn_out": (f, h),
        }

    def masks(self, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        device = layout.prefix_len.device
        i = torch.arange(layout.seq, device=device)
        causal = (i.unsqueeze(0) <= i.unsqueeze(1)).unsqueeze(0)  # [1, S (query), S (key)]
        causal = causal.expand(layout.rows, -1, -1)
        all_prefix = torch.ones((layout.rows, layout.seq, layout.prefix), dtype=torch.bool, device=device)
        masks = {"full": window_mask(layout, dtype, causal, all_prefix)}  # [B, 1, S, P + S]
        for window in sorted({w for w in self.windows if w is not None}):
            # Hugging Face's cache indexes keys [prefix | text]: slot p is p, text token j is P_b + j,
            # and query i sits at P_b + i. A key is visible when its index > query index - window.
            near = (i.unsqueeze(0) > i.unsqueeze(1) - window).unsqueeze(0)  # [1, S, S]
            slot = torch.arange(layout.prefix, device=device)  # [P]
            query_at = layout.prefix_len.view(-1, 1, 1) + i.view(1, -1, 1)  # [B, S, 1]
            prefix_near = slot.view(1, 1, -1) > query_at - window  # [B, S, P]
            masks[f"window{window}"] = window_mask(layout, dtype, causal & near, prefix_near)
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
        rows, seq, _ = embeds.shape
        head_dim = self.shape.head_dim
        hidden = embeds  # Llama, Mistral and Qwen feed the word embeddings in unscaled
        cos, sin = model.rotary_emb(hidden, positions)  # [B, S, head_dim] each
        for index, layer in enumerate(model.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            ia3 = layer_scales(scale_delta, index, self.shape.kv_dim)
            query = project(attention.q_proj, x, lora, "query", index)
            query = query.view(rows, seq, -1, head_dim)  # [B, S, heads, head_dim]
            key = project(attention.k_proj, x, lora, "key", index)  # [B, S, kv_heads * head_dim]
            value = project(attention.v_proj, x, lora, "value", index)
            if ia3 is not None:
                key, value = key.addcmul(key, ia3[0]), value.addcmul(value, ia3[1])
            key = key.view(rows, seq, -1, head_dim)  # [B, S, kv_heads, head_dim]
            value = value.view(rows, seq, -1, head_dim).transpose(1, 2)  # [B, kv_heads, S, head_dim]
            if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over each head, before the rotation
                query, key = attention.q_norm(query), attention.k_norm(key)
            query = rotate(query.transpose(1, 2), cos, sin)  # [B, heads, S, head_dim]
            key = rotate(key.transpose(1, 2), cos, sin)  # [B, kv_heads, S, head_dim]
            if collect is not None:
                collect.append((key, value))
            window = self.windows[index]
            mask = masks["full"] if window is None else masks[f"window{window}"]
            layer_prefix = None if prefix is None else prefix[:, index]  # [B, 2, kv_heads, P, head_dim]
            context = attend(query, key, value, layer_prefix, mask, attention.scaling)
            context = context.transpose(1, 2).reshape(rows, seq, -1)  # [B, S, heads * head_dim]
            hidden = hidden + project(attention.o_proj, context, lora, "attention_output", index)
            x = layer.post_attention_layernorm(hidden)
            if ia3 is None and lora is None:
                hidden = hidden + layer.mlp(x)
            else:
                mlp = layer.mlp  # Llama's gated MLP, its inner activation scaled before down_proj
                gate = project(mlp.gate_proj, x, lora, "ffn_gate", index)  # [B, S, ffn]
                inner = mlp.act_fn(gate) * project(mlp.up_proj, x, lora, "ffn_up", index)  # [B, S, ffn]
                if ia3 is not None:
                    inner = inner.addcmul(inner, ia3[2])
                hidden = hidden + project(mlp.down_proj, inner, lora, "ffn_out", index)
        normed: torch.Tensor = model.norm(hidden)
        return normed


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model classes decide it: Mistral
    slides every layer when ``sliding_window`` is set, Qwen2/Qwen3 the layers ``layer_types`` names
    (their configs clear ``sliding_window`` unless ``use_sliding_window``), Llama never."""
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    if config.model_type == "llama" or not window:
        return [None] * layers
    if config.model_type == "mistral":
        return [int(window)] * layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    return [int(window) if t == "sliding_attention" else None for t in types]
