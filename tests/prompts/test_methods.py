"""The parametrisations: folding a reparameterisation or a prompt encoder away changes no logit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prompts.artifact import build_artifact, parse_artifact
from prompts.backbone import Backbone
from prompts.forward import TaskPrompt, prompted_forward
from prompts.methods import (
    DeepPrefix,
    LinearProbe,
    PromptMethod,
    PTuningEncoder,
    SoftPrompt,
    label_word_embeddings,
    prefix_from_tokens,
    resolve_method,
    vocabulary_sample,
)

TEXTS = ["great phone battery", "the shirt size is fine", "a book", "love this music and the movie"]


def _ids(backbone: Backbone) -> list[list[int]]:
    return [e.input_ids for e in backbone.encode(TEXTS, 40)]


def _served(backbone: Backbone, module: PromptMethod) -> TaskPrompt:
    """The module exported, serialised, parsed and loaded the way the service loads a stored task."""
    e = module.export()
    artifact = build_artifact(
        task="t",
        labels=[f"l{i}" for i in range(e.head_weight.shape[0])],
        spec=backbone.spec,
        head_weight=e.head_weight,
        head_bias=e.head_bias,
        prefix=e.prefix,
        prompt=e.prompt,
        method=module.artifact_method,
        pooling=e.pooling,
        pooler=e.pooler,
    )
    return TaskPrompt.from_artifact(parse_artifact(artifact.data), backbone.device, backbone.dtype)


def _randomise(module: PromptMethod, seed: int) -> None:
    """Move every parameter off its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _check_export_matches(backbone: Backbone, module: PromptMethod) -> None:
    module.eval()
    ids = _ids(backbone)
    with torch.no_grad():
        trained = prompted_forward(backbone, ids, [module.task_prompt()] * len(ids))
        served = prompted_forward(backbone, ids, [_served(backbone, module)] * len(ids))
    torch.testing.assert_close(served, trained, rtol=0, atol=1e-5)


def test_reparameterised_prefix_folds_without_changing_logits(backbone: Backbone) -> None:
    g = torch.Generator().manual_seed(0)
    module = DeepPrefix(backbone.spec, 3, length=5, reparam=True, reparam_hidden=24, generator=g)
    _randomise(module, 1)
    assert module.mlp is not None and module.table is None
    _check_export_matches(backbone, module)
    exported = module.export()
    assert exported.prefix is not None
    s = backbone.spec
    assert tuple(exported.prefix.shape) == (s.num_layers, 2, s.num_heads, 5, s.head_dim)
    # The training-only MLP is far larger than what is served.
    assert module.trainable_parameter_count() > exported.parameter_count()


def test_plain_prefix_and_init_from_backbone_keys_values(backbone: Backbone) -> None:
    s = backbone.spec
    init = prefix_from_tokens(backbone, 4, torch.Generator().manual_seed(0))
    assert tuple(init.shape) == (s.num_layers, 2, s.num_heads, 4, s.head_dim)
    assert torch.isfinite(init).all() and init.abs().mean() > 0
    module = DeepPrefix(s, 2, length=4, init=init, dropout=0.5)
    assert module.table is not None
    torch.testing.assert_close(module.table.detach(), init)
    module.train()
    assert not torch.equal(module.prefix(), init)  # dropout while training ...
    module.eval()
    assert torch.equal(module.prefix(), init)  # ... never at export or evaluation
    _check_export_matches(backbone, module)
    with pytest.raises(ValueError, match="prefix init has shape"):
        DeepPrefix(s, 2, length=3, init=init)


def test_reparam_start_takes_the_init_into_account(backbone: Backbone) -> None:
    s = backbone.spec
    init = prefix_from_tokens(backbone, 3, torch.Generator().manual_seed(0))
    module = DeepPrefix(s, 2, length=3, reparam=True, reparam_hidden=16, init=init).eval()
    # Every prefix position starts near the mean of the token keys/values at its layer.
    mean = init.mean(3, keepdim=True).expand_as(init)
    assert (module.prefix() - mean).abs().mean() < (torch.zeros_like(init) - mean).abs().mean()


def test_ptuning_encoder_output_is_frozen_into_the_prompt(backbone: Backbone) -> None:
    init = vocabulary_sample(backbone, 4, torch.Generator().manual_seed(0))
    module = PTuningEncoder(backbone.spec, 3, init=init)
    _randomise(module, 2)
    _check_export_matches(backbone, module)
    exported = module.export()
    assert exported.prompt is not None and tuple(exported.prompt.shape) == (4, backbone.spec.hidden_size)
    assert exported.prefix is None
    # The stored prompt is the encoder's output, not its input embeddings.
    assert not torch.allclose(exported.prompt, module.embedding.detach())


def test_soft_prompt_and_probe_export(backbone: Backbone) -> None:
    init = vocabulary_sample(backbone, 3, torch.Generator().manual_seed(0))
    soft = SoftPrompt(backbone.spec, 2, init=init)
    _randomise(soft, 3)
    _check_export_matches(backbone, soft)
    probe = LinearProbe(backbone.spec, 4)
    _randomise(probe, 4)
    _check_export_matches(backbone, probe)
    assert probe.export().prefix is None and probe.export().prompt is None
    peft_head = SoftPrompt(backbone.spec, 2, init=init, head="peft")
    assert (peft_head.pooling, peft_head.pooler) == ("first", "backbone")
    _check_export_matches(backbone, peft_head)


def test_peft_head_needs_a_pooler(backbone: Backbone) -> None:
    spec = dataclasses.replace(backbone.spec, has_pooler=False)
    with pytest.raises(ValueError, match="pooler"):
        LinearProbe(spec, 2, head="peft")


def test_initialisers_use_real_token_embeddings(backbone: Backbone) -> None:
    weights = backbone.word_embeddings.weight.detach()
    sample = vocabulary_sample(backbone, 6, torch.Generator().manual_seed(1))
    assert all(any(torch.equal(row, w) for w in weights) for row in sample)
    words = label_word_embeddings(backbone, ["phone", "shirt_color"])
    assert words is not None
    vocab = backbone.tokenizer.get_vocab()
    torch.testing.assert_close(words[0], weights[vocab["phone"]])
    torch.testing.assert_close(words[1], (weights[vocab["shirt"]] + weights[vocab["color"]]) / 2)
    assert label_word_embeddings(backbone, ["phone", "42"]) is None


def test_method_names_and_aliases() -> None:
    assert resolve_method("prefix") == "p-tuning-v2"
    assert resolve_method("ptuning") == "p-tuning"
    assert resolve_method("prompt") == "prompt-tuning"
    assert resolve_method("probe") == "linear-probe"
    assert resolve_method("p-tuning-v2") == "p-tuning-v2"
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        resolve_method("lora")
