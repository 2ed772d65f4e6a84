"""What the scenarios run in: the processes a run owns, the shared state of a run (``Env``), CPU
accounting per process group, and small waiting helpers. Nothing here imports the product, so
``use_product`` can still choose which checkout's broker, daemon and client are measured."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from scripts.bench.model import Plan
from scripts.kit.launch import Proc, free_port
from scripts.kit.procs import cpu_seconds, deno_children

#: The checkout the harness (this package) lives in.
ROOT = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def use_product(root: Path) -> None:
    """Make ``import client`` (and broker, daemon, wire) in this process find the checkout ``root``.

    Called before anything imports the product; the harness modules are already imported from
    ROOT, so an older checkout's own scripts/ cannot replace them."""
    path = str(root.resolve())
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)


# ---- processes ------------------------------------------------------------------------------------


class Processes:
    """The processes one run owns, stopped in reverse order. The upstream is harness code (ROOT);
    the broker is product code, from ``product_root``."""

    def __init__(self, log_dir: Path, product_root: Path) -> None:
        self.log_dir = log_dir
        self.product_root = product_root
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], cwd: Path, ready: str = "ready ", timeout: float = 90.0) -> Proc:
        proc = Proc(name, argv, self.log_dir, cwd)
        self.procs.append(proc)
        proc.wait_ready(ready, timeout)
        return proc

    def upstream(self) -> Proc:
        return self.start("upstream", [sys.executable, "-m", "scripts.kit.upstream", "--no-checksum"], ROOT)

    def broker(self, *extra: str) -> Proc:
        endpoints = ("--frontend", f"tcp://127.0.0.1:{free_port()}", "--backend", f"tcp://127.0.0.1:{free_port()}")
        return self.start("broker", [sys.executable, "-m", "broker", *endpoints, *extra], self.product_root)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


# ---- the state of a run ---------------------------------------------------------------------------


@dataclass
class Env:
    plan: Plan
    upstream: str
    upstream_pid: int
    frontend: str
    broker_pid: int
    session: aiohttp.ClientSession  # the end client
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def upstream_port(self) -> int:
        return int(self.upstream.rsplit(":", 1)[1])


#: The process groups CPU is charged to. "bench" is this process: the client library, the HTTP front
#: and the end client when the product moves bytes; the proxy and the end client for the proxy.
CPU_GROUPS = ("bench", "broker+daemon", "deno", "upstream")


def cpu_snapshot(env: Env) -> dict[str, float]:
    return {
        "bench": cpu_seconds(os.getpid()),
        "broker+daemon": cpu_seconds(env.broker_pid),
        "deno": sum(cpu_seconds(pid) for pid in deno_children(env.broker_pid)),
        "upstream": cpu_seconds(env.upstream_pid),
    }


@dataclass
class CpuTally:
    """CPU seconds per GB each process group spent while one path moved bytes, one entry per round:
    what a user pays for a byte, and where a path is bound."""

    rounds: list[dict[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def measure(self, env: Env, nbytes: int) -> Iterator[None]:
        before = cpu_snapshot(env)
        yield
        after = cpu_snapshot(env)
        self.rounds.append({name: (after[name] - before[name]) / (nbytes / 1e9) for name in CPU_GROUPS})

    def group(self, *names: str) -> list[float]:
        """Per round, the CPU s/GB of these groups together."""
        return [sum(r[n] for n in names) for r in self.rounds]


def tallied(tallies: dict[str, CpuTally], name: str, env: Env, nbytes: int) -> contextlib.AbstractContextManager[Any]:
    tally = tallies.get(name)
    return tally.measure(env, nbytes) if tally is not None else contextlib.nullcontext()


# ---- waiting --------------------------------------------------------------------------------------


def transfer_timeout(size: int) -> float:
    """A generous bound for moving ``size`` bytes (2 MB/s), so nothing waits forever."""
    return 30 + size / 2e6


async def poll(check: Callable[[], Awaitable[Any]], timeout: float, interval: float, what: str) -> Any:
    """Call ``check`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    for _ in itertools.count():
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g}s")
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")


async def settle_children(env: Env, want: int, timeout: float = 20) -> int:
    """Wait until the broker has ``want`` Deno children (runtimes disposed, pool refilled) and keeps
    that number for 0.3 s; returns the last count seen (not ``want`` if the timeout passed)."""
    count = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = len(deno_children(env.broker_pid))
        if count == want:
            await asyncio.sleep(0.3)
            if len(deno_children(env.broker_pid)) == want:
                return want
        await asyncio.sleep(0.1)
    return count


def key(prefix: str) -> str:
    """A fresh record key for the upstream."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
