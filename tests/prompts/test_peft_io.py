"""PEFT adapters in and out, checked against real PEFT models on the tiny BERT (logits within 1e-5)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from prompts.backbone import Backbone
from prompts.forward import TaskPrompt, prompted_forward
from prompts.peft_io import PeftError, export_peft_adapter, import_peft_adapter
from tests.conftest import DECODER_KINDS
from tests.factories import random_artifact
from tests.peft_support import (
    installed_set_is_locked,
    peft_prefix_refusal,
    prefix_reference_logits,
    table_to_prefix,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

peft = pytest.importorskip("peft")

TEXTS = ["this phone is great", "terrible battery and the screen is broken", "a", "free offer call now"]


def _peft_inputs(backbone: Backbone) -> dict[str, torch.Tensor]:
    enc = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _ours(backbone: Backbone, task: TaskPrompt) -> torch.Tensor:
    ids = [e.input_ids for e in backbone.encode(TEXTS, 50)]
    with torch.no_grad():
        return prompted_forward(backbone, ids, [task] * len(ids))


def _peft_model(tiny_bert_dir: Path, config: Any, num_labels: int, seed: int) -> Any:
    torch.manual_seed(seed)
    base = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=num_labels, attn_implementation="sdpa"
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # the prompt encoder and the classifier: move them off their init
                p.normal_(0, 0.5 if "classifier" not in name else 1.0)
    return model.eval()


CONFIGS = {
    "prefix": lambda: peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=5),
    "prefix-projection": lambda: peft.PrefixTuningConfig(
        task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    ),
    "prompt": lambda: peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=3),
    "p-tuning": lambda: peft.PromptEncoderConfig(
        task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=4, encoder_hidden_size=16
    ),
    "p-tuning-lstm": lambda: peft.PromptEncoderConfig(
        task_type=peft.TaskType.SEQ_CLS,
        num_virtual_tokens=3,
        encoder_hidden_size=16,
        encoder_reparameterization_type="LSTM",
    ),
}
METHOD = {
    "prefix": "p-tuning-v2",
    "prefix-projection": "p-tuning-v2",
    "prompt": "prompt-tuning",
    "p-tuning": "p-tuning",
    "p-tuning-lstm": "p-tuning",
}


PREFIX_KINDS = ("prefix", "prefix-projection")


def _needs_peft_prefix(prefix: bool) -> None:
    reason = peft_prefix_refusal() if prefix else None
    if reason is not None:
        pytest.skip(reason)


def _reference(tiny_bert_dir: Path, backbone: Backbone, adapter: Path) -> torch.Tensor:
    """PEFT's logits for a saved prefix adapter, computed from its files without PEFT."""
    weights = load_file(adapter / "adapter_model.safetensors")
    head = weights["base_model.classifier.weight"]
    model = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=head.shape[0], attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        model.classifier.weight.copy_(head)
        model.classifier.bias.copy_(weights["base_model.classifier.bias"])
    s = backbone.spec
    prefix = table_to_prefix(weights["prompt_embeddings"], s.num_layers, s.num_kv_heads, s.head_dim)
    return prefix_reference_logits(model, **_peft_inputs(backbone), prefix=prefix)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_import_matches_the_peft_model(
    kind: str, tiny_bert_dir: Path, backbone: Backbone, tmp_path: Path
) -> None:
    _needs_peft_prefix(kind in PREFIX_KINDS)
    model = _peft_model(tiny_bert_dir, CONFIGS[kind](), num_labels=3, seed=len(kind))
    with torch.no_grad():
        expected = model(**_peft_inputs(backbone)).logits
    model.save_pretrained(tmp_path / "adapter")
    artifact = import_peft_adapter(
        tmp_path / "adapter", task="imported", spec=backbone.spec, labels=["x", "y", "z"]
    )
    m = artifact.manifest
    assert m.method == METHOD[kind] and m.labels == ["x", "y", "z"]
    assert (m.head.pooling, m.head.pooler, m.positions) == ("first", "backbone", "after_prefix")
    assert m.training is not None and m.training["peft_type"] == model.peft_config["default"].peft_type.value
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    torch.testing.assert_close(_ours(backbone, task), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_prefix_import_matches_peft_without_running_peft(
    kind: str, tiny_bert_dir: Path, backbone: Backbone, tmp_path: Path
) -> None:
    """On any transformers release: a PEFT prefix adapter's files, imported, give PEFT's logits (as
    Hugging Face's model computes them with the prefix as its cache; equal to PEFT's own, proven below)."""
    model = _peft_model(tiny_bert_dir, CONFIGS[kind](), num_labels=3, seed=len(kind))
    model.save_pretrained(tmp_path / "adapter")
    expected = _reference(tiny_bert_dir, backbone, tmp_path / "adapter")
    artifact = import_peft_adapter(tmp_path / "adapter", task="imported", spec=backbone.spec)
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    torch.testing.assert_close(_ours(backbone, task), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_the_reference_is_what_peft_computes(
    kind: str, tiny_bert_dir: Path, backbone: Backbone, tmp_path: Path
) -> None:
    _needs_peft_prefix(True)
    model = _peft_model(tiny_bert_dir, CONFIGS[kind](), num_labels=3, seed=len(kind))
    with torch.no_grad():
        theirs = model(**_peft_inputs(backbone)).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(
        _reference(tiny_bert_dir, backbone, tmp_path / "adapter"), theirs, rtol=0, atol=1e-6
    )


def test_the_locked_set_runs_peft_prefix_tuning() -> None:
    """CI installs the lock: there the PEFT comparisons above must run, never skip."""
    if not installed_set_is_locked():
        pytest.skip("transformers/peft are not at the locked versions (scripts/test.sh --latest)")
    assert peft_prefix_refusal() is None


@pytest.mark.parametrize(
    ("judge", "prefix_length", "prompt_length", "method", "peft_type"),
    [
        ("peft", 4, 0, "p-tuning-v2", "PREFIX_TUNING"),
        ("hf-reference", 4, 0, "p-tuning-v2", "PREFIX_TUNING"),
        ("peft", 0, 3, "prompt-tuning", "PROMPT_TUNING"),
        ("peft", 0, 2, "p-tuning", "P_TUNING"),
    ],
)
def test_export_loads_in_peft_with_the_same_logits(
    judge: str,
    prefix_length: int,
    prompt_length: int,
    method: str,
    peft_type: str,
    tiny_bert_dir: Path,
    backbone: Backbone,
    tmp_path: Path,
) -> None:
    artifact = random_artifact(
        backbone.spec,
        task="to-peft",
        num_labels=4,
        prefix_length=prefix_length,
        prompt_length=prompt_length,
        pooling="first",
        pooler="backbone",
        method=method,  # type: ignore[arg-type]
        scale=0.5,
        seed=prefix_length + prompt_length,
    )
    out = export_peft_adapter(artifact, tmp_path / "adapter", base_model_name_or_path=str(tiny_bert_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["task_type"] == "SEQ_CLS"

    if judge == "peft":
        _needs_peft_prefix(prefix_length > 0)
        base = BertForSequenceClassification.from_pretrained(
            tiny_bert_dir, num_labels=4, attn_implementation="sdpa"
        )
        model = peft.PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            theirs = model(**_peft_inputs(backbone)).logits
    else:
        theirs = _reference(tiny_bert_dir, backbone, out)
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    torch.testing.assert_close(_ours(backbone, task), theirs, rtol=0, atol=1e-5)

    # ... and back: the same tensors, labels and conventions.
    back = import_peft_adapter(out, task="to-peft", spec=backbone.spec)
    assert back.manifest.labels == artifact.manifest.labels and back.manifest.method == method
    for name, tensor in artifact.tensors.items():
        assert torch.equal(back.tensors[name], tensor), name


def test_export_refuses_heads_peft_cannot_run(backbone: Backbone, tmp_path: Path) -> None:
    cls_head = random_artifact(backbone.spec, prefix_length=3)
    with pytest.raises(PeftError, match="--head peft"):
        export_peft_adapter(cls_head, tmp_path / "a")
    both = random_artifact(
        backbone.spec, prefix_length=3, prompt_length=2, pooling="first", pooler="backbone"
    )
    with pytest.raises(PeftError, match="both a deep prefix and an input prompt"):
        export_peft_adapter(both, tmp_path / "b")
    probe = random_artifact(
        backbone.spec, prefix_length=0, prompt_length=0, pooling="first", pooler="backbone"
    )
    with pytest.raises(PeftError, match="linear probe"):
        export_peft_adapter(probe, tmp_path / "c")
    scaled = random_artifact(backbone.spec, prefix_length=3, pooling="first", pooler="backbone", scales=True)
    with pytest.raises(PeftError, match="scales beside its prompt"):
        export_peft_adapter(scaled, tmp_path / "d")
    adapted = random_artifact(backbone.spec, prefix_length=3, pooling="first", pooler="backbone", lora_rank=2)
    with pytest.raises(PeftError, match="LoRA beside its prompt"):
        export_peft_adapter(adapted, tmp_path / "e")


def _adapter(tmp_path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    directory = tmp_path / "adapter"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors:
        save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def test_import_errors_say_what_is_wrong(backbone: Backbone, tmp_path: Path) -> None:
    s = backbone.spec
    with pytest.raises(PeftError, match=r"no adapter_config\.json"):
        import_peft_adapter(tmp_path, task="t", spec=s)
    lora = _adapter(tmp_path, {"peft_type": "LORA", "task_type": "SEQ_CLS"}, {})
    with pytest.raises(PeftError, match="peft_type 'LORA' is not supported"):
        import_peft_adapter(lora, task="t", spec=s)
    base = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_layers": s.num_layers}
    head = {
        "base_model.classifier.weight": torch.zeros(2, s.hidden_size),
        "base_model.classifier.bias": torch.zeros(2),
    }
    pickled = _adapter(tmp_path, base, {})
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PeftError, match="pickle, which is never loaded"):
        import_peft_adapter(pickled, task="t", spec=s)
    (pickled / "adapter_model.bin").unlink()
    wrong_layers = _adapter(
        tmp_path, {**base, "num_layers": 12}, {"prompt_embeddings": torch.zeros(2, s.hidden_size)}
    )
    with pytest.raises(PeftError, match="num_layers=12"):
        import_peft_adapter(wrong_layers, task="t", spec=s)
    no_head = _adapter(tmp_path, base, {"prompt_embeddings": torch.zeros(2, s.hidden_size)})
    with pytest.raises(PeftError, match="no classifier weights"):
        import_peft_adapter(no_head, task="t", spec=s)
    ok = _adapter(tmp_path, base, {"prompt_embeddings": torch.zeros(2, s.hidden_size), **head})
    with pytest.raises(PeftError, match="2 rows but 3 labels"):
        import_peft_adapter(ok, task="t", spec=s, labels=["a", "b", "c"])
    assert import_peft_adapter(ok, task="t", spec=s).manifest.labels == ["label_0", "label_1"]
    prefix = {**base, "peft_type": "PREFIX_TUNING"}
    bad_table = _adapter(tmp_path, prefix, {"prompt_embeddings": torch.zeros(2, 7), **head})
    with pytest.raises(PeftError, match=r"prefix table has shape \[2, 7\]"):
        import_peft_adapter(bad_table, task="t", spec=s)
    roberta_head = {
        "prompt_embeddings": torch.zeros(2, s.hidden_size),
        "base_model.classifier.dense.weight": torch.zeros(s.hidden_size, s.hidden_size),
        "base_model.classifier.out_proj.weight": torch.zeros(2, s.hidden_size),
    }
    roberta = _adapter(tmp_path, base, roberta_head)
    with pytest.raises(PeftError, match="two-layer head"):
        import_peft_adapter(roberta, task="t", spec=s)
    assert set(load_file(roberta / "adapter_model.safetensors")) == set(roberta_head)


# --- decoders: Llama, Mistral, Qwen2, Qwen3 ------------------------------------------------------------

DECODER_CONFIGS = {
    "prefix": lambda: peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=4),
    "prompt": lambda: peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=3),
}


def _decoder_classifier(kind_dir: Callable[[str], Path], kind: str, backbone: Backbone) -> Any:
    """The ``*ForSequenceClassification`` of the tiny decoder; its pad id is the one ptserve pads with."""
    return AutoModelForSequenceClassification.from_pretrained(
        kind_dir(kind), num_labels=3, pad_token_id=backbone.pad_token_id
    ).eval()


def _decoder_peft(kind_dir: Callable[[str], Path], kind: str, backbone: Backbone, config: Any) -> Any:
    torch.manual_seed(3)
    model = peft.get_peft_model(_decoder_classifier(kind_dir, kind, backbone), config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:  # the prompt table and the score layer: move them off their init
                p.normal_(0, 0.5)
    return model.eval()


def _per_row(model: Any, backbone: Backbone) -> torch.Tensor:
    """Logits row by row: PEFT's prompt tuning pools the last position, a pad in a right-padded batch."""
    rows = []
    for ids in _decoder_ids(backbone):
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            )
        rows.append(out.logits[0])
    return torch.stack(rows)


def _decoder_ids(backbone: Backbone) -> list[list[int]]:
    return [e.input_ids for e in backbone.encode(TEXTS, 50)]


@pytest.mark.parametrize("method", list(DECODER_CONFIGS))
@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_decoder_adapters_import_with_peft_logits_and_export_back(
    kind: str,
    method: str,
    kind_dir: Callable[[str], Path],
    kind_backbone: Callable[[str], Backbone],
    tmp_path: Path,
) -> None:
    backbone = kind_backbone(kind)
    model = _decoder_peft(kind_dir, kind, backbone, DECODER_CONFIGS[method]())
    model.save_pretrained(tmp_path / "adapter")
    artifact = import_peft_adapter(tmp_path / "adapter", task="imported", spec=backbone.spec)
    m = artifact.manifest
    assert (m.head.pooling, m.head.pooler, m.backbone.family) == ("last", "none", "decoder")
    assert not artifact.tensors["head.bias"].any()  # score has no bias
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    with torch.no_grad():
        ours = prompted_forward(backbone, _decoder_ids(backbone), [task] * len(TEXTS))
    if method == "prefix":
        # PEFT's own forward where it runs; the same files through HF's forward on any release.
        s = backbone.spec
        table = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
        prefix = table_to_prefix(table, s.num_layers, s.num_kv_heads, s.head_dim)
        classifier = _decoder_classifier(kind_dir, kind, backbone)
        with torch.no_grad():
            classifier.score.weight.copy_(artifact.tensors["head.weight"])
        for b, ids in enumerate(_decoder_ids(backbone)):
            row = torch.tensor([ids])
            ref = prefix_reference_logits(classifier, row, torch.ones_like(row), prefix)
            torch.testing.assert_close(ours[b], ref[0], rtol=0, atol=1e-5)
    if method == "prompt" or peft_prefix_refusal() is None:
        torch.testing.assert_close(ours, _per_row(model, backbone), rtol=0, atol=1e-5)

    # ... and out again: the exported adapter loads in PEFT and gives the same logits.
    out = export_peft_adapter(artifact, tmp_path / "exported")
    config = json.loads((out / "adapter_config.json").read_text())
    s = backbone.spec
    heads = s.num_kv_heads if method == "prefix" else s.num_heads
    assert (config["num_attention_heads"], config["num_layers"]) == (heads, s.num_layers)
    back = import_peft_adapter(out, task="imported", spec=s)
    assert all(torch.equal(back.tensors[n], t) for n, t in artifact.tensors.items())
    if method == "prompt" or peft_prefix_refusal() is None:
        reloaded = peft.PeftModel.from_pretrained(_decoder_classifier(kind_dir, kind, backbone), out).eval()
        torch.testing.assert_close(_per_row(reloaded, backbone), ours, rtol=0, atol=1e-5)


def test_decoder_export_needs_the_score_head(
    kind_backbone: Callable[[str], Backbone], tmp_path: Path
) -> None:
    spec = kind_backbone("qwen3").spec
    with pytest.raises(PeftError, match="bias-free score layer"):
        export_peft_adapter(random_artifact(spec, prefix_length=2, pooling="last"), tmp_path / "a")
    with pytest.raises(PeftError, match="deberta-v2 family"):
        export_peft_adapter(
            random_artifact(kind_backbone("deberta-v3").spec, prefix_length=2), tmp_path / "b"
        )
