"""The engine loop's own CPU per classify call, in one process, with the forward taken out.

``perf_link`` runs the real engine process beside its drivers and a CPU forward; on a 2-core VM its
loop figures move with everything else on the cores (runs of the same code differ by 1.4x). This one
keeps only the code the loop runs for a call: the real ``EngineEndpoint`` callback path (the one a
call of a cached task takes) and a ``DynamicBatcher`` configured as ``service.runtime`` configures it
without CUDA graphs (batch size, token budget, length grouping window, fair groups, one batch in flight;
no ``max_queue``, so every Call is admitted), fed ``--calls`` Calls of pre-tokenised
rows in one turn, as a deep queue on a GPU host sees them. What is not the loop's is replaced: the
forward returns fixed probabilities at once (it runs in the batcher's executor thread, whose CPU is
not counted), the cached task is a stand-in with the attributes the loop reads, and replies are
counted instead of sent (their encoding and the ZeroMQ send are perf_link's). The loop thread's CPU
(``time.thread_time``) from the first Call to the last reply, per call and per row, after the start-up
objects are frozen as the engine freezes them; best and median of ``--repeat`` passes.

``--observed``: the same loop's CPU per finished request's metrics record, from the front ends'
``Tallies`` frames (decode and count, into the real ``Metrics``), with ``--observed-per-message``
records per frame spread over ``--observed-tasks`` tasks (a front end sends what its requests finished
in 50 ms as one frame; 1 is a front end with one request per interval).

    .venv/bin/python -m benchmarks.perf_loop --data-root ../shared/data
    PYTHONPATH=<other checkout> .venv/bin/python -m benchmarks.perf_loop ...   # the same for other code
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
import types
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from benchmarks.common import DEFAULT_DATA_ROOT, load_texts, machine, markdown_table, write_report
from prompts.backbone import TextTokenizer
from service.batcher import DynamicBatcher, group_window
from service.engine import Row
from service.frontends.link import EngineEndpoint
from service.frontends.protocol import ENCODER, TO_ENGINE, Call, Observed, Reply, Tallies
from service.memory import freeze_startup_objects
from service.metrics import Metrics
from service.settings import Settings


class CachedTask:
    """What the loop reads of a cached task version (``service.cache.LoadedTask``)."""

    def __init__(self, labels: int, prompt_length: int, max_text_tokens: int, tenant: str = "") -> None:
        self.task = "bench"
        self.tenant = tenant
        self.version = "v1"
        self.labels = [f"label{i}" for i in range(labels)]
        self.prompt_length = prompt_length
        self.max_text_tokens = max_text_tokens


class Runtime:
    """The part of ``service.runtime.Runtime`` the endpoint's callback path uses."""

    def __init__(
        self,
        tasks: dict[str, CachedTask],
        batcher: DynamicBatcher[Row, list[float]],
        tokenizer: TextTokenizer,
    ) -> None:
        self.tasks = tasks
        self.batcher = batcher
        self.cache = self
        self.backbone = types.SimpleNamespace(text=tokenizer)  # the rows fit: it cuts nothing

    def resolve_now(self, name: str) -> CachedTask:
        return self.tasks[name]

    async def resolve(self, name: str) -> CachedTask:  # the coroutine path of code without the callback path
        return self.tasks[name]


async def one_pass(
    settings: Settings,
    tokenizer: TextTokenizer,
    rows: list[list[int]],
    per_call: int,
    calls: int,
    labels: int,
    workdir: Path,
    tenants: int = 1,
) -> tuple[float, float]:
    """The loop thread's CPU seconds and the wall seconds for ``calls`` Calls of ``per_call`` rows,
    spread round robin over the tasks of ``tenants`` tenants (more than one: the batcher's fair view)."""
    probabilities = [1.0 / labels] * labels
    batcher: DynamicBatcher[Row, list[float]] = DynamicBatcher(
        lambda batch: [probabilities] * len(batch),
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_wait_ms,
        cost=Row.cost,
        group_window=group_window(settings.max_batch_size) if settings.length_grouping else None,
        fair_group=lambda row: cast(Any, row.task).tenant,
    )
    batcher.start()
    room = max(len(r) for r in rows)
    # A tenant's task is named "<tenant>/bench" by an admin key (service.tenancy.resolve).
    names = ["bench"] if tenants == 1 else [f"t{i}/bench" for i in range(tenants)]
    tasks = {
        name: CachedTask(labels, 16, room, tenant="" if tenants == 1 else f"t{i}")
        for i, name in enumerate(names)
    }
    endpoint = EngineEndpoint(
        cast(Any, Runtime(tasks, batcher, tokenizer)), cast(Any, None), f"ipc://{workdir}/loop.sock"
    )
    answered = 0
    errors = 0
    finished = asyncio.get_running_loop().create_future()

    def count(identity: bytes, reply: Reply) -> None:
        nonlocal answered, errors
        answered += 1
        errors += reply.error_status != 0
        if answered == calls:
            finished.set_result(None)

    endpoint._post = count  # type: ignore[method-assign]
    batch = [
        Call(
            i,
            f"r{i}",
            names[i % tenants],
            "-",
            "admin",
            None,
            [rows[(i * per_call + j) % len(rows)] for j in range(per_call)],
        )
        for i in range(calls)
    ]
    answer = cast(Callable[[bytes, Call], Coroutine[Any, Any, None]], endpoint._answer)
    started_cpu, started = time.thread_time(), time.perf_counter()
    for call in batch:  # what EngineEndpoint._receive does with a Calls message
        if not endpoint._answer_now(b"driver", call):
            asyncio.get_running_loop().create_task(answer(b"driver", call))
    await asyncio.wait_for(finished, timeout=300)  # every call answered (or the pass fails)
    cpu, wall = time.thread_time() - started_cpu, time.perf_counter() - started
    await batcher.stop()
    await endpoint.stop()
    if errors:
        raise RuntimeError(f"{errors} of {calls} calls failed")
    return cpu, wall


def observed_pass(records: int, per_message: int, tasks: int) -> tuple[float, float]:
    """The loop thread's CPU seconds to decode and count ``records`` request records arriving as
    Tallies frames of ``per_message`` records each (what ``EngineEndpoint._receive`` does with them),
    and the requests the registry then holds."""
    endpoint = EngineEndpoint.__new__(EngineEndpoint)  # the counting only: no socket, no runtime
    endpoint.metrics = Metrics(lambda: None)
    observed = [
        Observed("/v1/classify", f"task{i % tasks}", 200, 1.0 + (i % 97) / 4, "key", None)
        for i in range(records)
    ]
    frames = [
        ENCODER.encode(Tallies.of(observed[i : i + per_message])) for i in range(0, records, per_message)
    ]
    started = time.thread_time()
    for frame in frames:
        message = TO_ENGINE.decode(frame)
        for tally in cast(Tallies, message).tallies:
            endpoint._count(tally)
    cpu = time.thread_time() - started
    counted = sum(
        endpoint.metrics.registry.get_sample_value(
            "ptserve_requests_total", {"route": "/v1/classify", "task": f"task{i}", "status": "200"}
        )
        or 0.0
        for i in range(tasks)
    )
    return cpu, counted


def run_loop(coroutine: Coroutine[Any, Any, tuple[float, float]]) -> tuple[float, float]:
    """On uvloop where it is installed (uvicorn's choice for the engine), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return cast(tuple[float, float], uvloop.run(coroutine))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=128, help="rows are cut to this many tokens")
    parser.add_argument("--rows", default="1,32", help="rows per call, one measurement each")
    parser.add_argument("--calls", default="6000,400", help="calls per pass, one per --rows entry")
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--tenants", type=int, default=1, help="calls spread round robin over this many tenants' tasks"
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--observed", type=int, default=20000, help="request records per metrics pass (0: no such pass)"
    )
    parser.add_argument(
        "--observed-per-message", default="1,50", help="records per Tallies frame, one pass each"
    )
    parser.add_argument("--observed-tasks", type=int, default=20, help="tasks the records spread over")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/perf_loop"))
    args = parser.parse_args()

    tokenizer = TextTokenizer.load()  # the packaged MiniLM's
    texts = load_texts(args.data_root, args.dataset, "test", args.texts)
    rows = [tokenizer.truncate(ids, args.max_tokens).input_ids for ids in tokenizer.untruncated(texts)]
    settings = Settings(max_batch_size=args.max_batch_size)
    per_calls = [int(x) for x in args.rows.split(",") if x.strip()]
    calls = [int(x) for x in args.calls.split(",") if x.strip()]
    if len(calls) != len(per_calls):
        parser.error("--calls needs one count per --rows entry")
    freeze_startup_objects()
    points = []
    with tempfile.TemporaryDirectory(prefix="ptserve-loop-") as workdir:
        for per_call, count in zip(per_calls, calls, strict=True):
            passes = [
                run_loop(
                    one_pass(
                        settings, tokenizer, rows, per_call, count, args.labels, Path(workdir), args.tenants
                    )
                )
                for _ in range(args.repeat)
            ]
            per_call_us = sorted(cpu / count * 1e6 for cpu, _ in passes)
            point = {
                "rows_per_call": per_call,
                "calls": count,
                "cpu_us_per_call": per_call_us,
                "best_us_per_call": per_call_us[0],
                "median_us_per_call": statistics.median(per_call_us),
                "best_us_per_row": per_call_us[0] / per_call,
                "median_us_per_row": statistics.median(per_call_us) / per_call,
                "wall_s": [wall for _, wall in passes],
            }
            points.append(point)
            print(
                f"rows/call {per_call}: loop CPU best {point['best_us_per_call']:.1f} µs/call "
                f"({point['best_us_per_row']:.2f} µs/row), median {point['median_us_per_call']:.1f}",
                flush=True,
            )
    observed_points = []
    for per_message in (
        [int(x) for x in args.observed_per_message.split(",") if x.strip()] if args.observed else []
    ):
        per_record_us = sorted(
            observed_pass(args.observed, per_message, args.observed_tasks)[0] / args.observed * 1e6
            for _ in range(args.repeat)
        )
        observed_points.append(
            {
                "records_per_message": per_message,
                "records": args.observed,
                "tasks": args.observed_tasks,
                "cpu_us_per_record": per_record_us,
                "best_us_per_record": per_record_us[0],
                "median_us_per_record": statistics.median(per_record_us),
            }
        )
        print(
            f"metrics records, {per_message}/frame over {args.observed_tasks} tasks: loop CPU best "
            f"{per_record_us[0]:.2f} µs/record, median {statistics.median(per_record_us):.2f}",
            flush=True,
        )
    headers = [
        "rows/call",
        "calls per pass",
        "loop CPU µs per call: best / median",
        "µs per row: best / median",
    ]
    table = [
        [
            p["rows_per_call"],
            p["calls"],
            f"{p['best_us_per_call']:.1f} / {p['median_us_per_call']:.1f}",
            f"{p['best_us_per_row']:.2f} / {p['median_us_per_row']:.2f}",
        ]
        for p in points
    ]
    markdown = (
        f"# Engine loop alone ({args.repeat} passes; {args.dataset} rows, ≤{args.max_tokens} tokens; "
        f"{args.tenants} tenant(s); max batch {settings.max_batch_size}, grouping window "
        f"{group_window(settings.max_batch_size) if settings.length_grouping else 'off'}; "
        f"{platform.processor() or platform.machine()})\n\n" + markdown_table(headers, table) + "\n"
    )
    if observed_points:
        markdown += (
            "\nMetrics records from front ends (Tallies frames, decode and count):\n\n"
            + markdown_table(
                ["records per frame", "tasks", "loop CPU µs per record: best / median"],
                [
                    [
                        p["records_per_message"],
                        p["tasks"],
                        f"{p['best_us_per_record']:.2f} / {p['median_us_per_record']:.2f}",
                    ]
                    for p in observed_points
                ],
            )
            + "\n"
        )
    write_report(
        args.out,
        "perf_loop",
        {
            "machine": machine(),
            "args": vars(args) | {"out": str(args.out), "data_root": str(args.data_root)},
            "points": points,
            "observed": observed_points,
        },
        markdown,
    )


if __name__ == "__main__":
    main()
