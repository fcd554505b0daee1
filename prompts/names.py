"""Task-name and version-string rules, shared by the artifact, the stores and the HTTP layer."""

from __future__ import annotations

import re

from prompts.errors import InvalidTaskNameError, VersionNotFoundError

# A tenant: lower-case, starts with a letter or digit, at most 32 characters, no "." (never "." or "..").
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# A task's own name: lower-case, starts with a letter or digit, at most 64 characters: safe as a file
# name, a Redis key part and a URL path segment, with no separators and no "." or ".." alone.
BARE_TASK_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# A task name as stores and routes know it: a bare name (the platform's own namespace, where every
# task of a single-tenant deployment lives) or ``tenant/name`` (that tenant's namespace).
TASK_NAME_PATTERN = re.compile(rf"(?:{TENANT_PATTERN.pattern}/)?{BARE_TASK_PATTERN.pattern}")
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
            "a-z, 0-9, '_', '.', '-', starting with a letter or digit, optionally after a tenant and "
            "a '/' (1-32 characters of a-z, 0-9, '_', '-')"
        )
    return task


def validate_tenant(tenant: object) -> str:
    if not isinstance(tenant, str) or TENANT_PATTERN.fullmatch(tenant) is None:
        shown = repr(tenant)[:80]
        raise InvalidTaskNameError(
            f"invalid tenant {shown}: expected 1-32 characters of a-z, 0-9, '_', '-', starting with a "
            "letter or digit"
        )
    return tenant


def split_task(task: str) -> tuple[str | None, str]:
    """(tenant, bare name) of a valid task name; the tenant is None in the platform namespace."""
    tenant, slash, bare = task.partition("/")
    return (tenant, bare) if slash else (None, task)


def tenant_of(task: str) -> str | None:
    return split_task(task)[0]


def validate_version(task: str, version: str) -> str:
    """Versions that are not well-formed hashes cannot exist in any store."""
    if VERSION_PATTERN.fullmatch(version) is None:
        raise VersionNotFoundError(
            f"task {task!r} has no version {version!r} (versions are hex content hashes)"
        )
    return version
