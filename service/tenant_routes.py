"""Key management (platform admins) and the audit trail (admins: their tenant's, platform: all)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query, Request

from prompts.names import validate_tenant
from service.auth import principal_of
from service.errors import ForbiddenError
from service.keystore import KeyRecord, KeyStore
from service.runtime import Runtime
from service.schemas import (
    AuditEntryInfo,
    AuditResponse,
    ErrorResponse,
    KeyCreatedResponse,
    KeyCreateRequest,
    KeyInfo,
    KeyListResponse,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        403: "not a platform admin key (key routes), or another tenant's trail",
        404: "unknown key id",
        422: "invalid request",
        503: "the store is unreachable, or keeps no keys",
    }.items()
}

keys_router = APIRouter()  # the "platform" route scope: admin keys of no tenant
audit_router = APIRouter()  # the "admin" route scope


def _keys(request: Request) -> tuple[Runtime, KeyStore]:
    runtime: Runtime = request.app.state.runtime
    if runtime.keys is None:
        from prompts.errors import StoreUnavailableError

        raise StoreUnavailableError("this server's prompt store keeps no API keys")
    return runtime, runtime.keys


def _info(record: KeyRecord) -> KeyInfo:
    return KeyInfo(**asdict(record))


@keys_router.post(
    "/v1/keys", status_code=201, response_model=KeyCreatedResponse, responses=ERRORS, tags=["keys"]
)
async def create_key(body: KeyCreateRequest, request: Request) -> KeyCreatedResponse:
    """Create a key; every replica accepts it within ``key_refresh_s``. The key is in this answer only."""
    runtime, store = _keys(request)
    if body.tenant is not None:
        validate_tenant(body.tenant)
    principal = principal_of(request)
    key, record = await asyncio.to_thread(
        lambda: store.create(
            name=body.name,
            scope=body.scope,
            tenant=body.tenant,
            created_by=principal.key_id,
            rate_per_s=body.rate_per_s,
            burst=body.burst,
        )
    )
    if runtime.audit is not None:
        detail = {"key": record.id, "scope": record.scope, "name": record.name}
        await asyncio.to_thread(
            runtime.audit.record, principal, "key.create", tenant=record.tenant, detail=detail
        )
    return KeyCreatedResponse(key=key, **asdict(record))


@keys_router.get("/v1/keys", response_model=KeyListResponse, responses=ERRORS, tags=["keys"])
async def list_keys(request: Request) -> KeyListResponse:
    """Every stored key, revoked ones included (never the keys themselves)."""
    _, store = _keys(request)
    records = await asyncio.to_thread(store.records)
    return KeyListResponse(keys=[_info(r) for r in records])


@keys_router.delete("/v1/keys/{key_id}", response_model=KeyInfo, responses=ERRORS, tags=["keys"])
async def revoke_key(key_id: str, request: Request) -> KeyInfo:
    """Revoke a key; every replica refuses it within ``key_refresh_s``. Revoking twice changes nothing."""
    runtime, store = _keys(request)
    record = await asyncio.to_thread(store.revoke, key_id)
    if runtime.audit is not None:
        principal = principal_of(request)
        detail = {"key": record.id, "scope": record.scope, "name": record.name}
        await asyncio.to_thread(
            runtime.audit.record, principal, "key.revoke", tenant=record.tenant, detail=detail
        )
    return _info(record)


@audit_router.get("/v1/audit", response_model=AuditResponse, responses=ERRORS, tags=["audit"])
async def read_audit(
    request: Request,
    limit: int = Query(default=100, ge=1, le=10_000, description="entries, newest first"),
    tenant: str | None = Query(default=None, description="only this tenant's namespace (platform keys)"),
) -> AuditResponse:
    """The audit trail: a tenant's admin key reads its tenant's entries; a platform key every entry."""
    runtime: Runtime = request.app.state.runtime
    principal = principal_of(request)
    if tenant is not None:
        validate_tenant(tenant)
    if principal.tenant is not None:
        if tenant is not None and tenant != principal.tenant:
            raise ForbiddenError(f"this key belongs to tenant {principal.tenant!r}; it reads only that trail")
        tenant = principal.tenant
    if runtime.audit is None:
        return AuditResponse(entries=[])
    entries = await asyncio.to_thread(runtime.audit.newest, limit, tenant)
    return AuditResponse(entries=[AuditEntryInfo(**asdict(e)) for e in entries])
