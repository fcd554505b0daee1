"""Request limits as one ASGI middleware: body size (413), concurrent requests (429) and time (504).

Texts per request and characters per text are checked by the classify route, where the texts are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompts.errors import PtserveError
from service.errors import (
    PayloadTooLargeError,
    RequestTimeoutError,
    TooManyRequestsError,
    error_body,
    http_headers,
    http_status,
)
from service.logs import request_state
from service.settings import Settings

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

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_body_bytes=settings.max_body_bytes,
            max_upload_bytes=settings.max_artifact_bytes + MULTIPART_OVERHEAD_BYTES,
            max_concurrent=settings.max_concurrent_requests,
            timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
        )

    def body_limit(self, method: str, path: str) -> tuple[int, str]:
        """The byte limit of a route's body and the setting it comes from (for the 413 message)."""
        if (method, path.rstrip("/")) in UPLOAD_ROUTES:
            return self.max_upload_bytes, "max_artifact_bytes plus 1 MiB of multipart overhead"
        return self.max_body_bytes, "max_body_bytes"


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once the streamed body passes the limit; turned into a 413 here."""


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.in_flight = 0

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

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: PtserveError) -> None:
        status = http_status(error)
        body = error_body(error.code, error.message, request_state(scope).get("request_id"))
        headers = http_headers(status, self.limits.retry_after_s)
        if status == 413:
            # The rest of the body is not read; the client must not reuse this connection.
            headers["Connection"] = "close"
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


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
