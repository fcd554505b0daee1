"""BERT layout: BERT, RoBERTa, XLM-R, CamemBERT (and the BGE/E5/MiniLM models built on them).

Prefix ``[layers, 2, heads, P, head_dim]`` in front of every layer's keys and values, bidirectional
attention, absolute position embeddings with the text numbered after the prefix (Hugging Face BERT
offsets positions by the cache length, which is what PEFT and P-tuning v2 trained with; the manifest's
``positions`` says which). The loop calls the model's own embeddings, projections and dense + LayerNorm
blocks in Hugging Face's order and SDPA as its "sdpa" attention does.
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
    dense_norm,
    encoder_lora_targets,
    key_mask,
    layer_scales,
    project,
)
from prompts.errors import BackboneError

# RoBERTa-style embeddings number real positions from padding_idx + 1 (ids 0..padding_idx are unused).
_OFFSET_POSITION_TYPES = frozenset({"roberta", "xlm-roberta", "camembert"})


class BertFamily(BackboneFamily):
    name: ClassVar[str] = "bert"
    model_types: ClassVar[frozenset[str]] = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})

    @classmethod
    def check_config(cls, config: Any) -> None:
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise BackboneError(
                "this BERT-layout model is configured as a decoder; ptserve needs it as an encoder"
            )
        kind = getattr(config, "position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            raise BackboneError(
                f"position_embedding_type {kind!r} is not supported for BERT-layout models (only 'absolute')"
            )

    @classmethod
    def read_shape(cls, config: Any) -> Shape:
        base = int(config.pad_token_id) + 1 if config.model_type in _OFFSET_POSITION_TYPES else 0
        heads = int(config.num_attention_heads)
        return Shape(
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=int(config.hidden_size) // heads,
            hidden_size=int(config.hidden_size),
            max_positions=int(config.max_position_embeddings) - base,
            position_base=base,
            ffn_size=int(config.intermediate_size),
        )

    @classmethod
    def fingerprint_arch(cls, config: Any, model_type: str) -> str:
        # Unchanged since the first release, so artifacts trained then still match their backbone.
        return (
            f"{model_type}|{config.num_hidden_layers}|{config.num_attention_heads}|{config.hidden_size}|"
            f"{config.intermediate_size}|{config.vocab_size}|{config.max_position_embeddings}"
        )

    @classmethod
    def conventions(cls) -> dict[str, str]:
        return {
            "attention": "bidirectional",
            "prefix_keys": "as_stored",
            "position_encoding": "absolute",
        }

    @classmethod
    def lora_targets(cls, shape: Shape) -> dict[str, tuple[int, int]]:
        return encoder_lora_targets(shape)

    def masks(self, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"keys": key_mask(layout, dtype)}  # [B, 1, 1, P + S]

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
        rows, seq, width = embeds.shape
        token_types = torch.zeros_like(positions)  # [B, S]
        hidden: torch.Tensor = model.embeddings(
            inputs_embeds=embeds, position_ids=positions, token_type_ids=token_types
        )  # [B, S, hidden]
        for index, layer in enumerate(model.encoder.layer):
            attention = layer.attention.self
            split = (rows, seq, attention.num_attention_heads, attention.attention_head_size)
            ia3 = layer_scales(scale_delta, index, width)
            query = project(attention.query, hidden, lora, "query", index)  # [B, S, hidden]
            query = query.view(split).transpose(1, 2)  # [B, heads, S, head_dim]
            key = project(attention.key, hidden, lora, "key", index)  # [B, S, hidden]
            value = project(attention.value, hidden, lora, "value", index)
            if ia3 is not None:
                key, value = key.addcmul(key, ia3[0]), value.addcmul(value, ia3[1])
            key = key.view(split).transpose(1, 2)  # [B, heads, S, head_dim]
            value = value.view(split).transpose(1, 2)  # [B, heads, S, head_dim]
            if collect is not None:
                collect.append((key, value))
            layer_prefix = None if prefix is None else prefix[:, index]  # [B, 2, heads, P, head_dim]
            context = attend(query, key, value, layer_prefix, masks["keys"], attention.scaling)
            context = context.transpose(1, 2).reshape(rows, seq, width)  # [B, S, hidden]
            hidden = dense_norm(layer.attention.output, context, hidden, lora, "attention_output", index)
            intermediate = layer.intermediate
            inner = intermediate.intermediate_act_fn(
                project(intermediate.dense, hidden, lora, "ffn_in", index)
            )  # [B, S, ffn]
            if ia3 is not None:
                inner = inner.addcmul(inner, ia3[2])
            hidden = dense_norm(layer.output, inner, hidden, lora, "ffn_out", index)
        return hidden
