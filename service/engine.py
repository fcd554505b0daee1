"""Mixed-batch execution: the batcher's ``run_batch`` for classification rows of any tasks."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from prompts.backbone import Backbone
from prompts.forward import PromptBatch, run_prompted
from prompts.graphs import GraphedEncoder
from service.cache import LoadedTask
from service.memory import HeapTrimmer
from service.pool import PromptPool


@dataclass(frozen=True, eq=False)
class Row:
    """One text of one request, pinned to the task version its request resolved."""

    task: LoadedTask
    input_ids: list[int]

    def cost(self) -> int:
        return len(self.input_ids) + self.task.prompt_length


class Engine:
    """Runs one forward pass per batch and returns each row's label probabilities (its own labels only)."""

    def __init__(
        self,
        backbone: Backbone,
        pool: PromptPool,
        trimmer: HeapTrimmer | None = None,
        *,
        cuda_graphs: bool = True,
        max_rows: int = 64,
    ) -> None:
        self.backbone = backbone
        self.pool = pool
        self.trimmer = trimmer
        # CUDA graphs of the family's layer loop on a GPU; rows beyond max_rows run eagerly. Only on
        # the first GPU: forward threads start on device 0, where torch.cuda.graph would create its
        # capture stream, so a model on cuda:N (N > 0) would be captured empty and replay stale states.
        self.graphs: GraphedEncoder | None = None
        device = backbone.device
        if cuda_graphs and device.type == "cuda" and (device.index or 0) == 0:
            self.graphs = GraphedEncoder(backbone.family, max_rows=max_rows, capture=True)
        self._batches = 0
        self._count_lock = threading.Lock()  # run_batch may run in several forward threads at once

    @property
    def batches(self) -> int:
        """Forward passes run so far."""
        return self._batches

    def gather(self, rows: list[Row]) -> PromptBatch:
        """The rows' prompt tensors from the pool, sliced to this batch's longest lengths."""
        tasks = [r.task for r in rows]
        return self.pool.gather(
            [t.slot for t in tasks],
            prompt_lens=[t.prompt_length for t in tasks],
            max_prefix=max(t.prefix_length for t in tasks),
            max_prompt=max(t.prompt_length for t in tasks),
            max_labels=max(t.num_labels for t in tasks),
            modes=frozenset(t.pooling for t in tasks),
            any_pooler=any(t.use_pooler for t in tasks),
            any_scales=any(t.scaled for t in tasks),
            lora_rank=max(t.lora_rank for t in tasks),
        )

    def logits(self, rows: list[Row]) -> torch.Tensor:
        """Logits ``[B, max labels]`` of one mixed batch (call under ``torch.inference_mode``)."""
        return run_prompted(self.backbone, [r.input_ids for r in rows], self.gather(rows), self.graphs)

    def run_batch(self, rows: list[Row]) -> list[list[float]]:
        with torch.inference_mode():
            # -inf columns past a row's own labels become exactly 0 probability.
            probs = torch.softmax(self.logits(rows).float(), dim=-1).cpu()  # [B, max labels]
        with self._count_lock:
            self._batches += 1
        table = probs.tolist()
        if self.trimmer is not None:
            self.trimmer.maybe_trim()  # between batches, in the forward thread: see service/memory.py
        return [table[b][: row.task.num_labels] for b, row in enumerate(rows)]
