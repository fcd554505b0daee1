"""PEFT interop: prompt-learning adapters (prefix tuning, prompt tuning, P-tuning) <-> task artifacts.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For prompt
learning, PEFT saves the *evaluated* table under ``prompt_embeddings`` (a prefix MLP or a P-tuning
prompt encoder is run once at save time), and for ``SEQ_CLS`` the classifier as
``base_model.classifier.{weight,bias}`` (``modules_to_save``).

Two backbone families have PEFT sequence classifiers with one linear layer on a pooled vector, and
only those are imported and exported (DeBERTa's and ModernBERT's classifiers have a dense layer of the
base model in front, which an adapter does not carry). Conventions, proven against PEFT in
tests/prompts/test_peft_io.py:

- prefix tuning: ``prompt_embeddings`` ``[P, layers * 2 * kv_heads * head_dim]`` -> view ``[P, layers,
  2, kv_heads, head_dim]`` -> permute(1, 2, 3, 0, 4) -> the artifact's ``prefix`` ``[layers, 2,
  kv_heads, P, head_dim]`` (PEFT sizes a decoder's prefix by its key/value heads and records them as
  ``num_attention_heads``, with ``token_dim = kv_heads * head_dim``); text positions start after the
  prefix (Hugging Face numbers them from the cache length);
- prompt tuning / P-tuning: ``prompt_embeddings`` ``[K, hidden]`` is the artifact's input ``prompt``;
- BERT layout: BertForSequenceClassification's head pools sequence position 0 (the first virtual
  token when there is a prompt) through the backbone's pooler: ``pooling="first"``, ``pooler="backbone"``;
- decoders: ``*ForSequenceClassification`` pools the last real token into ``score``, which has no
  bias: ``pooling="last"``, a zero bias.

Only artifacts with that head can be exported: any other head would give different logits under PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prompts.artifact import Method, PromptArtifact, build_artifact
from prompts.backbone import BackboneSpec
from prompts.errors import ArtifactError

__all__ = ["PeftError", "export_peft_adapter", "import_peft_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"  # ours: PEFT keeps no label names, so export writes them beside the adapter

_PEFT_TO_METHOD: dict[str, Method] = {
    "PREFIX_TUNING": "p-tuning-v2",
    "PROMPT_TUNING": "prompt-tuning",
    "P_TUNING": "p-tuning",
}
_METHOD_TO_PEFT = {"p-tuning-v2": "PREFIX_TUNING", "prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING"}
PEFT_FAMILIES = ("bert", "decoder")


class PeftError(ArtifactError):
    """A PEFT adapter that cannot become a task artifact, or an artifact PEFT cannot represent."""

    code = "invalid_peft_adapter"


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftError(f"{directory} is not a PEFT adapter directory: no {CONFIG_FILE}") from None
    except (OSError, ValueError) as exc:
        raise PeftError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise PeftError(f"{path}: expected a JSON object")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise PeftError(
                f"{directory} holds adapter_model.bin, a pickle, which is never loaded; "
                "re-save the adapter with safe_serialization=True"
            )
        raise PeftError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise PeftError(f"cannot read {path}: {exc}") from exc


def _check_family(family: str, what: str) -> None:
    if family not in PEFT_FAMILIES:
        raise PeftError(
            f"{what} is for BERT-layout and decoder backbones; this backbone is of the {family} family, "
            "whose PEFT classifier has a dense layer of the base model in front (not carried by an adapter)"
        )


def _peft_dims(spec: BackboneSpec, peft_type: str) -> dict[str, int]:
    """``num_attention_heads`` and ``token_dim`` as PEFT records them for this backbone."""
    if peft_type == "PREFIX_TUNING":
        return {
            "num_layers": spec.num_layers,
            "num_attention_heads": spec.num_kv_heads,
            "token_dim": spec.num_kv_heads * spec.head_dim,
        }
    return {
        "num_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "token_dim": spec.hidden_size,
    }


def _head(weights: dict[str, torch.Tensor], directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear classifier PEFT saved with ``modules_to_save`` (BERT: ``classifier``; decoders:
    ``score``, without a bias)."""
    if any(k.endswith("classifier.dense.weight") or k.endswith("out_proj.weight") for k in weights):
        raise PeftError(
            f"{directory}: the classifier is a two-layer head (RoBERTa-style dense + out_proj); "
            "ptserve artifacts hold one linear head on the pooled position"
        )
    for stem in ("classifier", "score"):
        w = [k for k in weights if k.endswith(f"{stem}.weight")]
        b = [k for k in weights if k.endswith(f"{stem}.bias")]
        if len(w) == 1:
            weight = weights[w[0]]
            bias = weights[b[0]] if len(b) == 1 else torch.zeros(weight.shape[0])
            return weight, bias
    raise PeftError(
        f"{directory}: no classifier weights in {WEIGHTS_FILE} (found {sorted(weights)[:8]}); train the "
        "adapter with task_type SEQ_CLS so PEFT saves the classifier (modules_to_save)"
    )


def import_peft_adapter(
    directory: str | Path,
    *,
    task: str,
    spec: BackboneSpec,
    labels: list[str] | None = None,
) -> PromptArtifact:
    """Convert a PEFT SEQ_CLS prompt-learning adapter to a task artifact for ``spec``'s backbone.

    ``labels`` default to ``labels.json`` in the adapter directory (written by :func:`export_peft_adapter`),
    else ``label_0 .. label_{C-1}``. PEFT records no weight fingerprint, so only shapes can be checked:
    the caller vouches that the adapter was trained on this backbone.
    """
    directory = Path(directory)
    _check_family(spec.family, "importing a PEFT adapter")
    config = _read_config(directory)
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in _PEFT_TO_METHOD:
        raise PeftError(
            f"{directory}: peft_type {peft_type!r} is not supported; "
            f"expected one of {sorted(_PEFT_TO_METHOD)}"
        )
    if config.get("task_type") not in (None, "SEQ_CLS"):
        raise PeftError(
            f"{directory}: task_type {config.get('task_type')!r}; only SEQ_CLS adapters carry a head"
        )
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise PeftError(
            f"{directory}: encoder-decoder adapters (num_transformer_submodules=2) are not supported"
        )
    for key, mine in _peft_dims(spec, peft_type).items():
        theirs = config.get(key)
        if theirs is not None and int(theirs) != mine:
            raise PeftError(
                f"{directory}: adapter was made for {key}={theirs}; this backbone has {key}={mine} "
                f"({spec.describe()})"
            )

    weights = _read_weights(directory)
    if "prompt_embeddings" not in weights:
        raise PeftError(f"{directory}: {WEIGHTS_FILE} has no 'prompt_embeddings' tensor")
    table = weights["prompt_embeddings"].float()
    head_weight, head_bias = _head(weights, directory)
    if head_weight.dim() != 2 or head_weight.shape[1] != spec.hidden_size:
        raise PeftError(
            f"{directory}: classifier weight has shape {list(head_weight.shape)}; "
            f"expected [labels, {spec.hidden_size}]"
        )
    num_labels = int(head_weight.shape[0])
    if labels is None:
        labels_path = directory / LABELS_FILE
        if labels_path.is_file():
            loaded = json.loads(labels_path.read_text(encoding="utf-8"))
            labels = [str(x) for x in (loaded["labels"] if isinstance(loaded, dict) else loaded)]
        else:
            labels = [f"label_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise PeftError(
            f"{directory}: the classifier has {num_labels} rows but {len(labels)} labels were given"
        )

    method = _PEFT_TO_METHOD[peft_type]
    prefix = prompt = None
    if peft_type == "PREFIX_TUNING":
        width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        if table.dim() != 2 or table.shape[1] != width:
            raise PeftError(
                f"{directory}: prefix table has shape {list(table.shape)}; expected [P, {width}] "
                f"(layers {spec.num_layers} x 2 x key/value heads {spec.num_kv_heads} "
                f"x head_dim {spec.head_dim})"
            )
        length = int(table.shape[0])
        # [P, layers * 2 * kv_heads * head_dim] -> [P, layers, 2, kv_heads, head_dim]
        #   -> [layers, 2, kv_heads, P, head_dim]
        prefix = table.view(length, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(
            1, 2, 3, 0, 4
        )
    else:
        if table.dim() != 2 or table.shape[1] != spec.hidden_size:
            raise PeftError(
                f"{directory}: prompt table has shape {list(table.shape)}; expected [K, {spec.hidden_size}]"
            )
        prompt = table  # [K, hidden]
    return build_artifact(
        task=task,
        labels=labels,
        spec=spec,
        head_weight=head_weight,
        head_bias=head_bias,
        prefix=prefix,
        prompt=prompt,
        method=method,
        pooling="last" if spec.family == "decoder" else "first",
        pooler="none" if spec.family == "decoder" else "backbone",
        positions="after_prefix",
        training={
            "imported_from": "peft",
            "peft_type": peft_type,
            "peft_version": config.get("peft_version"),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
        },
    )


def export_peft_adapter(
    artifact: PromptArtifact,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``artifact`` as a PEFT SEQ_CLS adapter directory loadable with ``PeftModel.from_pretrained``
    on the backbone's ``*ForSequenceClassification`` (plus ``labels.json``)."""
    m = artifact.manifest
    t = artifact.tensors
    family = m.backbone.family_name
    _check_family(family, "exporting to PEFT")
    if m.prefix_length and m.prompt_length:
        raise PeftError(
            f"task {m.task!r} has both a deep prefix and an input prompt; a PEFT adapter holds one of them"
        )
    if m.scales is not None:
        raise PeftError(
            f"task {m.task!r} has (IA)^3 scales beside its prompt; a PEFT adapter holds one method "
            "(train with --no-scales to export to PEFT)"
        )
    if m.lora is not None:
        raise PeftError(
            f"task {m.task!r} has LoRA beside its prompt; a PEFT adapter holds one method "
            "(train with --lora-rank 0 to export to PEFT)"
        )
    if not m.prefix_length and not m.prompt_length:
        raise PeftError(
            f"task {m.task!r} has neither a prefix nor a prompt (a linear probe): PEFT has no such adapter"
        )
    if family == "decoder":
        if m.head.pooling != "last" or m.head.pooler != "none" or bool(t["head.bias"].any()):
            raise PeftError(
                f"task {m.task!r} pools {m.head.pooling!r} with a head bias; PEFT's decoder classifier "
                "pools the last token into a bias-free score layer (train with --head peft to export to PEFT)"
            )
    elif m.head.pooling != "first" or m.head.pooler != "backbone":
        raise PeftError(
            f"task {m.task!r} pools {m.head.pooling!r} with pooler {m.head.pooler!r}; PEFT's "
            "BertForSequenceClassification head needs pooling 'first' with the backbone pooler "
            "(train with --head peft to export to PEFT)"
        )
    if m.prefix_length and m.positions != "after_prefix":
        raise PeftError(
            f"task {m.task!r} numbers positions from zero; PEFT prefixes shift them (after_prefix)"
        )
    b = m.backbone
    peft_type = "PREFIX_TUNING" if m.prefix_length else _METHOD_TO_PEFT.get(m.method, "PROMPT_TUNING")
    heads = b.prefix_heads if peft_type == "PREFIX_TUNING" else b.num_heads
    common: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": ["classifier", "score"],
        "num_attention_heads": heads,
        "num_layers": b.num_layers,
        "num_transformer_submodules": 1,
        "revision": None,
        "task_type": "SEQ_CLS",
        "token_dim": heads * b.head_dim if peft_type == "PREFIX_TUNING" else b.hidden_size,
    }
    if m.prefix_length:
        prefix = t["prefix"].float()  # [layers, 2, kv_heads, P, head_dim]
        # -> [P, layers, 2, kv_heads, head_dim] -> [P, layers * 2 * kv_heads * head_dim]
        table = prefix.permute(3, 0, 1, 2, 4).reshape(m.prefix_length, -1).contiguous()
        extra: dict[str, Any] = {
            "num_virtual_tokens": m.prefix_length,
            "encoder_hidden_size": b.hidden_size,
            "prefix_projection": False,
        }
    else:
        table = t["prompt"].float().contiguous()  # [K, hidden]
        extra = {"num_virtual_tokens": m.prompt_length}
        if peft_type == "P_TUNING":
            extra |= {
                "encoder_hidden_size": b.hidden_size,
                "encoder_reparameterization_type": "MLP",
                "encoder_num_layers": 2,
                "encoder_dropout": 0.0,
            }
        else:
            extra |= {
                "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None,
            }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {**common, **extra, "peft_type": peft_type}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if family == "decoder":
        head = {"base_model.score.weight": t["head.weight"].float().contiguous()}
    else:
        head = {
            "base_model.classifier.weight": t["head.weight"].float().contiguous(),
            "base_model.classifier.bias": t["head.bias"].float().contiguous(),
        }
    save_file({"prompt_embeddings": table, **head}, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / LABELS_FILE).write_text(json.dumps(m.labels, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
