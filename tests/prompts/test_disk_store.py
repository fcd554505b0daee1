"""Tests for ``DiskPromptStore``: the protocol contract, crash safety and several writers at once."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prompts.disk_store import DiskPromptStore
from prompts.errors import (
    InvalidTaskNameError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from prompts.store import PromptStore, StoredArtifact

V1, V2, V3, V4, V5 = (f"{i:08x}" for i in range(0xA1, 0xA6))
BAD_NAMES = ["../etc", "a/b/c", "a.b/c", "/b", "a/", "Upper", "x" * 65, "", ".hidden", "..", "a\x00b"]


def manifest(task: str = "t", **extra: Any) -> str:
    return json.dumps({"task": task, "labels": ["a", "b"], **extra})


def data_for(version: str) -> bytes:
    return f"artifact-{version}".encode() * 3


def put(store: DiskPromptStore, task: str, version: str) -> None:
    store.put(task, version, data_for(version), manifest(task, v=version))


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


@pytest.fixture
def store(tmp_path: Path) -> DiskPromptStore:
    return DiskPromptStore(tmp_path / "store")


def fail_replace_when(monkeypatch: pytest.MonkeyPatch, predicate: Callable[[Path], bool]) -> list[Path]:
    """Make the module's ``os.replace`` fail for destinations matching ``predicate``."""
    real_replace = os.replace
    hits: list[Path] = []

    def fake_replace(src: Any, dst: Any) -> None:
        if predicate(Path(dst)):
            hits.append(Path(dst))
            raise OSError(errno.EIO, "simulated failure during rename", str(dst))
        real_replace(src, dst)

    # The module calls os.replace through the os module, so patching the attribute reaches it.
    monkeypatch.setattr(os, "replace", fake_replace)
    return hits


# ------------------------------------------------------------------------------------ contract


def test_is_a_prompt_store(store: DiskPromptStore) -> None:
    assert isinstance(store, PromptStore)


def test_creates_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    DiskPromptStore(root).ping()
    assert (root / "tasks").is_dir()


def test_keep_versions_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_versions"):
        DiskPromptStore(tmp_path, keep_versions=0)


def test_put_get_round_trip(store: DiskPromptStore) -> None:
    put(store, "sentiment", V1)
    got = store.get("sentiment")
    assert (got.task, got.version, got.data) == ("sentiment", V1, data_for(V1))
    assert store.current_version("sentiment") == V1
    assert store.versions("sentiment") == [V1]


def test_get_explicit_older_version_and_newest_first(store: DiskPromptStore) -> None:
    for v in (V1, V2, V3):
        put(store, "t", v)
    assert store.current_version("t") == V3
    assert store.versions("t") == [V3, V2, V1]
    assert store.get("t", V1).data == data_for(V1)
    assert store.get("t").version == V3


def test_set_current_rolls_back(store: DiskPromptStore) -> None:
    put(store, "t", V1)
    put(store, "t", V2)
    store.set_current("t", V1)
    assert store.current_version("t") == V1
    assert store.get("t") == StoredArtifact("t", V1, data_for(V1))
    # A rollback does not make the old version the newest one.
    assert store.versions("t") == [V2, V1]
    assert store.list_tasks()[0].version == V1


def test_set_current_unknown(store: DiskPromptStore) -> None:
    put(store, "t", V1)
    with pytest.raises(VersionNotFoundError, match=V2):
        store.set_current("t", V2)
    with pytest.raises(VersionNotFoundError):
        store.set_current("t", "not-a-hash")
    with pytest.raises(TaskNotFoundError, match="'nope'"):
        store.set_current("nope", V1)
    assert store.current_version("t") == V1


def test_unknown_task_and_version(store: DiskPromptStore) -> None:
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.get("nope")
    with pytest.raises(TaskNotFoundError):
        store.get("nope", V1)
    with pytest.raises(TaskNotFoundError):
        store.current_version("nope")
    with pytest.raises(TaskNotFoundError):
        store.versions("nope")
    put(store, "t", V1)
    with pytest.raises(VersionNotFoundError, match=rf"'t'.*'{V2}'"):
        store.get("t", V2)
    with pytest.raises(VersionNotFoundError):
        store.get("t", "../../etc/passwd")


def test_list_tasks_reads_sidecars_only(store: DiskPromptStore) -> None:
    # The artifact bytes are not safetensors at all: listing must not parse them.
    store.put("zeta", V1, b"\x00not-a-tensor-file", manifest("zeta"))
    put(store, "alpha", V1)
    put(store, "alpha", V2)
    records = store.list_tasks()
    assert [r.task for r in records] == ["alpha", "zeta"]
    alpha, zeta = records
    assert alpha.version == V2
    assert alpha.manifest == {"task": "alpha", "labels": ["a", "b"], "v": V2}
    assert alpha.size_bytes == len(data_for(V2))
    assert alpha.versions == (V2, V1)
    assert zeta.manifest["task"] == "zeta"
    assert zeta.size_bytes == len(b"\x00not-a-tensor-file")


def test_list_tasks_skips_half_created_task(store: DiskPromptStore) -> None:
    put(store, "good", V1)
    (store.root / "tasks" / "half" / "versions").mkdir(parents=True)
    (store.root / "tasks" / ".tmp-junk").write_text("x")
    assert [r.task for r in store.list_tasks()] == ["good"]
    with pytest.raises(TaskNotFoundError):
        store.get("half")


def test_delete(store: DiskPromptStore) -> None:
    put(store, "t", V1)
    put(store, "other", V1)
    store.delete("t")
    with pytest.raises(TaskNotFoundError):
        store.get("t")
    assert [r.task for r in store.list_tasks()] == ["other"]
    assert not (store.root / "tasks" / "t").exists()
    assert list((store.root / ".trash").iterdir()) == []
    with pytest.raises(TaskNotFoundError):
        store.delete("t")
    # The name can be reused afterwards.
    put(store, "t", V2)
    assert store.versions("t") == [V2]


def test_delete_removes_half_created_dir_but_reports_unknown(store: DiskPromptStore) -> None:
    (store.root / "tasks" / "half" / "versions").mkdir(parents=True)
    with pytest.raises(TaskNotFoundError):
        store.delete("half")
    assert not (store.root / "tasks" / "half").exists()


def test_pruning_keeps_exactly_keep_versions(tmp_path: Path) -> None:
    store = DiskPromptStore(tmp_path, keep_versions=3)
    for v in (V1, V2, V3, V4, V5):
        put(store, "t", v)
    assert store.versions("t") == [V5, V4, V3]
    files = sorted(p.name for p in (tmp_path / "tasks" / "t" / "versions").iterdir())
    assert files == sorted(f"{v}{ext}" for v in (V3, V4, V5) for ext in (".json", ".safetensors"))
    with pytest.raises(VersionNotFoundError):
        store.get("t", V1)


def test_pruning_never_removes_current(tmp_path: Path) -> None:
    # A put always makes its own version current, so the guard matters when the current version
    # is not the newest: prune directly after a rollback to the oldest version.
    service = DiskPromptStore(tmp_path, keep_versions=10)
    for v in (V1, V2, V3):
        put(service, "t", v)
    service.set_current("t", V1)
    worker = DiskPromptStore(tmp_path, keep_versions=2)
    worker._write_history_and_prune("t", V1, [V3, V2, V1])
    assert worker.current_version("t") == V1
    assert worker.versions("t") == [V3, V1]
    assert worker.get("t").data == data_for(V1)
    assert not (tmp_path / "tasks" / "t" / "versions" / f"{V2}.safetensors").exists()


def test_keep_one_version(tmp_path: Path) -> None:
    store = DiskPromptStore(tmp_path, keep_versions=1)
    for v in (V1, V2, V3):
        put(store, "t", v)
    assert store.versions("t") == [V3]
    assert store.get("t").data == data_for(V3)


def test_reput_existing_version_only_moves_pointer(store: DiskPromptStore) -> None:
    put(store, "t", V1)
    put(store, "t", V2)
    artifact = store.root / "tasks" / "t" / "versions" / f"{V1}.safetensors"
    inode = artifact.stat().st_ino
    store.put("t", V1, b"ignored: the version already exists", manifest("t", v="ignored"))
    assert store.current_version("t") == V1
    assert store.get("t").data == data_for(V1)
    assert artifact.stat().st_ino == inode
    assert store.versions("t") == [V1, V2]
    assert store.list_tasks()[0].manifest["v"] == V1


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_task_names(store: DiskPromptStore, name: str) -> None:
    before = sorted(p.relative_to(store.root.parent) for p in store.root.parent.rglob("*"))
    with pytest.raises(InvalidTaskNameError):
        store.put(name, V1, b"x", manifest())
    for call in (
        lambda: store.get(name),
        lambda: store.get(name, V1),
        lambda: store.current_version(name),
        lambda: store.versions(name),
        lambda: store.set_current(name, V1),
        lambda: store.delete(name),
    ):
        with pytest.raises(InvalidTaskNameError):
            call()
    after = sorted(p.relative_to(store.root.parent) for p in store.root.parent.rglob("*"))
    assert after == before


def test_invalid_version_on_put(store: DiskPromptStore) -> None:
    with pytest.raises(VersionNotFoundError):
        store.put("t", "../x", b"x", manifest())
    with pytest.raises(TaskNotFoundError):
        store.get("t")


def test_ping_and_close(tmp_path: Path) -> None:
    store = DiskPromptStore(tmp_path / "s")
    store.ping()
    store.close()
    (tmp_path / "s" / "tasks").rmdir()
    (tmp_path / "s").rmdir()
    (tmp_path / "s").write_text("now a file")
    with pytest.raises(StoreUnavailableError):
        store.ping()


def test_two_stores_see_each_others_writes(tmp_path: Path) -> None:
    a = DiskPromptStore(tmp_path)
    b = DiskPromptStore(tmp_path)
    put(a, "t", V1)
    assert b.get("t").data == data_for(V1)
    put(b, "t", V2)
    assert a.current_version("t") == V2
    b.set_current("t", V1)
    assert a.get("t").version == V1
    a.delete("t")
    assert b.list_tasks() == []


# --------------------------------------------------------------------------- failures and crashes


def assert_v1_served(root: Path) -> None:
    fresh = DiskPromptStore(root)
    got = fresh.get("t")
    assert (got.version, got.data) == (V1, data_for(V1))
    assert fresh.versions("t") == [V1]
    assert [(r.task, r.version) for r in fresh.list_tasks()] == [("t", V1)]


def test_interrupted_pointer_rename_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskPromptStore(tmp_path)
    put(store, "t", V1)
    with monkeypatch.context() as m:
        hits = fail_replace_when(m, lambda dst: dst.name == "current")
        with pytest.raises(StoreError, match="current"):
            put(store, "t", V2)
        assert hits
    assert_v1_served(tmp_path)
    assert tmp_files(tmp_path) == []
    put(store, "t", V3)
    assert store.versions("t") == [V3, V1]
    assert not (tmp_path / "tasks" / "t" / "versions" / f"{V2}.safetensors").exists()
    assert tmp_files(tmp_path) == []


def test_interrupted_artifact_rename_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskPromptStore(tmp_path)
    put(store, "t", V1)
    with monkeypatch.context() as m:
        hits = fail_replace_when(m, lambda dst: dst.suffix == ".safetensors")
        with pytest.raises(StoreError, match=V2):
            put(store, "t", V2)
        assert hits
    assert_v1_served(tmp_path)
    with pytest.raises(VersionNotFoundError):
        store.get("t", V2)
    put(store, "t", V2)
    assert store.get("t").data == data_for(V2)
    assert store.versions("t") == [V2, V1]
    assert tmp_files(tmp_path) == []


def _crash_during_pointer_rename(root: str) -> None:
    """Child process: die like SIGKILL right before the pointer rename, leaving its temp file."""
    real_replace = os.replace

    def dying_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "current":
            os._exit(17)
        real_replace(src, dst)

    os.replace = dying_replace  # type: ignore[assignment]  # only in this forked child
    store = DiskPromptStore(root)
    put(store, "t", V2)


def test_hard_crash_leaves_previous_and_temp_files_are_cleaned(tmp_path: Path) -> None:
    store = DiskPromptStore(tmp_path)
    put(store, "t", V1)
    proc = multiprocessing.get_context("fork").Process(
        target=_crash_during_pointer_rename, args=(str(tmp_path),)
    )
    proc.start()
    proc.join()
    assert proc.exitcode == 17
    leftovers = tmp_files(tmp_path)
    assert [p.parent.name for p in leftovers] == ["t"]  # the pointer's temp file
    assert_v1_served(tmp_path)
    with pytest.raises(VersionNotFoundError):
        store.get("t", V2)  # its files were written but never committed
    put(store, "t", V3)
    assert tmp_files(tmp_path) == []
    assert store.versions("t") == [V3, V1]
    assert not (tmp_path / "tasks" / "t" / "versions" / f"{V2}.safetensors").exists()


@pytest.mark.parametrize(
    ("err", "expected", "message"),
    [
        (errno.ENOSPC, StoreFullError, "prompt store is full"),
        (errno.EDQUOT, StoreFullError, "prompt store is full"),
        (errno.EROFS, StoreError, "read-only or not writable"),
        (errno.EACCES, StoreError, "read-only or not writable"),
    ],
)
def test_write_errors_keep_previous(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    expected: type[StoreError],
    message: str,
) -> None:
    store = DiskPromptStore(tmp_path)
    put(store, "t", V1)

    def failing_write(fd: int, data: Any) -> int:
        raise OSError(err, os.strerror(err))

    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write)
        with pytest.raises(expected, match=message) as info:
            put(store, "t", V2)
    assert str(tmp_path) in info.value.message
    if expected is StoreError:
        assert not isinstance(info.value, StoreFullError)
    assert_v1_served(tmp_path)
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"garbage!\n", b"\xff\xfe", b"ABCDEF0123\n"])
def test_corrupt_pointer(store: DiskPromptStore, content: bytes) -> None:
    put(store, "t", V1)
    (store.root / "tasks" / "t" / "current").write_bytes(content)
    with pytest.raises(StoreError, match="corrupt current-version pointer"):
        store.get("t")
    with pytest.raises(StoreError):
        store.current_version("t")
    with pytest.raises(StoreError, match="corrupt current-version pointer"):
        store.record("t")
    # One damaged task is left out of the listing instead of failing it for every task.
    put(store, "other", V2)
    assert [r.task for r in store.list_tasks()] == ["other"]
    # An explicit version still reads, and set_current repairs the pointer.
    assert store.get("t", V1).data == data_for(V1)
    store.set_current("t", V1)
    assert store.get("t").version == V1


def test_pointer_to_missing_version(store: DiskPromptStore) -> None:
    put(store, "t", V1)
    (store.root / "tasks" / "t" / "current").write_text(f"{V4}\n")
    with pytest.raises(StoreError, match=f"names version '{V4}'"):
        store.get("t")
    with pytest.raises(StoreError, match="not in the store"):
        store.current_version("t")


def test_corrupt_manifest_sidecar(store: DiskPromptStore) -> None:
    put(store, "t", V1)
    (store.root / "tasks" / "t" / "versions" / f"{V1}.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt manifest"):
        store.record("t")
    assert store.list_tasks() == []


def test_current_not_yet_in_history_is_listed_first(store: DiskPromptStore) -> None:
    # A crash between the pointer rename and the history rewrite.
    put(store, "t", V1)
    put(store, "t", V2)
    (store.root / "tasks" / "t" / "history").write_text(f"{V1}\n")
    assert store.versions("t") == [V2, V1]
    assert store.get("t", V2).data == data_for(V2)


# ------------------------------------------------------------------------------- several writers


def _put_many(root: str, worker: int, count: int) -> None:
    store = DiskPromptStore(root, keep_versions=5)
    for i in range(count):
        put(store, "shared", f"{worker:04x}{i:04x}")


def test_concurrent_writers_from_two_processes(tmp_path: Path) -> None:
    count = 20
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put_many, args=(str(tmp_path), w, count)) for w in (1, 2)]
    for proc in procs:
        proc.start()
    # Read while they write: readers take no lock and must only ever see complete versions.
    reader = DiskPromptStore(tmp_path)
    while any(proc.is_alive() for proc in procs):
        try:
            got = reader.get("shared")
        except TaskNotFoundError:
            continue
        assert got.data == data_for(got.version)
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0
    written = {f"{w:04x}{i:04x}" for w in (1, 2) for i in range(count)}
    store = DiskPromptStore(tmp_path, keep_versions=5)
    assert store.current_version("shared") in written
    versions = store.versions("shared")
    assert len(versions) == 5
    assert versions[0] == store.current_version("shared")
    for v in versions:
        assert store.get("shared", v).data == data_for(v)
    [record] = store.list_tasks()
    assert record.manifest["v"] == record.version
    assert tmp_files(tmp_path) == []


def test_change_token_is_rewritten_by_every_change_and_only_then(store: DiskPromptStore) -> None:
    seen = [store.change_token()]
    assert seen == [""]

    def changed() -> bool:
        token = store.change_token()
        fresh = token not in seen
        seen.append(token)
        return fresh

    put(store, "t", V1)
    assert changed()
    put(store, "t", V2)
    assert changed()
    store.set_current("t", V1)
    assert changed()
    with pytest.raises(VersionNotFoundError):
        store.set_current("t", "f" * 16)
    assert not changed()
    assert store.versions("t") and store.list_tasks() and not changed()
    store.delete("t")
    assert changed()
    with pytest.raises(TaskNotFoundError):
        store.delete("t")
    assert not changed()
    # Another process on the same directory sees the same token.
    assert DiskPromptStore(store.root).change_token() == seen[-1]
