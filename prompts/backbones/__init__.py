"""Backbone families, one module each: how prompts meet a family's layers.

``family_for`` maps a Hugging Face config to the family that runs it, or refuses it with the list of
supported model types.
"""

from __future__ import annotations

from typing import Any

from prompts.backbones.base import BackboneFamily, Collected, Layout, LowRank, Shape
from prompts.backbones.bert import BertFamily
from prompts.backbones.deberta import DebertaFamily
from prompts.backbones.decoder import DecoderFamily
from prompts.backbones.modernbert import ModernBertFamily
from prompts.errors import BackboneError

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "BackboneFamily",
    "Collected",
    "Layout",
    "LowRank",
    "Shape",
    "family_by_name",
    "family_for",
]

FAMILIES: tuple[type[BackboneFamily], ...] = (BertFamily, DecoderFamily, DebertaFamily, ModernBertFamily)
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(t for f in FAMILIES for t in f.model_types)


def family_for(config: Any) -> type[BackboneFamily]:
    """The family that runs ``config``'s architecture, after its own checks of the config."""
    model_type = str(getattr(config, "model_type", ""))
    for family in FAMILIES:
        if model_type in family.model_types:
            family.check_config(config)
            return family
    supported = ", ".join(f"{f.name}: {', '.join(sorted(f.model_types))}" for f in FAMILIES)
    raise BackboneError(
        f"model type {model_type!r} is not supported; supported architectures are {supported}"
    )


def family_by_name(name: str) -> type[BackboneFamily] | None:
    return next((f for f in FAMILIES if f.name == name), None)
