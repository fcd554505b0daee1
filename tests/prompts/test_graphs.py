"""The CUDA-graph encoder's padding: a forward padded to its bucket gives the real rows what the
unpadded loop gives them, in every family. On the CPU the padded forward runs eagerly
(``capture=False``); where CUDA is present the captured graphs are checked against the eager loop too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prompts.backbone import Backbone, load_backbone
from prompts.backbones import Layout, LowRank
from prompts.forward import TaskPrompt, batch_from_tasks, run_prompted
from prompts.graphs import MAX_BUCKET_TOKENS, Bucket, GraphedEncoder, bucket_for
from tests.conftest import KINDS
from tests.factories import random_artifact

TEXTS = ["this phone is great", "a", "what time is the game tonight in the city", "free offer call now"]
Inputs = tuple[torch.Tensor, torch.Tensor, Layout, torch.Tensor | None, torch.Tensor | None, LowRank | None]


def test_buckets_round_rows_to_powers_of_two_and_lengths_to_steps() -> None:
    assert bucket_for(1, 1, 0, max_rows=64) == Bucket(1, 16, 0)
    assert bucket_for(3, 17, 9, max_rows=64) == Bucket(4, 32, 16)
    assert bucket_for(64, 48, 16, max_rows=64) == Bucket(64, 48, 16)
    assert bucket_for(65, 16, 0, max_rows=64) is None  # more rows than any bucket
    assert bucket_for(64, MAX_BUCKET_TOKENS // 64 + 1, 0, max_rows=256) is None  # too many tokens
    assert bucket_for(64, 64, 72, max_rows=64) is None  # the prefix counts towards them, and is capped


def _inputs(
    backbone: Backbone,
    rows: int,
    seq: int,
    prefix: int,
    seed: int,
    device: str = "cpu",
    scaled: bool = False,
    lora_rank: int = 0,
) -> Inputs:
    """Random loop inputs whose rows end at different lengths, as run_prompted builds them; ``scaled``:
    with (IA)^3 scale deltas, zero for the last row (a task without scales beside scaled ones);
    ``lora_rank``: with per-row LoRA of that rank, zero for the last row."""
    gen = torch.Generator().manual_seed(seed)
    spec = backbone.spec
    embeds = torch.randn((rows, seq, spec.hidden_size), generator=gen)  # [B, S, hidden]
    plens = torch.randint(0, prefix + 1, (rows,), generator=gen)
    lengths = torch.randint(1, seq + 1, (rows,), generator=gen)
    positions = backbone.family.positions(plens, seq)  # [B, S]
    shape = (rows, spec.num_layers, 2, spec.num_kv_heads, prefix, spec.head_dim)
    prefix_kv = torch.randn(shape, generator=gen) if prefix else None  # [B, layers, 2, kv_heads, P, head_dim]
    layout = Layout(prefix=prefix, seq=seq, prefix_len=plens.to(device), seq_len=lengths.to(device))
    moved = None if prefix_kv is None else prefix_kv.to(device)
    delta = None
    if scaled:
        delta = 0.3 * torch.randn(
            (rows, spec.num_layers, spec.scales_width), generator=gen
        )  # [B, layers, width]
        delta[-1] = 0
        delta = delta.to(device)
    lora: LowRank | None = None
    if lora_rank:
        lora = {}
        for name, (width_in, width_out) in backbone.family.lora_targets(spec.shape()).items():
            down = torch.randn((rows, spec.num_layers, width_in, lora_rank), generator=gen) / width_in**0.5
            up = 0.2 * torch.randn((rows, spec.num_layers, lora_rank, width_out), generator=gen)
            up[-1] = 0
            lora[name] = (down.to(device), up.to(device))  # [B, layers, in, r], [B, layers, r, out]
    return embeds.to(device), positions.to(device), layout, moved, delta, lora


def _eager(backbone: Backbone, inputs: Inputs) -> torch.Tensor:
    embeds, positions, layout, prefix, delta, lora = inputs
    family = backbone.family
    return family.layers(embeds, positions, family.masks(layout, embeds.dtype), prefix, delta, lora=lora)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_padded_forward_gives_real_rows_their_unpadded_states(
    kind: str, kind_backbone: Callable[[str], Backbone]
) -> None:
    backbone = kind_backbone(kind)
    encoder = GraphedEncoder(backbone.family, max_rows=8, capture=False)
    # The second shape shares the first one's bucket (4 rows, 32 tokens, prefix 16), so it also
    # proves that what an earlier, larger forward left in the buffers does not leak; the scaled
    # shapes do the same in buckets with (IA)^3 scales, the last two with LoRA of rank 4 too.
    shapes = [(4, 30, 12, False, 0), (3, 17, 9, False, 0), (2, 20, 16, False, 0), (5, 7, 0, False, 0)]
    shapes += [(1, 3, 5, False, 0), (4, 30, 12, True, 0), (3, 17, 9, True, 0), (4, 30, 12, True, 4)]
    shapes += [(3, 17, 9, True, 4)]
    for seed, (rows, seq, prefix, scaled, rank) in enumerate(shapes):
        inputs = _inputs(backbone, rows, seq, prefix, seed, scaled=scaled, lora_rank=rank)
        want = _eager(backbone, inputs)
        got = encoder(*inputs)
        assert got.shape == want.shape
        lengths = inputs[2].seq_len
        for b in range(rows):  # positions past a row's length are padding either way
            torch.testing.assert_close(got[b, : lengths[b]], want[b, : lengths[b]], rtol=0, atol=1e-5)
    assert encoder.replays == 9 and encoder.eager == 0


@torch.inference_mode()
def test_oversize_forward_runs_eagerly(backbone: Backbone) -> None:
    encoder = GraphedEncoder(backbone.family, max_rows=2, capture=False)
    inputs = _inputs(backbone, 3, 8, 4, seed=0)
    assert torch.equal(encoder(*inputs), _eager(backbone, inputs))
    assert encoder.eager == 1 and encoder.replays == 0


@torch.inference_mode()
def test_static_buffers_stay_within_their_budget(backbone: Backbone) -> None:
    encoder = GraphedEncoder(backbone.family, max_rows=8, capture=False, max_bytes=1)
    inputs = _inputs(backbone, 2, 8, 4, seed=0)
    assert torch.equal(encoder(*inputs), _eager(backbone, inputs))
    assert encoder.eager == 1 and encoder.replays == 0


@pytest.mark.parametrize("kind", ["bert", "qwen3", "deberta-v3", "modernbert"])
@torch.inference_mode()
def test_mixed_tasks_through_the_padded_encoder(kind: str, kind_backbone: Callable[[str], Backbone]) -> None:
    backbone = kind_backbone(kind)

    def task(**kwargs: object) -> TaskPrompt:
        artifact = random_artifact(backbone.spec, **kwargs)  # type: ignore[arg-type]
        return TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)

    tasks = [
        task(task="a", num_labels=3, prefix_length=4, seed=1),
        task(task="b", num_labels=5, prefix_length=7, prompt_length=3, pooling="mean", seed=2),
        task(task="c", num_labels=2, prefix_length=0, prompt_length=2, pooling="last", seed=3),
        task(task="d", num_labels=4, prefix_length=3, seed=4, scales=True),
        task(task="e", num_labels=3, prefix_length=2, seed=5, lora_rank=2),
    ]
    ids = [e.input_ids for e in backbone.encode(TEXTS, 40)]
    encoder = GraphedEncoder(backbone.family, max_rows=8, capture=False)
    # Without a scaled task, then with one: two buckets (a scaled one holds a scales buffer), the
    # unscaled rows the same in both.
    plain = batch_from_tasks([tasks[i % 3] for i in range(len(ids))], backbone.device)
    scaled = batch_from_tasks([tasks[i % 4] for i in range(len(ids))], backbone.device)
    # With a LoRA task in the last row: a bucket of its own (rank 2), holding LoRA buffers.
    adapted = batch_from_tasks([tasks[i % 3] for i in range(len(ids) - 1)] + [tasks[4]], backbone.device)
    assert plain.scale_delta is None and scaled.scale_delta is not None and adapted.lora is not None
    for batch in (plain, scaled, adapted):
        padded = run_prompted(backbone, ids, batch, encoder)
        torch.testing.assert_close(padded, run_prompted(backbone, ids, batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        run_prompted(backbone, ids, scaled, encoder)[:3],
        run_prompted(backbone, ids, plain)[:3],
        rtol=0,
        atol=1e-5,
    )
    torch.testing.assert_close(
        run_prompted(backbone, ids, adapted, encoder)[:3],
        run_prompted(backbone, ids, plain)[:3],
        rtol=0,
        atol=1e-5,
    )
    assert encoder.replays == 5 and len(encoder._buckets) == 3
    assert {b.lora_rank for b in encoder._buckets} == {0, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["bert", "qwen3", "deberta-v3", "modernbert"])
@torch.inference_mode()
def test_captured_graphs_match_the_eager_encoder(kind: str, kind_dir: Callable[[str], Path]) -> None:
    backbone = load_backbone(kind_dir(kind), device="cuda", dtype="float32")
    encoder = GraphedEncoder(backbone.family, max_rows=8, capture=True)
    shapes = [(4, 30, 12, False, 0), (3, 17, 9, False, 0), (8, 5, 0, False, 0), (3, 17, 9, True, 0)]
    shapes += [(2, 10, 4, True, 0), (3, 17, 9, False, 4), (2, 10, 4, True, 4)]
    for seed, (rows, seq, prefix, scaled, rank) in enumerate(shapes):
        inputs = _inputs(backbone, rows, seq, prefix, seed, device="cuda", scaled=scaled, lora_rank=rank)
        want = _eager(backbone, inputs)
        got = encoder(*inputs)
        lengths = inputs[2].seq_len
        for b in range(rows):
            torch.testing.assert_close(got[b, : lengths[b]], want[b, : lengths[b]], rtol=0, atol=1e-4)
    # Six buckets: (4, 32, 16) twice, (8, 16, 0), the scaled (4, 32, 16) and (2, 16, 8), and with
    # LoRA of rank 4 (4, 32, 16) and the scaled (2, 16, 8).
    assert encoder.graphs == 6
