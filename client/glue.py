"""aiohttp on both sides of a runtime: perform guest fetches for real, and serve a runtime over HTTP.

Both stream: bodies move chunk by chunk (``iter_any``) and only as fast as the other side takes
them, and closing one side closes the other (an end client hanging up cancels the guest's body;
the guest cancelling its fetch body closes the upstream connection).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from client.errors import Error
from client.http import Request, Response, close_body
from client.runtime import Runtime
from wire.protocol import MAX_CHUNK

log = logging.getLogger("client.glue")

#: Kernel receive buffer for upstream connections (bytes): part of the per-stream memory bound.
UPSTREAM_RCVBUF = 256 * 1024

#: Headers that describe one hop's framing, not the message: never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authenticate", "proxy-authorization"}
)  # fmt: skip


class ForwardFetch:
    """A fetch callback that performs the guest's request with aiohttp, streaming both bodies.

    Responses are decoded like a browser's fetch (gzip etc. removed), so content-encoding and
    content-length are dropped from the headers the guest sees. A session it creates itself is
    closed by ``aclose()``, which the runtime calls when it is disposed.
    """

    def __init__(self, session: aiohttp.ClientSession | None = None, rcvbuf: int = UPSTREAM_RCVBUF) -> None:
        self._session = session
        self._own: aiohttp.ClientSession | None = None
        self._rcvbuf = rcvbuf

    def _client(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own is None or self._own.closed:
            connector = aiohttp.TCPConnector(socket_factory=self._socket)
            # a read buffer of one pipe chunk: iter_any() then yields ~MAX_CHUNK pieces, half the
            # per-chunk work of the default 64 KiB buffer on every hop after this one
            self._own = aiohttp.ClientSession(connector=connector, auto_decompress=True, read_bufsize=MAX_CHUNK)
        return self._own

    def _socket(self, addr_info: Any) -> socket.socket:
        """Upstream sockets with a bounded receive buffer: the kernel would otherwise auto-tune it
        to several MiB, and those bytes sit beyond the reach of the guest's backpressure."""
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        if self._rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        return sock

    async def __call__(self, request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}]
        upstream = await self._client().request(
            request.method,
            request.url,
            headers=headers,
            data=request.body,
            allow_redirects=request.redirect == "follow",
        )
        if request.redirect == "error" and 300 <= upstream.status < 400 and "location" in upstream.headers:
            upstream.close()
            raise ValueError(f"{request.url} redirected, and the request's redirect mode is 'error'")
        return Response(
            status=upstream.status,
            headers=[
                (k, v)
                for k, v in upstream.headers.items()
                if k.lower() not in HOP_BY_HOP | {"content-encoding", "content-length"}
            ],
            body=_UpstreamBody(upstream),
            status_text=upstream.reason or "",
            url=str(upstream.url),
            redirected=bool(upstream.history),
        )

    async def aclose(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None


def forward_fetch(session: aiohttp.ClientSession | None = None, *, rcvbuf: int = UPSTREAM_RCVBUF) -> ForwardFetch:
    """A fetch callback that performs guest fetches for real with aiohttp (see ForwardFetch).

    ``rcvbuf`` bounds the kernel receive buffer of upstream connections (0: the kernel's default);
    it does not apply to a ``session`` you pass in.
    """
    return ForwardFetch(session, rcvbuf)


class _UpstreamBody:
    """The upstream body as an async iterator whose ``aclose`` closes the upstream connection."""

    def __init__(self, upstream: aiohttp.ClientResponse) -> None:
        self.upstream = upstream
        self._it: AsyncIterator[bytes] = upstream.content.iter_any().__aiter__()

    def __aiter__(self) -> _UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self.upstream.release()
            raise

    async def aclose(self) -> None:
        if not self.upstream.content.at_eof():
            self.upstream.close()  # not release: an unfinished body must not be reused
        else:
            self.upstream.release()


def aiohttp_handler(runtime: Runtime, *, poll: float = 0.1) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp.web handler that serves HTTP with the runtime's serve() handler.

    The request body streams to the guest; the guest's response streams back, each chunk
    flushed as it arrives. If the guest's body fails midway the connection is aborted (the end
    client sees a truncated response, not a false success); if the end client disconnects, the
    guest's body is cancelled.

    The application must let aiohttp cancel handlers whose peer disconnected (aiohttp >= 3.9;
    off by default): ``web.run_app(app, handler_cancellation=True)``,
    ``web.AppRunner(app, handler_cancellation=True)`` or
    ``web.Application(handler_args={"handler_cancellation": True})``. The cancellation reaches
    this handler wherever it waits (for the response head, for the guest's next chunk, on a
    write) and closing the body cancels the guest's stream. Without it, aiohttp tells a handler
    only when its next write fails, so a guest that stalls keeps its stream open until it sends
    again. (tests/test_streaming.py's ``serve_runtime`` uses the AppRunner form.) If the setting is
    off, the handler logs one warning and falls back to watching the connection itself every
    ``poll`` seconds, so a stalled guest body is still cancelled when the end client leaves.
    """
    warned = False

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal warned
        if not warned and not _cancels_handlers(request):
            warned = True
            log.warning(
                "aiohttp_handler: handler_cancellation is off in this aiohttp app, so a guest body is "
                "cancelled only at its next write after the end client left; enable it (see the docstring)"
            )
        body = request.content.iter_any() if request.can_read_body else None
        req = Request(request.method, str(request.url), list(request.headers.items()), body)
        try:
            resp = await runtime.dispatch_request(req)
        except Error as exc:
            return web.Response(status=502, text=f"{type(exc).__name__}: {exc}\n")
        out = web.StreamResponse(status=resp.status, reason=resp.status_text or None)
        for k, v in resp.headers.items():
            if k.lower() not in HOP_BY_HOP | {"content-length"}:
                out.headers.add(k, v)
        try:
            if _cancels_handlers(request):
                await _forward(request, out, resp)
            else:
                await _forward_watching(request, out, resp, poll)
        except Exception:
            if request.transport is not None:
                request.transport.abort()  # a truncated body must look truncated
        finally:
            await close_body(resp.body)
        return out

    return handler


def _cancels_handlers(request: web.Request) -> bool:
    """Whether aiohttp cancels this request's handler when the peer disconnects (the server's
    ``handler_cancellation`` setting; unknown counts as on, so a newer aiohttp never warns falsely)."""
    manager = getattr(request.protocol, "_manager", None)
    return bool(getattr(manager, "handler_cancellation", True))


async def _forward_watching(request: web.Request, out: web.StreamResponse, resp: Response, poll: float) -> None:
    """``_forward`` for an app that does not cancel handlers: stop it once the end client is gone.

    Both tasks live in this TaskGroup: the watcher's return cancels the forwarding (and so the
    guest's body, closed by the caller), the forwarding's end cancels the watcher."""

    async def watch() -> None:
        while (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110 (no event to wait on: the fallback when aiohttp does not cancel handlers)
            await asyncio.sleep(poll)
        raise _PeerGone

    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(watch())
            await _forward(request, out, resp)
            watcher.cancel()
    except* _PeerGone:
        pass


class _PeerGone(Exception):
    """The end client's connection closed while the guest's body was still being forwarded."""


async def _forward(request: web.Request, out: web.StreamResponse, resp: Response) -> None:
    await out.prepare(request)
    body = resp.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        await out.write(bytes(body))
    elif body is not None:
        async for chunk in body:
            await out.write(chunk)
    await out.write_eof()
