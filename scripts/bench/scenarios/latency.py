"""Latency scenarios: an LLM-style event stream through a guest (llm_stream) and small dispatched
requests (dispatch_rtt)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import client
from scripts.bench.env import Env
from scripts.bench.model import RPS_IN_FLIGHT, Row, Target, figure, percentile
from scripts.bench.net import sse_arrivals
from scripts.bench.product import product


async def llm_stream(env: Env) -> list[Row]:
    """Server-sent events on a fixed schedule, read by the end client directly and through a guest
    that passes the fetched body to serve(): how faithfully the gaps survive, and what the hops add
    to the first event."""
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
    """``n`` sequential calls; their durations in ms."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def dispatch_rtt(env: Env) -> list[Row]:
    """A dispatched request with a 2-byte answer, against an HTTP GET of 2 bytes from the upstream."""
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
