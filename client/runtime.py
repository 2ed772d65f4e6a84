"""A runtime as the client sees it: eval, dispatch_request, dispose, and the host callbacks.

Bodies never pass through the broker unless they are small and complete: anything else gets its
own pipe straight to the daemon (the daemon binds, the client connects), and the producing side
sends only as fast as the consuming side reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import weakref
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any

import zmq

from client.connection import Connection, ControlLink
from client.errors import Error, RequestRejected, RuntimeLost, lost
from client.http import Body, BodyType, Request, Response, header_pairs
from wire import protocol as P
from wire import sockets
from wire.auth import connect_with
from wire.pipes import PipeReader, PipeWriter

log = logging.getLogger("client.runtime")

#: How long a dispatch waits for the guest's response head (the body may take longer).
DISPATCH_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class ConsoleEntry:
    level: str
    args: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.args)


class Runtime:
    def __init__(
        self,
        conn: Connection,
        created: dict[str, Any],
        fetch: Callable[..., Any] | None,
        console: Callable[..., Any] | None,
        eval_timeout: float | None,
    ) -> None:
        self.conn = conn
        self.id: str = created["rt"]
        self.daemon: str = str(created.get("daemon", ""))
        key = created.get("daemon_key")
        self.daemon_key: bytes | None = key.encode() if isinstance(key, str) else None
        self.control: ControlLink = conn.control(str(created["control"]), self.daemon_key)
        self._fetch = fetch
        self._console = console
        self.eval_timeout = eval_timeout
        self.lost: RuntimeLost | None = None
        # weak: an abandoned Body must be collectable, so that its __del__ cancels the producer
        self.bodies: weakref.WeakSet[Body] = weakref.WeakSet()
        self.tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<Runtime {self.id} on {self.daemon}{' lost' if self.lost else ''}>"

    # ---- calls -----------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.lost is not None:
            raise self.lost

    async def eval(self, source: str, *, timeout: float | None = None) -> Any:
        """Evaluate ``source`` as an ES module; returns its JSON-able default export, if any."""
        self._check()
        code = source.encode()
        if len(code) > P.MAX_SOURCE:
            raise RequestRejected(f"source of {len(code)} bytes exceeds {P.MAX_SOURCE}", P.E_TOO_LARGE)
        fields: dict[str, Any] = {"rt": self.id}
        limit = timeout if timeout is not None else self.eval_timeout
        if limit is not None:
            fields["timeout_ms"] = int(limit * 1000)
        # the daemon enforces the limit; our wait only needs to outlast it
        wait = (limit or 30.0) + self.conn.timeout
        reply = await self.conn.request("eval", [code], timeout=wait, **fields)
        return reply.get("value")

    async def dispatch_request(self, request: Request, *, timeout: float = DISPATCH_TIMEOUT) -> Response:
        """Hand ``request`` to the guest's serve() handler; the response body streams as produced."""
        self._check()
        resp_sid = P.new_id()
        fields: dict[str, Any] = {
            "rt": self.id,
            "method": request.method,
            "url": request.url,
            "headers": header_pairs(request.headers),
            "resp_sid": resp_sid,
        }
        payload: list[Any] = []
        body = request.body
        upload: asyncio.Task[Any] | None = None
        if isinstance(body, (bytes, bytearray, memoryview)) and len(body) <= P.MAX_INLINE_BODY:
            if len(body):
                fields["body"], payload = P.BODY_INLINE, [body]
        elif body is not None:
            sid = P.new_id()
            fields["body"] = {"sid": sid}
            ready = self.conn.expect_pipe(sid)
            upload = self._track(self._upload(sid, ready, body))
            self.conn.add_producer(sid, upload)
        try:
            reply = await self.conn.request("dispatch", payload, timeout=timeout, **fields)
        except BaseException:
            self.control.cancel(resp_sid)  # the guest's request.signal aborts
            if upload is not None:
                upload.cancel()
            raise
        return self._response(reply, resp_sid)

    async def _upload(self, sid: bytes, ready: asyncio.Future[str], body: BodyType) -> None:
        try:
            async with asyncio.timeout(self.conn.timeout):
                ep = await ready
        except TimeoutError:
            log.warning("the daemon never opened the pipe for a request body")
            return
        finally:
            self.conn.pipe_waiters.pop(sid, None)
        await self._produce(sid, ep, body)

    async def _produce(self, sid: bytes, ep: str, body: BodyType) -> None:
        """Write ``body`` to the daemon's pipe at ``ep``; cancellation closes it (and the source)."""
        sock = sockets.pipe(self.conn.ctx, zmq.PUSH)
        connect_with(sock, self.conn.keypair, self.daemon_key)
        sock.connect(ep)
        writer = PipeWriter(sock, sid, connect_timeout=self.conn.timeout)
        try:
            if isinstance(body, (bytes, bytearray, memoryview)):
                await writer.send(body)
            elif body is not None:
                async for chunk in body:  # type: ignore[union-attr]
                    await writer.send(chunk)
            await writer.end()
        except asyncio.CancelledError:
            writer.abort()
            self.control.cancel(sid)  # the consumer must not wait for bytes that will never come
            raise
        except Exception as exc:
            await writer.fail(f"{type(exc).__name__}: {exc}")
        finally:
            await _aclose(body)

    def _response(self, reply: P.Message, resp_sid: bytes) -> Response:
        body: BodyType = None
        desc = P.check_body(reply)
        if desc == P.BODY_INLINE:
            body = bytes(reply.payload[0])
        elif isinstance(desc, P.StreamRef):
            if desc.ep is None or desc.sid != resp_sid:
                raise RequestRejected("the daemon answered with an unusable body stream", P.E_BAD_MESSAGE)
            body = self._open_body(desc.sid, desc.ep)
        return Response(
            status=int(reply.header["status"]),
            headers=[(k, v) for k, v in P.check_headers(reply.get("headers", []))],  # type: ignore[arg-type]
            body=body,
            status_text=str(reply.get("status_text", "")),
        )

    def _open_body(self, sid: bytes, ep: str) -> Body:
        sock = sockets.pipe(self.conn.ctx, zmq.PULL)
        connect_with(sock, self.conn.keypair, self.daemon_key)
        sock.connect(ep)
        body = Body(
            PipeReader(sock, sid),
            on_cancel=lambda: self.control.cancel(sid),
            on_done=self.bodies.discard,
        )
        self.bodies.add(body)
        if self.lost is not None:
            body.abort(self.lost.message)
        return body

    async def stats(self) -> dict[str, dict[str, int]]:
        """What this runtime has in flight on each hop: ``client``, ``daemon`` and ``guest`` counts.

        After every exchange has finished (completed, cancelled or failed) they are all zero.
        """
        self._check()
        reply = await self.conn.request("stats", rt=self.id)
        return {
            "client": {
                "bodies": len(self.bodies),
                "tasks": sum(not t.done() for t in self.tasks),
                "producers": sum(not t.done() for t in self.conn.producers.values()),
                "pipe_waiters": len(self.conn.pipe_waiters),
            },
            "daemon": dict(reply.get("daemon") or {}),
            "guest": dict(reply.get("guest") or {}),
        }

    async def dispose(self) -> None:
        """Stop the runtime; its process ends and every stream of it is closed."""
        if self.lost is not None:
            return
        try:
            await self.conn.request("dispose", rt=self.id)
        except RuntimeLost:
            pass
        self.on_lost(P.E_RUNTIME_LOST, "the runtime was disposed")
        await self.release()

    async def release(self) -> None:
        """Forget the runtime locally and close what its fetch callback holds (an aiohttp session)."""
        self.conn.runtimes.pop(self.id, None)
        aclose = getattr(self._fetch, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    # ---- callbacks from the guest ------------------------------------------------------------------

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def on_console(self, msg: P.Message) -> None:
        if self._console is None:
            return
        args = msg.get("args")
        entry = ConsoleEntry(str(msg.get("level", "log")), [str(a) for a in args] if isinstance(args, list) else [])
        try:
            result = self._console(entry)
        except Exception:
            log.exception("console callback failed")
            return
        if inspect.isawaitable(result):
            self._track(result)

    def on_fetch(self, msg: P.Message) -> None:
        fid = msg.id
        resp = msg.get("resp")
        try:
            if fid is None:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "fetch without id")
            ref = P.check_stream_ref(resp)
            if ref.ep is None:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "fetch without a response endpoint")
        except P.ProtocolError as exc:
            log.warning("malformed fetch callback: %s", exc.message)
            return
        task = self._track(self._serve_fetch(fid, msg, ref))
        self.conn.add_producer(ref.sid, task)

    async def _serve_fetch(self, fid: int, msg: P.Message, resp_ref: P.StreamRef) -> None:
        request_body: Body | None = None
        try:
            desc = P.check_body(msg)
            body: BodyType = None
            if desc == P.BODY_INLINE:
                body = bytes(msg.payload[0])
            elif isinstance(desc, P.StreamRef) and desc.ep is not None:
                body = request_body = self._open_body(desc.sid, desc.ep)
            request = Request(
                str(msg.get("method", "GET")),
                str(msg.get("url", "")),
                [(k, v) for k, v in P.check_headers(msg.get("headers", []))],  # type: ignore[arg-type]
                body,
                redirect=str(msg.get("redirect", "follow")),
            )
            assert self._fetch is not None, "the daemon sent fetch to a runtime without a fetch callback"
            try:
                response = await self._fetch(request)
            except asyncio.CancelledError:
                self._reply_fetch_error(fid, "the fetch was cancelled")  # the broker stops waiting
                raise
            if not isinstance(response, Response):
                raise TypeError(f"the fetch callback returned {type(response).__name__}, not client.Response")
            if not 200 <= response.status <= 599:
                raise ValueError(f"the fetch callback returned status {response.status} (must be 200-599)")
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._reply_fetch_error(fid, f"{type(exc).__name__}: {exc}")
            if request_body is not None:
                request_body.cancel()  # the guest's upload stops too
            if isinstance(exc, Exception):
                return
            raise
        fields: dict[str, Any] = {
            "rt": self.id,
            "status": response.status,
            "status_text": response.status_text,
            "headers": header_pairs(response.headers),
            "url": response.url or request.url,
            "redirected": response.redirected,
        }
        rbody = response.body
        try:
            if isinstance(rbody, (bytes, bytearray, memoryview)) and len(rbody) <= P.MAX_INLINE_BODY:
                if len(rbody):
                    fields["body"] = P.BODY_INLINE
                self._send(P.encode("ok", [rbody] if len(rbody) else [], id=fid, **fields))
                return
            if rbody is None:
                self._send(P.encode("ok", id=fid, **fields))
                return
            fields["body"] = {"sid": resp_ref.sid}
            self._send(P.encode("ok", id=fid, **fields))
            assert resp_ref.ep is not None
            await self._produce(resp_ref.sid, resp_ref.ep, rbody)
        finally:
            await _aclose(rbody)
            if request_body is not None and not request_body.finished:
                request_body.cancel()

    def _reply_fetch_error(self, fid: int, message: str) -> None:
        self._send(P.error_frames(P.E_FETCH_FAILED, message, fid, rt=self.id))

    def _send(self, frames: list[Any]) -> None:
        with contextlib.suppress(Error):
            self.conn.send(frames)

    # ---- loss --------------------------------------------------------------------------------------

    def on_lost(self, code: str, message: str) -> None:
        """The runtime is gone: every open body fails, every producer stops."""
        if self.lost is None:
            self.lost = lost(code, message)
        for body in list(self.bodies):
            body.abort(message)
        for task in list(self.tasks):
            task.cancel()
        if not any(r.control is self.control and r.lost is None for r in self.conn.runtimes.values()):
            self.conn.drop_control(self.control)  # the daemon may be gone: do not keep dialling it


async def _aclose(body: BodyType) -> None:
    if isinstance(body, AsyncIterable):
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
