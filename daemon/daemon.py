"""The daemon: hosts runtimes for a broker, and owns the direct pipes and control socket to clients.

Links: a DEALER to the broker's backend (requests in, replies and guest callbacks out), a bound
ROUTER control socket (clients connect with their token as identity; cancels and pipe_ready),
and one bound PUSH or PULL per body stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import deno
import zmq

from daemon.pool import WarmPool, write_import_map
from daemon.runtime import Runtime
from wire import liveness, sockets
from wire import protocol as P
from wire.auth import Gate, KeyPair, connect_with
from wire.pipes import PipeReader, PipeWriter

log = logging.getLogger("daemon")

DEFAULT_MEMORY_MB = 128
MEMORY_CHECK_INTERVAL = 0.25
MIN_MEMORY_MB = 16
MAX_MEMORY_MB = 16384


class Daemon:
    def __init__(
        self,
        broker: str,
        *,
        max_runtimes: int = 64,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        control_port: int = 0,
        pool_size: int = 2,
        default_memory_mb: int = DEFAULT_MEMORY_MB,
        eval_timeout: float = 30.0,
        heartbeat: float = 1.0,
        liveness: int = 3,
        name: str | None = None,
        keys: KeyPair | None = None,
        broker_key: bytes | None = None,
    ) -> None:
        self.broker = broker
        self.keys = keys
        self.broker_key = broker_key
        self.gate: Gate | None = None
        self.max_runtimes = max_runtimes
        self.bind_host = bind_host
        self.advertise_host = advertise_host or bind_host
        self.control_port = control_port
        self.pool_size = pool_size
        self.default_memory_mb = default_memory_mb
        self.eval_timeout = eval_timeout
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self.ctx = sockets.context()
        self.runtimes: dict[str, Runtime] = {}
        self.streams: dict[bytes, tuple[Runtime, Any]] = {}
        self.callbacks: dict[int, tuple[Runtime, int]] = {}
        #: recently ended runtimes, so a call racing the broker's notice gets "runtime_lost"
        self.ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.control_endpoint = ""
        self._starting = 0
        self._ids = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._broker_sock: zmq.asyncio.Socket | None = None
        self._control: zmq.asyncio.Socket | None = None
        self._last_seen = 0.0
        self.registered = asyncio.Event()
        self.pool: WarmPool | None = None

    # ---- plumbing used by runtimes ---------------------------------------------------------------

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def to_broker(self, frames: list[Any]) -> None:
        sock = self._broker_sock
        if sock is None or sock.closed:
            return
        try:
            sockets.send_now(sock, frames)
        except zmq.ZMQError as exc:
            log.warning("message to the broker dropped: %s", exc)

    def reply(self, route: bytes, req_id: int, payload: list[Any] | None = None, **fields: Any) -> None:
        frames = P.encode("ok", payload or [], id=req_id, c=route, **fields)
        if len(frames[0]) > P.MAX_HEADER:  # e.g. a huge eval result: refuse it here, not at the broker
            message = f"the reply ({len(frames[0])} bytes of header) exceeds the {P.MAX_HEADER}-byte limit"
            frames = P.error_frames(P.E_TOO_LARGE, message, req_id, c=route)
        self.to_broker(frames)

    def reply_error(self, route: bytes, req_id: int, code: str, message: str, **fields: Any) -> None:
        self.to_broker(P.error_frames(code, message, req_id, c=route, **fields))

    def control_send(self, token: bytes, frames: list[Any]) -> None:
        """Send to a client's control socket; it may still be connecting, so retry briefly."""
        if self._control is None or self._control.closed:
            return
        try:
            sockets.send_now(self._control, [token, *frames])
        except zmq.ZMQError:
            self.spawn(self._control_retry(token, frames))

    async def _control_retry(self, token: bytes, frames: list[Any]) -> None:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            if self._control is None or self._control.closed:
                return
            try:
                sockets.send_now(self._control, [token, *frames])
                return
            except zmq.ZMQError:
                continue
        log.warning("control message to a client dropped: it never connected")

    def bind_reader(self, sid: bytes) -> tuple[PipeReader, str]:
        sock, ep = sockets.bind_pipe(self.ctx, zmq.PULL, self.bind_host, self.advertise_host, self.gate)
        return PipeReader(sock, sid), ep

    def bind_writer(self, sid: bytes) -> tuple[PipeWriter, str]:
        sock, ep = sockets.bind_pipe(self.ctx, zmq.PUSH, self.bind_host, self.advertise_host, self.gate)
        return PipeWriter(sock, sid), ep

    def register_stream(self, sid: bytes, runtime: Runtime, target: Any) -> None:
        self.streams[sid] = (runtime, target)

    def unregister_stream(self, sid: bytes) -> None:
        self.streams.pop(sid, None)

    def forget_runtime(self, runtime: Runtime) -> None:
        if self.runtimes.get(runtime.rt) is runtime:
            del self.runtimes[runtime.rt]
            if self.gate is not None and runtime.owner_key:
                self.gate.revoke(runtime.owner_key)
        self.ended[runtime.rt] = (runtime.lost_code or P.E_RUNTIME_LOST, runtime.lost_message)
        while len(self.ended) > 1000:
            self.ended.popitem(last=False)

    # ---- main ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; always leaves no guest process behind."""
        workdir = Path(tempfile.mkdtemp(prefix="sandbox-daemon-"))
        deno_bin = deno.find_deno_bin()
        try:
            import_map = workdir / "import_map.json"
            await asyncio.to_thread(write_import_map, deno_bin, import_map, workdir)
            self.pool = WarmPool(deno_bin, import_map, workdir, self.default_memory_mb, self.pool_size)
            self.pool.fill()
            if self.keys is not None:
                self.gate = Gate.for_context(self.ctx, self.keys)
            self._control = sockets.router(self.ctx)
            if self.gate is not None:
                self.gate.serve(self._control)
            self._control.bind(f"tcp://{self.bind_host}:{self.control_port or '*'}")
            port = self._control.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
            self.control_endpoint = f"tcp://{self.advertise_host}:{port}"
            log.info("daemon %s: control=%s broker=%s", self.name, self.control_endpoint, self.broker)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._control_loop(), name="daemon-control")
                tg.create_task(self._watch_memory(), name="daemon-memory")
                tg.create_task(self._broker_loop(), name="daemon-broker")
        finally:
            await self._shutdown()
            shutil.rmtree(workdir, ignore_errors=True)

    async def _shutdown(self) -> None:
        runtimes = list(self.runtimes.values())
        await asyncio.gather(*(r.guest.kill("the daemon is shutting down") for r in runtimes), return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in (self._control, self._broker_sock):
            if sock is not None:
                sock.close(0)
        if self.gate is not None:
            self.gate.stop()

    async def _watch_memory(self) -> None:
        """Stop runtimes whose process outgrows its memory limit outside the V8 heap."""
        while True:
            await asyncio.sleep(MEMORY_CHECK_INTERVAL)
            for runtime in list(self.runtimes.values()):
                guest = runtime.guest
                rss = guest.rss_mb()
                if rss > guest.rss_limit_mb and runtime.lost_code is None:
                    runtime.lose(
                        P.E_MEMORY_LIMIT,
                        f"the runtime exceeded its memory limit of {guest.memory_limit_mb} MB "
                        f"(process memory {rss:.0f} MB, allowed {guest.rss_limit_mb} MB) and was stopped",
                    )

    async def _broker_loop(self) -> None:
        """Register with the broker and serve it; start over if it falls silent."""
        while True:
            sock = sockets.dealer(self.ctx, identity=P.new_id())
            connect_with(sock, self.keys, self.broker_key)
            sock.connect(self.broker)
            self._broker_sock = sock
            self._last_seen = time.monotonic()
            try:
                self.to_broker(
                    P.encode(
                        "ready",
                        capacity=self.max_runtimes,
                        control=self.control_endpoint,
                        name=self.name,
                        key=self.keys.public.decode() if self.keys else None,
                        load=len(self.runtimes),
                    )
                )
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._heartbeat(sock))
                    await self._read_broker(sock)
            except* _BrokerLost:
                log.warning("broker %s is silent; disposing runtimes and registering again", self.broker)
            finally:
                self.registered.clear()
                sock.close(0)
                self._broker_sock = None
            await asyncio.gather(*(r.dispose() for r in list(self.runtimes.values())), return_exceptions=True)
            await asyncio.sleep(self.heartbeat)

    async def _heartbeat(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            stall = await liveness.tick(self.heartbeat)  # not `x += await`: that reads x before sleeping
            self._last_seen += stall
            if sockets.has_input(sock):
                self._last_seen = time.monotonic()
            if time.monotonic() - self._last_seen > self.heartbeat * self.liveness:
                raise _BrokerLost()
            self.to_broker(P.encode("hb", load=len(self.runtimes) + self._starting))

    async def _read_broker(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._last_seen = time.monotonic()
            try:
                msg = P.decode(frames, P.BROKER_TO_DAEMON)
            except P.ProtocolError as exc:
                log.warning("bad message from the broker: %s", exc.message)
                continue
            try:
                self._on_broker(msg)
            except Exception as exc:  # one bad message must never take the daemon down
                code, text = (exc.code, exc.message) if isinstance(exc, P.ProtocolError) else (P.E_INTERNAL, repr(exc))
                if code == P.E_INTERNAL:
                    log.exception("failed to handle %s from the broker", msg.type)
                else:
                    log.warning("rejected %s from the broker: %s", msg.type, text)
                route = msg.get("c")
                if isinstance(route, bytes) and msg.id is not None:
                    self.reply_error(route, msg.id, code, text)

    def _on_broker(self, msg: P.Message) -> None:
        t = msg.type
        if t == "hb":
            return
        if t == "welcome":
            self.registered.set()
            return
        if t in ("ok", "error"):
            fid = P.require(msg, "id", int)
            entry = self.callbacks.get(fid)
            if entry is not None:
                entry[0].fetch_reply(fid, msg)
            return
        rt_id = P.require(msg, "rt", str)
        if t == "dispose" and msg.get("c") is None:
            runtime = self.runtimes.get(rt_id)
            if runtime is not None:
                self.spawn(runtime.dispose())
            return
        route = P.require(msg, "c", bytes)
        req_id = P.require(msg, "id", int)
        if t == "create_runtime":
            self.spawn(self._create(msg, route, req_id, rt_id))
            return
        runtime = self.runtimes.get(rt_id)
        if runtime is None:
            if rt_id in self.ended:
                code, why = self.ended[rt_id]
                code = code if code == P.E_MEMORY_LIMIT else P.E_RUNTIME_LOST
                raise P.ProtocolError(code, f"runtime {rt_id} is gone: {why}")
            raise P.ProtocolError(P.E_UNKNOWN_RUNTIME, f"no runtime {rt_id} on this daemon")
        if t == "eval":
            if len(msg.payload) != 1:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "eval needs the source as one payload frame")
            try:
                code = bytes(msg.payload[0]).decode()
            except UnicodeDecodeError:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "the eval source is not UTF-8") from None
            timeout_ms = P.optional(msg, "timeout_ms", int)
            if timeout_ms is not None and timeout_ms <= 0:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "timeout_ms must be positive")
            runtime.eval(route, req_id, code, None if timeout_ms is None else timeout_ms / 1000)
        elif t == "dispatch":
            P.require(msg, "method", str)
            P.require(msg, "url", str)
            msg.header["headers"] = P.check_headers(msg.get("headers", []))
            sid = P.require(msg, "resp_sid", bytes)
            if len(sid) != 16:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "resp_sid must be 16 bytes")
            body = P.check_body(msg)
            body_sid = body.sid if isinstance(body, P.StreamRef) else None
            if sid in self.streams or body_sid in self.streams or body_sid == sid:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "stream id already in use")
            runtime.dispatch(msg)
        elif t == "stats":
            runtime.stats(route, req_id)
        elif t == "dispose":
            self.spawn(self._dispose(runtime, route, req_id))

    async def _create(self, msg: P.Message, route: bytes, req_id: int, rt_id: str) -> None:
        try:
            owner = P.require(msg, "owner", bytes)
            owner_key = P.optional(msg, "owner_key", bytes)
            limit = P.optional(msg, "memory_limit_mb", int, self.default_memory_mb)
            if not MIN_MEMORY_MB <= limit <= MAX_MEMORY_MB:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"memory_limit_mb must be {MIN_MEMORY_MB}-{MAX_MEMORY_MB}")
            eval_ms = P.optional(msg, "eval_timeout_ms", int)
            if eval_ms is not None and eval_ms <= 0:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "eval_timeout_ms must be positive")
            if rt_id in self.runtimes:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"runtime {rt_id} exists")
            if len(self.runtimes) + self._starting >= self.max_runtimes:
                raise P.ProtocolError(P.E_CAPACITY, f"daemon {self.name} is full ({self.max_runtimes} runtimes)")
        except P.ProtocolError as exc:
            self.reply_error(route, req_id, exc.code, exc.message)
            return
        self._starting += 1
        try:
            assert self.pool is not None
            guest = await self.pool.claim(limit)
        except Exception as exc:
            self.reply_error(route, req_id, P.E_INTERNAL, f"could not start a runtime: {exc}")
            return
        finally:
            self._starting -= 1
        runtime = Runtime(self, rt_id, owner, guest, self.eval_timeout if eval_ms is None else eval_ms / 1000)
        self.runtimes[rt_id] = runtime
        if self.gate is not None and owner_key:
            runtime.owner_key = owner_key
            self.gate.allow(owner_key)
        guest.send({"op": "init", "fetch": bool(msg.get("fetch")), "console": bool(msg.get("console"))})
        self.reply(route, req_id, rt=rt_id, pid=guest.pid)

    async def _dispose(self, runtime: Runtime, route: bytes, req_id: int) -> None:
        await runtime.dispose()
        self.reply(route, req_id, rt=runtime.rt)

    async def _control_loop(self) -> None:
        assert self._control is not None
        sock = self._control
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue
            token = frames[0]
            try:
                msg = P.decode(frames[1:], P.CONTROL_TO_DAEMON)
                if msg.type == "cancel":
                    sid = P.require(msg, "sid", bytes)
                    entry = self.streams.get(sid)
                    if entry is not None and entry[0].owner == token:
                        entry[0].cancel_stream(entry[1])
            except P.ProtocolError as exc:
                log.warning("bad control message: %s", exc.message)
            except Exception:
                log.exception("failed to handle a control message")


class _BrokerLost(Exception):
    pass
