"""The error hierarchy shared by every ptserve component.

Each class carries a stable machine-readable ``code``; the HTTP status for each class is decided
in one place (``service/errors.py``), so nothing under ``prompts/`` knows about HTTP.
"""

from __future__ import annotations

from typing import ClassVar


class PtserveError(Exception):
    """Base of every error ptserve raises on purpose; the message is shown to the user."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(PtserveError):
    """The caller sent something that cannot be processed as it is."""

    code = "invalid_input"


class InvalidTaskNameError(InvalidInputError):
    code = "invalid_task_name"


class ArtifactError(InvalidInputError):
    """A prompt artifact is malformed: not safetensors, bad manifest, wrong shapes, NaN values, ..."""

    code = "invalid_artifact"


class IncompatibleArtifactError(ArtifactError):
    """A well-formed artifact that was trained on another backbone."""

    code = "incompatible_artifact"


class ArtifactTooLargeError(ArtifactError):
    code = "artifact_too_large"


class NotFoundError(PtserveError):
    code = "not_found"


class TaskNotFoundError(NotFoundError):
    code = "task_not_found"


class VersionNotFoundError(NotFoundError):
    code = "version_not_found"


class StoreError(PtserveError):
    """The prompt store failed to read or write (disk error, corrupt pointer, ...)."""

    code = "store_error"


class StoreUnavailableError(StoreError):
    """The prompt store cannot be reached right now (e.g. Redis is down); retrying later may work."""

    code = "store_unavailable"


class StoreFullError(StoreError):
    """The store has no space left for a write."""

    code = "store_full"


class BackboneError(PtserveError):
    """The backbone directory cannot be loaded as a backbone of a supported family."""

    code = "backbone_error"
