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


# Most specific first; the first class an error is an instance of decides its status.
HTTP_STATUS: list[tuple[type[PtserveError], int]] = [
    (PayloadTooLargeError, 413),
    (ArtifactTooLargeError, 413),
    (IncompatibleArtifactError, 422),
    (ArtifactError, 422),
    (InvalidInputError, 422),
    (NotFoundError, 404),
    (TaskUnavailableError, 409),
    (OverloadedError, 429),
    (ShuttingDownError, 503),
    (JobsDisabledError, 503),
    (StoreFullError, 507),
    (StoreUnavailableError, 503),
    (StoreError, 500),
    (BackboneError, 500),
    (PtserveError, 500),
]


def http_status(error: PtserveError) -> int:
    for cls, status in HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500
