from __future__ import annotations

import gc

import torch

from prompts.backbone import Backbone
from prompts.forward import TaskPrompt, prompted_forward
from service.cache import LoadedTask, prepare_task
from service.engine import Engine, Row
from service.pool import PromptPool
from tests.factories import random_artifact

TEXTS = ["great phone", "the shirt is red and the price is cheap", "what is it", "free offer call now", "a"]


def _pair(backbone: Backbone, pool: PromptPool, seed: int, **kwargs: object) -> tuple[LoadedTask, TaskPrompt]:
    artifact = random_artifact(backbone.spec, task=f"t{seed}", seed=seed, **kwargs)  # type: ignore[arg-type]
    return prepare_task(artifact, backbone, pool), TaskPrompt.from_artifact(
        artifact, backbone.device, backbone.dtype
    )


def _assert_served_equals_alone(
    backbone: Backbone, engine: Engine, pairs: list[tuple[LoadedTask, TaskPrompt]]
) -> None:
    ids = [e.input_ids for e in backbone.encode(TEXTS, 40)]
    picks = [(i * 3) % len(pairs) for i in range(2 * len(pairs) + 3)]
    rows = [Row(pairs[p][0], ids[i % len(ids)]) for i, p in enumerate(picks)]
    with torch.inference_mode():
        served = engine.logits(rows)
        for r, p in enumerate(picks):
            loaded, reference = pairs[p]
            alone = prompted_forward(backbone, [rows[r].input_ids], [reference])[0]
            c = loaded.num_labels
            torch.testing.assert_close(served[r, :c], alone[:c], rtol=0, atol=1e-5)
            assert torch.isinf(served[r, c:]).all()


def test_pool_gather_gives_each_task_its_own_logits(backbone: Backbone) -> None:
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype, initial_slots=2)
    shapes = [
        {"prefix_length": 4, "num_labels": 3},
        {"prefix_length": 9, "prompt_length": 3, "num_labels": 6, "pooling": "mean"},
        {"prefix_length": 0, "prompt_length": 2, "num_labels": 2, "pooler": "backbone", "pooling": "first"},
        {"prefix_length": 2, "positions": "from_zero", "num_labels": 4},
        {"prefix_length": 0, "prompt_length": 0, "num_labels": 2},
    ]
    # Added one by one, so the pool grows in slots and widens its prefix, prompt and label sizes
    # while earlier tasks already sit in it.
    pairs = [_pair(backbone, pool, seed, **shape) for seed, shape in enumerate(shapes)]
    assert pool.slots_in_use == 5 and len({loaded.slot for loaded, _ in pairs}) == 5
    _assert_served_equals_alone(backbone, Engine(backbone, pool), pairs)


def test_a_slot_is_reused_only_after_its_task_is_gone(backbone: Backbone) -> None:
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype, initial_slots=2)
    keep, keep_ref = _pair(backbone, pool, 1)
    gone, _ = _pair(backbone, pool, 2)
    gone_slot = gone.slot
    assert pool.slots_in_use == 2
    del gone
    gc.collect()
    assert pool.slots_in_use == 1
    newcomer, newcomer_ref = _pair(backbone, pool, 3, prefix_length=6)
    assert newcomer.slot == gone_slot != keep.slot
    # The surviving task was not disturbed by the slot's new tenant, and vice versa.
    _assert_served_equals_alone(
        backbone, Engine(backbone, pool), [(keep, keep_ref), (newcomer, newcomer_ref)]
    )


def test_scaled_and_unscaled_tasks_share_the_pool_and_a_batch(backbone: Backbone) -> None:
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype, initial_slots=2)
    plain, plain_ref = _pair(backbone, pool, 1)
    assert pool._scale_delta is None  # nothing allocated before the first scaled task
    before = pool.nbytes
    scaled, scaled_ref = _pair(backbone, pool, 2, scales=True)
    spec = backbone.spec
    assert scaled.scaled and not plain.scaled
    assert pool.nbytes - before == 2 * spec.num_layers * spec.scales_width * 4  # two slots of float32
    # A third task grows the pool past its two slots: the scales grow with it, the new slots zeros.
    other, other_ref = _pair(backbone, pool, 3, prefix_length=6, scales=True)
    engine = Engine(backbone, pool)
    _assert_served_equals_alone(
        backbone, engine, [(plain, plain_ref), (scaled, scaled_ref), (other, other_ref)]
    )
    # A batch of unscaled tasks gathers no scales at all.
    ids = backbone.encode(TEXTS, 40)[0].input_ids
    assert engine.gather([Row(plain, ids)]).scale_delta is None
    assert engine.gather([Row(plain, ids), Row(scaled, ids)]).scale_delta is not None


def test_a_slot_reused_after_a_scaled_task_holds_zeros_again(backbone: Backbone) -> None:
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype, initial_slots=2)
    keep, keep_ref = _pair(backbone, pool, 1, scales=True)
    gone, _ = _pair(backbone, pool, 2, scales=True)
    gone_slot = gone.slot
    del gone
    gc.collect()
    newcomer, newcomer_ref = _pair(backbone, pool, 3)  # no scales: its slot must not keep the old deltas
    assert newcomer.slot == gone_slot and newcomer_ref.scale_delta is None
    _assert_served_equals_alone(
        backbone, Engine(backbone, pool), [(keep, keep_ref), (newcomer, newcomer_ref)]
    )


def test_lora_tasks_of_two_ranks_and_plain_tasks_share_the_pool_and_a_batch(backbone: Backbone) -> None:
    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype, initial_slots=2)
    plain, plain_ref = _pair(backbone, pool, 1)
    assert pool._lora is None  # nothing allocated before the first LoRA task
    low, low_ref = _pair(backbone, pool, 2, lora_rank=2)
    assert low.lora_rank == 2 and plain.lora_rank == 0
    # A higher rank widens every slot (the rank-2 task's extra columns zeros), and a third task grows
    # the pool past its two slots.
    high, high_ref = _pair(backbone, pool, 3, prefix_length=6, lora_rank=4, scales=True)
    assert pool._rank_cap == 4

    # LoRA slots are for LoRA tasks only (slot 0 holds the zeros plain rows gather): plain tasks,
    # however many, add none.
    def lora_bytes() -> int:
        assert pool._lora is not None
        return sum(t.numel() * t.element_size() for pair in pool._lora.values() for t in pair)

    before, slots = lora_bytes(), pool._capacity
    more_plain = [_pair(backbone, pool, 10 + i) for i in range(16)]
    assert pool.slots_in_use == 19 and pool._capacity > slots and len(pool._lora_of) == 2
    assert lora_bytes() == before and pool._lora_capacity == 5
    del more_plain
    engine = Engine(backbone, pool)
    _assert_served_equals_alone(backbone, engine, [(plain, plain_ref), (low, low_ref), (high, high_ref)])
    ids = backbone.encode(TEXTS, 40)[0].input_ids
    assert engine.gather([Row(plain, ids)]).lora is None
    gathered = engine.gather([Row(plain, ids), Row(low, ids)]).lora
    assert gathered is not None and next(iter(gathered.values()))[0].shape[-1] == 2  # the batch's rank
    # A slot reused after a LoRA task holds zeros again.
    high_slot = high.slot
    del high, high_ref
    gc.collect()
    newcomer, newcomer_ref = _pair(backbone, pool, 4)
    assert newcomer.slot == high_slot
    _assert_served_equals_alone(backbone, engine, [(newcomer, newcomer_ref), (low, low_ref)])
    assert engine.gather([Row(newcomer, ids), Row(low, ids)]).lora is not None
