"""service/osnames.py: the names ps and top -H show for ptserve's processes and threads."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from service.osnames import name_os_thread


def test_named_on_its_main_thread_a_process_shows_the_name_cut_to_15_bytes() -> None:
    code = (
        "from service.osnames import name_os_thread; import os; name_os_thread('ptserve-engine-extra'); "
        "print(open(f'/proc/{os.getpid()}/comm').read().strip())"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "ptserve-engine-"


def test_a_thread_named_leaves_its_process_name_alone() -> None:
    before = Path("/proc/self/comm").read_text()
    seen: list[str] = []

    def named() -> None:
        name_os_thread("ptserve-forward")
        seen.append(Path("/proc/thread-self/comm").read_text().strip())

    thread = threading.Thread(target=named)
    thread.start()
    thread.join()
    assert seen == ["ptserve-forward"] and Path("/proc/self/comm").read_text() == before
