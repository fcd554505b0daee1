"""``RedisPromptStore``: a ``PromptStore`` in Redis, shared by every replica of the service.

Key layout (``prefix`` defaults to ``ptserve``; task names cannot contain ``:``, so keys never
collide)::

    {prefix}:art:{task}:{version}   string  artifact bytes
    {prefix}:man:{task}:{version}   string  manifest JSON (so listing never reads tensors)
    {prefix}:cur:{task}             string  the current version: the pointer
    {prefix}:hist:{task}            list    stored versions, newest first
    {prefix}:tasks                  set     names of the tasks that have a pointer (the listing index)
    {prefix}:changes                pub/sub channel, not a key: one JSON message per change,
                                    {"task": ..., "version": ... or null, "op": "put"|"rollback"|"delete"}

Every write (put, set_current, delete) is one Lua script, so other clients see all of it or none
of it, and its change message is published inside the same script. Reads that follow the pointer
are scripts too: reading the pointer and then the artifact in two round trips could lose a race
with a put that prunes the version in between.

Scripts rather than WATCH/MULTI/EXEC because a put must read the history to decide what to prune:
a script decides and writes in one step, where an optimistic transaction retries under contention.
Redis does not roll a script back when a command in it fails, but it checks ``maxmemory`` only
before a script's first write; the scripts therefore do every read first and write the artifact
first, so a put refused for lack of memory writes nothing and the previous version stays current.

Replicas follow changes with :meth:`RedisPromptStore.change_feed` (a subscription on a connection
of its own that ends at the first cut, since messages published meanwhile are lost) and recover
what a cut lost with :meth:`RedisPromptStore.current_versions` (every pointer they know, one MGET).

Scripts derive per-version key names from the history and ``{prefix}:tasks`` spans every task, so
all keys must live on one node: under Redis Sentinel that is the primary, under Redis Cluster the
prefix is hash-tagged (``{ptserve}:art:...``) so every key and script is on one slot, and each
script declares ``{prefix}:tasks`` as its key so the cluster client routes it there. Where a
failover can happen, writes wait for a replica's acknowledgement (prompts/redis_target.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.retry import Retry

from prompts.errors import (
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from prompts.names import TASK_NAME_PATTERN, VERSION_PATTERN, validate_task_name, validate_version
from prompts.redis_target import UNAVAILABLE, RedisTarget, Replicated, ReplicationError, redact_url
from prompts.store import StoredArtifact, TaskRecord, check_put

__all__ = [
    "DEFAULT_PREFIX",
    "ChangeEvent",
    "ChangeFeed",
    "ChangeOp",
    "RedisPromptStore",
    "changes_channel",
    "redact_url",
]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "ptserve"
ChangeOp = Literal["put", "rollback", "delete"]
_CHANGE_OPS: frozenset[str] = frozenset({"put", "rollback", "delete"})
# Tasks per RECORDS script call in list_tasks: large enough that 10,000 tasks take 10 calls in one
# pipeline, small enough that one call blocks the server for only a millisecond or two.
_LIST_CHUNK = 1000
# Script return codes for the two "not found" outcomes (a script cannot raise our exception types).
_TASK_MISSING = -1
_VERSION_MISSING = -2


def changes_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """The pub/sub channel a store with ``prefix`` publishes its change messages on."""
    return f"{prefix}:changes"


@dataclass(frozen=True)
class ChangeEvent:
    """One message on the changes channel: ``version`` is None for a delete."""

    task: str
    version: str | None
    op: ChangeOp

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "version": self.version, "op": self.op}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ChangeEvent:
        """Parse a change message; ValueError if it is not one (the channel is open to anyone)."""
        payload: Any = json.loads(raw)
        if not isinstance(payload, dict):
            raise ValueError(f"change message must be a JSON object, got {raw!r}")
        task, version, op = payload.get("task"), payload.get("version"), payload.get("op")
        if not isinstance(task, str) or TASK_NAME_PATTERN.fullmatch(task) is None:
            raise ValueError(f"change message has no valid task: {raw!r}")
        if version is not None and (not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version)):
            raise ValueError(f"change message has an invalid version: {raw!r}")
        if op not in _CHANGE_OPS:
            raise ValueError(f"change message has an unknown op: {raw!r}")
        return cls(task, version, cast(ChangeOp, op))


class ChangeFeed:
    """A subscription to a store's change channel on a connection of its own (see ``change_feed``).

    Any connection problem raises StoreUnavailableError and the feed is then finished: messages
    published while it was broken are lost, so the owner opens a new feed and reconciles.
    """

    def __init__(self, client: redis.Redis, pubsub: PubSub, shown_url: str) -> None:
        self._client = client
        self._pubsub = pubsub
        self._shown_url = shown_url

    def next(self, timeout: float) -> ChangeEvent | None:
        """The next change message, or None if none came within ``timeout`` seconds."""
        try:
            message = self._pubsub.get_message(timeout=timeout)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(
                f"change feed of prompt store {self._shown_url} was cut: {exc}"
            ) from exc
        if message is None:
            return None
        if message.get("type") == "subscribe":
            # redis-py re-subscribed on a new connection by itself: whatever was published in
            # between is lost, so this feed is finished like any other cut.
            raise StoreUnavailableError(f"change feed of prompt store {self._shown_url} was reconnected")
        if message.get("type") != "message":
            return None
        try:
            return ChangeEvent.from_json(message["data"])
        except ValueError as exc:
            logger.warning("ignoring a message on the change channel: %s", exc)
            return None

    def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            self._pubsub.close()
        with contextlib.suppress(RedisError, OSError):
            self._client.close()


def _is_oom(exc: RedisError) -> bool:
    # A command refused for memory gets an "-OOM" reply (redis-py: OutOfMemoryError), but inside a
    # script Redis 6.2 wraps it in a generic "ERR Error running script ... -OOM command not allowed".
    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


# Keys derived inside scripts use the same layout as ``RedisPromptStore._key``; ARGV[1] is always the
# prefix and ARGV[2] the task, so every script can build them.
_LUA_KEYS = """
local prefix, task = ARGV[1], ARGV[2]
local cur_key = prefix .. ':cur:' .. task
local hist_key = prefix .. ':hist:' .. task
local tasks_key = prefix .. ':tasks'
local function art_key(v) return prefix .. ':art:' .. task .. ':' .. v end
local function man_key(v) return prefix .. ':man:' .. task .. ':' .. v end
"""

# ARGV: prefix, task, version, data, manifest, keep_versions, channel, message.
_PUT = (
    _LUA_KEYS
    + """
local version, data, manifest = ARGV[3], ARGV[4], ARGV[5]
local keep = tonumber(ARGV[6])
-- Every read before the first write: see the module docstring on maxmemory.
local exists = redis.call('EXISTS', art_key(version)) == 1 and redis.call('EXISTS', man_key(version)) == 1
local kept, dropped, seen = {version}, {}, {[version] = true}
for _, v in ipairs(redis.call('LRANGE', hist_key, 0, -1)) do
  if not seen[v] then
    seen[v] = true
    -- Entries without an artifact must not count against keep_versions.
    if #kept < keep and redis.call('EXISTS', art_key(v)) == 1 then
      kept[#kept + 1] = v
    else
      dropped[#dropped + 1] = v
    end
  end
end
if not exists then
  redis.call('SET', art_key(version), data)
  redis.call('SET', man_key(version), manifest)
end
redis.call('SET', cur_key, version)
redis.call('DEL', hist_key)
for _, v in ipairs(kept) do redis.call('RPUSH', hist_key, v) end
for _, v in ipairs(dropped) do redis.call('DEL', art_key(v), man_key(v)) end
redis.call('SADD', tasks_key, task)
redis.call('PUBLISH', ARGV[7], ARGV[8])
return #dropped
"""
)

# ARGV: prefix, task, version, channel, message.
_SET_CURRENT = (
    _LUA_KEYS
    + f"""
local version = ARGV[3]
-- Only the pointer has to exist (whatever it holds), so a rollback can repair a corrupt pointer.
if redis.call('EXISTS', cur_key) == 0 then return {_TASK_MISSING} end
if redis.call('EXISTS', art_key(version)) == 0 or redis.call('EXISTS', man_key(version)) == 0 then
  return {_VERSION_MISSING}
end
redis.call('SET', cur_key, version)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 0
"""
)

# ARGV: prefix, task, channel, message.
_DELETE = (
    _LUA_KEYS
    + f"""
local cur = redis.call('GET', cur_key)
local doomed = redis.call('LRANGE', hist_key, 0, -1)
if cur then doomed[#doomed + 1] = cur end
for _, v in ipairs(doomed) do redis.call('DEL', art_key(v), man_key(v)) end
redis.call('DEL', cur_key, hist_key)
redis.call('SREM', tasks_key, task)
-- Leftovers without a pointer are cleaned up, but were never a task.
if not cur then return {_TASK_MISSING} end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 0
"""
)

# ARGV: prefix, task, version ('' for the current one), '1' to return the bytes, else only whether
# they exist. Returns {} for an unknown task, else {pointer, version, bytes-or-nil | 0/1}.
_READ = (
    _LUA_KEYS
    + """
local cur = redis.call('GET', cur_key)
if not cur then return {} end
local version = ARGV[3]
if version == '' then version = cur end
if ARGV[4] == '1' then return {cur, version, redis.call('GET', art_key(version))} end
return {cur, version, redis.call('EXISTS', art_key(version))}
"""
)

# ARGV: prefix, task... Returns per task {} (unknown) or {pointer, size or -1, manifest or nil, history}.
_RECORDS = """
local prefix = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local task = ARGV[i]
  local cur = redis.call('GET', prefix .. ':cur:' .. task)
  if not cur then
    out[#out + 1] = {}
  else
    local art = prefix .. ':art:' .. task .. ':' .. cur
    local size = -1
    -- STRLEN is 0 for a missing key, which an empty artifact could not be told apart from.
    if redis.call('EXISTS', art) == 1 then size = redis.call('STRLEN', art) end
    out[#out + 1] = {
      cur, size, redis.call('GET', prefix .. ':man:' .. task .. ':' .. cur),
      redis.call('LRANGE', prefix .. ':hist:' .. task, 0, -1),
    }
  end
end
return out
"""


def _text(raw: object) -> str:
    """A reply element as text; garbage becomes U+FFFD so a pattern check rejects it."""
    if isinstance(raw, bytes):
        return raw.decode("ascii", errors="replace")
    return str(raw)


class RedisPromptStore:
    """A ``PromptStore`` in one Redis database, safe for any number of processes sharing it."""

    def __init__(
        self,
        url: str,
        keep_versions: int = 10,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = 2.0,
        write_replicas: int | None = None,
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        if not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty string without whitespace, got {prefix!r}")
        try:
            self.target = RedisTarget.parse(url)
        except ValueError as exc:
            raise StoreError(f"invalid prompt store URL {redact_url(url)}: {exc}") from exc
        self.keep_versions = keep_versions
        # Hash-tagged on a Cluster: every key and the channel on one slot (prompts/redis_target.py).
        self.prefix = self.target.key_prefix(prefix)
        self.channel = changes_channel(self.prefix)
        # Scripts build their key names from the prefix; this one declared key routes them (Cluster).
        self._route = f"{self.prefix}:tasks"
        self._shown_url = self.target.shown
        self._socket_timeout = socket_timeout
        try:
            self._client: redis.Redis = self.target.client(
                socket_timeout=socket_timeout,
                # One immediate retry on connection errors only: a pooled connection is stale after
                # a server restart, and the retry reconnects. Timeouts are not retried, since the
                # command may have run (a repeated delete would report an unknown task).
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        except (ValueError, RedisError) as exc:
            raise StoreError(f"invalid prompt store URL {self._shown_url}: {exc}") from exc
        replicas = self.target.replicas_to_wait(write_replicas)
        # Where a failover can happen, a write is done only once a replica has it.
        self._replicated = (
            Replicated(self.target, replicas, socket_timeout=socket_timeout) if replicas else None
        )
        self._put_script = self._client.register_script(_PUT)
        self._set_current_script = self._client.register_script(_SET_CURRENT)
        self._delete_script = self._client.register_script(_DELETE)
        self._read_script = self._client.register_script(_READ)
        self._records_script = self._client.register_script(_RECORDS)

    @property
    def client(self) -> redis.Redis:
        """The store's connection pool, for what else the deployment keeps beside the prompts (keys,
        audit trail, rate limits: service.keystore, service.audit, service.ratelimit)."""
        return self._client

    def __repr__(self) -> str:
        return (
            f"RedisPromptStore({self._shown_url!r}, keep_versions={self.keep_versions}, "
            f"prefix={self.prefix!r})"
        )

    def _key(self, kind: Literal["art", "man", "cur", "hist"], task: str, version: str | None = None) -> str:
        """The key layout of the module docstring (the scripts build the same names)."""
        return f"{self.prefix}:{kind}:{task}" if version is None else f"{self.prefix}:{kind}:{task}:{version}"

    @contextlib.contextmanager
    def _redis(self, action: str) -> Iterator[None]:
        """Translate redis-py errors raised while doing ``action`` into store errors."""
        try:
            yield
        except UNAVAILABLE as exc:
            raise StoreUnavailableError(f"prompt store {self._shown_url} is unreachable: {exc}") from exc
        except RedisError as exc:
            if _is_oom(exc):
                raise StoreFullError(
                    f"prompt store {self._shown_url} is full (Redis maxmemory reached): cannot {action}"
                ) from exc
            raise StoreError(f"prompt store {self._shown_url} failed to {action}: {exc}") from exc

    def _run(self, script: Script, action: str, *args: str | bytes | int) -> Any:
        """Run ``script`` with ARGV = prefix, *args (the convention every script here follows)."""
        with self._redis(action):
            return script(keys=[self._route], args=[self.prefix, *args])

    def durable(self, write: Callable[[redis.Redis], None]) -> None:
        """``write(client)`` for other records kept beside the prompts (API keys): acknowledged by a
        replica where one is asked for, like the store's own writes. Raises StoreUnavailableError."""
        with self._redis("write"):
            if self._replicated is None:
                write(self._client)
                return
            try:
                self._replicated.run(self._route, write)
            except ReplicationError as exc:
                raise StoreUnavailableError(f"cannot write: {exc}") from exc

    def _write(self, script: Script, action: str, *args: str | bytes | int) -> Any:
        """``_run`` for a script that writes: replicated before it counts as done (see ``Replicated``)."""
        if self._replicated is None:
            return self._run(script, action, *args)
        with self._redis(action):
            try:
                return self._replicated.run(
                    self._route,
                    lambda client: script(keys=[self._route], args=[self.prefix, *args], client=client),
                )
            except ReplicationError as exc:
                raise StoreUnavailableError(f"cannot {action}: {exc}") from exc

    # ---------------------------------------------------------------------------------- reading

    def _check_pointer(self, task: str, raw: object) -> str:
        version = _text(raw)
        if VERSION_PATTERN.fullmatch(version) is None:
            shown = raw[:80] if isinstance(raw, bytes) else raw
            raise StoreError(
                f"corrupt current-version pointer for task {task!r} at key {self._key('cur', task)}: "
                f"{shown!r}"
            )
        return version

    def _missing_current(self, task: str, version: str) -> StoreError:
        return StoreError(
            f"current-version pointer for task {task!r} names version {version!r}, "
            "which is not in the store (the store is corrupt; set_current or re-put to repair)"
        )

    def _require_task(self, task: str) -> None:
        with self._redis(f"read task {task!r}"):
            exists = self._client.exists(self._key("cur", task))
        if not exists:
            raise TaskNotFoundError(f"unknown task {task!r}")

    def get(self, task: str, version: str | None = None) -> StoredArtifact:
        """The current version (or the named one). Raises TaskNotFoundError / VersionNotFoundError."""
        validate_task_name(task)
        if version is not None and VERSION_PATTERN.fullmatch(version) is None:
            self._require_task(task)  # an unknown task wins over an unknown version
            validate_version(task, version)
        reply = self._run(self._read_script, f"read task {task!r}", task, version or "", "1")
        if not reply:
            raise TaskNotFoundError(f"unknown task {task!r}")
        pointer, _, data = reply
        if version is not None:
            if data is None:
                raise VersionNotFoundError(f"task {task!r} has no version {version!r}")
            return StoredArtifact(task, version, bytes(data))
        current = self._check_pointer(task, pointer)
        if data is None:
            raise self._missing_current(task, current)
        return StoredArtifact(task, current, bytes(data))

    def current_version(self, task: str) -> str:
        """The version the pointer names. Raises TaskNotFoundError."""
        validate_task_name(task)
        reply = self._run(self._read_script, f"read task {task!r}", task, "", "0")
        if not reply:
            raise TaskNotFoundError(f"unknown task {task!r}")
        pointer, _, exists = reply
        current = self._check_pointer(task, pointer)
        if not exists:
            raise self._missing_current(task, current)
        return current

    def current_versions(self, tasks: Sequence[str]) -> dict[str, str | None]:
        """Pointers only, in one MGET: None for a task without one; a corrupt pointer is left out."""
        names = [t for t in tasks if TASK_NAME_PATTERN.fullmatch(t)]
        if not names:
            return {}
        with self._redis("read pointers"):
            raw: list[Any] = self._client.mget([self._key("cur", t) for t in names])
        out: dict[str, str | None] = {}
        for task, pointer in zip(names, raw, strict=True):
            if pointer is None:
                out[task] = None
                continue
            try:
                out[task] = self._check_pointer(task, pointer)
            except StoreError as exc:
                logger.warning("prompt store: %s", exc.message)
        return out

    def change_feed(self, timeout: float = 2.0) -> ChangeFeed:
        """Subscribe to this store's change messages; returns once Redis confirmed the subscription.

        Every message published after this returns is delivered by the feed. StoreUnavailableError
        if Redis cannot be reached or does not confirm within ``timeout`` seconds.
        """
        # A client of its own without retries: a cut must surface as an error, not be papered over
        # by a silent reconnect that loses the messages published in between. The health check
        # PINGs an idle subscription, so a half-open connection is noticed too.
        client = self.target.client(
            socket_timeout=self._socket_timeout, retry=Retry(NoBackoff(), 0), health_check_interval=10
        )
        pubsub = client.pubsub()
        try:
            with self._redis("subscribe to changes"):
                pubsub.subscribe(self.channel)
                deadline = time.monotonic() + timeout
                while True:
                    message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                    if message is not None and message.get("type") == "subscribe":
                        break
                    if time.monotonic() >= deadline:
                        raise StoreUnavailableError(
                            f"prompt store {self._shown_url} did not confirm the change subscription"
                        )
        except BaseException:
            ChangeFeed(client, pubsub, self._shown_url).close()
            raise
        return ChangeFeed(client, pubsub, self._shown_url)

    def versions(self, task: str) -> list[str]:
        """Stored versions, newest first, the current one included. Raises TaskNotFoundError."""
        return list(self.record(task).versions)

    def record(self, task: str) -> TaskRecord:
        """One task's listing entry. Raises TaskNotFoundError."""
        validate_task_name(task)
        [entry] = self._run(self._records_script, f"read task {task!r}", task)
        record = self._parse_record(task, entry)
        if record is None:
            raise TaskNotFoundError(f"unknown task {task!r}")
        return record

    def list_tasks(self) -> list[TaskRecord]:
        """Every task with its current version's manifest, sorted by task name, without tensors.

        A constant number of round trips whatever the number of tasks: the member list, then every
        chunk's RECORDS script in one pipeline (plus the pipeline's SCRIPT EXISTS/LOAD check).
        """
        with self._redis("list tasks"):
            members = cast(set[bytes], self._client.smembers(f"{self.prefix}:tasks"))
        names = sorted(name for name in map(_text, members) if TASK_NAME_PATTERN.fullmatch(name))
        chunks = [names[i : i + _LIST_CHUNK] for i in range(0, len(names), _LIST_CHUNK)]
        if not chunks:
            return []
        with self._redis("list tasks"):
            replies: list[Any]
            if self.target.kind == "cluster":
                # A Cluster pipeline does not load scripts first; one call per chunk instead.
                replies = [self._records_script(keys=[self._route], args=[self.prefix, *c]) for c in chunks]
            else:
                pipe = self._client.pipeline(transaction=False)
                for chunk in chunks:
                    self._records_script(keys=[self._route], args=[self.prefix, *chunk], client=pipe)
                replies = pipe.execute()
        records: list[TaskRecord] = []
        for chunk, entries in zip(chunks, replies, strict=True):
            for name, entry in zip(chunk, entries, strict=True):
                try:
                    record = self._parse_record(name, entry)
                except StoreError as exc:
                    # One damaged task must not hide every other task from the listing.
                    logger.warning("skipping task %r in listing: %s", name, exc.message)
                    continue
                if record is not None:  # deleted since SMEMBERS
                    records.append(record)
        return records

    def _parse_record(self, task: str, entry: Sequence[Any]) -> TaskRecord | None:
        """A RECORDS entry as a TaskRecord; None for an unknown task, StoreError if corrupt."""
        if not entry:
            return None
        pointer, size, raw_manifest, raw_history = entry
        current = self._check_pointer(task, pointer)
        if size < 0:
            raise self._missing_current(task, current)
        where = f"key {self._key('man', task, current)}"
        if raw_manifest is None:
            raise StoreError(f"corrupt manifest for task {task!r} version {current!r}: {where} is missing")
        try:
            manifest: Any = json.loads(raw_manifest)
        except ValueError as exc:
            raise StoreError(
                f"corrupt manifest for task {task!r} version {current!r} at {where}: {exc}"
            ) from exc
        if not isinstance(manifest, dict):
            raise StoreError(
                f"corrupt manifest for task {task!r} version {current!r}: expected a JSON object"
            )
        history: list[str] = []
        for raw in raw_history:
            version = _text(raw)
            if VERSION_PATTERN.fullmatch(version) and version not in history:
                history.append(version)
        # put always puts the current version into history; it is missing only if someone edited
        # the keys by hand, and then it is treated as the newest, like the disk store does.
        versions = history if current in history else [current, *history]
        return TaskRecord(task, current, manifest, int(size), tuple(versions))

    def ping(self) -> None:
        """Raise StoreUnavailableError if Redis does not answer."""
        with self._redis("ping"):
            self._client.ping()

    def close(self) -> None:
        """Close pooled connections; a later call would open new ones."""
        with contextlib.suppress(RedisError):
            self._client.close()
            if self._replicated is not None:
                self._replicated.close()

    # ---------------------------------------------------------------------------------- writing

    def put(self, task: str, version: str, data: bytes, manifest_json: str) -> None:
        """Store ``data`` as ``version`` of ``task`` and make it current, atomically.

        Putting a version that already exists only moves the pointer and makes it the newest in
        the history. Versions beyond ``keep_versions`` are pruned in the same step, never the
        current one.
        """
        check_put(task, version, manifest_json)
        message = ChangeEvent(task, version, "put").to_json()
        self._write(
            self._put_script,
            f"store version {version!r} of task {task!r}",
            task,
            version,
            data,
            manifest_json.encode("utf-8"),
            self.keep_versions,
            self.channel,
            message,
        )

    def set_current(self, task: str, version: str) -> None:
        """Move the pointer to an existing version (rollback). Raises Task/VersionNotFoundError.

        The history order is left alone: a rolled-back version is not the newest one.
        """
        validate_task_name(task)
        if VERSION_PATTERN.fullmatch(version) is None:
            self._require_task(task)
            validate_version(task, version)
        message = ChangeEvent(task, version, "rollback").to_json()
        status = self._write(
            self._set_current_script,
            f"move the pointer of task {task!r}",
            task,
            version,
            self.channel,
            message,
        )
        if status == _TASK_MISSING:
            raise TaskNotFoundError(f"unknown task {task!r}")
        if status == _VERSION_MISSING:
            raise VersionNotFoundError(f"task {task!r} has no version {version!r}")

    def delete(self, task: str) -> None:
        """Remove the task and all its versions. Raises TaskNotFoundError."""
        validate_task_name(task)
        message = ChangeEvent(task, None, "delete").to_json()
        status = self._write(self._delete_script, f"delete task {task!r}", task, self.channel, message)
        if status == _TASK_MISSING:
            raise TaskNotFoundError(f"unknown task {task!r}")
