"""The ``PromptStore`` contract, run against every implementation.

Each test runs once per backend: the disk store on ``tmp_path``, and the Redis store under a key
prefix of the test's own on a real server, on a Sentinel set and on a Redis Cluster. Passing them
all proves they implement the same semantics, so the service can be pointed at any.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prompts.disk_store import DiskPromptStore
from prompts.errors import (
    ArtifactError,
    InvalidTaskNameError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from prompts.redis_store import RedisPromptStore
from prompts.store import PromptStore, StoredArtifact

# The Redis fixtures (redis_url, redis_prefix, private_redis) live with the server helper.
pytest_plugins = ("tests.redis_server", "tests.redis_ha")

V1, V2, V3, V4, V5 = (f"{i:08x}" for i in range(0xA1, 0xA6))
BAD_NAMES = [
    "../etc",
    "a/b/c",
    "a.b/c",
    "/b",
    "a/",
    "a~b",
    "Upper",
    "x" * 65,
    "",
    ".hidden",
    "..",
    "a\x00b",
    "a:b",
    "a b",
    "a*",
]


def manifest(task: str = "t", **extra: Any) -> str:
    return json.dumps({"task": task, "labels": ["a", "b"], **extra})


def data_for(version: str) -> bytes:
    return f"artifact-{version}".encode() * 3


def put(store: PromptStore, task: str, version: str) -> None:
    store.put(task, version, data_for(version), manifest(task, v=version))


@dataclass
class Backend:
    """How to open stores on one shared backing (a directory or a key prefix) and inspect it."""

    name: str
    open: Callable[[int], PromptStore]  # keep_versions -> a store on the shared backing
    snapshot: Callable[[], list[str]]  # everything the backing holds, to prove nothing changed


@pytest.fixture(params=["disk", "redis", "sentinel", "cluster"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[PromptStore] = []
    if request.param == "disk":
        root = tmp_path / "store"

        def open_disk(keep: int) -> PromptStore:
            return DiskPromptStore(root, keep_versions=keep)

        def disk_snapshot() -> list[str]:
            # Lock files and the trash directory are bookkeeping that outlives tasks by design.
            paths = (p.relative_to(root) for p in root.rglob("*"))
            return sorted(str(p) for p in paths if p.parts[0] not in ("locks", ".trash"))

        yield Backend("disk", open_disk, disk_snapshot)
        return
    # Looked up lazily so the disk half of the suite never needs (or skips for lack of) Redis.
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
    else:
        # A Sentinel set or a Cluster shared by the module; each test under a prefix of its own.
        url = request.getfixturevalue(f"{request.param}_set").url()
        prefix = f"contract-{uuid.uuid4().hex[:12]}"
    inspector = RedisPromptStore(url, prefix=prefix)  # its client reaches the primary (or the nodes)

    def open_redis(keep: int) -> PromptStore:
        store = RedisPromptStore(url, keep_versions=keep, prefix=prefix)
        opened.append(store)
        return store

    def redis_snapshot() -> list[str]:
        keys = inspector.client.scan_iter(match=f"{inspector.prefix}:*")
        return sorted(key.decode() for key in keys)

    yield Backend(request.param, open_redis, redis_snapshot)
    for store in opened:
        store.close()
    inspector.close()


@pytest.fixture
def store(backend: Backend) -> PromptStore:
    return backend.open(10)


def test_is_a_prompt_store(store: PromptStore) -> None:
    assert isinstance(store, PromptStore)


def test_empty_store(store: PromptStore) -> None:
    assert store.list_tasks() == []
    store.ping()


def test_put_get_round_trip(store: PromptStore) -> None:
    put(store, "sentiment", V1)
    got = store.get("sentiment")
    assert got == StoredArtifact("sentiment", V1, data_for(V1))
    assert store.current_version("sentiment") == V1
    assert store.versions("sentiment") == [V1]


def test_binary_data_round_trips_unchanged(store: PromptStore) -> None:
    data = bytes(range(256)) * 40 + b"\x00\r\n"
    store.put("t", V1, data, manifest())
    assert store.get("t").data == data
    assert store.record("t").size_bytes == len(data)


def test_older_version_by_name_and_newest_first(store: PromptStore) -> None:
    for v in (V1, V2, V3):
        put(store, "t", v)
    assert store.current_version("t") == V3
    assert store.versions("t") == [V3, V2, V1]
    assert store.get("t", V1) == StoredArtifact("t", V1, data_for(V1))
    assert store.get("t").version == V3


def test_set_current_rolls_back(store: PromptStore) -> None:
    put(store, "t", V1)
    put(store, "t", V2)
    store.set_current("t", V1)
    assert store.current_version("t") == V1
    assert store.get("t") == StoredArtifact("t", V1, data_for(V1))
    # A rollback does not make the old version the newest one.
    assert store.versions("t") == [V2, V1]
    assert store.record("t").version == V1
    assert store.record("t").manifest["v"] == V1
    store.set_current("t", V2)
    assert store.get("t").version == V2


def test_set_current_unknown(store: PromptStore) -> None:
    put(store, "t", V1)
    with pytest.raises(VersionNotFoundError, match=V2):
        store.set_current("t", V2)
    with pytest.raises(VersionNotFoundError):
        store.set_current("t", "not-a-hash")
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.set_current("nope", V1)
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.set_current("nope", "not-a-hash")  # an unknown task wins over a bad version
    assert store.current_version("t") == V1


def test_reput_existing_version_only_moves_pointer(store: PromptStore) -> None:
    put(store, "t", V1)
    put(store, "t", V2)
    store.put("t", V1, b"ignored: the version already exists", manifest("t", v="ignored"))
    assert store.current_version("t") == V1
    assert store.get("t").data == data_for(V1)
    assert store.versions("t") == [V1, V2]
    assert store.record("t").manifest["v"] == V1


def test_pruning_keeps_exactly_keep_versions(backend: Backend) -> None:
    store = backend.open(3)
    for v in (V1, V2, V3, V4, V5):
        put(store, "t", v)
    assert store.versions("t") == [V5, V4, V3]
    for v in (V1, V2):
        with pytest.raises(VersionNotFoundError):
            store.get("t", v)
    for v in (V3, V4, V5):
        assert store.get("t", v).data == data_for(v)


def test_pruning_never_removes_current(backend: Backend) -> None:
    one = backend.open(1)
    for v in (V1, V2, V3):
        put(one, "t", v)
        assert one.versions("t") == [v]
        assert one.get("t") == StoredArtifact("t", v, data_for(v))
    # Roll back to the oldest version, then re-put it from a store keeping only two: it is the
    # current one, so it stays, and the newer version is what goes.
    service = backend.open(10)
    put(service, "u", V1)
    put(service, "u", V2)
    put(service, "u", V3)
    service.set_current("u", V1)
    worker = backend.open(2)
    put(worker, "u", V1)
    assert worker.current_version("u") == V1
    assert worker.versions("u") == [V1, V3]
    assert worker.get("u").data == data_for(V1)
    with pytest.raises(VersionNotFoundError):
        worker.get("u", V2)


def test_list_tasks_and_record(store: PromptStore) -> None:
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
    assert zeta.manifest == {"task": "zeta", "labels": ["a", "b"]}
    assert zeta.size_bytes == len(b"\x00not-a-tensor-file")
    assert zeta.versions == (V1,)
    assert store.record("alpha") == alpha
    assert store.record("zeta") == zeta
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.record("nope")


def test_list_tasks_sorted_by_name(store: PromptStore) -> None:
    names = ["m", "a-1", "z.z", "a_0", "0start", "b"]
    for name in names:
        put(store, name, V1)
    assert [r.task for r in store.list_tasks()] == sorted(names)


def test_delete(store: PromptStore) -> None:
    put(store, "t", V1)
    put(store, "t", V2)
    put(store, "other", V1)
    store.delete("t")
    for call in (
        lambda: store.get("t"),
        lambda: store.get("t", V1),
        lambda: store.current_version("t"),
        lambda: store.versions("t"),
        lambda: store.record("t"),
        lambda: store.set_current("t", V1),
        lambda: store.delete("t"),
    ):
        with pytest.raises(TaskNotFoundError, match="unknown task 't'"):
            call()
    assert [r.task for r in store.list_tasks()] == ["other"]
    # The name can be reused afterwards, with nothing left of its past.
    put(store, "t", V3)
    assert store.versions("t") == [V3]


def test_delete_removes_every_trace(backend: Backend) -> None:
    store = backend.open(10)
    put(store, "keep", V1)
    before = backend.snapshot()
    for v in (V1, V2, V3):
        put(store, "t", v)
    store.set_current("t", V2)
    store.delete("t")
    assert backend.snapshot() == before


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_task_names(backend: Backend, name: str) -> None:
    store = backend.open(10)
    put(store, "t", V1)
    before = backend.snapshot()
    with pytest.raises(InvalidTaskNameError):
        store.put(name, V1, b"x", manifest())
    for call in (
        lambda: store.get(name),
        lambda: store.get(name, V1),
        lambda: store.get(name, "not-a-hash"),
        lambda: store.current_version(name),
        lambda: store.versions(name),
        lambda: store.record(name),
        lambda: store.set_current(name, V1),
        lambda: store.delete(name),
    ):
        with pytest.raises(InvalidTaskNameError, match="invalid task name"):
            call()
    assert backend.snapshot() == before


def test_non_string_task_name(store: PromptStore) -> None:
    with pytest.raises(InvalidTaskNameError, match="must be a string"):
        store.get(42)  # type: ignore[arg-type]


def test_unknown_task_and_version(store: PromptStore) -> None:
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.get("nope")
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.get("nope", V1)
    with pytest.raises(TaskNotFoundError, match="unknown task 'nope'"):
        store.get("nope", "../../etc/passwd")
    with pytest.raises(TaskNotFoundError):
        store.current_version("nope")
    with pytest.raises(TaskNotFoundError):
        store.versions("nope")
    with pytest.raises(TaskNotFoundError):
        store.delete("nope")
    put(store, "t", V1)
    with pytest.raises(VersionNotFoundError, match=rf"'t'.*'{V2}'"):
        store.get("t", V2)
    with pytest.raises(VersionNotFoundError, match="'t'"):
        store.get("t", "../../etc/passwd")


def test_invalid_version_on_put(store: PromptStore) -> None:
    for version in ("../x", "ABCDEF01", "abc", ""):
        with pytest.raises(VersionNotFoundError):
            store.put("t", version, b"x", manifest())
    with pytest.raises(TaskNotFoundError):
        store.get("t")


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '"text"', "null"])
def test_manifest_must_be_a_json_object(backend: Backend, bad: str) -> None:
    store = backend.open(10)
    before = backend.snapshot()
    with pytest.raises(ArtifactError, match="manifest for task 't'"):
        store.put("t", V1, b"x", bad)
    assert backend.snapshot() == before


def test_two_stores_see_each_others_writes(backend: Backend) -> None:
    a = backend.open(10)
    b = backend.open(10)
    put(a, "t", V1)
    assert b.get("t").data == data_for(V1)
    put(b, "t", V2)
    assert a.current_version("t") == V2
    b.set_current("t", V1)
    assert a.get("t").version == V1
    a.delete("t")
    assert b.list_tasks() == []


def test_current_versions_reads_pointers_only(store: PromptStore) -> None:
    put(store, "a", V1)
    put(store, "b", V1)
    put(store, "b", V2)
    store.set_current("b", V1)
    assert store.current_versions([]) == {}
    assert store.current_versions(["a", "b", "ghost"]) == {"a": V1, "b": V1, "ghost": None}
    store.delete("a")
    # Names that cannot be tasks are left out rather than raising: reconciling must go on.
    assert store.current_versions(["a", "../x", "b"]) == {"a": None, "b": V1}


def test_tenant_tasks_live_apart_from_the_platforms_and_each_other(backend: Backend) -> None:
    """``team-a/x``, ``team-b/x`` and the platform's ``x`` are three tasks (a tenant may share a name)."""
    store = backend.open(10)
    names = ["x", "team-a/x", "team-b/x", "team-a/y", "team-a"]
    versions = [V1, V2, V3, V4, V5]
    for name, version in zip(names, versions, strict=True):
        put(store, name, version)
    assert [r.task for r in store.list_tasks()] == sorted(names)
    for name, version in zip(names, versions, strict=True):
        assert store.get(name).data == data_for(version) and store.current_version(name) == version
    assert store.current_versions(["team-a/x", "team-b/nothing"]) == {"team-a/x": V2, "team-b/nothing": None}
    store.delete("team-a/x")
    assert [r.task for r in store.list_tasks()] == ["team-a", "team-a/y", "team-b/x", "x"]
    with pytest.raises(TaskNotFoundError):
        store.get("team-a/x")
