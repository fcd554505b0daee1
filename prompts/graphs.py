"""CUDA graphs of a family's layer loop: one captured forward per (rows, tokens, prefix) bucket.

On a GPU the eager loop is bound by the host, which launches a dozen kernels per layer from Python:
on an H100, MiniLM's loop took 2.5 ms per forward at every batch size from 1 to 256 rows, and a CUDA
graph replay of the same shapes took 0.27 ms at 1 row and 0.64 ms at 64 (same outputs bit for bit).
A graph replays fixed shapes, so each forward is padded up to a bucket:

- rows to the next power of two, sequence length to a multiple of ``SEQ_STEP``, prefix length to a
  multiple of ``PREFIX_STEP``;
- the family builds its masks (and whatever else depends on the layout) for the padded layout:
  padded keys are masked, padded rows hold one real-looking token, padded query positions and rows
  are computed and dropped. Every family's blocks act per row, and per position outside attention,
  so a real row's hidden states do not depend on the padding (tests/prompts/test_graphs.py checks
  that on the CPU for every family, where the same padding runs eagerly).

Graphs are captured lazily, the first time a bucket is seen (tens of milliseconds), up to
``max_graphs`` and ``max_bytes`` of static buffers; other shapes run eagerly. They share one memory
pool, which is safe because every replay happens under one lock, on one stream, one at a time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from prompts.backbones import BackboneFamily, Layout, LowRank

logger = logging.getLogger(__name__)

SEQ_STEP = 16
PREFIX_STEP = 8
# Rows x (tokens + prefix) of the largest bucket captured, and its longest prefix. At that size a
# forward is mostly device work, which a graph does not speed up (H100, MiniLM: x4 at 64 x 48 tokens,
# x1.4 at 256 x 48); each bucket keeps its own input buffers, the largest being the prefix keys and
# values (MiniLM, fp16, 64 rows x prefix 64: 75 MiB), bounded together by GraphedEncoder.max_bytes.
MAX_BUCKET_TOKENS = 8192
MAX_BUCKET_PREFIX = 64


@dataclass(frozen=True)
class Bucket:
    rows: int
    seq: int
    prefix: int
    scaled: bool = False  # some row's task has (IA)^3 scales: the graph reads a scale-delta buffer
    # The batch's LoRA rank (0: none). Exact, not padded: padding columns would have to be zeroed on
    # every fill, and a platform trains its tasks at one or two ranks.
    lora_rank: int = 0


def bucket_for(
    rows: int, seq: int, prefix: int, max_rows: int, scaled: bool = False, lora_rank: int = 0
) -> Bucket | None:
    """The padded shape a forward of this size replays, or None when it is larger than any bucket."""
    padded_rows = 1 << max(0, rows - 1).bit_length()  # [1, 2, 4, 8, ...]
    padded_seq = -(-seq // SEQ_STEP) * SEQ_STEP
    padded_prefix = -(-prefix // PREFIX_STEP) * PREFIX_STEP
    if padded_rows > max_rows or padded_prefix > MAX_BUCKET_PREFIX:
        return None
    if padded_rows * (padded_seq + padded_prefix) > MAX_BUCKET_TOKENS:
        return None
    return Bucket(padded_rows, padded_seq, padded_prefix, scaled, lora_rank)


class _Static:
    """One bucket's input and output buffers, and its graph (None where forwards run eagerly)."""

    def __init__(self, family: BackboneFamily, bucket: Bucket, like: torch.Tensor) -> None:
        rows, seq, prefix = bucket.rows, bucket.seq, bucket.prefix
        shape = family.shape
        device, dtype = like.device, like.dtype
        self.family = family
        self.bucket = bucket
        self.embeds = torch.zeros((rows, seq, like.shape[-1]), device=device, dtype=dtype)  # [R, S, hidden]
        self.positions = torch.zeros((rows, seq), device=device, dtype=torch.long)  # [R, S]
        self.prefix = None
        if prefix:
            # [R, layers, 2, kv_heads, P, head_dim]
            size = (rows, shape.num_layers, 2, shape.num_kv_heads, prefix, shape.head_dim)
            self.prefix = torch.zeros(size, device=device, dtype=dtype)
        self.scale_delta = None
        if bucket.scaled:
            # [R, layers, 2 * kv_dim + ffn]; padded rows keep whatever an earlier forward left (dropped)
            self.scale_delta = torch.zeros(
                (rows, shape.num_layers, shape.scales_width), device=device, dtype=dtype
            )
        self.lora: LowRank | None = None
        if bucket.lora_rank:
            r = bucket.lora_rank
            # Per target [R, layers, in, r] and [R, layers, r, out]; padded rows keep stale values.
            self.lora = {
                name: (
                    torch.zeros((rows, shape.num_layers, width_in, r), device=device, dtype=dtype),
                    torch.zeros((rows, shape.num_layers, r, width_out), device=device, dtype=dtype),
                )
                for name, (width_in, width_out) in family.lora_targets(shape).items()
            }
        # The family's layout tensors for this bucket, filled per forward (shapes fixed by the bucket).
        self.masks: dict[str, torch.Tensor] = {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # [R, S, hidden]: the graph's output buffer

    def nbytes(self) -> int:
        tensors = [self.embeds, self.positions, self.prefix, self.scale_delta, *self.masks.values()]
        tensors += [t for pair in (self.lora or {}).values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.family.layers(
                self.embeds, self.positions, self.masks, self.prefix, self.scale_delta, lora=self.lora
            )
        self.graph.replay()
        assert self.hidden is not None
        return self.hidden

    def fill(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: Layout,
        prefix: torch.Tensor | None,
        scale_delta: torch.Tensor | None,
        lora: LowRank | None,
    ) -> None:
        """Copy one forward's inputs in; whatever lies past them is masked or dropped."""
        rows, seq, _ = embeds.shape
        bucket = self.bucket
        self.embeds[:rows, :seq].copy_(embeds)
        self.positions[:rows, :seq].copy_(positions)
        extra = bucket.rows - rows
        # Padded rows: no prefix, one token (stale embeddings from an earlier forward; never read back).
        padded = Layout(
            prefix=bucket.prefix,
            seq=bucket.seq,
            prefix_len=torch.cat([layout.prefix_len, layout.prefix_len.new_zeros(extra)]),
            seq_len=torch.cat([layout.seq_len, layout.seq_len.new_ones(extra)]),
        )
        masks = self.family.masks(padded, self.embeds.dtype)
        for name, tensor in masks.items():
            if name not in self.masks:
                self.masks[name] = torch.empty_like(tensor)
            self.masks[name].copy_(tensor)
        if prefix is not None:
            assert self.prefix is not None
            self.prefix[:rows, :, :, :, : prefix.shape[4]].copy_(prefix)
        if scale_delta is not None:
            assert self.scale_delta is not None
            self.scale_delta[:rows].copy_(scale_delta)
        if lora is not None:
            assert self.lora is not None
            for name, (down, up) in lora.items():
                self.lora[name][0][:rows].copy_(down)
                self.lora[name][1][:rows].copy_(up)

    def capture(self, pool: Any) -> None:
        # Warm-up on a side stream first (cuBLAS and SDPA pick and initialise their kernels), as
        # torch.cuda.graph's documentation asks; "thread_local" leaves other threads free to use
        # the GPU (the prompt pool's copies) while this thread captures.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            hidden = self.run()
        self.graph, self.hidden = graph, hidden


class GraphedEncoder:
    """An :class:`~prompts.forward.Encoder` that pads each forward to a bucket and replays a graph of
    the family's layer loop.

    ``capture=False`` runs the same padding eagerly: that is how the CPU tests check the padding,
    and what a forward falls back to when graphs are off.
    """

    def __init__(
        self,
        family: BackboneFamily,
        *,
        max_rows: int,
        capture: bool,
        max_graphs: int = 64,
        max_bytes: int = 2 << 30,
    ) -> None:
        self.family = family
        self.max_rows = 1 << max(0, max_rows - 1).bit_length()
        self.capture = capture
        self.max_graphs = max_graphs
        # Static buffers of all buckets together; a large decoder's prefix buffers are the big ones
        # (Qwen3-0.6B, fp16, 64 rows x prefix 64: 470 MiB).
        self.max_bytes = max_bytes
        self.replays = 0
        self.eager = 0
        self._bytes = 0
        self._buckets: dict[Bucket, _Static] = {}
        self._lock = threading.Lock()  # one forward at a time owns the static buffers
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def graphs(self) -> int:
        return sum(1 for s in self._buckets.values() if s.graph is not None)

    def __call__(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: Layout,
        prefix: torch.Tensor | None,
        scale_delta: torch.Tensor | None = None,
        lora: LowRank | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[B, S, hidden]``, as the family's loop returns them for the same arguments."""
        rows, seq, _ = embeds.shape
        rank = 0 if lora is None else int(next(iter(lora.values()))[0].shape[-1])
        bucket = bucket_for(
            rows, seq, layout.prefix, self.max_rows, scaled=scale_delta is not None, lora_rank=rank
        )
        if bucket is not None:
            with self._lock:
                static = self._buckets.get(bucket)
                fresh = static is None and len(self._buckets) < self.max_graphs
                if fresh:
                    static = _Static(self.family, bucket, embeds)
                    static.fill(embeds, positions, layout, prefix, scale_delta, lora)
                    if self._bytes + static.nbytes() > self.max_bytes:
                        static = None
                    else:
                        self._bytes += static.nbytes()
                        self._buckets[bucket] = static
                elif static is not None:
                    static.fill(embeds, positions, layout, prefix, scale_delta, lora)
                if static is not None:
                    if fresh and self.capture:  # the capture's warm-up runs on the buffers just filled
                        try:
                            static.capture(self._pool)
                        except RuntimeError:  # torch.AcceleratorError is one
                            # Something on this thread synchronised mid-capture (a debugging hook, a
                            # rotary variant that reads positions back). Serving goes on eagerly, with
                            # the same padding, rather than failing batches.
                            logger.exception(
                                "CUDA graph capture failed; the encoder runs eagerly from now on"
                            )
                            self.capture = False
                    self.replays += 1
                    # A copy, taken before the lock is released: the next forward overwrites the buffer.
                    return static.run()[:rows, :seq].clone()
        self.eager += 1  # too large for a bucket, or past max_graphs / max_bytes
        family = self.family
        masks = family.masks(layout, embeds.dtype)
        return family.layers(embeds, positions, masks, prefix, scale_delta, lora=lora)
