"""PEFT prefix tuning as a judge, and the same computation without PEFT for releases where it breaks.

From transformers 5.24 on, models take their cache as ``cache=`` and PEFT 0.21.2 (the newest
release) refuses prefix tuning there ("Model does not support past key values which are required for
prefix tuning"). ptserve's import and export are file formats and do not depend on that: the tests
judge them against PEFT where PEFT runs (the locked set, which a test below holds to that), and always
against :func:`prefix_reference_logits`, which is what PEFT computes, spelled with Hugging Face's own
model and a cache: a test proves the two agree wherever PEFT runs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "test.txt"
PEFT_REFUSAL = "does not support past key values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name this transformers version's ``forward`` takes. Read off the base
    model: a ``*ForSequenceClassification`` may pass the cache on through ``**kwargs``."""
    params = inspect.signature(getattr(model, "base_model", model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def prefix_cache(prefix: torch.Tensor) -> DynamicCache:
    """A cache holding ``prefix`` ``[B, layers, 2, kv_heads, P, head_dim]``: layer i's keys and values."""
    layers = prefix.shape[1]
    return DynamicCache(ddp_cache_data=[(prefix[:, i, 0], prefix[:, i, 1]) for i in range(layers)])


def table_to_prefix(table: torch.Tensor, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's prefix table ``[P, layers * 2 * kv_heads * head_dim]`` as ``[layers, 2, kv_heads, P, D]``."""
    length = table.shape[0]
    return table.view(length, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)


@torch.no_grad()
def prefix_reference_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    """What PEFT's SEQ_CLS prefix tuning computes: every row gets ``prefix`` ``[layers, 2, kv_heads, P,
    head_dim]`` as its cache, the attention mask is extended by P ones in front, and the model numbers
    positions from the cache length. ``model`` is a ``*ForSequenceClassification`` in eval mode."""
    rows = input_ids.shape[0]
    batch_prefix = prefix.unsqueeze(0).expand(rows, *prefix.shape).contiguous()
    mask = torch.cat([torch.ones(rows, prefix.shape[3], dtype=attention_mask.dtype), attention_mask], dim=1)
    out = model(input_ids=input_ids, attention_mask=mask, **cache_kwargs(model, prefix_cache(batch_prefix)))
    logits: torch.Tensor = out.logits
    return logits


@functools.cache
def peft_prefix_refusal() -> str | None:
    """None where the installed PEFT runs prefix tuning on a BERT model, else why not (its error)."""
    import peft
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    model = peft.get_peft_model(
        BertForSequenceClassification(config),
        peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=2),
    ).eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    except ValueError as exc:
        if PEFT_REFUSAL in str(exc):
            versions = f"peft {peft.__version__}, transformers {importlib.metadata.version('transformers')}"
            return f"PEFT's prefix tuning refuses this transformers release ({versions}): {exc}"
        raise
    return None


def installed_set_is_locked() -> bool:
    """Whether transformers and peft are installed at exactly the versions requirements/test.txt pins."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", LOCK.read_text(encoding="utf-8"), re.M))
    return all(importlib.metadata.version(name) == pins.get(name) for name in ("transformers", "peft"))
