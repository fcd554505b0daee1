"""Task-name and version-string rules, shared by the artifact, the stores and the HTTP layer."""

from __future__ import annotations

import re

from prompts.errors import InvalidTaskNameError, VersionNotFoundError

# Lower-case, starts with a letter or digit, at most 64 characters: safe as a file name, a Redis key
# part and a URL path segment, with no separators and no "." or ".." alone.
TASK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# Versions are hex content hashes (see prompts.artifact.content_version).
VERSION_PATTERN = re.compile(r"[0-9a-f]{8,64}")


def validate_task_name(task: object) -> str:
    """Return ``task`` if it is an allowed task name, else raise with what was expected and found."""
    if not isinstance(task, str):
        raise InvalidTaskNameError(f"task name must be a string, got {type(task).__name__}")
    if TASK_NAME_PATTERN.fullmatch(task) is None:
        shown = task if len(task) <= 80 else task[:77] + "..."
        raise InvalidTaskNameError(
            f"invalid task name {shown!r} ({len(task)} characters): expected 1-64 characters of "
            "a-z, 0-9, '_', '.', '-', starting with a letter or digit"
        )
    return task


def validate_version(task: str, version: str) -> str:
    """Versions that are not well-formed hashes cannot exist in any store."""
    if VERSION_PATTERN.fullmatch(version) is None:
        raise VersionNotFoundError(
            f"task {task!r} has no version {version!r} (versions are hex content hashes)"
        )
    return version
