"""The upstream HTTP server for scripts/bench.py, run as its own process.

``python scripts/bench_upstream.py`` binds 127.0.0.1 on a free port and prints ``ready url=...``.
Endpoints:

- ``GET /sse?n=20&gap=0.05&key=K``: n server-sent events, ``gap`` seconds apart;
- ``GET /bytes?size=N&key=K``: N bytes of ``BLOCK`` repeated, written as fast as the reader takes them;
- ``POST /upload?key=K``: counts the request body, answers ``{"size": N}``;
- ``GET /small``: two bytes;
- ``GET /stats?key=K``: what the response with that key saw (bytes written, when it was closed).

Times in records are ``time.time()``, so another process on the same machine can compare them
with its own clock (the guest's ``Date.now()``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field

from aiohttp import web

#: 64 KiB of deterministic bytes; every /bytes body is this block repeated (and truncated).
BLOCK = random.Random(7).randbytes(1 << 16)
#: Records kept for /stats (oldest dropped first).
MAX_RECORDS = 20_000


@dataclass
class Record:
    written: int = 0
    started: float = field(default_factory=time.time)
    closed_at: float | None = None
    finished: bool = False
    events: list[float] = field(default_factory=list)


def block_chunks(size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        piece = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        left -= len(piece)
        yield piece


class Upstream:
    def __init__(self) -> None:
        self.records: OrderedDict[str, Record] = OrderedDict()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/bytes", self.bytes)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/small", self.small)
        app.router.add_get("/stats", self.stats)
        return app

    def record(self, request: web.Request) -> Record:
        rec = Record()
        key = request.query.get("key")
        if key:
            self.records[key] = rec
            while len(self.records) > MAX_RECORDS:
                self.records.popitem(last=False)
        return rec

    async def sse(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "20"))
        gap = float(request.query.get("gap", "0.05"))
        rec = self.record(request)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})

        async def events() -> AsyncIterator[bytes]:
            start = time.monotonic()
            for i in range(n):
                # on a fixed schedule, so the upstream's own jitter does not accumulate
                await asyncio.sleep(max(0.0, start + i * gap - time.monotonic()))
                rec.events.append(time.time())
                yield f'data: {{"i": {i}, "text": "token {i}"}}\n\n'.encode()

        return await self._send(request, resp, rec, events())

    async def bytes(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        resp.content_length = size

        async def blocks() -> AsyncIterator[bytes]:
            for chunk in block_chunks(size):
                yield chunk

        return await self._send(request, resp, self.record(request), blocks())

    async def _send(
        self, request: web.Request, resp: web.StreamResponse, rec: Record, chunks: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        """Stream ``chunks``, recording bytes written, a clean finish, or when the connection closed."""
        await resp.prepare(request)
        try:
            async for chunk in chunks:
                await resp.write(chunk)
                rec.written += len(chunk)
            await resp.write_eof()
            rec.finished = True
        except (ConnectionError, asyncio.CancelledError):
            rec.closed_at = time.time()
            raise
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.json_response({"size": n})

    async def small(self, request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    async def stats(self, request: web.Request) -> web.Response:
        rec = self.records.get(request.query.get("key", ""))
        return web.json_response(asdict(rec) if rec is not None else None)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(Upstream().app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    print(f"ready url=http://{host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    raise_fd_limit()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
