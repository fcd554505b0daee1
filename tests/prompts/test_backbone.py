"""Loading the frozen backbone: its spec, fingerprint, error messages and tokenisation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel

from prompts.backbone import Backbone, declared_pooling, default_model_path, load_backbone
from prompts.errors import BackboneError, IncompatibleArtifactError
from prompts.forward import TaskPrompt, prompted_forward
from tests.factories import random_artifact
from tests.models import make_tiny_bert, make_tiny_roberta, write_vocab


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backbones")


def _load_error(path: Path, *fragments: str, device: str = "cpu", dtype: str = "float32") -> None:
    with pytest.raises(BackboneError) as info:
        load_backbone(path, device=device, dtype=dtype)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value!s}"


# --- spec and freezing -------------------------------------------------------------------------------


def test_spec_of_tiny_bert(backbone: Backbone, tiny_bert_dir: Path) -> None:
    spec = backbone.spec
    assert spec.model_type == "bert"
    assert (spec.num_layers, spec.num_heads, spec.head_dim, spec.hidden_size) == (2, 4, 8, 32)
    assert spec.max_positions == 64
    assert spec.position_base == 0
    assert spec.has_pooler is True
    assert spec.fingerprint.startswith("bert-L2-H32-")
    assert spec.as_manifest() == {
        "fingerprint": spec.fingerprint,
        "model_type": "bert",
        "family": "bert",
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 4,
        "head_dim": 8,
        "hidden_size": 32,
    }
    assert backbone.path == tiny_bert_dir
    assert backbone.device == torch.device("cpu")
    assert backbone.dtype == torch.float32
    assert backbone.pad_token_id == backbone.tokenizer.pad_token_id == 0


def test_model_is_frozen_and_in_eval_mode(backbone: Backbone) -> None:
    assert backbone.model.training is False
    assert all(not m.training for m in backbone.model.modules())
    params = list(backbone.model.parameters())
    assert params and not any(p.requires_grad for p in params)


def test_roberta_positions_start_after_padding_idx(model_dirs: Path) -> None:
    roberta = load_backbone(make_tiny_roberta(model_dirs / "roberta"))
    # The tiny RoBERTa pads with id 0, so position ids run from padding_idx + 1 = 1: 65 of 66 rows usable.
    assert roberta.spec.model_type == "roberta"
    assert roberta.spec.position_base == 1
    assert roberta.spec.max_positions == 66 - 1


# --- fingerprint -------------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads(backbone: Backbone, tiny_bert_dir: Path) -> None:
    assert load_backbone(tiny_bert_dir).spec.fingerprint == backbone.spec.fingerprint


def test_fingerprint_is_stable_across_copies_of_the_same_weights(
    backbone: Backbone, model_dirs: Path
) -> None:
    copy = load_backbone(make_tiny_bert(model_dirs / "seed0-copy", seed=0))
    assert copy.spec.fingerprint == backbone.spec.fingerprint


def test_fingerprint_differs_for_other_weights(backbone: Backbone, model_dirs: Path) -> None:
    other = load_backbone(make_tiny_bert(model_dirs / "seed1", seed=1))
    assert other.spec.fingerprint != backbone.spec.fingerprint
    # Same architecture: only the weight hash part differs.
    assert other.spec.fingerprint.startswith("bert-L2-H32-")
    assert other.spec.as_manifest() | {"fingerprint": ""} == backbone.spec.as_manifest() | {"fingerprint": ""}


def test_bfloat16_replica_keeps_the_fp32_fingerprint(backbone: Backbone, tiny_bert_dir: Path) -> None:
    bf16 = load_backbone(tiny_bert_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.spec.fingerprint == backbone.spec.fingerprint
    assert bf16.spec == backbone.spec


def _save_bert_without_pooler(directory: Path, backbone: Backbone) -> Path:
    """A BERT checkpoint that carries no pooler weights, with the tiny model's WordPiece tokenizer."""
    directory.mkdir(parents=True)
    config = BertConfig(
        vocab_size=len(backbone.tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    return directory


def test_checkpoint_without_pooler(backbone: Backbone, model_dirs: Path) -> None:
    directory = _save_bert_without_pooler(model_dirs / "no-pooler", backbone)
    first = load_backbone(directory)
    second = load_backbone(directory)
    assert first.spec.has_pooler is False
    assert first.model.pooler is None
    assert not any(name.startswith("pooler.") for name in first.model.state_dict())
    # The randomly initialised pooler is dropped, so loading twice gives the same fingerprint.
    assert first.spec.fingerprint == second.spec.fingerprint
    assert second.model.pooler is None
    # A task that needs the pooler is refused up front, not when it would fail a mixed batch.
    with pytest.raises(IncompatibleArtifactError, match="has no pooler weights"):
        random_artifact(first.spec, pooler="backbone")
    random_artifact(first.spec, pooler="none")


# --- load errors -------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    _load_error(missing, str(missing), "is not a Hugging Face model directory (no config.json)")


def test_directory_without_config(tmp_path: Path) -> None:
    write_vocab(tmp_path / "vocab.txt")
    _load_error(tmp_path, "no config.json")


def test_unsupported_model_type(tmp_path: Path) -> None:
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    _load_error(
        tmp_path,
        "model type 'gpt2'",
        "is not supported",
        "bert: bert, camembert, roberta, xlm-roberta",
        "decoder: llama, mistral, qwen2, qwen3",
        "deberta-v2: deberta-v2",
        "modernbert: modernbert",
    )


def test_decoder_config_is_refused(tmp_path: Path) -> None:
    BertConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, is_decoder=True
    ).save_pretrained(tmp_path)
    _load_error(tmp_path, "configured as a decoder", "needs it as an encoder")


def test_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    _load_error(tmp_path, "cannot read the model config", str(tmp_path))


def test_unknown_dtype(tiny_bert_dir: Path) -> None:
    _load_error(tiny_bert_dir, "unknown dtype 'float64'", "'bfloat16', 'float16', 'float32'", dtype="float64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tiny_bert_dir: Path) -> None:
    _load_error(tiny_bert_dir, "device 'cuda' was asked for but CUDA is not available", device="cuda")


def test_invalid_device(tiny_bert_dir: Path) -> None:
    _load_error(
        tiny_bert_dir,
        "unknown device 'gpu0'",
        "expected 'auto', 'cpu', 'cuda' or 'cuda:N'",
        device="gpu0",
    )


def test_auto_device_on_cpu(tiny_bert_dir: Path) -> None:
    loaded = load_backbone(tiny_bert_dir, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected


# --- encode ------------------------------------------------------------------------------------------


def test_encode_short_text_is_not_truncated(backbone: Backbone) -> None:
    tok = backbone.tokenizer
    [enc] = backbone.encode(["this phone is great"], 40)
    assert enc.truncated is False
    assert enc.input_ids[0] == tok.cls_token_id
    assert enc.input_ids[-1] == tok.sep_token_id
    assert enc.input_ids == tok("this phone is great")["input_ids"]
    assert len(enc.input_ids) == 6


def test_encode_text_that_exactly_fits(backbone: Backbone) -> None:
    [enc] = backbone.encode(["this phone is great"], 6)
    assert enc.truncated is False and len(enc.input_ids) == 6


def test_encode_long_text_is_truncated_keeping_sep(backbone: Backbone) -> None:
    tok = backbone.tokenizer
    text = " ".join(["great phone"] * 30)
    full = tok(text)["input_ids"]
    assert len(full) > 10
    short, long = backbone.encode(["love it", text], 10)
    assert short.truncated is False
    assert long.truncated is True
    assert len(long.input_ids) == 10
    assert long.input_ids[0] == tok.cls_token_id
    assert long.input_ids[-1] == tok.sep_token_id
    assert long.input_ids[:9] == full[:9]


def test_encode_minimum_room_is_cls_and_sep(backbone: Backbone) -> None:
    tok = backbone.tokenizer
    [enc] = backbone.encode(["hello world"], 2)
    assert enc.input_ids == [tok.cls_token_id, tok.sep_token_id]
    assert enc.truncated is True


@pytest.mark.parametrize("max_tokens", [1, 0, -5])
def test_encode_needs_room_for_special_tokens(backbone: Backbone, max_tokens: int) -> None:
    with pytest.raises(ValueError, match=f"must leave room for the special tokens, got {max_tokens}"):
        backbone.encode(["hello"], max_tokens)


# --- the real packaged backbone ---------------------------------------------------------------------


# --- declared pooling (sentence-transformers directories) ---------------------------------------------


def _sentence_transformers_dir(root: Path, pooling: dict[str, bool], folder: str = "1_Pooling") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": folder, "type": "sentence_transformers.models.Pooling"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / folder).mkdir(exist_ok=True)
    (root / folder / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return root


def test_packaged_minilm_declares_mean_pooling() -> None:
    assert declared_pooling(default_model_path()) == "mean"


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
        ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, None),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, None),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None),  # concatenated
        ({"pooling_mode_mean_tokens": "false", "pooling_mode_cls_token": True}, "cls"),  # only True is on
        ({"pooling_mode_mean_tokens": "true"}, None),
    ],
)
def test_declared_pooling_modes(tmp_path: Path, pooling: dict[str, bool], expected: str | None) -> None:
    assert declared_pooling(_sentence_transformers_dir(tmp_path / "st", pooling, folder="pool")) == expected


def test_declared_pooling_of_plain_or_broken_directories(tmp_path: Path, tiny_bert_dir: Path) -> None:
    assert declared_pooling(tiny_bert_dir) is None  # no modules.json
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "modules.json").write_text("{not json")
    assert declared_pooling(broken) is None
    no_pooling_config = _sentence_transformers_dir(tmp_path / "gone", {"pooling_mode_mean_tokens": True})
    (no_pooling_config / "1_Pooling" / "config.json").unlink()
    assert declared_pooling(no_pooling_config) is None


def test_declared_pooling_stays_inside_the_model_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    model = _sentence_transformers_dir(tmp_path / "model", {"pooling_mode_mean_tokens": True})
    modules = json.loads((model / "modules.json").read_text())
    for path in ("../outside", str(outside)):
        modules[1]["path"] = path
        (model / "modules.json").write_text(json.dumps(modules))
        assert declared_pooling(model) is None


def test_loaded_backbone_carries_the_declared_pooling(backbone: Backbone, model_dirs: Path) -> None:
    assert backbone.pooling is None
    directory = make_tiny_bert(model_dirs / "sentence-bert")
    _sentence_transformers_dir(directory, {"pooling_mode_mean_tokens": True})
    assert load_backbone(directory).pooling == "mean"


@functools.cache
def _minilm() -> Backbone:
    return load_backbone()


@pytest.mark.slow
def test_packaged_minilm_serves_a_prompted_task() -> None:
    backbone = _minilm()
    assert backbone.path == default_model_path()
    spec = backbone.spec
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.hidden_size) == ("bert", 6, 12, 384)
    assert spec.head_dim == 32
    assert spec.max_positions == 512 and spec.position_base == 0
    assert spec.fingerprint.startswith("bert-L6-H384-")

    artifact = random_artifact(spec, num_labels=4, prefix_length=16, prompt_length=2)
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    texts = [
        "this phone is great",
        "terrible battery and the screen is broken",
        "what time does the game start tonight?",
    ]
    encodings = backbone.encode(texts, 512 - 16 - 2)
    assert not any(e.truncated for e in encodings)
    with torch.inference_mode():
        logits = prompted_forward(backbone, [e.input_ids for e in encodings], [task] * len(texts))
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.softmax(-1).sum(-1), torch.ones(3))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encode_matches_the_transformers_tokenizer(kind: str, model_dirs: Path) -> None:
    """encode calls a private copy of the Rust tokenizer; it must give the wrapper's ids exactly."""
    make = make_tiny_bert if kind == "bert" else make_tiny_roberta
    path = model_dirs / f"encode-{kind}"
    backbone = load_backbone(path if path.exists() else make(path))
    texts = ["this phone is great", "", "  Café — naïve ünïcode 🙂 ", "the " * 80, "A\tB\nC"]
    assert backbone.text._fast is not None and backbone.text._fast is not backbone.tokenizer.backend_tokenizer
    # A truncating call through the wrapper leaves its own backend truncating; encode must not see it.
    backbone.tokenizer(texts, truncation=True, max_length=4)
    encoded = backbone.encode(texts, 1000)
    reference = backbone.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    assert [e.input_ids for e in encoded] == reference
    assert not any(e.truncated for e in encoded)
    assert len(reference[3]) > 80  # the long text really was left whole


def test_encode_keeps_split_special_tokens(tiny_bert_dir: Path, backbone: Backbone) -> None:
    """A tokenizer configured to split special-token text: the private copy must do the same."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir, split_special_tokens=True)
    splitting = Backbone(backbone.model, tokenizer, backbone.spec, tiny_bert_dir, backbone.family)
    text = "[CLS] a [SEP]"
    [enc] = splitting.encode([text], 1000)
    assert enc.input_ids == tokenizer([text], add_special_tokens=True)["input_ids"][0]
    assert enc.input_ids != backbone.encode([text], 1000)[0].input_ids
