"""Engine.run_batch in several forward threads at once (pipeline_depth 2) on a real backbone.

Two batches of different tasks are held inside their forward threads until both have entered, so
they provably run at the same time; every row must still get what it gets alone.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from prompts.backbone import Backbone
from prompts.disk_store import DiskPromptStore
from service.engine import Row
from service.runtime import build_runtime, pipeline_depth
from service.settings import Settings
from tests.factories import random_artifact

TEXTS = ["great phone with a fast screen", "refund please", "hello world", "what is the price of this"]


async def test_overlapping_batches_give_each_row_its_own_answer(tmp_path: Path, backbone: Backbone) -> None:
    store = DiskPromptStore(tmp_path)
    spec = backbone.spec
    artifacts = [
        random_artifact(spec, task="prefix", num_labels=2, prefix_length=4, seed=1),
        random_artifact(spec, task="long", num_labels=5, prefix_length=12, seed=2),
        random_artifact(spec, task="prompt", num_labels=3, prefix_length=0, prompt_length=4, seed=3),
        random_artifact(spec, task="mean", num_labels=4, prefix_length=2, pooling="mean", seed=4),
    ]
    for artifact in artifacts:
        store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    both_in = threading.Barrier(2, timeout=10)
    entered: list[int] = []

    def hold_first_two(rows: list[Row]) -> None:
        entered.append(len(rows))
        if len(entered) <= 2:
            both_in.wait()  # BrokenBarrierError (the test fails) unless the other batch runs meanwhile

    settings = Settings(store=str(tmp_path), pipeline_depth=2, max_batch_size=4, max_wait_ms=10_000)
    runtime = build_runtime(settings, backbone, store, on_rows=hold_first_two)
    runtime.batcher.start()
    try:
        tasks = [await runtime.cache.resolve(a.task) for a in artifacts]
        ids = [e.input_ids for e in backbone.encode(TEXTS, max_tokens=32)]
        rows = [Row(task, row_ids) for task in tasks for row_ids in ids]  # 16 rows: four full batches
        got = await asyncio.gather(*(runtime.batcher.submit(row) for row in rows))
        alone = [runtime.engine.run_batch([row])[0] for row in rows]
    finally:
        await runtime.batcher.stop()

    assert entered == [4, 4, 4, 4]
    assert runtime.engine.batches == 4 + len(rows)
    for mixed, single, row in zip(got, alone, rows, strict=True):
        assert len(mixed) == row.task.num_labels
        assert mixed == pytest.approx(single, abs=1e-5)


def test_pipeline_depth_is_one_without_cuda_graphs(backbone: Backbone, tmp_path: Path) -> None:
    store = DiskPromptStore(tmp_path)
    runtime = build_runtime(Settings(store=str(tmp_path)), backbone, store)
    assert runtime.engine.graphs is None  # a CPU backbone
    assert pipeline_depth(Settings(), runtime.engine) == 1
    assert pipeline_depth(Settings(pipeline_depth=3), runtime.engine) == 3
