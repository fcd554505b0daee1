"""Messages between front ends and the engine: msgspec structs over ZeroMQ, one per frame.

A front end's DEALER socket sends a :class:`Call` and the engine's ROUTER socket answers with a
:class:`Reply` carrying the same ``id``; ZeroMQ routes the reply back to the front end that asked.
Both directions coalesce: Calls gathered for about a millisecond travel as one :class:`Calls`, the
Replies finished in one turn of the engine's loop as one :class:`Replies`, and finished requests'
:class:`Observed` records, every few tens of milliseconds, as one :class:`Tallies`: one :class:`Tally`
per metrics series with the latencies of its requests. On a GPU the engine's loop is the bound (one
core for every front end's requests), and each message costs it a wake-up, a decode and a socket
operation whatever it carries, each record a decode and a series lookup.
"""

from __future__ import annotations

import msgspec


class Call(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """One classify request: its texts tokenised (untruncated; the engine cuts them to the room the
    task version it resolves leaves) and whom it acts for (authenticated by the front end)."""

    id: int
    request_id: str
    task: str
    key_id: str
    scope: str
    tenant: str | None
    rows: list[list[int]]
    # The key's token bucket (rate per second, burst) for the engine to take from, where the buckets
    # are local (a directory store): the engine's are the ones every front end shares.
    bucket: tuple[float, int] | None = None


class Calls(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """The Calls a front end gathered for at most ``frontend_coalesce_ms``: one message, one wake-up
    of the engine's loop, however many requests arrived meanwhile."""

    calls: list[Call]


class Observed(msgspec.Struct, frozen=True):
    """A request a front end finished (or refused), for the engine's metrics: one registry, so one
    ``/metrics`` scrape covers every process. Gathered in the front end and sent as :class:`Tally`."""

    route: str
    task: str | None
    status: int
    latency_ms: float
    key: str | None
    tenant: str | None
    refusal: str | None = None  # the reason of a tenant's refusal (rate, share), counted apart

    def series(self) -> tuple[str, str | None, int, str | None, str | None, str | None]:
        """What the engine's metrics label by: records alike here are counted together."""
        return (self.route, self.task, self.status, self.key, self.tenant, self.refusal)


class Tally(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """Observed records of one series (:meth:`Observed.series`): the engine looks the series up once
    and counts ``len(latencies_ms)`` requests (the engine loop's CPU per record: ~4.5 µs one by one
    before tallies, ~1.5 µs in frames of 50 over 20 tasks; ``benchmarks/perf_loop.py --observed``)."""

    route: str
    task: str | None
    status: int
    key: str | None
    tenant: str | None
    refusal: str | None
    latencies_ms: list[float]


class Tallies(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """The tallies of the records a front end gathered (metrics may lag a request by a flush
    interval). Fire and forget: no reply."""

    tallies: list[Tally]

    @classmethod
    def of(cls, observed: list[Observed]) -> Tallies:
        latencies: dict[tuple[str, str | None, int, str | None, str | None, str | None], list[float]] = {}
        for seen in observed:
            latencies.setdefault(seen.series(), []).append(seen.latency_ms)
        return cls([Tally(*series, spent) for series, spent in latencies.items()])


class Reply(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """The answer to a Call: the version that served every row, or an error as the HTTP API states it."""

    id: int
    task: str = ""
    version: str = ""
    labels: list[str] = []
    probabilities: list[list[float]] = []
    truncated: list[bool] = []
    error_status: int = 0
    error_code: str = ""
    error_message: str = ""
    error_retry_after_s: float = 0.0  # a rate-limited call: when its key's next token is due


class Replies(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """The Replies to one front end that finished in the same turn of the engine's loop."""

    replies: list[Reply]


TO_ENGINE = msgspec.msgpack.Decoder(Call | Calls | Tallies)
REPLIES = msgspec.msgpack.Decoder(Reply | Replies)
ENCODER = msgspec.msgpack.Encoder()
