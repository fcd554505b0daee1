"""API keys kept in the prompt store's backend, so keys are created and revoked without a restart.

A key is shown once, at creation; the store keeps its sha256 digest and a record: a public id
(``k_`` + 12 hex digits), a name, the scope, the tenant (None: a platform key), optional token-bucket
limits, who created it and when, and when it was revoked. Revoked records stay listed.

Every replica keeps the records in memory and checks, at most every ``refresh_s``, whether they
changed: one ``GET`` of a counter in Redis (bumped with every change, in the same transaction), or
one ``stat`` of the disk store's ``keys.json``. A key created or revoked on one replica is therefore
honoured or refused by every replica within ``refresh_s`` (0.25 s by default), without a
subscription to lose. While the backend is unreachable, the keys already in memory keep working and
unknown keys are refused with 503 (``store_unavailable``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.exceptions import RedisClusterException, RedisError

from prompts.errors import StoreUnavailableError
from service.errors import KeyNotFoundError
from service.tenancy import Principal, Scope

logger = logging.getLogger(__name__)

KEY_PREFIX = "pts_"


def digest_of(key: str) -> str:
    """The sha256 hex digest stored for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: str) -> str:
    """The public id of the key with ``digest``: safe to log, list and audit (it reveals nothing)."""
    return "k_" + hashlib.sha256(bytes.fromhex(digest)).hexdigest()[:12]


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    scope: Scope
    tenant: str | None
    created_at: str
    created_by: str
    revoked_at: str | None = None
    rate_per_s: float | None = None
    burst: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def principal(self) -> Principal:
        return Principal(self.id, self.scope, self.tenant, self.rate_per_s, self.burst)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> KeyRecord:
        data: dict[str, Any] = json.loads(raw)
        return cls(**data)


class KeyBackend(Protocol):
    """Where key records live: a map digest -> record, plus a token that changes with every change."""

    def load(self) -> dict[str, KeyRecord]: ...

    def token(self) -> str: ...

    def put(self, digest: str, record: KeyRecord) -> None: ...

    def close(self) -> None: ...


class RedisKeyBackend:
    """``{prefix}:keys`` (hash: digest -> record JSON) and ``{prefix}:keys:version`` (the token)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        durable: Callable[[Callable[[redis.Redis], None]], None] | None = None,
    ) -> None:
        self._client = client
        # Key changes wait for a replica like uploads do (RedisPromptStore.durable), where asked.
        self._durable = durable if durable is not None else (lambda write: write(client))
        self._hash = f"{prefix}:keys"
        self._version = f"{prefix}:keys:version"

    def load(self) -> dict[str, KeyRecord]:
        with _unavailable("read the API keys"):
            raw = self._client.hgetall(self._hash)
        return {_text(d): KeyRecord.from_json(r) for d, r in raw.items()}

    def token(self) -> str:
        with _unavailable("read the API keys' version"):
            value = self._client.get(self._version)
        return "" if value is None else _text(value)

    def put(self, digest: str, record: KeyRecord) -> None:
        def write(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hset(self._hash, digest, record.to_json())
            pipe.incr(self._version)
            pipe.execute()

        with _unavailable("write an API key"):
            self._durable(write)

    def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            self._client.close()


class DiskKeyBackend:
    """``keys.json`` in the disk store's root, rewritten atomically under a lock; its stat is the token."""

    def __init__(self, root: Path) -> None:
        self._path = root / "keys.json"
        self._lock = root / "locks" / "keys.lock"

    def load(self) -> dict[str, KeyRecord]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {digest: KeyRecord(**record) for digest, record in raw.items()}

    def token(self) -> str:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return ""
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    def put(self, digest: str, record: KeyRecord) -> None:
        self._lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = self.load()
            records[digest] = record
            tmp = self._path.with_name(f".keys-{secrets.token_hex(6)}.tmp")
            body = {d: asdict(r) for d, r in sorted(records.items())}
            tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self._path)
        finally:
            os.close(fd)

    def close(self) -> None:
        return None


class KeyStore:
    """The stored keys of one deployment, cached in memory and refreshed when they change."""

    def __init__(self, backend: KeyBackend, refresh_s: float = 0.25) -> None:
        self._backend = backend
        self._refresh_s = refresh_s
        self._records: dict[str, KeyRecord] = {}
        self._token: str | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def _refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self._refresh_s:
            return
        with self._lock:
            if not force and time.monotonic() - self._checked_at < self._refresh_s:
                return
            token = self._backend.token()
            if token != self._token or force:
                self._records = self._backend.load()
                self._token = token
            self._checked_at = time.monotonic()

    def needs_refresh(self) -> bool:
        """Whether the next lookup reads the backend (the caller then runs it off the event loop)."""
        return time.monotonic() - self._checked_at >= self._refresh_s

    def lookup(self, digest: str) -> KeyRecord | None:
        """The active record of the key with ``digest``, or None. Blocking when a refresh is due."""
        try:
            self._refresh()
        except StoreUnavailableError:
            record = self._records.get(digest)
            if record is None or self._token is None:
                raise
            # The backend is down: keys already known keep working, as cached tasks do.
        record = self._records.get(digest)
        return record if record is not None and record.active else None

    def records(self) -> list[KeyRecord]:
        self._refresh(force=True)
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))

    def create(
        self,
        *,
        name: str,
        scope: Scope,
        tenant: str | None,
        created_by: str,
        rate_per_s: float | None = None,
        burst: int | None = None,
        key: str | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key and its record; the key itself is returned here and never again."""
        key = key if key is not None else new_key()
        digest = digest_of(key)
        record = KeyRecord(
            id=key_id(digest),
            name=name,
            scope=scope,
            tenant=tenant,
            created_at=now_iso(),
            created_by=created_by,
            rate_per_s=rate_per_s,
            burst=burst,
        )
        self._backend.put(digest, record)
        self._refresh(force=True)
        return key, record

    def revoke(self, record_id: str) -> KeyRecord:
        """Revoke the key with public id ``record_id`` (idempotent). Raises KeyNotFoundError."""
        self._refresh(force=True)
        for digest, record in self._records.items():
            if record.id == record_id:
                revoked = record if record.revoked_at else replace(record, revoked_at=now_iso())
                self._backend.put(digest, revoked)
                self._refresh(force=True)
                return revoked
        raise KeyNotFoundError(f"no API key with id {record_id!r}")

    def tenants(self) -> set[str]:
        """Tenants that have (or had) a key here: the ones metrics name."""
        return {r.tenant for r in self._records.values() if r.tenant is not None}

    def close(self) -> None:
        self._backend.close()


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StoreUnavailableError(f"cannot {what}: {exc}") from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
