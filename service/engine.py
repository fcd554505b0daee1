"""Mixed-batch execution: the batcher's ``run_batch`` for classification rows of any tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prompts.backbone import Backbone
from prompts.forward import prompted_forward
from service.cache import LoadedTask


@dataclass(frozen=True, eq=False)
class Row:
    """One text of one request, pinned to the task version its request resolved."""

    task: LoadedTask
    input_ids: list[int]

    def cost(self) -> int:
        return len(self.input_ids) + self.task.prompt.prompt_length


class Engine:
    """Runs one forward pass per batch and returns each row's label probabilities (its own labels only)."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.batches = 0

    def run_batch(self, rows: list[Row]) -> list[list[float]]:
        with torch.inference_mode():
            logits = prompted_forward(
                self.backbone, [r.input_ids for r in rows], [r.task.prompt for r in rows]
            )
            # -inf columns past a row's own labels become exactly 0 probability.
            probs = torch.softmax(logits.float(), dim=-1).cpu()  # [B, max labels]
        self.batches += 1
        table = probs.tolist()
        return [table[b][: row.task.prompt.num_labels] for b, row in enumerate(rows)]
