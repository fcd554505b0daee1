from __future__ import annotations

import platform

import pytest
import torch

from prompts.backbone import Backbone
from service.engine import Engine, Row
from service.memory import HeapTrimmer
from service.pool import PromptPool
from tests.factories import random_artifact

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is a glibc function")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@glibc
def test_trims_at_most_once_per_interval() -> None:
    clock = Clock()
    trimmer = HeapTrimmer(30.0, clock=clock)
    assert trimmer.available
    assert not trimmer.maybe_trim()  # the interval starts at construction
    clock.now += 29.9
    assert not trimmer.maybe_trim()
    clock.now += 0.2
    assert trimmer.maybe_trim() and trimmer.trims == 1
    assert not trimmer.maybe_trim()
    clock.now += 30.0
    assert trimmer.maybe_trim() and trimmer.trims == 2


def test_interval_zero_never_trims() -> None:
    clock = Clock()
    trimmer = HeapTrimmer(0.0, clock=clock)
    clock.now += 1e6
    assert not trimmer.available and not trimmer.maybe_trim() and trimmer.trims == 0


@glibc
def test_engine_trims_between_batches_and_results_are_unchanged(backbone: Backbone) -> None:
    from service.cache import prepare_task

    pool = PromptPool(backbone.spec, backbone.device, backbone.dtype)
    task = prepare_task(random_artifact(backbone.spec, task="t"), backbone, pool)
    rows = [Row(task, [1, 5 + i, 2]) for i in range(3)]
    plain = Engine(backbone, pool).run_batch(rows)
    clock = Clock()
    trimmer = HeapTrimmer(1.0, clock=clock)
    engine = Engine(backbone, pool, trimmer)
    clock.now += 2.0
    trimmed = engine.run_batch(rows)
    assert trimmer.trims == 1
    assert torch.allclose(torch.tensor(trimmed), torch.tensor(plain), atol=1e-6)
    engine.run_batch(rows)
    assert trimmer.trims == 1  # not again within the interval
