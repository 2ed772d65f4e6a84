"""Measure sandbox-mesh against baselines measured in the same run (issue 4).

    python scripts/bench.py [--quick] [--only NAME[,NAME...]] [--json PATH] [--png PATH]

The script starts everything itself on 127.0.0.1 -- an aiohttp upstream (its own process), a
``python -m broker`` with its embedded local daemon, the client, the HTTP front and the end
clients (this process) -- and stops all of it at the end, also on Ctrl-C or an error.

Baselines: ``direct`` (the end client talks to the upstream itself), ``proxy`` (a plain aiohttp
reverse proxy streaming with ``iter_any()``, what a user would write instead) and ``raw`` (a bare
pyzmq PUSH/PULL pair moving the same bytes in 64 KiB frames, HWM 16: the transport's ceiling).
Every figure is the median of several rounds; every ratio is against a baseline of this run.
MB/s means 10^6 bytes per second; MiB is 2^20 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # measure the product in the tree this script is in

from bench_env import (  # noqa: E402
    MiB,
    Proc,
    Processes,
    body_source,
    cpu_seconds,
    deno_children,
    end_client,
    expected_crc,
    proxy,
    pss_mib,
    raw_zmq_seconds,
    read_all,
    read_crc,
    rss_mib,
    sse_arrivals,
    start_site,
    tcp_queued,
    upload,
    upstream_stats,
)

import client  # noqa: E402

# ---- plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    bulk: int  # bytes per bulk transfer
    slow: int  # bytes of the slow consumer's body
    slow_pauses: int  # pauses per slow body (one sample each)
    slow_settle: float  # seconds the guest pauses before a sample
    streams: int  # concurrent streams
    stream_runtimes: int  # runtimes they are spread over
    rtt_requests: int  # sequential dispatches per round
    rps_requests: int  # dispatches per round at RPS_IN_FLIGHT
    creates_warm: int
    creates_cold: int
    create_pause: float  # seconds between creates, so the warm pool refills
    cancels: int  # cancels per round
    idle_runtimes: int
    scenario_timeout: float
    sse_events: int = 20
    sse_gap: float = 0.05
    stream_size: int = MiB


FULL = Plan(
    rounds=5, bulk=512 * MiB, slow=1024 * MiB, slow_pauses=8, slow_settle=0.3, streams=1000, stream_runtimes=50,
    rtt_requests=500, rps_requests=4000, creates_warm=10, creates_cold=5, create_pause=0.5, cancels=10,
    idle_runtimes=20, scenario_timeout=900,
)  # fmt: skip
QUICK = Plan(
    rounds=3, bulk=64 * MiB, slow=128 * MiB, slow_pauses=4, slow_settle=0.15, streams=200, stream_runtimes=10,
    rtt_requests=200, rps_requests=1000, creates_warm=5, creates_cold=3, create_pause=0.3, cancels=5,
    idle_runtimes=10, scenario_timeout=120,
)  # fmt: skip
RPS_IN_FLIGHT = 32
#: A heap limit other than the daemon's default (128 MB), so create_runtime cannot use the pool.
COLD_MEMORY_MB = 160
#: Pre-started runtimes in the broker's local daemon (its --pool-size default).
POOL_SIZE = 2
#: A reader's pause longer than a ZMTP heartbeat timeout (5 s in wire/sockets.py; pipes once had one,
#: and then lost the bytes queued in them), and the body read with it.
LONG_PAUSE = 6.0
LONG_PAUSE_BODY = 32 * MiB
#: Body the guest cancels in cancel_latency: large enough that the upstream is blocked writing it.
CANCEL_BODY = 1024 * MiB


# ---- rows ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    op: str  # "<=" or ">="
    limit: float
    on: str = "value"  # "value" or "ratio"
    unit: str = ""

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x <= self.limit if self.op == "<=" else x >= self.limit

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit and self.on == "value" else ""
        return f"{'ratio ' if self.on == 'ratio' else ''}{self.op} {self.limit:g}{unit}"


@dataclass
class Row:
    scenario: str
    figure: str
    value: float | None = None
    unit: str = ""
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    rounds: list[float] = field(default_factory=list)
    baseline_rounds: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def figure(
    scenario: str,
    name: str,
    unit: str,
    rounds: list[float],
    *,
    target: Target | None = None,
    baseline: tuple[str, list[float]] | None = None,
    ratio: bool = True,
    note: str = "",
    value: float | None = None,
) -> Row:
    """One row: the median of ``rounds`` (or ``value``), against the median of a baseline's rounds."""
    row = Row(scenario, name, median(rounds) if value is None else value, unit, rounds=list(rounds), note=note)
    if baseline is not None:
        row.baseline, row.baseline_rounds = baseline[0], list(baseline[1])
        row.baseline_value = median(baseline[1])
        if ratio and row.value is not None and row.baseline_value:
            row.ratio = row.value / row.baseline_value
    if target is not None:
        row.target = str(target)
        row.met = target.met(row.value, row.ratio)
    return row


def throughput_rows(
    scenario: str, mbps: dict[str, list[float]], *, floor: float | None = None, proxy_ratio: float = 0.5
) -> list[Row]:
    """product MB/s against direct (with the absolute target), proxy (the ratio target) and raw zmq."""
    rows = [
        figure(
            scenario,
            "MB/s",
            "MB/s",
            mbps["product"],
            baseline=("direct", mbps["direct"]),
            target=Target(">=", floor, unit="MB/s") if floor is not None else None,
        ),
        figure(
            scenario,
            "MB/s vs proxy",
            "MB/s",
            mbps["product"],
            baseline=("proxy", mbps["proxy"]),
            target=Target(">=", proxy_ratio, on="ratio"),
        ),
    ]
    if "raw" in mbps:
        rows.append(figure(scenario, "MB/s vs raw zmq", "MB/s", mbps["product"], baseline=("raw zmq", mbps["raw"])))
    return rows


def to_mbps(size: int, seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [size / 1e6 / s for s in secs] for name, secs in seconds.items()}


# ---- the product under test ----------------------------------------------------------------------------

GUEST = r"""
const UP = __UPSTREAM__;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const now = () => performance.timeOrigin + performance.now();
const BLOCK = new Uint8Array(65536);
for (let i = 0; i < BLOCK.length; i++) BLOCK[i] = Math.imul(i, 2654435761) >>> 24;
const blockStream = (size) => {
  let left = size;
  return new ReadableStream({ pull(c) {
    if (left <= 0) { c.close(); return; }
    const n = Math.min(BLOCK.length, left);
    left -= n;
    c.enqueue(BLOCK.slice(0, n));
  } });
};

serve({ async fetch(req) {
  const u = new URL(req.url);
  const path = u.pathname.replace(/^\/rt\/\d+/, "");
  if (path === "/sse" || path === "/bytes") {  // passthrough: the fetched body is the served body
    const up = await fetch(UP + path + u.search);
    return new Response(up.body, { status: up.status,
      headers: { "content-type": up.headers.get("content-type") ?? "application/octet-stream" } });
  }
  if (path === "/gen") return new Response(blockStream(Number(u.searchParams.get("size"))));
  if (path === "/count") {
    let n = 0;
    for await (const c of req.body) n += c.byteLength;
    return Response.json({ n });
  }
  return new Response("ok");
} });

const bench = globalThis.bench = {
  async upload(size, key) {
    const body = blockStream(size);
    const r = await fetch(UP + "/upload?key=" + key, { method: "POST", body, duplex: "half" });
    return (await r.json()).size;
  },
  async readWithPause(size, pauseMs) {  // a quarter, one long pause, the rest
    const r = await fetch(UP + `/bytes?size=${size}`);
    const reader = r.body.getReader();
    let n = 0, paused = false;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      n += value.byteLength;
      if (!paused && n >= size / 4) { paused = true; await sleep(pauseMs); }
    }
    return n;
  },
  slow: null,
  startSlow(size, key, step) {
    const s = bench.slow = { got: 0, paused: false, done: false, error: null, resume: null };
    (async () => {
      const r = await fetch(UP + `/bytes?size=${size}&key=${key}`);
      const reader = r.body.getReader();
      let next = step;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        s.got += value.byteLength;
        if (s.got >= next && s.got < size) {
          next += step;
          await new Promise((resolve) => { s.resume = resolve; s.paused = true; });
          s.paused = false;
        }
      }
      s.done = true;
    })().catch((e) => { s.error = String(e); s.done = true; });
  },
  resumeSlow() { const r = bench.slow.resume; bench.slow.resume = null; if (r) r(); },
  async cancelOne(size, key) {
    const r = await fetch(UP + `/bytes?size=${size}&key=${key}`);
    const reader = r.body.getReader();
    await reader.read();
    await sleep(50);  // the pipes fill up; the upstream blocks writing
    const t = now();
    await reader.cancel();
    return t;
  },
};
"""


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


def cpu_snapshot(env: Env) -> dict[str, float]:
    return {
        "bench": cpu_seconds(os.getpid()),
        "broker+daemon": cpu_seconds(env.broker_pid),
        "deno": sum(cpu_seconds(pid) for pid in deno_children(env.broker_pid)),
        "upstream": cpu_seconds(env.upstream_pid),
    }


@dataclass
class CpuTally:
    """CPU time each process spent while one path moved bytes: shows where a path is bound."""

    seconds: dict[str, float] = field(default_factory=dict)
    nbytes: int = 0

    @contextlib.contextmanager
    def measure(self, env: Env, nbytes: int) -> Iterator[None]:
        before = cpu_snapshot(env)
        yield
        for name, used in cpu_snapshot(env).items():
            self.seconds[name] = self.seconds.get(name, 0.0) + used - before[name]
        self.nbytes += nbytes

    def per_gb(self) -> str:
        gb = self.nbytes / 1e9 or 1.0
        return ", ".join(f"{name} {used / gb:.2f}" for name, used in self.seconds.items() if used > 0.005)


def cpu_note(tallies: dict[str, CpuTally]) -> str:
    return "CPU s per GB moved: " + "; ".join(f"{name}: {t.per_gb()}" for name, t in tallies.items())


def tallied(tallies: dict[str, CpuTally], name: str, env: Env, nbytes: int) -> contextlib.AbstractContextManager[Any]:
    tally = tallies.get(name)
    return tally.measure(env, nbytes) if tally is not None else contextlib.nullcontext()


@dataclass
class Product:
    conn: client.Connection
    runtimes: list[client.Runtime]
    url: str  # the HTTP front; runtime i serves under /rt/i

    def rt_url(self, i: int = 0) -> str:
        return f"{self.url}/rt/{i}"


def front_app(runtimes: list[client.Runtime]) -> web.Application:
    """The HTTP front the end client talks to: client.aiohttp_handler(rt) per runtime."""
    handlers = [client.aiohttp_handler(rt) for rt in runtimes]

    async def route(request: web.Request) -> web.StreamResponse:
        return await handlers[int(request.match_info["i"])](request)

    app = web.Application()
    app.router.add_route("*", "/rt/{i}/{tail:.*}", route)
    return app


async def create_runtimes(conn: client.Connection, n: int, upstream: str, parallel: int = 8) -> list[client.Runtime]:
    """``n`` runtimes with forward_fetch() and the bench guest, created ``parallel`` at a time."""
    gate = asyncio.Semaphore(parallel)
    source = GUEST.replace("__UPSTREAM__", json.dumps(upstream))

    async def one() -> client.Runtime:
        async with gate:
            rt = await conn.create_runtime(fetch=client.forward_fetch())
            await rt.eval(source)
            return rt

    return list(await asyncio.gather(*(one() for _ in range(n))))


@contextlib.asynccontextmanager
async def connection(env: Env) -> AsyncIterator[client.Connection]:
    conn = await client.connect(env.frontend, timeout=30)
    try:
        yield conn
    finally:
        # "bye" makes the broker dispose every runtime of this connection
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 15)


@contextlib.asynccontextmanager
async def product(env: Env, runtimes: int = 1) -> AsyncIterator[Product]:
    """Runtimes running the bench guest behind an aiohttp front; all gone on exit."""
    async with connection(env) as conn:
        rts = await create_runtimes(conn, runtimes, env.upstream)
        runner, url = await start_site(front_app(rts))
        try:
            yield Product(conn, rts, url)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 15)


def transfer_timeout(size: int) -> float:
    """A generous bound for moving ``size`` bytes (2 MB/s), so nothing waits forever."""
    return 30 + size / 2e6


async def guest_eval(rt: client.Runtime, code: str, timeout: float = 30) -> Any:
    return await rt.eval(code, timeout=timeout)


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


def key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---- 1. llm_stream -------------------------------------------------------------------------------------


async def llm_stream(env: Env) -> list[Row]:
    p = env.plan
    n, gap = p.sse_events, p.sse_gap
    query = f"/sse?n={n}&gap={gap}"
    gap_err: dict[str, list[float]] = {"direct": [], "product": []}
    ttfe: dict[str, list[float]] = {"direct": [], "product": []}
    added: list[float] = []
    timeline: list[dict[str, list[float]]] = []
    async with product(env) as prod:
        urls = {"direct": env.upstream + query, "product": prod.rt_url() + query}
        for url in urls.values():  # warm up connections and code paths
            await sse_arrivals(env.session, url.replace(query, "/sse?n=2&gap=0.01"), 2)
        for _ in range(p.rounds):
            arrivals = {}
            for name, url in urls.items():
                arrivals[name] = await asyncio.wait_for(sse_arrivals(env.session, url, n), 30)
                gaps = [abs(b - a - gap) * 1000 for a, b in itertools.pairwise(arrivals[name])]
                gap_err[name].append(percentile(gaps, 99))
                ttfe[name].append(arrivals[name][0] * 1000)
            added.append(ttfe["product"][-1] - ttfe["direct"][-1])
            timeline.append({k: [t * 1000 for t in v] for k, v in arrivals.items()})
    env.extras["llm_stream_timeline_ms"] = timeline
    env.extras["llm_stream_gap_ms"] = gap * 1000
    s = "llm_stream"
    return [
        figure(
            s,
            "arrival-gap error p99",
            "ms",
            gap_err["product"],
            baseline=("direct", gap_err["direct"]),
            target=Target("<=", 5, unit="ms"),
            note=f"{n} events {gap * 1000:g} ms apart, |gap - {gap * 1000:g} ms|",
        ),
        figure(
            s,
            "added time to first event",
            "ms",
            added,
            baseline=("direct TTFE", ttfe["direct"]),
            ratio=False,
            target=Target("<=", 3, unit="ms"),
            note="product TTFE - direct TTFE, per round",
        ),
        figure(s, "time to first event", "ms", ttfe["product"], baseline=("direct", ttfe["direct"])),
    ]


# ---- 2. bulk_passthrough -------------------------------------------------------------------------------


async def bulk_passthrough(env: Env) -> list[Row]:
    size = env.plan.bulk
    path = f"/bytes?size={size}"
    seconds: dict[str, list[float]] = {"direct": [], "proxy": [], "product": [], "raw": []}
    tallies = {"product": CpuTally(), "proxy": CpuTally()}
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        urls = {"direct": env.upstream + path, "proxy": proxy_url + path, "product": prod.rt_url() + path}
        for url in urls.values():
            await read_all(env.session, url.replace(path, f"/bytes?size={MiB}"), MiB)
        for _ in range(env.plan.rounds):
            for name, url in urls.items():
                with tallied(tallies, name, env, size):
                    dt = await asyncio.wait_for(read_all(env.session, url, size), transfer_timeout(size))
                seconds[name].append(dt)
            seconds["raw"].append(await asyncio.wait_for(raw_zmq_seconds(size), transfer_timeout(size)))
    rows = throughput_rows("bulk_passthrough", to_mbps(size, seconds), floor=300)
    rows[0].note = f"{size // MiB} MiB upstream -> guest fetch -> guest serve -> end client"
    rows[1].note = cpu_note(tallies)
    return rows


# ---- 3. bulk_upload, bulk_dispatch_body ----------------------------------------------------------------


async def upload_baselines(
    env: Env, proxy_url: str, size: int, seconds: dict[str, list[float]], tallies: dict[str, CpuTally]
) -> None:
    """One round of the upload baselines: direct, through the proxy, raw zmq."""
    limit = transfer_timeout(size)
    seconds["direct"].append(await asyncio.wait_for(upload(env.session, env.upstream + "/upload", size), limit))
    with tallied(tallies, "proxy", env, size):
        seconds["proxy"].append(await asyncio.wait_for(upload(env.session, proxy_url + "/upload", size), limit))
    seconds["raw"].append(await asyncio.wait_for(raw_zmq_seconds(size), limit))


async def bulk_upload(env: Env) -> list[Row]:
    size = env.plan.bulk
    seconds: dict[str, list[float]] = {"direct": [], "proxy": [], "product": [], "raw": []}
    tallies = {"product": CpuTally(), "proxy": CpuTally()}
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        await guest_eval(rt, f"export default await bench.upload({MiB}, 'warm')")
        for _ in range(env.plan.rounds):
            await upload_baselines(env, proxy_url, size, seconds, tallies)
            code = f"export default await bench.upload({size}, {json.dumps(key('up'))})"
            with tallied(tallies, "product", env, size):
                t0 = time.perf_counter()
                got = await guest_eval(rt, code, timeout=transfer_timeout(size))
                seconds["product"].append(time.perf_counter() - t0)
            if got != size:
                raise RuntimeError(f"the upstream counted {got} bytes of the guest's upload, expected {size}")
    rows = throughput_rows("bulk_upload", to_mbps(size, seconds))
    rows[0].note = f"{size // MiB} MiB guest ReadableStream (64 KiB chunks) -> fetch() POST -> upstream"
    rows[1].note = cpu_note(tallies)
    return rows


async def bulk_dispatch_body(env: Env) -> list[Row]:
    size = env.plan.bulk
    seconds: dict[str, list[float]] = {"direct": [], "proxy": [], "product": [], "raw": []}

    async def dispatch(rt: client.Runtime, n: int) -> float:
        t0 = time.perf_counter()
        req = client.Request("POST", "http://bench/count", body=body_source(n))
        resp = await rt.dispatch_request(req, timeout=transfer_timeout(n))
        got = (await resp.json())["n"]
        if got != n:
            raise RuntimeError(f"the guest counted {got} bytes, expected {n}")
        return time.perf_counter() - t0

    tallies = {"product": CpuTally(), "proxy": CpuTally()}
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        await dispatch(rt, MiB)
        for _ in range(env.plan.rounds):
            await upload_baselines(env, proxy_url, size, seconds, tallies)
            with tallied(tallies, "product", env, size):
                seconds["product"].append(await dispatch(rt, size))
    rows = throughput_rows("bulk_dispatch_body", to_mbps(size, seconds))
    rows[0].note = f"{size // MiB} MiB async iterable (64 KiB chunks) -> dispatch_request -> guest counts req.body"
    rows[1].note = cpu_note(tallies)
    return rows


# ---- 4. slow_consumer ----------------------------------------------------------------------------------


async def settled_written(env: Env, k: str, settle: float) -> int:
    """Bytes the upstream has written for ``k`` once it has stopped moving (it is blocked)."""
    await asyncio.sleep(settle)
    last = -1
    for _ in range(40):
        stats = await upstream_stats(env.session, env.upstream, k)
        written = int(stats["written"]) if stats else 0
        if written == last:
            return written
        last = written
        await asyncio.sleep(0.05)
    return last


async def slow_state(rt: client.Runtime) -> dict[str, Any]:
    return await guest_eval(
        rt, "const s = bench.slow; export default { got: s.got, paused: s.paused, done: s.done, error: s.error };"
    )


@dataclass
class SlowStats:
    """Per round: the most bytes in flight seen in one pause, and how many of them sat in the kernel
    queues of the upstream's TCP connection at that moment (MiB); RSS peaks of the two processes."""

    in_flight: list[float] = field(default_factory=list)
    kernel: list[float] = field(default_factory=list)
    broker_rss: list[float] = field(default_factory=list)
    client_rss: list[float] = field(default_factory=list)

    def add_round(self, samples: list[tuple[int, int]]) -> None:
        if not samples:
            raise RuntimeError("the slow reader never paused")
        worst, kernel = max(samples)
        self.in_flight.append(worst / MiB)
        self.kernel.append(kernel / MiB)


async def sample_in_flight(env: Env, k: str, consumed: Callable[[], Awaitable[int]]) -> tuple[int, int]:
    """(upstream written - consumed, bytes still in the upstream server's own TCP send queue)."""
    written = await settled_written(env, k, env.plan.slow_settle)
    return written - await consumed(), tcp_queued(env.upstream_port)


async def slow_round(env: Env, rt: client.Runtime, stats: SlowStats) -> None:
    """One slow body read by the guest, which pauses ``slow_pauses`` times (one sample each)."""
    p = env.plan
    k = key("slow")
    await guest_eval(rt, f"bench.startSlow({p.slow}, {json.dumps(k)}, {p.slow // (p.slow_pauses + 1)})")
    samples: list[tuple[int, int]] = []
    broker_rss: list[float] = []
    client_rss: list[float] = []

    async def paused_or_done() -> dict[str, Any] | None:
        s = await slow_state(rt)
        return s if s["paused"] or s["done"] else None

    async def consumed() -> int:
        return int((await slow_state(rt))["got"])

    for _ in range(p.slow_pauses + 1):
        state = await poll(paused_or_done, transfer_timeout(p.slow), 0.01, "the slow guest did not pause")
        if state["done"]:
            break
        samples.append(await sample_in_flight(env, k, consumed))
        broker_rss.append(rss_mib(env.broker_pid))
        client_rss.append(rss_mib(os.getpid()))
        await guest_eval(rt, "bench.resumeSlow()")
    final = await poll(paused_or_done, transfer_timeout(p.slow), 0.02, "the slow guest did not finish")
    if final["error"] or final["got"] != p.slow:
        raise RuntimeError(f"slow guest read {final['got']} of {p.slow} bytes: {final['error']}")
    stats.add_round(samples)
    stats.broker_rss.append(max(broker_rss))
    stats.client_rss.append(max(client_rss))


async def slow_proxy_round(env: Env, proxy_url: str, stats: SlowStats) -> None:
    """The same slow reader at the end of the plain proxy: upstream written - end client consumed."""
    p = env.plan
    k = key("slowproxy")
    step = p.slow // (p.slow_pauses + 1)
    samples: list[tuple[int, int]] = []
    got, next_pause = 0, step

    async def consumed() -> int:
        return got

    async with env.session.get(f"{proxy_url}/bytes?size={p.slow}&key={k}") as r:
        async for chunk in r.content.iter_any():
            got += len(chunk)
            if got >= next_pause and got < p.slow:
                next_pause += step
                samples.append(await sample_in_flight(env, k, consumed))
    if got != p.slow:
        raise RuntimeError(f"the slow end client read {got} of {p.slow} bytes")
    stats.add_round(samples)


async def long_pause_loss(rt: client.Runtime, side: str) -> tuple[int, str]:
    """Read a body with one LONG_PAUSE after a quarter of it; returns (bytes missing, error if any)."""
    size, got = LONG_PAUSE_BODY, 0
    try:
        if side == "guest":  # the guest pauses reading a fetch() body
            code = f"export default await bench.readWithPause({size}, {LONG_PAUSE * 1000:.0f})"
            got = int(await guest_eval(rt, code, timeout=60))
        else:  # the client pauses reading a serve() body
            resp = await rt.dispatch_request(client.Request("GET", f"http://bench/gen?size={size}"))
            async for chunk in resp.body:
                got += len(chunk)
                if got >= size // 4 and got - len(chunk) < size // 4:
                    await asyncio.sleep(LONG_PAUSE)
    except Exception as exc:
        return size - got, f"{type(exc).__name__}: {exc}"
    return size - got, ""


def long_pause_row(side: str, lost: int, error: str) -> Row:
    what = "guest reading a fetch body" if side == "guest" else "client reading a serve body"
    if error:
        note = f"failed loudly: {error}"
    elif lost:
        note = "the body ended normally with bytes missing (silent loss)"
    else:
        note = "intact"
    return figure(
        "slow_consumer",
        f"bytes lost after one {LONG_PAUSE:g} s pause ({what})",
        "B",
        [],
        value=float(lost),
        target=Target("<=", 0),
        note=f"{LONG_PAUSE_BODY // MiB} MiB body, paused after a quarter (longer than a 5 s ZMTP heartbeat "
        f"timeout): {note}",
    )


async def slow_consumer(env: Env) -> list[Row]:
    prod_stats, proxy_stats = SlowStats(), SlowStats()
    limit = transfer_timeout(env.plan.slow) * 2
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        for _ in range(env.plan.rounds):
            await asyncio.wait_for(slow_round(env, rt, prod_stats), limit)
            await asyncio.wait_for(slow_proxy_round(env, proxy_url, proxy_stats), limit)
        sides = ("guest", "client")
        losses = await asyncio.gather(*(long_pause_loss(rt, side) for side in sides))
    s = "slow_consumer"
    return [
        figure(
            s,
            "bytes buffered in broker+daemon+client beyond consumed",
            "MiB",
            [a - b for a, b in zip(prod_stats.in_flight, prod_stats.kernel, strict=True)],
            baseline=("proxy", [a - b for a, b in zip(proxy_stats.in_flight, proxy_stats.kernel, strict=True)]),
            target=Target("<=", 8, unit="MiB"),
            note="upstream written - guest consumed - the upstream server's own send queue, sampled while paused",
        ),
        figure(
            s,
            "max bytes in flight beyond consumed",
            "MiB",
            prod_stats.in_flight,
            baseline=("proxy", proxy_stats.in_flight),
            note=f"{env.plan.slow // MiB} MiB body, upstream written - guest consumed (all buffers on the way)",
        ),
        figure(
            s,
            "of which in the upstream server's TCP send queue",
            "MiB",
            prod_stats.kernel,
            baseline=("proxy", proxy_stats.kernel),
            note="the upstream's own kernel buffer (/proc/net/tcp tx_queue of its sockets): not ours",
        ),
        figure(s, "broker+daemon RSS peak", "MiB", prod_stats.broker_rss, note="VmRSS of the broker process"),
        figure(
            s, "client RSS peak", "MiB", prod_stats.client_rss, note="VmRSS of this process (client, front, end client)"
        ),
        *(long_pause_row(side, lost, error) for side, (lost, error) in zip(sides, losses, strict=True)),
    ]


# ---- 5. concurrent_streams -----------------------------------------------------------------------------


async def run_streams(
    session: aiohttp.ClientSession, urls: list[str], want: tuple[int, int]
) -> tuple[float, list[str]]:
    """Read every URL at once; returns (seconds, errors)."""

    async def one(url: str) -> str | None:
        try:
            got = await asyncio.wait_for(read_crc(session, url), 300)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if got == want else f"got (size, crc) {got}, expected {want}"

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(u) for u in urls))
    return time.perf_counter() - t0, [r for r in results if r is not None]


async def concurrent_streams(env: Env) -> list[Row]:
    p = env.plan
    size, n, per = p.stream_size, p.streams, p.stream_runtimes
    want = (size, expected_crc(size))
    path = f"/bytes?size={size}"
    mbps: dict[str, list[float]] = {"direct": [], "proxy": [], "product": []}
    errors: dict[str, list[str]] = {name: [] for name in mbps}
    tallies = {"product": CpuTally(), "proxy": CpuTally()}
    async with product(env, per) as prod, proxy(env.upstream) as proxy_url:
        urls = {
            "direct": [env.upstream + path] * n,
            "proxy": [proxy_url + path] * n,
            "product": [prod.rt_url(i % per) + path for i in range(n)],
        }
        await run_streams(env.session, [prod.rt_url(i) + path for i in range(per)], want)  # warm-up
        for _ in range(p.rounds):
            for name, batch in urls.items():
                with tallied(tallies, name, env, n * size):
                    seconds, errs = await run_streams(env.session, batch, want)
                mbps[name].append((n - len(errs)) * size / 1e6 / seconds)  # verified bytes only
                errors[name] += errs
    s = "concurrent_streams"
    note = f"{n} streams x {size // MiB} MiB over {per} runtimes, crc32 checked, per round"
    if errors["product"]:
        note += f"; first error: {errors['product'][0]}"
    base_errors = errors["proxy"] + errors["direct"]
    return [
        figure(
            s,
            "errors (all rounds)",
            "",
            [],
            value=float(len(errors["product"])),
            baseline=("proxy+direct", [float(len(base_errors))]),
            ratio=False,
            target=Target("<=", 0),
            note=note + (f"; first baseline error: {base_errors[0]}" if base_errors else ""),
        ),
        figure(
            s,
            "aggregate MB/s vs proxy",
            "MB/s",
            mbps["product"],
            baseline=("proxy", mbps["proxy"]),
            target=Target(">=", 0.5, on="ratio"),
            note=cpu_note(tallies),
        ),
        figure(s, "aggregate MB/s vs direct", "MB/s", mbps["product"], baseline=("direct", mbps["direct"])),
    ]


# ---- 6. dispatch_rtt -----------------------------------------------------------------------------------


async def requests_per_second(call: Callable[[], Awaitable[Any]], total: int, in_flight: int) -> float:
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return total / (time.perf_counter() - t0)


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def dispatch_rtt(env: Env) -> list[Row]:
    p = env.plan
    stats: dict[str, list[float]] = {k: [] for k in ("p50", "p99", "rps", "http_p50", "http_p99", "http_rps")}
    async with product(env) as prod:
        rt = prod.runtimes[0]

        async def dispatch() -> None:
            resp = await rt.dispatch_request(client.Request("GET", "http://bench/ping"), timeout=30)
            if await resp.read() != b"ok":
                raise RuntimeError("unexpected dispatch answer")

        async def http() -> None:
            async with env.session.get(env.upstream + "/small") as r:
                await r.read()

        await timed(dispatch, 50)
        await timed(http, 50)
        for _ in range(p.rounds):
            for prefix, call in (("", dispatch), ("http_", http)):
                lat = await asyncio.wait_for(timed(call, p.rtt_requests), 120)
                stats[prefix + "p50"].append(percentile(lat, 50))
                stats[prefix + "p99"].append(percentile(lat, 99))
                rps = await asyncio.wait_for(requests_per_second(call, p.rps_requests, RPS_IN_FLIGHT), 120)
                stats[prefix + "rps"].append(rps)
    s = "dispatch_rtt"
    base = "HTTP GET direct"
    return [
        figure(
            s,
            "p50",
            "ms",
            stats["p50"],
            baseline=(base, stats["http_p50"]),
            target=Target("<=", 2, unit="ms"),
            note="dispatch_request + read of a 2-byte inline body",
        ),
        figure(s, "p99", "ms", stats["p99"], baseline=(base, stats["http_p99"])),
        figure(
            s,
            f"req/s at {RPS_IN_FLIGHT} in flight",
            "req/s",
            stats["rps"],
            baseline=(base, stats["http_rps"]),
            target=Target(">=", 2000, unit="req/s"),
        ),
    ]


# ---- 7. create_runtime ---------------------------------------------------------------------------------


async def create_times(conn: client.Connection, n: int, pause: float, memory_limit_mb: int | None) -> list[float]:
    """Create and dispose ``n`` runtimes one after another; returns the create times in ms."""
    out = []
    for _ in range(n):
        await asyncio.sleep(pause)  # the warm pool refills meanwhile
        t0 = time.perf_counter()
        rt = await conn.create_runtime(memory_limit_mb=memory_limit_mb, timeout=30)
        out.append((time.perf_counter() - t0) * 1000)
        await rt.dispose()
    return out


async def create_runtime(env: Env) -> list[Row]:
    p = env.plan
    warm: list[float] = []
    cold: list[float] = []
    async with connection(env) as conn:
        for _ in range(p.rounds):
            warm.append(percentile(await create_times(conn, p.creates_warm, p.create_pause, None), 50))
            cold.append(percentile(await create_times(conn, p.creates_cold, p.create_pause, COLD_MEMORY_MB), 50))
    s = "create_runtime"
    return [
        figure(
            s,
            "p50 warm (pool)",
            "ms",
            warm,
            baseline=("cold", cold),
            target=Target("<=", 5, unit="ms"),
            note=f"{p.creates_warm} sequential creates per round, {p.create_pause:g} s apart",
        ),
        figure(s, "p50 cold (no pool)", "ms", cold, note=f"memory_limit_mb={COLD_MEMORY_MB}, not the pooled default"),
    ]


# ---- 8. cancel_latency ---------------------------------------------------------------------------------


async def closed_at(env: Env, k: str) -> float:
    """When (time.time()) the upstream saw the connection of response ``k`` closed."""

    async def check() -> float | None:
        stats = await upstream_stats(env.session, env.upstream, k)
        return stats["closed_at"] if stats else None

    return float(await poll(check, 5, 0.002, f"the upstream did not see {k} closed"))


async def proxy_cancel(env: Env, proxy_url: str) -> float:
    """The end client hangs up mid-body on the plain proxy; ms until the upstream sees it."""
    k = key("cancelproxy")
    resp = await env.session.get(f"{proxy_url}/bytes?size={CANCEL_BODY}&key={k}")
    try:
        await resp.content.readany()
        await asyncio.sleep(0.05)
        t = time.time()
    finally:
        resp.close()
    return (await closed_at(env, k) - t) * 1000


async def cancel_latency(env: Env) -> list[Row]:
    p = env.plan
    product_p50: list[float] = []
    proxy_p50: list[float] = []
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        for _ in range(p.rounds):
            lat, lat_proxy = [], []
            for _ in range(p.cancels):
                k = key("cancel")
                t_cancel = await guest_eval(rt, f"export default await bench.cancelOne({CANCEL_BODY}, {json.dumps(k)})")
                lat.append(await closed_at(env, k) * 1000 - float(t_cancel))
                lat_proxy.append(await proxy_cancel(env, proxy_url))
            product_p50.append(percentile(lat, 50))
            proxy_p50.append(percentile(lat_proxy, 50))
    return [
        figure(
            "cancel_latency",
            "p50",
            "ms",
            product_p50,
            baseline=("proxy", proxy_p50),
            target=Target("<=", 5, unit="ms"),
            note="guest reader.cancel() -> upstream connection closed; baseline: end client hangs up on the proxy",
        ),
    ]


# ---- 9. idle_runtimes ----------------------------------------------------------------------------------


def deno_pss(broker_pid: int) -> tuple[int, float]:
    """(number of Deno processes, their total PSS in MiB)."""
    total, count = 0.0, 0
    for pid in deno_children(broker_pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += pss_mib(pid)
            count += 1
    return count, total


async def settle_children(env: Env, want: int, timeout: float = 20) -> int:
    """Wait until the broker has ``want`` Deno children (runtimes disposed, pool refilled)."""
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


async def idle_runtimes(env: Env) -> list[Row]:
    p = env.plan
    n = p.idle_runtimes
    pool = await settle_children(env, POOL_SIZE)
    samples = max(p.rounds, 3)
    before = [deno_pss(env.broker_pid)[1] for _ in range(samples)]
    broker_before = rss_mib(env.broker_pid)
    async with connection(env) as conn:
        rts = [await conn.create_runtime() for _ in range(n)]
        for rt in rts:
            await guest_eval(rt, "globalThis.idle = true; export default 1")
        count = await settle_children(env, n + pool)
        await asyncio.sleep(1.0)
        after: list[float] = []
        for _ in range(samples):
            count, total = deno_pss(env.broker_pid)
            after.append(total)
            await asyncio.sleep(0.3)
        broker_after = rss_mib(env.broker_pid)
    per_rt = [(a - median(before)) / n for a in after]
    per_gib = [1024 / x for x in per_rt if x > 0]
    s = "idle_runtimes"
    note = f"{n} idle runtimes; marginal PSS: (total PSS of the Deno children - before) / {n}; {count} Deno processes"
    return [
        figure(s, "PSS per idle runtime", "MiB", per_rt, note=note),
        figure(s, "runtimes per GiB", "", per_gib, target=Target(">=", 80)),
        figure(s, "PSS per Deno process (avg)", "MiB", [a / max(count, 1) for a in after]),
        figure(
            s,
            "broker+daemon RSS per runtime",
            "MiB",
            [(broker_after - broker_before) / n],
            note="VmRSS growth of the broker process, one sample",
        ),
    ]


# ---- running ---------------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Env], Awaitable[list[Row]]]] = {
    "llm_stream": llm_stream,
    "bulk_passthrough": bulk_passthrough,
    "bulk_upload": bulk_upload,
    "bulk_dispatch_body": bulk_dispatch_body,
    "slow_consumer": slow_consumer,
    "concurrent_streams": concurrent_streams,
    "dispatch_rtt": dispatch_rtt,
    "create_runtime": create_runtime,
    "cancel_latency": cancel_latency,
    "idle_runtimes": idle_runtimes,
}


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


BROKER_ARGS = ("--max-runtimes", "200")


async def run_scenario(env: Env, name: str) -> list[Row]:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(env.plan.scenario_timeout):
            rows = await SCENARIOS[name](env)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        rows = [Row(name, "error", error=message)]
    say(f"{name}: {'FAILED ' + rows[0].error if rows[0].error else 'done'} in {time.monotonic() - t0:.1f} s")
    return rows


async def ensure_broker(env: Env, procs: Processes, broker: Proc, rows: list[Row]) -> Proc:
    """If the broker died during the last scenario, say so in its rows and start a new one."""
    code = broker.p.poll()
    if code is None:
        # the next scenario starts from a quiet broker: this one's runtimes gone, the pool refilled
        await settle_children(env, POOL_SIZE, timeout=15)
        return broker
    last = " | ".join(broker.tail(4000).strip().splitlines()[-2:])
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
    message = f"the broker process died ({how}) during this scenario; its log ends: {last}"
    say(message)
    for row in rows:
        row.error = f"{row.error}; {message}" if row.error else message
    broker = await asyncio.to_thread(procs.broker, *BROKER_ARGS)
    env.frontend, env.broker_pid = broker.field("frontend"), broker.pid
    say(f"started a new broker, pid {broker.pid}")
    return broker


async def run_all(
    plan: Plan, names: list[str], procs: Processes, upstream: Proc, broker: Proc, rows: list[Row], extras: dict
) -> None:
    """Run the scenarios in order, appending to ``rows`` and ``extras`` (so an interrupt keeps them)."""
    async with end_client() as session:
        env = Env(plan, upstream.field("url"), upstream.pid, broker.field("frontend"), broker.pid, session, extras)
        for name in names:
            say(f"{name} ...")
            scenario_rows = await run_scenario(env, name)
            rows += scenario_rows
            broker = await ensure_broker(env, procs, broker, scenario_rows)


# ---- output ----------------------------------------------------------------------------------------------


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or math.isnan(x):
        return "-"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    """The rows as a text table; errors are listed under it (a row can have both values and an error)."""
    head = ("scenario", "figure", "value", "baseline", "ratio", "target", "met?")
    lines = []
    for r in rows:
        base = f"{r.baseline} {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
        met = "ERROR" if r.error else "" if r.met is None else "yes" if r.met else "NO"
        lines.append((r.scenario, r.figure, fmt(r.value, r.unit), base, fmt(r.ratio), r.target, met))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    errors = dict.fromkeys(f"{r.scenario}: {r.error}" for r in rows if r.error)
    if errors:
        out += ["", "errors (full text in the JSON):", *(f"  {e[:400]}" for e in errors)]
    return "\n".join(out)


def clean(x: Any) -> Any:
    """JSON has no NaN: make it null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def write_json(path: Path, rows: list[Row], extras: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "rows": [asdict(r) for r in rows], "extras": extras}
    path.write_text(json.dumps(clean(doc), indent=2) + "\n")


def write_png(path: Path, extras: dict) -> str:
    """Plot llm_stream's chunk-arrival timeline, direct vs through the product; returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--png: matplotlib is not installed (pip install matplotlib, or the 'bench' extra); no plot"
    timeline = extras.get("llm_stream_timeline_ms")
    if not timeline:
        return "--png: llm_stream did not run (or failed); no plot"
    gap = float(extras.get("llm_stream_gap_ms", 50))
    middle = timeline[len(timeline) // 2]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, style in (("direct", "o-"), ("product", "x--")):
        times = middle[name]
        events = range(len(times))
        ax1.plot(times, events, style, label=name, markersize=5)
        ax2.plot(events, [t - i * gap for i, t in enumerate(times)], style, label=name)
        ax3.plot(range(1, len(times)), [b - a for a, b in itertools.pairwise(times)], style, label=name)
    ax1.set(xlabel="arrival at the end client (ms since request)", ylabel="event #", title="llm_stream: arrivals")
    ax2.set(xlabel="event #", ylabel=f"arrival - event # x {gap:g} ms", title="lateness against the upstream's clock")
    ax3.axhline(gap, color="grey", linewidth=0.8)
    ax3.set(
        xlabel="event #", ylabel="gap to the previous event (ms)", title=f"gaps (the upstream sends every {gap:g} ms)"
    )
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"llm_stream, round {len(timeline) // 2 + 1} of {len(timeline)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# ---- main ------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python scripts/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (under a minute)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these scenarios (repeatable or comma-separated): " + ", ".join(SCENARIOS),
    )
    p.add_argument("--json", type=Path, default=Path("bench-results/bench.json"), help="results (%(default)s)")
    p.add_argument("--png", type=Path, default=None, help="plot llm_stream's timeline here (needs matplotlib)")
    args = p.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.names = [n for n in SCENARIOS if n in names] if names else list(SCENARIOS)
    return args


def git_state() -> str:
    """The commit measured, and whether the tree had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return f"{ROOT} (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: not an Exception, so no scenario's error handling swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _handle_signals(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def not_run(names: list[str], rows: list[Row], why: str) -> list[Row]:
    done = {r.scenario for r in rows}
    return [Row(name, "error", error=why) for name in names if name not in done]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = QUICK if args.quick else FULL
    # our own handlers (asyncio.run then installs none): the finally below always stops what we started
    _handle_signals(_interrupt)
    started = time.time()
    meta: dict[str, Any] = {
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "quick": args.quick,
        "plan": asdict(plan),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "loadavg_start": os.getloadavg(),
        "product": git_state(),
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    procs = Processes(logs)
    rows: list[Row] = []
    extras: dict[str, Any] = {}
    interrupted: Interrupted | None = None
    try:
        upstream = procs.upstream()
        broker = procs.broker(*BROKER_ARGS)
        say(f"upstream {upstream.field('url')}, broker pid {broker.pid} {broker.ready_line}; logs in {logs}")
        asyncio.run(run_all(plan, args.names, procs, upstream, broker, rows, extras))
    except Interrupted as exc:
        interrupted = exc
        say(f"interrupted by {exc}; stopping everything")
        rows += not_run(args.names, rows, f"not run or not finished: interrupted by {exc}")
    except Exception as exc:
        rows += not_run(args.names, rows, f"the run failed: {type(exc).__name__}: {exc}")
    finally:
        _handle_signals(signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        procs.stop_all()
        _handle_signals(signal.SIG_DFL)
    meta["seconds"] = round(time.time() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["interrupted"] = str(interrupted) if interrupted else None
    print(table(rows))
    write_json(args.json, rows, extras, meta)
    print(f"\nwrote {args.json} ({meta['seconds']} s; load average {meta['loadavg_end'][0]:.2f})")
    if args.png is not None:
        print(write_png(args.png, extras))
    if interrupted is not None:
        return 128 + interrupted.signum
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
