"""API-key scopes. Every route's scope is decided in app.py, where the routers are included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

Scope = Literal["classify", "admin"]


def require_scope(scope: Scope) -> Callable[[], None]:
    """A FastAPI dependency that admits a request holding ``scope`` (placeholder: admits all)."""

    def check() -> None:
        return None

    return check
