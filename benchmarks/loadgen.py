"""An HTTP load generator for ptserve, run in its own process (asyncio).

    python -m benchmarks.loadgen JOB.json RESULT.json

Two clients: ``raw`` (default), a minimal HTTP/1.1 keep-alive client on asyncio streams, one
connection per outstanding request, which costs little CPU per request; and ``httpx``, one pooled
``httpx.AsyncClient``. On a 2-core machine the client's CPU is taken from the server: httpx's pool
costs grow with the number of concurrent requests (about 5 ms of client CPU per request at 64
concurrent single-text requests here, and it collapses at 128), so the raw client is the default.

The job (written by benchmarks/perf_http.py) names the URL, the request bodies to cycle through and
the loop: ``closed`` (``concurrency`` clients, each sending its next request as soon as the last
answered) or ``open`` (Poisson arrivals at ``rate`` requests/s, latency measured from each request's
scheduled time, so a slow server cannot slow the arrivals down). Every loop is bounded in time
(``warmup_s + duration_s``, then at most ``drain_s`` for answers still due) and in count
(``max_requests``). Requests that start during the warm-up are not recorded; throughput counts the
requests that complete inside the measured window, divided by its length.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Job:
    url: str
    mode: str  # "closed" or "open"
    bodies: list[str]  # JSON request bodies, cycled through
    rows_per_request: int
    duration_s: float
    warmup_s: float = 1.0
    drain_s: float = 10.0
    concurrency: int = 1  # closed loop
    rate: float = 0.0  # open loop, requests/s
    max_requests: int = 100_000
    max_inflight: int = 1024  # open loop: arrivals beyond this many outstanding are dropped
    timeout_s: float = 60.0
    seed: int = 0
    client: str = "raw"  # "raw" (asyncio streams, HTTP/1.1 keep-alive) or "httpx"
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (an API key)
    # Closed loop: after a 429 a client waits this long before its next request (a well-behaved
    # client honours Retry-After; ptserve's is at least 1 s). 0: it sends again at once.
    pause_after_429_s: float = 0.0


@dataclass
class Outcome:
    mode: str
    concurrency: int
    offered_rate: float
    window_s: float
    sent: int = 0
    ok: int = 0  # measured requests answered 200
    rows: int = 0  # rows of requests that completed with 200 inside the window
    window_requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # open loop: arrivals not sent because max_inflight were outstanding
    unfinished: int = 0  # still unanswered when the drain ended
    latencies_s: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0


class Recorder:
    def __init__(self, job: Job, outcome: Outcome, t0: float) -> None:
        self.job = job
        self.out = outcome
        self.measure_from = t0 + job.warmup_s
        self.measure_to = self.measure_from + job.duration_s

    def record(self, start: float, end: float, status: str) -> None:
        if status == "200" and self.measure_from <= end <= self.measure_to:
            self.out.window_requests += 1
            self.out.rows += self.job.rows_per_request
        if start < self.measure_from:
            return
        if status == "200":
            self.out.ok += 1
            self.out.latencies_s.append(end - start)
        else:
            self.out.errors[status] = self.out.errors.get(status, 0) + 1


class RawConnection:
    """One HTTP/1.1 keep-alive connection on asyncio streams: POST a JSON body, read the answer."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> int:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.reader, self.writer
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\n{self.extra}Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection":
                close = b"close" in value.lower()
        if chunked:
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await reader.readexactly(length)
        if close:
            self.close()
        return status


class Sender:
    """Sends one request at a time per call; the raw client keeps a free list of connections."""

    def __init__(self, job: Job) -> None:
        self.job = job
        url = httpx.URL(job.url)
        self.host = url.host
        self.port = url.port or 80
        self.path = "/v1/classify"
        self.idle: list[RawConnection] = []
        self.all: list[RawConnection] = []
        self.client: httpx.AsyncClient | None = None
        if job.client == "httpx":
            connections = job.concurrency if job.mode == "closed" else job.max_inflight
            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            self.client = httpx.AsyncClient(
                base_url=job.url, limits=limits, timeout=httpx.Timeout(job.timeout_s, connect=10.0)
            )
        elif job.client != "raw":
            raise ValueError(f"unknown client {job.client!r}")

    async def send(self, body: bytes) -> str:
        if self.client is not None:
            try:
                response = await self.client.post(
                    self.path, content=body, headers={"content-type": "application/json", **self.job.headers}
                )
                await response.aread()
                return str(response.status_code)
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError as exc:
                return type(exc).__name__
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            conn = RawConnection(self.host, self.port, self.job.headers)
            self.all.append(conn)
        try:
            for attempt in (0, 1):
                reused = conn.writer is not None
                try:
                    status = await asyncio.wait_for(conn.post(self.path, body), self.job.timeout_s)
                    return str(status)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    conn.close()
                    # The server may close an idle keep-alive connection: retry once on a new one.
                    if attempt == 0 and reused:
                        continue
                    return type(exc).__name__
                except TimeoutError:
                    conn.close()
                    return "timeout"
                except (OSError, ValueError, IndexError) as exc:
                    conn.close()
                    return type(exc).__name__
            return "unreachable"
        finally:
            self.idle.append(conn)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        for conn in self.all:
            conn.close()


async def closed_loop(job: Job, sender: Sender, outcome: Outcome) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rec = Recorder(job, outcome, t0)
    bodies = [b.encode() for b in job.bodies]
    counter = 0

    async def worker(k: int) -> None:
        nonlocal counter
        i = k
        while loop.time() < rec.measure_to and counter < job.max_requests:
            counter += 1
            outcome.sent += 1
            body = bodies[i % len(bodies)]
            i += job.concurrency
            start = loop.time()
            status = await sender.send(body)
            rec.record(start, loop.time(), status)
            if status == "429" and job.pause_after_429_s > 0:
                await asyncio.sleep(job.pause_after_429_s)

    workers = [asyncio.ensure_future(worker(k)) for k in range(job.concurrency)]
    done, pending = await asyncio.wait(workers, timeout=job.warmup_s + job.duration_s + job.drain_s)
    outcome.unfinished = len(pending)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


async def open_loop(job: Job, sender: Sender, outcome: Outcome) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(job.seed)
    t0 = loop.time()
    rec = Recorder(job, outcome, t0)
    bodies = [b.encode() for b in job.bodies]
    horizon = job.warmup_s + job.duration_s
    schedule: list[float] = []
    t = rng.expovariate(job.rate)
    while t < horizon and len(schedule) < job.max_requests:
        schedule.append(t)
        t += rng.expovariate(job.rate)
    inflight: set[asyncio.Task[None]] = set()

    async def one(body: bytes, scheduled: float) -> None:
        status = await sender.send(body)
        rec.record(scheduled, loop.time(), status)

    for i, offset in enumerate(schedule):
        due = t0 + offset
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= job.max_inflight:
            outcome.dropped += 1
            continue
        outcome.sent += 1
        task = asyncio.ensure_future(one(bodies[i % len(bodies)], due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        _, pending = await asyncio.wait(
            set(inflight), timeout=max(0.0, t0 + horizon + job.drain_s - loop.time())
        )
        outcome.unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run_job(job: Job) -> Outcome:
    outcome = Outcome(
        mode=job.mode,
        concurrency=job.concurrency,
        offered_rate=job.rate,
        window_s=job.duration_s,
    )
    cpu0 = time.process_time()
    sender = Sender(job)
    try:
        if job.mode == "closed":
            await closed_loop(job, sender, outcome)
        elif job.mode == "open":
            await open_loop(job, sender, outcome)
        else:
            raise ValueError(f"unknown mode {job.mode!r}")
    finally:
        await sender.close()
    outcome.client_cpu_s = time.process_time() - cpu0
    return outcome


def load_job(path: Path) -> Job:
    data: dict[str, Any] = json.loads(path.read_text())
    return Job(**data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.loadgen JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = load_job(Path(args[0]))
    outcome = asyncio.run(run_job(job))
    Path(args[1]).write_text(json.dumps(asdict(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
