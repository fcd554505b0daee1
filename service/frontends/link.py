"""Both ends of the ZeroMQ link: the engine's endpoint and a front end's client.

ipc:// sockets in a directory only the server's user can enter: whoever can connect is trusted with
the principal a Call names (the front end authenticated it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import zmq
import zmq.asyncio

from prompts.errors import PtserveError
from service.engine import Row
from service.errors import EngineUnavailableError, RateLimitedError, ShuttingDownError, http_status
from service.frontends.protocol import (
    ENCODER,
    REPLIES,
    TO_ENGINE,
    Call,
    Calls,
    Observed,
    Replies,
    Reply,
    Tallies,
    Tally,
)
from service.limits import rate_limited
from service.metrics import Metrics
from service.runtime import Runtime
from service.tenancy import Principal, Scope, resolve

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineEndpoint:
    """The engine's ROUTER socket: classifies Calls with the engine's runtime, counts Tallies."""

    NAMES_KEPT = 4096  # resolved names remembered (then forgotten all at once)

    def __init__(self, runtime: Runtime, metrics: Metrics, address: str) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.address = address
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._receiver: asyncio.Task[None] | None = None
        self._answers: set[asyncio.Task[None]] = set()
        # Rows queued by the callback path (_answer_now), until their replies are posted.
        self._queued: set[asyncio.Future[list[float]]] = set()
        # Replies finished in this turn of the loop, per front end, sent together at its end.
        self._outbox: dict[bytes, list[Reply]] = {}
        self.messages = 0  # frames received from front ends (Calls coalesce several requests)
        self.replies_sent = 0  # frames sent to front ends (Replies coalesce several answers)
        # (tenant, name a call gives) -> the full task name: resolve() is a pure function of the two, and
        # validating the name costs ~10 % of a one-row call's work on the loop. Valid names only.
        self._names: dict[tuple[str | None, str], str] = {}

    def start(self) -> None:
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            identity, payload = await self._socket.recv_multipart()
            self.messages += 1
            try:
                message = TO_ENGINE.decode(payload)
            except Exception:  # only front ends of this server connect; a bad frame is a bug there
                logger.exception("undecodable message from a front end")
                continue
            if isinstance(message, Tallies):
                try:
                    for tally in message.tallies:
                        self._count(tally)
                except Exception:  # metrics only: the receive loop must outlive a bug there
                    logger.exception("a front end's request records could not be counted")
                continue
            for call in message.calls if isinstance(message, Calls) else [message]:
                try:
                    if self._answer_now(identity, call):
                        continue
                except Exception as exc:  # a bug or a bad artifact answers this call, not every later one
                    self._post(identity, self._failed(call, exc))
                    continue
                answer = asyncio.get_running_loop().create_task(self._answer(identity, call))
                self._answers.add(answer)
                answer.add_done_callback(self._answers.discard)

    def _count(self, tally: Tally) -> None:
        if tally.refusal is not None:
            # Only the refusals: the refused requests' own records follow from the front end's request
            # log, as in one process (where the limits middleware and the log count them apart).
            principal = Principal(tally.key or "-", "classify", tally.tenant)
            self.metrics.observe_refusal(principal, tally.refusal, len(tally.latencies_ms))
            return
        self.metrics.observe_requests(
            tally.route, tally.task, tally.status, tally.key, tally.tenant, tally.latencies_ms
        )

    def _answer_now(self, identity: bytes, call: Call) -> bool:
        """The common call, without a coroutine: rows of a task version already on the device, queued
        at once and answered from their futures' callbacks. On a GPU host the engine's loop is the
        bound, and a task per call (its creation, the awaits down to the batcher, its wake-up, and for
        several rows a gathering future over theirs) was most of the loop's own work per request
        (benchmarks/perf_link.py). False: anything else (no rows, a task to read or load, an unknown
        name), for :meth:`_answer`; errors past that point are answered here."""
        if not call.rows:
            return False
        runtime = self.runtime
        name = self._names.get((call.tenant, call.task))
        if name is None:
            try:
                name = resolve(Principal(call.key_id, cast(Scope, call.scope), call.tenant), call.task)
            except PtserveError:
                return False
            if len(self._names) >= self.NAMES_KEPT:
                self._names.clear()
            self._names[(call.tenant, call.task)] = name
        task = runtime.cache.resolve_now(name)
        if task is None:
            return False
        # Past every way back to _answer: a token is taken once per call.
        refusal = self._over_rate(call)
        if refusal is not None:
            self._post(identity, self._failed(call, refusal))
            return True
        rows, truncated = self._cut(call, task.max_text_tokens)
        try:
            futures = runtime.batcher.enqueue([Row(task, ids) for ids in rows])
        except PtserveError as exc:
            self._post(identity, self._failed(call, exc))
            return True
        self._queued.update(futures)
        left = len(futures)

        def deliver(done: asyncio.Future[list[float]]) -> None:
            nonlocal left
            self._queued.discard(done)
            if left <= 0:  # answered already: an earlier row failed
                return
            error: BaseException | None
            if done.cancelled():
                error = ShuttingDownError("the engine stopped before this request ran")
            else:
                error = done.exception()
            if error is not None:
                left = 0
                for other in futures:  # as submit_many: the rows that have not run are dropped
                    other.cancel()
                self._post(identity, self._failed(call, error))
                return
            left -= 1
            if left == 0:
                reply = Reply(
                    call.id,
                    task=task.task,
                    version=task.version,
                    labels=task.labels,
                    probabilities=[future.result() for future in futures],
                    truncated=truncated,
                )
                self._post(identity, reply)

        for future in futures:
            future.add_done_callback(deliver)
        return True

    def _cut(self, call: Call, limit: int) -> tuple[list[list[int]], list[bool]]:
        """The call's rows cut to the room of the version it is pinned to (front ends do not know it),
        and which were cut. Most rows fit: then the decoded lists are the rows, nothing is copied."""
        if max(map(len, call.rows), default=0) <= limit:
            return call.rows, [False] * len(call.rows)
        encodings = [self.runtime.backbone.text.truncate(ids, limit) for ids in call.rows]
        return [e.input_ids for e in encodings], [e.truncated for e in encodings]

    async def _answer(self, identity: bytes, call: Call) -> None:
        try:
            reply = await self._classify(call)
        except Exception as exc:
            reply = self._failed(call, exc)
        self._post(identity, reply)

    @staticmethod
    def _failed(call: Call, exc: BaseException) -> Reply:
        """The Reply of a call that failed, as the HTTP API states the error."""
        if isinstance(exc, PtserveError):
            status = http_status(exc)
            if status >= 500:
                logger.error("request %s failed: %s: %s", call.request_id, exc.code, exc.message)
            retry_after_s = exc.retry_after_s if isinstance(exc, RateLimitedError) else 0.0
            return Reply(
                call.id,
                error_status=status,
                error_code=exc.code,
                error_message=exc.message,
                error_retry_after_s=retry_after_s,
            )
        logger.error("request %s: unhandled error", call.request_id, exc_info=exc)
        message = f"internal error: {type(exc).__name__}"
        return Reply(call.id, error_status=500, error_code="internal_error", error_message=message)

    def _post(self, identity: bytes, reply: Reply) -> None:
        """Put ``reply`` in this turn's outbox; the turn's first reply schedules the send at its end."""
        outbox = self._outbox.setdefault(identity, [])
        outbox.append(reply)
        if len(self._outbox) == 1 and len(outbox) == 1:  # the first of this turn: flush at its end
            asyncio.get_running_loop().call_soon(self._send_replies)

    def _send_replies(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for identity, replies in outbox.items():
            message = replies[0] if len(replies) == 1 else Replies(replies)
            # Counted before the send: zmq.asyncio sends at once when it can, so a front end (or a test
            # reading the counter) may hold the reply before a line after the send runs.
            self.replies_sent += 1
            try:
                sent = asyncio.ensure_future(self._socket.send_multipart([identity, ENCODER.encode(message)]))
            except zmq.ZMQError:  # the socket is closing: nobody waits for these
                self.replies_sent -= 1
                continue
            sent.add_done_callback(_retrieve)  # a front end that is gone: nobody waits for these

    def _over_rate(self, call: Call) -> RateLimitedError | None:
        """The refusal of a call whose key is over its bucket (the engine's, shared by every front end),
        counted as the limits middleware counts its own; None: the call may run. Front ends send a
        bucket only where their store's buckets are local, and the engine opens the same store, so
        the take is a dictionary update here, never a store round trip on the loop."""
        if call.bucket is None:
            return None
        rate, burst = call.bucket
        verdict = self.runtime.limiter.take(call.key_id, rate, burst)
        if verdict.allowed:
            return None
        self.metrics.observe_refusal(Principal(call.key_id, "classify", call.tenant), RateLimitedError.code)
        return rate_limited(call.key_id, rate, burst, verdict.retry_after_s)

    async def _classify(self, call: Call) -> Reply:
        runtime = self.runtime
        refusal = self._over_rate(call)
        if refusal is not None:
            raise refusal
        principal = Principal(call.key_id, cast(Scope, call.scope), call.tenant)
        task = await runtime.cache.resolve(resolve(principal, call.task))
        rows, truncated = self._cut(call, task.max_text_tokens)
        probabilities = await runtime.batcher.submit_many([Row(task, ids) for ids in rows])
        return Reply(
            call.id,
            task=task.task,
            version=task.version,
            labels=task.labels,
            probabilities=probabilities,
            truncated=truncated,
        )

    async def stop(self) -> None:
        """Stop taking Calls, let the admitted ones finish (the batcher drains after), close."""
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        if self._answers or self._queued:
            await asyncio.gather(*self._answers, *self._queued, return_exceptions=True)
        self._send_replies()
        self._socket.close(linger=0)
        self._context.term()


class EngineClient:
    """A front end's DEALER socket: Calls gathered for at most ``coalesce_s``, replies matched by id."""

    # A full message goes at once: past this many requests, waiting saves no further wake-ups.
    MAX_CALLS_PER_MESSAGE = 64
    # Finished requests' records wait this long for company (metrics lag by at most this much).
    OBSERVE_INTERVAL_S = 0.05
    MAX_OBSERVED_PER_MESSAGE = 256

    def __init__(self, address: str, identity: str, coalesce_s: float = 0.001) -> None:
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IDENTITY, identity.encode())
        self._socket.connect(address)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._calls = _Gathered[Call](coalesce_s, self.MAX_CALLS_PER_MESSAGE, self._send_calls)
        self._observed = _Gathered[Observed](
            self.OBSERVE_INTERVAL_S, self.MAX_OBSERVED_PER_MESSAGE, self._send_observed
        )
        self._receiver: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            payload = await self._socket.recv()
            message = REPLIES.decode(payload)
            for reply in message.replies if isinstance(message, Replies) else [message]:
                waiter = self._waiting.pop(reply.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)

    async def classify(
        self,
        request_id: str,
        task: str,
        principal: Principal,
        rows: list[list[int]],
        bucket: tuple[float, int] | None = None,
    ) -> Reply:
        """The engine's Reply; the request's own deadline (the limits middleware's 504) bounds the wait.
        ``bucket``: the key's (rate, burst), for the engine to take a token from (see ``Call``)."""
        if self._closed:
            raise ShuttingDownError("this front end is shutting down")
        call_id = next(self._ids)
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = waiter
        call = Call(
            call_id, request_id, task, principal.key_id, principal.scope, principal.tenant, rows, bucket
        )
        self._calls.add(call)
        try:
            return await waiter
        finally:
            self._waiting.pop(call_id, None)

    def _send_calls(self, calls: list[Call]) -> None:
        message = calls[0] if len(calls) == 1 else Calls(calls)
        # zmq.asyncio's send returns a future; a failure must reach the calls' waiters.
        sent = asyncio.ensure_future(self._socket.send(ENCODER.encode(message)))
        sent.add_done_callback(lambda done: self._sent(done, calls))

    def _sent(self, done: asyncio.Future[Any], calls: list[Call]) -> None:
        error = None if done.cancelled() else done.exception()
        if error is None:
            return
        for call in calls:
            waiter = self._waiting.get(call.id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(EngineUnavailableError(f"the engine process cannot be reached: {error}"))

    def observe(self, seen: Observed) -> None:
        """Hand a finished request to the engine's metrics, within ``OBSERVE_INTERVAL_S``; dropped if
        the engine is not there."""
        self._observed.add(seen)

    def _send_observed(self, observed: list[Observed]) -> None:
        message = Tallies.of(observed)
        with contextlib.suppress(zmq.ZMQError):
            self._socket.send(ENCODER.encode(message), flags=zmq.NOBLOCK)

    async def close(self) -> None:
        self._closed = True
        self._calls.flush()
        self._observed.flush()
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        self._socket.close(linger=0)
        self._context.term()


class _Gathered(Generic[T]):
    """Items held for at most ``interval_s`` (or until ``limit`` wait) and handed to ``send`` together:
    one message, one wake-up of the other side, however many arrived meanwhile."""

    def __init__(self, interval_s: float, limit: int, send: Callable[[list[T]], None]) -> None:
        self._interval_s = interval_s
        self._limit = limit
        self._send = send
        self._items: list[T] = []
        self._flush_at: asyncio.TimerHandle | None = None

    def add(self, item: T) -> None:
        self._items.append(item)
        if len(self._items) >= self._limit or self._interval_s <= 0:
            self.flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self._interval_s, self.flush)

    def flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        items, self._items = self._items, []
        if items:
            self._send(items)


def _retrieve(sent: asyncio.Future[Any]) -> None:
    """A send's outcome is nobody's business once the front end went away; only retrieved."""
    if not sent.cancelled():
        sent.exception()
