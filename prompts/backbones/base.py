"""What every backbone family provides: its shapes, its conventions, its masks and its layer loop.

A family runs the backbone's own submodules (projections, norms, feed-forward blocks) layer by layer,
and puts each row's prefix keys/values in front of that layer's keys and values itself: Hugging Face's
models either take no cache at all (DeBERTa-v2, ModernBERT) or take one cache for the whole batch, not a
prefix of its own length per row. The layer loop is also what runs as a CUDA graph
(``prompts/graphs.py``), so it takes only tensors whose shapes a padded bucket fixes.

Keys of every attention are laid out the same way in every family::

    [ prefix slots (P = longest prefix in the batch) | sequence (S = input prompt + text, right-padded) ]

where row b's own prefix fills the first ``prefix_len[b]`` slots and its sequence the first
``seq_len[b]`` positions; everything else is masked. Masks are additive (0 or the dtype's minimum),
never -inf, and every query row keeps at least one visible key, so no softmax row is all-masked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# Per-layer keys and values the loop computed for the sequence, as attention used them:
# a list of ([B, kv_heads, S, head_dim], [B, kv_heads, S, head_dim]), one pair per layer.
Collected = list[tuple[torch.Tensor, torch.Tensor]]

# Per-row low-rank (LoRA) updates of a layer's projections, by target name (a family's
# ``lora_targets``): (down [B, layers, in, r], up [B, layers, r, out]). A projection of x [B, S, in]
# becomes ``linear(x) + x @ down @ up``; LoRA's alpha / r is already in ``up``. Rows of tasks without
# LoRA (or of a lower rank) carry zeros, which add exactly nothing.
LowRank = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Shape:
    """The sizes a family reads from a config; artifacts are checked against them."""

    num_layers: int
    num_heads: int
    num_kv_heads: int  # key/value heads of a prefix (fewer than num_heads under grouped-query attention)
    head_dim: int
    hidden_size: int
    max_positions: int  # positions usable by prefix offset + input prompt + text
    position_base: int  # first position id of a sequence (RoBERTa: padding_idx + 1)
    ffn_size: int  # the feed-forward block's inner width: what its output projection reads

    @property
    def kv_dim(self) -> int:
        """Width of one layer's key (or value) projection output."""
        return self.num_kv_heads * self.head_dim

    @property
    def scales_width(self) -> int:
        """Width of one layer's (IA)^3 multipliers: ``[keys (kv_dim) | values (kv_dim) | FFN (ffn_size)]``."""
        return 2 * self.kv_dim + self.ffn_size


@dataclass(frozen=True)
class Layout:
    """Where each row's tokens sit in one padded forward."""

    prefix: int  # P: key slots before the sequence
    seq: int  # S: sequence positions (input prompt + text)
    prefix_len: torch.Tensor  # [B] long: row b's prefix slots (<= P)
    seq_len: torch.Tensor  # [B] long: row b's real sequence tokens (1 <= seq_len <= S)

    @property
    def rows(self) -> int:
        return int(self.prefix_len.shape[0])

    def key_index(self) -> torch.Tensor:
        return torch.arange(self.prefix + self.seq, device=self.prefix_len.device)  # [P + S]

    def valid_keys(self) -> torch.Tensor:
        """[B, P + S] bool: the row's own prefix slots and its real sequence tokens."""
        key = self.key_index().unsqueeze(0)  # [1, P + S]
        in_prefix = key < self.prefix_len.unsqueeze(1)
        in_seq = (key >= self.prefix) & (key < self.prefix + self.seq_len.unsqueeze(1))
        return in_prefix | in_seq

    def valid_queries(self) -> torch.Tensor:
        """[B, S] bool: real sequence tokens."""
        return torch.arange(self.seq, device=self.seq_len.device).unsqueeze(0) < self.seq_len.unsqueeze(1)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's minimum elsewhere (finite: an all-masked row stays finite)."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def key_mask(layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """Bidirectional attention: every query sees its row's valid keys. [B, 1, 1, P + S]"""
    return additive(layout.valid_keys(), dtype)[:, None, None, :]


def window_mask(
    layout: Layout, dtype: torch.dtype, allowed_seq: torch.Tensor, prefix_visible: torch.Tensor
) -> torch.Tensor:
    """A per-query mask [B, 1, S, P + S] from which sequence keys (``allowed_seq`` [B, S, S]: query,
    key) and prefix slots (``prefix_visible`` [B, S, P]) each query may see, on top of validity.
    A padded query always keeps its first sequence key, so its softmax row is never all-masked."""
    valid = layout.valid_keys()  # [B, P + S]
    seq_ok = allowed_seq & valid[:, None, layout.prefix :]  # [B, S, S]
    prefix_ok = prefix_visible & valid[:, None, : layout.prefix]  # [B, S, P]
    allowed = torch.cat([prefix_ok, seq_ok], dim=2)  # [B, S, P + S]
    padded_query = ~layout.valid_queries()  # [B, S]
    first = torch.zeros_like(allowed)
    first[:, :, layout.prefix] = True
    allowed = allowed | (padded_query.unsqueeze(2) & first)
    return additive(allowed, dtype).unsqueeze(1)


def attend(
    query: torch.Tensor,  # [B, heads, S, head_dim]
    key: torch.Tensor,  # [B, kv_heads, S, head_dim]
    value: torch.Tensor,  # [B, kv_heads, S, head_dim]
    prefix: torch.Tensor | None,  # [B, 2, kv_heads, P, head_dim]: this layer's prefix keys and values
    mask: torch.Tensor,  # additive, broadcastable to [B, heads, S, P + S]
    scale: float,
) -> torch.Tensor:
    """Attention over ``[prefix | sequence]`` keys: context [B, heads, S, head_dim]."""
    if prefix is not None:
        key = torch.cat([prefix[:, 0], key], dim=2)  # [B, kv_heads, P + S, head_dim]
        value = torch.cat([prefix[:, 1], value], dim=2)  # [B, kv_heads, P + S, head_dim]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        # Grouped-query attention. SDPA's enable_gqa would do this without copies, but not on every
        # kernel; the copy is per layer and small next to the projections.
        key = key.repeat_interleave(groups, dim=1)  # [B, heads, P + S, head_dim]
        value = value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def layer_scales(
    scale_delta: torch.Tensor | None,  # [B, layers, 2 * kv_dim + ffn]
    index: int,
    kv_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Layer ``index``'s (IA)^3 multipliers minus one for keys, values and the FFN's inner activation,
    each ``[B, 1, dim]`` so that they broadcast over positions; None where no row of the batch has any.
    A loop applies them as ``x + x * delta`` (``addcmul``): held as deltas, a multiplier of 1.03 keeps
    its precision in bfloat16 (whose steps near 1 are 2^-7, near 0.03 about 2^-13), and rows without
    scales have deltas of exactly 0.

    The convention is the same in every family (and PEFT's (IA)^3): keys and values are scaled as the
    projections return them, before a head split, key norm or rotary embedding; the FFN's inner
    activation is scaled as its output projection reads it. Prefix keys and values are never scaled:
    they are the task's own already.
    """
    if scale_delta is None:
        return None
    row = scale_delta[:, index].unsqueeze(1)  # [B, 1, 2 * kv_dim + ffn]
    return row[..., :kv_dim], row[..., kv_dim : 2 * kv_dim], row[..., 2 * kv_dim :]


def project(
    linear: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    lora: LowRank | None,
    name: str,
    index: int,
) -> torch.Tensor:
    """``linear(x)`` plus layer ``index``'s LoRA update of projection ``name`` where the batch has LoRA:
    two batched products through the rank, each row its own task's matrices (never an [in, out]
    matrix per row), the second one adding onto the projection's output in place of a separate add."""
    y = linear(x)
    if lora is None:
        return y
    down, up = lora[name]
    return torch.baddbmm(y, torch.bmm(x, down[:, index]), up[:, index])  # [B, S, r] then [B, S, out]


def encoder_lora_targets(shape: Shape) -> dict[str, tuple[int, int]]:
    """LoRA targets of a BERT-style layer (BERT, DeBERTa-v2): separate query, key and value
    projections, the attention output, and the feed-forward block's input and output."""
    h, a, f = shape.hidden_size, shape.num_heads * shape.head_dim, shape.ffn_size
    return {
        "query": (h, a),
        "key": (h, a),
        "value": (h, a),
        "attention_output": (a, h),
        "ffn_in": (h, f),
        "ffn_out": (f, h),
    }


def dense_norm(
    block: Any, x: torch.Tensor, residual: torch.Tensor, lora: LowRank | None, name: str, index: int
) -> torch.Tensor:
    """A BERT-style output block (dense, dropout, LayerNorm of the sum with the residual: Hugging Face's
    BertSelfOutput, BertOutput and DeBERTa-v2's) with the dense projection's LoRA update."""
    if lora is None:
        out: torch.Tensor = block(x, residual)
        return out
    normed: torch.Tensor = block.LayerNorm(
        block.dropout(project(block.dense, x, lora, name, index)) + residual
    )
    return normed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the half-split form Llama, Qwen and ModernBERT use).

    ``x`` [B, heads, S, head_dim], ``cos``/``sin`` [B, S, head_dim]; computed in float32, as ModernBERT
    does (for float32 models that is the same as Llama's in-dtype arithmetic)."""
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class BackboneFamily(ABC):
    """One family of backbone architectures, bound to a loaded model.

    Subclasses state which ``model_type`` values they take, refuse configs they cannot run exactly,
    and write their conventions into every artifact trained on them (:meth:`conventions`)."""

    name: ClassVar[str]
    model_types: ClassVar[frozenset[str]]
    # What ``AutoModel.from_pretrained`` is asked for: the loops call SDPA themselves, so this only
    # matters for code that runs ``model(...)`` (tests comparing against Hugging Face).
    attn_implementation: ClassVar[str] = "sdpa"
    # The pooling a head uses when neither the task nor the checkpoint's directory says otherwise.
    default_pooling: ClassVar[str] = "cls"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self.shape = self.read_shape(self.config)

    # ----------------------------------------------------------------------------- from the config

    @classmethod
    @abstractmethod
    def check_config(cls, config: Any) -> None:
        """Raise BackboneError naming what this family cannot run exactly in ``config``."""

    @classmethod
    @abstractmethod
    def read_shape(cls, config: Any) -> Shape:
        """The sizes artifacts are checked against."""

    @classmethod
    def fingerprint_arch(cls, config: Any, model_type: str) -> str:
        """The architecture part of the backbone fingerprint (the weights are hashed after it)."""
        s = cls.read_shape(config)
        return (
            f"{cls.name}|{model_type}|{s.num_layers}|{s.num_heads}|{s.num_kv_heads}|{s.head_dim}|"
            f"{s.hidden_size}|{config.intermediate_size}|{config.vocab_size}|{config.max_position_embeddings}"
        )

    @classmethod
    @abstractmethod
    def conventions(cls) -> dict[str, str]:
        """How prompts meet this family's layers; written into every artifact and compared on load."""

    def pooling(self) -> str:
        """The head's pooling when nothing else decides it (the checkpoint's directory may)."""
        return self.default_pooling

    # ----------------------------------------------------------------------------- the forward

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        emb = self.model.get_input_embeddings()
        assert isinstance(emb, torch.nn.Embedding)
        return emb

    def positions(self, offsets: torch.Tensor, seq: int) -> torch.Tensor:
        """Position ids [B, S]: ``offsets`` [B] (a prefix's length, or 0) then counting up, clamped into
        the table (clamped slots are padding, masked anyway)."""
        s = self.shape
        arange = torch.arange(seq, device=offsets.device).unsqueeze(0)  # [1, S]
        positions = s.position_base + offsets.unsqueeze(1) + arange
        return positions.clamp(max=s.position_base + s.max_positions - 1)

    @classmethod
    @abstractmethod
    def lora_targets(cls, shape: Shape) -> dict[str, tuple[int, int]]:
        """The projections LoRA adapts in every layer, in the order artifacts list them: name -> (in,
        out) widths. Only projections of the rows' own hidden states (never shared tables such as
        DeBERTa's relative-position embeddings, which every row reads)."""

    @abstractmethod
    def masks(self, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor the layer loop needs that depends on the layout only (attention masks, and
        whatever else): built outside the loop, so a CUDA graph replays the loop on copies of them."""

    @abstractmethod
    def layers(
        self,
        embeds: torch.Tensor,  # [B, S, hidden]: word-embedding space (input prompts included)
        positions: torch.Tensor,  # [B, S] long
        masks: dict[str, torch.Tensor],  # from masks()
        prefix: torch.Tensor | None,  # [B, layers, 2, kv_heads, P, head_dim]
        scale_delta: torch.Tensor | None = None,  # [B, layers, 2 * kv_dim + ffn]: (IA)^3, see layer_scales
        collect: Collected | None = None,
        lora: LowRank | None = None,  # per-row LoRA updates, see project
    ) -> torch.Tensor:
        """The final hidden states [B, S, hidden]."""
