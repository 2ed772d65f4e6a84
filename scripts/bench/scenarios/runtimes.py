"""The life of a runtime: how fast one is created (create_runtime), how fast a guest's cancel reaches
the upstream (cancel_latency), and what an idle one costs in memory (idle_runtimes)."""

from __future__ import annotations

import asyncio
import json
import time

import client
from scripts.bench.baselines import proxy
from scripts.bench.env import Env, key, poll, settle_children
from scripts.bench.model import (
    CANCEL_BODY,
    COLD_MEMORY_MB,
    POOL_SIZE,
    SUSTAINED_RATE,
    Row,
    Target,
    figure,
    median,
    percentile,
)
from scripts.bench.net import settled_written, upstream_stats
from scripts.bench.product import connection, guest_eval, product
from scripts.kit.procs import deno_children, pss_mib, rss_mib

# ---- create_runtime ---------------------------------------------------------------------------------


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


async def sustained_creates(conn: client.Connection, n: int, rate: float) -> tuple[list[float], int]:
    """``n`` creates started at a fixed ``rate`` per second (open loop: a slow create does not delay
    the next one), each runtime disposed as soon as it is created; returns the create times in ms
    and how many creates the broker refused with ``quota`` (when creates fall so far behind that
    the client holds its maximum of runtimes at once; a broker without quotas never refuses).

    Unlike create_times, the pool gets no time to refill, so this shows what a busy application sees."""
    out: list[float] = []
    refused = 0
    start = time.monotonic()

    async def one(i: int) -> None:
        nonlocal refused
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))  # the arrival schedule
        t0 = time.perf_counter()
        try:
            rt = await conn.create_runtime(timeout=30)
        except client.RequestRejected as exc:
            if exc.code != "quota":
                raise
            refused += 1
            return
        out.append((time.perf_counter() - t0) * 1000)
        await rt.dispose()

    async with asyncio.TaskGroup() as tg:
        for i in range(n):
            tg.create_task(one(i))
    return out, refused


async def create_runtime(env: Env) -> list[Row]:
    p = env.plan
    warm: list[float] = []
    cold: list[float] = []
    busy: dict[str, list[float]] = {"p50": [], "p99": [], "refused": []}
    async with connection(env) as conn:
        for _ in range(p.rounds):
            warm.append(percentile(await create_times(conn, p.creates_warm, p.create_pause, None), 50))
            cold.append(percentile(await create_times(conn, p.creates_cold, p.create_pause, COLD_MEMORY_MB), 50))
            await settle_children(env, POOL_SIZE)  # each sustained round starts from a full pool
            times, refused = await sustained_creates(conn, p.creates_sustained, SUSTAINED_RATE)
            busy["p50"].append(percentile(times, 50))
            busy["p99"].append(percentile(times, 99))
            busy["refused"].append(refused)
    s = "create_runtime"
    rate = f"{SUSTAINED_RATE:g}/s"
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
        figure(
            s,
            f"p50 at a sustained {rate}",
            "ms",
            busy["p50"],
            baseline=("cold", cold),
            note=f"{p.creates_sustained} creates per round started {1000 / SUSTAINED_RATE:g} ms apart, "
            f"each disposed once created; the pool (size {POOL_SIZE}) refills as it can",
        ),
        figure(s, f"p99 at a sustained {rate}", "ms", busy["p99"], baseline=("cold", cold)),
        figure(
            s,
            f"creates refused (quota) at a sustained {rate}",
            "",
            busy["refused"],
            note="per round; the broker refuses a create while the client holds its quota of runtimes",
        ),
    ]


# ---- cancel_latency ---------------------------------------------------------------------------------


async def closed_at(env: Env, k: str) -> float:
    """When (the upstream's time.monotonic()) the upstream saw the connection of response ``k`` close."""

    async def check() -> float | None:
        stats = await upstream_stats(env.session, env.upstream, k)
        return stats["closed_at"] if stats else None

    return float(await poll(check, 5, 0.002, f"the upstream did not see {k} closed"))


async def blocked(env: Env, k: str) -> None:
    """Wait until the upstream has stopped writing response ``k``: every buffer on the way is full."""
    await settled_written(env.session, env.upstream, k, 0.05)


async def product_cancel(env: Env, rt: client.Runtime) -> tuple[float, float]:
    """The guest cancels a body it has started reading; returns (ms from the cancel command to the
    upstream seeing its connection closed, ms of an eval round trip measured right after)."""
    k = key("cancel")
    await guest_eval(rt, f"await bench.openForCancel({CANCEL_BODY}, {json.dumps(k)})")
    await blocked(env, k)
    t0 = time.monotonic()
    await guest_eval(rt, "await bench.cancelOpen()")
    latency = (await closed_at(env, k) - t0) * 1000
    t1 = time.monotonic()
    await guest_eval(rt, "export default 1")
    return latency, (time.monotonic() - t1) * 1000


async def proxy_cancel(env: Env, proxy_url: str) -> float:
    """The end client hangs up mid-body on the plain proxy; ms until the upstream sees it."""
    k = key("cancelproxy")
    resp = await env.session.get(f"{proxy_url}/bytes?size={CANCEL_BODY}&key={k}")
    try:
        await resp.content.readany()
        await blocked(env, k)
        t0 = time.monotonic()
    finally:
        resp.close()
    return (await closed_at(env, k) - t0) * 1000


async def cancel_latency(env: Env) -> list[Row]:
    """How long a cancel takes to reach the upstream, on one clock.

    Both ends are stamped with time.monotonic(): the start by this process when it sends the cancel
    (an eval calling ``reader.cancel()`` in the guest; for the proxy, closing the end client's
    response), the end by the upstream when its write fails. On Linux that is CLOCK_MONOTONIC, one
    clock for every process of the host, so the two stamps compare directly and no reporting channel
    delays the second one. The guest's clock (performance.timeOrigin + performance.now(), wall time at
    its start plus a coarsened monotonic offset) is not used: it is another clock. The price is that
    the product's figure includes delivering the command to the guest (client -> broker -> daemon ->
    guest, one way); the second row, an eval round trip, bounds that share (about half of it).
    """
    p = env.plan
    product_p50: list[float] = []
    eval_p50: list[float] = []
    proxy_p50: list[float] = []
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        for _ in range(p.rounds):
            lat, evals, lat_proxy = [], [], []
            for _ in range(p.cancels):
                latency, rtt = await product_cancel(env, rt)
                lat.append(latency)
                evals.append(rtt)
                lat_proxy.append(await proxy_cancel(env, proxy_url))
            product_p50.append(percentile(lat, 50))
            eval_p50.append(percentile(evals, 50))
            proxy_p50.append(percentile(lat_proxy, 50))
    return [
        figure(
            "cancel_latency",
            "p50",
            "ms",
            product_p50,
            baseline=("proxy", proxy_p50),
            target=Target("<=", 5, unit="ms"),
            note="cancel command sent to the guest (reader.cancel()) -> upstream connection closed; "
            "baseline: end client hangs up on the proxy; one clock (CLOCK_MONOTONIC)",
        ),
        figure(
            "cancel_latency",
            "eval round trip p50 (the command's delivery is about half)",
            "ms",
            eval_p50,
            note="a no-op eval right after each cancel",
        ),
    ]


# ---- idle_runtimes ----------------------------------------------------------------------------------


def deno_pss(broker_pid: int) -> tuple[int, float]:
    """(number of Deno processes, their total PSS in MiB)."""
    total, count = 0.0, 0
    for pid in deno_children(broker_pid):
        try:
            total += pss_mib(pid)
            count += 1
        except (OSError, RuntimeError):
            continue  # it exited between the listing and the read
    return count, total


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
        await asyncio.sleep(1.0)  # let the runtimes' start-up garbage be collected before sampling
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
