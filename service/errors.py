"""Service-level errors and the one table that maps every ptserve error to an HTTP status."""

from __future__ import annotations

from prompts.errors import (
    ArtifactError,
    ArtifactTooLargeError,
    BackboneError,
    IncompatibleArtifactError,
    InvalidInputError,
    NotFoundError,
    PtserveError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)


class TaskUnavailableError(PtserveError):
    """A stored task exists but cannot be served by this replica (corrupt, or for another backbone)."""

    code = "task_unavailable"


class OverloadedError(PtserveError):
    """Too much work queued; retrying later may work."""

    code = "overloaded"


class ShuttingDownError(PtserveError):
    """The replica is draining and takes no new work."""

    code = "shutting_down"


class JobsDisabledError(PtserveError):
    """This replica has no training-job queue configured."""

    code = "jobs_disabled"


class PayloadTooLargeError(InvalidInputError):
    code = "payload_too_large"


class UnauthorizedError(PtserveError):
    """No API key, or one that is not configured."""

    code = "unauthorized"


class ForbiddenError(PtserveError):
    """A valid API key without the scope the route needs."""

    code = "forbidden"


class TooManyRequestsError(OverloadedError):
    """The replica handles ``max_concurrent_requests`` already."""

    code = "too_many_requests"


class RateLimitedError(OverloadedError):
    """The key spent its token bucket; ``retry_after_s`` says when the next request would pass."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyNotFoundError(NotFoundError):
    """No API key has that public id."""

    code = "key_not_found"


class RequestTimeoutError(PtserveError):
    """The request did not finish within ``request_timeout_s``."""

    code = "request_timeout"


class SettingsError(PtserveError):
    """Settings that are valid one by one but cannot run together (e.g. auth on without keys)."""

    code = "invalid_settings"


class EngineUnavailableError(PtserveError):
    """A front end of ``serve --frontends`` cannot reach its engine process (restarting, or gone)."""

    code = "engine_unavailable"


class RelayedError(PtserveError):
    """An error the engine process answered a front end's call with: its status and code as they are."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        # Per instance: the engine's error class is not known here, only its code.
        self.code = code  # type: ignore[misc]
        self.retry_after_s = retry_after_s  # the engine's own Retry-After (a key's bucket), if any


# Most specific first; the first class an error is an instance of decides its status.
HTTP_STATUS: list[tuple[type[PtserveError], int]] = [
    (PayloadTooLargeError, 413),
    (ArtifactTooLargeError, 413),
    (IncompatibleArtifactError, 422),
    (ArtifactError, 422),
    (InvalidInputError, 422),
    (NotFoundError, 404),
    (UnauthorizedError, 401),
    (ForbiddenError, 403),
    (TaskUnavailableError, 409),
    (OverloadedError, 429),
    (ShuttingDownError, 503),
    (EngineUnavailableError, 503),
    (JobsDisabledError, 503),
    (RequestTimeoutError, 504),
    (StoreFullError, 507),
    (StoreUnavailableError, 503),
    (StoreError, 500),
    (BackboneError, 500),
    (PtserveError, 500),
]


def http_status(error: PtserveError) -> int:
    if isinstance(error, RelayedError):
        return error.status
    for cls, status in HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500


def http_headers(status: int, retry_after_s: int) -> dict[str, str]:
    """Headers a status needs by the HTTP spec (RFC 9110): a challenge for 401, when to retry a 429."""
    if status == 401:
        return {"WWW-Authenticate": 'Bearer realm="ptserve"'}
    if status in (429, 503):
        return {"Retry-After": str(retry_after_s)}
    return {}


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, dict[str, str]]:
    """The JSON body of every error response."""
    error = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}
