from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prompts.backbone import Backbone
from service.engine import Engine, Row
from service.memory import YOUNG_GC_THRESHOLD, HeapTrimmer
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


# Run in a child process: a freeze in the test process would keep every later test's garbage.
_FREEZE_CHECK = """
import gc, sys, weakref
from fastapi.testclient import TestClient
from prompts.backbone import load_backbone
from service.app import create_app
from service.settings import Settings

backbone = load_backbone(sys.argv[1], device="cpu")
for freeze in (False, True):
    app = create_app(Settings(store=sys.argv[2]), backbone=backbone, freeze_gc=freeze)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        print(freeze, gc.get_freeze_count(), gc.get_threshold()[0], flush=True)

class Node:
    pass

late = Node()
late.loop = late  # a cycle made after the freeze: still the collector's to free
alive = weakref.ref(late)
del late
gc.collect()
print("collected", alive() is None, flush=True)
"""


def test_a_serving_app_freezes_its_start_up_objects_and_later_cycles_are_still_collected(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FREEZE_CHECK, str(tiny_bert_dir), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    not_frozen, frozen = (line.split() for line in lines[:2])
    assert not_frozen == ["False", "0", "700"]  # the default (tests, embedded use): the collector as ever
    assert frozen[0] == "True" and int(frozen[1]) > 100_000  # torch, transformers, the app, the model
    assert int(frozen[2]) == YOUNG_GC_THRESHOLD  # young collections made rarer
    assert lines[2] == "collected True"
