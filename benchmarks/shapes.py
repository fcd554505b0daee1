"""Random-weight Hugging Face model directories of real architectures' shapes, for speed benchmarks.

The speed benchmarks (``perf_engine``, ``perf_peft``) need a backbone of a real size, not its trained
weights: the work of a forward depends on the shapes (layers, hidden size, heads, key/value heads,
head size, feed-forward size) and the token counts, never on the values. This module writes a model
directory with a named architecture's published ``config.json`` values and weights drawn at random by
``AutoModel.from_config`` (deterministic per ``--seed``, saved in float32), which
``prompts.backbone.load_backbone`` loads like any local checkpoint. Nothing is downloaded.

    .venv/bin/python -m benchmarks.shapes qwen3-0.6b                 # -> benchmarks/out/shapes/qwen3-0.6b
    .venv/bin/python -m benchmarks.shapes deberta-v3-base --out DIR
    .venv/bin/python -m benchmarks.shapes --list

What a directory measures: speed only. Random weights give no accuracy figure, and nothing trained on
one is worth anything.

The tokenizer is the packaged all-MiniLM-L6-v2's (BERT WordPiece, 30,522 pieces, its files copied in):
speed depends on how many tokens a text has, not on which tokenizer cut it, and its ids (< 30,522) fit
every vocabulary below. Two consequences: token counts are BERT's (the real Qwen/Llama BPE or DeBERTa's
SentencePiece would cut a text into a somewhat different number of pieces), and every text is framed by
BERT's [CLS] ... [SEP] (one token on each side), not by the decoder's own special tokens (Qwen adds
none, Llama a <s>). So that the directory agrees with itself, the config's special-token ids are the
tokenizer's ([PAD] 0, [CLS] 101 as bos/cls, [SEP] 102 as eos/sep; the decoders' pad id stays unset, as
published) instead of the published ones listed below: they index the same kind of embedding row, so
the work is the same, and they are valid in every vocabulary here.

Config values, as published in each model's ``config.json`` on the Hugging Face hub (the repository
named in ``source``), spelled for transformers 5 (``rope_parameters``; ModernBERT's published
``global_rope_theta`` / ``local_rope_theta`` are its ``full_attention`` / ``sliding_attention`` rope
thetas). Checked, for this module, against copies of those files quoted in public code (the hub itself
could not be reached): Qwen3-0.6B and Llama-3.2-1B against verbatim copies of their config.json (one
Llama copy is Llama-3.2-1B-Instruct's, the same architecture); ModernBERT-base against several verbatim
copies; DeBERTa-v3-base against several configs written to reproduce it (no verbatim copy of the hub
file was found; some copies spell ``pos_att_type`` "p2c|c2p", which transformers reads as this list).
Every value below that shapes the work of a forward (sizes, heads, key/value heads, head_dim, layer
count, vocabulary, positions, attention pattern, DeBERTa's relative-attention settings) agreed in every
copy. Values that do not change the work are the published ones where a copy showed them and
transformers' defaults otherwise (dropouts, initializer ranges).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    DebertaV2Config,
    LlamaConfig,
    ModernBertConfig,
    PretrainedConfig,
    Qwen3Config,
)

from prompts.backbone import Backbone, default_model_path

DEFAULT_ROOT = Path("benchmarks/out/shapes")
MARKER = "ptserve_shape.json"  # written last: a directory without it is incomplete
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TOKENIZER_VOCAB = 30522  # the packaged MiniLM's WordPiece vocabulary: every id it emits is below this
# Its special tokens ([PAD], [CLS], [SEP]), written into the config in place of the published ids.
TOKENIZER_IDS = {
    "pad_token_id": 0,
    "bos_token_id": 101,
    "cls_token_id": 101,
    "eos_token_id": 102,
    "sep_token_id": 102,
}
# Keys of config.json that say nothing about the architecture (written by whichever version saved it).
_VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"}

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "qwen3": Qwen3Config,
    "llama": LlamaConfig,
    "deberta-v2": DebertaV2Config,
    "modernbert": ModernBertConfig,
}


@dataclass(frozen=True)
class ShapeSpec:
    """One architecture: its config values as published, and where they come from."""

    name: str
    model_type: str
    source: str
    values: dict[str, Any] = field(default_factory=dict)
    note: str = ""


SHAPES: dict[str, ShapeSpec] = {
    s.name: s
    for s in (
        ShapeSpec(
            name="qwen3-0.6b",
            model_type="qwen3",
            source="https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json",
            values={
                "vocab_size": 151936,
                "hidden_size": 1024,
                "intermediate_size": 3072,
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,  # 16 x 128 = 2048 query width on a 1024 hidden size
                "hidden_act": "silu",
                "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "attention_bias": False,
                "attention_dropout": 0.0,
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": 28,
                "tie_word_embeddings": True,
                "initializer_range": 0.02,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
            note="~0.6B parameters (0.44B without the embedding table): a 2.4 GB float32 file",
        ),
        ShapeSpec(
            name="llama-3.2-1b",
            model_type="llama",
            source="https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json",
            values={
                "vocab_size": 128256,
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 64,
                "hidden_act": "silu",
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 32.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                },
                "attention_bias": False,
                "attention_dropout": 0.0,
                "mlp_bias": False,
                "pretraining_tp": 1,
                "tie_word_embeddings": True,
                "initializer_range": 0.02,
                "bos_token_id": 128000,
                "eos_token_id": 128001,
            },
            note="~1.24B parameters: a 4.9 GB float32 file",
        ),
        ShapeSpec(
            name="deberta-v3-base",
            model_type="deberta-v2",
            source="https://huggingface.co/microsoft/deberta-v3-base/blob/main/config.json",
            values={
                "vocab_size": 128100,
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1,
                "max_position_embeddings": 512,
                "type_vocab_size": 0,
                "initializer_range": 0.02,
                "layer_norm_eps": 1e-7,
                "relative_attention": True,
                "max_relative_positions": -1,
                "position_buckets": 256,
                "norm_rel_ebd": "layer_norm",
                "share_att_key": True,
                "pos_att_type": ["p2c", "c2p"],
                "position_biased_input": False,
                "pad_token_id": 0,
            },
            note="~184M parameters (86M without the embedding table): a 0.7 GB float32 file",
        ),
        ShapeSpec(
            name="modernbert-base",
            model_type="modernbert",
            source="https://huggingface.co/answerdotai/ModernBERT-base/blob/main/config.json",
            values={
                "vocab_size": 50368,
                "hidden_size": 768,
                "intermediate_size": 1152,
                "num_hidden_layers": 22,
                "num_attention_heads": 12,
                "hidden_activation": "gelu",
                "max_position_embeddings": 8192,
                "norm_eps": 1e-5,
                "norm_bias": False,
                "attention_bias": False,
                "mlp_bias": False,
                "local_attention": 128,
                "global_attn_every_n_layers": 3,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
                "classifier_pooling": "mean",
                "initializer_range": 0.02,
                "initializer_cutoff_factor": 2.0,
                "tie_word_embeddings": True,
                "pad_token_id": 50283,
                "bos_token_id": 50281,
                "eos_token_id": 50282,
                "cls_token_id": 50281,
                "sep_token_id": 50282,
            },
            note="~149M parameters: a 0.6 GB float32 file",
        ),
    )
}


def make_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The transformers config of shape ``name``; ``overrides`` change values (tests build it small)."""
    try:
        spec = SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(sorted(SHAPES))}") from None
    # The directory holds MiniLM's tokenizer: its special-token ids replace the published ones.
    ids = {key: value for key, value in TOKENIZER_IDS.items() if key in spec.values}
    return CONFIG_CLASSES[spec.model_type](**{**spec.values, **ids, **overrides})


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that vary with the transformers version that wrote it."""
    return {k: v for k, v in config.items() if k not in _VOLATILE}


def _marker(name: str, seed: int, config: PretrainedConfig) -> dict[str, Any]:
    return {"shape": name, "seed": seed, "config": comparable(json.loads(config.to_json_string()))}


def existing_matches(directory: Path, name: str, seed: int, config: PretrainedConfig) -> bool:
    """Whether ``directory`` is a complete directory of this shape, seed and config (then it is reused)."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        saved = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _marker(name, seed, config)
    if marker != expected:
        return False
    if comparable(saved) != expected["config"]:
        return False
    weights = list(directory.glob("*.safetensors"))
    return bool(weights) and all((directory / f).is_file() for f in TOKENIZER_FILES)


def parameter_count(config: PretrainedConfig) -> int:
    """Parameters of ``AutoModel.from_config(config)``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build(
    name: str,
    out: Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    quiet: bool = False,
) -> Path:
    """Write (or reuse) a random-weight model directory of shape ``name``; returns its path.

    An existing directory is reused when its marker, config and files match; one written by this
    module for other values is replaced; any other non-empty directory is refused (never deleted).
    The directory is assembled next to ``out`` and renamed into place, so an interrupted build leaves
    no half-written model behind under ``out``.
    """
    config = make_config(name, **(overrides or {}))
    if int(config.vocab_size) < TOKENIZER_VOCAB:
        raise ValueError(
            f"vocab_size {config.vocab_size} < {TOKENIZER_VOCAB}: MiniLM's token ids would not fit"
        )
    directory = Path(out) if out is not None else DEFAULT_ROOT / name
    if not force and existing_matches(directory, name, seed, config):
        if not quiet:
            print(f"shapes: reusing {directory} ({name}, seed {seed})")
        return directory
    if directory.exists() and any(directory.iterdir()) and not (directory / MARKER).is_file():
        raise FileExistsError(
            f"{directory} exists and was not written by benchmarks.shapes; pick another --out"
        )

    staging = directory.with_name(directory.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    if not quiet:
        spec = SHAPES[name]
        print(f"shapes: building {name} ({spec.note or spec.model_type}) with random weights, seed {seed}")
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.save_pretrained(staging)
    del model
    source = default_model_path()
    for file in TOKENIZER_FILES:
        shutil.copyfile(source / file, staging / file)
    (staging / MARKER).write_text(json.dumps(_marker(name, seed, config), indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)  # ours (it holds a marker) but for other values
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(directory)
    if not quiet:
        size = sum(f.stat().st_size for f in directory.iterdir()) / 2**30
        print(f"shapes: wrote {directory} ({size:.2f} GiB) in {time.perf_counter() - started:.0f} s")
    return directory


# ----------------------------------------------------------------------------- for the benchmarks


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model DIR`` or ``--shape NAME`` (a random-weight directory built or reused here)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local Hugging Face model directory of any supported family (default: packaged MiniLM)",
    )
    group.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="a random-weight model of this real architecture's shape (benchmarks.shapes; speed only)",
    )
    parser.add_argument(
        "--shapes-dir", type=Path, default=DEFAULT_ROOT, help="where --shape directories are built / reused"
    )


def model_path(args: argparse.Namespace) -> Path | None:
    """The model directory the arguments name (None: the packaged MiniLM), building a --shape's."""
    if getattr(args, "shape", None):
        return build(args.shape, args.shapes_dir / args.shape)
    model: Path | None = args.model
    return model


def is_random(backbone: Backbone) -> bool:
    return (Path(backbone.path) / MARKER).is_file()


def backbone_name(backbone: Backbone, shape: str | None) -> str:
    """A short name for file names and reports: the shape, "minilm" (packaged), or the directory's name."""
    if shape:
        return shape
    if Path(backbone.path).resolve() == default_model_path().resolve():
        return "minilm"
    return Path(backbone.path).resolve().name or "model"


def report_tag(backbone: Backbone, shape: str | None) -> str:
    """``<family>_<name>``: keeps runs on different backbones from overwriting each other's reports."""
    raw = f"{backbone.spec.family}_{backbone_name(backbone, shape)}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)


def backbone_info(backbone: Backbone, shape: str | None) -> dict[str, Any]:
    """What a report says about the backbone it ran on."""
    s = backbone.spec
    return {
        "name": backbone_name(backbone, shape),
        "family": s.family,
        "model_type": s.model_type,
        "shape": shape,
        "random_weights": is_random(backbone),
        "path": str(backbone.path),
        "layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "heads": s.num_heads,
        "kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "parameters": sum(p.numel() for p in backbone.model.parameters()),
        "fingerprint": s.fingerprint,
    }


def backbone_summary(info: dict[str, Any]) -> str:
    """One markdown sentence naming the backbone, its family and shape."""
    kv = f" ({info['kv_heads']} key/value)" if info["kv_heads"] != info["heads"] else ""
    text = (
        f"Backbone: {info['name']}, {info['model_type']} ({info['family']} family), {info['layers']} layers, "
        f"hidden {info['hidden_size']}, {info['heads']} heads{kv} of {info['head_dim']}, "
        f"{info['parameters'] / 1e6:.1f}M parameters."
    )
    if info["random_weights"]:
        text += (
            " Random weights of the real architecture's shape (benchmarks/shapes.py): speed only, no "
            "accuracy; MiniLM's WordPiece tokenizer, so token counts are BERT's and every text is "
            "framed by [CLS] ... [SEP], not by this model's own tokens."
        )
    return text


def task_pooling(backbone: Backbone, method: str = "p-tuning-v2", asked: str = "auto") -> str:
    """The pooling a task trained on ``backbone`` gets by default (``asked`` "auto"), as the trainer
    chooses it: decoders the last token; p-tuning-v2 on an encoder as its checkpoint declares (MiniLM
    and ModernBERT-base: mean), else [CLS]."""
    if asked != "auto":
        return asked
    from prompts.trainer import TrainConfig, for_backbone

    head = for_backbone(TrainConfig(method=method), backbone).resolved().head
    assert head is not None and head != "peft"
    return head


def plain_forward_kwargs(backbone: Backbone) -> dict[str, Any]:
    """Extra arguments for a plain ``backbone.model(...)`` call: decoders build no cache."""
    return {"use_cache": False} if backbone.spec.family == "decoder" else {}


def describe(name: str) -> str:
    spec = SHAPES[name]
    v = spec.values
    kv = v.get("num_key_value_heads", v["num_attention_heads"])
    return (
        f"{name:16s} {spec.model_type:11s} {v['num_hidden_layers']:3d} layers, hidden {v['hidden_size']}, "
        f"{v['num_attention_heads']} heads ({kv} key/value), vocab {v['vocab_size']}; {spec.note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", nargs="?", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_ROOT}/<name>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching directory exists")
    parser.add_argument("--list", action="store_true", help="list the shapes and exit")
    args = parser.parse_args()
    if args.list or args.name is None:
        for name in sorted(SHAPES):
            print(describe(name))
        return
    print(build(args.name, args.out, seed=args.seed, force=args.force))


if __name__ == "__main__":
    main()
