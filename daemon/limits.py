"""Limits on a guest process enforced from outside it: CPU time and memory.

**CPU.** The daemon samples each runtime's CPU time (``/proc/PID/stat``, all threads) and sends
it a ``ping`` that the bootstrap answers from its read loop. A guest whose event loop is stuck
(a handler, timer or stream callback that never returns) cannot answer; once it has burned more
than its per-turn limit of CPU since an unanswered ping was sent, it is stopped (``TurnWatch``).
CPU burned while dispatches wait for their response head is shared out among them; a dispatch
whose share exceeds the per-request budget stops the runtime too. While an eval runs, its own
timeout applies instead of the per-turn limit.

**Memory.** Where the daemon may create cgroups (v2 with the memory controller delegated, or v1's
memory hierarchy), each guest process starts in a cgroup of its own whose limit is the process
cap: the kernel refuses the process more than that (it is OOM-killed, reported as
``memory_limit``). Elsewhere the daemon's RSS watchdog samples fast (``MemoryWatch``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sandbox_mesh.daemon.limits")

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: How often the daemon samples CPU and memory of every runtime (memory: see MemoryWatch).
WATCH_INTERVAL = 0.05
#: CPU is sampled (and pings sent) every this many watch ticks.
CPU_EVERY = 5
#: A process above this fraction of its memory cap is sampled every tick, others every CPU_EVERY.
NEAR_LIMIT = 0.5


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (every thread), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class TurnWatch:
    """Sans-I/O: decides from CPU samples and pongs whether a runtime broke its CPU limits.

    ``tick`` is called with the process's CPU time every sample; it says which ping to send (if
    any) and why the runtime must stop (if it must)."""

    turn_limit: float
    request_limit: float
    sent: int = 0  # number of the last ping sent
    answered: int = 0  # number of the last pong received
    base: float = 0.0  # CPU time when the unanswered ping was sent
    last_cpu: float | None = None
    requests: dict[object, float] = field(default_factory=dict)  # pending dispatch -> CPU charged

    def pong(self, n: int) -> None:
        if self.answered < n <= self.sent:
            self.answered = n

    def tick(self, cpu: float, in_eval: bool, dispatches: list[object]) -> tuple[int | None, str | None]:
        """(ping number to send or None, reason to stop or None)."""
        delta = 0.0 if self.last_cpu is None else max(0.0, cpu - self.last_cpu)
        self.last_cpu = cpu
        # the per-request budget: CPU since the last sample, shared among the dispatches waiting
        share = delta / len(dispatches) if dispatches else 0.0
        self.requests = {d: self.requests.get(d, 0.0) + share for d in dispatches}
        worst = max(self.requests.values(), default=0.0)
        if worst > self.request_limit:
            return None, (
                f"a request used more than its CPU budget of {self.request_limit:g}s before its response head"
            )
        waiting = self.sent > self.answered
        if waiting and in_eval:  # an eval's own timeout applies while it runs
            self.base = cpu
        elif waiting and cpu - self.base > self.turn_limit:
            return None, (
                f"the runtime's event loop was stuck for more than {self.turn_limit:g}s of CPU "
                "(a handler, timer or stream callback that does not return)"
            )
        if waiting:
            return None, None
        self.sent += 1
        self.base = cpu
        return self.sent, None


@dataclass(slots=True)
class MemoryWatch:
    """Sans-I/O: when to sample a process's memory next (every tick when near its cap)."""

    countdown: int = 0

    def due(self) -> bool:
        self.countdown -= 1
        return self.countdown <= 0

    def sampled(self, rss_mb: float, cap_mb: float) -> None:
        self.countdown = 1 if rss_mb > NEAR_LIMIT * cap_mb else CPU_EVERY


# ---- cgroups ----------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) of every cgroup mount of this process."""
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(parts) >= 5 and len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
                out.append((parts[3], parts[4], rparts[0], rparts[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller list ("" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) == 3:
                out[parts[1]] = parts[2]
    return out


def _within(root: str, mount: str, path: str) -> Path | None:
    if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
        return None
    rel = path[len(root) :] if root != "/" else path
    return Path(mount) / rel.lstrip("/")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


class MemoryCgroups:
    """A cgroup per guest process with the process's memory cap, under ``parent`` (made by this
    daemon and removed when it stops). ``find`` returns None where the kernel does not let us."""

    def __init__(self, parent: Path, v2: bool) -> None:
        self.parent = parent
        self.v2 = v2
        self._n = 0

    @classmethod
    def find(cls, tag: str) -> MemoryCgroups | None:
        own = _own_cgroups()
        for root, mount, fstype, opts in _mounts():
            if fstype == "cgroup2" and "" in own:
                base = _within(root, mount, own[""])
                if base is not None and "memory" in _read(base / "cgroup.controllers").split():
                    found = cls._make(base, tag, v2=True)
                    if found is not None:
                        return found
            elif fstype == "cgroup" and "memory" in opts.split(","):
                path = next((p for ctl, p in own.items() if "memory" in ctl.split(",")), None)
                base = _within(root, mount, path) if path is not None else None
                if base is not None:
                    found = cls._make(base, tag, v2=False)
                    if found is not None:
                        return found
        return None

    @classmethod
    def _make(cls, base: Path, tag: str, *, v2: bool) -> MemoryCgroups | None:
        parent = base / f"sandbox-mesh-{tag}"
        try:
            _sweep(base)
            parent.mkdir(exist_ok=True)
            if v2:
                # children of `base` get the memory controller (fails if `base` holds processes
                # and is not the root: cgroup v2's no-internal-processes rule)
                _write(base / "cgroup.subtree_control", "+memory")
                _write(parent / "cgroup.subtree_control", "+memory")
            found = cls(parent, v2)
            probe = found.create(64 << 20)
            found.remove(probe)
        except OSError as exc:
            log.info("no memory cgroup under %s (%s): the RSS watchdog alone limits memory", base, exc)
            with contextlib.suppress(OSError):
                parent.rmdir()
            return None
        log.info("runtime memory caps are cgroups under %s", parent)
        return found

    def create(self, limit_bytes: int) -> Path:
        """A new cgroup capped at ``limit_bytes`` (no swap beyond it where the kernel accounts swap)."""
        self._n += 1
        path = self.parent / f"g{self._n}"
        path.mkdir()
        try:
            if self.v2:
                _write(path / "memory.max", str(limit_bytes))
                with contextlib.suppress(OSError):
                    _write(path / "memory.swap.max", "0")
                with contextlib.suppress(OSError):
                    _write(path / "memory.oom.group", "1")
            else:
                _write(path / "memory.limit_in_bytes", str(limit_bytes))
                with contextlib.suppress(OSError):
                    _write(path / "memory.memsw.limit_in_bytes", str(limit_bytes))
        except BaseException:
            self.remove(path)
            raise
        return path

    def oom_killed(self, path: Path) -> bool:
        """Whether the kernel killed a process of ``path`` for want of memory."""
        text = _read(path / ("memory.events" if self.v2 else "memory.oom_control"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return value.strip() not in ("", "0")
        return not self.v2 and _read(path / "memory.failcnt").strip() not in ("", "0")

    @staticmethod
    def remove(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.rmdir()

    def close(self) -> None:
        _sweep_one(self.parent)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _sweep_one(parent: Path) -> None:
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        parent.rmdir()


def _sweep(base: Path) -> None:
    """Remove the empty cgroups of daemons that died without removing them."""
    with contextlib.suppress(OSError):
        for parent in base.glob("sandbox-mesh-*"):
            pid = parent.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _sweep_one(parent)
