"""slow_consumer: what a reader that pauses costs in memory, and whether a long pause loses bytes.

The guest reads a large fetched body and stops every so often; while it is stopped the upstream
blocks, and "upstream written - guest consumed" is every byte in flight on the way (the upstream's
kernel queue, the client, the pipes, the daemon, the guest). The same reader at the end of the plain
proxy is the baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import client
from scripts.bench.baselines import proxy
from scripts.bench.env import Env, key, poll, transfer_timeout
from scripts.bench.model import LONG_PAUSE, LONG_PAUSE_BODY, MiB, Row, Target, figure
from scripts.bench.net import settled_written
from scripts.bench.product import guest_eval, product
from scripts.kit.procs import rss_mib, tcp_queued


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
    written = await settled_written(env.session, env.upstream, k, env.plan.slow_settle)
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
