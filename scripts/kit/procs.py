"""Processes seen through /proc: the process tree under a pid (the tests check that nothing is left
behind; the benchmark finds the Deno processes it charges CPU and memory to) and the per-process
counters the benchmark reads. Linux only, like the product's deployment."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                kids.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            found.append(k)
            todo.append(k)
    return found


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def deno_pids() -> set[int]:
    """Every runtime process (a Deno running our bootstrap) on this machine."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = _cmdline(int(entry))
            if b"bootstrap.js" in cmd and b"deno" in cmd:
                pids.add(int(entry))
    return pids


def deno_children(pid: int) -> list[int]:
    """The Deno processes under ``pid`` (a broker's embedded daemon, or a daemon, starts them)."""
    return [child for child in descendants(pid) if b"deno" in _cmdline(child)]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if it is gone.

    The command name is cut at the last ")" because it may itself hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot): tells a process from a later one with its pid."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 if it is gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def rss_mib(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes sharing them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def tcp_queued(port: int) -> int:
    """Bytes in the send queues of the server ``port``'s own established TCP connections: what that
    server has written that is still in *its* kernel, not yet with any reader."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, state, queues = cols[1], cols[3], cols[4]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:  # ESTABLISHED, server side
                    total += int(queues.split(":")[0], 16)
    return total


def describe(pids: set[int] | list[int]) -> str:
    """What each of ``pids`` is now (state, parent, command line): for assertion messages about
    processes that should be gone."""
    lines = []
    for pid in sorted(pids):
        fields = _stat_fields(pid)
        if fields is None:
            lines.append(f"{pid}: gone")
            continue
        cmd = _cmdline(pid).replace(b"\0", b" ").decode("utf-8", "replace")[:160]
        lines.append(f"{pid}: state {fields[0]} ppid {fields[1]} {cmd}")
    return "; ".join(lines)


def deno_left(pids: set[int] | list[int], timeout: float = 10.0) -> set[int]:
    """Wait (up to ``timeout``) until none of ``pids`` is a running Deno; return those that still are."""
    deadline = time.monotonic() + timeout
    while (left := set(pids) & deno_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def fd_kinds(pid: int) -> dict[str, int]:
    """Open file descriptors of ``pid`` by kind ("socket", "anon_inode:[eventfd]", "pipe", "/dev/null",
    or "file"); empty if the process is gone. Reading another process's fds needs the same user."""
    kinds: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:  # closed between listdir and readlink
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else target
            kind = kind if kind.startswith(("socket", "pipe", "anon_inode", "/dev/")) else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def open_fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which sockets) of ``pid``: a ZeroMQ socket's TCP connections are
    sockets, its mailbox an eventfd; (0, 0) if the process is gone."""
    kinds = fd_kinds(pid)
    return sum(kinds.values()), kinds.get("socket", 0)


def alive(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is still the process that had start time ``started`` (not a reused pid)."""
    return started is not None and start_time(pid) == started
