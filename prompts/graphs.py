"""CUDA graphs of the direct encoder: one captured forward per (rows, tokens, prefix) bucket.

On a GPU the eager encoder is bound by the host, which launches a dozen kernels per layer from
Python: on an H100, MiniLM's direct encoder took 2.5 ms per forward at every batch size from 1 to
256 rows, and a CUDA graph replay of the same shapes took 0.27 ms at 1 row and 0.64 ms at 64 (same
outputs bit for bit). A graph replays fixed shapes, so each forward is padded up to a bucket:

- rows to the next power of two, sequence length to a multiple of ``SEQ_STEP``, prefix length to a
  multiple of ``PREFIX_STEP``;
- padded keys are masked, padded query positions and rows are computed and dropped. Attention,
  LayerNorm and the feed-forward blocks act per row and per position, so a real row's hidden states
  do not depend on the padding (tests/prompts/test_graphs.py checks that on the CPU, where the same
  padding runs eagerly).

Graphs are captured lazily, the first time a bucket is seen (tens of milliseconds), up to
``max_graphs``; shapes over ``MAX_BUCKET_TOKENS`` or past that count run eagerly. They share one
memory pool, which is safe because every replay happens under one lock, on one stream, one at a time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from prompts.forward import _encode

logger = logging.getLogger(__name__)

SEQ_STEP = 16
PREFIX_STEP = 8
# Rows x (tokens + prefix) of the largest bucket captured, and its longest prefix. At that size a
# forward is mostly device work, which a graph does not speed up (H100, MiniLM: x4 at 64 x 48 tokens,
# x1.4 at 256 x 48); each bucket keeps its own input buffers, the largest being the prefix keys and
# values (MiniLM, fp16, 64 rows x prefix 64: 75 MiB), so the worst case over max_graphs buckets is GiBs
# and the typical one (a few prefix lengths, 16-32 tokens per text) tens to hundreds of MiB.
MAX_BUCKET_TOKENS = 8192
MAX_BUCKET_PREFIX = 64


@dataclass(frozen=True)
class Bucket:
    rows: int
    seq: int
    prefix: int


def bucket_for(rows: int, seq: int, prefix: int, max_rows: int) -> Bucket | None:
    """The padded shape a forward of this size replays, or None when it is larger than any bucket."""
    padded_rows = 1 << max(0, rows - 1).bit_length()  # [1, 2, 4, 8, ...]
    padded_seq = -(-seq // SEQ_STEP) * SEQ_STEP
    padded_prefix = -(-prefix // PREFIX_STEP) * PREFIX_STEP
    if padded_rows > max_rows or padded_prefix > MAX_BUCKET_PREFIX:
        return None
    if padded_rows * (padded_seq + padded_prefix) > MAX_BUCKET_TOKENS:
        return None
    return Bucket(padded_rows, padded_seq, padded_prefix)


class _Static:
    """One bucket's input and output buffers, and its graph (None where forwards run eagerly)."""

    def __init__(self, model: Any, bucket: Bucket, shape: tuple[int, int, int], like: torch.Tensor) -> None:
        rows, seq, prefix = bucket.rows, bucket.seq, bucket.prefix
        layers, heads, head_dim = shape
        device, dtype = like.device, like.dtype
        self.embeds = torch.zeros((rows, seq, like.shape[-1]), device=device, dtype=dtype)  # [R, S, hidden]
        self.positions = torch.zeros((rows, seq), device=device, dtype=torch.long)  # [R, S]
        self.token_types = torch.zeros((rows, seq), device=device, dtype=torch.long)  # [R, S]
        # Keys are [prefix (P) | sequence (S)]; everything starts masked but one key, so a padded
        # row's attention always has a finite maximum (an all -inf row would be NaN).
        self.mask = torch.full((rows, 1, 1, prefix + seq), torch.finfo(dtype).min, device=device, dtype=dtype)
        self.mask[..., prefix] = 0
        self.prefix = None
        if prefix:
            shape5 = (rows, layers, 2, heads, prefix, head_dim)  # [R, layers, 2, heads, P, head_dim]
            self.prefix = torch.zeros(shape5, device=device, dtype=dtype)
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # [R, S, hidden]: the graph's output buffer

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return _encode(self.model, self.embeds, self.positions, self.token_types, self.mask, self.prefix)
        self.graph.replay()
        assert self.hidden is not None
        return self.hidden

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
    """A drop-in for ``prompts.forward._encode`` that pads each forward to a bucket and replays a graph.

    ``capture=False`` runs the same padding eagerly: that is how the CPU tests check the padding,
    and what a forward falls back to when graphs are off.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_rows: int,
        capture: bool,
        max_graphs: int = 64,
    ) -> None:
        config = model.config
        self.model = model
        self.layers = int(config.num_hidden_layers)
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.max_rows = 1 << max(0, max_rows - 1).bit_length()
        self.capture = capture
        self.max_graphs = max_graphs
        self.replays = 0
        self.eager = 0
        self._buckets: dict[Bucket, _Static] = {}
        self._lock = threading.Lock()  # one forward at a time owns the static buffers
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def graphs(self) -> int:
        return sum(1 for s in self._buckets.values() if s.graph is not None)

    def __call__(
        self,
        model: Any,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        token_types: torch.Tensor,
        mask: torch.Tensor,
        prefix: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states ``[B, S, hidden]``, as ``_encode`` returns them for the same arguments."""
        rows, seq, _ = inputs_embeds.shape
        plen = 0 if prefix is None else int(prefix.shape[4])
        bucket = bucket_for(rows, seq, plen, self.max_rows)
        if model is not self.model or bucket is None:
            self.eager += 1
            return _encode(model, inputs_embeds, positions, token_types, mask, prefix)
        with self._lock:
            static = self._buckets.get(bucket)
            fresh = static is None and len(self._buckets) < self.max_graphs
            if fresh:
                shape = (self.layers, self.heads, self.head_dim)
                static = self._buckets[bucket] = _Static(self.model, bucket, shape, inputs_embeds)
            if static is not None:
                fill(static, bucket, inputs_embeds, positions, token_types, mask, prefix)
                if fresh and self.capture:  # the capture's warm-up runs on the buffers just filled
                    try:
                        static.capture(self._pool)
                    except RuntimeError:  # torch.AcceleratorError is one
                        # Something on this thread synchronised mid-capture (a debugging hook, say).
                        # Serving goes on eagerly, with the same padding, rather than failing batches.
                        logger.exception("CUDA graph capture failed; the encoder runs eagerly from now on")
                        self.capture = False
                self.replays += 1
                # A copy, taken before the lock is released: the next forward overwrites the buffer.
                return static.run()[:rows, :seq].clone()
        self.eager += 1  # past max_graphs buckets
        return _encode(model, inputs_embeds, positions, token_types, mask, prefix)


def fill(
    static: _Static,
    bucket: Bucket,
    inputs_embeds: torch.Tensor,
    positions: torch.Tensor,
    token_types: torch.Tensor,
    mask: torch.Tensor,
    prefix: torch.Tensor | None,
) -> None:
    """Copy one forward's inputs into a bucket's buffers; whatever lies past them is masked or dropped."""
    rows, seq, _ = inputs_embeds.shape
    plen = 0 if prefix is None else int(prefix.shape[4])
    static.embeds[:rows, :seq].copy_(inputs_embeds)
    static.positions[:rows, :seq].copy_(positions)
    static.token_types[:rows, :seq].copy_(token_types)
    # Row b's keys: its prefix slots, masked padding up to the bucket's prefix, then its sequence.
    keys = static.mask[:rows]  # [B, 1, 1, P_bucket + S_bucket]
    keys.fill_(torch.finfo(keys.dtype).min)
    keys[..., :plen].copy_(mask[..., :plen])
    keys[..., bucket.prefix : bucket.prefix + seq].copy_(mask[..., plen:])
    if prefix is not None:
        assert static.prefix is not None
        static.prefix[:rows, :, :, :, :plen].copy_(prefix)
