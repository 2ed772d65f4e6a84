"""Host tool scenarios: a tool call's round trip (tool_rtt) and a streamed tool's items (tool_stream).

Both are timed inside the guest (performance.now() around ``await tools.x(...)``), so they measure
what guest code sees: guest -> daemon -> broker -> client -> back. tool_rtt's baseline is the
same round trip as a guest fetch() answered by a fetch callback (the path tools share); an older
checkout without tools (``--product-root``) reports an error row here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import client
from scripts.bench.env import Env
from scripts.bench.model import RPS_IN_FLIGHT, Row, Target, figure, percentile
from scripts.bench.product import connection

GUEST = r"""
globalThis.bench = {
  async sequential(n, call) {
    const lat = [];
    for (let i = 0; i < n; i++) { const t0 = performance.now(); await call(i); lat.push(performance.now() - t0); }
    return lat;
  },
  async parallel(total, inFlight, call) {
    let left = total;
    const worker = async () => { while (left-- > 0) await call(left); };
    const t0 = performance.now();
    await Promise.all(Array.from({ length: inFlight }, worker));
    return total / ((performance.now() - t0) / 1000);
  },
  tool: (i) => tools.echo({ i }),
  fetch: async (i) => { await (await fetch("http://host/echo")).arrayBuffer(); },
  async drain(it) {
    let items = 0, bytes = 0;
    const t0 = performance.now();
    for await (const x of it) { items++; bytes += x instanceof Uint8Array ? x.byteLength : 0; }
    return { items, bytes, s: (performance.now() - t0) / 1000 };
  },
};
"""
ITEM_BYTES = 32 * 1024


async def echo(value: Any) -> Any:
    return value


async def rows(n: int) -> AsyncIterator[Any]:
    for i in range(n):
        yield {"i": i}


async def blocks(n: int) -> AsyncIterator[bytes]:
    block = bytes(ITEM_BYTES)
    for _ in range(n):
        yield block


async def answer(request: client.Request) -> client.Response:
    return client.Response(200, body=b"ok")


async def tool_rtt(env: Env) -> list[Row]:
    """Sequential tool calls (p50, p99) and calls/s at RPS_IN_FLIGHT, against the same through fetch()."""
    p = env.plan
    stats: dict[str, list[float]] = {k: [] for k in ("p50", "p99", "rps", "f_p50", "f_p99", "f_rps")}
    async with connection(env) as conn:
        rt = await conn.create_runtime(tools={"echo": echo}, fetch=answer)
        await rt.eval(GUEST)
        await rt.eval("await bench.sequential(50, bench.tool); await bench.sequential(50, bench.fetch);")
        for _ in range(p.rounds):
            for prefix, call in (("", "bench.tool"), ("f_", "bench.fetch")):
                lat = await rt.eval(f"export default await bench.sequential({p.rtt_requests}, {call})", timeout=120)
                stats[prefix + "p50"].append(percentile(lat, 50))
                stats[prefix + "p99"].append(percentile(lat, 99))
                rps = await rt.eval(
                    f"export default await bench.parallel({p.rps_requests}, {RPS_IN_FLIGHT}, {call})", timeout=120
                )
                stats[prefix + "rps"].append(rps)
    s = "tool_rtt"
    base = "fetch() via callback"
    return [
        figure(
            s,
            "p50",
            "ms",
            stats["p50"],
            baseline=(base, stats["f_p50"]),
            target=Target("<=", 1, unit="ms"),
            note="await tools.echo({i}) in the guest: guest -> daemon -> broker -> client -> back",
        ),
        figure(s, "p99", "ms", stats["p99"], baseline=(base, stats["f_p99"])),
        figure(s, f"calls/s at {RPS_IN_FLIGHT} in flight", "calls/s", stats["rps"], baseline=(base, stats["f_rps"])),
    ]


async def tool_stream(env: Env) -> list[Row]:
    """An async generator tool read by the guest: small items (items/s) and 32 KiB bytes items (MB/s)."""
    p = env.plan
    n_small, n_blocks = p.rps_requests * 10, max(64, p.bulk // ITEM_BYTES // 8)
    small: list[float] = []
    mbps: list[float] = []
    async with connection(env) as conn:
        rt = await conn.create_runtime(tools={"rows": rows, "blocks": blocks})
        await rt.eval(GUEST)
        await rt.eval("await bench.drain(tools.rows(100)); await bench.drain(tools.blocks(100));")
        for _ in range(p.rounds):
            got = await asyncio.wait_for(rt.eval(f"export default await bench.drain(tools.rows({n_small}))"), 120)
            small.append(got["items"] / got["s"])
            got = await asyncio.wait_for(rt.eval(f"export default await bench.drain(tools.blocks({n_blocks}))"), 120)
            if got["bytes"] != n_blocks * ITEM_BYTES:
                raise RuntimeError(f"the guest read {got['bytes']} bytes of {n_blocks * ITEM_BYTES}")
            mbps.append(got["bytes"] / got["s"] / 1e6)
    s = "tool_stream"
    return [
        figure(s, "items/s", "items/s", small, note=f"{n_small} items {{i}} per round, for await in the guest"),
        figure(s, "MB/s", "MB/s", mbps, note=f"{n_blocks} bytes items of {ITEM_BYTES // 1024} KiB per round"),
    ]
