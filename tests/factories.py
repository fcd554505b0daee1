"""Random but valid task artifacts for a given backbone."""

from __future__ import annotations

from typing import Literal

import torch

from prompts.artifact import Method, PromptArtifact, build_artifact
from prompts.backbone import BackboneSpec


def random_artifact(
    spec: BackboneSpec,
    *,
    task: str = "demo",
    num_labels: int = 3,
    prefix_length: int = 4,
    prompt_length: int = 0,
    seed: int = 0,
    pooling: Literal["cls", "first", "mean"] = "cls",
    pooler: Literal["none", "backbone"] = "none",
    positions: Literal["after_prefix", "from_zero"] = "after_prefix",
    method: Method | None = None,
    scale: float = 1.0,
) -> PromptArtifact:
    g = torch.Generator().manual_seed(seed)
    prefix = None
    if prefix_length:
        # [layers, 2, heads, P, head_dim]
        prefix = (
            torch.randn(spec.num_layers, 2, spec.num_heads, prefix_length, spec.head_dim, generator=g) * scale
        )
    prompt = torch.randn(prompt_length, spec.hidden_size, generator=g) * scale if prompt_length else None
    if method is None:
        method = "p-tuning-v2" if prefix_length else ("prompt-tuning" if prompt_length else "linear-probe")
    return build_artifact(
        task=task,
        labels=[f"label_{i}" for i in range(num_labels)],
        spec=spec,
        head_weight=torch.randn(num_labels, spec.hidden_size, generator=g),
        head_bias=torch.randn(num_labels, generator=g),
        prefix=prefix,
        prompt=prompt,
        method=method,
        pooling=pooling,
        pooler=pooler,
        positions=positions,
    )
