"""What the product is measured against in the same run: a plain streaming reverse proxy (what a user
would write instead) and bare pyzmq PUSH/PULL pairs (the transport's ceiling).

The product-settings ceiling takes its numbers from the product's wire package (``wire.sockets`` and
``wire.protocol``), imported from the checkout being measured, so it follows them when they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import zmq
import zmq.asyncio
from aiohttp import web

from scripts.bench.net import start_site
from scripts.kit.upstream import BLOCK
from wire.protocol import MAX_CHUNK
from wire.sockets import PIPE_HWM, PIPE_SNDBUF

#: HTTP headers a proxy never forwards (one hop's framing, not the message).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "content-length", "host"}
)  # fmt: skip


def proxy_app(upstream: str, session: aiohttp.ClientSession) -> web.Application:
    """The reverse proxy a user would write instead: stream both bodies with ``iter_any()``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content.iter_any() if request.can_read_body else None
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=data) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionError:
                pass  # the end client hung up; leaving the block closes the upstream connection
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.asynccontextmanager
async def proxy(upstream: str) -> AsyncIterator[str]:
    """A running reverse proxy in front of ``upstream``, in this process; yields its URL."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    runner, url = await start_site(proxy_app(upstream, session))
    try:
        yield url
    finally:
        await runner.cleanup()
        await session.close()


@dataclass(frozen=True)
class ZmqSettings:
    """How a bare PUSH/PULL pair is set up and what one message is."""

    hwm: int
    chunk: int  # payload bytes per message
    sndbuf: int | None = None  # the PUSH's SO_SNDBUF, None: autotuned (the PULL's always is)
    tag_frame: bool = False  # a 17-byte tag frame before each chunk, as the product's pipe messages


#: A pipe as the product sets it up (wire/sockets.py pipe()): small queues, the PUSH's SNDBUF (the
#: PULL's buffer autotuned), messages of a tag frame (kind + stream id) and a chunk of at most MAX_CHUNK.
PRODUCT_PIPE = ZmqSettings(hwm=PIPE_HWM, chunk=MAX_CHUNK, sndbuf=PIPE_SNDBUF, tag_frame=True)
#: The ceiling reported before (deeper queues, 64 KiB single frames): what the transport could do.
LOOSE_PIPE = ZmqSettings(hwm=16, chunk=64 * 1024)


def _payload(n: int) -> bytes:
    return (BLOCK * (n // len(BLOCK) + 1))[:n]


async def raw_zmq_seconds(size: int, settings: ZmqSettings) -> float:
    """Move ``size`` bytes over a bare asyncio PUSH/PULL pair on TCP loopback; returns seconds."""
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        for sock in (pull, push):
            sock.setsockopt(zmq.SNDHWM, settings.hwm)
            sock.setsockopt(zmq.RCVHWM, settings.hwm)
            sock.setsockopt(zmq.LINGER, 0)
        if settings.sndbuf is not None:
            push.setsockopt(zmq.SNDBUF, settings.sndbuf)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        block = _payload(settings.chunk)
        head = [b"d" + bytes(16)] if settings.tag_frame else []
        frames, rest = divmod(size, settings.chunk)

        async def send() -> None:
            for _ in range(frames):
                await push.send_multipart([*head, block], copy=False)
            if rest:
                await push.send_multipart([*head, block[:rest]])
            await push.send_multipart([*head, b""])

        async def receive() -> int:
            n = 0
            while True:
                msg = await pull.recv_multipart(copy=False)
                if len(msg[-1]) == 0:
                    return n
                n += len(msg[-1])

        t0 = time.perf_counter()
        _, got = await asyncio.gather(send(), receive())
        dt = time.perf_counter() - t0
        if got != size:
            raise RuntimeError(f"raw zmq moved {got} bytes, expected {size}")
        return dt
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


async def raw_zmq_round(size: int, seconds: dict[str, list[float]], limit: float) -> None:
    """One round of both ceilings, appended to ``seconds["raw_product"]`` and ``seconds["raw"]``."""
    for name, settings in (("raw_product", PRODUCT_PIPE), ("raw", LOOSE_PIPE)):
        seconds.setdefault(name, []).append(await asyncio.wait_for(raw_zmq_seconds(size, settings), limit))
