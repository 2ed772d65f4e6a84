"""A client's connection: the DEALER to the broker, and one control link per daemon in use.

One reader task per socket; replies resolve futures by request id; callbacks (fetch, console,
runtime_lost) are handed to the runtime they name. The broker is watched with heartbeats: if it
falls silent (or says it does not know us: it restarted), every call pending at the broker fails
at once with ``Unavailable`` (retryable), and the connection says hello again with its session
token, to the same broker or the next of its endpoints (a standby), until one answers: the
session and its runtimes resume; pipes and control links, which go straight to the daemons, are
untouched. Only if no broker answers for ``reconnect`` seconds is the connection lost
(ConnectionLost, and every runtime with it). protocol.md 3.3, Recovery.

The connection owns a Scope (its reader, its heartbeats, the control links' readers) and its
runtimes; ``close`` closes the runtimes first, then joins its own tasks. It is the ``Host`` of
each Runtime: the dependency goes one way, connection -> runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from client.control import ControlLink
from client.errors import (
    AuthenticationFailed,
    ConnectionLost,
    Error,
    InvalidEndpoint,
    RequestRejected,
    Timeout,
    Unavailable,
    Unreachable,
    from_reply,
)
from client.modules import Resolver
from client.runtime import MODULE_TIMEOUT, ConsoleCallback, FetchCallback, Runtime, check_callbacks, to_ms
from client.tools import Tool, check_tools
from wire import liveness, sockets
from wire import messages as M
from wire import protocol as P
from wire.auth import KeyPair, connect_with, pipe_client
from wire.pipes import PipeCount
from wire.scope import Scope

log = logging.getLogger("sandbox_mesh.client")

DEFAULT_TIMEOUT = 30.0
#: How long ``connect`` waits for a broker's welcome by default (seconds): a broker that is not
#: there is reported within this, not after the 30 s a call may take.
CONNECT_TIMEOUT = 5.0
HINT = "is `python -m broker` running, with this --frontend?"
#: What an endpoint ZeroMQ can dial looks like (checked before any socket is made).
_ENDPOINT = re.compile(r"(tcp|ipc|inproc|ws|wss)://[^\s]+")
_TCP = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})")
#: How long a connection tries to resume its session after its broker went away (seconds).
DEFAULT_RECONNECT = 60.0
#: Every pipe of this process (descriptors are counted per process, whatever the connection).
_PIPES = PipeCount(lambda why: RequestRejected(f"this client {why}; retry later", P.E_BUSY))

R = TypeVar("R", bound=M.Record)
Answer = M.Record | M.Reply


@dataclass(frozen=True, slots=True)
class _Handlers:
    """What this connection serves a runtime's guest besides fetch and console: its tools (and
    their default timeout) and its module resolver (and its timeout)."""

    tools: dict[str, Tool]
    tool_timeout: float | None
    modules: Resolver | None
    module_timeout: float


class Connection:
    def __init__(
        self,
        endpoints: list[str],
        timeout: float,
        keypair: KeyPair | None = None,
        broker_key: bytes | None = None,
        session: bytes | None = None,
        reconnect: float = DEFAULT_RECONNECT,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_lost: Callable[[ConnectionLost], object] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.endpoint = endpoints[0]
        self.timeout = timeout
        self.keypair = keypair
        self.broker_key = broker_key
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        #: called once with the ConnectionLost when the connection is lost (not when it is closed):
        #: no broker answered for ``reconnect`` seconds. Every runtime of it is lost with it.
        self.on_lost = on_lost
        self.ctx = sockets.context()
        self._watch: _Watch | None = None  # while connect waits for its first welcome
        self.sock = self._dealer(self.endpoint)
        self.token = session or b""
        self.reconnects = 0  # how many times the session was resumed after a broker went away
        self._online = False  # a broker has answered our hello and not gone silent since
        self._rehello = False  # the broker does not know us (it restarted): say hello again now
        self.heartbeat = 1.0
        self.liveness = liveness.LIVENESS
        self.runtimes: dict[str, Runtime] = {}
        self.closed: Error | None = None
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._controls: dict[str, ControlLink] = {}
        self._scope = Scope("connection")
        self._last_seen = time.monotonic()
        self._shut = False

    @property
    def session(self) -> bytes:
        """This session's secret token: ``connect(..., session=conn.session)`` from another process
        resumes it (its runtimes, named or within their grace). Keep it as secret as a key."""
        return self.token

    def _dealer(self, endpoint: str) -> zmq.asyncio.Socket:
        # a fresh routing id per socket: the session is the token, never the routing id
        sock = sockets.dealer(self.ctx, identity=P.new_id())
        try:
            connect_with(sock, self.keypair, self.broker_key)
            if self._watch is not None:  # before connect: the monitor must see the first events
                self._watch.attach(sock)
            sock.connect(endpoint)
        except BaseException as exc:
            sock.close(0)
            if isinstance(exc, zmq.ZMQError):
                raise InvalidEndpoint(f"cannot connect to {endpoint!r}: {exc.strerror}") from None
            raise
        return sock

    async def _open(self) -> None:
        """Say hello to each endpoint in turn until one welcomes us, watching each socket's
        handshake (``_Watch``) to say why none did, or to fail at once if one refused our keys."""
        try:
            each = self.connect_timeout / len(self.endpoints)
            why: list[str] = []
            for endpoint in self.endpoints:
                self._watch = watch = _Watch(self, endpoint)
                try:
                    self._switch(endpoint)  # the first time too: its monitor is attached before connect
                    await self._hello(each)
                    break
                except AuthenticationFailed:
                    raise  # the broker said no: waiting longer or asking a standby will not help
                except Timeout:
                    why.append(watch.explain(each))
                finally:
                    self._watch = None
                    await watch.close()
            else:
                raise Unreachable("; ".join(why))
        except BaseException:
            await self.close()
            raise
        self._scope.spawn(self._heartbeats(), name="client-heartbeat")

    async def _hello(self, timeout: float) -> None:
        req_id = self._next_id()
        hello = M.Hello(id=req_id, session=self.token or None)
        welcome = await self._exchange(req_id, hello.frames(), "hello", timeout, hello=True)
        if not isinstance(welcome, M.Welcome) or welcome.token is None:
            raise RequestRejected("the broker did not answer hello with welcome", P.E_BAD_MESSAGE)
        if self.token and welcome.token != self.token:
            raise RequestRejected("the broker did not resume this session", P.E_BAD_MESSAGE)
        self.token = welcome.token
        if welcome.heartbeat_ms > 0:
            self.heartbeat = welcome.heartbeat_ms / 1000
        self._last_seen = time.monotonic()
        self._online = True

    def _switch(self, endpoint: str) -> None:
        """Drop the broker socket (what it still queues is stale) and dial ``endpoint`` afresh."""
        self.sock.close(0)  # its reader ends: closing, not cancelling, stops a pending recv
        self.endpoint = endpoint
        self.sock = self._dealer(endpoint)
        self._scope.spawn(self._read(self.sock), name="client-broker")

    def _lose(self, exc: ConnectionLost) -> None:
        """No broker answered for ``reconnect`` seconds: say so in the log and to ``on_lost``,
        then fail every call and runtime."""
        if self.closed is not None:
            return
        log.error("connection lost: %s; its %d runtime(s) are lost with it", exc.message, len(self.runtimes))
        self._fail(exc)
        if self.on_lost is not None:
            try:
                self.on_lost(exc)
            except Exception:
                log.exception("the connection's on_lost callback failed")

    async def _reconnect(self, why: str, *, same_first: bool) -> None:
        """Fail what waits at the broker (retryable), then say hello with our token until a broker
        answers: first the same one if it told us it restarted, else the next endpoint."""
        self._online = False
        self._rehello = False
        self._fail_waiting(Unavailable(f"the broker at {self.endpoint} {why}; the call may be retried"))
        if self.reconnect <= 0:
            self._lose(ConnectionLost(f"the broker at {self.endpoint} {why}"))
            return
        log.warning("the broker at %s %s; resuming the session", self.endpoint, why)
        first = self.endpoints.index(self.endpoint) + (0 if same_first else 1)
        deadline = time.monotonic() + self.reconnect
        for attempt in itertools.count():
            if self.closed is not None or time.monotonic() >= deadline:
                break
            self._switch(self.endpoints[(first + attempt) % len(self.endpoints)])
            try:
                await self._hello(max(2 * self.heartbeat, 0.5))
            except Timeout:
                continue  # it waited its turn already
            except Error as exc:  # refused at once: do not spin
                log.debug("hello to %s failed: %s", self.endpoint, exc)
                await asyncio.sleep(max(self.heartbeat, 0.2))
                continue
            self.reconnects += 1
            log.warning("session resumed at %s", self.endpoint)
            return
        self._lose(ConnectionLost(f"the broker at {self.endpoint} {why}, and none answered for {self.reconnect:g}s"))

    # ---- requests (the Host interface of client.runtime) ---------------------------------------------

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def send(self, msg: M.Record) -> None:
        self._send_frames(msg.frames())

    def _send_frames(self, frames: list[Any], hello: bool = False) -> None:
        if self.closed is not None:
            raise self.closed
        if not self._online and not hello:
            raise Unavailable(f"the broker at {self.endpoint} is unreachable; reconnecting (retry)")
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

    async def _exchange(
        self, req_id: int, frames: list[Any], what: str, timeout: float | None, hello: bool = False
    ) -> Answer:
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        try:
            self._send_frames(frames, hello)
            limit = self.timeout if timeout is None else timeout
            deadline = asyncio.timeout(limit)
            try:
                async with deadline:
                    answer = await fut
            except TimeoutError:
                if not deadline.expired():  # an answer that is a TimeoutError (AuthenticationFailed)
                    raise
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

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        reader = sockets.Reader(sock)  # bounded batches: the app's other tasks get their turns
        while True:
            try:
                batch = await reader.batch()
            except (zmq.ZMQError, asyncio.CancelledError):
                if sock.closed and sock is not self.sock:  # replaced by _switch
                    return
                raise
            for frames in batch:
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
        assert isinstance(msg, (M.Fetch, M.Console, M.RuntimeLost, M.Tool, M.Module))
        runtime = self.runtimes.get(msg.rt)
        if runtime is None:
            if isinstance(msg, M.CALLBACKS):
                with contextlib.suppress(Error):
                    self.send(M.error(P.E_UNKNOWN_RUNTIME, "this client has no such runtime", msg.id, rt=msg.rt))
        elif isinstance(msg, M.Fetch):
            runtime.on_fetch(msg)
        elif isinstance(msg, M.Tool):
            runtime.on_tool(msg)
        elif isinstance(msg, M.Console):
            runtime.on_console(msg)
        elif isinstance(msg, M.Module):
            runtime.on_module(msg)
        else:
            runtime.on_lost(msg.code, msg.message)

    def _answer(self, msg: M.Reply | M.Welcome | M.ErrorReply) -> None:
        if isinstance(msg, M.ErrorReply) and msg.code == P.E_UNKNOWN_CLIENT and self._online:
            self._rehello = True  # it restarted (or dropped us): the heartbeat task says hello again
            why = f"the broker at {self.endpoint} no longer knows this session: {msg.message}"
            self._fail_waiting(Unavailable(why))
            return
        fut = self._waiting.get(msg.id) if msg.id is not None else None
        if fut is not None and not fut.done():
            fut.set_result(msg)
        elif isinstance(msg, M.ErrorReply):
            # the answer to a call its caller gave up on (a cancelled eval or dispatch, a timeout)
            # is expected; one to no call of ours is worth a warning
            ours = msg.id is not None and 0 <= msg.id <= self._ids
            log.log(logging.DEBUG if ours else logging.WARNING, "broker error: %s: %s", msg.code, msg.message)

    async def _heartbeats(self) -> None:
        hb = M.Heartbeat()
        while self.closed is None:
            stall = await liveness.tick(self.heartbeat)
            self._last_seen = liveness.forgive(self._last_seen, time.monotonic(), stall)
            if sockets.has_input(self.sock):
                self._last_seen = time.monotonic()
            if self._rehello:
                await self._reconnect("restarted or no longer knows this session", same_first=True)
            elif time.monotonic() - self._last_seen > self.heartbeat * self.liveness:
                await self._reconnect("stopped answering", same_first=False)
            else:
                with contextlib.suppress(Error):
                    self.send(hb)

    def _fail_waiting(self, exc: Error) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)

    def _fail(self, exc: Error) -> None:
        if self.closed is None:
            self.closed = exc
        self._fail_waiting(exc)
        for runtime in list(self.runtimes.values()):
            runtime.on_lost(exc.code, exc.message)

    # ---- public API ----------------------------------------------------------------------------------

    async def create_runtime(
        self,
        *,
        fetch: FetchCallback | None = None,
        console: ConsoleCallback | None = None,
        memory_limit_mb: int | None = None,
        eval_timeout: float | None = None,
        cpu_limit: float | None = None,
        request_cpu: float | None = None,
        name: str | None = None,
        keep_alive: float | None = None,
        timeout: float | None = None,
        tools: Mapping[str, Any] | None = None,
        tool_timeout: float | None = None,
        modules: Resolver | None = None,
        module_timeout: float = MODULE_TIMEOUT,
    ) -> Runtime:
        """A new sandboxed runtime on the least loaded daemon. ``cpu_limit``: CPU seconds one turn
        of its event loop may take; ``request_cpu``: CPU seconds a dispatch may use before its
        response head (both default to the daemon's; past either the runtime is stopped).

        A runtime is disposed when its connection closes, or (if the client process dies or its
        network goes) when the broker has not heard from it for its liveness timeout plus the
        reclaim grace. A ``name``d one outlives its session by ``keep_alive`` seconds (default 60,
        at most the broker's --max-keep-alive): ``runtime(name)`` on a connection that resumes the
        session (``connect(session=...)``) gets it back, state and all.

        ``modules``: ``async def resolver(specifier, referrer) -> client.Module | None`` answers the
        guest's imports (client/modules.py; ``client.modules.from_dict``, ``.directory``), each within
        ``module_timeout`` seconds (the daemon gives up after 60 s whatever this says). Without it,
        imports are Deno's own: only ``data:`` and the ``node:`` built-ins that reach no I/O."""
        mem = None if memory_limit_mb is None else int(memory_limit_mb)
        eval_ms = None if eval_timeout is None else to_ms(eval_timeout)
        cpu_ms = None if cpu_limit is None else to_ms(cpu_limit)
        request_ms = None if request_cpu is None else to_ms(request_cpu)
        keep_ms = None if keep_alive is None else to_ms(keep_alive)
        check_callbacks(fetch, console, modules)  # a wrong callback is refused here, not at the guest's first fetch
        served = check_tools(tools)  # so are tools, before anything is sent
        plain = tuple(n for n, t in served.items() if not t.stream)
        streamed = tuple(n for n, t in served.items() if t.stream)
        created = await self.call(
            lambda id_: M.CreateRuntime(
                id=id_, fetch=fetch is not None, console=console is not None, memory_limit_mb=mem,
                eval_timeout_ms=eval_ms, cpu_limit_ms=cpu_ms, request_cpu_ms=request_ms, name=name,
                keep_alive_ms=keep_ms, tools=plain, stream_tools=streamed, modules=modules is not None,
            ),
            M.CreateOk,
            timeout=timeout,
        )  # fmt: skip
        handlers = _Handlers(served, tool_timeout, modules, module_timeout)
        return await self._hold(created, name, fetch, console, eval_timeout, handlers, new=True)

    async def runtime(
        self,
        name: str,
        *,
        fetch: FetchCallback | None = None,
        console: ConsoleCallback | None = None,
        eval_timeout: float | None = None,
        timeout: float | None = None,
        tools: Mapping[str, Any] | None = None,
        tool_timeout: float | None = None,
        modules: Resolver | None = None,
        module_timeout: float = MODULE_TIMEOUT,
    ) -> Runtime:
        """This session's runtime named ``name`` (``create_runtime(name=...)``), e.g. from a new
        connection made with ``session=`` the old one's ``session``. Its state is as it was left;
        ``fetch``, ``console``, ``tools`` and ``modules`` are this connection's handlers for it (the
        guest's ``tools`` object keeps the names given at its creation; the guest asks the resolver
        only if the runtime was created with one). UnknownRuntime if the session has none by that
        name (never created, disposed, or reclaimed after its keep_alive)."""
        check_callbacks(fetch, console, modules)
        served = check_tools(tools)
        for runtime in self.runtimes.values():
            if runtime.name == name and runtime.lost is None:
                return runtime
        found = await self.call(lambda id_: M.Acquire(id=id_, name=name), M.CreateOk, timeout=timeout)
        handlers = _Handlers(served, tool_timeout, modules, module_timeout)
        return await self._hold(found, name, fetch, console, eval_timeout, handlers, new=False)

    async def _hold(
        self,
        created: M.CreateOk,
        name: str | None,
        fetch: FetchCallback | None,
        console: ConsoleCallback | None,
        eval_timeout: float | None,
        handlers: _Handlers,
        *,
        new: bool,
    ) -> Runtime:
        if created.control is None:
            raise RequestRejected("the broker's create reply names no control endpoint", P.E_BAD_MESSAGE)
        key = created.daemon_key.encode() if created.daemon_key else None
        try:
            control = self._control(created.control, key)
        except zmq.ZMQError as exc:  # out of descriptors: this call fails; a runtime it created goes
            if new:
                with contextlib.suppress(Error):
                    await self.call(lambda id_: M.Dispose(id=id_, rt=created.rt), M.DisposeOk)
            why = f"this client cannot open a control link ({exc.strerror}); retry later"
            raise RequestRejected(why, P.E_BUSY) from None
        runtime = Runtime(
            self, control, created, fetch, console, eval_timeout, handlers.tools, handlers.tool_timeout,
            handlers.modules, handlers.module_timeout,
        )  # fmt: skip
        runtime.name = name
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


#: The socket events connect watches while it waits for its first welcome.
_EVENTS = (
    zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)  # fmt: skip


class _Watch:
    """What ZeroMQ saw of one broker socket while connect waited for a welcome (a socket monitor).

    ZeroMQ hides refused connections and failed handshakes from the application: without this a
    missing broker, a peer that is no broker and a refused key all look like the same silence.
    A refused handshake fails the hello at once (AuthenticationFailed); the rest is counted, so
    that a hello that timed out can say what happened (``explain``)."""

    def __init__(self, conn: Connection, endpoint: str) -> None:
        self._conn = conn
        self.endpoint = endpoint
        self._sock: zmq.asyncio.Socket | None = None
        self._mon: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.refused = self.connected = self.handshakes = self.dropped = 0

    def attach(self, sock: zmq.asyncio.Socket) -> None:
        """Monitor ``sock`` (before it connects) and start reading its events."""
        self._sock = sock
        self._mon = sock.get_monitor_socket(_EVENTS)
        self._task = self._conn._scope.spawn(self._run(self._mon), name="client-connect-watch")

    async def _run(self, mon: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await mon.recv_multipart())
            kind = event["event"]
            if kind == zmq.EVENT_CONNECT_RETRIED:
                self.refused += 1
            elif kind == zmq.EVENT_CONNECTED:
                self.connected += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
            else:
                self.dropped += kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                why = self._refusal(kind, event["value"])
                if why is not None:
                    refused = f"the broker at {self.endpoint} refused this client: {why}"
                    self._conn._fail_waiting(AuthenticationFailed(refused))

    def _refusal(self, kind: int, value: int) -> str | None:
        """What a failed handshake says about our keys; None if it says nothing for sure (a
        peer that hung up once, or that is no ZeroMQ peer at all: ``explain`` tells later)."""
        keys = self._conn.keypair is not None
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                f"its key gate did not admit this client's public key (ZAP status {value}); "
                "add it to the broker's --authorized-keys"
            )
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if keys:
                return "it does not use CURVE keys; connect without keypair= and broker_key="
            return "it requires CURVE keys; pass keypair= and broker_key= (see wire.auth)"
        if keys and (kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or self.dropped >= 2):
            # a broker that cannot decrypt our hello (sealed for another key) just hangs up, every time;
            # so may one without keys, when it sees the mismatch before we do
            return "the CURVE handshake failed; is broker_key the broker's public key, and does it use keys at all?"
        return None

    def explain(self, timeout: float) -> str:
        """Why no welcome came from ``endpoint`` within ``timeout`` seconds, from what was seen."""
        where = f"no broker answered at {self.endpoint} within {timeout:g}s"
        if self.handshakes:
            return (
                f"{where}: a peer accepted the connection but did not answer hello; "
                "is it a broker's --frontend (not its --backend or a daemon), and not overloaded?"
            )
        if self.connected and self._conn.keypair is not None:
            return f"{where}: the CURVE handshake never completed; is broker_key the broker's public key?"
        if self.dropped:
            return (
                f"{where}: the peer hung up during the ZeroMQ handshake; does the broker require CURVE keys "
                "(keypair=, broker_key=), or is it not a broker's --frontend?"
            )
        if self.connected:
            return (
                f"{where}: the connection was accepted but no ZeroMQ handshake completed; "
                "is a broker listening there, or some other server?"
            )
        seen = "could not connect: refused or unreachable" if self.refused else "no connection"
        return f"{where} ({seen}); {HINT}"

    async def close(self) -> None:
        """Stop watching (connect is done with this socket, or gives up on it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None and not self._sock.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
        if self._mon is not None:
            self._mon.close(0)


class Connecting(Awaitable[Connection]):
    """What ``connect`` returns: ``await`` it for the Connection, or enter it with ``async with``
    (the connection is closed when the block ends). The connection is made on either, not before."""

    def __init__(self, opening: Callable[[], Awaitable[Connection]]) -> None:
        self._opening = opening
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._opening().__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await self._opening()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()


def endpoints_of(endpoint: str | Sequence[str]) -> list[str]:
    """The broker endpoints ``endpoint`` names (a list, or comma-separated); InvalidEndpoint for
    one ZeroMQ cannot dial, said before any socket is made."""
    endpoints = [e.strip() for e in endpoint.split(",")] if isinstance(endpoint, str) else list(endpoint)
    if not endpoints or not all(isinstance(e, str) and e for e in endpoints):
        raise InvalidEndpoint(f"no broker endpoint in {endpoint!r}")
    for e in endpoints:
        tcp = _TCP.fullmatch(e)
        if not _ENDPOINT.fullmatch(e) or (e.startswith("tcp://") and not (tcp and 0 < int(tcp[2]) < 65536)):
            raise InvalidEndpoint(f"{e!r} is not a ZeroMQ endpoint; a broker's frontend looks like tcp://host:port")
    return endpoints


def connect(
    endpoint: str | Sequence[str] = "tcp://127.0.0.1:5555",
    *,
    timeout: float | None = None,
    connect_timeout: float | None = None,
    keypair: KeyPair | None = None,
    broker_key: bytes | None = None,
    session: bytes | None = None,
    reconnect: float = DEFAULT_RECONNECT,
    on_lost: Callable[[ConnectionLost], object] | None = None,
) -> Connecting:
    """Connect to a broker's frontend: ``conn = await connect(...)``, or
    ``async with connect(...) as conn:`` to have it closed at the end of the block.

    If no broker welcomes the client within ``connect_timeout`` seconds (default: ``timeout`` if
    given, else 5) it fails with ``Unreachable`` (a Timeout) saying what it saw at each endpoint; a broker
    that refuses its keys fails it at once with ``AuthenticationFailed``; an endpoint that is not
    one raises ``InvalidEndpoint`` (a ValueError) here. ``timeout`` (default 30) bounds each later
    call's wait for the broker's reply.

    ``endpoint`` may name several brokers (a list, or comma-separated): a primary and standbys that
    the daemons also register with. If the broker in use falls silent or restarts, the connection
    moves to the next that answers and resumes its session, for up to ``reconnect`` seconds
    (0: never; the connection is lost at once). ``session``: the ``session`` of an earlier
    connection, to resume it (its named runtimes, or all of them within the reclaim grace).

    With ``keypair`` and ``broker_key`` (see wire.auth) every socket of this client uses CURVE:
    the broker admits it only if its public key is authorized, and the daemons it uses admit it
    because the broker vouches for it.

    ``on_lost(exc)`` is called (and an error logged) when the connection is lost for good: no
    broker answered for ``reconnect`` seconds; its runtimes are lost with it. While it reconnects,
    calls fail with ``Unavailable`` (retryable) and a warning is logged.
    """
    endpoints = endpoints_of(endpoint)

    async def opening() -> Connection:
        calls = DEFAULT_TIMEOUT if timeout is None else timeout
        hello = connect_timeout if connect_timeout is not None else CONNECT_TIMEOUT if timeout is None else timeout
        conn = Connection(endpoints, calls, keypair, broker_key, session, reconnect, hello, on_lost)
        await conn._open()
        return conn

    return Connecting(opening)
