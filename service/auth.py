"""API keys and their scopes. Every route's scope is decided in app.py, where the routers are included.

Keys are configured as ``<scope>:<sha256 hex>`` entries (``PTSERVE_API_KEYS``), so the settings never
hold a usable key. A request presents its key as ``Authorization: Bearer <key>`` or ``X-API-Key``;
its sha256 is compared with every configured digest in constant time. ``admin`` implies ``classify``.

Two checks with one rule (:func:`authorize`): :class:`AuthMiddleware` refuses a request before its
body is read (FastAPI parses bodies before running dependencies, so an unauthenticated client could
otherwise make the server parse a 64 MiB upload), and the ``require_scope`` dependency guards every
route of a router even if it was included without registering it in the :class:`ScopeTable`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
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
from service.settings import API_KEY_ENTRY, Settings

Scope = Literal["classify", "admin"]

# What each scope may do: a key's scope grants these route scopes.
GRANTS: dict[str, frozenset[str]] = {
    "classify": frozenset({"classify"}),
    "admin": frozenset({"classify", "admin"}),
}

logger = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The sha256 hex digest stored in the settings for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return "pts_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRing:
    """The configured (digest, scope) pairs."""

    entries: tuple[tuple[bytes, str], ...]

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
            entries.append((bytes.fromhex(match.group(2)), match.group(1)))
        return cls(tuple(entries))

    def scope_of(self, key: str) -> str | None:
        """The scope of ``key``, or None. Every entry is compared, so timing reveals nothing."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for stored, scope in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = scope
        return found


def presented_key(headers: Headers) -> str | None:
    """The key from ``Authorization: Bearer <key>``, else ``X-API-Key``; None when neither is sent."""
    authorization = headers.get("authorization")
    if authorization:
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def authorize(ring: KeyRing | None, headers: Headers, scope: Scope) -> None:
    """Pass if auth is off or the presented key grants ``scope``; else UnauthorizedError (401) or
    ForbiddenError (403)."""
    if ring is None:
        return
    key = presented_key(headers)
    if key is None:
        raise UnauthorizedError(
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    granted = ring.scope_of(key)
    if granted is None:
        raise UnauthorizedError("the API key is not valid")
    if scope not in GRANTS[granted]:
        raise ForbiddenError(f"this API key has the {granted!r} scope; this route needs {scope!r}")


def require_scope(scope: Scope) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that admits a request holding ``scope`` (see :func:`authorize`)."""

    # async: FastAPI runs a plain def dependency in its thread pool, a thread hop per request.
    async def check(request: Request) -> None:
        authorize(getattr(request.app.state, "keyring", None), request.headers, scope)

    return check


@dataclass
class ScopeTable:
    """(methods, path pattern) -> scope of every guarded route, for :class:`AuthMiddleware`."""

    rules: list[tuple[frozenset[str], re.Pattern[str], Scope]] = field(default_factory=list)

    def add(self, router: APIRouter, scope: Scope) -> None:
        for route in router.routes:
            if isinstance(route, APIRoute):
                self.add_path(route.path, route.methods or set(), scope)

    def add_path(self, path: str, methods: set[str], scope: Scope) -> None:
        pattern, _, _ = compile_path(path)
        self.rules.append((frozenset(methods), pattern, scope))

    def scope_for(self, method: str, path: str) -> Scope | None:
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
                    authorize(self.ring, Headers(scope=scope), needed)
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
        counts = {s: sum(1 for _, scope in ring.entries if scope == s) for s in GRANTS}
        logger.info("auth on: %d admin key(s), %d classify key(s)", counts["admin"], counts["classify"])
