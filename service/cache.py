"""The device prompt cache: task tensors stay on the backbone's device between batches.

Entries are keyed by (task, version); a separate table maps each task to its current version. A
request resolves its task once, gets a :class:`LoadedTask` and keeps that object to the end, so an
upload, a delete or an eviction never changes the version a request already started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from prompts.artifact import Manifest, PromptArtifact, check_compatible, max_text_tokens, parse_artifact
from prompts.backbone import Backbone
from prompts.errors import ArtifactError, TaskNotFoundError
from prompts.forward import TaskPrompt
from prompts.names import validate_task_name
from prompts.store import PromptStore
from service.errors import TaskUnavailableError
from service.pool import PromptPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """One (task, version) ready to serve: its manifest and the pool slot holding its tensors.

    The slot is given back when this object is garbage-collected, i.e. once neither the cache nor
    any admitted request holds it, so a slot is never reused under a request that still needs it.
    """

    task: str
    version: str
    manifest: Manifest
    slot: int
    prefix_length: int
    prompt_length: int
    num_labels: int
    pooling: str
    use_pooler: bool
    max_text_tokens: int
    nbytes: int

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels


def prepare_task(artifact: PromptArtifact, backbone: Backbone, pool: PromptPool) -> LoadedTask:
    """Copy a validated artifact's tensors into a pool slot on the device (blocking)."""
    prompt = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    entry = LoadedTask(
        task=artifact.task,
        version=artifact.version,
        manifest=artifact.manifest,
        slot=pool.add(prompt),
        prefix_length=prompt.prefix_length,
        prompt_length=prompt.prompt_length,
        num_labels=prompt.num_labels,
        pooling=prompt.pooling,
        use_pooler=prompt.use_pooler,
        max_text_tokens=max_text_tokens(artifact.manifest, backbone.spec),
        nbytes=prompt.nbytes(),
    )
    weakref.finalize(entry, pool.free, entry.slot)
    return entry


@dataclass
class _Pointer:
    version: str
    checked_at: float


class PromptCache:
    """LRU of loaded tasks under a byte budget, with single-flight loads that run off the event loop."""

    def __init__(
        self,
        store: PromptStore,
        backbone: Backbone,
        pool: PromptPool,
        *,
        budget_bytes: int,
        max_artifact_bytes: int,
        pointer_ttl_s: float = 1.0,
    ) -> None:
        self._store = store
        self._backbone = backbone
        self._pool = pool
        self._budget = budget_bytes
        self._max_artifact_bytes = max_artifact_bytes
        self._pointer_ttl = pointer_ttl_s
        self._pointers: dict[str, _Pointer] = {}
        self._entries: OrderedDict[tuple[str, str], LoadedTask] = OrderedDict()
        self._bytes = 0
        self._loading: dict[tuple[str, str], asyncio.Future[LoadedTask]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, task: str) -> LoadedTask:
        """The current version of ``task``, loaded; raises TaskNotFoundError for unknown tasks."""
        validate_task_name(task)
        version = await self._current_version(task)
        key = (task, version)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        loading = self._loading.get(key)
        if loading is None:
            # One load per key however many requests miss at once; it is not tied to any one
            # request, so a cancelled client does not cancel the load for the others.
            loading = asyncio.ensure_future(self._load_and_insert(task, version))
            self._loading[key] = loading
            loading.add_done_callback(lambda done: self._load_finished(key, done))
        return await asyncio.shield(loading)

    async def _load_and_insert(self, task: str, version: str) -> LoadedTask:
        entry = await asyncio.to_thread(self._load, task, version)
        self._insert(entry)
        return entry

    def _load_finished(self, key: tuple[str, str], done: asyncio.Future[LoadedTask]) -> None:
        self._loading.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here so a load nobody awaits any more is not reported as lost

    async def _current_version(self, task: str) -> str:
        pointer = self._pointers.get(task)
        now = time.monotonic()
        if pointer is not None and now - pointer.checked_at < self._pointer_ttl:
            return pointer.version
        # Another process (the trainer, another replica's upload) may have moved the pointer.
        try:
            version = await asyncio.to_thread(self._store.current_version, task)
        except TaskNotFoundError:
            self.forget(task)
            raise
        self._pointers[task] = _Pointer(version, now)
        return version

    def _load(self, task: str, version: str) -> LoadedTask:
        """Blocking: read, validate and move one artifact to the device (runs in a worker thread)."""
        stored = self._store.get(task, version)
        try:
            artifact = parse_artifact(stored.data, max_bytes=self._max_artifact_bytes)
            check_compatible(artifact, self._backbone.spec)
        except ArtifactError as exc:
            raise TaskUnavailableError(
                f"stored version {version} of task {task!r} cannot be served: {exc}"
            ) from exc
        return prepare_task(artifact, self._backbone, self._pool)

    def _insert(self, entry: LoadedTask) -> None:
        key = (entry.task, entry.version)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = entry
        self._bytes += entry.nbytes
        # Evict least recently used; requests holding an evicted entry keep it alive until they finish.
        while self._bytes > self._budget and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1

    async def install(self, artifact: PromptArtifact) -> LoadedTask:
        """After a successful store write: the next request for this task gets this version."""
        entry = await asyncio.to_thread(prepare_task, artifact, self._backbone, self._pool)
        self._insert(entry)
        self._pointers[artifact.task] = _Pointer(artifact.version, time.monotonic())
        return entry

    def forget(self, task: str) -> None:
        """Drop the pointer and every cached version of ``task`` (after a delete)."""
        self._pointers.pop(task, None)
        for key in [k for k in self._entries if k[0] == task]:
            self._bytes -= self._entries.pop(key).nbytes
