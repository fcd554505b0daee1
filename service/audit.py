"""The audit trail: every change, who made it (a key's public id, never the key), what, and when.

Recorded changes: uploads, rollbacks, deletes, training jobs submitted, keys created and revoked.
Entries go to the prompt store's backend, so every replica writes to and reads one trail: a Redis
stream ``{prefix}:audit`` (capped at ``max_entries``, oldest dropped first) or ``audit.jsonl`` in the
disk store's root (appended under a lock). Entries are written after the change succeeded; a failure
to record one is logged and does not undo or fail the change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.exceptions import RedisClusterException, RedisError

from prompts.errors import StoreUnavailableError
from service.keystore import now_iso
from service.tenancy import Principal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEntry:
    time: str
    actor: str  # the acting key's public id ("-" with auth off)
    actor_tenant: str | None  # the acting key's tenant (None: a platform key)
    action: str  # upload, rollback, delete, job.submit, key.create, key.revoke
    tenant: str | None  # the namespace acted on (None: the platform's)
    task: str | None = None
    version: str | None = None
    detail: dict[str, Any] | None = None


class AuditBackend(Protocol):
    def append(self, entry: AuditEntry) -> None: ...

    def newest(self, limit: int, tenant: str | None) -> list[AuditEntry]:
        """Up to ``limit`` entries, newest first; only those of namespace ``tenant`` unless it is None."""
        ...


class RedisAuditBackend:
    def __init__(self, client: redis.Redis, prefix: str, max_entries: int) -> None:
        self._client = client
        self._stream = f"{prefix}:audit"
        self._max = max_entries

    def append(self, entry: AuditEntry) -> None:
        with _unavailable("write the audit trail"):
            self._client.xadd(
                self._stream, {"e": json.dumps(asdict(entry))}, maxlen=self._max, approximate=True
            )

    def newest(self, limit: int, tenant: str | None) -> list[AuditEntry]:
        found: list[AuditEntry] = []
        last = "+"
        with _unavailable("read the audit trail"):
            while len(found) < limit:
                page = self._client.xrevrange(self._stream, max=last, min="-", count=max(limit, 256))
                if not page:
                    break
                for _, fields in page:
                    entry = AuditEntry(**json.loads(_field(fields)))
                    if tenant is None or entry.tenant == tenant:
                        found.append(entry)
                oldest: Any = page[-1][0]
                last = "(" + (oldest.decode() if isinstance(oldest, bytes) else str(oldest))
        return found[:limit]


def _field(fields: Any) -> Any:
    return fields.get(b"e", fields.get("e")) if isinstance(fields, dict) else None


class DiskAuditBackend:
    def __init__(self, root: Path) -> None:
        self._path = root / "audit.jsonl"

    def append(self, entry: AuditEntry) -> None:
        line = (json.dumps(asdict(entry), separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one whole line per writer, across processes
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def newest(self, limit: int, tenant: str | None) -> list[AuditEntry]:
        try:
            lines = self._path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        found: list[AuditEntry] = []
        for line in reversed(lines):
            with contextlib.suppress(ValueError, TypeError):  # a torn last line after a crash
                entry = AuditEntry(**json.loads(line))
                if tenant is None or entry.tenant == tenant:
                    found.append(entry)
                    if len(found) >= limit:
                        break
        return found


class AuditLog:
    def __init__(self, backend: AuditBackend) -> None:
        self._backend = backend

    def record(
        self,
        principal: Principal,
        action: str,
        *,
        tenant: str | None,
        task: str | None = None,
        version: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Blocking; never raises: the change it records has already happened."""
        who = principal.key_id, principal.tenant
        entry = AuditEntry(now_iso(), *who, action, tenant, task, version, detail)
        try:
            self._backend.append(entry)
        except (StoreUnavailableError, OSError) as exc:
            logger.error("could not record %s of %r in the audit trail: %s", action, task, exc)

    def newest(self, limit: int, tenant: str | None) -> list[AuditEntry]:
        return self._backend.newest(limit, tenant)


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StoreUnavailableError(f"cannot {what}: {exc}") from exc
