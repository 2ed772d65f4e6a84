"""The process tree under a pid, read from /proc: shared by the tests (no orphans) and
scripts/bench.py (CPU and memory of the Deno processes)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            found.append(k)
            todo.append(k)
    return found


def deno_pids() -> set[int]:
    """Every runtime process (a Deno running our bootstrap) on this machine."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                if b"bootstrap.js" in cmd and b"deno" in cmd:
                    pids.add(int(entry))
    return pids
