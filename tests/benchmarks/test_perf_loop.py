"""benchmarks/perf_loop.py: one pass answers every call through the endpoint's callback path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.perf_loop import observed_pass, one_pass
from prompts.backbone import TextTokenizer
from service.settings import Settings


@pytest.mark.parametrize("tenants", [1, 3])
def test_a_pass_answers_every_call_and_times_the_loop_thread(tmp_path: Path, tenants: int) -> None:
    """One tenant's calls, and three tenants' (the batcher's fair view, each call its tenant's task)."""
    rows = [[101, *range(1000, 1000 + n), 102] for n in (3, 9, 20, 5)]
    cpu, wall = asyncio.run(
        one_pass(
            Settings(max_batch_size=8),
            TextTokenizer.load(),
            rows,
            per_call=3,
            calls=50,
            labels=4,
            workdir=tmp_path,
            tenants=tenants,
        )
    )
    # The loop thread did the work (a failed call raises), and its CPU is at most the wall time.
    assert 0.0 < cpu <= wall * 1.05 + 0.01


@pytest.mark.parametrize("per_message", [1, 7])
def test_a_metrics_pass_counts_every_record(per_message: int) -> None:
    cpu, counted = observed_pass(records=50, per_message=per_message, tasks=3)
    assert counted == 50 and cpu > 0.0
