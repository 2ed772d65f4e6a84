"""A client's connection: the DEALER to the broker, and one control DEALER per daemon in use.

One reader task per socket; replies resolve futures by request id; callbacks (fetch, console,
runtime_lost) are handed to the runtime they name. The broker is watched with heartbeats: if it
falls silent, every pending call fails with ConnectionLost instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from client.errors import ConnectionLost, Error, Timeout, from_reply
from wire import liveness, sockets
from wire import protocol as P
from wire.auth import KeyPair, connect_with

log = logging.getLogger("client")

DEFAULT_TIMEOUT = 30.0


class ControlLink:
    """The control DEALER to one daemon; its identity is the client's token."""

    def __init__(self, conn: Connection, endpoint: str, daemon_key: bytes | None) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.sock = sockets.dealer(conn.ctx, identity=conn.token)
        connect_with(self.sock, conn.keypair, daemon_key)
        self.sock.connect(endpoint)
        self.send(P.encode("hello"))
        self.task = asyncio.create_task(self._read(), name=f"client-control-{endpoint}")

    def send(self, frames: list[Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            sockets.send_now(self.sock, frames)

    def cancel(self, sid: bytes) -> None:
        self.send(P.encode("cancel", sid=sid))

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                msg = P.decode(frames, P.CONTROL_TO_CLIENT)
                sid = P.require(msg, "sid", bytes)
            except P.ProtocolError as exc:
                log.warning("bad control message from %s: %s", self.endpoint, exc.message)
                continue
            if msg.type == "cancel":
                producer = self.conn.producers.pop(sid, None)
                if producer is not None:
                    producer.cancel()
            else:  # pipe_ready
                waiter = self.conn.pipe_waiters.pop(sid, None)
                ep = msg.get("ep")
                if waiter is not None and not waiter.done() and isinstance(ep, str):
                    waiter.set_result(ep)

    def close(self) -> None:
        self.task.cancel()
        self.sock.close(0)


class Connection:
    def __init__(
        self, endpoint: str, timeout: float, keypair: KeyPair | None = None, broker_key: bytes | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.keypair = keypair
        self.ctx = sockets.context()
        # an explicit identity survives a TCP reconnect, so the broker still knows us afterwards
        self.sock = sockets.dealer(self.ctx, identity=P.new_id())
        connect_with(self.sock, keypair, broker_key)
        self.token = b""
        self.heartbeat = 1.0
        self.liveness = 5
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[P.Message]] = {}
        self.runtimes: dict[str, Any] = {}
        self.controls: dict[str, ControlLink] = {}
        #: stream id -> task producing it; a control "cancel" cancels the task
        self.producers: dict[bytes, asyncio.Task[Any]] = {}
        self.pipe_waiters: dict[bytes, asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_seen = time.monotonic()
        self.closed: Error | None = None
        self._reader: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None

    async def _open(self) -> None:
        self.sock.connect(self.endpoint)
        self._reader = asyncio.create_task(self._read(), name="client-broker")
        try:
            welcome = await self.request("hello", timeout=self.timeout)
        except BaseException:
            await self.close()
            raise
        self.token = welcome.header["token"]
        hb_ms = welcome.get("heartbeat_ms")
        if isinstance(hb_ms, int) and hb_ms > 0:
            self.heartbeat = hb_ms / 1000
        self._beater = asyncio.create_task(self._heartbeats(), name="client-heartbeat")

    # ---- requests ------------------------------------------------------------------------------------

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def send(self, frames: list[Any]) -> None:
        if self.closed is not None:
            raise self.closed
        try:
            sockets.send_now(self.sock, frames)
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"cannot reach the broker at {self.endpoint}: {exc}") from None

    async def request(
        self, type_: str, payload: list[Any] | None = None, *, timeout: float | None = None, **fields: Any
    ) -> P.Message:
        """Send one request and wait for its reply; an ``error`` reply raises the matching Error."""
        req_id = self.next_id()
        fut: asyncio.Future[P.Message] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        try:
            self.send(P.encode(type_, payload or [], id=req_id, **fields))
            limit = self.timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(limit):
                    msg = await fut
            except TimeoutError:
                raise Timeout(f"no reply to {type_} within {limit:g}s") from None
        finally:
            self._waiting.pop(req_id, None)
        if msg.type == "error":
            raise from_reply(msg.header)
        return msg

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def control(self, endpoint: str, daemon_key: bytes | None) -> ControlLink:
        link = self.controls.get(endpoint)
        if link is None:
            link = self.controls[endpoint] = ControlLink(self, endpoint, daemon_key)
        return link

    def drop_control(self, link: ControlLink) -> None:
        if self.controls.get(link.endpoint) is link:
            del self.controls[link.endpoint]
            link.close()

    def expect_pipe(self, sid: bytes) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pipe_waiters[sid] = fut
        return fut

    def add_producer(self, sid: bytes, task: asyncio.Task[Any]) -> None:
        self.producers[sid] = task
        task.add_done_callback(lambda _t: self.producers.pop(sid, None))

    # ---- reading -------------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            self._last_seen = time.monotonic()
            try:
                msg = P.decode(frames, P.BROKER_TO_CLIENT)
            except P.ProtocolError as exc:
                log.warning("bad message from the broker: %s", exc.message)
                continue
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("failed to handle %s from the broker", msg.type)

    def _dispatch(self, msg: P.Message) -> None:
        t = msg.type
        if t == "hb":
            return
        if t in ("ok", "error", "welcome"):
            if t == "error" and msg.get("code") == P.E_UNKNOWN_CLIENT and self.token:
                self._fail(ConnectionLost(f"the broker at {self.endpoint} no longer knows this client: "
                                          f"{msg.get('message')}"))  # fmt: skip
                return
            fut = self._waiting.get(msg.id) if msg.id is not None else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif t == "error":
                log.warning("broker error: %s: %s", msg.get("code"), msg.get("message"))
            return
        runtime = self.runtimes.get(msg.get("rt"))
        if runtime is None:
            if t == "fetch" and msg.id is not None:
                self.send(P.error_frames(P.E_UNKNOWN_RUNTIME, "this client has no such runtime", msg.id,
                                         rt=msg.get("rt")))  # fmt: skip
            return
        if t == "fetch":
            runtime.on_fetch(msg)
        elif t == "console":
            runtime.on_console(msg)
        elif t == "runtime_lost":
            runtime.on_lost(str(msg.get("code", P.E_RUNTIME_LOST)), str(msg.get("message", "")))

    async def _heartbeats(self) -> None:
        hb = P.encode("hb")
        while self.closed is None:
            stall = await liveness.tick(self.heartbeat)  # not `x += await`: that reads x before sleeping
            self._last_seen += stall
            if sockets.has_input(self.sock):
                self._last_seen = time.monotonic()
            if time.monotonic() - self._last_seen > self.heartbeat * self.liveness:
                self._fail(ConnectionLost(f"the broker at {self.endpoint} stopped answering"))
                return
            with contextlib.suppress(Error):
                self.send(hb)

    def _fail(self, exc: Error) -> None:
        if self.closed is None:
            self.closed = exc
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        for runtime in list(self.runtimes.values()):
            runtime.on_lost(exc.code, exc.message)

    # ---- public API ----------------------------------------------------------------------------------

    async def create_runtime(
        self,
        *,
        fetch: Callable[..., Any] | None = None,
        console: Callable[..., Any] | None = None,
        memory_limit_mb: int | None = None,
        eval_timeout: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """A new sandboxed runtime on the least loaded daemon."""
        from client.runtime import Runtime

        fields: dict[str, Any] = {"fetch": fetch is not None, "console": console is not None}
        if memory_limit_mb is not None:
            fields["memory_limit_mb"] = int(memory_limit_mb)
        if eval_timeout is not None:
            fields["eval_timeout_ms"] = int(eval_timeout * 1000)
        reply = await self.request("create_runtime", timeout=timeout, **fields)
        runtime = Runtime(self, reply.header, fetch, console, eval_timeout)
        self.runtimes[runtime.id] = runtime
        return runtime

    async def close(self) -> None:
        """Dispose every runtime of this client (the broker does it on ``bye``) and close sockets."""
        if self.closed is None:
            with contextlib.suppress(Error):
                self.send(P.encode("bye"))
            await asyncio.sleep(0)
        self._fail(ConnectionLost("the connection was closed"))
        for runtime in list(self.runtimes.values()):
            await runtime.release()
        tasks = [t for t in (self._reader, self._beater, *self._tasks, *self.producers.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.controls.values():
            link.close()
        self.controls.clear()
        # give the "bye" a moment to leave before the socket goes
        self.sock.close(linger=200)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    endpoint: str = "tcp://127.0.0.1:5555",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    keypair: KeyPair | None = None,
    broker_key: bytes | None = None,
) -> Connection:
    """Connect to a broker's frontend; fails with Timeout if it does not answer within ``timeout``.

    With ``keypair`` and ``broker_key`` (see wire.auth) every socket of this client uses CURVE:
    the broker admits it only if its public key is authorized, and the daemons it uses admit it
    because the broker vouches for it.
    """
    conn = Connection(endpoint, timeout, keypair, broker_key)
    await conn._open()
    return conn
