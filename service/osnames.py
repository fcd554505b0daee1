"""Linux names of processes and threads, as ps, top -H and /proc/.../comm show them."""

from __future__ import annotations

import contextlib
from pathlib import Path


def name_os_thread(name: str) -> None:
    """Name the calling thread (at most 15 bytes); called on a process's main thread it names the
    process. Spawned processes otherwise all read "python" and their threads carry the process's name,
    and which one runs hot matters. Nothing happens where /proc is missing or read-only."""
    with contextlib.suppress(OSError):
        Path("/proc/thread-self/comm").write_text(name[:15])
