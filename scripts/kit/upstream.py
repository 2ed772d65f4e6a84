"""A real aiohttp upstream server on 127.0.0.1 that records what happened to each response.

The tests run it inside their own process (``u = await Upstream().start()``, then ``u.records[key]``)
so they can look at a record directly; the benchmark runs it as a process of its own
(``python -m scripts.kit.upstream --no-checksum`` prints ``ready url=...``), so that the CPU it spends
is not charged to the benchmark process, and reads records through ``GET /stats``.

Endpoints (``key=K`` names the record of that response; without it nothing is recorded):

- ``GET /sse?n=5&gap=0.1&key=K``: n server-sent events on a fixed schedule ``gap`` seconds apart;
- ``GET /bytes?size=N&key=K``: N bytes of ``BLOCK`` repeated, written as fast as the reader takes them;
- ``GET /fail``: a few bytes, then the connection is aborted (an upstream dying mid-body);
- ``POST /upload?key=K``: reads the body, answers ``{"size": N, "crc": CRC32}`` (no crc with --no-checksum);
- ``POST /count``: reads the body, answers ``{"n": N}``, the same work and answer as the benchmark guest's
  ``/count`` (the baseline of bulk_dispatch_body);
- ``GET /small``: two bytes;
- ``GET /stats?key=K``: the record of that response as JSON (null if none).

Every time in a record is ``time.monotonic()``: on Linux that is CLOCK_MONOTONIC, one clock shared by all
processes of the host and never stepped by NTP, so another process on the same machine compares it with
its own ``time.monotonic()`` with no conversion.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import signal
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field

from aiohttp import web

#: 64 KiB of deterministic bytes; every /bytes body is this block repeated (and truncated).
BLOCK = random.Random(7).randbytes(1 << 16)
#: Records kept (oldest dropped first): a benchmark run makes tens of thousands of requests.
MAX_RECORDS = 20_000


@dataclass
class Record:
    """What one streamed response saw: bytes written, the longest write (backpressure), how it ended."""

    written: int = 0
    started: float = field(default_factory=time.monotonic)
    closed_at: float | None = None  # when the reader went away before the end
    finished: bool = False
    max_write_wait: float = 0.0


def block_chunks(size: int) -> Iterator[bytes]:
    """The chunks /bytes?size=N sends."""
    left = size
    while left > 0:
        piece = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        left -= len(piece)
        yield piece


def stream_crc(size: int) -> int:
    """CRC32 of what /bytes?size=N sends."""
    crc = 0
    for chunk in block_chunks(size):
        crc = zlib.crc32(chunk, crc)
    return crc


class Upstream:
    """The server; ``checksum`` makes /upload compute a CRC32 of the body (the tests check it, the
    benchmark measures throughput and leaves it off)."""

    def __init__(self, checksum: bool = True) -> None:
        self.checksum = checksum
        self.records: OrderedDict[str, Record] = OrderedDict()
        self.uploads: dict[str, tuple[int, int]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/bytes", self.bytes)
        app.router.add_get("/fail", self.fail)
        app.router.add_post("/upload", self.upload)
        app.router.add_post("/count", self.count)
        app.router.add_get("/small", self.small)
        app.router.add_get("/stats", self.stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Upstream:
        """Serve on ``host``:``port`` (0: a free one), no access log, a backlog for 1,000 connects."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=4096).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request) -> Record:
        rec = Record()
        key = request.query.get("key")
        if key:
            self.records[key] = rec
            while len(self.records) > MAX_RECORDS:
                self.records.popitem(last=False)
        return rec

    async def _send(self, request: web.Request, resp: web.StreamResponse, chunks: AsyncIterator[bytes]) -> None:
        """Stream ``chunks``, recording bytes written, the longest write, a clean finish or the close."""
        rec = self._record(request)
        await resp.prepare(request)
        try:
            async for chunk in chunks:
                t = time.monotonic()
                await resp.write(chunk)
                rec.max_write_wait = max(rec.max_write_wait, time.monotonic() - t)
                rec.written += len(chunk)
            await resp.write_eof()
            rec.finished = True
        except (ConnectionError, asyncio.CancelledError):
            rec.closed_at = time.monotonic()
            raise

    async def sse(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        gap = float(request.query.get("gap", "0.1"))
        resp = web.StreamResponse(
            headers={"content-type": request.query.get("type", "text/event-stream"), "cache-control": "no-cache"}
        )

        async def events() -> AsyncIterator[bytes]:
            start = time.monotonic()
            for i in range(n):
                # on a fixed schedule, so the upstream's own jitter does not accumulate
                await asyncio.sleep(max(0.0, start + i * gap - time.monotonic()))
                yield f'data: {{"i": {i}, "text": "token {i}"}}\n\n'.encode()

        await self._send(request, resp, events())
        return resp

    async def bytes(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"content-type": request.query.get("type", "application/octet-stream")})
        resp.content_length = size

        async def blocks() -> AsyncIterator[bytes]:
            for chunk in block_chunks(size):
                yield chunk

        await self._send(request, resp, blocks())
        return resp

    async def fail(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"partial body ")
        await asyncio.sleep(0.05)  # let the partial body reach the reader before the connection dies
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def _read_body(self, request: web.Request) -> tuple[int, int]:
        crc, n = 0, 0
        async for chunk in request.content.iter_any():
            if self.checksum:
                crc = zlib.crc32(chunk, crc)
            n += len(chunk)
        return n, crc

    async def upload(self, request: web.Request) -> web.Response:
        n, crc = await self._read_body(request)
        self.uploads[request.query.get("key", "upload")] = (n, crc)
        return web.json_response({"size": n, "crc": crc} if self.checksum else {"size": n})

    async def count(self, request: web.Request) -> web.Response:
        n, _ = await self._read_body(request)
        return web.json_response({"n": n})

    async def small(self, request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    async def stats(self, request: web.Request) -> web.Response:
        rec = self.records.get(request.query.get("key", ""))
        return web.json_response(asdict(rec) if rec is not None else None)


#: JS helpers for a guest: crc32 over chunks, and a stream of ``size`` pseudo-random bytes.
JS_HELPERS = r"""
const CRC_TABLE = new Int32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1;
  CRC_TABLE[n] = c;
}
globalThis.crc32 = (chunk, crc = 0) => {
  let c = crc ^ -1;
  for (let i = 0; i < chunk.length; i++) c = CRC_TABLE[(c ^ chunk[i]) & 0xFF] ^ (c >>> 8);
  return (c ^ -1) >>> 0;
};
globalThis.patternStream = (size, seed = 1, chunk = 65536) => {
  let x = seed >>> 0, left = size;
  return new ReadableStream({
    pull(controller) {
      if (left <= 0) { controller.close(); return; }
      const n = Math.min(chunk, left); left -= n;
      const out = new Uint8Array(n);
      for (let i = 0; i < n; i++) { x = (Math.imul(x, 1103515245) + 12345) & 0x7FFFFFFF; out[i] = (x >>> 16) & 0xFF; }
      controller.enqueue(out);
    },
  });
};
"""


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, checksum: bool) -> None:
    """Serve until SIGINT or SIGTERM; print the ready line the starting process waits for."""
    upstream = await Upstream(checksum).start(host, port)
    print(f"ready url={upstream.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await upstream.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.kit.upstream", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--no-checksum", action="store_true", help="/upload only counts (no CRC32 work)")
    args = p.parse_args()
    raise_fd_limit()
    asyncio.run(serve(args.host, args.port, not args.no_checksum))


if __name__ == "__main__":
    main()
