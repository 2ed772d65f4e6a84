"""Pre-started guest processes, so create_runtime does not pay Deno's start-up on the request path.

Only the default memory limit is pooled (the heap limit is fixed when the process starts);
other limits start cold.

Every process start, pooled or cold, takes one of ``max_starting`` slots: a Deno boot costs tens
of ms of CPU, and a burst of 195 creates once booted them all at once, so two cores were shared by
hundreds of booting processes and the daemon's own loop (its heartbeats, the live runtimes' calls)
got a sliver of them. A create that finds no pooled process waits for a slot at most
``queue_timeout`` seconds and is then refused with ``busy`` (retry later); a process that
finished meanwhile (a refill) is handed to the first waiter instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from pathlib import Path

from daemon.guest import GuestProcess
from daemon.limits import MemoryCgroups
from wire.protocol import E_BUSY, ProtocolError
from wire.scope import Scope

log = logging.getLogger("sandbox_mesh.daemon.pool")

REFILL_DELAY = 0.05
#: Defaults of ``--max-starting`` (processes booting at once) and ``--start-queue-timeout`` (s). A
#: boot is CPU-bound: more at once than cores only share the same CPUs and starve the daemon's loop.
MAX_STARTING = max(2, os.cpu_count() or 2)
START_QUEUE_TIMEOUT = 10.0

#: node: built-ins a guest may import: pure helpers that reach no I/O of the process.
ALLOWED_NODE_MODULES = frozenset(
    {
        "buffer", "events", "path", "path/posix", "path/win32", "url", "util", "util/types",
        "string_decoder", "querystring", "assert", "assert/strict", "punycode", "stream/web",
    }
)  # fmt: skip


def write_import_map(deno: str, path: Path, deno_dir: Path) -> None:
    """Map every other node: built-in (and its bare name) to a module that throws on import.

    The list comes from the installed Deno itself, so a module added by a later Deno is blocked
    too. Without this, ``import("node:process")`` reaches the daemon channel on stdout.
    """
    out = subprocess.run(
        [deno, "eval", "--quiet", "--no-config", "import {builtinModules} from 'node:module';"
         "console.log(JSON.stringify(builtinModules))"],
        capture_output=True, check=True, timeout=60, env={"DENO_DIR": str(deno_dir), "NO_COLOR": "1"},
    )  # fmt: skip
    names = {n.removeprefix("node:") for n in json.loads(out.stdout)}
    names |= {"sqlite", "test", "test/reporters", "sea"}
    imports = {}
    for name in sorted(names - ALLOWED_NODE_MODULES):
        message = f"module node:{name} is not available in this sandbox"
        stub = "data:text/javascript," + f"throw new TypeError({json.dumps(message)})".replace("%", "%25")
        imports[f"node:{name}"] = stub
        imports[name] = stub
    path.write_text(json.dumps({"imports": imports}))


class WarmPool:
    def __init__(
        self,
        deno: str,
        import_map: Path,
        deno_dir: Path,
        memory_limit_mb: int,
        size: int,
        cgroups: MemoryCgroups | None = None,
        max_starting: int = MAX_STARTING,
        queue_timeout: float = START_QUEUE_TIMEOUT,
    ) -> None:
        self.deno = deno
        self.max_starting = max(1, max_starting)
        self.queue_timeout = queue_timeout
        self._slots = asyncio.Semaphore(self.max_starting)
        self.cgroups = cgroups
        self.import_map = import_map
        self.deno_dir = deno_dir
        self.memory_limit_mb = memory_limit_mb
        self.size = size
        self._ready: list[GuestProcess] = []
        self._filling = Scope("pool")  # the starts under way
        self._closed = False

    def warm(self) -> int:
        """Pre-started guests ready to be claimed (for the metrics)."""
        return len(self._ready)

    def fill(self) -> None:
        while not self._closed and len(self._ready) + len(self._filling) < self.size:
            self._filling.spawn(self._start_one(), name="pool-fill")

    async def _start_one(self) -> None:
        try:
            guest = await self._start(self.memory_limit_mb)
        except Exception as exc:
            log.warning("could not pre-start a runtime: %s", exc)
            await asyncio.sleep(1.0)
            return
        if self._closed:
            await guest.kill("pool closed")
        else:
            self._ready.append(guest)

    async def _start(self, memory_limit_mb: int) -> GuestProcess:
        async with self._slots:
            return await self._boot(memory_limit_mb)

    async def _boot(self, memory_limit_mb: int) -> GuestProcess:
        return await GuestProcess.start(self.deno, self.import_map, self.deno_dir, memory_limit_mb, self.cgroups)

    async def claim(self, memory_limit_mb: int) -> GuestProcess:
        """A started guest with this heap limit: from the pool when it matches, else a cold start
        once a start slot is free (``busy`` if none is within ``queue_timeout``)."""
        guest = await self._pooled(memory_limit_mb)
        if guest is not None:
            return guest
        self.fill()
        try:
            async with asyncio.timeout(self.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise ProtocolError(
                E_BUSY,
                f"the daemon is busy starting runtimes ({self.max_starting} at a time) and had no "
                f"turn for this one within {self.queue_timeout:g}s: retry later",
            ) from None
        try:
            guest = await self._pooled(memory_limit_mb)  # a refill may have finished while we waited
            return guest if guest is not None else await self._boot(memory_limit_mb)
        finally:
            self._slots.release()

    async def _pooled(self, memory_limit_mb: int) -> GuestProcess | None:
        if memory_limit_mb != self.memory_limit_mb:
            return None
        while self._ready:
            guest = self._ready.pop()
            if guest.alive:
                # refill a moment later: the reply for this claim should leave first
                asyncio.get_running_loop().call_later(REFILL_DELAY, self.fill)
                return guest
            await guest.kill("it stopped in the pool")  # reap it
        return None

    async def close(self) -> None:
        self._closed = True
        await self._filling.aclose()
        await asyncio.gather(*(g.kill("pool closed") for g in self._ready), return_exceptions=True)
        self._ready.clear()
