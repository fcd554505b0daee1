"""The device prompt pool: every cached task's tensors pre-stacked on the device, one slot per task.

A batch gathers its rows' prefixes, prompts and heads with one ``index_select`` per tensor, so the
work per batch does not grow with the number of distinct tasks in it. Slots are padded to the
longest prefix, prompt and label count seen; a batch slices the pool to its own longest first.
(IA)^3 scales (held as multipliers minus one) are gathered only for a batch with a scaled task in it;
a slot without scales holds zeros, so its rows pass through a scaled batch unchanged. LoRA, many times
larger (MiniLM at rank 8: 1.3 MB a task in float32; Qwen3-0.6B: about 10 MB in bfloat16), has slots of
its own, one per LoRA task only: per target, down [lora slots, layers, in, R] and up [lora slots,
layers, R, out], R the largest rank seen. Lora slot 0 stays zeros and is what rows of tasks without
LoRA gather; a task's columns past its own rank are zeros, and a batch slices to its largest rank.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from prompts.backbone import BackboneSpec
from prompts.forward import POOLING_MODES, PromptBatch, TaskPrompt

# Per-slot metadata columns of PromptPool._meta.
_PREFIX_LEN, _PROMPT_LEN, _NUM_LABELS, _POOLING, _POOLER, _AFTER_PREFIX, _MASK_POS, _LORA_SLOT = range(8)


class PromptPool:
    """Slots of task tensors on one device. Thread-safe: loads add slots while the engine gathers."""

    def __init__(
        self, spec: BackboneSpec, device: torch.device, dtype: torch.dtype, initial_slots: int = 16
    ) -> None:
        self._spec = spec
        self._device = device
        self._dtype = dtype
        self._lock = threading.Lock()
        self._capacity = 0
        self._free: list[int] = []
        self._used = 0
        self._prefix_cap = 0
        self._prompt_cap = 0
        self._label_cap = 2
        self._prefix = self._zeros(0, spec.num_layers, 2, spec.num_kv_heads, 0, spec.head_dim)
        self._prompt = self._zeros(0, 0, spec.hidden_size)
        self._head_weight = self._zeros(0, 2, spec.hidden_size)
        self._head_bias = self._zeros(0, 2)
        self._meta = torch.zeros((0, 8), dtype=torch.long, device=device)
        # [slots, layers, 2 * kv_dim + ffn]: (IA)^3 multipliers minus one, for every slot once the first
        # scaled task arrives (MiniLM: 13,824 values a slot, as many as a 3-position prefix; Qwen3-0.6B:
        # 143,360), so services without scaled tasks pay nothing.
        self._scale_delta: torch.Tensor | None = None
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._rank_cap = 0
        self._lora_capacity = 0
        self._lora_free: list[int] = []
        self._lora_of: dict[int, int] = {}  # slot -> its task's LoRA slot (tasks with LoRA only)
        self._grow_slots(initial_slots)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self._dtype, device=self._device)

    @property
    def slots_in_use(self) -> int:
        return self._used

    @property
    def nbytes(self) -> int:
        tensors = (
            self._prefix,
            self._prompt,
            self._head_weight,
            self._head_bias,
            self._meta,
            self._scale_delta,
            *(t for pair in (self._lora or {}).values() for t in pair),
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def add(self, task: TaskPrompt) -> int:
        """Copy ``task``'s tensors into a free slot and return its index."""
        with self._lock:
            if not self._free:
                self._grow_slots(max(16, self._capacity))
            self._widen(task.prefix_length, task.prompt_length, task.num_labels)
            slot = self._free.pop()
            self._used += 1
            # Stale values past this task's lengths stay: they are masked or never read.
            if task.prefix is not None:
                self._prefix[slot, :, :, :, : task.prefix_length].copy_(task.prefix)
            if task.prompt is not None:
                self._prompt[slot, : task.prompt_length].copy_(task.prompt)
            self._head_weight[slot, : task.num_labels].copy_(task.head_weight)
            self._head_bias[slot, : task.num_labels].copy_(task.head_bias)
            if task.scale_delta is not None:
                if self._scale_delta is None:
                    spec = self._spec
                    self._scale_delta = torch.zeros(
                        (self._capacity, spec.num_layers, spec.scales_width),
                        dtype=self._dtype,
                        device=self._device,
                    )
                self._scale_delta[slot].copy_(task.scale_delta)
            elif self._scale_delta is not None:
                self._scale_delta[slot].zero_()  # a slot reused from a scaled task
            lora_slot = self._put_lora(slot, task)
            meta = [
                task.prefix_length,
                task.prompt_length,
                task.num_labels,
                POOLING_MODES.index(task.pooling),
                int(task.use_pooler),
                int(task.positions_after_prefix),
                task.mask_position,
                lora_slot,
            ]
            self._meta[slot] = torch.tensor(meta, dtype=torch.long)
            return slot

    def _put_lora(self, slot: int, task: TaskPrompt) -> int:
        """Copy ``task``'s LoRA into a LoRA slot of its own and return it (0: the task has none)."""
        if task.lora is None:
            return 0
        rank = task.lora_rank
        if self._lora is None:
            layers = self._spec.num_layers
            self._lora = {
                name: (self._zeros(0, layers, down.shape[1], 0), self._zeros(0, layers, 0, up.shape[2]))
                for name, (down, up) in task.lora.items()
            }
            self._grow_lora(1)  # slot 0: the zeros that rows without LoRA gather
            self._lora_free.remove(0)
        if rank > self._rank_cap:
            self._lora = {
                name: (_pad_to(down, 3, rank), _pad_to(up, 2, rank))
                for name, (down, up) in self._lora.items()
            }
            self._rank_cap = rank
        if not self._lora_free:
            self._grow_lora(max(4, self._lora_capacity))
        lora_slot = self._lora_free.pop()
        for name, (down, up) in self._lora.items():
            down[lora_slot, :, :, :rank].copy_(task.lora[name][0])
            up[lora_slot, :, :rank].copy_(task.lora[name][1])
            # Columns past the task's rank must be zeros: a batch of a higher rank reads them.
            down[lora_slot, :, :, rank:].zero_()
            up[lora_slot, :, rank:].zero_()
        self._lora_of[slot] = lora_slot
        return lora_slot

    def _grow_lora(self, extra: int) -> None:
        assert self._lora is not None
        old, new = self._lora_capacity, self._lora_capacity + extra
        self._lora = {name: (_grown(down, new), _grown(up, new)) for name, (down, up) in self._lora.items()}
        self._lora_free.extend(range(new - 1, old - 1, -1))
        self._lora_capacity = new

    def free(self, slot: int) -> None:
        """Give a slot back; called once nothing (cache or admitted request) uses its task any more."""
        with self._lock:
            self._free.append(slot)
            self._used -= 1
            lora_slot = self._lora_of.pop(slot, None)
            if lora_slot is not None:
                self._lora_free.append(lora_slot)

    def gather(
        self,
        slots: Sequence[int],
        *,
        prompt_lens: list[int],
        max_prefix: int,
        max_prompt: int,
        max_labels: int,
        modes: frozenset[str],
        any_pooler: bool,
        any_scales: bool = False,
        lora_rank: int = 0,
    ) -> PromptBatch:
        """The PromptBatch for rows whose tasks sit in ``slots``, sliced to this batch's longest lengths."""
        index = torch.tensor(slots, dtype=torch.long).to(self._device, non_blocking=True)  # [B]
        with self._lock:  # the pool's tensors may be swapped by a concurrent grow
            prefix = None
            if max_prefix:
                prefix = self._prefix[:, :, :, :, :max_prefix].index_select(0, index)  # [B, L, 2, KV, P, D]
            prompt = (
                self._prompt[:, :max_prompt].index_select(0, index) if max_prompt else None
            )  # [B, K, hidden]
            head_weight = self._head_weight[:, :max_labels].index_select(0, index)  # [B, C, hidden]
            head_bias = self._head_bias[:, :max_labels].index_select(0, index)  # [B, C]
            meta = self._meta.index_select(0, index)  # [B, 8]
            scale_delta = None
            if any_scales:
                assert self._scale_delta is not None
                scale_delta = self._scale_delta.index_select(0, index)  # [B, layers, 2 * kv_dim + ffn]
            lora = None
            if lora_rank:
                assert self._lora is not None
                lora_index = meta[:, _LORA_SLOT]  # [B]: 0 for rows without LoRA
                lora = {
                    name: (
                        down[..., :lora_rank].index_select(0, lora_index),  # [B, layers, in, r]
                        up[:, :, :lora_rank].index_select(0, lora_index),  # [B, layers, r, out]
                    )
                    for name, (down, up) in self._lora.items()
                }
        return PromptBatch(
            prefix=prefix,
            prefix_len=meta[:, _PREFIX_LEN],
            prompt=prompt,
            prompt_len=meta[:, _PROMPT_LEN],
            head_weight=head_weight,
            head_bias=head_bias,
            num_labels=meta[:, _NUM_LABELS],
            pooling=meta[:, _POOLING],
            use_pooler=meta[:, _POOLER].bool(),
            after_prefix=meta[:, _AFTER_PREFIX].bool(),
            mask_pos=meta[:, _MASK_POS],
            prompt_lens=prompt_lens,
            modes=modes,
            any_pooler=any_pooler,
            scale_delta=scale_delta,
            lora=lora,
        )

    def _grow_slots(self, extra: int) -> None:
        old = self._capacity
        new = old + extra
        self._prefix, self._prompt = _grown(self._prefix, new), _grown(self._prompt, new)
        self._head_weight, self._head_bias, self._meta = (
            _grown(self._head_weight, new),
            _grown(self._head_bias, new),
            _grown(self._meta, new),
        )
        if self._scale_delta is not None:
            self._scale_delta = _grown(self._scale_delta, new)
        self._free.extend(range(new - 1, old - 1, -1))  # lowest slot first
        self._capacity = new

    def _widen(self, prefix_length: int, prompt_length: int, num_labels: int) -> None:
        """Grow the padded per-slot sizes when a task longer than every earlier one arrives."""
        if prefix_length > self._prefix_cap:
            self._prefix = _pad_to(self._prefix, 4, prefix_length)
            self._prefix_cap = prefix_length
        if prompt_length > self._prompt_cap:
            self._prompt = _pad_to(self._prompt, 1, prompt_length)
            self._prompt_cap = prompt_length
        if num_labels > self._label_cap:
            self._head_weight = _pad_to(self._head_weight, 1, num_labels)
            self._head_bias = _pad_to(self._head_bias, 1, num_labels)
            self._label_cap = num_labels


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended along dim 0 up to ``rows``."""
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
