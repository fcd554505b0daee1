"""Per-key request rate limits: a token bucket, shared by every replica where a Redis store runs.

A key may make ``burst`` requests at once and ``rate_per_s`` a second after that (its record's
values, else the server's ``key_rate_per_s`` / ``key_burst``; no rate: unlimited). A request over
the limit gets 429 ``rate_limited`` with ``Retry-After`` saying when the next one would pass.

With a Redis store the bucket lives in Redis (one Lua script per request, the server's clock), so
N replicas together admit the key's rate, not N times it. If Redis cannot be reached the request is
let through (and the outage logged once): a limiter must not turn a store outage into refusing
everything that is still cached. With a disk store each replica keeps its own bucket.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.exceptions import RedisClusterException, RedisError

logger = logging.getLogger(__name__)

# Returns {allowed (0/1), seconds until one token as a string}: the bucket refills continuously.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: float  # when the next request would pass (0 when allowed)


class RateLimiter(Protocol):
    # Whether take() does I/O (the middleware then calls it off the event loop).
    needs_io: bool

    def take(self, key_id: str, rate_per_s: float, burst: int) -> Verdict: ...


class LocalRateLimiter:
    """Buckets in this process (disk store: one replica's share of the traffic)."""

    needs_io = False

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key_id: str, rate_per_s: float, burst: int) -> Verdict:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate_per_s)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return Verdict(True, 0.0)
            self._buckets[key_id] = (tokens, now)
            return Verdict(False, (1 - tokens) / rate_per_s)


class RedisRateLimiter:
    """Buckets in Redis under ``{prefix}:rate:{key id}``, shared by every replica."""

    needs_io = True

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._script = client.register_script(_BUCKET)
        self._prefix = prefix
        self._outage_logged = False

    def take(self, key_id: str, rate_per_s: float, burst: int) -> Verdict:
        try:
            allowed, wait = self._script(keys=[f"{self._prefix}:rate:{key_id}"], args=[rate_per_s, burst])
        except (RedisError, RedisClusterException, OSError) as exc:
            if not self._outage_logged:
                logger.warning("rate limits not enforced while Redis is unreachable: %s", exc)
                self._outage_logged = True
            return Verdict(True, 0.0)
        self._outage_logged = False
        return Verdict(bool(int(allowed)), float(wait))


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1 (Retry-After takes no fractions)."""
    return str(max(1, math.ceil(seconds)))
