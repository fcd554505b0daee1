"""The ``PromptStore`` protocol: where task artifacts live, with a current-version pointer per task.

Stores deal in already-validated artifact bytes plus the manifest JSON; they never parse tensors.
Every method is synchronous and may block on I/O: the service calls them off the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prompts.errors import ArtifactError
from prompts.names import validate_task_name, validate_version


@dataclass(frozen=True)
class StoredArtifact:
    """The raw bytes of one artifact version as read from a store."""

    task: str
    version: str
    data: bytes


@dataclass(frozen=True)
class TaskRecord:
    """One task as listed by a store: its current version and that version's manifest."""

    task: str
    version: str
    manifest: dict[str, Any]
    size_bytes: int
    versions: tuple[str, ...]  # newest first, the current one included


def check_put(task: str, version: str, manifest_json: str) -> None:
    """Validate ``put``'s arguments the same way in every store (the manifest must be a JSON object)."""
    validate_task_name(task)
    validate_version(task, version)
    try:
        manifest = json.loads(manifest_json)
    except ValueError as exc:
        raise ArtifactError(f"manifest for task {task!r} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"manifest for task {task!r} must be a JSON object")


@runtime_checkable
class PromptStore(Protocol):
    """Artifacts stored under (task, version), with an atomically moved current-version pointer."""

    def put(self, task: str, version: str, data: bytes, manifest_json: str) -> None:
        """Store ``data`` as ``version`` of ``task`` and make it current, atomically.

        Readers see the old current version or the new one, never a partial write. Putting a
        version that already exists only moves the pointer. Older versions are kept (bounded).
        """
        ...

    def get(self, task: str, version: str | None = None) -> StoredArtifact:
        """The current version (or the named one). Raises TaskNotFoundError / VersionNotFoundError."""
        ...

    def current_version(self, task: str) -> str:
        """The version the pointer names. Raises TaskNotFoundError."""
        ...

    def set_current(self, task: str, version: str) -> None:
        """Move the pointer to an existing version (rollback). Raises Task/VersionNotFoundError."""
        ...

    def current_versions(self, tasks: Sequence[str]) -> dict[str, str | None]:
        """Pointers only, for many tasks at once: None for a task without one.

        A corrupt pointer leaves its task out of the result. Used to reconcile a cache with the
        store after change messages may have been missed.
        """
        ...

    def versions(self, task: str) -> list[str]:
        """Stored versions, newest first. Raises TaskNotFoundError."""
        ...

    def list_tasks(self) -> list[TaskRecord]:
        """Every task with its current version's manifest, sorted by task name, without tensors."""
        ...

    def record(self, task: str) -> TaskRecord:
        """One task as ``list_tasks`` would show it. Raises TaskNotFoundError."""
        ...

    def delete(self, task: str) -> None:
        """Remove the task and all its versions. Raises TaskNotFoundError."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailableError if the store cannot be used right now."""
        ...

    def close(self) -> None: ...
