"""HTTP on 127.0.0.1 for the scenarios: serving an app, the end client and what it does (read a body,
time events, post a body), and reading the upstream's records."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from scripts.kit.upstream import block_chunks


async def start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free 127.0.0.1 port (no access log, a backlog for 1,000 connects).

    Handlers are cancelled when their client disconnects (what client.aiohttp_handler relies on to
    cancel the guest's body; the proxy baseline gets the same setting)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def end_client(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60),
    )


async def read_all(session: aiohttp.ClientSession, url: str, expect: int) -> float:
    """GET ``url`` and read the body to the end; returns seconds from request to last byte."""
    t0 = time.perf_counter()
    n = 0
    async with session.get(url) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            n += len(chunk)
    dt = time.perf_counter() - t0
    if n != expect:
        raise RuntimeError(f"read {n} bytes from {url}, expected {expect}")
    return dt


async def read_crc(session: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """GET ``url``; returns (bytes, crc32) of the body."""
    crc, n = 0, 0
    async with session.get(url) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
    return n, crc


async def sse_arrivals(session: aiohttp.ClientSession, url: str, expect: int) -> list[float]:
    """GET an event stream; returns when each event arrived, in seconds since the request was sent."""
    arrivals: list[float] = []
    buf = b""
    t0 = time.perf_counter()
    async with session.get(url) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            now = time.perf_counter() - t0
            buf += chunk
            while b"\n\n" in buf:
                _, buf = buf.split(b"\n\n", 1)
                arrivals.append(now)
    if len(arrivals) != expect:
        raise RuntimeError(f"got {len(arrivals)} events from {url}, expected {expect}")
    return arrivals


async def body_source(size: int) -> AsyncIterator[bytes]:
    """A request body: ``size`` bytes in 64 KiB chunks (what the upstream's /bytes sends)."""
    for chunk in block_chunks(size):
        yield chunk


async def post_body(session: aiohttp.ClientSession, url: str, size: int, answer: str) -> float:
    """POST ``size`` bytes (streamed) to a handler that counts them and answers ``{answer: N}``
    (the upstream's /upload or /count); returns seconds until the answer."""
    t0 = time.perf_counter()
    async with session.post(url, data=body_source(size)) as r:
        r.raise_for_status()
        got = (await r.json())[answer]
    dt = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{url} counted {got} bytes, expected {size}")
    return dt


async def upstream_stats(session: aiohttp.ClientSession, upstream: str, key: str) -> dict[str, Any] | None:
    """The upstream's record of the response with ``key`` (scripts.kit.upstream.Record), or None."""
    async with session.get(f"{upstream}/stats", params={"key": key}) as r:
        return await r.json()


async def settled_written(session: aiohttp.ClientSession, upstream: str, key: str, settle: float) -> int:
    """Bytes the upstream has written for ``key`` once that number has stopped moving (it is blocked on
    a full connection), after at least ``settle`` s; gives up after 40 reads and returns the last."""
    await asyncio.sleep(settle)
    last = -1
    for _ in range(40):
        stats = await upstream_stats(session, upstream, key)
        written = int(stats["written"]) if stats else 0
        if written == last:
            return written
        last = written
        await asyncio.sleep(0.05)
    return last
