"""Request limits as one ASGI middleware: body size (413), concurrent requests (429), a key's rate
(429 ``rate_limited``), a tenant's share of the concurrent requests (429) and time (504).

Texts per request and characters per text are checked by the classify route, where the texts are.
The key's principal comes from the auth middleware, which runs before this one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompts.errors import PtserveError
from service.errors import (
    PayloadTooLargeError,
    RateLimitedError,
    RequestTimeoutError,
    TooManyRequestsError,
    error_body,
    http_headers,
    http_status,
)
from service.logs import request_state
from service.ratelimit import RateLimiter, retry_after_header
from service.settings import Settings
from service.tenancy import Principal

# Health probes and scrapes must answer while the replica is saturated: they are never limited.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Uploads are multipart: the artifact plus boundaries, part headers and the file name.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024
UPLOAD_ROUTES = frozenset({("POST", "/v1/prompts")})


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_upload_bytes: int
    max_concurrent: int
    timeout_s: float
    retry_after_s: int
    tenant_max_concurrent: int = 1 << 30  # one tenant's requests at once
    key_rate_per_s: float | None = None  # default token bucket of a key (None: unlimited)
    key_burst: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_body_bytes=settings.max_body_bytes,
            max_upload_bytes=settings.max_artifact_bytes + MULTIPART_OVERHEAD_BYTES,
            max_concurrent=settings.max_concurrent_requests,
            timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            tenant_max_concurrent=max(
                1, math.ceil(settings.tenant_concurrency_share * settings.max_concurrent_requests)
            ),
            key_rate_per_s=settings.key_rate_per_s,
            key_burst=settings.key_burst,
        )

    def bucket(self, principal: Principal) -> tuple[float, int] | None:
        """(rate per second, burst) of ``principal``'s key, or None when it is not rate-limited."""
        rate = principal.rate_per_s if principal.rate_per_s is not None else self.key_rate_per_s
        if rate is None:
            return None
        burst = principal.burst if principal.burst is not None else self.key_burst
        return rate, burst if burst is not None else max(1, math.ceil(rate))

    def body_limit(self, method: str, path: str) -> tuple[int, str]:
        """The byte limit of a route's body and the setting it comes from (for the 413 message)."""
        if (method, path.rstrip("/")) in UPLOAD_ROUTES:
            return self.max_upload_bytes, "max_artifact_bytes plus 1 MiB of multipart overhead"
        return self.max_body_bytes, "max_body_bytes"


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once the streamed body passes the limit; turned into a 413 here."""


class LimitsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        limits: Limits,
        limiter: Callable[[], RateLimiter | None] = lambda: None,
        on_refusal: Callable[[Principal, str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.limiter = limiter  # the runtime's, once the lifespan built it
        self.on_refusal = on_refusal  # (principal, reason): per-tenant metrics
        self.in_flight = 0
        self.tenant_in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        limit, setting = self.limits.body_limit(str(scope.get("method", "")), str(scope.get("path", "")))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, _too_large(limit, setting, declared))
            return
        if self.in_flight >= self.limits.max_concurrent:
            error: PtserveError = TooManyRequestsError(
                f"this replica is handling {self.in_flight} requests, its limit "
                f"(max_concurrent_requests); retry after {self.limits.retry_after_s} s"
            )
            await self._refuse(scope, receive, send, error)
            return
        principal: Principal | None = request_state(scope).get("principal")
        tenant = principal.tenant if principal is not None else None
        if principal is not None:
            refusal = await self._over_share_or_rate(principal)
            if refusal is not None:
                if self.on_refusal is not None:
                    self.on_refusal(principal, refusal.code)
                await self._refuse(scope, receive, send, refusal)
                return

        received = 0
        over_limit = False
        response_started = False

        async def counted_receive() -> Message:
            # Content-Length may be absent (chunked) or wrong: count what actually arrives.
            nonlocal received, over_limit
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over_limit = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if over_limit and not response_started:
                # The app turned the aborted body read into an error of its own; 413 says why.
                raise _BodyTooLarge
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        self.in_flight += 1
        if tenant is not None:
            self.tenant_in_flight[tenant] = self.tenant_in_flight.get(tenant, 0) + 1
        deadline = asyncio.timeout(self.limits.timeout_s)
        try:
            async with deadline:
                await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if response_started:
                raise
            await self._refuse(scope, receive, send, _too_large(limit, setting, None))
        except TimeoutError:
            # A TimeoutError of the app's own (not this deadline) is an ordinary failure.
            if response_started or not deadline.expired():
                raise
            error = RequestTimeoutError(
                f"the request did not finish within {self.limits.timeout_s:g} s (request_timeout_s)"
            )
            await self._refuse(scope, receive, send, error)
        finally:
            self.in_flight -= 1
            if tenant is not None:
                self.tenant_in_flight[tenant] -= 1
                if not self.tenant_in_flight[tenant]:
                    del self.tenant_in_flight[tenant]

    async def _over_share_or_rate(self, principal: Principal) -> PtserveError | None:
        """Why ``principal``'s request is refused (its tenant's share, its key's rate), or None."""
        tenant = principal.tenant
        if tenant is not None and self.tenant_in_flight.get(tenant, 0) >= self.limits.tenant_max_concurrent:
            return TooManyRequestsError(
                f"tenant {tenant!r} has {self.tenant_in_flight[tenant]} requests in flight on this "
                f"replica, its share (tenant_concurrency_share); retry after {self.limits.retry_after_s} s"
            )
        bucket = self.limits.bucket(principal)
        limiter = self.limiter()
        if bucket is None or limiter is None:
            return None
        rate, burst = bucket
        if limiter.needs_io:
            verdict = await asyncio.to_thread(limiter.take, principal.key_id, rate, burst)
        else:
            verdict = limiter.take(principal.key_id, rate, burst)
        if verdict.allowed:
            return None
        return rate_limited(principal.key_id, rate, burst, verdict.retry_after_s)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: PtserveError) -> None:
        status = http_status(error)
        body = error_body(error.code, error.message, request_state(scope).get("request_id"))
        headers = http_headers(status, self.limits.retry_after_s)
        if isinstance(error, RateLimitedError):
            headers["Retry-After"] = retry_after_header(error.retry_after_s)
        if status == 413:
            # The rest of the body is not read; the client must not reuse this connection.
            headers["Connection"] = "close"
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


def rate_limited(key_id: str, rate: float, burst: int, retry_after_s: float) -> RateLimitedError:
    """The refusal of a key over its token bucket (here, or in the engine of serve --frontends N)."""
    return RateLimitedError(
        f"key {key_id} is over its rate of {rate:g} requests/s (burst {burst}); "
        f"retry after {retry_after_s:.2f} s",
        retry_after_s,
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int, setting: str, declared: int | None) -> PayloadTooLargeError:
    size = f"of {declared} bytes" if declared is not None else "that was sent"
    return PayloadTooLargeError(
        f"the request body {size} is over this route's limit of {limit} bytes ({setting})"
    )
