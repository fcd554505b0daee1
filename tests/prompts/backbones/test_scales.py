"""(IA)^3 scales beside a task's prompt, in every backbone family.

- Against Hugging Face's own model with the same multipliers put in by forward hooks (keys and values
  as the projections return them, the FFN's output projection's input), and against PEFT's (IA)^3
  on BERT.
- A scaled task gives the same logits alone and in a mixed batch with unscaled tasks (whose rows
  multiply by ones) and other scaled tasks; multipliers of ones change nothing.
- Gradients reach the scales; changing them changes the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from prompts.backbone import Backbone
from prompts.forward import TaskPrompt, prompted_forward
from tests.conftest import KINDS
from tests.prompts.backbones.mixed_batch import (
    assert_hooked_model_agrees,
    assert_mixed_equals_alone,
    make_task,
    remember_attention_inputs,
    text_ids,
)

TEXTS = ["this phone is great", "terrible battery and a broken screen", "a", "what time is the game"]


def _identity(backbone: Backbone, scales: torch.Tensor | None, pooling: str) -> TaskPrompt:
    """A task whose logits are its pooled vector: no prefix, no prompt, an identity head."""
    hidden = backbone.spec.hidden_size
    delta = None if scales is None else scales - 1
    return TaskPrompt(None, None, torch.eye(hidden), torch.zeros(hidden), pooling=pooling, scale_delta=delta)


def _hooks(backbone: Backbone, scales: torch.Tensor) -> list[Any]:
    """Forward hooks that apply ``scales`` [layers, 2 * kv + ffn] to Hugging Face's own modules, the
    way PEFT's (IA)^3 does: outputs of the key and value projections, input of the FFN's output one."""
    spec, model = backbone.spec, backbone.model
    kv = spec.num_kv_heads * spec.head_dim
    # DeBERTa's relative-position keys are shared by every row and never scaled (see
    # remember_attention_inputs).
    attention_input, handles = remember_attention_inputs(backbone)

    def times(vector: torch.Tensor, index: int) -> Callable[..., torch.Tensor | None]:
        def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if spec.family == "deberta-v2" and args[0] is not attention_input[index]:
                return None
            return output * vector

        return hook

    def times_input(vector: torch.Tensor) -> Callable[..., tuple[torch.Tensor]]:
        return lambda module, args: (args[0] * vector,)

    for index in range(spec.num_layers):
        k, v, f = scales[index, :kv], scales[index, kv : 2 * kv], scales[index, 2 * kv :]
        if spec.family == "bert":
            layer = model.encoder.layer[index]
            pairs = [(layer.attention.self.key, k), (layer.attention.self.value, v)]
            ffn = layer.output.dense
        elif spec.family == "deberta-v2":
            layer = model.encoder.layer[index]
            pairs = [(layer.attention.self.key_proj, k), (layer.attention.self.value_proj, v)]
            ffn = layer.output.dense
        elif spec.family == "decoder":
            layer = model.layers[index]
            pairs = [(layer.self_attn.k_proj, k), (layer.self_attn.v_proj, v)]
            ffn = layer.mlp.down_proj
        else:  # modernbert: one fused query | key | value projection
            layer = model.layers[index]
            pairs = [(layer.attn.Wqkv, torch.cat([torch.ones_like(k), k, v]))]
            ffn = layer.mlp.Wo
        for module, vector in pairs:
            handles.append(module.register_forward_hook(times(vector, index)))
        handles.append(ffn.register_forward_pre_hook(times_input(f)))
    return handles


def _random_scales(backbone: Backbone, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spec = backbone.spec
    return 1 + 0.5 * torch.randn(spec.num_layers, spec.scales_width, generator=g)  # [layers, 2 * kv + ffn]


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_scales_equal_hugging_faces_model_with_the_same_multipliers(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    pooling = "last" if backbone.spec.family == "decoder" else "cls"
    scales = _random_scales(backbone, seed=1)
    task = _identity(backbone, scales, pooling)
    assert_hooked_model_agrees(backbone, task, lambda: _hooks(backbone, scales), TEXTS)


@torch.inference_mode()
def test_scales_equal_pefts_ia3_on_bert(kind_backbone: Callable[[str], Backbone]) -> None:
    from peft import IA3Config, get_peft_model

    backbone = kind_backbone("bert")
    spec = backbone.spec
    # PEFT's default BERT targets also match attention.output.dense; name the three modules exactly.
    config = IA3Config(
        target_modules=r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)",
        feedforward_modules=r".*layer\.\d+\.output\.dense",
        init_ia3_weights=True,
    )
    import copy

    peft_model = get_peft_model(copy.deepcopy(backbone.model), config)
    scales = _random_scales(backbone, seed=2)
    kv = spec.num_kv_heads * spec.head_dim
    found = 0
    for name, param in peft_model.named_parameters():
        if "ia3_l" not in name:
            continue
        index = int(name.split(".layer.")[1].split(".")[0])
        if ".attention.self.key." in name:
            vector = scales[index, :kv]
        elif ".attention.self.value." in name:
            vector = scales[index, kv : 2 * kv]
        else:
            vector = scales[index, 2 * kv :]
        param.copy_(vector.view(param.shape))
        found += 1
    assert found == 3 * spec.num_layers
    peft_model.eval()
    for row in text_ids(backbone, TEXTS):
        theirs = peft_model(input_ids=torch.tensor([row])).last_hidden_state[0, 0]  # [hidden]
        ours = prompted_forward(backbone, [row], [_identity(backbone, scales, "cls")])[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_a_scaled_task_gives_the_same_logits_alone_and_mixed(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    pooled = "last" if backbone.spec.family == "decoder" else "cls"
    tasks = [
        make_task(backbone, task="scaled", prefix_length=4, pooling=pooled, seed=1, scales=True),
        make_task(backbone, task="plain", num_labels=5, prefix_length=6, pooling=pooled, seed=2),
        make_task(backbone, task="alone", num_labels=2, prefix_length=0, pooling="mean", seed=3, scales=True),
        make_task(backbone, task="prompt", prefix_length=2, prompt_length=3, pooling=pooled, seed=4),
    ]
    assert [t.scale_delta is not None for t in tasks] == [True, False, True, False]
    row_ids = assert_mixed_equals_alone(backbone, tasks, TEXTS)

    # An unscaled task's rows are the same with or without a scaled task beside them, and a task
    # with multipliers of ones is the task without scales.
    plain = tasks[1]
    only_plain = prompted_forward(backbone, row_ids[:2], [plain, plain])
    beside = prompted_forward(backbone, row_ids[:2], [plain, tasks[0]])
    torch.testing.assert_close(beside[0], only_plain[0], rtol=0, atol=1e-5)
    assert plain.scale_delta is None
    ones = TaskPrompt(
        plain.prefix,
        plain.prompt,
        plain.head_weight,
        plain.head_bias,
        pooling=plain.pooling,
        scale_delta=torch.zeros(backbone.spec.num_layers, backbone.spec.scales_width),
    )
    torch.testing.assert_close(
        prompted_forward(backbone, row_ids[:1], [ones])[0], only_plain[0], rtol=0, atol=1e-5
    )
    # And the scales are read: other multipliers, other logits.
    scaled = tasks[0]
    assert scaled.scale_delta is not None
    other = TaskPrompt(
        scaled.prefix,
        scaled.prompt,
        scaled.head_weight,
        scaled.head_bias,
        pooling=scaled.pooling,
        scale_delta=scaled.scale_delta.flip(0),
    )
    a = prompted_forward(backbone, row_ids[:1], [scaled])[0]
    b = prompted_forward(backbone, row_ids[:1], [other])[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["bert", "llama", "deberta-v3", "modernbert"])
def test_gradients_reach_the_scales(kind: str, kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(kind)
    task = make_task(backbone, prefix_length=3, seed=3, scales=True)
    assert task.scale_delta is not None
    task.scale_delta.requires_grad_(True)
    ids = text_ids(backbone, TEXTS)
    logits = prompted_forward(backbone, ids, [task] * len(ids))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    grad = task.scale_delta.grad
    assert grad is not None
    kv = backbone.spec.num_kv_heads * backbone.spec.head_dim
    # keys, values and FFN parts all receive gradient
    for part in (grad[:, :kv], grad[:, kv : 2 * kv], grad[:, 2 * kv :]):
        assert part.abs().sum() > 0
