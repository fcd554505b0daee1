"""The prompted forward: one backbone pass for a batch whose rows may each belong to a different task.

:func:`run_prompted` is the single implementation of how task prompts are applied to the backbone. It
takes a :class:`PromptBatch` (per-row prompt tensors); the trainer and the reference path build one
by stacking :class:`TaskPrompt` objects (:func:`prompted_forward`), the service gathers one from its
pre-stacked device pool by slot index. Either way a task gives the same logits served alone, in a
mixed batch, or evaluated by the trainer.

Per row ``b`` with task prefix length ``P_b``, input-prompt length ``K_b`` and text length ``T_b``:

- keys/values seen by every layer: ``[prefix_b (P_b) | pad ... | prompt_b + text_b (K_b + T_b) | pad ...]``
  where the prefix part is padded to ``P = max P_b`` and masked per row;
- query sequence: ``[prompt_b (K_b) | text_b (T_b) | pad ...]`` padded to ``S = max (K_b + T_b)``;
- position ids: ``base + offset_b + arange(S)``, ``offset_b = P_b`` under the "after_prefix" convention
  (HF numbers a sequence from the cache length, which is what PEFT and P-tuning v2 trained with);
- attention: the family's (``prompts/backbones``): bidirectional or causal, its own position scheme,
  and the prefix in front of every layer's keys and values;
- (IA)^3 scales, where a row's task has them: its layers' keys, values and FFN inner activations
  multiplied by the task's vectors (``layer_scales`` in ``prompts/backbones/base.py``), carried as
  multipliers minus one; rows of tasks without them carry zeros;
- LoRA, where a row's task has it: each adapted projection adds ``x @ down @ up`` with the task's own
  low-rank matrices (``project`` in ``prompts/backbones/base.py``), padded to the batch's largest rank
  with zeros; rows of tasks without LoRA carry zeros;
- pooled vector: the text's first token (index ``K_b``), sequence position 0, the mean of the text
  tokens, the text's last token (index ``K_b + T_b - 1``, decoders), or (a verbalizer) the input
  prompt's ``[MASK]`` row through the masked-LM head's transform, whose head rows are label words';
- logits over the row's own labels; columns past its label count are ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from prompts.artifact import PromptArtifact
from prompts.backbone import Backbone
from prompts.backbones import Layout, LowRank

POOLING_MODES = ("cls", "first", "mean", "last", "mask")


@dataclass(eq=False)
class TaskPrompt:
    """One task's tensors on the backbone's device and dtype (or trainable parameters while training).

    Compared by identity: a batch groups its rows by the TaskPrompt object they carry.
    """

    prefix: torch.Tensor | None  # [layers, 2, kv_heads, P, head_dim]
    prompt: torch.Tensor | None  # [K, hidden]
    head_weight: torch.Tensor  # [C, hidden]
    head_bias: torch.Tensor  # [C]
    pooling: str = "cls"  # one of POOLING_MODES
    use_pooler: bool = False
    positions_after_prefix: bool = True
    mask_position: int = 0  # pooling "mask": the input prompt's row that holds the [MASK] embedding
    # [layers, 2 * kv_dim + ffn]: (IA)^3 multipliers minus one (the artifact's ``scales`` - 1), keys |
    # values | FFN; kept as deltas so that half precision does not round the multipliers near 1.
    scale_delta: torch.Tensor | None = None
    # LoRA by target (the family's ``lora_targets``): (down [layers, in, r], up [layers, r, out]), LoRA's
    # alpha / r already in ``up``.
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora is None else int(next(iter(self.lora.values()))[0].shape[-1])

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[3])

    @property
    def prompt_length(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[0])

    @property
    def num_labels(self) -> int:
        return int(self.head_weight.shape[0])

    def nbytes(self) -> int:
        tensors = [self.prefix, self.prompt, self.head_weight, self.head_bias, self.scale_delta]
        tensors += [t for pair in (self.lora or {}).values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @classmethod
    def from_artifact(cls, artifact: PromptArtifact, device: torch.device, dtype: torch.dtype) -> TaskPrompt:
        t = artifact.tensors
        m = artifact.manifest

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device=device, dtype=dtype).contiguous()

        head_weight = move(t["head.weight"])
        head_bias = move(t["head.bias"])
        assert head_weight is not None and head_bias is not None
        return cls(
            prefix=move(t.get("prefix")),
            prompt=move(t.get("prompt")),
            head_weight=head_weight,
            head_bias=head_bias,
            pooling=m.head.pooling,
            use_pooler=m.head.pooler == "backbone",
            positions_after_prefix=m.positions == "after_prefix",
            mask_position=m.head.verbalizer.mask_position if m.head.verbalizer is not None else 0,
            # Subtracted in the artifact's float32, then cast: the delta keeps its precision.
            scale_delta=move(t["scales"].float() - 1) if "scales" in t else None,
            lora=_lora_from(t, move),
        )


def _lora_from(
    tensors: dict[str, torch.Tensor], move: Callable[[torch.Tensor | None], torch.Tensor | None]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """An artifact's ``lora.<target>.down`` / ``.up`` tensors as TaskPrompt holds them."""
    names = [
        k[len("lora.") : -len(".down")] for k in tensors if k.startswith("lora.") and k.endswith(".down")
    ]
    if not names:
        return None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        down, up = move(tensors[f"lora.{name}.down"]), move(tensors[f"lora.{name}.up"])
        assert down is not None and up is not None
        lora[name] = (down, up)
    return lora


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to ``size`` (the padded part is always masked or ignored)."""
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = missing
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


@dataclass
class PromptBatch:
    """Every row's prompt tensors for one batch, on the backbone's device.

    The ``*_lens`` lists and ``modes`` repeat on the host what the tensors hold, so sizes never have
    to be read back from a GPU.
    """

    prefix: torch.Tensor | None  # [B, layers, 2, kv_heads, P, head_dim], P = max prefix length
    prefix_len: torch.Tensor  # [B] long
    prompt: torch.Tensor | None  # [B, K, hidden], K = max prompt length
    prompt_len: torch.Tensor  # [B] long
    head_weight: torch.Tensor  # [B, C, hidden], C = max label count
    head_bias: torch.Tensor  # [B, C]
    num_labels: torch.Tensor  # [B] long
    pooling: torch.Tensor  # [B] long, index into POOLING_MODES
    use_pooler: torch.Tensor  # [B] bool
    after_prefix: torch.Tensor  # [B] bool
    mask_pos: torch.Tensor  # [B] long: pooling "mask" rows' [MASK] index in the sequence
    prompt_lens: list[int]
    modes: frozenset[str]
    any_pooler: bool
    # [B, layers, 2 * kv_dim + ffn]: (IA)^3 multipliers minus one (zeros for rows whose task has none);
    # None when no row's task has any, so batches without them do no extra work.
    scale_delta: torch.Tensor | None = None
    # Per target (down [B, layers, in, r], up [B, layers, r, out]), r = the largest rank in the batch,
    # zeros for rows whose task has no LoRA; None when no row's task has any.
    lora: LowRank | None = None


def batch_from_tasks(rows: Sequence[TaskPrompt], device: torch.device) -> PromptBatch:
    """Stack the rows' tasks into a PromptBatch; differentiable in the task tensors (the trainer's path)."""
    # Each distinct task is padded once, then spread to its rows by index.
    task_index: dict[int, int] = {}
    tasks: list[TaskPrompt] = []
    row_task_list: list[int] = []
    for task in rows:
        slot = task_index.get(id(task))
        if slot is None:
            slot = task_index[id(task)] = len(tasks)
            tasks.append(task)
        row_task_list.append(slot)
    row_task = torch.tensor(row_task_list, device=device)  # [B]

    def per_row(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device)[row_task]  # [B]

    max_prefix = max(t.prefix_length for t in tasks)
    max_prompt = max(t.prompt_length for t in tasks)
    max_labels = max(t.num_labels for t in tasks)
    ref = tasks[0].head_weight
    prefix = None
    if max_prefix:
        shape = next(t.prefix.shape for t in tasks if t.prefix is not None)
        prefix = torch.stack(
            [
                _pad_dim(t.prefix, 3, max_prefix)
                if t.prefix is not None
                else ref.new_zeros(shape[0], 2, shape[2], max_prefix, shape[4])
                for t in tasks
            ]
        )[row_task]  # [B, layers, 2, kv_heads, P, head_dim]
    prompt = None
    if max_prompt:
        prompt = torch.stack(
            [
                _pad_dim(t.prompt, 0, max_prompt)
                if t.prompt is not None
                else ref.new_zeros(max_prompt, ref.shape[1])
                for t in tasks
            ]
        )[row_task]  # [B, K, hidden]
    scale_delta = None
    shaped = next((t.scale_delta for t in tasks if t.scale_delta is not None), None)
    if shaped is not None:
        scale_delta = torch.stack(
            [t.scale_delta if t.scale_delta is not None else torch.zeros_like(shaped) for t in tasks]
        )[row_task]  # [B, layers, 2 * kv_dim + ffn]
    lora: LowRank | None = None
    rank = max(t.lora_rank for t in tasks)
    if rank:
        shaped_lora = next(t.lora for t in tasks if t.lora is not None)
        lora = {}
        for name, (down0, up0) in shaped_lora.items():
            downs, ups = [], []
            for t in tasks:
                if t.lora is None:
                    downs.append(down0.new_zeros(*down0.shape[:-1], rank))
                    ups.append(up0.new_zeros(up0.shape[0], rank, up0.shape[2]))
                else:
                    down, up = t.lora[name]
                    downs.append(_pad_dim(down, 2, rank))
                    ups.append(_pad_dim(up, 1, rank))
            # [B, layers, in, r], [B, layers, r, out]
            lora[name] = (torch.stack(downs)[row_task], torch.stack(ups)[row_task])
    return PromptBatch(
        prefix=prefix,
        prefix_len=per_row([t.prefix_length for t in tasks]),
        prompt=prompt,
        prompt_len=per_row([t.prompt_length for t in tasks]),
        head_weight=torch.stack([_pad_dim(t.head_weight, 0, max_labels) for t in tasks])[
            row_task
        ],  # [B, C, hidden]
        head_bias=torch.stack([_pad_dim(t.head_bias, 0, max_labels) for t in tasks])[row_task],  # [B, C]
        num_labels=per_row([t.num_labels for t in tasks]),
        pooling=per_row([POOLING_MODES.index(t.pooling) for t in tasks]),
        use_pooler=per_row([int(t.use_pooler) for t in tasks]).bool(),
        after_prefix=per_row([int(t.positions_after_prefix) for t in tasks]).bool(),
        mask_pos=per_row([t.mask_position for t in tasks]),
        prompt_lens=[t.prompt_length for t in rows],
        modes=frozenset(t.pooling for t in tasks),
        any_pooler=any(t.use_pooler for t in tasks),
        scale_delta=scale_delta,
        lora=lora,
    )


def prompted_forward(
    backbone: Backbone,
    input_ids: Sequence[Sequence[int]],
    rows: Sequence[TaskPrompt],
) -> torch.Tensor:
    """Logits ``[B, max labels]`` for one token list per row, each row with its own task prompt."""
    if len(input_ids) != len(rows) or not rows:
        raise ValueError(
            f"need one task per row and at least one row, got {len(input_ids)} texts, {len(rows)} tasks"
        )
    return run_prompted(backbone, input_ids, batch_from_tasks(rows, backbone.device))


class Encoder(Protocol):
    """What runs a family's layers for :func:`run_prompted`: the family itself, or the service's CUDA
    graphs (``prompts/graphs.py``), which pad the same arguments to a captured bucket."""

    def __call__(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: Layout,
        prefix: torch.Tensor | None,
        scale_delta: torch.Tensor | None = None,
        lora: LowRank | None = None,
    ) -> torch.Tensor: ...


def run_prompted(
    backbone: Backbone,
    input_ids: Sequence[Sequence[int]],
    batch: PromptBatch,
    encoder: Encoder | None = None,
) -> torch.Tensor:
    """Run the backbone once over ``input_ids`` (special tokens included), applying each row's prompt.

    Returns logits ``[B, max labels]``, ``-inf`` past a row's own labels. Differentiable with respect
    to the PromptBatch tensors; the service wraps the call in ``torch.inference_mode``. The backbone's
    family (``prompts/backbones``) runs the layers: its masks, positions and prefix rules.
    """
    family = backbone.family
    device, dtype = backbone.device, backbone.dtype
    prefix_len, prompt_len = batch.prefix_len, batch.prompt_len
    max_prefix = 0 if batch.prefix is None else int(batch.prefix.shape[4])
    max_prompt = 0 if batch.prompt is None else int(batch.prompt.shape[1])

    # Sizes come from Python ints: reading them back from device tensors would stall a GPU.
    text_lens = [len(ids) for ids in input_ids]
    max_text = max(text_lens)
    seq_len = max(k + t for k, t in zip(batch.prompt_lens, text_lens, strict=True))
    text_len = torch.tensor(text_lens, device=device)  # [B]

    # Text token embeddings, right-padded.
    pad = backbone.pad_token_id
    ids = torch.tensor(
        [[*row, *([pad] * (max_text - len(row)))] for row in input_ids], dtype=torch.long
    )  # [B, T]
    text_embeds = family.word_embeddings(ids.to(device, non_blocking=True))  # [B, T, hidden]

    if batch.prompt is None:
        inputs_embeds = text_embeds  # [B, S, hidden], S == T
    else:
        # Row b reads prompt_b for j < K_b, then its text: a gather from [prompts | text] per row.
        source = torch.cat([batch.prompt.to(dtype), text_embeds], dim=1)  # [B, Kmax + T, hidden]
        j = torch.arange(seq_len, device=device).unsqueeze(0)  # [1, S]
        k = prompt_len.unsqueeze(1)  # [B, 1]
        src = torch.where(j < k, j, max_prompt + (j - k))  # [B, S]
        src = src.clamp(max=max_prompt + max_text - 1)  # padded slots read anything; they are masked
        inputs_embeds = torch.gather(source, 1, src.unsqueeze(-1).expand(-1, -1, source.shape[-1]))

    offsets = torch.where(batch.after_prefix, prefix_len, torch.zeros_like(prefix_len))  # [B]
    positions = family.positions(offsets, seq_len)  # [B, S]
    layout = Layout(prefix=max_prefix, seq=seq_len, prefix_len=prefix_len, seq_len=prompt_len + text_len)
    prefix = None if batch.prefix is None else batch.prefix.to(dtype)  # [B, layers, 2, kv_heads, P, head_dim]
    # [B, layers, 2 * kv_dim + ffn]
    delta = None if batch.scale_delta is None else batch.scale_delta.to(dtype)
    lora = None if batch.lora is None else {k: (d.to(dtype), u.to(dtype)) for k, (d, u) in batch.lora.items()}
    if encoder is not None:
        hidden = encoder(inputs_embeds, positions, layout, prefix, delta, lora)  # [B, S, hidden]
    else:
        masks = family.masks(layout, dtype)
        hidden = family.layers(inputs_embeds, positions, masks, prefix, delta, lora=lora)

    pooled = _pool(hidden, batch, text_len)  # [B, hidden]
    if batch.any_pooler:
        pooler = getattr(backbone.model, "pooler", None)
        if pooler is None:
            raise ValueError("a task asks for the backbone pooler, but this backbone has none")
        pooled = torch.where(batch.use_pooler.unsqueeze(1), pooler.activation(pooler.dense(pooled)), pooled)
    if "mask" in batch.modes:
        if backbone.mlm is None:
            raise ValueError("a task has a verbalizer head, but this backbone has no masked-LM head")
        # The transform runs on one pooled vector per row (cheap); head-based rows keep theirs. The
        # verbalizer rows' "head" is their label words' decoder rows: no vocabulary projection at all.
        is_mask = (batch.pooling == POOLING_MODES.index("mask")).unsqueeze(1)  # [B, 1]
        pooled = torch.where(is_mask, backbone.mlm.transform(pooled), pooled)

    weights = batch.head_weight  # [B, C, hidden]
    logits = torch.einsum("bh,bch->bc", pooled.to(weights.dtype), weights) + batch.head_bias  # [B, C]
    label_ok = torch.arange(weights.shape[1], device=device).unsqueeze(0) < batch.num_labels.unsqueeze(1)
    return logits.masked_fill(~label_ok, float("-inf"))


def _pool(hidden: torch.Tensor, batch: PromptBatch, text_len: torch.Tensor) -> torch.Tensor:
    """The pooled vector per row [B, hidden], by each row's task's pooling mode."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    cls_vec = hidden[rows, batch.prompt_len]  # [B, hidden] the text's first token
    last_vec = hidden[rows, batch.prompt_len + text_len - 1]  # [B, hidden] the text's last token
    if batch.modes == {"cls"}:
        return cls_vec
    if batch.modes == {"last"}:
        return last_vec
    mode = batch.pooling.unsqueeze(1)  # [B, 1]
    pooled = torch.where(mode == POOLING_MODES.index("first"), hidden[:, 0], cls_vec)
    pooled = torch.where(mode == POOLING_MODES.index("last"), last_vec, pooled)
    if "mean" in batch.modes:
        j = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        k = batch.prompt_len.unsqueeze(1)
        in_text = ((j >= k) & (j < k + text_len.unsqueeze(1))).unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        mean = (hidden * in_text).sum(1) / text_len.unsqueeze(1).to(hidden.dtype)
        pooled = torch.where(mode == POOLING_MODES.index("mean"), mean, pooled)
    if "mask" in batch.modes:
        mask_vec = hidden[rows, batch.mask_pos]  # [B, hidden]
        pooled = torch.where(mode == POOLING_MODES.index("mask"), mask_vec, pooled)
    return pooled
