"""Tests for service.batcher.DynamicBatcher.

Batches are held in flight with threading.Event inside a fake run_batch, never with sleeps, so the
queue contents at the moment a batch forms are known exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prompts.errors import PtserveError
from service.batcher import FORWARD_THREAD, BatcherClosedError, BatchStats, DynamicBatcher, QueueFullError

LONG_WAIT_MS = 60_000.0  # so no batch in these tests closes by time unless the test wants it to


@dataclass(frozen=True)
class Item:
    name: str
    cost: int = 1


class FakeForward:
    """A run_batch that records its batches and, with hold=True, blocks each one until released."""

    def __init__(self, *, hold: bool = False, fail_on: str | None = None, short_once: bool = False) -> None:
        self.hold = hold
        self.fail_on = fail_on
        self.short_once = short_once
        self.error = ValueError("forward failed")
        self.batches: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.entered_at: list[float] = []
        self.entered = threading.Event()
        self.entries = threading.Semaphore(0)  # one release per batch that entered
        self.release = threading.Event()

    def __call__(self, items: list[Item]) -> list[str]:
        self.entered_at.append(time.monotonic())
        self.batches.append([item.name for item in items])
        self.threads.append(threading.current_thread())
        self.entered.set()
        self.entries.release()
        if self.hold:
            assert self.release.wait(timeout=5), "test never released the batch"
        if self.fail_on is not None and self.fail_on in [item.name for item in items]:
            raise self.error
        if self.short_once:
            self.short_once = False
            return []
        return [item.name.upper() for item in items]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 5)

    async def wait_batches(self, count: int) -> None:
        """Until ``count`` more batches have entered run_batch."""
        for _ in range(count):
            assert await asyncio.to_thread(self.entries.acquire, True, 5)


@dataclass
class Harness:
    batcher: DynamicBatcher[Item, str]
    fake: FakeForward
    stats: list[BatchStats] = field(default_factory=list)


Factory = Callable[..., Harness]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[Harness] = []

    def factory(
        fake: FakeForward | None = None,
        *,
        max_batch_size: int = 8,
        max_batch_tokens: int = 10_000,
        max_wait_ms: float = LONG_WAIT_MS,
        **kwargs: Any,
    ) -> Harness:
        fake = fake or FakeForward()
        stats: list[BatchStats] = []
        batcher: DynamicBatcher[Item, str] = DynamicBatcher(
            fake,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            cost=lambda item: item.cost,
            on_batch=stats.append,
            **kwargs,
        )
        batcher.start()
        harness = Harness(batcher, fake, stats)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.fake.release.set()
        await harness.batcher.stop(drain=False)


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop (no timed sleep) until predicate holds."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def spawn(batcher: DynamicBatcher[Item, str], *names: str) -> list[asyncio.Task[str]]:
    return [asyncio.create_task(batcher.submit(Item(name))) for name in names]


async def test_submit_returns_result_from_run_batch_on_worker_thread(make: Factory) -> None:
    h = make(max_wait_ms=0)

    assert await h.batcher.submit(Item("a")) == "A"

    assert h.fake.batches == [["a"]]
    assert h.fake.threads[0] is not threading.current_thread()
    assert h.fake.threads[0].name.startswith("ptserve-forward")


async def test_batch_closes_at_max_batch_size(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a1"), Item("a2")]))
    await h.fake.wait_entered()
    queued = spawn(h.batcher, "q1", "q2", "q3", "q4", "q5")
    await until(lambda: h.batcher.queue_depth == 5)

    h.fake.release.set()
    await h.batcher.stop(drain=True)

    assert await first == ["A1", "A2"]
    assert [await task for task in queued] == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    assert h.fake.batches == [["a1", "a2"], ["q1", "q2"], ["q3", "q4"], ["q5"]]
    assert [s.closed_by for s in h.stats] == ["size", "size", "size", "drain"]
    assert [s.size for s in h.stats] == [2, 2, 2, 1]
    assert all(s.run_s >= 0 and s.queue_wait_s >= 0 for s in h.stats)


async def test_batch_closes_when_next_item_would_exceed_token_budget(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=100, max_batch_tokens=32)
    # 2 x 40 > 32, so the oversized item runs alone and "b" waits for the next batch.
    first = asyncio.create_task(h.batcher.submit_many([Item("big", 40), Item("b", 8)]))
    await h.fake.wait_entered()
    costs = {"c1": 8, "c2": 8, "c3": 8, "c4": 16, "c5": 16, "c6": 16, "c7": 4}
    queued = [asyncio.create_task(h.batcher.submit(Item(n, c))) for n, c in costs.items()]
    await until(lambda: h.batcher.queue_depth == 8)

    h.fake.release.set()
    await h.batcher.stop(drain=True)

    assert await first == ["BIG", "B"]
    assert len([await task for task in queued]) == 7
    assert h.fake.batches == [["big"], ["b", "c1", "c2", "c3"], ["c4", "c5"], ["c6", "c7"]]
    assert [s.closed_by for s in h.stats] == ["tokens", "tokens", "tokens", "drain"]
    assert [s.padded_tokens for s in h.stats] == [40, 32, 32, 32]
    assert [s.real_tokens for s in h.stats] == [40, 32, 32, 20]
    assert all(s.padded_tokens <= 32 for s in h.stats if s.size > 1)


async def test_batch_closes_after_max_wait(make: Factory) -> None:
    h = make(max_batch_size=8, max_wait_ms=1)

    results = await asyncio.gather(h.batcher.submit(Item("a")), h.batcher.submit(Item("b")))

    assert list(results) == ["A", "B"]
    assert sum(s.size for s in h.stats) == 2
    assert all(s.closed_by == "time" and s.size < 8 for s in h.stats)


async def test_items_that_waited_during_a_forward_go_without_waiting_again(make: Factory) -> None:
    max_wait_s = 0.25
    h = make(FakeForward(hold=True), max_batch_tokens=10, max_wait_ms=max_wait_s * 1000)
    first = asyncio.create_task(h.batcher.submit_many([Item("big", 10), Item("b")]))
    await h.fake.wait_entered()
    queued = spawn(h.batcher, "c", "d")
    # Deliberately let time pass (not synchronisation): the queued items outlive max_wait_ms.
    await asyncio.sleep(max_wait_s * 1.2)

    released_at = time.monotonic()
    h.fake.release.set()
    assert await first == ["BIG", "B"]
    assert [await task for task in queued] == ["C", "D"]

    assert h.fake.batches == [["big"], ["b", "c", "d"]]
    assert h.stats[1].closed_by == "time"
    assert h.stats[1].queue_wait_s >= max_wait_s
    # Waiting max_wait_ms again after the forward would put this gap at >= max_wait_s.
    assert h.fake.entered_at[1] - released_at < max_wait_s * 0.8


async def test_run_batch_error_fails_only_that_batch(make: Factory) -> None:
    h = make(FakeForward(fail_on="bad"), max_batch_size=2)

    results = await asyncio.gather(*spawn(h.batcher, "bad", "x", "y", "z"), return_exceptions=True)

    assert h.fake.batches == [["bad", "x"], ["y", "z"]]
    assert results[0] is h.fake.error
    assert results[1] is h.fake.error
    assert list(results[2:]) == ["Y", "Z"]
    assert await h.batcher.submit_many([Item("after"), Item("again")]) == ["AFTER", "AGAIN"]


async def test_wrong_result_count_is_a_runtime_error(make: Factory) -> None:
    h = make(FakeForward(short_once=True), max_batch_size=2)

    with pytest.raises(RuntimeError, match="returned 0 results for a batch of 2 items"):
        await h.batcher.submit_many([Item("a"), Item("b")])

    assert await h.batcher.submit_many([Item("c"), Item("d")]) == ["C", "D"]


async def test_cancelled_items_never_reach_run_batch(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=1)
    running = spawn(h.batcher, "running")
    await h.fake.wait_entered()
    kept1, dropped, kept2 = spawn(h.batcher, "kept1", "dropped", "kept2")
    await until(lambda: h.batcher.queue_depth == 3)

    dropped.cancel()
    await until(lambda: h.batcher.queue_depth == 2)
    h.fake.release.set()

    assert await asyncio.gather(*running, kept1, kept2) == ["RUNNING", "KEPT1", "KEPT2"]
    assert dropped.cancelled()
    assert h.fake.batches == [["running"], ["kept1"], ["kept2"]]


async def test_cancel_while_batch_runs_discards_result(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=1)
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    (task,) = spawn(h.batcher, "gone")
    await h.fake.wait_entered()

    task.cancel()
    await until(task.done)
    h.fake.release.set()

    assert await h.batcher.submit(Item("next")) == "NEXT"
    assert task.cancelled()
    assert h.fake.batches == [["gone"], ["next"]]
    assert loop_errors == []


async def test_cancelled_submit_many_drops_all_unrun_rows(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2)
    (running,) = spawn(h.batcher, "running")  # waits for company up to LONG_WAIT_MS...
    request = asyncio.create_task(h.batcher.submit_many([Item(f"r{i}") for i in range(4)]))
    await h.fake.wait_entered()  # ...which r0 provides: ["running", "r0"] closes by size.
    await until(lambda: h.batcher.queue_depth == 3)

    request.cancel()
    await until(lambda: h.batcher.queue_depth == 0)
    h.fake.release.set()

    assert await running == "RUNNING"
    with pytest.raises(asyncio.CancelledError):
        await request
    assert h.fake.batches == [["running", "r0"]]


async def test_submit_many_returns_results_in_order(make: Factory) -> None:
    h = make(max_batch_size=3, max_wait_ms=1)
    names = [f"n{i}" for i in range(7)]

    assert await h.batcher.submit_many([Item(n) for n in names]) == [n.upper() for n in names]
    assert [s.size for s in h.stats] == [3, 3, 1]
    assert await h.batcher.submit_many([]) == []


async def test_queue_full_raises_overloaded(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=1, max_queue=2)
    spawn(h.batcher, "running")
    await h.fake.wait_entered()
    q1, _q2 = spawn(h.batcher, "q1", "q2")
    await until(lambda: h.batcher.queue_depth == 2)

    with pytest.raises(QueueFullError) as excinfo:
        await h.batcher.submit(Item("q3"))
    assert isinstance(excinfo.value, PtserveError)
    assert excinfo.value.code == "overloaded"
    with pytest.raises(QueueFullError):
        await h.batcher.submit_many([Item("q3")])

    q1.cancel()  # a cancelled caller frees its slot
    await until(lambda: h.batcher.queue_depth == 1)
    (q4,) = spawn(h.batcher, "q4")
    h.fake.release.set()
    assert await q4 == "Q4"


async def test_enqueue_hands_back_futures_in_order_or_queues_nothing(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=4, max_queue=3, max_wait_ms=1)
    spawn(h.batcher, "running")
    await h.fake.wait_entered()
    futures = h.batcher.enqueue([Item("a"), Item("b")])
    assert h.batcher.queue_depth == 2
    with pytest.raises(QueueFullError):
        h.batcher.enqueue([Item("c"), Item("d")])  # two more would pass 3: neither is queued
    assert h.batcher.queue_depth == 2
    futures[0].cancel()  # the caller's future: cancelling it frees the slot
    await until(lambda: h.batcher.queue_depth == 1)
    (c,) = h.batcher.enqueue([Item("c")])
    h.fake.release.set()
    assert [await futures[1], await c] == ["B", "C"]
    assert all("a" not in batch for batch in h.fake.batches)


async def test_stop_with_drain_runs_everything_queued(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_entered()
    queued = spawn(h.batcher, "c", "d", "e")
    await until(lambda: h.batcher.queue_depth == 3)

    stopping = asyncio.create_task(h.batcher.stop(drain=True))
    await asyncio.sleep(0)  # let stop() begin
    with pytest.raises(BatcherClosedError):
        await h.batcher.submit(Item("late"))
    h.fake.release.set()
    await stopping

    assert await first == ["A", "B"]
    assert [await task for task in queued] == ["C", "D", "E"]
    assert h.fake.batches == [["a", "b"], ["c", "d"], ["e"]]
    assert h.stats[-1].closed_by == "drain"
    assert h.batcher.queue_depth == 0


async def test_stop_without_drain_fails_queued_items(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_entered()
    queued = spawn(h.batcher, "c", "d")
    await until(lambda: h.batcher.queue_depth == 2)

    stopping = asyncio.create_task(h.batcher.stop(drain=False))
    await until(lambda: all(task.done() for task in queued))
    h.fake.release.set()
    await stopping

    for task in queued:
        error = task.exception()
        assert isinstance(error, BatcherClosedError)
        assert error.code == "shutting_down"
    assert await first == ["A", "B"]  # the batch already running still delivers
    assert h.fake.batches == [["a", "b"]]


async def test_submit_after_stop_and_before_start_is_refused() -> None:
    batcher: DynamicBatcher[Item, str] = DynamicBatcher(
        FakeForward(), max_batch_size=1, max_batch_tokens=10, max_wait_ms=0, cost=lambda i: i.cost
    )
    with pytest.raises(RuntimeError, match="start"):
        await batcher.submit(Item("early"))
    batcher.start()
    await batcher.stop()

    with pytest.raises(BatcherClosedError):
        await batcher.submit(Item("late"))
    with pytest.raises(BatcherClosedError):
        await batcher.submit_many([Item("late")])


async def test_stop_is_idempotent_and_shuts_down_only_its_own_executor(make: Factory) -> None:
    owned = make(max_wait_ms=0)
    assert await owned.batcher.submit(Item("a")) == "A"
    worker = owned.fake.threads[0]
    await owned.batcher.stop()
    await owned.batcher.stop()
    await owned.batcher.stop(drain=False)
    worker.join(timeout=5)
    assert not worker.is_alive()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as shared:
        borrowed = make(max_wait_ms=0, executor=shared)
        assert await borrowed.batcher.submit(Item("b")) == "B"
        await borrowed.batcher.stop()
        assert shared.submit(lambda: 42).result(timeout=5) == 42


async def test_failing_on_batch_callback_does_not_stop_the_batcher() -> None:
    def on_batch(_stats: BatchStats) -> None:
        raise RuntimeError("metrics are broken")

    batcher: DynamicBatcher[Item, str] = DynamicBatcher(
        FakeForward(),
        max_batch_size=1,
        max_batch_tokens=10,
        max_wait_ms=0,
        cost=lambda i: i.cost,
        on_batch=on_batch,
    )
    batcher.start()
    try:
        assert await batcher.submit(Item("a")) == "A"
        assert await batcher.submit(Item("b")) == "B"
    finally:
        await batcher.stop()


# ------------------------------------------------------------------------------ pipeline_depth > 1


async def test_full_batch_starts_while_another_runs_with_depth_2(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2, pipeline_depth=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_batches(1)
    second = asyncio.create_task(h.batcher.submit_many([Item("c"), Item("d")]))

    # The second full batch enters run_batch while the first is still held there.
    await h.fake.wait_batches(1)
    assert h.batcher.batches_running == 2
    assert h.fake.batches == [["a", "b"], ["c", "d"]]
    assert h.fake.threads[0] is not h.fake.threads[1]
    h.fake.release.set()

    assert await first == ["A", "B"]
    assert await second == ["C", "D"]
    assert [s.closed_by for s in h.stats] == ["size", "size"]


async def test_depth_1_runs_one_batch_at_a_time(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_batches(1)
    second = asyncio.create_task(h.batcher.submit_many([Item("c"), Item("d")]))
    await until(lambda: h.batcher.queue_depth == 2)

    # A full batch is queued, but the only pipeline slot is taken.
    assert h.batcher.batches_running == 1
    assert h.fake.batches == [["a", "b"]]
    h.fake.release.set()
    assert await first == ["A", "B"]
    assert await second == ["C", "D"]


async def test_partial_batch_waits_for_the_running_one_even_past_max_wait(make: Factory) -> None:
    max_wait_s = 0.02
    h = make(FakeForward(hold=True), max_batch_size=2, max_wait_ms=max_wait_s * 1000, pipeline_depth=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_batches(1)
    (late,) = spawn(h.batcher, "c")
    # Deliberately let time pass (not synchronisation): "c" outlives max_wait_ms while "a, b" run.
    await asyncio.sleep(max_wait_s * 5)

    assert h.fake.batches == [["a", "b"]]
    assert h.batcher.queue_depth == 1
    h.fake.release.set()
    assert await first == ["A", "B"]
    assert await late == "C"  # it goes as soon as the slot frees, without waiting max_wait again
    assert h.fake.batches == [["a", "b"], ["c"]]
    assert h.stats[1].closed_by == "time"


async def test_failed_batch_does_not_affect_the_overlapping_one(make: Factory) -> None:
    h = make(FakeForward(hold=True, fail_on="bad"), max_batch_size=2, pipeline_depth=2)
    failing = asyncio.create_task(h.batcher.submit_many([Item("bad"), Item("x")]))
    await h.fake.wait_batches(1)
    good = asyncio.create_task(h.batcher.submit_many([Item("y"), Item("z")]))
    await h.fake.wait_batches(1)
    h.fake.release.set()

    with pytest.raises(ValueError, match="forward failed"):
        await failing
    assert await good == ["Y", "Z"]
    assert await h.batcher.submit_many([Item("after"), Item("again")]) == ["AFTER", "AGAIN"]


@pytest.mark.parametrize("drain", [True, False])
async def test_stop_lets_every_running_batch_deliver(make: Factory, drain: bool) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2, pipeline_depth=2)
    first = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_batches(1)
    second = asyncio.create_task(h.batcher.submit_many([Item("c"), Item("d")]))
    await h.fake.wait_batches(1)
    (queued,) = spawn(h.batcher, "e")
    await until(lambda: h.batcher.queue_depth == 1)

    stopping = asyncio.create_task(h.batcher.stop(drain=drain))
    await asyncio.sleep(0)  # let stop() begin
    h.fake.release.set()
    await stopping

    assert await first == ["A", "B"]
    assert await second == ["C", "D"]
    if drain:
        assert await queued == "E"
        assert h.stats[-1].closed_by == "drain"
    else:
        with pytest.raises(BatcherClosedError):
            await queued
    assert h.batcher.batches_running == 0


async def test_pipeline_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pipeline_depth must be >= 1"):
        DynamicBatcher(
            FakeForward(), max_batch_size=1, max_batch_tokens=10, max_wait_ms=0, cost=len, pipeline_depth=0
        )


async def test_cancelled_collector_fails_running_and_queued_batches(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=2, pipeline_depth=2)
    running = asyncio.create_task(h.batcher.submit_many([Item("a"), Item("b")]))
    await h.fake.wait_batches(1)
    (queued,) = spawn(h.batcher, "c")
    await until(lambda: h.batcher.queue_depth == 1)

    collector = h.batcher._task
    assert collector is not None
    collector.cancel()
    await asyncio.wait({collector})
    h.fake.release.set()

    for task in (running, queued):
        with pytest.raises(BatcherClosedError):
            await task
    assert h.batcher.batches_running == 0


async def test_its_own_forward_threads_carry_their_name_into_proc() -> None:
    """top -H and perf_http tell the forward thread's CPU from the event loop's by this name."""
    names: list[str] = []

    def run_batch(items: list[Item]) -> list[str]:
        names.append(Path("/proc/thread-self/comm").read_text().strip())
        return [i.name for i in items]

    batcher: DynamicBatcher[Item, str] = DynamicBatcher(
        run_batch, max_batch_size=1, max_batch_tokens=10, max_wait_ms=0, cost=lambda i: i.cost
    )
    batcher.start()
    try:
        assert await batcher.submit(Item("a")) == "a"
    finally:
        await batcher.stop()
    assert names == [FORWARD_THREAD] and Path("/proc/thread-self/comm").read_text().strip() != FORWARD_THREAD


async def test_an_item_of_negative_cost_or_no_group_refuses_its_whole_request_before_any_row_is_queued(
    make: Factory,
) -> None:
    def group(item: Item) -> str:
        if item.name == "x":
            raise KeyError("no group")
        return item.name

    h = make(max_wait_ms=0, max_queue=2, fair_group=group)
    with pytest.raises(ValueError, match="cost must be >= 0, got -1"):
        h.batcher.enqueue([Item("a", 1), Item("b", -1)])
    with pytest.raises(KeyError):  # an item whose group cannot be told: the same
        h.batcher.enqueue([Item("a", 1), Item("x", 1)])
    assert h.batcher.queue_depth == 0 and not h.batcher._groups
    assert await h.batcher.submit(Item("c", 1)) == "C"
    assert h.fake.batches == [["c"]]
