"""Length-aware grouping in DynamicBatcher (the service turns it on with ``length_grouping``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from service.batcher import DynamicBatcher, choose_group
from tests.service import test_batcher as base
from tests.service.test_batcher import Factory, FakeForward, Harness, Item, until

make = base.make  # the same fixture as the FIFO tests


async def _queue_behind_a_running_batch(
    h: Harness, size: int, costs: dict[str, int]
) -> list[asyncio.Task[str]]:
    """Fill and hold a first batch of ``size`` unit items, then queue ``costs`` behind it."""
    batcher: DynamicBatcher[Item, str] = h.batcher
    first = asyncio.create_task(batcher.submit_many([Item(f"f{i}", 1) for i in range(size)]))
    await h.fake.wait_entered()
    queued = [asyncio.create_task(batcher.submit(Item(n, c))) for n, c in costs.items()]
    await until(lambda: batcher.queue_depth == len(costs))
    h.fake.release.set()
    await batcher.stop(drain=True)
    assert len(await first) == size
    return queued


async def test_companions_of_the_oldest_item_have_similar_lengths(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=3, group_window=12)
    costs = {"s1": 5, "l1": 60, "s2": 6, "l2": 58, "s3": 4, "l3": 61, "m1": 30}
    tasks = await _queue_behind_a_running_batch(h, 3, costs)
    assert [await t for t in tasks] == [n.upper() for n in costs]
    # The oldest queued item always goes, with the run of neighbours in length order that pads least.
    assert [sorted(b) for b in h.fake.batches[1:]] == [["s1", "s2", "s3"], ["l1", "l2", "l3"], ["m1"]]
    assert [s.closed_by for s in h.stats] == ["size", "size", "size", "drain"]


async def test_grouping_respects_the_token_budget_and_skips_what_does_not_fit(make: Factory) -> None:
    h = make(FakeForward(hold=True), max_batch_size=8, max_batch_tokens=40, group_window=16)
    costs = {"a": 10, "b": 30, "c": 10, "d": 9, "e": 11}
    tasks = await _queue_behind_a_running_batch(h, 8, costs)
    assert len([await t for t in tasks]) == 5
    # With a, c, d taken (3 x 10), "e" would make 4 x 11 > 40 and "b" 4 x 30: both are skipped,
    # not dropped, and lead later batches.
    assert [sorted(b) for b in h.fake.batches[1:]] == [["a", "c", "d"], ["b"], ["e"]]
    assert [s.closed_by for s in h.stats[1:]] == ["tokens", "tokens", "drain"]
    assert all(s.padded_tokens <= 40 for s in h.stats)


async def test_grouping_lowers_padding_on_a_mixed_length_queue(make: Factory) -> None:
    rng = random.Random(0)
    # Two populations of text lengths, interleaved in arrival order (short questions, long reviews).
    costs = {f"r{i}": rng.choice([rng.randint(20, 28), rng.randint(50, 60)]) for i in range(96)}
    results = {}
    for window in (None, 64):
        h = make(FakeForward(hold=True), max_batch_size=16, group_window=window)
        tasks = await _queue_behind_a_running_batch(h, 16, costs)
        assert len([await t for t in tasks]) == 96
        stats = h.stats[1:]
        assert sum(s.size for s in stats) == 96
        results[window] = sum(s.real_tokens for s in stats) / sum(s.padded_tokens for s in stats)
    assert results[64] > 0.85 and results[None] < 0.8, results


async def test_the_wait_deadline_counts_from_the_oldest_item_not_the_shortest(make: Factory) -> None:
    h = make(FakeForward(), max_batch_size=8, max_wait_ms=60_000, group_window=16)
    old = asyncio.create_task(h.batcher.submit(Item("old-long", 50)))
    await until(lambda: h.batcher.queue_depth == 1)
    young = asyncio.create_task(h.batcher.submit(Item("young-short", 5)))
    await until(lambda: h.batcher.queue_depth == 2)
    # White-box: the long item now looks a minute old, so its max_wait has long passed. The
    # grouped batch lists the short item first; the deadline must still come from the old one.
    h.batcher._groups[""][0].enqueued_at -= 61.0
    h.batcher._wakeup.set()
    async with asyncio.timeout(5):
        assert await old == "OLD-LONG" and await young == "YOUNG-SHORT"
    assert h.fake.batches == [["young-short", "old-long"]]
    assert [s.closed_by for s in h.stats] == ["time"]


def test_choose_group_takes_the_oldest_and_its_closest_lengths() -> None:
    # Index 0 is the oldest (length 20); the run of 3 around it in length order with least padding.
    chosen, trimmed = choose_group([20, 5, 21, 60, 19, 6], max_size=3, max_tokens=1000)
    assert sorted(chosen) == [0, 2, 4] and not trimmed
    # A window smaller than the batch: everything goes.
    assert sorted(choose_group([7, 3], max_size=8, max_tokens=1000)[0]) == [0, 1]


def test_choose_group_trims_the_long_end_to_the_token_budget_but_keeps_the_oldest() -> None:
    # The oldest is the longest: the others are dropped before it, down to what the budget holds.
    # Length order 10, 12, 14, 30: dropping 14 then 12 leaves 2 rows x 30 tokens = the budget.
    chosen, trimmed = choose_group([30, 10, 12, 14], max_size=4, max_tokens=60)
    assert sorted(chosen) == [0, 1] and trimmed
    # One item over the budget still runs, alone.
    assert choose_group([500, 4], max_size=2, max_tokens=100) == ([0], True)


async def test_a_row_cancelled_in_the_grouping_window_leaves_it(make: Factory) -> None:
    """Two rows wait in the window for a third; one is cancelled (its slot freed at once), and the
    batch that closes holds the other and the next two."""
    h = make(max_batch_size=3, group_window=8)
    looks: list[int] = []
    window = h.batcher._window
    h.batcher._window = lambda *args: (looks.append(len(args[0][0])), window(*args))[1]  # type: ignore[method-assign]
    a, b = h.batcher.enqueue([Item("a", 5), Item("b", 5)])
    await until(lambda: looks == [2])  # the collector read both into its window and waits for more
    b.cancel()
    await until(lambda: h.batcher.queue_depth == 1)
    c, d = h.batcher.enqueue([Item("c", 5), Item("d", 5)])

    assert await asyncio.gather(a, c, d) == ["A", "C", "D"]
    assert h.fake.batches == [["a", "c", "d"]]
    assert b.cancelled() and h.batcher.queue_depth == 0


async def test_a_row_cancelled_after_the_collector_was_woken_is_left_out(make: Factory) -> None:
    """The collector is woken by new rows, then a queued row is cancelled in the same turn: the
    collector reads the window before the cancelled row's own callback runs, leaves it out of the
    batch, and the count of queued rows stays right (it is not taken off twice)."""
    h = make(max_batch_size=3, group_window=8)
    drops: list[int] = []
    drop = h.batcher._drop_done
    h.batcher._drop_done = lambda *args: (drops.append(1), drop(*args))[1]  # type: ignore[method-assign]
    await until(lambda: h.batcher._task is not None and h.batcher._wakeup._waiters)  # the collector waits
    a, b, c, d = h.batcher.enqueue([Item("a", 5), Item("b", 5), Item("c", 5), Item("d", 5)])
    b.cancel()  # its forget callback runs after the collector's wake-up, queued before it

    assert await asyncio.gather(a, c, d) == ["A", "C", "D"]
    assert h.fake.batches == [["a", "c", "d"]]
    assert b.cancelled() and h.batcher.queue_depth == 0
    assert drops == [1]  # the window was read with the cancelled row in it
    assert await h.batcher.submit_many([Item("e", 5), Item("f", 5), Item("g", 5)]) == ["E", "F", "G"]
    assert h.batcher.queue_depth == 0 and not h.batcher._groups


async def test_a_long_row_cancelled_in_the_turn_the_collector_wakes_does_not_close_a_partial_batch(
    make: Factory,
) -> None:
    """A short and a long row arrive together and the long one is cancelled at once, before its own
    callback ran. Trimming the dead long row off the run must not count as the token budget closing
    the batch: the short row waits for company (or its wait) as if the long one had never come."""
    h = make(max_batch_size=4, max_batch_tokens=50, group_window=8)
    await until(lambda: h.batcher._task is not None and h.batcher._wakeup._waiters)  # the collector waits
    short, long = h.batcher.enqueue([Item("short", 5), Item("long", 100)])
    long.cancel()
    await until(lambda: h.batcher.queue_depth == 1)
    rest = h.batcher.enqueue([Item("c", 5), Item("d", 5), Item("e", 5)])

    assert await asyncio.gather(short, *rest) == ["SHORT", "C", "D", "E"]
    assert h.fake.batches == [["short", "c", "d", "e"]]
    assert [s.closed_by for s in h.stats] == ["size"]


def reference_choose_group(costs: list[int], max_size: int, max_tokens: int) -> tuple[list[int], bool]:
    """The rule as first written (every run summed): what the prefix-sum version must equal."""
    order = sorted(range(len(costs)), key=lambda i: costs[i])
    at = order.index(0)
    size = min(max_size, len(order))
    best, best_key, trimmed = [0], (0, 0.0), False
    for start in range(max(0, at - size + 1), min(at, len(order) - size) + 1):
        run = order[start : start + size]
        cut = False
        while len(run) > 1 and len(run) * costs[run[-1]] > max_tokens:
            run.remove(run[-1] if run[-1] != 0 else run[-2])
            cut = True
        key = (len(run), sum(costs[i] for i in run) / max(1, len(run) * costs[run[-1]]))
        if key > best_key:
            best, best_key, trimmed = run, key, cut
    return best, trimmed


def test_choose_group_equals_the_rule_summed_run_by_run() -> None:
    """Windows of random lengths (ties, budgets that trim some runs and not others, batches wider
    than the window): the same indices, in the same order, and the same trimmed flag."""
    rng = random.Random(7)
    trimmed_seen = untrimmed_seen = 0
    for _ in range(3000):
        window = rng.choice([1, 2, 5, 40, 300])
        costs = [rng.randint(0, 6) if rng.random() < 0.3 else rng.randint(1, 120) for _ in range(window)]
        max_size = rng.choice([1, 4, 16, 64])
        max_tokens = rng.choice([50, 400, 2000, 100_000])
        got = choose_group(costs, max_size, max_tokens)
        assert got == reference_choose_group(costs, max_size, max_tokens), (costs, max_size, max_tokens)
        trimmed_seen += got[1]
        untrimmed_seen += not got[1]
    assert trimmed_seen > 300 and untrimmed_seen > 300


async def test_rows_of_several_groups_share_batches_in_round_robin() -> None:
    """One group's deep queue does not make another group's rows wait behind all of it."""
    from service.batcher import DynamicBatcher

    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        seen.append(items)
        return items

    batcher: DynamicBatcher[str, str] = DynamicBatcher(
        run, max_batch_size=4, max_batch_tokens=1000, max_wait_ms=0, cost=len, fair_group=lambda s: s[0]
    )
    # Queued before the collector runs: 12 rows of group "a", then 2 of group "b", then 1 of "c".
    batcher.start()
    flood = [f"a{i:02d}" for i in range(12)]
    submitted = [batcher.submit_many(flood), batcher.submit_many(["b0", "b1"]), batcher.submit_many(["c0"])]
    results = await asyncio.gather(*submitted)
    await batcher.stop()
    assert results == [flood, ["b0", "b1"], ["c0"]]
    # The first batch already holds the oldest row of every group, in round robin.
    assert seen[0] == ["a00", "b0", "c0", "a01"]
    assert seen[1] == ["a02", "b1", "a03", "a04"]  # each group in the order of its oldest row
    # Once one group is left, batches are its rows in queue order, as without fairness.
    assert [row for batch in seen[2:] for row in batch] == flood[5:]
    assert batcher._groups == {} and batcher.queue_depth == 0


def reference_round_robin(groups: list[list[str]], limit: int) -> list[str]:
    """The fair view as first written: every group's rank-th row, rank by rank, cut at ``limit``."""
    view = [rows[rank] for rank in range(max(map(len, groups))) for rows in groups if rank < len(rows)]
    return view[:limit]


def test_the_window_reads_the_round_robin_from_slices() -> None:
    """The window built from per-group slices equals the round robin read rank by rank, for group
    sizes that exhaust at every point of the limit, and counts say how many rows of each it holds."""
    rng = random.Random(3)
    for _ in range(2000):
        sizes = [rng.choice([1, 2, 3, 7, 40, 300]) for _ in range(rng.randint(2, 9))]
        groups = [[f"g{g}r{r}" for r in range(size)] for g, size in enumerate(sizes)]
        limit = rng.choice([1, 3, 16, 64, 1024])
        window, counts = DynamicBatcher._window(groups, limit)  # type: ignore[arg-type]
        assert window == reference_round_robin(groups, limit), (sizes, limit)
        assert counts == [sum(row.startswith(f"g{g}r") for row in window) for g in range(len(sizes))]


@pytest.mark.parametrize("grouped", [True, False])
async def test_fair_batches_equal_the_rule_on_the_live_queue(grouped: bool) -> None:
    """Random arrivals of four groups with random lengths, rows cancelled at random (some in the very
    turn the collector looks, before their own callbacks ran), batches running while more arrive:
    the group queues hold exactly the rows queued (as the test counts them), and every batch is what
    the first rule (round robin over them read rank by rank, then the grouping window or the FIFO
    scan) picks; every live row runs exactly once and no cancelled one runs; the counts end at zero.
    A row cancelled in the turn the collector looks, before its callback ran, is still in its queue
    and may hold a window slot of a batch that fills without it (never a place in one): the rule
    below keeps such rows where they are, so the comparison is exact whatever the interleaving."""
    rng = random.Random(11 if grouped else 12)
    size, tokens, window = 8, 400, 24
    looks: list[tuple[list[list[tuple[Item, bool]]], list[str], set[str]]] = []
    pending: set[str] = set()  # enqueued, not taken, not cancelled: counted by the test itself

    batcher: DynamicBatcher[Item, str] = DynamicBatcher(
        lambda items: [item.name for item in items],
        max_batch_size=size,
        max_batch_tokens=tokens,
        max_wait_ms=0,
        cost=lambda item: item.cost,
        group_window=window if grouped else None,
        pipeline_depth=2,
        fair_group=lambda item: item.name[0],
    )
    take = batcher._take

    def recording_take(fronts: Any, counts: Any, taken: Any, picked: Any) -> None:
        queues = sorted(batcher._groups.values(), key=lambda members: members[0].seq)
        snapshot = [[(e.item, e.future.done()) for e in members] for members in queues]
        assert not any(e.gone for members in queues for e in members)
        looks.append((snapshot, [e.item.name for e in taken], set(pending)))
        pending.difference_update(e.item.name for e in taken)
        take(fronts, counts, taken, picked)

    batcher._take = recording_take  # type: ignore[method-assign]
    batcher.start()
    futures: dict[str, asyncio.Future[str]] = {}
    cancelled: set[str] = set()
    for step in range(300):
        items = [
            Item(f"{rng.choice('abcd')}{step}-{i}", rng.choice([rng.randint(1, 12), rng.randint(30, 90)]))
            for i in range(rng.choice([1, 1, 2, 5, 20]))
        ]
        futures.update(zip((item.name for item in items), batcher.enqueue(items), strict=True))
        pending.update(item.name for item in items)
        for name, future in rng.sample(sorted(futures.items()), min(2, len(futures))):
            if not future.done() and rng.random() < 0.3:
                future.cancel()
                if name in pending:  # a row cancelled while its batch runs has run all the same
                    cancelled.add(name)
                    pending.discard(name)
        # Random interleavings of arrivals, cancellations and the collector (not a wait for anything).
        for _ in range(rng.choice([0, 0, 1, 3])):
            await asyncio.sleep(0)
    await batcher.stop(drain=True)

    ran = [name for _, taken, _ in looks for name in taken]
    assert len(ran) == len(set(ran)) == len(futures) - len(cancelled)
    assert set(ran) == set(futures) - cancelled
    assert all(futures[name].result() == name for name in ran if not futures[name].cancelled())
    assert batcher.queue_depth == 0 and not batcher._groups
    several = 0
    for queues, taken, queued in looks:
        assert {item.name for rows in queues for item, done in rows if not done} == queued
        several += len(queues) > 1
        view = [rows[rank] for rank in range(max(map(len, queues))) for rows in queues if rank < len(rows)]
        if grouped:
            chosen, _ = choose_group([item.cost for item, _ in view[:window]], size, tokens)
            expected = [view[i][0].name for i in chosen]
        else:
            expected, longest = [], 0
            for item, done in view[:size]:
                if done:
                    continue
                longest = max(longest, item.cost)
                if expected and (len(expected) + 1) * longest > tokens:
                    break
                expected.append(item.name)
        assert taken == expected
    assert several > 50  # the fair view, not only one group's queue order, was exercised
