"""benchmarks/perf_http.py: one phase's load shared by several load-generator processes; its lists."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.perf_http import (
    batch_counters,
    batching_md,
    ints,
    merge_outcomes,
    per_process_md,
    rows_per_batch_md,
    split_job,
    thread_role,
    threads_cpu_s,
    top_frames,
)
from service.batcher import FORWARD_THREAD
from service.osnames import name_os_thread


def _job(mode: str, concurrency: int = 1, rate: float = 0.0) -> dict[str, Any]:
    return {"mode": mode, "concurrency": concurrency, "rate": rate, "seed": 3, "duration_s": 5.0}


def test_a_closed_loop_deals_its_clients_out_and_never_starts_an_idle_process() -> None:
    jobs = split_job(_job("closed", concurrency=10), 4)
    assert [j["concurrency"] for j in jobs] == [3, 3, 2, 2]
    assert len({j["seed"] for j in jobs}) == 4
    assert [j["concurrency"] for j in split_job(_job("closed", concurrency=2), 4)] == [1, 1]
    assert split_job(_job("closed", concurrency=5), 1)[0]["concurrency"] == 5


def test_an_open_loop_divides_its_rate() -> None:
    jobs = split_job(_job("open", rate=900.0), 3)
    assert [j["rate"] for j in jobs] == [300.0, 300.0, 300.0]
    assert all(j["duration_s"] == 5.0 for j in jobs)


def _outcome(ok: int, latencies: list[float], errors: dict[str, int]) -> dict[str, Any]:
    return {
        "mode": "closed",
        "concurrency": 2,
        "offered_rate": 0.0,
        "window_s": 5.0,
        "sent": ok + 1,
        "ok": ok,
        "rows": ok * 32,
        "window_requests": ok,
        "errors": errors,
        "dropped": 1,
        "unfinished": 0,
        "latencies_s": latencies,
        "client_cpu_s": 0.5,
    }


def test_outcomes_add_up_and_latencies_pool() -> None:
    merged = merge_outcomes([_outcome(2, [0.1, 0.2], {"429": 1}), _outcome(3, [0.3], {"429": 2, "503": 1})])
    assert merged["concurrency"] == 4
    assert (merged["ok"], merged["rows"], merged["sent"], merged["dropped"]) == (5, 160, 7, 2)
    assert merged["errors"] == {"429": 3, "503": 1}
    assert sorted(merged["latencies_s"]) == [0.1, 0.2, 0.3]
    assert merged["window_s"] == 5.0
    assert merged["client_cpu_s"] == 1.0


def test_an_empty_client_list_skips_a_shape_and_zero_clients_are_refused() -> None:
    assert ints("") == []
    assert ints("16, 64,") == [16, 64]
    with pytest.raises(SystemExit, match="at least 1"):
        ints("0")


def test_the_engine_threads_are_told_apart_by_their_names() -> None:
    assert thread_role(100, 100, "ptserve-engine") == "loop"
    assert thread_role(100, 101, "ptserve-forward") == "forward"
    assert thread_role(100, 102, "ZMQbg/IO/0") == "zmq"
    assert thread_role(100, 103, "ptserve-engine") == "other"  # inherited the process's name
    md = per_process_md(
        {"ptserve-engine 7": 1.1, "ptserve-fe-0 8": 0.5, "ptserve-fe-1 9": 0.6, "python 6": 0.0},
        {"other": 0.05, "forward": 0.4, "loop": 0.6},
    )
    assert md == "engine 1.10 (loop 0.60, forward 0.40, other 0.05); front ends 0.60 + 0.50; rest 0.00"
    one_process = per_process_md({"python 6": 0.9}, {"loop": 0.5, "forward": 0.4})
    assert one_process == "0.90 (loop 0.50, forward 0.40)"


def test_a_forward_thread_carries_its_name_into_proc_and_its_cpu_is_counted_there() -> None:
    started = threading.Event()
    finish = threading.Event()

    def forward() -> None:
        name_os_thread(FORWARD_THREAD)
        # 50 ms of this thread's CPU, which must land on the "forward" role, then idle until released.
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass
        started.set()
        finish.wait()

    thread = threading.Thread(target=forward, name=f"{FORWARD_THREAD}_0")
    thread.start()
    started.wait()
    try:
        comm = Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()
        assert comm == FORWARD_THREAD
        roles = threads_cpu_s(os.getpid())
        assert roles["forward"] >= 0.03 and "loop" in roles  # 50 ms of its CPU, in 10 ms ticks
    finally:
        finish.set()
        thread.join()


def test_a_py_spy_profile_is_summed_per_thread_inclusive_and_innermost() -> None:
    raw = "\n".join(
        [
            "thread (11): MainThread;main (a.py:1);loop (a.py:5);send (z.py:9) 6",
            "thread (11): MainThread;main (a.py:1);loop (a.py:5) 2",
            "thread (12): ptserve-forward_0;work (b.py:3);forward (b.py:8) 3",
            "not a stack line",
        ]
    )
    top = top_frames(raw)
    main, forward = top.split("### ")[1:]
    assert main.startswith("thread (11): MainThread: 8 samples")
    assert "| loop | 100.0% | 25.0% |" in main and "| send | 75.0% | 75.0% |" in main
    assert forward.startswith("thread (12): ptserve-forward_0: 3 samples")
    assert "| forward | 100.0% | 100.0% |" in forward


def test_rows_per_batch_and_what_closed_the_batches_come_from_two_scrapes() -> None:
    def scrape(rows: float, batches: float, time_closed: float, size_closed: float) -> str:
        return "\n".join(
            [
                "# TYPE ptserve_batches counter",
                f'ptserve_batches_total{{closed_by="time"}} {time_closed}',
                f'ptserve_batches_total{{closed_by="size"}} {size_closed}',
                "# TYPE ptserve_batch_size histogram",
                f'ptserve_batch_size_bucket{{le="+Inf"}} {batches}',
                f"ptserve_batch_size_sum {rows}",
                f"ptserve_batch_size_count {batches}",
                "",
            ]
        )

    before = batch_counters(scrape(rows=100, batches=10, time_closed=10, size_closed=0))
    after = batch_counters(scrape(rows=400, batches=20, time_closed=12, size_closed=8))
    rows, closed_by = batching_md(before, after)
    assert rows == 30.0 and closed_by == {"time": 0.2, "size": 0.8}
    assert rows_per_batch_md(rows, closed_by) == "30.0 (size 80%, time 20%)"
    assert math.isnan(batching_md(after, after)[0])  # no pass in the phase: no figure
    assert rows_per_batch_md(math.nan, {}) == ""
