"""A real aiohttp upstream server on 127.0.0.1 that records what happened to each response."""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field

from aiohttp import web


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-enough bytes (same generator as the guest's PRNG in JS)."""
    out = bytearray(size)
    x = seed & 0xFFFFFFFF
    for i in range(size):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = x >> 16 & 0xFF
    return bytes(out)


BLOCK = pattern(1 << 16, 7)


@dataclass
class Record:
    """What one streamed response saw: bytes written, whether writes blocked, when it was closed."""

    written: int = 0
    started: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    finished: bool = False
    max_write_wait: float = 0.0


class Upstream:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.uploads: dict[str, tuple[int, int]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/bytes", self.bytes)
        app.router.add_get("/fail", self.fail)
        app.router.add_post("/upload", self.upload)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _stream(self, request: web.Request, key: str, chunks, gap: float = 0.0) -> web.StreamResponse:
        rec = self.records[key] = Record()
        resp = web.StreamResponse(headers={"content-type": request.query.get("type", "application/octet-stream")})
        await resp.prepare(request)
        try:
            for chunk in chunks:
                t = time.monotonic()
                await resp.write(chunk)
                rec.max_write_wait = max(rec.max_write_wait, time.monotonic() - t)
                rec.written += len(chunk)
                if gap:
                    await asyncio.sleep(gap)
            await resp.write_eof()
            rec.finished = True
        except (ConnectionError, asyncio.CancelledError):
            rec.closed_at = time.monotonic()
            raise
        return resp

    async def sse(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        gap = float(request.query.get("gap", "0.1"))
        key = request.query.get("key", "sse")
        chunks = (f'data: {{"i": {i}, "t": {time.time():.4f}}}\n\n'.encode() for i in range(n))
        return await self._stream(request, key, chunks, gap)

    async def bytes(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        key = request.query.get("key", "bytes")

        def chunks():
            left = size
            while left > 0:
                piece = BLOCK[: min(left, len(BLOCK))]
                left -= len(piece)
                yield piece

        return await self._stream(request, key, chunks())

    async def fail(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"partial body ")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # the upstream dies mid-body
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        crc, n = 0, 0
        async for chunk in request.content.iter_any():
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
        self.uploads[request.query.get("key", "upload")] = (n, crc)
        return web.json_response({"size": n, "crc": crc})


def stream_crc(size: int) -> int:
    """CRC32 of what /bytes?size=N sends."""
    crc, left = 0, size
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    return crc


#: JS helpers for the guest: crc32 over chunks and the same PRNG as pattern().
JS_HELPERS = r"""
const CRC_TABLE = new Int32Array(256);
for (let n = 0; n < 256; n++) { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1; CRC_TABLE[n] = c; }
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
