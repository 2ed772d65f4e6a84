"""aiohttp on both sides of a runtime: perform guest fetches for real, and serve a runtime over HTTP.

Both stream: bodies move chunk by chunk (``iter_any``) and only as fast as the other side takes
them, and closing one side closes the other (an end client hanging up cancels the guest's body;
the guest cancelling its fetch body closes the upstream connection).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

from client.errors import Error, GuestError
from client.http import Request, Response, close_body
from client.runtime import Runtime
from wire import http as H
from wire.protocol import MAX_CHUNK

log = logging.getLogger("sandbox_mesh.client.glue")

#: Kernel receive buffer for upstream connections (bytes): part of the per-stream memory bound.
UPSTREAM_RCVBUF = 256 * 1024

#: Headers that describe one hop's framing, not the message: never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authenticate", "proxy-authorization"}
)  # fmt: skip
#: Request headers never forwarded upstream: aiohttp frames the body and names the host itself.
REQUEST_DROPPED = HOP_BY_HOP | {"host", "content-length", "expect"}
#: Request headers dropped when a redirect turns the request into a GET (the fetch standard's).
BODY_HEADERS = frozenset({"content-encoding", "content-language", "content-location", "content-type"})
#: Request headers dropped when a redirect leaves the origin.
CREDENTIALS = frozenset({"authorization", "cookie", "proxy-authorization"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})

#: Seconds forward_fetch waits for a response head (connecting, redirects, the upload included).
FETCH_TIMEOUT = 30.0
#: Seconds one connection attempt may take.
CONNECT_TIMEOUT = 10.0
#: Redirects followed at most (the fetch standard's limit).
MAX_REDIRECTS = 20
#: Upstream connections one forward_fetch holds at most (aiohttp's default pool size). A connection
#: is held from the request until its body is read to the end or closed.
MAX_CONNECTIONS = 100
#: Seconds a fetch waits for one of those connections to come free before it fails.
POOL_TIMEOUT = 10.0


class ForwardFetch:
    """A fetch callback that performs the guest's request with aiohttp, streaming both bodies.

    Safe by default for untrusted code (``wire.http.FetchPolicy``): only public unicast
    addresses are reached, never loopback, private, link-local, multicast, unspecified or cloud
    metadata ones; the check is made on the address each connection actually goes to (a name is
    filtered as it resolves, and the socket refuses any other address, so DNS rebinding finds no
    gap), and again at every redirect hop (redirects are followed here, at most ``max_redirects``).
    A refused fetch rejects in the guest with ``TypeError("FetchDenied: fetch denied: ...")``
    naming the rule. ``timeout`` bounds the wait for the response head (connecting, redirects,
    the upload), ``connect_timeout`` each connection attempt.

    At most ``max_connections`` upstream connections are held at once, each from its request until
    its body was read to the end or closed. A fetch beyond that waits (logged) at most
    ``pool_timeout`` seconds for one to come free, then fails with a TimeoutError that says so (in the
    host's log; the guest, as for every failure but a refusal, sees ``TypeError: fetch failed``): a
    guest holding many unread bodies gets errors, never a silent wait on aiohttp's pool (which,
    with bodies nobody reads, deadlocked until a timeout far away).

    Responses are decoded like a browser's fetch (gzip etc. removed), so content-encoding and
    content-length are dropped from the headers the guest sees. A session it creates itself is
    closed by ``aclose()``, which the runtime calls when it is disposed.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        rcvbuf: int = UPSTREAM_RCVBUF,
        *,
        policy: H.FetchPolicy | None = None,
        timeout: float | None = FETCH_TIMEOUT,
        connect_timeout: float | None = CONNECT_TIMEOUT,
        max_redirects: int = MAX_REDIRECTS,
        max_connections: int = MAX_CONNECTIONS,
        pool_timeout: float = POOL_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self._policy = policy or H.FetchPolicy()
        if session is not None and not self._policy.allow_private:
            raise ValueError(
                "forward_fetch cannot check the addresses a session you pass in connects to; "
                "pass allow_private=True to accept that, or leave the session to forward_fetch"
            )
        self._session = session
        self._own: aiohttp.ClientSession | None = None
        self._rcvbuf = rcvbuf
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_redirects = max_redirects
        self._max_connections = max_connections
        self._pool_timeout = pool_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._queued = 0  # fetches waiting for a slot (for the log)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own is None or self._own.closed:
            # no pool limit of aiohttp's own: the slots (see __call__) are the one limit, and they fail
            # a fetch after pool_timeout where aiohttp's pool would just wait
            connector = aiohttp.TCPConnector(
                socket_factory=self._socket, resolver=_CheckedResolver(self._policy), limit=0, limit_per_host=0
            )
            # a read buffer of one pipe chunk: iter_any() then yields ~MAX_CHUNK pieces, half the
            # per-chunk work of the default 64 KiB buffer on every hop after this one
            self._own = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                read_bufsize=MAX_CHUNK,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
        return self._own

    def _socket(self, addr_info: Any) -> socket.socket:
        """The socket of one connection attempt, refused unless the policy allows the address it
        goes to; with a bounded receive buffer (the kernel would otherwise auto-tune it to several
        MiB, and those bytes sit beyond the reach of the guest's backpressure)."""
        family, type_, proto, _, sockaddr = addr_info
        ip = H.parse_ip(str(sockaddr[0]))
        if ip is None:
            raise H.FetchDenied(f"fetch denied: {sockaddr[0]!r} is not an IP address")
        self._policy.check_address(ip, int(sockaddr[1]))
        sock = socket.socket(family=family, type=type_, proto=proto)
        if self._rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        return sock

    async def __call__(self, request: Request) -> Response:
        if request.method in H.FORBIDDEN_METHODS:
            raise H.FetchDenied(f"fetch denied: method {request.method} is forbidden")
        H.check_request_head(request.method, request.url, request.headers.items())  # the app may have changed it
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_DROPPED]
        release = await self._slot()
        try:
            async with asyncio.timeout(self._timeout):
                upstream, redirected = await self._follow(request, headers)
        except BaseException as exc:
            release()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"no response head within {self._timeout:g}s (forward_fetch's timeout)") from None
            if isinstance(exc, (aiohttp.ClientError, OSError)):
                denied = _denial(exc)
                if denied is not None:
                    raise denied from None
            raise
        return Response(
            status=upstream.status,
            headers=[
                (k, v)
                for k, v in upstream.headers.items()
                if k.lower() not in HOP_BY_HOP | {"content-encoding", "content-length"} and H.valid_header(k, v)
            ],
            body=_UpstreamBody(upstream, release),
            status_text=H.valid_status_text(upstream.reason or ""),
            url=str(upstream.url),
            redirected=redirected,
        )

    async def _slot(self) -> Callable[[], None]:
        """Take one of the ``max_connections`` slots, waiting at most ``pool_timeout``; returns
        the function that gives it back (idempotent: a body may end and be closed)."""
        if self._slots.locked():
            self._queued += 1
            if self._queued == 1:
                log.warning(
                    "forward_fetch: all %d upstream connections are held by bodies not read to the end; "
                    "fetches wait up to %gs for one",
                    self._max_connections,
                    self._pool_timeout,
                )
            try:
                async with asyncio.timeout(self._pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise TimeoutError(
                    f"forward_fetch: no upstream connection came free within {self._pool_timeout:g}s: all "
                    f"{self._max_connections} (max_connections) are held by response bodies not read to the end "
                    "or closed yet; read or cancel earlier bodies, or raise max_connections"
                ) from None
            finally:
                self._queued -= 1
        else:
            await self._slots.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        return release

    async def _follow(self, request: Request, headers: list[tuple[str, str]]) -> tuple[aiohttp.ClientResponse, bool]:
        """Send ``request``, following redirects here (not in aiohttp) so that each hop's URL is
        checked before it is connected to; the fetch standard's rules for method and body."""
        url, method, data = URL(request.url), request.method, request.body
        for hop in range(self._max_redirects + 1):
            self._policy.check_url(url.scheme, url.host or "", url.port)
            upstream = await self._client().request(method, url, headers=headers, data=data, allow_redirects=False)
            location = upstream.headers.get("location")
            if upstream.status not in REDIRECTS or location is None or request.redirect == "manual":
                return upstream, hop > 0
            _discard(upstream)
            if request.redirect == "error":
                raise ValueError(f"{request.url} redirected, and the request's redirect mode is 'error'")
            try:
                target = url.join(URL(location))
            except ValueError:
                raise ValueError(f"{url} redirected to an invalid URL") from None
            if (upstream.status == 303 and method != "HEAD") or (upstream.status in (301, 302) and method == "POST"):
                method, data = "GET", None
                headers = [(k, v) for k, v in headers if k.lower() not in BODY_HEADERS]
            elif data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{url} redirected ({upstream.status}), and a streamed request body cannot be resent")
            if target.origin() != url.origin():
                headers = [(k, v) for k, v in headers if k.lower() not in CREDENTIALS]
            url = target
        raise ValueError(f"{request.url}: more than {self._max_redirects} redirects")

    async def aclose(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None


def forward_fetch(
    session: aiohttp.ClientSession | None = None,
    *,
    allow_private: bool | Iterable[str] = False,
    allow_hosts: Iterable[str] | None = None,
    allow_schemes: Iterable[str] = ("http", "https"),
    allow_ports: Iterable[int] | None = None,
    timeout: float | None = FETCH_TIMEOUT,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    max_redirects: int = MAX_REDIRECTS,
    rcvbuf: int = UPSTREAM_RCVBUF,
    max_connections: int = MAX_CONNECTIONS,
    pool_timeout: float = POOL_TIMEOUT,
) -> ForwardFetch:
    """A fetch callback that performs guest fetches for real with aiohttp (see ForwardFetch).

    By default a guest reaches public addresses only. ``allow_private=True`` lets it reach
    loopback and private networks too (tests, trusted code); a list such as
    ``["127.0.0.1:8080", "10.0.0.0/8"]`` allows just those. Cloud metadata addresses
    (169.254.169.254, fd00:ec2::254, ...) stay refused unless listed. ``allow_hosts`` (names,
    ``*.example.com``, IPs, networks), ``allow_schemes`` and ``allow_ports`` restrict the URLs
    (each redirect hop's). ``timeout`` (seconds, None: none) bounds the wait for the response
    head, ``connect_timeout`` each connection attempt. ``max_connections`` bounds the upstream
    connections held at once (a body holds one until read to the end or closed); a fetch beyond it
    waits at most ``pool_timeout`` seconds, then fails saying why (see ForwardFetch).

    ``rcvbuf`` bounds the kernel receive buffer of upstream connections (0: the kernel's default).
    A ``session`` you pass in does its own connecting, so forward_fetch cannot check the addresses
    it reaches: it then needs ``allow_private=True``.
    """
    policy = H.FetchPolicy.make(allow_private, allow_hosts, allow_schemes, allow_ports)
    return ForwardFetch(
        session, rcvbuf, policy=policy, timeout=timeout, connect_timeout=connect_timeout,
        max_redirects=max_redirects, max_connections=max_connections, pool_timeout=pool_timeout,
    )  # fmt: skip


class _CheckedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the policy allows (none left: FetchDenied)."""

    def __init__(self, policy: H.FetchPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        found = await self._inner.resolve(host, port, family)
        allowed, why = [], None
        for r in found:
            ip = H.parse_ip(str(r["host"]))
            denied = f"fetch denied: {r['host']!r} is not an IP address" if ip is None else None
            denied = denied or self._policy.address_denied(ip, int(r["port"]))  # type: ignore[arg-type]
            if denied is None:
                allowed.append(r)
            else:
                why = why or denied
        if not allowed:
            raise H.FetchDenied(f"{why} ({host} resolves to it)" if why else f"fetch denied: {host} has no address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _denial(exc: BaseException) -> H.FetchDenied | None:
    """The FetchDenied behind an aiohttp error (raised by the resolver or the socket factory)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, H.FetchDenied):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "os_error", None)]
    return None


def _discard(upstream: aiohttp.ClientResponse) -> None:
    """A redirect's body is not read: its connection is not reused."""
    upstream.close()


class _UpstreamBody:
    """The upstream body as an async iterator whose ``aclose`` closes the upstream connection;
    its end or ``aclose`` gives back the connection slot (``release``)."""

    def __init__(self, upstream: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self.upstream = upstream
        self._release = release
        self._it: AsyncIterator[bytes] = upstream.content.iter_any().__aiter__()

    def __aiter__(self) -> _UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self.upstream.release()
            self._release()
            raise

    async def aclose(self) -> None:
        if not self.upstream.content.at_eof():
            self.upstream.close()  # not release: an unfinished body must not be reused
        else:
            self.upstream.release()
        self._release()


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
    rid = getattr(runtime, "id", repr(runtime))  # for the log (a stand-in with dispatch_request works too)

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal warned
        if not warned and not _cancels_handlers(request):
            warned = True
            log.warning(
                "aiohttp_handler: handler_cancellation is off in this aiohttp app, so a guest body is "
                "cancelled only at its next write after the end client left; enable it (see the docstring)"
            )
        body = request.content.iter_any() if request.can_read_body else None
        try:
            req = Request(request.method, str(request.url), list(request.headers.items()), body)
        except H.HeadError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        try:
            resp = await runtime.dispatch_request(req)
        except Error as exc:
            # the end client gets the error's first line only: a guest's stack stays in the log
            brief = exc.brief if isinstance(exc, GuestError) else exc.message
            log.warning("aiohttp_handler: 502 for %s %s: runtime %s: %s", request.method, request.path, rid, exc)
            return web.Response(status=502, text=f"{type(exc).__name__}: {brief}\n")
        try:  # checked when the Response was made; again here, since it is mutable
            H.check_response_head(resp.status_text, resp.headers.items())
        except H.HeadError as exc:
            await close_body(resp.body)
            log.warning(
                "aiohttp_handler: 502 for %s %s: runtime %s: invalid response head: %s",
                request.method, request.path, rid, exc,
            )  # fmt: skip
            return web.Response(status=502, text=f"invalid response head from the runtime: {exc}\n")
        out = web.StreamResponse(status=resp.status, reason=resp.status_text or None)
        for k, v in resp.headers.items():
            if k.lower() not in HOP_BY_HOP | {"content-length"}:
                out.headers.add(k, v)
        try:
            if _cancels_handlers(request):
                await _forward(request, out, resp)
            else:
                await _forward_watching(request, out, resp, poll)
        except Exception as exc:
            log.warning(
                "aiohttp_handler: response to %s %s truncated: runtime %s: %s: %s",
                request.method, request.path, rid, type(exc).__name__, exc,
            )  # fmt: skip
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
