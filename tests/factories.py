"""Random but valid task artifacts for a given backbone."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors.torch import save as st_save

from prompts.artifact import MANIFEST_KEY, Manifest, Method, PromptArtifact, build_artifact, content_version
from prompts.backbone import Backbone, BackboneSpec
from prompts.backbones import family_by_name
from prompts.methods import label_words


def random_artifact(
    spec: BackboneSpec,
    *,
    task: str = "demo",
    num_labels: int = 3,
    prefix_length: int = 4,
    prompt_length: int = 0,
    seed: int = 0,
    pooling: Literal["cls", "first", "mean", "last"] = "cls",
    pooler: Literal["none", "backbone"] = "none",
    positions: Literal["after_prefix", "from_zero"] = "after_prefix",
    method: Method | None = None,
    scale: float = 1.0,
    scales: bool = False,
    lora_rank: int = 0,
) -> PromptArtifact:
    """A random task of the given shape; ``scales``: with random (IA)^3 multipliers around 1;
    ``lora_rank``: with random LoRA of that rank on the family's targets."""
    g = torch.Generator().manual_seed(seed)
    prefix = None
    if prefix_length:
        # [layers, 2, kv_heads, P, head_dim]
        shape = (spec.num_layers, 2, spec.num_kv_heads, prefix_length, spec.head_dim)
        prefix = torch.randn(shape, generator=g) * scale
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
        # [layers, 2 * kv_dim + ffn], drawn after everything else so other tensors stay as they were
        scales=1 + 0.3 * torch.randn(spec.num_layers, spec.scales_width, generator=g) if scales else None,
        lora=random_lora(spec, lora_rank, g) if lora_rank else None,
    )


def random_lora(
    spec: BackboneSpec, rank: int, g: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random LoRA on every target of ``spec``'s family: updates about a fifth of a projection's size."""
    family = family_by_name(spec.family)
    assert family is not None
    lora = {}
    for name, (width_in, width_out) in family.lora_targets(spec.shape()).items():
        down = torch.randn(spec.num_layers, width_in, rank, generator=g) / width_in**0.5  # [layers, in, r]
        up = 0.2 * torch.randn(spec.num_layers, rank, width_out, generator=g) / rank**0.5  # [layers, r, out]
        lora[name] = (down, up)
    return lora


def forge_artifact(
    artifact: PromptArtifact,
    edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None],
    *,
    rehash: bool = True,
) -> bytes:
    """The bytes of ``artifact`` after ``edit`` changed its manifest dict and/or tensors in place.

    With ``rehash`` the version is recomputed when the edited manifest is still constructible, so the
    content-hash check (the last one) cannot mask the check a bad upload is meant to reach.
    """
    manifest: dict[str, Any] = json.loads(artifact.manifest_json())
    tensors = {name: t.clone() for name, t in artifact.tensors.items()}
    edit(manifest, tensors)
    if rehash:
        try:
            model = Manifest.model_validate({**manifest, "version": ""})
        except ValidationError:
            pass  # the manifest check fires before the hash check anyway
        else:
            manifest["version"] = content_version(model, tensors)
    return st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})


def make_verbalizer_artifact(
    backbone: Backbone, words: dict[str, list[str]], prompt_words: list[str], *, task: str = "verb"
) -> tuple[PromptArtifact, list[int]]:
    """A verbalizer task (labels: ``words``' keys, sorted) whose input prompt is the word embeddings of
    ``prompt_words`` then [MASK]: the same template a Hugging Face MLM sees as tokens. Also returns
    the prompt words' ids."""
    labels = sorted(words)
    verbalizer = label_words(backbone, labels, words)
    ids = [int(backbone.tokenizer.convert_tokens_to_ids(w)) for w in prompt_words]
    with torch.no_grad():
        prompt = backbone.word_embeddings.weight[torch.tensor(ids, dtype=torch.long)].float()  # [K, hidden]
    prompt = torch.cat([prompt, verbalizer.mask_embedding.unsqueeze(0)])  # [K + 1, hidden]
    artifact = build_artifact(
        task=task,
        labels=labels,
        spec=backbone.spec,
        head_weight=verbalizer.head_weight,
        head_bias=verbalizer.head_bias,
        prompt=prompt,
        method="p-tuning",
        pooling="mask",
        verbalizer=verbalizer.spec(mask_position=len(prompt_words)),
    )
    return artifact, ids
