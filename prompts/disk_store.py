"""``DiskPromptStore``: the embedded default ``PromptStore``, a directory shared by several processes.

Layout under ``root``::

    tasks/<task>/current                       current version, one line
    tasks/<task>/history                       stored versions, newest first, one per line
    tasks/<task>/versions/<version>.safetensors  artifact bytes
    tasks/<task>/versions/<version>.json         manifest JSON (so listing never reads tensors)
    locks/<task>.lock                          flock held by writers of <task>
    .trash/                                    deleted task directories on their way out
    changes                                    a random token rewritten after every change

Every file is written to a ``.tmp-*`` sibling, fsynced and renamed into place, and the ``current``
pointer is written after the version's files: the pointer rename is the commit point, so a crash at
any moment leaves the previous version current and complete. Writers of one task serialise on an
``fcntl.flock``; readers take no lock and rely on renames being atomic.

Other processes notice changes through ``changes``: every put, set_current and delete rewrites it
with a fresh random token after moving the pointer, so a reader that sees a token it has not seen
before and then reads pointers sees every change made before that token was written. A token, not
an mtime, because timestamps can be too coarse to tell two changes in the same tick apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prompts.errors import (
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from prompts.names import TASK_NAME_PATTERN, VERSION_PATTERN, validate_task_name, validate_version
from prompts.store import StoredArtifact, TaskRecord, check_put

__all__ = ["DiskPromptStore"]

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
ARTIFACT_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
# A reader can lose a race with a writer that moves the pointer and prunes the version it just read;
# re-reading the pointer a few times tells that apart from a pointer naming a missing version.
_READ_RETRIES = 5
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# Test-only fault injection (tests/service/test_faults.py), off unless this variable is set to
# "<stage>:<task>:<marker file>" (stage: artifact_half_written, before_pointer or before_history):
# a put of <task> that reaches <stage> creates the marker and then blocks for good, so a test can
# SIGKILL the process at exactly that point of the write.
PAUSE_ENV = "PTSERVE_TEST_PAUSE_AT"


def _pause_point(stage: str, task: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    want_stage, _, rest = spec.partition(":")
    want_task, _, marker = rest.partition(":")
    if (want_stage, want_task) != (stage, task):
        return
    logger.warning("prompt store: pausing the put of task %r at %s (%s is set)", task, stage, PAUSE_ENV)
    Path(marker).write_text(f"{os.getpid()}\n")
    threading.Event().wait()


def _write_error(path: Path, exc: OSError) -> StoreError:
    """Translate an OSError raised while writing ``path`` into the store error callers act on."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL_ERRNOS:
        return StoreFullError(f"prompt store is full: cannot write {path}: {reason}")
    if exc.errno in _READ_ONLY_ERRNOS:
        return StoreError(f"prompt store path {path} is read-only or not writable: {reason}")
    return StoreError(f"prompt store failed to write {path}: {reason}")


def _fsync_dir(path: Path) -> None:
    """Persist renames and creations inside ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync directories; the rename is still atomic there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, pause: tuple[str, str] | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
    replaced = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            written = 0
            # With a pause (tests only) the first half reaches the file before the writer stops.
            stop_at = len(data) // 2 if pause is not None else len(data)
            while written < len(data):
                if pause is not None and written >= stop_at:
                    _pause_point(*pause)
                    stop_at = len(data)
                # os.write may write less than asked (signals, pipes), so loop until done.
                written += os.write(fd, view[written:stop_at])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if not replaced:
            # Best effort: a hard crash can still leave it, and the next put to the task removes it.
            with contextlib.suppress(OSError):
                tmp.unlink()


class DiskPromptStore:
    """A ``PromptStore`` in a local directory, safe for several processes sharing it."""

    def __init__(self, root: str | Path, keep_versions: int = 10) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.root = Path(root)
        self.keep_versions = keep_versions
        self._tasks = self.root / "tasks"
        self._locks = self.root / "locks"
        self._trash = self.root / ".trash"
        try:
            self._tasks.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot create prompt store at {self.root}: {exc.strerror or exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"DiskPromptStore({str(self.root)!r}, keep_versions={self.keep_versions})"

    # ----------------------------------------------------------------------------------- paths

    def _task_dir(self, task: str) -> Path:
        # A tenant's "team/name" lives in one flat directory "team~name": "~" is in no name.
        return self._tasks / task.replace("/", "~")

    def _versions_dir(self, task: str) -> Path:
        return self._task_dir(task) / "versions"

    def _artifact_path(self, task: str, version: str) -> Path:
        return self._versions_dir(task) / f"{version}{ARTIFACT_SUFFIX}"

    def _manifest_path(self, task: str, version: str) -> Path:
        return self._versions_dir(task) / f"{version}{MANIFEST_SUFFIX}"

    # ---------------------------------------------------------------------------------- reading

    def _read_pointer(self, task: str) -> str:
        """The version named by the pointer; TaskNotFoundError if the task has none."""
        path = self._task_dir(task) / "current"
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise TaskNotFoundError(f"unknown task {task!r}") from None
        except OSError as exc:
            raise StoreError(f"cannot read current-version pointer {path}: {exc.strerror or exc}") from exc
        try:
            version = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            version = ""
        if VERSION_PATTERN.fullmatch(version) is None:
            shown = raw[:80]
            raise StoreError(f"corrupt current-version pointer for task {task!r} at {path}: {shown!r}")
        return version

    def _read_history(self, task: str) -> list[str]:
        """History entries, newest first; garbage lines are skipped rather than trusted."""
        path = self._task_dir(task) / "history"
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"cannot read version history {path}: {exc.strerror or exc}") from exc
        seen: set[str] = set()
        out: list[str] = []
        for line in text.splitlines():
            version = line.strip()
            if VERSION_PATTERN.fullmatch(version) and version not in seen:
                seen.add(version)
                out.append(version)
        return out

    def _stored_versions(self, task: str) -> list[str]:
        """Committed versions whose artifact is on disk, newest first (crash leftovers excluded)."""
        return [v for v in self._read_history(task) if self._artifact_path(task, v).is_file()]

    def _require_task(self, task: str) -> None:
        """TaskNotFoundError unless ``task`` has a pointer file (whatever it holds)."""
        if not (self._task_dir(task) / "current").is_file():
            raise TaskNotFoundError(f"unknown task {task!r}")

    def _has_version(self, task: str, version: str) -> bool:
        if version in self._stored_versions(task):
            return True
        # The current version may not be in history yet (crash between pointer and history).
        try:
            return version == self._read_pointer(task) and self._artifact_path(task, version).is_file()
        except StoreError:
            return False

    def _resolve_current(self, task: str) -> str:
        """The current version, checked to exist; StoreError if the pointer names a missing version."""
        previous: str | None = None
        for _ in range(_READ_RETRIES):
            version = self._read_pointer(task)
            if self._artifact_path(task, version).is_file():
                return version
            if version == previous:
                break
            previous = version
        raise StoreError(
            f"current-version pointer for task {task!r} names version {previous!r}, "
            "which is not in the store (the store is corrupt; set_current or re-put to repair)"
        )

    def _read_file(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------------------- public API

    def get(self, task: str, version: str | None = None) -> StoredArtifact:
        """The current version (or the named one). Raises TaskNotFoundError / VersionNotFoundError."""
        validate_task_name(task)
        if version is not None:
            self._require_task(task)  # an unknown task wins over an unknown version
            validate_version(task, version)
            if not self._has_version(task, version):
                raise VersionNotFoundError(f"task {task!r} has no version {version!r}")
            try:
                return StoredArtifact(task, version, self._read_file(self._artifact_path(task, version)))
            except FileNotFoundError:
                self._require_task(task)  # deleted meanwhile -> TaskNotFoundError
                raise VersionNotFoundError(f"task {task!r} has no version {version!r}") from None
        for _ in range(_READ_RETRIES):
            current = self._resolve_current(task)
            try:
                data = self._read_file(self._artifact_path(task, current))
            except FileNotFoundError:
                continue  # pruned between the pointer read and the open: read the new pointer
            return StoredArtifact(task, current, data)
        raise StoreError(f"could not read the current version of task {task!r}: it kept changing")

    def current_version(self, task: str) -> str:
        """The version the pointer names. Raises TaskNotFoundError."""
        validate_task_name(task)
        return self._resolve_current(task)

    def current_versions(self, tasks: Sequence[str]) -> dict[str, str | None]:
        """Pointers only: None for a task without one; a corrupt pointer leaves its task out."""
        out: dict[str, str | None] = {}
        for task in tasks:
            if TASK_NAME_PATTERN.fullmatch(task) is None:
                continue
            try:
                out[task] = self._read_pointer(task)
            except TaskNotFoundError:
                out[task] = None
            except StoreError as exc:
                logger.warning("prompt store: %s", exc.message)
        return out

    def change_token(self) -> str:
        """The token the last change wrote ('' before the first); see the module docstring."""
        try:
            return (self.root / "changes").read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot read {self.root / 'changes'}: {exc.strerror or exc}"
            ) from exc

    def _note_change(self) -> None:
        """Write a fresh change token (after the pointer moved; see the module docstring)."""
        path = self.root / "changes"
        tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}-changes")
        try:
            # No fsync: the token only has to differ from earlier ones, not survive a crash.
            tmp.write_bytes(secrets.token_hex(16).encode("ascii"))
            os.replace(tmp, path)
        except OSError as exc:
            # The change itself is done; watchers fall back on their pointer TTL.
            logger.warning("prompt store: could not write change token %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def versions(self, task: str) -> list[str]:
        """Stored versions, newest first, the current one included. Raises TaskNotFoundError."""
        validate_task_name(task)
        return self._versions_with(task, self._resolve_current(task))

    def _versions_with(self, task: str, current: str) -> list[str]:
        stored = self._stored_versions(task)
        # The pointer is the commit point and history is written after it, so a crash in between
        # leaves a current version that history does not know yet: it is the newest one.
        return stored if current in stored else [current, *stored]

    def list_tasks(self) -> list[TaskRecord]:
        """Every task with its current version's manifest, sorted by task name, without tensors."""
        try:
            names = sorted(os.listdir(self._tasks))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {self._tasks}: {exc.strerror or exc}") from exc
        records: list[TaskRecord] = []
        for name in sorted(entry.replace("~", "/") for entry in names):
            if TASK_NAME_PATTERN.fullmatch(name) is None:
                continue
            try:
                record = self._task_record(name)
            except StoreError as exc:
                # One damaged task must not hide every other task from the listing.
                logger.warning("skipping task %r in listing: %s", name, exc.message)
                continue
            if record is not None:
                records.append(record)
        return records

    def record(self, task: str) -> TaskRecord:
        """One task's listing entry. Raises TaskNotFoundError."""
        validate_task_name(task)
        record = self._task_record(task)
        if record is None:
            raise TaskNotFoundError(f"unknown task {task!r}")
        return record

    def _task_record(self, task: str) -> TaskRecord | None:
        """The record for ``task``, or None if it is half-created or was deleted meanwhile."""
        for _ in range(_READ_RETRIES):
            try:
                current = self._resolve_current(task)
                versions = self._versions_with(task, current)
                size = self._artifact_path(task, current).stat().st_size
                raw = self._read_file(self._manifest_path(task, current))
            except TaskNotFoundError:
                return None
            except FileNotFoundError:
                continue  # pruned or deleted under us: look again
            except OSError as exc:
                raise StoreError(f"cannot read task {task!r}: {exc.strerror or exc}") from exc
            try:
                manifest: Any = json.loads(raw)
            except ValueError as exc:
                raise StoreError(
                    f"corrupt manifest for task {task!r} version {current!r} at "
                    f"{self._manifest_path(task, current)}: {exc}"
                ) from exc
            if not isinstance(manifest, dict):
                raise StoreError(
                    f"corrupt manifest for task {task!r} version {current!r}: expected a JSON object"
                )
            return TaskRecord(task, current, manifest, size, tuple(versions))
        raise StoreError(f"could not read task {task!r}: it kept changing")

    def ping(self) -> None:
        """Raise StoreUnavailableError if the store root is not a writable directory."""
        if not self.root.is_dir():
            raise StoreUnavailableError(f"prompt store root {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnavailableError(f"prompt store root {self.root} is not writable")

    def close(self) -> None:
        """Nothing to release: no file stays open between calls."""

    # ---------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _locked(self, task: str) -> Iterator[None]:
        """Exclusive writer lock for ``task`` across processes and threads."""
        # Lock files live outside the task directory so delete can move that directory away
        # while another writer waits on the lock, and are never removed (that would race too).
        path = self._locks / f"{self._task_dir(task).name}.lock"
        try:
            self._locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _remove_temp_files(self, task: str) -> None:
        """Drop ``.tmp-*`` files a crashed writer left (the lock guarantees none is in use)."""
        for directory in (self._task_dir(task), self._versions_dir(task)):
            try:
                entries = os.listdir(directory)
            except OSError:
                continue
            for entry in entries:
                if entry.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        (directory / entry).unlink()

    def _ensure_task_dirs(self, task: str) -> None:
        versions_dir = self._versions_dir(task)
        if versions_dir.is_dir():
            return
        try:
            versions_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self._tasks)
            _fsync_dir(self._task_dir(task))
        except OSError as exc:
            raise _write_error(versions_dir, exc) from exc

    def put(self, task: str, version: str, data: bytes, manifest_json: str) -> None:
        """Store ``data`` as ``version`` of ``task`` and make it current, atomically.

        Putting a version that already exists only moves the pointer and makes it the newest in
        the history. Afterwards versions beyond ``keep_versions`` are pruned, never the current one.
        """
        check_put(task, version, manifest_json)
        with self._locked(task):
            self._remove_temp_files(task)
            self._ensure_task_dirs(task)
            artifact = self._artifact_path(task, version)
            sidecar = self._manifest_path(task, version)
            if not (artifact.is_file() and sidecar.is_file()):
                # Sidecar first: an artifact on disk then implies its manifest is there too.
                _atomic_write(sidecar, manifest_json.encode("utf-8"))
                _atomic_write(artifact, data, pause=("artifact_half_written", task))
            _pause_point("before_pointer", task)
            _atomic_write(self._task_dir(task) / "current", f"{version}\n".encode("ascii"))
            _pause_point("before_history", task)
            # Entries whose files are gone must not count against keep_versions.
            history = [version, *(v for v in self._stored_versions(task) if v != version)]
            self._write_history_and_prune(task, version, history)
            self._note_change()

    def set_current(self, task: str, version: str) -> None:
        """Move the pointer to an existing version (rollback). Raises Task/VersionNotFoundError.

        The history order is left alone: a rolled-back version is not the newest one.
        """
        validate_task_name(task)
        with self._locked(task):
            # Only require the pointer file to exist, so set_current can repair a corrupt one.
            self._require_task(task)
            validate_version(task, version)
            if not self._has_version(task, version):
                raise VersionNotFoundError(f"task {task!r} has no version {version!r}")
            _atomic_write(self._task_dir(task) / "current", f"{version}\n".encode("ascii"))
            self._note_change()

    def _write_history_and_prune(self, task: str, current: str, history: list[str]) -> None:
        """Record ``history`` cut to ``keep_versions`` and delete what fell off (and crash leftovers).

        Runs after the pointer moved, so the put has already succeeded: failures here are logged,
        not raised, and the next put retries the cleanup.
        """
        others = [v for v in history if v != current][: self.keep_versions - 1]
        keep = [v for v in history if v == current or v in others]
        try:
            _atomic_write(self._task_dir(task) / "history", "".join(f"{v}\n" for v in keep).encode("ascii"))
        except StoreError as exc:
            logger.warning("prompt store: could not update history of task %r: %s", task, exc)
            return  # pruning files without a history that forgets them would list missing versions
        kept = set(keep)
        versions_dir = self._versions_dir(task)
        try:
            entries = sorted(os.listdir(versions_dir))
        except OSError as exc:
            logger.warning("prompt store: could not list %s for pruning: %s", versions_dir, exc)
            return
        # Artifacts before sidecars, so an artifact on disk always has its manifest.
        entries.sort(key=lambda entry: not entry.endswith(ARTIFACT_SUFFIX))
        for entry in entries:
            stem, _, _ = entry.partition(".")
            if entry.startswith(TMP_PREFIX) or stem in kept:
                continue
            try:
                (versions_dir / entry).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("prompt store: could not prune %s: %s", versions_dir / entry, exc)

    def delete(self, task: str) -> None:
        """Remove the task and all its versions. Raises TaskNotFoundError."""
        validate_task_name(task)
        with self._locked(task):
            task_dir = self._task_dir(task)
            if not task_dir.is_dir():
                raise TaskNotFoundError(f"unknown task {task!r}")
            had_pointer = (task_dir / "current").is_file()
            # One rename makes the whole task vanish for readers at once; the slow rmtree happens
            # out of their sight.
            doomed = self._trash / f"{task_dir.name}-{secrets.token_hex(8)}"
            try:
                self._trash.mkdir(exist_ok=True)
                os.replace(task_dir, doomed)
            except OSError as exc:
                raise _write_error(task_dir, exc) from exc
            with contextlib.suppress(OSError):
                _fsync_dir(self._tasks)  # the task is gone either way; durability is best effort
            if had_pointer:
                self._note_change()
            self._empty_trash()
            if not had_pointer:
                # A half-created directory from a crashed first put: cleaned up, but never a task.
                raise TaskNotFoundError(f"unknown task {task!r}")

    def _empty_trash(self) -> None:
        """Remove everything in the trash, including what a crashed delete left behind."""
        try:
            entries = os.listdir(self._trash)
        except OSError:
            return
        for entry in entries:
            # Another process may be removing the same entry right now; errors are harmless.
            shutil.rmtree(self._trash / entry, ignore_errors=True)
