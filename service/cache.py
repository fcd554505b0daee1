"""The tiered prompt cache: device tensors for hot tasks, parsed artifacts in host memory, then the store.

Entries are keyed by (task, version); a separate table maps each task to its current version. A
request resolves its task once, gets a :class:`LoadedTask` and keeps that object to the end, so an
upload, a delete or an eviction never changes the version a request already started with.

Pointers are kept fresh by change messages (``service.watcher`` calls :meth:`PromptCache.apply_change`
and :meth:`PromptCache.reconcile`); the pointer TTL is a safety net behind them. Every pointer write
gets a sequence number, and a store read that started before a later write to the same task is
not stored, so a slow read can never put back a version a change message has replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prompts.artifact import (
    Manifest,
    PromptArtifact,
    check_compatible,
    max_text_tokens,
    parse_artifact,
)
from prompts.backbone import Backbone
from prompts.errors import ArtifactError, StoreUnavailableError, TaskNotFoundError, VersionNotFoundError
from prompts.forward import TaskPrompt
from prompts.names import split_task, validate_task_name
from prompts.store import PromptStore
from service.errors import TaskUnavailableError
from service.pool import PromptPool
from service.tenancy import tenant_label

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
    scaled: bool = False  # the task has (IA)^3 scales
    lora_rank: int = 0  # the rank of the task's LoRA (0: none)
    # Its tenant's label, read for every queued row (the batcher's fair share), so computed once.
    tenant: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant", tenant_label(self.task))

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels


def prepare_task(
    artifact: PromptArtifact, backbone: Backbone, pool: PromptPool, task: str | None = None
) -> LoadedTask:
    """Copy a validated artifact's tensors into a pool slot on the device (blocking). ``task``: the
    name it is stored under, when that is its tenant-qualified name (default: the manifest's)."""
    prompt = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    entry = LoadedTask(
        task=task if task is not None else artifact.task,
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
        scaled=prompt.scale_delta is not None,
        lora_rank=prompt.lora_rank,
    )
    weakref.finalize(entry, pool.free, entry.slot)
    return entry


@dataclass
class _Pointer:
    version: str
    checked_at: float


def stored_as(manifest_task: str, task: str) -> bool:
    """Whether an artifact whose manifest names ``manifest_task`` may be served as ``task``: the same
    name, or its bare name inside a tenant's namespace (tenants upload artifacts named bare)."""
    return manifest_task in (task, split_task(task)[1])


def artifact_nbytes(artifact: PromptArtifact) -> int:
    """Host memory an artifact holds: its serialised bytes plus its parsed tensors."""
    return len(artifact.data) + sum(t.numel() * t.element_size() for t in artifact.tensors.values())


class PromptCache:
    """Device LRU and host LRU of tasks under byte budgets, with single-flight loads off the event loop.

    Every method runs on the event loop; only store reads, parsing and device copies go to threads.
    """

    def __init__(
        self,
        store: PromptStore,
        backbone: Backbone,
        pool: PromptPool,
        *,
        budget_bytes: int,
        max_artifact_bytes: int,
        pointer_ttl_s: float = 1.0,
        host_budget_bytes: int = 0,
        tenant_share: float = 1.0,
    ) -> None:
        self._store = store
        self._backbone = backbone
        self._pool = pool
        self._budget = budget_bytes
        self._host_budget = host_budget_bytes
        self._max_artifact_bytes = max_artifact_bytes
        self._pointer_ttl = pointer_ttl_s
        self._pointers: dict[str, _Pointer] = {}
        self._entries: OrderedDict[tuple[str, str], LoadedTask] = OrderedDict()
        self._bytes = 0
        # Parsed, validated artifacts: a device miss that hits here never touches the store.
        self._host: OrderedDict[tuple[str, str], PromptArtifact] = OrderedDict()
        self._host_bytes = 0
        # Bytes per tenant namespace ("" the platform's) in each tier: a tenant past its share of a
        # tier evicts its own least recently used versions first, never another tenant's.
        self._tenant_share = tenant_share
        self._tenant_bytes: dict[str, int] = {}
        self._host_tenant_bytes: dict[str, int] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[LoadedTask]] = {}
        self._pointer_reads: dict[str, asyncio.Future[str]] = {}
        # Sequence number of the last pointer write per task, for tasks known here or being read.
        self._seq = 0
        self._written_at: dict[str, int] = {}
        self._reading: dict[str, int] = {}
        self._outage_logged = False
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.host_hits = 0
        self.swaps = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def host_nbytes(self) -> int:
        return self._host_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def current(self, task: str) -> str | None:
        """The version this replica would serve ``task`` with now, if it has a pointer for it."""
        pointer = self._pointers.get(task)
        return None if pointer is None else pointer.version

    def resolve_now(self, task: str) -> LoadedTask | None:
        """What :meth:`resolve` would answer, where that needs no wait: the pointer checked within its
        TTL and the version on the device (a hit, counted as one). Else None, and the caller awaits
        :meth:`resolve`, which reads the store, loads, or raises. Names that are not valid never
        have a pointer, so they always take that path and its error."""
        pointer = self._pointers.get(task)
        if pointer is None or time.monotonic() - pointer.checked_at >= self._pointer_ttl:
            return None
        key = (task, pointer.version)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    async def resolve(self, task: str) -> LoadedTask:
        """The current version of ``task``, loaded; raises TaskNotFoundError for unknown tasks."""
        entry = self.resolve_now(task)
        if entry is not None:
            return entry
        validate_task_name(task)
        version = await self._current_version(task)
        try:
            return await self._get(task, version)
        except VersionNotFoundError:
            # The pointer trusted here names a version pruned since (a change message was missed):
            # read the pointer again, once.
            self._pointers.pop(task, None)
            return await self._get(task, await self._current_version(task))

    async def _get(self, task: str, version: str) -> LoadedTask:
        key = (task, version)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        try:
            return await asyncio.shield(self._start_load(key))
        except TaskNotFoundError:
            self.forget(task)
            raise

    def _start_load(self, key: tuple[str, str]) -> asyncio.Future[LoadedTask]:
        loading = self._loading.get(key)
        if loading is None:
            # One load per key however many requests miss at once; it is not tied to any one
            # request, so a cancelled client does not cancel the load for the others.
            loading = asyncio.ensure_future(self._load_and_insert(*key))
            self._loading[key] = loading
            loading.add_done_callback(lambda done: self._load_finished(key, done))
        return loading

    async def _load_and_insert(self, task: str, version: str) -> LoadedTask:
        cached = self._host.get((task, version))
        if cached is not None:
            self.host_hits += 1
            self._host.move_to_end((task, version))
        artifact, entry = await asyncio.to_thread(self._load, task, version, cached)
        if task in self._pointers:
            # Not after a delete that came in while this load ran: the entry would outlive the
            # task (requests that awaited this load are still served with it).
            self._host_insert(task, artifact)
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
        # One store read per task at a time, shared by every request that needs it: when the store
        # hangs (a partition, not a refusal), requests would otherwise each hold a worker thread
        # for the whole connect timeout and starve tokenising of threads.
        reading = self._pointer_reads.get(task)
        if reading is None:
            reading = asyncio.ensure_future(self._read_pointer(task))
            self._pointer_reads[task] = reading
            reading.add_done_callback(lambda done: self._pointer_read_finished(task, done))
        return await asyncio.shield(reading)

    def _pointer_read_finished(self, task: str, done: asyncio.Future[str]) -> None:
        self._pointer_reads.pop(task, None)
        if not done.cancelled():
            done.exception()  # retrieved here so a read nobody awaits any more is not reported as lost

    async def _read_pointer(self, task: str) -> str:
        # Another process may have moved the pointer without this replica hearing of it.
        started = self._seq
        self._reading[task] = self._reading.get(task, 0) + 1
        try:
            version = await asyncio.to_thread(self._store.current_version, task)
        except TaskNotFoundError:
            self._done_reading(task)
            if self._written_at.get(task, -1) <= started:
                self.forget(task)
            self._drop_if_unknown(task)
            raise
        except StoreUnavailableError as exc:
            self._done_reading(task)
            pointer = self._pointers.get(task)
            if pointer is None:
                self._drop_if_unknown(task)
                raise StoreUnavailableError(
                    f"task {task!r} is not cached on this replica and the prompt store cannot be "
                    f"reached: {exc.message}"
                ) from exc
            # A store outage must not fail the tasks this replica already serves.
            if not self._outage_logged:
                logger.warning("prompt store unreachable; serving cached versions: %s", exc.message)
                self._outage_logged = True
            pointer.checked_at = time.monotonic()  # ask the store again only after another TTL
            return pointer.version
        except BaseException:
            self._done_reading(task)
            raise
        self._done_reading(task)
        if self._outage_logged:
            logger.info("prompt store reachable again")
            self._outage_logged = False
        if self._written_at.get(task, -1) > started:
            # A change message (or an upload here) moved the pointer while this read was running.
            current = self._pointers.get(task)
            self._drop_if_unknown(task)
            return version if current is None else current.version
        self._set_pointer(task, version)
        return version

    def _done_reading(self, task: str) -> None:
        self._reading[task] -= 1
        if not self._reading[task]:
            del self._reading[task]

    def _drop_if_unknown(self, task: str) -> None:
        """Forget the write sequence of a task no pointer and no read in flight refers to any more
        (unknown task names would otherwise grow this table without bound)."""
        if task not in self._pointers and task not in self._reading:
            self._written_at.pop(task, None)

    @contextlib.contextmanager
    def changing(self, task: str) -> Iterator[int]:
        """Around a store change made on this replica: yields the sequence number at its start.

        Change messages for ``task`` that arrive meanwhile are recorded, so ``install`` and
        ``activate`` can tell whether a newer change overtook this one.
        """
        self._reading[task] = self._reading.get(task, 0) + 1
        try:
            yield self._seq
        finally:
            self._done_reading(task)
            self._drop_if_unknown(task)

    def _settle_pointer(self, task: str, version: str, since: int | None) -> None:
        """Point ``task`` at ``version`` unless a change seen since ``since`` moved it elsewhere."""
        if since is None or self._written_at.get(task, -1) <= since:
            self._set_pointer(task, version)
            return
        pointer = self._pointers.get(task)
        if pointer is not None and pointer.version != version:
            # Another change overtook this one: which came last, only the store knows.
            pointer.checked_at = float("-inf")

    def _set_pointer(self, task: str, version: str) -> None:
        old = self._pointers.get(task)
        if old is not None and old.version != version:
            self.swaps += 1
        self._pointers[task] = _Pointer(version, time.monotonic())
        self._note_write(task)

    def _note_write(self, task: str) -> None:
        self._seq += 1
        if task in self._pointers or task in self._reading:
            self._written_at[task] = self._seq

    def _load(
        self, task: str, version: str, cached: PromptArtifact | None
    ) -> tuple[PromptArtifact, LoadedTask]:
        """Blocking: read and validate (unless cached in host memory), then copy to the device."""
        artifact = cached if cached is not None else self._read(task, version)
        return artifact, prepare_task(artifact, self._backbone, self._pool, task)

    def _read(self, task: str, version: str) -> PromptArtifact:
        try:
            stored = self._store.get(task, version)
        except StoreUnavailableError as exc:
            raise StoreUnavailableError(
                f"task {task!r} is not cached on this replica and the prompt store cannot be "
                f"reached: {exc.message}"
            ) from exc
        try:
            artifact = parse_artifact(stored.data, max_bytes=self._max_artifact_bytes)
            check_compatible(artifact, self._backbone.spec)
            if not stored_as(artifact.task, task) or artifact.version != version:
                # Never serve one task's tensors under another name (a store edited by hand).
                raise ArtifactError(
                    f"the artifact stored there is {artifact.task!r} version {artifact.version}"
                )
        except ArtifactError as exc:
            raise TaskUnavailableError(
                f"stored version {version} of task {task!r} cannot be served: {exc}"
            ) from exc
        return artifact

    def tenant_bytes(self) -> dict[str, int]:
        """Device-cache bytes per tenant namespace ("": the platform's)."""
        return {tenant: n for tenant, n in self._tenant_bytes.items() if n}

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key)
        self._bytes -= old.nbytes
        self._tenant_bytes[tenant_label(key[0])] -= old.nbytes

    def _host_drop(self, key: tuple[str, str]) -> None:
        size = artifact_nbytes(self._host.pop(key))
        self._host_bytes -= size
        self._host_tenant_bytes[tenant_label(key[0])] -= size

    def _insert(self, entry: LoadedTask) -> None:
        key = (entry.task, entry.version)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        tenant = tenant_label(entry.task)
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + entry.nbytes
        # Requests holding an evicted entry keep it alive until they finish.
        for old in _over_share(
            self._entries, self._tenant_bytes, tenant, self._tenant_share * self._budget, key
        ):
            self._drop(old)
            self.evictions += 1
        while self._bytes > self._budget and len(self._entries) > 1:
            self._drop(next(iter(self._entries)))  # least recently used
            self.evictions += 1

    def _host_insert(self, task: str, artifact: PromptArtifact) -> None:
        key = (task, artifact.version)
        if key in self._host:
            self._host.move_to_end(key)
            return
        size = artifact_nbytes(artifact)
        if size > self._host_budget:
            return
        tenant = tenant_label(task)
        self._host[key] = artifact
        self._host_bytes += size
        self._host_tenant_bytes[tenant] = self._host_tenant_bytes.get(tenant, 0) + size
        cap = self._tenant_share * self._host_budget
        for old in _over_share(self._host, self._host_tenant_bytes, tenant, cap, key):
            self._host_drop(old)
        while self._host_bytes > self._host_budget:
            self._host_drop(next(iter(self._host)))

    async def install(
        self, artifact: PromptArtifact, since: int | None = None, task: str | None = None
    ) -> LoadedTask:
        """After a successful store write: the next request for this task gets this version.

        ``since``: from ``changing`` around the write; a newer change seen meanwhile wins. ``task``:
        the name it was stored under (a tenant's full name), default the manifest's.
        """
        name = task if task is not None else artifact.task
        entry = await asyncio.to_thread(prepare_task, artifact, self._backbone, self._pool, name)
        self._host_insert(name, artifact)
        self._insert(entry)
        self._settle_pointer(name, artifact.version, since)
        return entry

    async def load(self, task: str, version: str) -> LoadedTask:
        """``version`` of ``task`` loaded (host memory or store), without making it current."""
        validate_task_name(task)
        return await self._get(task, version)

    async def activate(self, task: str, version: str, since: int | None = None) -> LoadedTask:
        """After a rollback here: load ``version`` if needed and serve it from now on (``since``:
        as for ``install``)."""
        entry = await self._get(task, version)
        self._settle_pointer(task, version, since)
        return entry

    def apply_change(self, task: str, version: str | None) -> None:
        """A change message: ``task`` now has ``version`` as current, or was deleted (None).

        Tasks this replica never served are left alone (the first request reads the store). For
        the others the pointer moves at once; if the replaced version is on the device (a hot
        task), the new one starts loading, so the first request after the swap does not wait for
        the store. Cold tasks are not preloaded: that would only push hot ones out.
        """
        if version is None:
            self.forget(task)
            return
        old = self._pointers.get(task)
        if old is None:
            self._note_write(task)  # a read of it in flight may be older than this message
            return
        hot = (task, old.version) in self._entries
        self._set_pointer(task, version)
        if hot and (task, version) not in self._entries:
            self._start_load((task, version))

    async def reconcile(self) -> int:
        """Re-read the pointers of every task known here and fix the ones that moved.

        For change messages that may have been missed (the subscription was down, another process
        wrote to a disk store). Returns how many pointers changed.
        """
        tasks = list(self._pointers)
        if not tasks:
            return 0
        started = self._seq
        current = await asyncio.to_thread(self._store.current_versions, tasks)
        changed = 0
        for task in tasks:
            if task not in current or self._written_at.get(task, -1) > started:
                continue  # a corrupt pointer, or a newer write than this read
            version = current[task]
            if version is None:
                if task in self._pointers:
                    self.forget(task)
                    changed += 1
            elif self.current(task) != version:
                self.apply_change(task, version)
                changed += 1
            elif task in self._pointers:
                self._pointers[task].checked_at = time.monotonic()
        return changed

    def forget(self, task: str) -> None:
        """Drop the pointer and every cached version of ``task`` (after a delete)."""
        self._note_write(task)
        self._pointers.pop(task, None)
        self._drop_if_unknown(task)
        for key in [k for k in self._entries if k[0] == task]:
            self._drop(key)
        for key in [k for k in self._host if k[0] == task]:
            self._host_drop(key)


def _over_share(
    entries: OrderedDict[tuple[str, str], Any],
    tenant_bytes: dict[str, int],
    tenant: str,
    cap: float,
    keep: tuple[str, str],
) -> list[tuple[str, str]]:
    """The tenant's least recently used keys to evict so its bytes fit ``cap`` (never ``keep``, the
    version just inserted; the platform namespace "" has no cap). Only the tenant's own keys."""
    if not tenant or tenant_bytes.get(tenant, 0) <= cap:
        return []
    excess = tenant_bytes[tenant] - cap
    victims: list[tuple[str, str]] = []
    for key, value in entries.items():
        if excess <= 0:
            break
        if key != keep and tenant_label(key[0]) == tenant:
            victims.append(key)
            excess -= value.nbytes if isinstance(value, LoadedTask) else artifact_nbytes(value)
    return victims
