"""The daemon: hosts runtimes for a broker, and owns the direct pipes and control socket to clients.

Links: a DEALER to the broker's backend (requests in, replies and guest callbacks out), a bound
ROUTER control socket (clients connect with their token as identity; cancels and pipe_ready),
and one bound PUSH or PULL per body stream. Every message is a wire.messages record, parsed once
on arrival. The daemon's scope owns every task it starts (runtimes, creates, disposes); its
registries map wire sids and callback ids to objects that act on themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deno
import zmq

from daemon import memory as heap
from daemon import spawner
from daemon.limits import CPU_EVERY, WATCH_INTERVAL, MemoryCgroups, MemoryWatch, TurnWatch
from daemon.modules import GuestModule
from daemon.pool import MAX_STARTING, START_QUEUE_TIMEOUT, WarmPool, write_import_map
from daemon.ports import OkReply
from daemon.registry import Registry, Seat
from daemon.runtime import Runtime
from wire import liveness, sockets
from wire import messages as M
from wire import protocol as P
from wire.auth import Gate, KeyPair, connect_with
from wire.budget import Budget
from wire.liveness import LIVENESS
from wire.metrics import Observer
from wire.pipes import PipeCount, PipeReader, PipeWriter
from wire.ratelog import RateLog
from wire.schema import Record, StreamRef, route
from wire.scope import Scope, ScopeClosed
from wire.tools import check_names as tool_names

log = logging.getLogger("sandbox_mesh.daemon")
_control_log = RateLog(log)  # refused control messages: a few lines per second, whatever arrives

DEFAULT_MEMORY_MB = 128
MIN_MEMORY_MB = 16
MAX_MEMORY_MB = 16384
#: Defaults of the time limits (seconds) and of their operator maximums (``--max-...``).
DEFAULT_CPU_LIMIT = 5.0
DEFAULT_REQUEST_CPU = 30.0
MAX_CPU_LIMIT = 60.0
MAX_EVAL_TIMEOUT = 300.0
_daemons = itertools.count(1)
#: What a client asks of a daemon (through the broker, with its route ``c``): answered, even with an error.
_REQUESTS = (M.CreateRuntime, M.Eval, M.Dispatch, M.Stats, M.Dispose)
#: How long a stopping daemon lets its last messages to the broker (runtime_lost) flush (ms).
SHUTDOWN_LINGER_MS = 1000
#: Default of ``--orphan-grace``: how long runtimes live on while no broker is reachable (seconds),
#: for one to come back (restart, failover) and their clients to resume their sessions.
ORPHAN_GRACE = 60.0
#: Control messages of one peer per second that are refused or name no registered stream; past
#: it, the peer's control messages are dropped unread until the second ends.
CONTROL_REFUSAL_BUDGET = 1000
#: Default cap on a daemon's open body pipes, per runtime it may host (``--max-streams``): bounds
#: the memory and descriptors streams take (each holds up to 2 x PIPE_HWM chunks in flight).
STREAMS_PER_RUNTIME = 32
#: Descriptors a hosted runtime holds in the daemon (its process's stdio, pidfd, cgroup files).
FDS_PER_RUNTIME = 8


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
        max_starting: int = MAX_STARTING,
        start_queue_timeout: float = START_QUEUE_TIMEOUT,
        default_memory_mb: int = DEFAULT_MEMORY_MB,
        eval_timeout: float = 30.0,
        max_memory_mb: int = MAX_MEMORY_MB,
        max_eval_timeout: float = MAX_EVAL_TIMEOUT,
        cpu_limit: float = DEFAULT_CPU_LIMIT,
        request_cpu: float = DEFAULT_REQUEST_CPU,
        max_cpu_limit: float = MAX_CPU_LIMIT,
        cgroups: bool = True,
        heartbeat: float = 1.0,
        liveness: int = LIVENESS,
        name: str | None = None,
        keys: KeyPair | None = None,
        broker_key: bytes | None = None,
        orphan_grace: float = ORPHAN_GRACE,
        max_streams: int | None = None,
    ) -> None:
        #: the brokers to register with, in order of preference (a primary and standbys)
        self.brokers = [b.strip() for b in broker.split(",") if b.strip()]
        if not self.brokers:
            raise ValueError("no broker endpoint given")
        self.broker = self.brokers[0]
        self.orphan_grace = orphan_grace
        self.keys = keys
        self.broker_key = broker_key
        self.gate: Gate | None = None
        if not 0 <= max_runtimes <= P.MAX_RUNTIMES_HELD:
            raise ValueError(f"max_runtimes must be 0-{P.MAX_RUNTIMES_HELD} (all of them are listed in `ready`)")
        self.max_runtimes = max_runtimes
        self.bind_host = bind_host
        self.advertise_host = advertise_host or bind_host
        self.control_port = control_port
        self.pool_size = pool_size
        self.max_starting = max_starting
        self.start_queue_timeout = start_queue_timeout
        self.default_memory_mb = min(default_memory_mb, max_memory_mb)  # the defaults obey the maximums too
        self.eval_timeout = min(eval_timeout, max_eval_timeout)
        self.max_memory_mb = max_memory_mb
        self.max_eval_timeout = max_eval_timeout
        self.cpu_limit = min(cpu_limit, max_cpu_limit)
        self.request_cpu = min(request_cpu, max_cpu_limit)
        self.max_cpu_limit = max_cpu_limit
        self.use_cgroups = cgroups
        self.cgroups: MemoryCgroups | None = None
        #: runtime id -> (its CPU watch, its memory watch): daemon/limits.py
        self._watches: dict[str, tuple[TurnWatch, MemoryWatch]] = {}
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        heap.limit_arenas()  # before the context starts libzmq's threads
        self.ctx = sockets.context()
        #: open body pipes at most (the operator's cap; by default sized from the capacity)
        self.max_streams = STREAMS_PER_RUNTIME * max(1, max_runtimes) if max_streams is None else max_streams
        #: the body pipes open: one past ``stream_room`` fails only the call that needed it, with ``busy``
        self.pipes = PipeCount(lambda why: P.ProtocolError(P.E_BUSY, f"daemon {self.name} {why}; retry later"),
                               self.stream_room)  # fmt: skip
        self._trim = heap.Trimmer()
        self.runtimes: dict[str, Runtime] = {}
        #: what a broker needs to know of each runtime to route to it and reclaim it (sent in `ready`)
        self.held: dict[str, M.Held] = {}
        self._reregister = False  # the broker said it does not know us: register again now
        self._link = 0  # which registration is current: a create that outlives its link is undone
        self.registry = Registry()  # streams clients may cancel, fetch callbacks awaiting answers
        #: recently ended runtimes, so a call racing the broker's notice gets "runtime_lost"
        self.ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.control_endpoint = ""
        self.scope = Scope("daemon")  # runtimes, creates, disposes, control retries
        self._starting = 0
        self._broker_sock: zmq.asyncio.Socket | None = None
        self._control: zmq.asyncio.Socket | None = None
        self._last_seen = 0.0
        self.registered = asyncio.Event()
        self.pool: WarmPool | None = None
        #: counts the messages of the broker link for the metrics (daemon/metrics.py), if served
        self.observer: Observer | None = None

    # ---- links (DaemonLinks: runtimes use them through their Seat) ---------------------------------

    def send(self, msg: Record) -> None:
        """Send to the broker (dropped while there is no broker link)."""
        self._to_broker(msg.frames())

    def _to_broker(self, frames: list[Any]) -> None:
        if self.observer is not None:
            self.observer.sent(frames)
        sock = self._broker_sock
        if sock is None or sock.closed:
            return
        try:
            sockets.send_now(sock, frames)
        except zmq.ZMQError as exc:
            log.warning("message to the broker dropped: %s", exc)

    def reply(self, msg: OkReply) -> None:
        frames = msg.frames()
        if len(frames[0]) > P.MAX_HEADER:  # e.g. a huge eval result: refuse it here, not at the broker
            message = f"the reply ({len(frames[0])} bytes of header) exceeds the {P.MAX_HEADER}-byte limit"
            frames = M.error(P.E_TOO_LARGE, message, msg.id, c=msg.c).frames()
        self._to_broker(frames)

    def control_send(self, token: bytes, msg: Record) -> None:
        """Send to a client's control socket; it may still be connecting, so retry briefly."""
        if self._control is None or self._control.closed:
            return
        frames = [token, *msg.frames()]
        try:
            sockets.send_now(self._control, frames)
        except zmq.ZMQError:
            if not self.scope.closed:
                self.scope.spawn(self._control_retry(frames), name="daemon-control-retry")

    async def _control_retry(self, frames: list[Any]) -> None:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            if self._control is None or self._control.closed:
                return
            try:
                sockets.send_now(self._control, frames)
                return
            except zmq.ZMQError:
                continue
        log.warning("control message to a client dropped: it never connected")

    def bind_reader(self, sid: bytes, owner_key: bytes | None) -> tuple[PipeReader, str]:
        sock, ep = self._bind_pipe(zmq.PULL, sid, owner_key)
        return PipeReader(sock, sid), ep

    def bind_writer(self, sid: bytes, owner_key: bytes | None) -> tuple[PipeWriter, str]:
        sock, ep = self._bind_pipe(zmq.PUSH, sid, owner_key)
        return PipeWriter(sock, sid), ep

    def _bind_pipe(self, kind: int, sid: bytes, owner_key: bytes | None) -> tuple[zmq.asyncio.Socket, str]:
        """A pipe only the runtime's owner can connect to (its key with CURVE, else the sid as secret).

        Past ``stream_room``, or when the system refuses a socket anyway, the one call that asked
        gets ``busy`` (a P.ProtocolError raised here): nothing else is touched."""
        gate = self.gate
        assert gate is not None, "pipes are bound only while the daemon runs"

        def guard(sock: zmq.Socket) -> None:
            gate.serve_pipe(sock, sid, owner_key)

        sock = self.pipes.open(lambda: sockets.bind_pipe(self.ctx, kind, self.bind_host, guard))
        return sock, sockets.advertised(sock, self.advertise_host)

    def stream_room(self) -> tuple[int, str]:
        """Pipes that may be open now, and why that many: the operator's cap, or fewer if the
        descriptor limit (read each time) leaves less room after what the runtimes hold. The
        reserve lets libzmq still accept the peer's connection to every pipe bound."""
        fds = sockets.pipe_room(reserved=FDS_PER_RUNTIME * len(self.runtimes))
        if self.max_streams <= fds:
            return self.max_streams, f"its limit (--max-streams {self.max_streams})"
        return fds, f"as many as its {sockets.fd_limit()} file descriptors allow"

    # ---- main ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; always leaves no guest process behind."""
        workdir = Path(tempfile.mkdtemp(prefix="sandbox-daemon-"))
        deno_bin = deno.find_deno_bin()
        try:
            import_map = workdir / "import_map.json"
            await asyncio.to_thread(write_import_map, deno_bin, import_map, workdir)
            if self.use_cgroups:
                self.cgroups = await asyncio.to_thread(MemoryCgroups.find, f"{next(_daemons)}-{os.getpid()}")
            self.pool = WarmPool(
                deno_bin, import_map, workdir, self.default_memory_mb, self.pool_size, self.cgroups,
                self.max_starting, self.start_queue_timeout,
            )  # fmt: skip
            self.pool.fill()
            self.gate = Gate.for_context(self.ctx, self.keys)  # without keys it guards the pipes only
            self._control = sockets.router(self.ctx)
            if self.keys is not None:
                self.gate.serve(self._control)
            self._control.bind(f"tcp://{self.bind_host}:{self.control_port or '*'}")
            port = self._control.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
            self.control_endpoint = f"tcp://{self.advertise_host}:{port}"
            log.info("daemon %s: control=%s broker=%s", self.name, self.control_endpoint, self.broker)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._control_loop(), name="daemon-control")
                tg.create_task(self._watch(), name="daemon-limits")
                tg.create_task(self._broker_loop(), name="daemon-broker")
        finally:
            await self._shutdown()
            shutil.rmtree(workdir, ignore_errors=True)

    async def _shutdown(self) -> None:
        """Stop every runtime and wait for them, then everything else the daemon started."""
        runtimes = list(self.runtimes.values())
        for runtime in runtimes:
            runtime.stop("the daemon is shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(r.finished.wait() for r in runtimes))
        if self.pool is not None:
            await self.pool.close()
        spawner.shutdown()  # after every guest is gone: the helper that started them goes too
        await self.scope.aclose()
        if self._control is not None:
            self._control.close(0)
        if self._broker_sock is not None:
            self._broker_sock.close(SHUTDOWN_LINGER_MS)  # the runtime_lost notices go out first
        if self.gate is not None:
            self.gate.stop()
        if self.cgroups is not None:
            self.cgroups.close()

    async def _watch(self) -> None:
        """Enforce the limits the guest cannot see from inside: CPU per turn and per request, and
        process memory where no cgroup caps it (daemon/limits.py)."""
        for tick in itertools.count():
            await asyncio.sleep(WATCH_INTERVAL)
            cpu_due = tick % CPU_EVERY == 0
            if tick % CPU_EVERY == 1 and self._trim.due(self.pipes.count()):
                await asyncio.to_thread(heap.trim)
            for rt, runtime in list(self.runtimes.items()):
                watches = self._watches.get(rt)
                if watches is None or runtime.lost_code is not None:
                    continue
                turns, memory = watches
                guest = runtime.guest
                if memory.due():
                    rss = guest.rss_mb()
                    memory.sampled(rss, guest.rss_limit_mb)
                    if rss > guest.rss_limit_mb:
                        runtime.lose(
                            P.E_MEMORY_LIMIT,
                            f"the runtime exceeded its memory limit of {guest.memory_limit_mb} MB "
                            f"(process memory {rss:.0f} MB, allowed {guest.rss_limit_mb} MB) and was stopped",
                        )
                        continue
                if not cpu_due:
                    continue
                cpu = guest.cpu_seconds()
                if cpu is None:
                    continue
                ping, why = turns.tick(cpu, len(runtime.evals) > 0, list(runtime.dispatches.pending))
                if why is not None:
                    log.warning("runtime %s: %s; stopping it", rt, why)
                    runtime.lose(P.E_CPU_LIMIT, f"{why}; the runtime was stopped")
                elif ping is not None:
                    guest.ping(ping)

    async def _broker_loop(self) -> None:
        """Register with a broker and serve it; if it falls silent, register with the next one (or
        the same, restarted) and list the runtimes we host: they live on, and their clients resume
        their sessions through whichever broker they reach (protocol.md 3.3, Recovery). Runtimes that no
        broker has claimed for ``orphan_grace`` seconds are disposed."""
        orphaned_since: float | None = None  # since when no broker has had us registered
        for attempt in itertools.count():
            if attempt and not self._reregister:  # silence: try the next broker (or the same, alone)
                self.broker = self.brokers[attempt % len(self.brokers)]
            self._reregister = False
            self._link = attempt
            sock = sockets.dealer(self.ctx, identity=P.new_id())
            connect_with(sock, self.keys, self.broker_key)
            sock.connect(self.broker)
            self._broker_sock = sock
            self._last_seen = time.monotonic()
            try:
                self.send(
                    M.Ready(
                        capacity=self.max_runtimes,
                        control=self.control_endpoint,
                        name=self.name,
                        key=self.keys.public.decode() if self.keys else None,
                        load=len(self.runtimes),
                        runtimes=tuple(self.held[rt] for rt in self.runtimes if rt in self.held),
                    )
                )
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._heartbeat(sock))
                    await self._read_broker(sock)
            except* _BrokerLost:
                pass
            # (no finally: when the daemon stops, _shutdown still reports the runtimes' ends on this
            # socket, then closes it)
            if self.registered.is_set():
                orphaned_since = time.monotonic()
                if not self._reregister:
                    log.warning("broker %s is silent; registering again (runtimes kept)", self.broker)
            elif not self._reregister:
                log.warning("broker %s is silent: no answer to our registration; trying again", self.broker)
            self.registered.clear()
            sock.close(0)
            self._broker_sock = None
            self.registry.refuse_callbacks("the broker is unreachable")
            if orphaned_since is not None and time.monotonic() - orphaned_since > self.orphan_grace:
                orphaned_since = None
                if self.runtimes:
                    log.warning("no broker for %gs: disposing %d runtimes", self.orphan_grace, len(self.runtimes))
                    await asyncio.gather(*(r.dispose() for r in list(self.runtimes.values())), return_exceptions=True)
            if not self._reregister:
                await asyncio.sleep(self.heartbeat / len(self.brokers))

    async def _heartbeat(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            stall = await liveness.tick(self.heartbeat)
            if stall > self.heartbeat / 4:  # the loop was blocked or starved: worth knowing why
                log.info("event loop stalled: heartbeat %.3fs late", stall)
            self._last_seen = liveness.forgive(self._last_seen, time.monotonic(), stall)
            if sockets.has_input(sock):
                self._last_seen = time.monotonic()
            if time.monotonic() - self._last_seen > self.heartbeat * self.liveness:
                raise _BrokerLost()
            warm = self.pool.warm() if self.pool is not None else 0
            self.send(M.Heartbeat(load=len(self.runtimes) + self._starting, pipes=self.pipes.count(), warm=warm))

    async def _read_broker(self, sock: zmq.asyncio.Socket) -> None:
        reader = sockets.Reader(sock)  # bounded batches: guests' frames, pipes and timers get their turns
        while True:
            for frames in await reader.batch():
                self._last_seen = time.monotonic()
                self._from_broker(frames)
            if self._reregister:
                raise _BrokerLost()

    def _from_broker(self, frames: list[Any]) -> None:
        if self.observer is not None:
            self.observer.received(frames)
        try:
            msg = M.BROKER_TO_DAEMON.parse(frames)
        except P.ProtocolError as exc:
            self._refuse(frames, exc)
            return
        try:
            self.ON_BROKER[msg.T](self, msg)
        except Exception as exc:  # one bad message must never take the daemon down
            code, text = (exc.code, exc.message) if isinstance(exc, P.ProtocolError) else (P.E_INTERNAL, repr(exc))
            if code == P.E_INTERNAL:
                log.exception("failed to handle %s from the broker", msg.T)
            else:
                log.warning("rejected %s from the broker: %s", msg.T, text)
            if isinstance(msg, _REQUESTS) and msg.c is not None and msg.id is not None:
                self.send(M.error(code, text, msg.id, c=msg.c))

    def _refuse(self, frames: list[Any], exc: P.ProtocolError) -> None:
        """A message from the broker that does not parse: answer it if it says whom to answer."""
        r = route(frames)
        t, mid = r.t, r.id
        waiter = self.registry.take_callback(mid) if t in ("ok", "error") and mid is not None else None
        if waiter is not None:  # the client's answer to a fetch callback: that fetch fails
            waiter.refuse(f"invalid response from the fetch callback: {exc.message}" if t == "ok" else "fetch failed")
            return
        if t not in M.BROKER_TO_DAEMON.types:
            log.warning("bad message from the broker: %s", exc.message)
            return
        log.warning("rejected %s from the broker: %s", t, exc.message)
        if r.c is not None and mid is not None:
            self.send(M.error(exc.code, exc.message, mid, c=r.c))

    # ---- broker -> daemon, one handler per message type -------------------------------------------

    def _on_welcome(self, msg: M.Welcome) -> None:
        self.registered.set()

    def _on_heartbeat(self, msg: M.Heartbeat) -> None:
        pass

    def _on_fetch_answer(self, msg: M.FetchOk | M.ToolResult) -> None:
        waiter = self.registry.take_callback(msg.id)
        if isinstance(waiter, GuestModule):  # a module's answer is a module_ok
            waiter.refuse("the host answered the import with something else than a module")
        elif waiter is not None:
            waiter.answer(msg)

    def _on_module_answer(self, msg: M.ModuleOk) -> None:
        waiter = self.registry.take_callback(msg.id)
        if waiter is not None:
            waiter.answer(msg)  # a fetch waiting under this id refuses it (not a FetchOk)

    def _on_error(self, msg: M.ErrorReply) -> None:
        """Without an id: the broker does not know this daemon; else it refused a fetch callback."""
        if msg.id is None:
            if msg.code == P.E_UNKNOWN_DAEMON:  # this broker restarted, or dropped us after a pause
                log.warning("broker %s does not know this daemon: registering again", self.broker)
                self._reregister = True
            return
        waiter = self.registry.take_callback(msg.id) if msg.id is not None else None
        if waiter is not None:
            waiter.refuse(msg.message, msg)

    def _runtime(self, rt_id: str) -> Runtime:
        runtime = self.runtimes.get(rt_id)
        if runtime is not None:
            return runtime
        if rt_id in self.ended:
            code, why = self.ended[rt_id]
            code = code if code in P.LIMIT_CODES else P.E_RUNTIME_LOST
            raise P.ProtocolError(code, f"runtime {rt_id} is gone: {why}")
        raise P.ProtocolError(P.E_UNKNOWN_RUNTIME, f"no runtime {rt_id} on this daemon")

    def _on_create(self, msg: M.CreateRuntime) -> None:
        self.scope.spawn(self._create(msg), name=f"create-{msg.rt}")

    def _on_eval(self, msg: M.Eval) -> None:
        assert msg.c is not None  # required on this link
        self._check_ms("timeout_ms", msg.timeout_ms, self.max_eval_timeout)
        self._runtime(msg.rt).eval(msg, msg.c)

    def _on_dispatch(self, msg: M.Dispatch) -> None:
        assert msg.c is not None
        runtime = self._runtime(msg.rt)
        body_sid = msg.body.sid if isinstance(msg.body, StreamRef) else None
        streams = self.registry.streams
        if msg.resp_sid in streams or body_sid in streams or body_sid == msg.resp_sid:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "stream id already in use")
        runtime.dispatch(msg, msg.c)

    def _on_stats(self, msg: M.Stats) -> None:
        assert msg.c is not None
        self._runtime(msg.rt).stats(msg, msg.c)

    def _on_dispose(self, msg: M.Dispose) -> None:
        if msg.c is None:  # the owner is gone: dispose without a reply
            runtime = self.runtimes.get(msg.rt)
            if runtime is not None:
                runtime.dispose_soon()
            return
        if msg.id is None:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "'dispose' needs field 'id'")
        self.scope.spawn(self._dispose(self._runtime(msg.rt), msg.id, msg.c), name=f"dispose-{msg.rt}")

    ON_BROKER: dict[str, Callable[[Daemon, Any], None]] = {
        M.Welcome.T: _on_welcome,
        M.Heartbeat.T: _on_heartbeat,
        M.FetchOk.T: _on_fetch_answer,
        M.ToolResult.T: _on_fetch_answer,  # a callback's answer, each waiter checks it is its own
        M.ModuleOk.T: _on_module_answer,
        M.ErrorReply.T: _on_error,
        M.CreateRuntime.T: _on_create,
        M.Eval.T: _on_eval,
        M.Dispatch.T: _on_dispatch,
        M.Stats.T: _on_stats,
        M.Dispose.T: _on_dispose,
    }

    # ---- runtimes --------------------------------------------------------------------------------

    async def _create(self, msg: M.CreateRuntime) -> None:
        assert msg.c is not None and msg.rt is not None and msg.owner is not None  # required on this link
        route, rt_id = msg.c, msg.rt
        try:
            limit = self.default_memory_mb if msg.memory_limit_mb is None else msg.memory_limit_mb
            if not MIN_MEMORY_MB <= limit <= self.max_memory_mb:
                raise P.ProtocolError(
                    P.E_BAD_MESSAGE, f"memory_limit_mb must be {MIN_MEMORY_MB}-{self.max_memory_mb} on this daemon"
                )
            self._check_ms("eval_timeout_ms", msg.eval_timeout_ms, self.max_eval_timeout)
            self._check_ms("cpu_limit_ms", msg.cpu_limit_ms, self.max_cpu_limit)
            self._check_ms("request_cpu_ms", msg.request_cpu_ms, self.max_cpu_limit)
            if rt_id in self.runtimes:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"runtime {rt_id} exists")
            try:  # the client checked them too: a name the guest would not see as given is refused
                tool_names([*msg.tools, *msg.stream_tools])
            except ValueError as exc:
                raise P.ProtocolError(P.E_BAD_MESSAGE, str(exc)) from None
            if len(self.runtimes) + self._starting >= self.max_runtimes:
                raise P.ProtocolError(P.E_CAPACITY, f"daemon {self.name} is full ({self.max_runtimes} runtimes)")
        except P.ProtocolError as exc:
            self.send(M.error(exc.code, exc.message, msg.id, c=route))
            return
        link = self._link
        self._starting += 1
        try:
            assert self.pool is not None
            guest = await self.pool.claim(limit)
        except P.ProtocolError as exc:  # busy: no start slot came free in time
            self.send(M.error(exc.code, exc.message, msg.id, c=route))
            return
        except Exception as exc:
            self.send(M.error(P.E_INTERNAL, f"could not start a runtime: {exc}", msg.id, c=route))
            return
        finally:
            self._starting -= 1
        if link != self._link:  # registered again meanwhile: no broker knows of this create any more
            await guest.kill("its broker link was replaced while it started")
            return
        seat = Seat(self, self.registry, rt_id, msg.owner, msg.owner_key if self.gate is not None else None)
        turns = TurnWatch(
            self.cpu_limit if msg.cpu_limit_ms is None else msg.cpu_limit_ms / 1000,
            self.request_cpu if msg.request_cpu_ms is None else msg.request_cpu_ms / 1000,
        )
        guest.on_pong = turns.pong
        eval_timeout = self.eval_timeout if msg.eval_timeout_ms is None else msg.eval_timeout_ms / 1000
        runtime = Runtime(
            seat,
            rt_id,
            guest,
            eval_timeout,
            fetch=msg.fetch,
            console=msg.console,
            tools=(msg.tools, msg.stream_tools),
            modules=msg.modules,
        )
        try:
            self.scope.spawn(self._host(runtime, seat), name=f"runtime-{rt_id}")
        except ScopeClosed:  # the daemon is shutting down
            await guest.kill("the daemon is shutting down")
            return
        self.runtimes[rt_id] = runtime
        self.held[rt_id] = M.Held(rt_id, msg.owner, seat.owner_key, msg.name, msg.keep_alive_ms)
        self._watches[rt_id] = (turns, MemoryWatch())
        if self.gate is not None and seat.owner_key:
            self.gate.allow(seat.owner_key)
        self.reply(M.CreateOk(id=msg.id, c=route, rt=rt_id, pid=guest.pid))

    async def _host(self, runtime: Runtime, seat: Seat) -> None:
        """A runtime's life in the daemon: from its creation until it has released everything."""
        try:
            await runtime.run()
        finally:
            if self.runtimes.get(runtime.rt) is runtime:
                del self.runtimes[runtime.rt]
                self.held.pop(runtime.rt, None)
                self._watches.pop(runtime.rt, None)
                if self.gate is not None and seat.owner_key:
                    self.gate.revoke(seat.owner_key)
            self.ended[runtime.rt] = (runtime.lost_code or P.E_RUNTIME_LOST, runtime.lost_message)
            while len(self.ended) > 1000:
                self.ended.popitem(last=False)

    @staticmethod
    def _check_ms(name: str, value: int | None, maximum: float) -> None:
        """A time limit a client asks for: positive and within the operator's maximum."""
        if value is not None and not 0 < value <= maximum * 1000:
            raise P.ProtocolError(P.E_BAD_MESSAGE, f"{name} must be 1-{maximum * 1000:.0f} on this daemon")

    async def _dispose(self, runtime: Runtime, req_id: int, route: bytes) -> None:
        await runtime.dispose()
        self.reply(M.DisposeOk(id=req_id, c=route, rt=runtime.rt))

    async def _control_loop(self) -> None:
        """Cancels from clients. Anyone may connect here (without CURVE), so a flood must neither
        starve the daemon's other work (the loop yields between batches of READ_BATCH messages) nor
        fill its log; past CONTROL_REFUSAL_BUDGET, a peer's messages are dropped unread."""
        assert self._control is not None
        sock = self._control
        reader = sockets.Reader(sock, copy=True)
        budget = Budget(CONTROL_REFUSAL_BUDGET)  # per identity: refused or unknown-stream messages
        while True:
            batch = await reader.batch()
            now, drops = time.monotonic(), budget.drops
            for _, dropped in budget.expire(now):
                _control_log.warning("control floods", "dropped %d control messages of a flooding peer", dropped)
            for frames in batch:
                token = frames[0]
                if budget.over(token, now):
                    continue
                try:
                    msg = M.CONTROL_TO_DAEMON.parse(frames[1:])
                    if isinstance(msg, M.Cancel):
                        if msg.sid not in self.registry.streams:
                            budget.strike(token, now)
                        self.registry.cancel(msg.sid, token)
                except P.ProtocolError as exc:
                    budget.strike(token, now)
                    _control_log.warning("bad control messages", "bad control message: %s", exc.message)
                except Exception:
                    log.exception("failed to handle a control message")
            if 2 * (budget.drops - drops) >= reader.size:
                reader.flooded()


class _BrokerLost(Exception):
    pass
