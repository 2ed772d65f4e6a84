"""concurrent_streams: many 1 MiB bodies at once over several runtimes, every body crc-checked."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from scripts.bench.baselines import proxy
from scripts.bench.env import Env, tallied
from scripts.bench.model import MiB, Row, Target, figure
from scripts.bench.net import read_crc
from scripts.bench.product import product
from scripts.bench.scenarios.bulk import cpu_rows, new_tallies
from scripts.kit.upstream import stream_crc


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
    want = (size, stream_crc(size))
    path = f"/bytes?size={size}"
    mbps: dict[str, list[float]] = {"direct": [], "proxy": [], "product": []}
    errors: dict[str, list[str]] = {name: [] for name in mbps}
    tallies = new_tallies()
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
        ),
        figure(s, "aggregate MB/s vs direct", "MB/s", mbps["product"], baseline=("direct", mbps["direct"])),
        *cpu_rows(s, tallies),
    ]
