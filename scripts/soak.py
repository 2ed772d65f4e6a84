"""Soak: mixed load on a small real cluster for a while, counting errors and watching for leaks.

    python -m scripts.soak --minutes 10 --json soak.json        (or: python scripts/soak.py --seconds 60)

Starts an upstream (``scripts.kit.upstream``), a broker with ``--no-local-daemon`` and two daemons
``d1``, ``d2`` as processes of their own; the client is this process, using the public client API
only. Workers run in parallel, each on a runtime of its own, one operation after another:

- ``echo``: dispatch_request with a streamed random request body the guest streams back (CRC32 of both);
- ``passthrough``: dispatch_request whose response body is the guest's fetch() of the upstream;
- ``fetch`` / ``upload``: the guest streams a body from / to the upstream, CRC32 on both ends;
- ``lifecycle``: create, eval, dispose;
- ``abort``: the client closes a response body mid-stream; ``guest_cancel``: the guest cancels a
  fetched body. Both must reach the upstream's connection and leave the runtime with nothing in
  flight (``rt.stats()``).
- ``restart``: once per ``--restart-every`` seconds a daemon is killed (SIGKILL and SIGTERM by
  turns) and a new one with the same name started. Work on runtimes that lived on it must fail with
  a clear RuntimeLost (counted as *expected*); the workers then create fresh runtimes and go on.

Every ``--interval`` seconds the workers are paused between operations and a sample is taken of
RSS, open fds and sockets (fds of type socket) of the broker, each daemon and the client, and the
number of Deno processes. Growth under load is the last minus the first sample after ``--warmup``
(from each process's start, so a restarted daemon has its own) of one process hosting the same
number of runtimes; idle growth compares the samples before and after the load. The run fails
(exit 1) on any unexpected error, any corrupt body, an unclear expected error, growth past the
bounds, a Deno process, child process or client ZeroMQ socket left behind, or an operation kind
that never ran. docs/design.md 5.4 has a run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import gc
import inspect
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
import uuid
import weakref
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make the checkout importable
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import zmq  # noqa: E402

import client  # noqa: E402
from scripts.kit.drain import in_flight  # noqa: E402
from scripts.kit.launch import Proc, free_port  # noqa: E402
from scripts.kit.procs import alive, deno_children, descendants, fd_kinds, open_fds, rss_mib, start_time  # noqa: E402
from scripts.kit.upstream import JS_HELPERS, stream_crc  # noqa: E402

DAEMONS = ("d1", "d2")
POOL_SIZE = 2
HEARTBEAT = "0.5"  # broker and daemons: a SIGKILLed daemon is dropped after 0.5 s x 3
#: every operation is bounded: a hang is an error, not a stuck soak
OP_TIMEOUT = 60.0
#: how long a cancel may take to reach the upstream and to drain the runtime's counters
SETTLE_TIMEOUT = 15.0
CHUNK = 32 * 1024
BIG = 64 << 20  # bodies cancelled mid-stream: far more than any buffer on the way

GUEST = (
    JS_HELPERS
    + r"""
const UP = __UPSTREAM__;
const crcOf = async (stream) => {
  let crc = 0, n = 0;
  for await (const c of stream) { crc = crc32(c, crc); n += c.byteLength; }
  return { n, crc };
};
serve({ async fetch(req) {
  const u = new URL(req.url);
  if (u.pathname === "/echo") return new Response(req.body);
  if (u.pathname === "/bytes") return new Response((await fetch(UP + "/bytes" + u.search)).body);
  return new Response("not found", { status: 404 });
} });
globalThis.soak = {
  async fetchCrc(size) { return await crcOf((await fetch(UP + `/bytes?size=${size}`)).body); },
  async upload(size, seed) {
    const sent = { n: 0, crc: 0 };
    const body = patternStream(size, seed).pipeThrough(new TransformStream({ transform(c, ctl) {
      sent.crc = crc32(c, sent.crc); sent.n += c.byteLength; ctl.enqueue(c);
    } }));
    const r = await fetch(UP + "/upload", { method: "POST", body, duplex: "half" });
    return { sent, got: await r.json() };
  },
  async fetchCancel(size, key) {
    const reader = (await fetch(UP + `/bytes?size=${size}&key=${key}`)).body.getReader();
    await reader.read();
    await reader.cancel();
    return true;
  },
};
"""
)


class Defect(Exception):
    """Something the soak checks went wrong without an exception from the product (a cancel that
    never reached the upstream, a runtime left with work in flight): counted as unexpected."""


class Corrupt(Exception):
    """A body arrived with the wrong size or checksum."""


# ---- what is counted -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of one period (and, in ``Soak.total``, of the run): kind -> n."""

    ops: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)  # "kind: ErrorClass"
    expected: Counter[str] = field(default_factory=Counter)  # "kind: ErrorClass", after a restart
    unclear: Counter[str] = field(default_factory=Counter)  # expected, but not a RuntimeLost
    corrupt: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        for name in FIELDS:
            getattr(self, name).update(getattr(other, name))

    def as_dict(self) -> dict[str, dict[str, int]]:
        # not dataclasses.asdict: it would rebuild each Counter from its (key, value) pairs as keys
        return {name: dict(getattr(self, name)) for name in FIELDS}


FIELDS = ("ops", "unexpected", "expected", "unclear", "corrupt")


@dataclass
class Restart:
    at: float  # seconds into the run
    name: str
    sig: str  # "SIGKILL" or "SIGTERM"
    killed: float | None = None
    exited: float | None = None
    lost_after: float | None = None  # kill -> every held runtime on it reported lost
    joined_after: float | None = None  # kill -> the new daemon joined the broker
    orphans: list[int] = field(default_factory=list)


@dataclass
class Bounds:
    max_fd_growth: int = 16
    max_socket_growth: int = 8
    max_rss_growth_mib: float = 64.0
    #: RSS from the idle sample before any operation to the idle one after: it includes each
    #: process's first use of everything (lazy imports, pools, allocator arenas of its threads),
    #: 25-39 MiB for the client in 40 s runs of this and earlier commits; fds and sockets, the leak
    #: signals, keep their tight bounds, and RSS under load (after warm-up) keeps max_rss_growth_mib.
    max_idle_rss_growth_mib: float = 96.0


# ---- the run --------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.duration: float = args.seconds if args.seconds is not None else args.minutes * 60
        # a daemon restarted every minute lives two: samples must come often enough to measure it
        self.interval: float = args.interval or min(20.0, max(5.0, self.duration / 12))
        self.warmup: float = args.warmup if args.warmup is not None else min(20.0, 2 * self.interval)
        self.period = Tally()
        self.total = Tally()
        self.samples: list[dict[str, Any]] = []
        self.messages: list[str] = []  # the first unexpected errors, in words
        #: expected errors whose clarity is judged once their runtime's loss is known
        self.judge: list[tuple[str, Exception, client.Runtime | None]] = []
        self.restarts = self._plan_restarts()
        self.procs: dict[str, Proc] = {}
        self.started: dict[str, float] = {}  # role -> when its process started (seconds into the run)
        self.seen_deno: dict[int, int | None] = {}  # every Deno pid seen -> its start time
        #: runtime -> when it was created (weak: the lifecycle worker makes thousands an hour)
        self.born: weakref.WeakKeyDictionary[client.Runtime, float] = weakref.WeakKeyDictionary()
        self.held: dict[str, client.Runtime] = {}  # worker -> its runtime now
        self.running = asyncio.Event()  # cleared while a sample is taken
        self.running.set()
        self.active = 0  # operations in progress
        self.stopping = False
        self.t0 = time.monotonic()
        self.upstream_url = ""
        self.conn: client.Connection | None = None
        self.http: aiohttp.ClientSession | None = None
        self.rng = random.Random(args.seed)
        self.end: dict[str, Any] = {}
        self.heap: tracemalloc.Snapshot | None = None
        if args.tracemalloc:
            tracemalloc.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _plan_restarts(self) -> list[Restart]:
        every = self.args.restart_every
        if not every:
            return []
        sigs = {"kill": ["SIGKILL"], "term": ["SIGTERM"], "alternate": ["SIGKILL", "SIGTERM"]}[self.args.restart_signal]
        first = 0.4 * min(every, self.duration)
        times = itertools.takewhile(lambda t: t < self.duration - 5, itertools.count(first, every))
        return [Restart(t, DAEMONS[i % 2], sigs[i % len(sigs)]) for i, t in enumerate(times)]

    # ---- processes ------------------------------------------------------------------------------

    def _start(self, role: str, argv: list[str], ready: str | None) -> Proc:
        # started from the main thread (the event loop's): PR_SET_PDEATHSIG follows the forking thread
        proc = Proc(role, [sys.executable, *argv], self.log_dir, ROOT, die_with_parent=True)
        self.procs[role] = proc
        self.started[role] = self.now()
        if ready is not None:
            proc.wait_ready(ready, 60)
        return proc

    def _daemon(self, name: str) -> Proc:
        argv = ["-m", "daemon", "--broker", self.backend, "--name", name, "--heartbeat", HEARTBEAT]
        return self._start(name, [*argv, "--max-runtimes", "32", "--pool-size", str(POOL_SIZE)], None)

    def _joins(self, name: str) -> int:
        return self.procs["broker"].tail(10**9).count(f"daemon {name} joined")

    async def _until(self, pred: Callable[[], Any], what: str, timeout: float) -> None:
        """Poll ``pred`` until true; raise Defect naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise Defect(f"timed out after {timeout:g}s waiting until {what}")
            await asyncio.sleep(0.05)

    async def start(self) -> None:
        self.upstream_url = self._start("upstream", ["-m", "scripts.kit.upstream"], "ready ").field("url")
        for attempt in range(3):
            # free_port() lets the port go before the broker binds it: another process may take it
            self.frontend = f"tcp://127.0.0.1:{free_port()}"
            self.backend = f"tcp://127.0.0.1:{free_port()}"
            broker = ["-m", "broker", "--frontend", self.frontend, "--backend", self.backend, "--no-local-daemon"]
            try:
                self._start("broker", [*broker, "--heartbeat", HEARTBEAT, "--liveness", "3"], "ready ")
                break
            except RuntimeError as exc:
                self.procs.pop("broker").stop()
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
        for name in DAEMONS:
            self._daemon(name)
        await self._until(lambda: all(self._joins(n) for n in DAEMONS), "both daemons joined the broker", 60)
        self.conn = await client.connect(self.frontend, timeout=30)
        # no keep-alive: an idle connection to the upstream would count as a socket in the samples
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    # ---- operations ---------------------------------------------------------------------------------

    async def _create(self, fetch: bool) -> client.Runtime:
        fetcher = client.forward_fetch(allow_private=True) if fetch else None
        assert self.conn is not None
        rt = await self.conn.create_runtime(fetch=fetcher)
        self.born[rt] = self.now()
        return rt

    async def _guest(self, fetch: bool) -> client.Runtime:
        """A new runtime running the soak guest (disposed again if the guest does not start)."""
        rt = await self._create(fetch)
        try:
            await rt.eval(GUEST.replace("__UPSTREAM__", json.dumps(self.upstream_url)))
        except BaseException:
            await rt.dispose()
            raise
        return rt

    async def echo(self, rt: client.Runtime) -> None:
        size, seed = self.rng.randrange(1, 1 << 20), self.rng.getrandbits(32)
        sent = [0, 0]  # bytes, crc

        async def body() -> AsyncIterator[bytes]:
            gen, left = random.Random(seed), size
            while left:
                chunk = gen.randbytes(min(CHUNK, left))
                sent[0], sent[1] = sent[0] + len(chunk), zlib.crc32(chunk, sent[1])
                left -= len(chunk)
                yield chunk

        resp = await rt.dispatch_request(client.Request("POST", "http://soak/echo", body=body()))
        got = await _crc_of(resp.body)
        _check(resp.status == 200 and got == (size, sent[1]), f"echo of {size} bytes: got {got}, sent {sent}")

    async def passthrough(self, rt: client.Runtime) -> None:
        size = self.rng.randrange(1, 2 << 20)
        resp = await rt.dispatch_request(client.Request("GET", f"http://soak/bytes?size={size}"))
        got = await _crc_of(resp.body)
        _check(resp.status == 200 and got == (size, stream_crc(size)), f"passthrough of {size}: {got}")

    async def fetch(self, rt: client.Runtime) -> None:
        size = self.rng.randrange(1, 2 << 20)
        got = await rt.eval(f"export default await soak.fetchCrc({size})")
        _check(got == {"n": size, "crc": stream_crc(size)}, f"guest fetch of {size} bytes: {got}")

    async def upload(self, rt: client.Runtime) -> None:
        size, seed = self.rng.randrange(1, 1 << 20), self.rng.getrandbits(31)
        r = await rt.eval(f"export default await soak.upload({size}, {seed})")
        ok = r["sent"]["n"] == size and r["got"] == {"size": size, "crc": r["sent"]["crc"]}
        _check(ok, f"guest upload of {size} bytes: {r}")

    async def lifecycle(self, _rt: None) -> None:
        rt = await self._create(fetch=False)
        try:
            value = await rt.eval("export default 6 * 7")
            _check(value == 42, f"eval answered {value!r}")
        finally:
            await rt.dispose()

    async def abort(self, rt: client.Runtime) -> None:
        key = f"abort-{uuid.uuid4().hex[:12]}"
        resp = await rt.dispatch_request(client.Request("GET", f"http://soak/bytes?size={BIG}&key={key}"))
        assert isinstance(resp.body, client.Body)
        for _ in range(2):
            await resp.body.read_chunk()
        await resp.body.aclose()
        await self._cancelled_upstream(key, "the client closed a response body")
        await self._drained(rt)

    async def guest_cancel(self, rt: client.Runtime) -> None:
        key = f"gcancel-{uuid.uuid4().hex[:12]}"
        await rt.eval(f"export default await soak.fetchCancel({BIG}, {json.dumps(key)})")
        await self._cancelled_upstream(key, "the guest cancelled a fetched body")
        await self._drained(rt)

    async def _cancelled_upstream(self, key: str, what: str) -> None:
        """Wait until the upstream saw its connection for ``key`` closed before the end."""
        assert self.http is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            async with self.http.get(f"{self.upstream_url}/stats", params={"key": key}) as r:
                rec = await r.json()
            if rec is not None and rec["closed_at"] is not None:
                return
            if rec is not None and rec["finished"]:
                raise Defect(f"{what}, yet the upstream sent the whole body ({rec['written']} bytes)")
            if time.monotonic() > deadline:
                raise Defect(f"{what}; the upstream connection was still open {SETTLE_TIMEOUT:g}s later: {rec}")
            await asyncio.sleep(0.05)

    async def _drained(self, rt: client.Runtime) -> None:
        """Wait until the runtime has nothing in flight on any hop (client, daemon, guest)."""
        busy = await in_flight(rt, SETTLE_TIMEOUT)
        if busy:
            raise Defect(f"{SETTLE_TIMEOUT:g}s after a cancel the runtime still has in flight: {busy}")

    # ---- workers ------------------------------------------------------------------------------------

    def workers(self) -> list[tuple[str, list[str], bool | None]]:
        """(worker name, the operations it takes in turn, its runtime: with fetch / without / none)."""
        one = [
            ("echo", ["echo"], False),
            ("passthrough", ["passthrough"], True),
            ("fetch", ["fetch", "upload"], True),
            ("lifecycle", ["lifecycle"], None),
            ("cancel", ["abort", "guest_cancel"], True),
        ]
        return [(f"{name}-{i}", ops, rt) for i in range(self.args.workers) for name, ops, rt in one]

    async def worker(self, name: str, kinds: list[str], fetch: bool | None) -> None:
        rt: client.Runtime | None = None
        try:
            for kind in itertools.cycle(kinds):
                await self.running.wait()
                if self.stopping:
                    return
                self.active += 1
                op = "create"
                try:
                    async with asyncio.timeout(OP_TIMEOUT):
                        if fetch is not None and (rt is None or rt.lost is not None):
                            if rt is not None:  # lost: its errors are counted, a create's are not its
                                await rt.close()
                                rt = None
                            rt = self.held[name] = await self._guest(fetch)
                        op = kind
                        await getattr(self, kind)(rt)
                    self.period.ops[kind] += 1
                except Exception as exc:
                    self._failed(op, exc, rt)
                finally:
                    self.active -= 1
        finally:
            self.held.pop(name, None)
            if rt is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(rt.dispose(), 30)

    def _failed(self, kind: str, exc: Exception, rt: client.Runtime | None) -> None:
        label = f"{kind}: {type(exc).__name__}"
        if isinstance(exc, Corrupt):
            self.period.corrupt[kind] += 1
            self._say(f"CORRUPT {kind}: {exc}")
        elif self._expected(exc, rt):
            self.period.expected[label] += 1
            self.judge.append((label, exc, rt))
        else:
            self.period.unexpected[label] += 1
            self._say(f"ERROR {label}: {exc}")

    def _judge(self, final: bool) -> None:
        """Count the expected errors that were not a clear loss. A body's StreamError is judged once
        its runtime's loss has been reported (the notice may come after the pipe's error frame); at
        the end of the run an error whose runtime was never reported lost is unclear too."""
        waiting = []
        for label, exc, rt in self.judge:
            if not final and rt is not None and rt.lost is None and not isinstance(exc, client.RuntimeLost):
                waiting.append((label, exc, rt))
            elif not _clear(exc, rt):
                self.period.unclear[label] += 1
                lost = rt.lost.message if rt is not None and rt.lost is not None else "never reported lost"
                self._say(f"UNCLEAR {label}: {exc} (the runtime: {lost})")
        self.judge = waiting

    def _expected(self, exc: Exception, rt: client.Runtime | None) -> bool:
        """An error of work on a runtime that lived on a daemon killed since (or, for a create, one
        that names a daemon being restarted)."""
        for r in self.restarts:
            if r.killed is None:
                continue
            if rt is not None and rt.daemon == r.name and self.born.get(rt, 0.0) <= r.killed:
                return True
            if rt is None or rt.daemon != r.name:
                window = r.joined_after is None or self.now() < r.killed + r.joined_after + 10
                if window and isinstance(exc, client.RuntimeLost) and r.name in str(exc):
                    return True
        return False

    def _say(self, message: str) -> None:
        if len(self.messages) < 50:
            self.messages.append(f"{self.now():7.1f}s {message}")
        print(f"[soak] {self.now():7.1f}s {message}", file=sys.stderr, flush=True)

    # ---- restarts -----------------------------------------------------------------------------------

    async def restarter(self) -> None:
        for r in self.restarts:
            await asyncio.sleep(max(0.0, r.at - self.now()))
            if self.stopping:
                return
            try:
                await self._restart(r)
                self.period.ops["restart"] += 1
            except Exception as exc:
                self.period.unexpected[f"restart: {type(exc).__name__}"] += 1
                self._say(f"ERROR restart of {r.name}: {exc}")

    async def _restart(self, r: Restart) -> None:
        old = self.procs[r.name]
        guests = {pid: start_time(pid) for pid in deno_children(old.pid)}
        self.seen_deno.update(guests)
        victims = [rt for rt in self.held.values() if rt.daemon == r.name]
        joins = self._joins(r.name)
        r.killed = self.now()
        self._say(f"restart: {r.sig} to daemon {r.name} (pid {old.pid}, {len(guests)} Deno, {len(victims)} runtimes)")
        old.p.send_signal(getattr(signal, r.sig))
        await asyncio.to_thread(old.p.wait, 30)
        r.exited = self.now() - r.killed
        with contextlib.suppress(Defect):
            await self._until(lambda: not any(alive(p, t) for p, t in guests.items()), "its Deno exit", 10)
        r.orphans = [pid for pid, t in guests.items() if alive(pid, t)]
        old.stop()  # closes its log (and kills what the check above found left over)
        if r.orphans:
            raise Defect(f"daemon {r.name} exited ({r.sig}) leaving Deno {r.orphans} running")
        await self._until(lambda: all(rt.lost is not None for rt in victims), f"{r.name}'s runtimes are lost", 30)
        r.lost_after = self.now() - r.killed
        self._daemon(r.name)
        await self._until(lambda: self._joins(r.name) > joins, f"the new {r.name} joined the broker", 60)
        r.joined_after = self.now() - r.killed
        self._say(f"restart: {r.name} back after {r.joined_after:.1f}s (runtimes lost after {r.lost_after:.1f}s)")

    # ---- samples ------------------------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        return {"broker": self.procs["broker"].pid, **{n: self.procs[n].pid for n in DAEMONS}, "client": os.getpid()}

    def _measure(self) -> dict[str, Any]:
        procs: dict[str, dict[str, Any]] = {}
        deno = 0
        runtimes = list(self.conn.runtimes.values()) if self.conn else []
        for role, pid in self._pids().items():
            fds, socks = open_fds(pid)
            rss = 0.0
            with contextlib.suppress(OSError, RuntimeError):
                rss = round(rss_mib(pid), 1)
            procs[role] = {"pid": pid, "since": round(self.started.get(role, 0.0), 1), "rss_mib": rss}
            hosted = sum(rt.daemon == role for rt in runtimes) if role in DAEMONS else len(runtimes)
            procs[role] |= {"fds": fds, "sockets": socks, "runtimes": hosted}
        for name in DAEMONS:
            guests = deno_children(self.procs[name].pid)
            deno += len(guests)
            self.seen_deno.update({pid: start_time(pid) for pid in guests})
        return {"procs": procs, "deno": deno, "runtimes": len(runtimes)}

    async def _quiet_sample(self, phase: str = "load") -> dict[str, Any]:
        """Pause the workers between operations, then measure until two readings agree (sockets
        closed by ZeroMQ's I/O thread and a pool refill settle within moments).

        ``phase`` "idle" (before the load and after it, no runtime held): also wait until the
        daemons' pools are full, so the two idle samples are comparable."""
        self.running.clear()
        try:
            if phase == "idle":
                with contextlib.suppress(Defect):
                    pools = len(DAEMONS) * POOL_SIZE
                    await self._until(lambda: self._measure()["deno"] == pools, "the pools are full", 30)
            with contextlib.suppress(Defect):
                await self._until(lambda: self.active == 0, "the workers are idle", OP_TIMEOUT)
            quiet = self.active == 0
            last = self._measure()
            for _ in range(20):
                await asyncio.sleep(0.25)
                now = self._measure()
                if _counts(now) == _counts(last):
                    break
                last = now
            if phase == "idle":  # what each holds, by kind: tells a leaked socket from a pipe
                for role, pid in self._pids().items():
                    now["procs"][role]["kinds"] = fd_kinds(pid)
            return {"phase": phase, "quiet": quiet, **now}
        finally:
            self.running.set()

    async def sampler(self) -> None:
        """A sample every interval while the load runs (the idle ones before and after are run()'s)."""
        for k in itertools.count(1):
            if k * self.interval > self.duration - 1:
                return
            await asyncio.sleep(max(0.0, k * self.interval - self.now()))
            sample = await self._quiet_sample()
            if self.stopping:  # taken while the workers were disposing their runtimes: not under load
                return
            self._record(sample)

    def _record(self, sample: dict[str, Any], final: bool = False) -> None:
        self._judge(final)
        self._trace(sample, final)
        period, self.period = self.period, Tally()
        self.total.add(period)
        row = {"t": round(self.now(), 1), **period.as_dict(), **sample}
        self.samples.append(row)
        print(_row(row), file=sys.stderr, flush=True)

    def _trace(self, sample: dict[str, Any], final: bool) -> None:
        """With --tracemalloc: where the client's Python heap grew, from the first sample after the
        warm-up to the idle one at the end (the 10 biggest growths, by the line that allocated)."""
        if not tracemalloc.is_tracing():
            return
        if self.heap is None and sample["phase"] == "load" and self.now() >= self.warmup:
            self.heap = tracemalloc.take_snapshot()
        elif final and self.heap is not None:
            diff = tracemalloc.take_snapshot().compare_to(self.heap, "lineno")
            self.end["heap_growth"] = [
                f"{d.size_diff / 1024:+.0f} KiB {d.count_diff:+d} blocks {d.traceback}" for d in diff[:10]
            ]

    # ---- the whole run ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        fds_before = fd_kinds(os.getpid())
        try:
            await self.start()
            self._say(f"upstream {self.upstream_url}, broker {self.frontend}; logs in {self.log_dir}")
            print(_header(), file=sys.stderr, flush=True)
            self._record(await self._quiet_sample("idle"))
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.worker(*w), name=w[0]) for w in self.workers()]
                tasks += [tg.create_task(self.sampler()), tg.create_task(self.restarter())]
                await asyncio.sleep(max(0.0, self.duration - self.now()))
                self.stopping = True
                self.running.set()
                _, pending = await asyncio.wait(tasks, timeout=OP_TIMEOUT + 30)
                for task in pending:
                    self._say(f"ERROR {task.get_name()} did not stop within {OP_TIMEOUT + 30:g}s")
                    self.period.unexpected["stop: Timeout"] += 1
                    task.cancel()
            self._record(await self._quiet_sample("idle"), final=True)  # every runtime disposed
            await self._wind_down(fds_before)
        finally:
            await self._stop_all()
        return self.report()

    async def _wind_down(self, fds_before: dict[str, int]) -> None:
        """The connection closed: what the client still holds."""
        if self.http is not None:
            await self.http.close()
        if self.conn is not None:
            await asyncio.wait_for(self.conn.close(), 30)
        self.end["client_fds"] = {"before": fds_before, "after_close": fd_kinds(os.getpid())}
        self.end["zmq_open_after_close"] = _open_zmq_sockets()

    async def _stop_all(self) -> None:
        """SIGTERM every process, then look for Deno processes and children that outlived them."""
        with contextlib.suppress(Exception):
            if self.http is not None and not self.http.closed:
                await self.http.close()
            if self.conn is not None:
                await asyncio.wait_for(self.conn.close(), 30)
        for role in [*DAEMONS, "broker", "upstream"]:
            proc = self.procs.get(role)
            if proc is not None and proc.p.poll() is None:
                self.seen_deno.update({pid: start_time(pid) for pid in deno_children(proc.pid)})
                proc.p.terminate()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(proc.p.wait, 30)
        with contextlib.suppress(Defect):
            await self._until(lambda: not any(alive(p, t) for p, t in self.seen_deno.items()), "no Deno is left", 10)
        self.end["deno_left"] = sorted(p for p, t in self.seen_deno.items() if alive(p, t))
        self.end["deno_seen"] = {str(pid): started for pid, started in self.seen_deno.items()}
        for proc in self.procs.values():
            proc.stop()  # kills what is left, closes the logs
        self.end["children_left"] = descendants(os.getpid())

    def report(self) -> dict[str, Any]:
        growth = {role: _growth(self.samples, role, self.warmup) for role in ROLES}
        idle = {role: _idle_growth(self.samples, role) for role in ROLES}
        rep = {
            "duration_s": self.duration,
            "interval_s": self.interval,
            "warmup_s": self.warmup,
            **self.total.as_dict(),
            "kinds": sorted({k for _, ks, _ in self.workers() for k in ks} | ({"restart"} if self.restarts else set())),
            "restarts": [asdict(r) for r in self.restarts],
            "growth": growth,
            "idle_growth": idle,
            "end": self.end,
            "messages": self.messages,
            "samples": self.samples,
            "logs": str(self.log_dir),
        }
        rep["failures"] = verdict(
            rep, Bounds(self.args.max_fd_growth, self.args.max_socket_growth, self.args.max_rss_growth_mib)
        )
        return rep


# ---- checks and figures -----------------------------------------------------------------------------


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise Corrupt(what)


async def _crc_of(body: Any) -> tuple[int, int]:
    """Length and CRC-32 of a response body: inline bytes (a small body the guest had complete
    when it answered) or a streamed ``client.Body``."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return len(body), zlib.crc32(body)
    n = crc = 0
    async for chunk in body:
        n, crc = n + len(chunk), zlib.crc32(chunk, crc)
    return n, crc


def _clear(exc: Exception, rt: client.Runtime | None) -> bool:
    """A clear loss: RuntimeLost (not the whole connection), or a body read failing with the loss's
    own message (a Body raises StreamError, with the reason its runtime was lost)."""
    if isinstance(exc, client.ConnectionLost):
        return False
    if isinstance(exc, client.RuntimeLost):
        return True
    lost = rt.lost if rt is not None else None
    return isinstance(exc, client.StreamError) and lost is not None and lost.message in str(exc)


#: pyzmq's own pair for tracking zero-copy sends (one thread, started by the first large frame sent)
PYZMQ_GC = "inproc://pyzmq.gc."


def _open_zmq_sockets() -> list[str]:
    """The ZeroMQ sockets of this process still open (type and endpoint): after the connection has
    closed there should be none. Found through the garbage collector, after a collection."""
    gc.collect()
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, zmq.Socket) and not obj.closed:
            with contextlib.suppress(zmq.ZMQError):
                kind = {zmq.PUSH: "PUSH", zmq.PULL: "PULL", zmq.DEALER: "DEALER"}.get(obj.socket_type, obj.socket_type)
                endpoint = obj.getsockopt(zmq.LAST_ENDPOINT).decode() or "(not connected)"
                if not endpoint.startswith(PYZMQ_GC):
                    found.append(f"{kind} {endpoint} held by {_holders(obj, 4)}")
    return sorted(found)


def _holders(obj: object, depth: int = 2) -> str:
    """What refers to ``obj`` (``depth`` levels: a frame or coroutine by its function's name): says
    which code kept a socket open."""
    names = []
    for ref in gc.get_referrers(obj):
        if isinstance(ref, list) or ref is sys._getframe():
            continue  # gc.get_objects()'s list, this frame
        name = f"frame {ref.f_code.co_name}" if inspect.isframe(ref) else type(ref).__qualname__
        if inspect.iscoroutine(ref) or inspect.isfunction(ref):
            name = f"{type(ref).__name__} {ref.__qualname__}"
        inner = _holders(ref, depth - 1) if depth > 1 and not inspect.isframe(ref) else ""
        names.append(f"{name} <- [{inner}]" if inner else name)
    return ", ".join(sorted(set(names))) or "nothing"


def _counts(sample: dict[str, Any]) -> list[int]:
    return [sample["deno"], *(p[k] for p in sample["procs"].values() for k in ("fds", "sockets"))]


def _growth(samples: list[dict[str, Any]], role: str, warmup: float) -> dict[str, Any] | None:
    """Last minus first load sample, from ``warmup`` s after it started, of the process in ``role``
    hosting the same number of runtimes, for the (process, runtimes) with the most such samples.

    A daemon's fds and sockets grow with the runtimes it hosts (pipes to each Deno, control links),
    and a restart moves runtimes to the other daemon: only samples with equal placement compare."""
    if not samples:
        return None
    samples = [s for s in samples if s["phase"] == "load"]
    if not samples:
        return None
    usable = [s for s in samples if s["t"] >= s["procs"][role]["since"] + warmup]
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for s in usable:
        groups.setdefault((s["procs"][role]["pid"], s["procs"][role]["runtimes"]), []).append(s)
    key, usable = max(groups.items(), key=lambda kv: (len(kv[1]), kv[1][-1]["t"]), default=((None, None), []))
    if len(usable) < 2:
        return {"pid": key[0], "samples": len(usable)}
    return {"samples": len(usable), "runtimes": key[1], **_diff(usable[0], usable[-1], role)}


def _idle_growth(samples: list[dict[str, Any]], role: str) -> dict[str, Any] | None:
    """The idle sample after the load minus the one before it, if the same process took both (not
    for a restarted daemon)."""
    idle = [s for s in samples if s["phase"] == "idle"]
    if len(idle) < 2 or idle[0]["procs"][role]["pid"] != idle[-1]["procs"][role]["pid"]:
        return None
    return _diff(idle[0], idle[-1], role)


def _diff(a: dict[str, Any], b: dict[str, Any], role: str) -> dict[str, Any]:
    pa, pb = a["procs"][role], b["procs"][role]
    return {
        "pid": pa["pid"],
        "from_t": a["t"],
        "to_t": b["t"],
        "rss_mib": round(pb["rss_mib"] - pa["rss_mib"], 1),
        "fds": pb["fds"] - pa["fds"],
        "sockets": pb["sockets"] - pa["sockets"],
    }


def verdict(rep: dict[str, Any], bounds: Bounds) -> list[str]:
    """What makes the run fail, in words (empty: it passed)."""
    fail = []
    for what in ("unexpected", "unclear", "corrupt"):
        if rep[what]:
            fail.append(f"{what} errors: {rep[what]}")
    fail += [f"no {kind} operation succeeded" for kind in rep["kinds"] if not rep["ops"].get(kind)]
    for role, g in rep["growth"].items():
        if g is None or "fds" not in g:
            fail.append(f"{role}: too few samples after warm-up to measure growth ({g})")
    measured = [("under load", rep["growth"]), ("idle before -> idle after", rep["idle_growth"])]
    for when, growth in measured:
        for role, g in growth.items():
            if g is None or "fds" not in g:
                continue
            if g["fds"] > bounds.max_fd_growth:
                fail.append(f"{role}: open fds grew by {g['fds']} {when} (bound {bounds.max_fd_growth})")
            if g["sockets"] > bounds.max_socket_growth:
                fail.append(f"{role}: sockets grew by {g['sockets']} {when} (bound {bounds.max_socket_growth})")
            rss_bound = bounds.max_rss_growth_mib if growth is rep["growth"] else bounds.max_idle_rss_growth_mib
            if g["rss_mib"] > rss_bound:
                fail.append(f"{role}: RSS grew by {g['rss_mib']} MiB {when} (bound {rss_bound:g})")
    end = rep["end"]
    if end.get("deno_left"):
        fail.append(f"Deno processes outlived their daemons: {end['deno_left']}")
    if end.get("zmq_open_after_close"):
        fail.append(f"ZeroMQ sockets still open after the connection closed: {end['zmq_open_after_close']}")
    if end.get("children_left"):
        fail.append(f"child processes left after the stop: {end['children_left']}")
    fail += [f"restart of {r['name']} left Deno {r['orphans']}" for r in rep["restarts"] if r["orphans"]]
    return fail


# ---- output -----------------------------------------------------------------------------------------

ROLES = ("broker", *DAEMONS, "client")


def _header() -> str:
    procs = " | ".join(f"{r:>6} MiB  fd sck" for r in ROLES)
    return f"{'t':>6} {'ops':>5} {'err':>3} {'exp':>3} {'bad':>3} | {procs} | deno"


def _row(s: dict[str, Any]) -> str:
    procs = " | ".join(
        f"{s['procs'][r]['rss_mib']:>10.1f} {s['procs'][r]['fds']:>3} {s['procs'][r]['sockets']:>3}" for r in ROLES
    )
    errs = [sum(s[k].values()) for k in ("unexpected", "expected", "corrupt")]
    mark = (" idle" if s["phase"] == "idle" else "") + ("" if s["quiet"] else " (not quiet)")
    counts = f"{sum(s['ops'].values()):>5} {errs[0]:>3} {errs[1]:>3} {errs[2]:>3}"
    return f"{s['t']:>6.1f} {counts} | {procs} | {s['deno']:>4}{mark}"


def periods(rep: dict[str, Any]) -> list[str]:
    """Operations per kind and errors in each period (up to its sample): one row per sample."""
    kinds = rep["kinds"]
    lines = [f"{'t':>6} " + " ".join(f"{k[:8]:>8}" for k in kinds) + f" {'unexp':>5} {'exp':>4} {'bad':>4}"]
    for s in rep["samples"]:
        errs = [sum(s[k].values()) for k in ("unexpected", "expected", "corrupt")]
        ops = " ".join(f"{s['ops'].get(k, 0):>8}" for k in kinds)
        lines.append(f"{s['t']:>6.1f} {ops} {errs[0]:>5} {errs[1]:>4} {errs[2]:>4}")
    return lines


def summary(rep: dict[str, Any]) -> str:
    lines = ["", "operations per period:", *periods(rep)]
    lines += ["", f"{'operation':<14} {'done':>7} {'unexpected':>10} {'expected':>8} {'corrupt':>7}"]
    for kind in rep["kinds"]:
        une = sum(v for k, v in rep["unexpected"].items() if k.startswith(kind + ":"))
        exp = sum(v for k, v in rep["expected"].items() if k.startswith(kind + ":"))
        lines.append(f"{kind:<14} {rep['ops'].get(kind, 0):>7} {une:>10} {exp:>8} {rep['corrupt'].get(kind, 0):>7}")
    for what in ("unexpected", "expected", "unclear"):
        if rep[what]:
            lines.append(f"{what}: {rep[what]}")
    lines += ["", f"growth after {rep['warmup_s']:g}s warm-up (first to last sample of each process):"]
    for role, g in rep["growth"].items():
        if g and "fds" in g:
            lines.append(
                f"  {role:<7} pid {g['pid']:<7} t {g['from_t']:>6.1f}..{g['to_t']:<6.1f} RSS {g['rss_mib']:+7.1f} MiB"
                f"  fds {g['fds']:+4d}  sockets {g['sockets']:+4d}  ({g['samples']} samples, {g['runtimes']} runtimes)"
            )
        else:
            lines.append(f"  {role:<7} not enough samples: {g}")
    lines.append("growth from the idle sample before the load to the one after it (all runtimes disposed):")
    for role, g in rep["idle_growth"].items():
        if g:
            figures = f"RSS {g['rss_mib']:+7.1f} MiB  fds {g['fds']:+4d}  sockets {g['sockets']:+4d}"
            lines.append(f"  {role:<7} pid {g['pid']:<7} {figures}")
        else:
            lines.append(f"  {role:<7} restarted: no idle sample before the load")
    for r in rep["restarts"]:
        lines.append(
            f"restart {r['name']} by {r['sig']} at {r['killed'] or 0:.1f}s: exited after {r['exited'] or 0:.2f}s,"
            f" runtimes lost after {r['lost_after'] or 0:.2f}s, rejoined after {r['joined_after'] or 0:.2f}s"
        )
    end = rep["end"]
    if end.get("heap_growth"):
        lines += ["client heap growth (tracemalloc), biggest first:", *(f"  {g}" for g in end["heap_growth"])]
    lines.append(
        f"end: {len(end.get('deno_seen', {}))} Deno processes seen, left running: {end.get('deno_left')};"
        f" child processes left: {end.get('children_left')}; client fds after close: {end.get('client_fds')}"
    )
    lines.append("PASS" if not rep["failures"] else "FAIL:\n  " + "\n  ".join(rep["failures"]))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=1.0, help="how long to run (1)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    p.add_argument("--interval", type=float, help="seconds between samples (duration/12, within 5..20)")
    p.add_argument("--warmup", type=float, help="seconds from a start to the first growth sample (2 intervals, <= 20)")
    p.add_argument("--restart-every", type=float, default=60.0, help="seconds between daemon restarts (60; 0: none)")
    p.add_argument("--restart-signal", choices=("kill", "term", "alternate"), default="alternate")
    p.add_argument("--workers", type=int, default=1, help="copies of each worker (1: five workers)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tracemalloc", action="store_true", help="report where the client's heap grew (slower)")
    p.add_argument("--max-fd-growth", type=int, default=Bounds.max_fd_growth)
    p.add_argument("--max-socket-growth", type=int, default=Bounds.max_socket_growth)
    p.add_argument("--max-rss-growth-mib", type=float, default=Bounds.max_rss_growth_mib)
    p.add_argument("--json", type=Path, help="write the report (with every sample) to this file")
    p.add_argument("--log-dir", type=Path, help="where the processes' logs go (a new temporary directory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # a native crash of the client (seen once: exit -11 after the load, no report) prints the
    # Python stacks of every thread to stderr, which the test shows
    faulthandler.enable(all_threads=True)
    args = parse(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rep = asyncio.run(Soak(args, log_dir).run())
    print(summary(rep), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
