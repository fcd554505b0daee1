"""benchmarks/shapes.py (real architectures' config values, random-weight directories) and the PEFT
baseline of benchmarks/perf_peft.py computing what ptserve computes, on tiny scaled-down shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import perf_peft, shapes
from prompts.artifact import build_artifact
from prompts.backbone import load_backbone
from prompts.backbones import family_for
from service.cache import prepare_task
from service.engine import Engine, Row
from service.pool import PromptPool
from tests.peft_support import peft_prefix_refusal

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Scaled down: the real shapes' every other value (attention pattern, rope, norms, special ids) kept.
SMALL = {
    "qwen3-0.6b": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "deberta-v3-base": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "modernbert-base": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
    },
}
TEXTS = [[101, 2000, 2001, 2002, 102], [101, 2003, 102], [101, *range(3000, 3012), 102]]


def test_real_shapes_read_as_published() -> None:
    """What ptserve's families read off each shape's config: the published sizes."""
    expected = {  # layers, heads, kv heads, head_dim, hidden
        "qwen3-0.6b": (28, 16, 8, 128, 1024),
        "llama-3.2-1b": (16, 32, 8, 64, 2048),
        "deberta-v3-base": (12, 12, 12, 64, 768),
        "modernbert-base": (22, 12, 12, 64, 768),
    }
    assert set(expected) == set(shapes.SHAPES)
    for name, sizes in expected.items():
        config = shapes.make_config(name)
        s = family_for(config).read_shape(config)
        assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == sizes, name
        assert config.vocab_size >= shapes.TOKENIZER_VOCAB
    deberta = shapes.make_config("deberta-v3-base")
    assert (deberta.position_buckets, deberta.norm_rel_ebd, deberta.share_att_key) == (
        256,
        "layer_norm",
        True,
    )
    assert (deberta.pos_att_type, deberta.position_biased_input, deberta.type_vocab_size) == (
        ["p2c", "c2p"],
        False,
        0,
    )
    assert (deberta.relative_attention, deberta.max_relative_positions, deberta.vocab_size) == (
        True,
        -1,
        128100,
    )
    modern = shapes.make_config("modernbert-base")
    assert modern.layer_types[:3] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert (modern.local_attention, modern.intermediate_size, modern.classifier_pooling) == (
        128,
        1152,
        "mean",
    )
    assert modern.rope_parameters["full_attention"]["rope_theta"] == 160000.0
    assert modern.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    qwen = shapes.make_config("qwen3-0.6b")
    assert (qwen.intermediate_size, qwen.vocab_size, qwen.max_position_embeddings) == (3072, 151936, 40960)
    assert qwen.rope_parameters["rope_theta"] == 1000000.0 and qwen.layer_types == ["full_attention"] * 28
    # Special-token ids are the copied MiniLM tokenizer's; decoders keep no pad id, as published.
    assert (qwen.bos_token_id, qwen.eos_token_id, qwen.pad_token_id) == (101, 102, None)
    assert (modern.pad_token_id, modern.cls_token_id, modern.sep_token_id) == (0, 101, 102)


def test_build_loads_and_is_reused(tmp_path: Path) -> None:
    out = tmp_path / "qwen3"
    directory = shapes.build("qwen3-0.6b", out, overrides=SMALL["qwen3-0.6b"], quiet=True)
    backbone = load_backbone(directory)
    assert backbone.spec.family == "decoder" and backbone.spec.num_kv_heads == 2
    assert backbone.opening_ids == [101] and backbone.closing_ids == [102]  # BERT's [CLS] ... [SEP]
    assert shapes.is_random(backbone) and shapes.task_pooling(backbone) == "last"
    weights = next(directory.glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    assert shapes.build("qwen3-0.6b", out, overrides=SMALL["qwen3-0.6b"], quiet=True) == directory
    assert weights.stat().st_mtime_ns == written  # reused, not rewritten
    # Another seed: rebuilt in place (the directory is ours), with other weights.
    shapes.build("qwen3-0.6b", out, seed=1, overrides=SMALL["qwen3-0.6b"], quiet=True)
    assert json.loads((out / shapes.MARKER).read_text())["seed"] == 1
    assert load_backbone(out).spec.fingerprint != backbone.spec.fingerprint
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        shapes.build("qwen3-0.6b", foreign, overrides=SMALL["qwen3-0.6b"], quiet=True)
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("qwen3-0.6b", "p-tuning-v2"),
        ("deberta-v3-base", "prompt-tuning"),
        ("modernbert-base", "prompt-tuning"),
    ],
)
def test_peft_baseline_computes_what_ptserve_serves(tmp_path: Path, name: str, method: str) -> None:
    """The PEFT server's adapters copied into ptserve artifacts give the same probabilities: both
    sides pool the same token (the offset of prompt tuning's virtual tokens included)."""
    if method == "p-tuning-v2" and peft_prefix_refusal():
        pytest.skip(peft_prefix_refusal())
    backbone = load_backbone(shapes.build(name, tmp_path / name, overrides=SMALL[name], quiet=True))
    assert perf_peft.takes_cache(backbone) == (method == "p-tuning-v2")
    spec = backbone.spec
    pooling = shapes.task_pooling(backbone, method)
    server, _ = perf_peft.make_peft_server(
        backbone, 1, 5, 3, 0, method=method, prompt_length=4, pooling=pooling
    )
    table = next(server.model.prompt_encoder["task0"].parameters()).detach()
    prefix = prompt = None
    if method == "p-tuning-v2":  # PEFT's [P, layers * 2 * kv_heads * head_dim] table
        prefix = table.view(5, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 3, 0, 4)
    else:
        prompt = table
    artifact = build_artifact(
        task="t0",
        labels=["a", "b", "c"],
        spec=spec,
        prefix=prefix,
        prompt=prompt,
        head_weight=server.head_weight[0] * 50,  # logits far enough apart to compare
        head_bias=server.head_bias[0],
        method=method,
        pooling=pooling,
    )
    server.head_weight = server.head_weight * 50
    pool = PromptPool(spec, backbone.device, backbone.dtype)
    task = prepare_task(artifact, backbone, pool)
    served = torch.tensor(Engine(backbone, pool).run_batch([Row(task, ids) for ids in TEXTS]))
    baseline = torch.tensor(server.run([0] * len(TEXTS), TEXTS))
    assert served.std() > 1e-3  # not all uniform
    torch.testing.assert_close(served, baseline, atol=1e-5, rtol=1e-4)
