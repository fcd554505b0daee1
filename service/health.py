"""The prompt store's reachability as this replica last saw it: for ``/readyz``'s body and the
``ptserve_store_up`` metric, which report it without letting it decide readiness."""

from __future__ import annotations

import asyncio
import threading
import time

from prompts.errors import PtserveError
from prompts.store import PromptStore

OK = "ok"


class StoreHealth:
    """Pings the store at most once per ``max_age_s``; callers in between share the last answer.

    Probes and scrapes come from several places at once (kubelet, Prometheus, load balancers); while
    the store hangs, each would otherwise hold a thread for the whole socket timeout.
    """

    def __init__(self, max_age_s: float = 1.0) -> None:
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._answer: str | None = None  # OK, or what the last failed ping said
        self._checked_at = float("-inf")
        self._running: asyncio.Future[str] | None = None

    @property
    def up(self) -> bool | None:
        """True/False as of the last ping; None before the first one."""
        return None if self._answer is None else self._answer == OK

    def _fresh(self) -> str | None:
        if self._answer is not None and time.monotonic() - self._checked_at < self._max_age_s:
            return self._answer
        return None

    def probe(self, store: PromptStore) -> str:
        """Ping now (blocking) unless a recent answer exists; OK or the error's message."""
        with self._lock:
            fresh = self._fresh()
            if fresh is not None:
                return fresh
            try:
                store.ping()
                answer = OK
            except PtserveError as exc:
                answer = exc.message
            self._answer, self._checked_at = answer, time.monotonic()
            return answer

    async def check(self, store: PromptStore) -> str:
        """``probe`` off the event loop, one at a time: concurrent callers await the same ping."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(asyncio.to_thread(self.probe, store))
        return await asyncio.shield(self._running)
