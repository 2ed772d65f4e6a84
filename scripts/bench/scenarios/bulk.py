"""Bulk transfers in the three directions a body can take through the product, each against direct,
the plain proxy and the raw zmq ceilings, with the CPU each process group spends per GB moved.

- bulk_passthrough: upstream -> guest fetch() -> guest serve() -> end client;
- bulk_upload: a guest ReadableStream -> fetch() POST -> upstream;
- bulk_dispatch_body: an async iterable in the client -> dispatch_request -> the guest counts req.body.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import client
from scripts.bench.baselines import proxy, raw_zmq_round
from scripts.bench.env import CPU_GROUPS, CpuTally, Env, key, tallied, transfer_timeout
from scripts.bench.model import MiB, Row, figure, throughput_rows, to_mbps
from scripts.bench.net import body_source, post_body, read_all
from scripts.bench.product import guest_eval, product


def cpu_rows(scenario: str, tallies: dict[str, CpuTally]) -> list[Row]:
    """CPU seconds per GB moved, per process group, for the product and the proxy in the same run."""
    prod, prox = tallies["product"], tallies["proxy"]
    unit = "s/GB"
    return [
        figure(
            scenario,
            "CPU s/GB: bench process",
            unit,
            prod.group("bench"),
            baseline=("proxy", prox.group("bench")),
            note="product: client library, HTTP front, end client; proxy: the proxy and the end client",
        ),
        figure(scenario, "CPU s/GB: broker+daemon", unit, prod.group("broker+daemon")),
        figure(scenario, "CPU s/GB: Deno", unit, prod.group("deno")),
        figure(
            scenario, "CPU s/GB: upstream", unit, prod.group("upstream"), baseline=("proxy", prox.group("upstream"))
        ),
        figure(
            scenario,
            "CPU s/GB: all processes",
            unit,
            prod.group(*CPU_GROUPS),
            baseline=("proxy", prox.group(*CPU_GROUPS)),
            note="bench + broker+daemon + Deno + upstream; the proxy path has no broker, daemon or Deno; "
            f"resolution: one clock tick ({1000 / os.sysconf('SC_CLK_TCK'):g} ms) per process over a round's bytes",
        ),
    ]


def new_tallies() -> dict[str, CpuTally]:
    return {"product": CpuTally(), "proxy": CpuTally()}


async def bulk_passthrough(env: Env) -> list[Row]:
    size = env.plan.bulk
    limit = transfer_timeout(size)
    path = f"/bytes?size={size}"
    seconds: dict[str, list[float]] = {"direct": [], "proxy": [], "product": []}
    tallies = new_tallies()
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        urls = {"direct": env.upstream + path, "proxy": proxy_url + path, "product": prod.rt_url() + path}
        for url in urls.values():
            await read_all(env.session, url.replace(path, f"/bytes?size={MiB}"), MiB)
        for _ in range(env.plan.rounds):
            for name, url in urls.items():
                with tallied(tallies, name, env, size):
                    seconds[name].append(await asyncio.wait_for(read_all(env.session, url, size), limit))
            await raw_zmq_round(size, seconds, limit)
    rows = throughput_rows("bulk_passthrough", to_mbps(size, seconds), floor=300)
    rows[0].note = f"{size // MiB} MiB upstream -> guest fetch -> guest serve -> end client"
    return rows + cpu_rows("bulk_passthrough", tallies)


async def body_baselines(
    env: Env, proxy_url: str, path: str, answer: str, seconds: dict[str, list[float]], tallies: dict[str, CpuTally]
) -> None:
    """One round of a request-body baseline: POST to the upstream's ``path`` directly, through the
    proxy, and the raw zmq ceilings."""
    size = env.plan.bulk
    limit = transfer_timeout(size)
    seconds["direct"].append(await asyncio.wait_for(post_body(env.session, env.upstream + path, size, answer), limit))
    with tallied(tallies, "proxy", env, size):
        seconds["proxy"].append(await asyncio.wait_for(post_body(env.session, proxy_url + path, size, answer), limit))
    await raw_zmq_round(size, seconds, limit)


async def bulk_upload(env: Env) -> list[Row]:
    size = env.plan.bulk
    seconds: dict[str, list[float]] = {"direct": [], "proxy": [], "product": []}
    tallies = new_tallies()
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        await guest_eval(rt, f"export default await bench.upload({MiB}, 'warm')")
        for _ in range(env.plan.rounds):
            await body_baselines(env, proxy_url, "/upload", "size", seconds, tallies)
            code = f"export default await bench.upload({size}, {json.dumps(key('up'))})"
            with tallied(tallies, "product", env, size):
                t0 = time.perf_counter()
                got = await guest_eval(rt, code, timeout=transfer_timeout(size))
                seconds["product"].append(time.perf_counter() - t0)
            if got != size:
                raise RuntimeError(f"the upstream counted {got} bytes of the guest's upload, expected {size}")
    rows = throughput_rows("bulk_upload", to_mbps(size, seconds))
    rows[0].note = f"{size // MiB} MiB guest ReadableStream (64 KiB chunks) -> fetch() POST -> upstream"
    return rows + cpu_rows("bulk_upload", tallies)


async def bulk_dispatch_body(env: Env) -> list[Row]:
    """The baselines do what the guest does: a handler reads the request body and answers {"n": N}
    (the upstream's POST /count), reached directly or through the proxy, fed by the same async
    iterable the product's dispatch_request sends."""
    size = env.plan.bulk
    seconds: dict[str, list[float]] = {"direct": [], "proxy": [], "product": []}

    async def dispatch(rt: client.Runtime, n: int) -> float:
        t0 = time.perf_counter()
        req = client.Request("POST", "http://bench/count", body=body_source(n))
        resp = await rt.dispatch_request(req, timeout=transfer_timeout(n))
        got = (await resp.json())["n"]
        if got != n:
            raise RuntimeError(f"the guest counted {got} bytes, expected {n}")
        return time.perf_counter() - t0

    tallies = new_tallies()
    async with product(env) as prod, proxy(env.upstream) as proxy_url:
        rt = prod.runtimes[0]
        await dispatch(rt, MiB)
        for _ in range(env.plan.rounds):
            await body_baselines(env, proxy_url, "/count", "n", seconds, tallies)
            with tallied(tallies, "product", env, size):
                seconds["product"].append(await dispatch(rt, size))
    rows = throughput_rows("bulk_dispatch_body", to_mbps(size, seconds))
    rows[0].note = (
        f"{size // MiB} MiB async iterable (64 KiB chunks) -> dispatch_request -> guest counts req.body; "
        "direct/proxy: the same body POSTed to a handler that counts it"
    )
    return rows + cpu_rows("bulk_dispatch_body", tallies)
