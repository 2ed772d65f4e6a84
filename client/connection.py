"""A client's connection: the DEALER to the broker, and one control link per daemon in use.

One reader task per socket; replies resolve futures by request id; callbacks (fetch, console,
runtime_lost) are handed to the runtime they name. The broker is watched with heartbeats: if it
falls silent, every pending call fails with ConnectionLost instead of hanging.

The connection owns a Scope (its reader, its heartbeats, the control links' readers) and its
runtimes; ``close`` closes the runtimes first, then joins its own tasks. It is the ``Host`` of
each Runtime: the dependency goes one way, connection -> runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from client.control import ControlLink
from client.errors import ConnectionLost, Error, RequestRejected, Timeout, from_reply
from client.http import Request, Response
from client.runtime import ConsoleEntry, Runtime, to_ms
from wire import liveness, sockets
from wire import messages as M
from wire import protocol as P
from wire.auth import KeyPair, connect_with, pipe_client
from wire.pipes import PipeCount
from wire.scope import Scope

log = logging.getLogger("client")

DEFAULT_TIMEOUT = 30.0
#: Every pipe of this process (descriptors are counted per process, whatever the connection).
_PIPES = PipeCount(lambda why: RequestRejected(f"this client {why}; retry later", P.E_BUSY))

R = TypeVar("R", bound=M.Record)
Answer = M.Record | M.Reply


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
        self.runtimes: dict[str, Runtime] = {}
        self.closed: Error | None = None
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._controls: dict[str, ControlLink] = {}
        self._scope = Scope("connection")
        self._last_seen = time.monotonic()
        self._shut = False

    async def _open(self) -> None:
        self.sock.connect(self.endpoint)
        self._scope.spawn(self._read(), name="client-broker")
        try:
            req_id = self._next_id()
            welcome = await self._exchange(req_id, M.Hello(id=req_id).frames(), "hello", self.timeout)
            if not isinstance(welcome, M.Welcome) or welcome.token is None:
                raise RequestRejected("the broker did not answer hello with welcome", P.E_BAD_MESSAGE)
        except BaseException:
            await self.close()
            raise
        self.token = welcome.token
        if welcome.heartbeat_ms > 0:
            self.heartbeat = welcome.heartbeat_ms / 1000
        self._scope.spawn(self._heartbeats(), name="client-heartbeat")

    # ---- requests (the Host interface of client.runtime) ---------------------------------------------

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def send(self, msg: M.Record) -> None:
        self._send_frames(msg.frames())

    def _send_frames(self, frames: list[Any]) -> None:
        if self.closed is not None:
            raise self.closed
        try:
            sockets.send_now(self.sock, frames)
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"cannot reach the broker at {self.endpoint}: {exc}") from None

    async def call(self, make: Callable[[int], M.Record], reply: type[R], *, timeout: float | None = None) -> R:
        """Send the request ``make(id)`` and wait for its ``ok``; an ``error`` reply raises the matching Error."""
        req_id = self._next_id()
        msg = make(req_id)
        answer = await self._exchange(req_id, msg.frames(), msg.T, timeout)
        if not isinstance(answer, M.Reply):
            raise RequestRejected(f"the broker answered {msg.T} with {answer.T}", P.E_BAD_MESSAGE)
        try:
            return answer.parse(reply)
        except P.ProtocolError as exc:
            raise RequestRejected(f"bad reply to {msg.T}: {exc.message}", exc.code) from None

    async def _exchange(self, req_id: int, frames: list[Any], what: str, timeout: float | None) -> Answer:
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        try:
            self._send_frames(frames)
            limit = self.timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(limit):
                    answer = await fut
            except TimeoutError:
                raise Timeout(f"no reply to {what} within {limit:g}s") from None
        finally:
            self._waiting.pop(req_id, None)
        if isinstance(answer, M.ErrorReply):
            raise from_reply(answer)
        return answer

    def dial(self, kind: int, endpoint: str, sid: bytes, server_key: bytes | None) -> zmq.asyncio.Socket:
        """A pipe socket, or ``busy`` (RequestRejected) for this one body when the process is out
        of descriptors for pipes: it never takes the last ones (wire.pipes.PipeCount)."""
        return _PIPES.open(lambda: self._dial(kind, endpoint, sid, server_key))

    def _dial(self, kind: int, endpoint: str, sid: bytes, server_key: bytes | None) -> zmq.asyncio.Socket:
        sock = sockets.pipe(self.ctx, kind)
        try:
            pipe_client(sock, sid, self.keypair, server_key)
            sock.connect(endpoint)
        except BaseException:
            sock.close(0)
            raise
        return sock

    def forget(self, runtime_id: str) -> None:
        self.runtimes.pop(runtime_id, None)

    def _control(self, endpoint: str, daemon_key: bytes | None) -> ControlLink:
        """A lease on the control link to the daemon at ``endpoint`` (opened on first use)."""
        link = self._controls.get(endpoint)
        if link is None or link.closed:
            sock = sockets.dealer(self.ctx, identity=self.token)
            connect_with(sock, self.keypair, daemon_key)
            sock.connect(endpoint)
            link = self._controls[endpoint] = ControlLink(sock, endpoint, self._scope)
        return link.acquire()

    # ---- reading -------------------------------------------------------------------------------------

    async def _read(self) -> None:
        reader = sockets.Reader(self.sock)  # bounded batches: the app's other tasks get their turns
        while True:
            for frames in await reader.batch():
                self._last_seen = time.monotonic()
                try:
                    msg = M.BROKER_TO_CLIENT.parse(frames)
                except P.ProtocolError as exc:
                    log.warning("bad message from the broker: %s", exc.message)
                    continue
                try:
                    self._route(msg)
                except Exception:
                    log.exception("failed to handle %s from the broker", msg.T)

    def _route(self, msg: Answer) -> None:
        if isinstance(msg, M.Heartbeat):
            return
        if isinstance(msg, (M.Reply, M.Welcome, M.ErrorReply)):
            self._answer(msg)
            return
        assert isinstance(msg, (M.Fetch, M.Console, M.RuntimeLost))
        runtime = self.runtimes.get(msg.rt)
        if runtime is None:
            if isinstance(msg, M.Fetch):
                with contextlib.suppress(Error):
                    self.send(M.error(P.E_UNKNOWN_RUNTIME, "this client has no such runtime", msg.id, rt=msg.rt))
        elif isinstance(msg, M.Fetch):
            runtime.on_fetch(msg)
        elif isinstance(msg, M.Console):
            runtime.on_console(msg)
        else:
            runtime.on_lost(msg.code, msg.message)

    def _answer(self, msg: M.Reply | M.Welcome | M.ErrorReply) -> None:
        if isinstance(msg, M.ErrorReply) and msg.code == P.E_UNKNOWN_CLIENT and self.token:
            self._fail(ConnectionLost(f"the broker at {self.endpoint} no longer knows this client: {msg.message}"))
            return
        fut = self._waiting.get(msg.id) if msg.id is not None else None
        if fut is not None and not fut.done():
            fut.set_result(msg)
        elif isinstance(msg, M.ErrorReply):
            log.warning("broker error: %s: %s", msg.code, msg.message)

    async def _heartbeats(self) -> None:
        hb = M.Heartbeat()
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
        fetch: Callable[[Request], Awaitable[Response]] | None = None,
        console: Callable[[ConsoleEntry], Any] | None = None,
        memory_limit_mb: int | None = None,
        eval_timeout: float | None = None,
        cpu_limit: float | None = None,
        request_cpu: float | None = None,
        timeout: float | None = None,
    ) -> Runtime:
        """A new sandboxed runtime on the least loaded daemon. ``cpu_limit``: CPU seconds one turn
        of its event loop may take; ``request_cpu``: CPU seconds a dispatch may use before its
        response head (both default to the daemon's; past either the runtime is stopped)."""
        mem = None if memory_limit_mb is None else int(memory_limit_mb)
        eval_ms = None if eval_timeout is None else to_ms(eval_timeout)
        cpu_ms = None if cpu_limit is None else to_ms(cpu_limit)
        request_ms = None if request_cpu is None else to_ms(request_cpu)
        created = await self.call(
            lambda id_: M.CreateRuntime(
                id=id_, fetch=fetch is not None, console=console is not None, memory_limit_mb=mem,
                eval_timeout_ms=eval_ms, cpu_limit_ms=cpu_ms, request_cpu_ms=request_ms,
            ),
            M.CreateOk,
            timeout=timeout,
        )  # fmt: skip
        if created.control is None:
            raise RequestRejected("the broker's create reply names no control endpoint", P.E_BAD_MESSAGE)
        key = created.daemon_key.encode() if created.daemon_key else None
        try:
            control = self._control(created.control, key)
        except zmq.ZMQError as exc:  # out of descriptors: this create fails, its runtime goes
            with contextlib.suppress(Error):
                await self.call(lambda id_: M.Dispose(id=id_, rt=created.rt), M.DisposeOk)
            why = f"this client cannot open a control link ({exc.strerror}); retry later"
            raise RequestRejected(why, P.E_BUSY) from None
        runtime = Runtime(self, control, created, fetch, console, eval_timeout)
        self.runtimes[runtime.id] = runtime
        return runtime

    async def close(self) -> None:
        """Dispose every runtime of this client (the broker does it on ``bye``) and close sockets."""
        if self._shut:
            return
        self._shut = True
        if self.closed is None:
            with contextlib.suppress(Error):
                self.send(M.Bye())
            await asyncio.sleep(0)
        self._fail(ConnectionLost("the connection was closed"))
        for runtime in list(self.runtimes.values()):
            await runtime.close()
        for link in self._controls.values():
            link.close()
        self._controls.clear()
        await self._scope.aclose()
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
