"""LoRA beside a task's prompt, in every backbone family.

- Against Hugging Face's own model with the same low-rank updates added by forward hooks on the
  family's target projections (DeBERTa: the content projections only), and against PEFT's LoRA on BERT.
- A LoRA task gives the same logits alone and in a mixed batch with tasks without LoRA and with a
  task of another rank; zero updates change nothing, and other updates change the logits.
- Gradients reach every target's matrices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from prompts.backbone import Backbone
from prompts.forward import TaskPrompt, prompted_forward
from tests.conftest import KINDS
from tests.factories import random_lora
from tests.prompts.backbones.mixed_batch import (
    assert_hooked_model_agrees,
    assert_mixed_equals_alone,
    make_task,
    remember_attention_inputs,
    text_ids,
)

TEXTS = ["this phone is great", "terrible battery and a broken screen", "a", "what time is the game"]
Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _identity(backbone: Backbone, lora: Lora | None, pooling: str) -> TaskPrompt:
    """A task whose logits are its pooled vector: no prefix, no prompt, an identity head."""
    hidden = backbone.spec.hidden_size
    return TaskPrompt(None, None, torch.eye(hidden), torch.zeros(hidden), pooling=pooling, lora=lora)


def _modules(backbone: Backbone, index: int) -> dict[str, Any]:
    """Hugging Face's module for each of the family's LoRA targets in layer ``index``."""
    family, model = backbone.spec.family, backbone.model
    if family in ("bert", "deberta-v2"):
        layer = model.encoder.layer[index]
        att = layer.attention.self
        names = ("query", "key", "value") if family == "bert" else ("query_proj", "key_proj", "value_proj")
        found = dict(zip(("query", "key", "value"), (getattr(att, n) for n in names), strict=True))
        return found | {
            "attention_output": layer.attention.output.dense,
            "ffn_in": layer.intermediate.dense,
            "ffn_out": layer.output.dense,
        }
    layer = model.layers[index]
    if family == "decoder":
        att, mlp = layer.self_attn, layer.mlp
        return {
            "query": att.q_proj,
            "key": att.k_proj,
            "value": att.v_proj,
            "attention_output": att.o_proj,
            "ffn_gate": mlp.gate_proj,
            "ffn_up": mlp.up_proj,
            "ffn_out": mlp.down_proj,
        }
    return {
        "qkv": layer.attn.Wqkv,
        "attention_output": layer.attn.Wo,
        "ffn_in": layer.mlp.Wi,
        "ffn_out": layer.mlp.Wo,
    }


def _hooks(backbone: Backbone, lora: Lora) -> list[Any]:
    """Forward hooks adding ``x @ down @ up`` to each target module's output, as LoRA does. DeBERTa's
    query/key projections also map the shared relative-position embeddings; those calls are left alone
    (the content projections read the attention module's own input, recognised by identity)."""
    attention_input, handles = remember_attention_inputs(backbone)

    def add(name: str, index: int) -> Callable[..., torch.Tensor | None]:
        down, up = lora[name][0][index], lora[name][1][index]

        def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            x = args[0]
            content = name in ("query", "key", "value")
            if backbone.spec.family == "deberta-v2" and content and x is not attention_input[index]:
                return None
            return output + x @ down @ up

        return hook

    for index in range(backbone.spec.num_layers):
        for name, module in _modules(backbone, index).items():
            handles.append(module.register_forward_hook(add(name, index)))
    return handles


def _lora(backbone: Backbone, rank: int, seed: int) -> Lora:
    return random_lora(backbone.spec, rank, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_lora_equals_hugging_faces_model_with_the_same_updates(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    pooling = "last" if backbone.spec.family == "decoder" else "cls"
    lora = _lora(backbone, rank=4, seed=1)
    assert list(lora) == list(backbone.family.lora_targets(backbone.spec.shape()))
    task = _identity(backbone, lora, pooling)
    assert_hooked_model_agrees(backbone, task, lambda: _hooks(backbone, lora), TEXTS, atol=2e-5)


@torch.inference_mode()
def test_lora_equals_pefts_lora_on_bert(kind_backbone: Callable[[str], Backbone]) -> None:
    from peft import LoraConfig, get_peft_model

    backbone = kind_backbone("bert")
    rank, alpha = 4, 8
    # Every dense layer of the encoder (not the pooler): PEFT names modules, ptserve names targets.
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
        r"intermediate\.dense|output\.dense)",
        init_lora_weights=False,  # random A and B, so B is not zero
    )
    peft_model = get_peft_model(copy.deepcopy(backbone.model), config)
    where = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention_output",
        "intermediate.dense": "ffn_in",
        "output.dense": "ffn_out",
    }
    targets = backbone.family.lora_targets(backbone.spec.shape())
    layers = backbone.spec.num_layers
    down = {n: torch.zeros(layers, i, rank) for n, (i, _) in targets.items()}
    up = {n: torch.zeros(layers, rank, o) for n, (_, o) in targets.items()}
    found = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        index = int(name.split(".layer.")[1].split(".")[0])
        path = name.split(f".layer.{index}.")[1]
        target = where[path]
        down[target][index] = module.lora_A["default"].weight.T  # [in, r]
        up[target][index] = module.lora_B["default"].weight.T * module.scaling["default"]  # [r, out]
        found += 1
    assert found == 6 * layers
    lora = {n: (down[n], up[n]) for n in targets}
    peft_model.eval()
    for row in text_ids(backbone, TEXTS):
        theirs = peft_model(input_ids=torch.tensor([row])).last_hidden_state[0, 0]  # [hidden]
        ours = prompted_forward(backbone, [row], [_identity(backbone, lora, "cls")])[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_a_lora_task_gives_the_same_logits_alone_and_mixed(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    pooled = "last" if backbone.spec.family == "decoder" else "cls"
    tasks = [
        make_task(backbone, task="lora", prefix_length=4, pooling=pooled, seed=1, lora_rank=4, scales=True),
        make_task(backbone, task="plain", num_labels=5, prefix_length=6, pooling=pooled, seed=2),
        make_task(backbone, task="rank2", num_labels=2, prefix_length=0, pooling="mean", seed=3, lora_rank=2),
        make_task(backbone, task="prompt", prefix_length=2, prompt_length=3, pooling=pooled, seed=4),
    ]
    assert [t.lora_rank for t in tasks] == [4, 0, 2, 0]
    row_ids = assert_mixed_equals_alone(backbone, tasks, TEXTS)

    # A task without LoRA gives the same rows beside a LoRA task, and zero updates are no LoRA.
    plain, adapted = tasks[1], tasks[0]
    only_plain = prompted_forward(backbone, row_ids[:2], [plain, plain])
    beside = prompted_forward(backbone, row_ids[:2], [plain, adapted])
    torch.testing.assert_close(beside[0], only_plain[0], rtol=0, atol=1e-5)
    assert adapted.lora is not None
    zeros = {n: (d, torch.zeros_like(u)) for n, (d, u) in adapted.lora.items()}
    as_plain = TaskPrompt(
        plain.prefix, plain.prompt, plain.head_weight, plain.head_bias, plain.pooling, lora=zeros
    )
    torch.testing.assert_close(
        prompted_forward(backbone, row_ids[:1], [as_plain])[0], only_plain[0], rtol=0, atol=1e-5
    )
    # And the updates are read: other matrices, other logits.
    other = {n: (d, u.flip(0)) for n, (d, u) in adapted.lora.items()}
    changed = TaskPrompt(
        adapted.prefix,
        adapted.prompt,
        adapted.head_weight,
        adapted.head_bias,
        pooling=adapted.pooling,
        scale_delta=adapted.scale_delta,
        lora=other,
    )
    a = prompted_forward(backbone, row_ids[:1], [adapted])[0]
    b = prompted_forward(backbone, row_ids[:1], [changed])[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["bert", "llama", "deberta-v3", "modernbert"])
def test_gradients_reach_every_lora_target(kind: str, kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(kind)
    task = make_task(backbone, prefix_length=3, seed=3, lora_rank=2)
    assert task.lora is not None
    for down, up in task.lora.values():
        down.requires_grad_(True)
        up.requires_grad_(True)
    ids = text_ids(backbone, TEXTS)
    logits = prompted_forward(backbone, ids, [task] * len(ids))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, (down, up) in task.lora.items():
        assert down.grad is not None and up.grad is not None, name
        # every layer's matrices get gradient
        assert bool((down.grad.abs().sum(dim=(1, 2)) > 0).all()), name
        assert bool((up.grad.abs().sum(dim=(1, 2)) > 0).all()), name
