"""A serving process's memory: the heap PyTorch frees given back, and the collector kept off the
objects of its start-up.

Every batch shape allocates and frees its own activations. glibc keeps the freed chunks in its heap
rather than returning them, so a replica's resident memory climbs for many minutes under varied
batch shapes although nothing leaks: +462 MiB in the 10-minute soak (benchmarks/soak.py), and in an
engine-only loop of 1,200 mixed batches 518 → 1,619 MiB, back to 547 MiB after one ``malloc_trim``.
A trim costs ~30 ms when there is much to return, so it runs at most once per ``interval_s`` in the
forward thread, between batches (0.1% of the forward thread's time at the 30 s default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` at most once per ``interval_s``; ``interval_s == 0`` never trims."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._trim = _malloc_trim() if interval_s > 0 else None
        self._last = clock()
        self.trims = 0
        if interval_s > 0 and self._trim is None:
            logger.info("malloc_trim is not available in this C library; freed heap stays mapped")

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim; True when it trimmed."""
        if self._trim is None:
            return False
        now = self._clock()
        if now - self._last < self.interval_s:
            return False
        self._trim(0)
        self._last = self._clock()
        self.trims += 1
        return True


# Allocations (net of frees) between two collections of the youngest generation in a serving process
# (Python's default: 700); see freeze_startup_objects.
YOUNG_GC_THRESHOLD = 20_000


def freeze_startup_objects() -> int:
    """Move every object alive now into the collector's permanent generation; returns how many.

    A serving process holds the several hundred thousand objects its imports, backbone and app made
    at start-up, and every full (generation-2) collection walked all of them: 0.26-0.29 s each in the
    engine of ``serve --frontends N`` on this CPU, with the GIL held, so every thread and request
    stopped meanwhile, about once every few seconds under 32-text load (benchmarks/perf_link.py; the
    p99 of a request it lands on). Frozen, they are never walked again; garbage made before the
    freeze is collected first. Objects created later (loaded tasks, requests) are collected as ever.
    Call once, at the end of a process's start-up; not in tests that build many apps in one
    process, whose frozen garbage would never be collected.

    It also raises the youngest generation's threshold to :data:`YOUNG_GC_THRESHOLD`: under load the
    engine's loop makes and drops a future, a queue entry and a callback per row, and at Python's
    700 it ran ~650 young collections (and 60 of the middle generation) per perf_link run, ~0.3 s of
    the loop's CPU; at 20,000, 5 and 1 (~0.05 s), and the loop's CPU per 32-row call fell from a
    median of 1,381 to 1,120 µs over five interleaved runs each (one-row calls 57 -> 49 µs).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    return gc.get_freeze_count()
