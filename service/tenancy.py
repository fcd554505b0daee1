"""Tenants: whom a request acts for, and which task names it may see.

A task belongs to one namespace: a tenant's (``team-a/product_type``) or the platform's own (a bare
name, where every task of a single-tenant deployment lives). A key is a tenant's (``classify`` or
``admin`` of that tenant) or a platform key (today's keys: every namespace).

Rules, the same on every route:

- a tenant key may name its tasks bare (``product_type`` means ``team-a/product_type``) or in full;
- a name in another tenant's namespace, or in the platform's, is answered exactly as a task that does
  not exist (404 ``task_not_found``, the same message): no key learns what another tenant has;
- writing into another namespace (an upload whose artifact names it, a training job for it) is
  refused with 403 whatever exists there, since the caller named that namespace itself;
- platform keys see and change every namespace; a bare name is the platform's namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prompts.errors import TaskNotFoundError
from prompts.names import split_task, validate_task_name
from service.errors import ForbiddenError

Scope = Literal["classify", "admin"]


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key's public id, its scope, and its tenant (None: the platform)."""

    key_id: str
    scope: Scope
    tenant: str | None = None
    # Token bucket of this key (requests per second, burst); None: the server's default.
    rate_per_s: float | None = None
    burst: int | None = None

    @property
    def platform(self) -> bool:
        return self.tenant is None

    def describe(self) -> str:
        whose = "a platform key" if self.tenant is None else f"a key of tenant {self.tenant!r}"
        return f"{whose} ({self.scope})"


# Requests to a server with auth off act as a platform admin.
OPEN = Principal(key_id="-", scope="admin", tenant=None)


def resolve(principal: Principal, name: str) -> str:
    """The full task name ``name`` means for ``principal``: 404 for names outside its namespace."""
    validate_task_name(name)
    if principal.tenant is None:
        return name
    tenant, bare = split_task(name)
    if tenant is None:
        return f"{principal.tenant}/{bare}"
    if tenant != principal.tenant:
        raise TaskNotFoundError(f"unknown task {name!r}")
    return name


def writable(principal: Principal, name: str) -> str:
    """The full task name a write (upload, training job) of ``name`` goes to: 403 outside the key's
    namespace (the caller named it; nothing about what exists there is revealed)."""
    validate_task_name(name)
    if principal.tenant is None:
        return name
    tenant, bare = split_task(name)
    if tenant is not None and tenant != principal.tenant:
        raise ForbiddenError(
            f"this key belongs to tenant {principal.tenant!r} and cannot write tasks of tenant {tenant!r}"
        )
    return f"{principal.tenant}/{bare}"


def visible(principal: Principal, task: str) -> bool:
    """Whether ``principal`` may see the stored task ``task`` (a full name)."""
    return principal.tenant is None or split_task(task)[0] == principal.tenant


def tenant_label(task: str) -> str:
    """The tenant a task's traffic counts for in metrics and shares: its namespace, "" for the platform's."""
    return split_task(task)[0] or ""
