"""Dynamic batching: merge items submitted concurrently into batches for one blocking forward function.

The batcher is generic over the item and result types and knows nothing about torch or HTTP. It runs
on one asyncio event loop: callers ``await submit(...)``, a collector task forms batches (oldest
first, optionally grouped by length) and runs them in executor threads, and results are set back on
the loop. With ``pipeline_depth`` 2 a second *full* batch starts while one runs, so its assembly
overlaps the running forward (see ``DynamicBatcher``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.errors import OverloadedError, ShuttingDownError
from service.osnames import name_os_thread

# The forward threads' name, in Python and in Linux (service/osnames.py), so that top -H and
# benchmarks/perf_http.py tell their CPU from the event loop's.
FORWARD_THREAD = "ptserve-forward"

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

_log = logging.getLogger(__name__)


class QueueFullError(OverloadedError):
    """The batcher's queue holds ``max_queue`` items already; retrying later may work."""


class BatcherClosedError(ShuttingDownError):
    """The batcher is stopping or stopped and accepts no more work."""


@dataclass(frozen=True)
class BatchStats:
    """What one ``run_batch`` call did, reported to ``on_batch``."""

    size: int
    padded_tokens: int
    real_tokens: int
    queue_wait_s: float
    run_s: float
    closed_by: str


def group_window(max_batch_size: int) -> int:
    """How many of the oldest queued items length grouping picks from.

    32 batches' worth fills batches with similar lengths (benchmarks/perf_padding.py); capped because
    each batch sorts them (~0.7 ms per 1,024).
    """
    return min(32 * max_batch_size, 1024)


def choose_group(costs: Sequence[int], max_size: int, max_tokens: int) -> tuple[list[int], bool]:
    """Which of a window of queued items (``costs`` in queue order, index 0 the oldest) form the batch.

    The oldest item always goes. Among the runs of up to ``max_size`` items in length order that
    contain it, the one with the most items, then the least padding, is taken, trimmed from its long
    end (never the oldest) until ``len(run) * longest`` fits ``max_tokens``. Returns the chosen
    indices in length order and whether trimming cut the batch. Pure, so benchmarks replay exactly
    the service's rule.
    """
    order = sorted(range(len(costs)), key=costs.__getitem__)  # stable: equal lengths stay oldest first
    at = order.index(0)
    size = min(max_size, len(order))
    first, last = max(0, at - size + 1), min(at, len(order) - size)  # the runs' possible starts
    # Runs that fit the budget untrimmed (most of them) are scored from prefix sums over the costs
    # they can reach: a window of 1,024 would otherwise sum up to 64 runs of 64 costs per batch.
    reach = [costs[i] for i in order[first : last + size]]
    prefix = list(itertools.accumulate(reach, initial=0))
    best, best_key, trimmed = [0], (0, 0.0), False
    best_start = -1
    for start in range(first, last + 1):
        offset = start - first
        longest = reach[offset + size - 1]
        if size == 1 or size * longest <= max_tokens:
            key = (size, (prefix[offset + size] - prefix[offset]) / max(1, size * longest))
            if key > best_key:
                best_start, best_key, trimmed = start, key, False
            continue
        run = order[start : start + size]
        while len(run) > 1 and len(run) * costs[run[-1]] > max_tokens:
            run.remove(run[-1] if run[-1] != 0 else run[-2])
        key = (len(run), sum(costs[i] for i in run) / max(1, len(run) * costs[run[-1]]))
        if key > best_key:
            best, best_start, best_key, trimmed = run, -1, key, True
    if best_start >= 0:
        best = order[best_start : best_start + size]
    return best, trimmed


class _Entry(Generic[ItemT, ResultT]):
    """One queued item; compared by identity so ``list.remove`` finds exactly this one."""

    __slots__ = ("cost", "enqueued_at", "future", "gone", "group", "item", "seq")

    def __init__(
        self,
        item: ItemT,
        cost: int,
        future: asyncio.Future[ResultT],
        enqueued_at: float,
        group: str = "",
        seq: int = 0,
    ) -> None:
        self.item = item
        self.cost = cost
        self.future = future
        self.enqueued_at = enqueued_at
        self.group = group
        self.seq = seq  # arrival order (items queued in one turn share enqueued_at)
        self.gone = False  # counted out of the queue: taken into a batch, cancelled or failed


_COST = operator.attrgetter("cost")
_GONE = operator.attrgetter("gone")
_SEQ = operator.attrgetter("seq")
_FIRST = operator.itemgetter(0)


def round_robin_counts(lengths: Sequence[int], limit: int) -> list[int]:
    """How many of each group's oldest entries the first ``limit`` entries of the round robin over
    groups hold (``lengths``: each group's queued entries, in the round robin's group order)."""
    if sum(lengths) <= limit:
        return list(lengths)
    used = ranks = 0
    groups = len(lengths)
    for exhausted, length in enumerate(sorted(lengths)):
        active = groups - exhausted  # groups with at least `length` entries
        if used + (length - ranks) * active >= limit:
            full = (limit - used) // active
            ranks, used = ranks + full, used + full * active
            break
        used, ranks = used + (length - ranks) * active, length
    counts = list(map(min, lengths, itertools.repeat(ranks)))
    extra = limit - used  # a last, partial rank: the first groups (in order) that still have entries
    for group, length in enumerate(lengths):
        if not extra:
            break
        if length > ranks:
            counts[group] += 1
            extra -= 1
    return counts


# What the worker thread hands back: results or the error run_batch raised, and its wall time.
_Outcome = tuple[list[ResultT] | None, Exception | None, float]


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Collects items from many coroutines into batches and runs them through one blocking function.

    A batch closes when it holds ``max_batch_size`` rows, when the next item would push its padded
    size (rows x longest cost) over ``max_batch_tokens``, or ``max_wait_ms`` after its oldest item was
    queued. ``on_batch`` is called after every batch, failed ones included.

    Up to ``pipeline_depth`` batches run at once, each in its own executor thread. Only the first
    may close by time: while one runs, the next starts only when it is full (size or token budget).
    A partial batch started early would take rows that, a forward later, would have filled it, and
    on a GPU a forward of a few rows costs nearly what a full one does; so overlap is used only when
    the queue is deep enough that it costs no batch size. Results never depend on the depth.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], list[ResultT]],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        cost: Callable[[ItemT], int],
        executor: concurrent.futures.Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        max_queue: int | None = None,
        group_window: int | None = None,
        pipeline_depth: int = 1,
        fair_group: Callable[[ItemT], str] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if group_window is not None and group_window < 1:
            raise ValueError(f"group_window must be >= 1 or None, got {group_window}")
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {pipeline_depth}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._max_wait_s = max_wait_ms / 1000.0
        self._cost = cost
        self._on_batch = on_batch
        self._max_queue = max_queue
        self._group_window = group_window
        self._pipeline_depth = pipeline_depth
        # Fairness between groups (tenants): while rows of several groups wait, batches take them in
        # round robin (each group's oldest first), so one group's deep queue cannot make another's
        # rows wait behind all of it. With one group queued, batches form exactly as without it.
        self._fair_group = fair_group
        self._owns_executor = executor is None
        self._executor: concurrent.futures.Executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=pipeline_depth,
            thread_name_prefix=FORWARD_THREAD,
            initializer=name_os_thread,
            initargs=(FORWARD_THREAD,),
        )
        self._running: set[asyncio.Task[None]] = set()
        # The queue: each group's entries in arrival order (one group, "", without fair_group). A
        # batch reads only the first entries of each (the grouping window, or a batch's worth) and
        # takes its rows out of those with one slice assignment per group: nothing per batch grows
        # with the queue. Rebuilding a window or a round robin over the whole queue for every batch
        # was most of the engine loop's work per row once thousands of rows waited (perf_loop.py).
        # A row cancelled in the turn the collector looks may still be here, done: it is dropped
        # before a batch could count it (see _next_batch).
        self._groups: dict[str, list[_Entry[ItemT, ResultT]]] = {}
        self._depth = 0  # entries queued and not yet counted out (gone)
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batches that are running)."""
        return self._depth

    @property
    def batches_running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        """Start the collector task; call from the event loop that will call ``submit``."""
        if self._task is not None:
            raise RuntimeError("DynamicBatcher.start() was called twice")
        if self._closed:
            raise BatcherClosedError("the batcher was stopped and cannot be restarted")
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._collect(), name="ptserve-batcher")

    async def stop(self, *, drain: bool = True) -> None:
        """Stop accepting work; run (``drain=True``) or fail (``drain=False``) what is queued.

        Batches already running always finish and deliver their results. Safe to call repeatedly.
        """
        self._closed = True
        if not drain:
            self._fail_queued(BatcherClosedError("the service is shutting down"))
        self._wakeup.set()
        task = self._task
        if task is not None and not task.done():
            # asyncio.wait, not await task: cancelling stop() must not cancel the collector.
            await asyncio.wait({task})
        if task is not None and not task.cancelled() and task.exception() is not None:
            _log.error("batcher collector task crashed", exc_info=task.exception())
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: ItemT) -> ResultT:
        """Queue one item and wait for its result."""
        (future,) = self.enqueue([item])
        return await future

    async def submit_many(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Queue all rows of one request and wait for their results, in order.

        If the caller is cancelled or one row fails, the rows that have not run yet are dropped.
        """
        if not items:
            return []
        futures = self.enqueue(items)
        try:
            if len(futures) == 1:  # most requests: no gathering future, one wake-up fewer
                return [await futures[0]]
            return await asyncio.gather(*futures)
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def enqueue(self, items: Sequence[ItemT]) -> list[asyncio.Future[ResultT]]:
        """Queue ``items`` now and return their futures, in order (what ``submit_many`` awaits), for a
        caller that reacts to results in callbacks instead of a coroutine per request. Raises as
        ``submit_many`` does, before any item is queued; cancelling a future drops its row if it has
        not run yet. Call on the batcher's event loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("DynamicBatcher.start() has not been called")
        if self._closed or self._task is None or self._task.done():
            raise BatcherClosedError("the service is shutting down")
        # Costs and groups first, so a bad item rejects the whole request before any row is queued.
        costs = list(map(self._cost, items))
        if costs and min(costs) < 0:
            raise ValueError(f"an item's cost must be >= 0, got {min(costs)}")
        fair_group = self._fair_group
        groups_of = [""] * len(items) if fair_group is None else list(map(fair_group, items))
        queued = self.queue_depth
        if self._max_queue is not None and queued + len(items) > self._max_queue:
            raise QueueFullError(
                f"the server is overloaded: {queued} items are queued (limit {self._max_queue})"
            )
        now = loop.time()
        futures: list[asyncio.Future[ResultT]] = []
        groups = self._groups
        for item, cost, group in zip(items, costs, groups_of, strict=True):
            future: asyncio.Future[ResultT] = loop.create_future()
            entry = _Entry(item, cost, future, now, group, next(self._seq))
            future.add_done_callback(self._make_forget(entry))
            members = groups.get(group)
            if members is None:
                groups[group] = [entry]
            else:
                members.append(entry)
            futures.append(future)
        self._depth += len(futures)
        self._wakeup.set()
        return futures

    def _make_forget(self, entry: _Entry[ItemT, ResultT]) -> Callable[[asyncio.Future[ResultT]], None]:
        def forget(future: asyncio.Future[ResultT]) -> None:
            # A cancelled caller frees its queue slot at once, so queue_depth and max_queue stay honest.
            # A gone entry was taken into a batch, or failed by stop(), already.
            # An entry not gone is in its group's list: rows are counted out before they leave it.
            if future.cancelled() and not entry.gone:
                members = self._groups[entry.group]
                members.remove(entry)
                if not members:
                    del self._groups[entry.group]
                self._dequeued([entry])

        return forget

    def _fail_queued(self, error: Exception) -> None:
        entries = [entry for members in self._groups.values() for entry in members if not entry.gone]
        self._groups.clear()
        self._dequeued(entries)
        self._fail(entries, error)

    def _dequeued(self, entries: Iterable[_Entry[ItemT, ResultT]]) -> None:
        """Count ``entries`` out of the queue, each once (the caller takes them out of their group)."""
        for entry in entries:
            if not entry.gone:
                entry.gone = True
                self._depth -= 1

    def _fronts(self) -> list[list[_Entry[ItemT, ResultT]]]:
        """The groups with queued rows (none is ever left empty), in the order of their oldest row.
        A row cancelled in this turn, before its callback ran, still orders its group: the race is
        one turn wide and the batch it might change is dropped and formed again if it took the row."""
        fronts = list(self._groups.values())
        if len(fronts) > 1:
            oldest = list(map(_SEQ, map(_FIRST, fronts)))
            fronts = list(map(fronts.__getitem__, sorted(range(len(fronts)), key=oldest.__getitem__)))
        return fronts

    @staticmethod
    def _window(
        fronts: list[list[_Entry[ItemT, ResultT]]], limit: int
    ) -> tuple[list[_Entry[ItemT, ResultT]], list[int]]:
        """The first ``limit`` queued rows in round robin over ``fronts`` (each group's oldest rows
        first, groups in order: one group's deep queue cannot make another's rows wait behind all of
        it; with one group, the queue order), and how many rows of each group that is. Built from
        slices, so its cost is the window's size whatever the queue holds."""
        if len(fronts) == 1:
            head = fronts[0][:limit]
            return head, [len(head)]
        if len(fronts) >= limit:  # many groups: the oldest row of each of the first `limit`
            return list(map(_FIRST, fronts[:limit])), [1] * limit + [0] * (len(fronts) - limit)
        counts = round_robin_counts(list(map(len, fronts)), limit)
        window: list[_Entry[ItemT, ResultT]] = []
        done = 0
        for rank in sorted(set(counts)):  # ranks done..rank-1 hold one row of each group that reaches rank
            if rank == 0:
                continue
            active = [members for members, count in zip(fronts, counts, strict=True) if count >= rank]
            width = len(active)
            block: list[_Entry[ItemT, ResultT]] = [fronts[0][0]] * (width * (rank - done))
            for column, members in enumerate(active):
                block[column::width] = members[done:rank]
            window.extend(block)
            done = rank
        return window, counts

    @staticmethod
    def _fail(entries: Sequence[_Entry[ItemT, ResultT]], error: Exception) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if len(self._running) >= self._pipeline_depth:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                formed = await self._next_batch()
                if formed is None:
                    break
                task = loop.create_task(self._run(*formed), name="ptserve-batch")
                self._running.add(task)
                task.add_done_callback(self._batch_done)
        except asyncio.CancelledError:
            for task in self._running:
                task.cancel()  # each fails its own batch (see _run)
            raise
        finally:
            # However the loop ended (stop, cancellation, a bug), nobody may be left waiting forever;
            # batches already running finish and deliver (or fail, if cancelled just above).
            self._closed = True
            self._fail_queued(BatcherClosedError("the service is shutting down"))
            if self._running:
                await asyncio.wait(list(self._running))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("a batch task crashed", exc_info=task.exception())
        # A free pipeline slot lets a partial batch close (see _next_batch); wake the collector.
        self._wakeup.set()

    async def _next_batch(self) -> tuple[list[_Entry[ItemT, ResultT]], str] | None:
        """Wait until a batch can close, take it off the queue; ``None`` once stopped and empty."""
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before looking, so a submit that lands while we wait below still wakes us.
            self._wakeup.clear()
            fronts = self._fronts()
            if not fronts:
                if self._closed:
                    return None
                await self._wakeup.wait()
                continue
            window, counts = self._window(fronts, self._group_window or self._max_batch_size)
            if self._group_window is None:
                taken, closed_by = self._scan(window)
                picked: list[int] | None = None
            else:
                taken, picked, closed_by = self._scan_grouped(window)
            # A row cancelled in this turn, before its forget callback ran, may still be in the window:
            # skipped by the scan, in a grouped batch, or, for a partial batch, perhaps what trimming
            # cut (closing it early, as "tokens") or a candidate's place. Drop the done rows now
            # (counted here; forget will not count them again) and look again. A full batch of live
            # rows stands, though a done row may have held a window slot (checking the whole window
            # on every batch would cost about 1 µs a row; the race is one turn wide).
            stale = any(entry.future.done() for entry in taken)
            if not stale and closed_by != "size":
                stale = any(entry.future.done() for entry in window)
            if stale:
                self._drop_done(fronts, counts)
                continue
            if closed_by is None and self._running:
                # Another batch is running: only a full batch may overlap it (see the class docstring).
                # A batch finishing sets _wakeup, and this one is formed again without the restriction.
                await self._wakeup.wait()
                continue
            if closed_by is None:
                if self._closed:
                    closed_by = "drain"
                else:
                    # Measured from when the oldest item was queued, so items that queued behind a
                    # running batch for max_wait_ms already go as soon as it finishes.
                    deadline = min(e.enqueued_at for e in taken) + self._max_wait_s
                    if loop.time() < deadline:
                        try:
                            async with asyncio.timeout_at(deadline):
                                await self._wakeup.wait()
                        except TimeoutError:
                            pass
                        continue
                    closed_by = "time"
            self._take(fronts, counts, taken, picked)
            return taken, closed_by

    def _take(
        self,
        fronts: list[list[_Entry[ItemT, ResultT]]],
        counts: list[int],
        taken: list[_Entry[ItemT, ResultT]],
        picked: list[int] | None,
    ) -> None:
        """Take ``taken`` out of the queue: each group it came from keeps the rest of the rows the window
        read of it, in order, with one slice assignment (groups it did not touch are not visited)."""
        self._dequeued(taken)
        touched = {entry.group for entry in taken}
        if len(fronts) == 1 and picked is not None:  # one group: window index == position in it
            members, keep = fronts[0], [True] * counts[0]
            for index in picked:
                keep[index] = False
            members[: counts[0]] = itertools.compress(members[: counts[0]], keep)
        else:
            read = max(counts)  # no group had more of its rows in the window
            for group in touched:
                members = self._groups[group]
                members[:read] = itertools.filterfalse(_GONE, members[:read])
        for group in touched:
            if not self._groups[group]:
                del self._groups[group]

    def _drop_done(self, fronts: list[list[_Entry[ItemT, ResultT]]], counts: list[int]) -> None:
        """Count out and drop the done rows (cancelled before their callbacks ran) of the part of each
        group the window read; those further back are their callbacks' to drop."""
        for members, count in zip(fronts, counts, strict=True):
            done = [entry for entry in members[:count] if entry.future.done()]
            if done:
                self._dequeued(done)
                members[:count] = itertools.filterfalse(_GONE, members[:count])
                if not members:
                    del self._groups[done[0].group]

    def _scan(
        self, entries: Iterable[_Entry[ItemT, ResultT]]
    ) -> tuple[list[_Entry[ItemT, ResultT]], str | None]:
        """The batch the head of ``entries`` (the window, in queue or round-robin order) would form
        now, and why it closed. ``None`` as the reason means the batch could still take more items.
        """
        taken: list[_Entry[ItemT, ResultT]] = []
        longest = 0
        for entry in entries:
            if entry.future.done():
                continue  # cancelled in this turn: _next_batch drops it
            wider = max(longest, entry.cost)
            # The first item always fits, so one item over budget still runs, alone.
            if taken and (len(taken) + 1) * wider > self._max_batch_tokens:
                return taken, "tokens"
            taken.append(entry)
            longest = wider
            if len(taken) == self._max_batch_size:
                return taken, "size"
        return taken, None

    def _scan_grouped(
        self, window: Sequence[_Entry[ItemT, ResultT]]
    ) -> tuple[list[_Entry[ItemT, ResultT]], list[int], str | None]:
        """Like ``_scan``, but fills the batch with queued items of lengths close to the oldest one.

        ``window``: the first ``group_window`` items in queue (or round-robin) order, the only
        candidates. The oldest item always goes, so no item waits behind more than a window's
        worth of others. Among the runs of up to ``max_batch_size`` candidates in length order that
        contain it, the one with the least padding is taken (trimmed from its long end to the token
        budget). Returns the batch, its indices in ``window`` and why it closed (as ``_scan``).
        """
        chosen, trimmed = choose_group(list(map(_COST, window)), self._max_batch_size, self._max_batch_tokens)
        best = [window[i] for i in chosen]
        if len(best) == self._max_batch_size:
            return best, chosen, "size"
        return best, chosen, "tokens" if trimmed else None

    async def _run(self, batch: list[_Entry[ItemT, ResultT]], closed_by: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        items = [entry.item for entry in batch]
        results: list[ResultT] | None
        error: Exception | None
        try:
            results, error, run_s = await loop.run_in_executor(self._executor, self._run_timed, items)
        except asyncio.CancelledError:
            self._fail(batch, BatcherClosedError("the service shut down while this request was running"))
            raise
        except Exception as exc:  # the executor itself failed, e.g. it was shut down under us
            results, error, run_s = None, exc, loop.time() - started
        if error is None and results is not None and len(results) != len(batch):
            error = RuntimeError(
                f"run_batch returned {len(results)} results for a batch of {len(batch)} items"
            )
        if error is not None or results is None:
            self._fail(batch, error or RuntimeError("run_batch returned no results"))
        else:
            for entry, result in zip(batch, results, strict=True):
                # The caller may have been cancelled while the batch ran; its result is just dropped.
                if not entry.future.done():
                    entry.future.set_result(result)
        if self._on_batch is not None:
            costs = [entry.cost for entry in batch]
            stats = BatchStats(
                size=len(batch),
                padded_tokens=len(batch) * max(costs),
                real_tokens=sum(costs),
                queue_wait_s=max(started - entry.enqueued_at for entry in batch),
                run_s=run_s,
                closed_by=closed_by,
            )
            try:
                self._on_batch(stats)
            except Exception:
                _log.exception("on_batch callback failed")

    def _run_timed(self, items: list[ItemT]) -> _Outcome[ResultT]:
        # Errors travel back as values: asyncio futures cannot carry StopIteration, and timing a
        # failed forward is still useful to on_batch.
        t0 = time.perf_counter()
        try:
            results = self._run_batch(items)
        except StopIteration as exc:
            error = RuntimeError("run_batch raised StopIteration")
            error.__cause__ = exc
            return None, error, time.perf_counter() - t0
        except Exception as exc:
            return None, exc, time.perf_counter() - t0
        return results, None, time.perf_counter() - t0
