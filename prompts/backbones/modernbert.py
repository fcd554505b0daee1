"""ModernBERT (``model_type`` "modernbert").

ModernBERT has no published prefix convention; ptserve's, written into every artifact:

- prefix ``[layers, 2, heads, P, head_dim]``; prefix keys carry no rotation (rotary embeddings
  rotate the sequence's queries and keys only, so a prefix slot's score does not depend on where a
  token sits relative to it, only on the token's own rotated query);
- text positions start after the prefix unless the manifest says ``from_zero`` (as in every family);
- prefix slots are visible to every token in global and local (sliding-window) layers alike; the
  window limits sequence keys only (|query - key| <= ``local_attention`` / 2, as Hugging Face's
  bidirectional sliding mask has it);
- pooling as the checkpoint's ``classifier_pooling`` says ("cls" or "mean").
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
    key_mask,
    layer_scales,
    project,
    rotate,
    window_mask,
)


class ModernBertFamily(BackboneFamily):
    name: ClassVar[str] = "modernbert"
    model_types: ClassVar[frozenset[str]] = frozenset({"modernbert"})

    @classmethod
    def check_config(cls, config: Any) -> None:
        return None

    @classmethod
    def read_shape(cls, config: Any) -> Shape:
        heads = int(config.num_attention_heads)
        return Shape(
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=int(config.hidden_size) // heads,
            hidden_size=int(config.hidden_size),
            max_positions=int(config.max_position_embeddings),
            position_base=0,
            ffn_size=int(config.intermediate_size),
        )

    @classmethod
    def conventions(cls) -> dict[str, str]:
        return {
            "attention": "bidirectional",
            "prefix_keys": "as_stored",  # never rotated
            "position_encoding": "rotary",
            "sliding_window": "prefix_always_visible",
        }

    def pooling(self) -> str:
        return "mean" if getattr(self.config, "classifier_pooling", "cls") == "mean" else "cls"

    @classmethod
    def lora_targets(cls, shape: Shape) -> dict[str, tuple[int, int]]:
        h, f = shape.hidden_size, shape.ffn_size
        # ModernBERT fuses query, key and value into one projection, and its GLU's two inputs into Wi.
        return {"qkv": (h, 3 * h), "attention_output": (h, h), "ffn_in": (h, 2 * f), "ffn_out": (f, h)}

    def masks(self, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        masks = {"full": key_mask(layout, dtype)}  # [B, 1, 1, P + S]
        if "sliding_attention" in self.config.layer_types:
            i = torch.arange(layout.seq, device=layout.seq_len.device)
            near = ((i.unsqueeze(0) - i.unsqueeze(1)).abs() <= int(self.config.sliding_window)).unsqueeze(0)
            every_slot = torch.ones(
                (layout.rows, layout.seq, layout.prefix), dtype=torch.bool, device=layout.seq_len.device
            )
            masks["sliding"] = window_mask(layout, dtype, near.expand(layout.rows, -1, -1), every_slot)
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
        s = self.shape
        hidden: torch.Tensor = model.embeddings(inputs_embeds=embeds)  # [B, S, hidden]
        rotations = {kind: model.rotary_emb(hidden, positions, kind) for kind in set(self.config.layer_types)}
        for index, layer in enumerate(model.layers):
            attention = layer.attn
            ia3 = layer_scales(scale_delta, index, s.kv_dim)
            qkv = project(attention.Wqkv, layer.attn_norm(hidden), lora, "qkv", index)  # [B, S, 3 * hidden]
            if ia3 is not None:
                query_part = qkv.new_zeros(rows, 1, s.num_heads * s.head_dim)  # the query is never scaled
                qkv = qkv.addcmul(qkv, torch.cat([query_part, ia3[0], ia3[1]], dim=-1))
            qkv = qkv.view(rows, seq, 3, s.num_heads, s.head_dim)
            query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # [B, heads, S, head_dim]
            cos, sin = rotations[layer.attention_type]  # [B, S, head_dim]
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
            if collect is not None:
                collect.append((key, value))
            mask = masks["sliding"] if layer.attention_type == "sliding_attention" else masks["full"]
            layer_prefix = None if prefix is None else prefix[:, index]  # [B, 2, heads, P, head_dim]
            context = attend(query, key, value, layer_prefix, mask, s.head_dim**-0.5)
            context = context.transpose(1, 2).reshape(rows, seq, -1)  # [B, S, hidden]
            hidden = hidden + attention.out_drop(
                project(attention.Wo, context, lora, "attention_output", index)
            )
            x = layer.mlp_norm(hidden)
            if ia3 is None and lora is None:
                hidden = hidden + layer.mlp(x)
            else:
                mlp = layer.mlp  # ModernBERT's GLU, its inner activation scaled before Wo
                gated, gate = project(mlp.Wi, x, lora, "ffn_in", index).chunk(2, dim=-1)  # [B, S, ffn] each
                inner = mlp.act(gated) * gate  # [B, S, ffn]
                if ia3 is not None:
                    inner = inner.addcmul(inner, ia3[2])
                hidden = hidden + project(mlp.Wo, mlp.drop(inner), lora, "ffn_out", index)
        normed: torch.Tensor = model.final_norm(hidden)
        return normed
