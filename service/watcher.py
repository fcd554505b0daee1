"""Change watchers: keep a replica's cache pointers in step with changes made anywhere.

A watcher runs in a thread of its own, so waiting on Redis or polling a file never blocks the
event loop; it hands each change to the cache on the loop (``call_soon_threadsafe``), in the order
the store published them.

* :class:`RedisChangeWatcher` subscribes to the store's change channel. Messages published while
  the subscription is down are lost, so after every (re)subscription it reconciles: the pointers of
  every task this replica knows are read again in one round trip. It reconnects by itself with
  exponential backoff.
* :class:`DiskChangeWatcher` polls the disk store's change token (one small file read) and
  reconciles whenever it changed, which covers writes by any process: the worker, the CLI, another
  replica on the same directory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future

from prompts.disk_store import DiskPromptStore
from prompts.errors import PtserveError
from prompts.redis_store import RedisPromptStore
from prompts.store import PromptStore
from service.cache import PromptCache

logger = logging.getLogger(__name__)

# How long the watcher thread waits for one reconcile on the event loop before it counts as failed.
_RECONCILE_TIMEOUT_S = 30.0


class ChangeWatcher:
    """A background thread feeding store changes to a :class:`PromptCache` on the event loop."""

    name = "ptserve-changes"

    def __init__(self, cache: PromptCache) -> None:
        self._cache = cache
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = False
        self.events = 0
        self.reconciles = 0

    def start(self) -> None:
        """Start watching; call from inside the event loop the cache lives on."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread and wait for it (off the event loop, which it may still need meanwhile)."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError

    def _reconcile(self) -> None:
        """Run the cache's reconcile on the loop and wait for it; raises what it raised."""
        assert self._loop is not None
        done: Future[int] = asyncio.run_coroutine_threadsafe(self._cache.reconcile(), self._loop)
        changed = done.result(timeout=_RECONCILE_TIMEOUT_S)
        self.reconciles += 1
        if changed:
            logger.info("reconciled with the prompt store: %d task pointer(s) changed", changed)

    def _apply(self, task: str, version: str | None) -> None:
        assert self._loop is not None
        self.events += 1
        self._loop.call_soon_threadsafe(self._cache.apply_change, task, version)


class RedisChangeWatcher(ChangeWatcher):
    """Subscribes to a Redis store's change channel; reconciles after every (re)subscription."""

    def __init__(
        self,
        store: RedisPromptStore,
        cache: PromptCache,
        *,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        poll_s: float = 0.5,
    ) -> None:
        super().__init__(cache)
        self._store = store
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._poll = poll_s  # how often the thread looks at the stop flag while no message comes

    def _run(self) -> None:
        delay = self._min_backoff
        down_logged = False
        while not self._stop.is_set():
            try:
                feed = self._store.change_feed()
            except PtserveError as exc:
                if not down_logged:
                    logger.warning("change subscription down, retrying with backoff: %s", exc.message)
                    down_logged = True
                self._stop.wait(delay)  # backoff, cut short by stop()
                delay = min(delay * 2, self._max_backoff)
                continue
            try:
                # Subscribed first, then reconciled: a change is either in the pointers read now
                # or in a message that follows.
                self._reconcile()
                self.connected = True
                delay = self._min_backoff
                if down_logged:
                    logger.info("change subscription restored")
                    down_logged = False
                while not self._stop.is_set():
                    event = feed.next(self._poll)
                    if event is not None:
                        self._apply(event.task, event.version)
            except (PtserveError, TimeoutError) as exc:
                self.connected = False
                message = exc.message if isinstance(exc, PtserveError) else "reconcile timed out"
                if not down_logged:
                    logger.warning("change subscription lost, reconnecting: %s", message)
                    down_logged = True
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_backoff)
            except Exception:
                # Never let the thread die: a replica without it would serve stale pointers for a TTL.
                self.connected = False
                logger.exception("change watcher failed; restarting it")
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_backoff)
            finally:
                feed.close()
        self.connected = False


class DiskChangeWatcher(ChangeWatcher):
    """Polls a disk store's change token; reconciles whenever another write happened."""

    def __init__(self, store: DiskPromptStore, cache: PromptCache, *, poll_s: float = 0.05) -> None:
        super().__init__(cache)
        self._store = store
        self._poll = poll_s

    def _run(self) -> None:
        token: str | None = None
        failing = False
        while not self._stop.is_set():
            try:
                # The token is read before the pointers, so a change written after this read
                # shows up as a new token on the next poll.
                seen = self._store.change_token()
                if seen != token:
                    self._reconcile()
                    token = seen
                self.connected = True
                failing = False
            except Exception as exc:
                self.connected = False
                if not failing:  # once per failure, not once per poll
                    logger.warning("disk change watcher failed, retrying: %s", getattr(exc, "message", exc))
                    failing = True
            self._stop.wait(self._poll)
        self.connected = False


def make_watcher(
    store: PromptStore, cache: PromptCache, *, disk_poll_s: float, max_backoff_s: float
) -> ChangeWatcher | None:
    """The watcher that fits ``store``; None for a store that cannot announce changes."""
    if isinstance(store, RedisPromptStore):
        return RedisChangeWatcher(store, cache, max_backoff_s=max_backoff_s)
    if isinstance(store, DiskPromptStore):
        return DiskChangeWatcher(store, cache, poll_s=disk_poll_s)
    return None
