"""API keys, their scopes and tenants. Every route's scope is decided in app.py, where the routers are
included.

Keys come from two places: ``<scope>[@<tenant>]:<sha256 hex>`` entries (``PTSERVE_API_KEYS``, so the
settings never hold a usable key; the bootstrap), and the stored keys of ``service.keystore``
(created and revoked at run time). A request presents its key as ``Authorization: Bearer <key>`` or
``X-API-Key``; its sha256 is compared with every configured digest in constant time, then looked up
among the stored ones. ``admin`` implies ``classify``; the ``platform`` route scope (key management)
needs an admin key of no tenant. The request's :class:`~service.tenancy.Principal` (key id, scope,
tenant) is kept in its state for the routes.

Two checks with one rule (:func:`authorize`): :class:`AuthMiddleware` refuses a request before its
body is read (FastAPI parses bodies before running dependencies, so an unauthenticated client could
otherwise make the server parse a 64 MiB upload), and the ``require_scope`` dependency guards every
route of a router even if it was included without registering it in the :class:`ScopeTable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from prompts.errors import PtserveError
from service.errors import (
    ForbiddenError,
    SettingsError,
    UnauthorizedError,
    error_body,
    http_headers,
    http_status,
)
from service.keystore import KeyStore, digest_of, key_id
from service.keystore import new_key as new_key
from service.settings import API_KEY_ENTRY, Settings
from service.tenancy import OPEN, Principal

# What a route needs: a key scope, or "platform" (an admin key bound to no tenant).
RouteScope = Literal["classify", "admin", "platform"]

# What each key scope may do: a key's scope grants these route scopes.
GRANTS: dict[str, frozenset[str]] = {
    "classify": frozenset({"classify"}),
    "admin": frozenset({"classify", "admin"}),
}

logger = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The sha256 hex digest stored in the settings for ``key``."""
    return digest_of(key)


@dataclass(frozen=True)
class KeyRing:
    """The configured (digest, principal) pairs, and the stored keys (set once the store is open)."""

    entries: tuple[tuple[bytes, Principal], ...]
    stored: list[KeyStore | None] = field(default_factory=lambda: [None], compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing | None:
        """None when auth is off; refuses auth on without keys (naming the setting)."""
        if settings.auth == "off":
            return None
        if not settings.api_keys:
            raise SettingsError(
                "auth is on but no API keys are configured: set PTSERVE_API_KEYS to comma-separated "
                "'<classify|admin>:<sha256 hex>' entries ('ptserve hash-key' prints one), or set "
                "PTSERVE_AUTH=off to serve every route without a key"
            )
        entries = []
        for entry in settings.api_keys:
            match = API_KEY_ENTRY.match(entry)
            if match is None:  # Settings validated the entries already; this is a programming error
                raise SettingsError("PTSERVE_API_KEYS holds an entry that is not '<scope>:<sha256 hex>'")
            scope, tenant, digest = match.group(1), match.group(2), match.group(3)
            principal = Principal(key_id(digest), scope, tenant)  # type: ignore[arg-type]
            entries.append((bytes.fromhex(digest), principal))
        return cls(tuple(entries))

    @property
    def store(self) -> KeyStore | None:
        return self.stored[0]

    def attach(self, store: KeyStore | None) -> None:
        """Use ``store``'s keys besides the configured ones (the app's lifespan, once the store is open)."""
        self.stored[0] = store

    def configured(self, key: str) -> Principal | None:
        """The principal of a configured key. Every entry is compared, so timing reveals nothing."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Principal | None = None
        for stored, principal in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = principal
        return found

    def principal_of(self, key: str) -> Principal | None:
        """Whom ``key`` acts for, or None. Blocking when the stored keys are due for a refresh."""
        found = self.configured(key)
        if found is None and self.store is not None:
            record = self.store.lookup(digest_of(key))
            found = None if record is None else record.principal()
        return found

    def needs_io(self, key: str) -> bool:
        """Whether ``principal_of(key)`` may read the store (then run it off the event loop)."""
        return self.store is not None and self.store.needs_refresh() and self.configured(key) is None

    def scope_of(self, key: str) -> str | None:
        """The scope of ``key``, or None."""
        principal = self.principal_of(key)
        return None if principal is None else principal.scope


def presented_key(headers: Headers) -> str | None:
    """The key from ``Authorization: Bearer <key>``, else ``X-API-Key``; None when neither is sent."""
    authorization = headers.get("authorization")
    if authorization:
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


async def authorize(ring: KeyRing | None, headers: Headers, scope: RouteScope) -> Principal:
    """Whom the request acts for, if its key grants ``scope`` (auth off: a platform admin); else
    UnauthorizedError (401) or ForbiddenError (403)."""
    if ring is None:
        return OPEN
    key = presented_key(headers)
    if key is None:
        raise UnauthorizedError(
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    if ring.needs_io(key):
        principal = await asyncio.to_thread(ring.principal_of, key)
    else:
        principal = ring.principal_of(key)
    if principal is None:
        raise UnauthorizedError("the API key is not valid")
    if scope == "platform":
        if principal.scope != "admin" or principal.tenant is not None:
            raise ForbiddenError(f"this route needs a platform admin key; this is {principal.describe()}")
    elif scope not in GRANTS[principal.scope]:
        raise ForbiddenError(f"this API key has the {principal.scope!r} scope; this route needs {scope!r}")
    return principal


def require_scope(scope: RouteScope) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that admits a request holding ``scope`` (see :func:`authorize`) and keeps
    its principal in ``request.state.principal``."""

    # async: FastAPI runs a plain def dependency in its thread pool, a thread hop per request.
    async def check(request: Request) -> None:
        ring = getattr(request.app.state, "keyring", None)
        request.state.principal = await authorize(ring, request.headers, scope)

    return check


def principal_of(request: Request) -> Principal:
    """The principal the auth dependency or middleware found for ``request``."""
    found: Principal | None = getattr(request.state, "principal", None)
    return found if found is not None else OPEN


@dataclass
class ScopeTable:
    """(methods, path pattern) -> scope of every guarded route, for :class:`AuthMiddleware`."""

    rules: list[tuple[frozenset[str], re.Pattern[str], RouteScope]] = field(default_factory=list)

    def add(self, router: APIRouter, scope: RouteScope) -> None:
        for route in router.routes:
            if isinstance(route, APIRoute):
                self.add_path(route.path, route.methods or set(), scope)

    def add_path(self, path: str, methods: set[str], scope: RouteScope) -> None:
        pattern, _, _ = compile_path(path)
        self.rules.append((frozenset(methods), pattern, scope))

    def scope_for(self, method: str, path: str) -> RouteScope | None:
        for methods, pattern, scope in self.rules:
            if method in methods and pattern.match(path):
                return scope
        return None


class AuthMiddleware:
    """Refuses requests to guarded routes before their body is read (401/403 JSON errors)."""

    def __init__(self, app: ASGIApp, ring: KeyRing | None, table: ScopeTable) -> None:
        self.app = app
        self.ring = ring
        self.table = table

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.ring is not None:
            needed = self.table.scope_for(str(scope.get("method", "")), str(scope.get("path", "")))
            if needed is not None:
                try:
                    # Kept for the limits middleware (rate, tenant share) and the routes.
                    scope.setdefault("state", {})["principal"] = await authorize(
                        self.ring, Headers(scope=scope), needed
                    )
                except PtserveError as exc:
                    status = http_status(exc)
                    request_id = scope.get("state", {}).get("request_id")
                    response = JSONResponse(
                        error_body(exc.code, exc.message, request_id),
                        status_code=status,
                        headers=http_headers(status, 1),
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def log_auth_mode(ring: KeyRing | None) -> None:
    if ring is None:
        logger.warning(
            "AUTH IS OFF (PTSERVE_AUTH=off): every route, uploads and deletes included, "
            "is open to anyone who can reach this port"
        )
    else:
        counts = {s: sum(1 for _, p in ring.entries if p.scope == s) for s in GRANTS}
        tenants = sum(1 for _, p in ring.entries if p.tenant is not None)
        logger.info(
            "auth on: %d admin key(s), %d classify key(s) configured (%d of a tenant), plus stored keys",
            counts["admin"],
            counts["classify"],
            tenants,
        )
