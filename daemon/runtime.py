"""One runtime as the daemon sees it: a guest process plus every exchange in flight with it.

The broker-facing side (eval, dispatch, stats: records the daemon has validated) and the
guest-facing side (frames on the stdio channel, each parsed once into a wire.guest record and
handed to the handler its op names in ``ON_GUEST``) meet here. Dispatches and guest fetches are
exchanges of their own (daemon/dispatches.py, daemon/fetches.py); streams are in the runtime's
``StreamTable``. A runtime can name only its own exchanges and streams, because every id it uses
is looked up in its own tables, and it reaches the daemon only through its ``RuntimeHost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from daemon import values
from daemon.dispatches import Dispatches
from daemon.fetches import Fetches
from daemon.guest import GuestProcess
from daemon.modules import Modules, lexer_source
from daemon.pending import Call, Pending
from daemon.ports import RuntimeHost
from daemon.streams import StreamTable
from daemon.tools import Tools
from wire import guest as G
from wire import messages as M
from wire import protocol as P
from wire import values as V
from wire.channel import GuestProtocolError
from wire.scope import Scope

log = logging.getLogger("sandbox_mesh.daemon.runtime")

#: Console entries per second and runtime the daemon forwards, whatever the guest did to the
#: bootstrap's own limit: the daemon->broker link is shared by every runtime.
CONSOLE_RATE = 2 * G.CONSOLE_RATE
#: How long a stats call waits for the guest's own counts.
STATS_TIMEOUT = 10.0


class Runtime:
    def __init__(
        self,
        host: RuntimeHost,
        rt: str,
        guest: GuestProcess,
        eval_timeout: float,
        *,
        fetch: bool,
        console: bool,
        tools: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
        modules: bool = False,
    ) -> None:
        self.host = host
        self.rt = rt
        self.guest = guest
        self.eval_timeout = eval_timeout
        self._next = 0
        self.streams = StreamTable(host, guest, Scope(f"runtime {rt}"))
        self.evals: Pending[int, Call] = Pending("eval")
        self.stat_calls: Pending[int, Call] = Pending("stats")
        self.dispatches = Dispatches(host, guest, self.streams, self._gid)
        self.fetches = Fetches(host, guest, self.streams, self._gid, rt)
        self.tools = Tools(host, guest, self.streams, self._gid, rt, frozenset(tools[0] + tools[1]))
        self.modules = Modules(host, guest, rt)
        self._console_window = 0.0
        self._console_count = 0
        self._console_dropped = 0
        self.disposing = False
        self.lost_code: str | None = None
        self.lost_message = ""
        self._stopping = asyncio.Event()
        self._stop_reason = ""
        self.finished = asyncio.Event()
        guest.on_frame = self._on_frame
        guest.on_stop = self.stop
        if guest.exit_reason is not None:  # it stopped between its claim and now
            self.stop(guest.exit_reason)
        lexer = lexer_source() if modules else ""  # the guest's import lexer, only where it loads modules
        guest.send(
            G.Init(fetch=fetch, console=console, tools=tools[0], stream_tools=tools[1], modules=modules, lexer=lexer)
        )

    def _gid(self) -> int:
        """The next id of an exchange or inbound stream (one counter: protocol.md 7.3)."""
        self._next += 1
        return self._next

    # ---- broker -> runtime ---------------------------------------------------------------------

    def ensure_alive(self) -> None:
        """Refuse new work once the runtime is going away (its process may already be gone)."""
        if self.lost_code is not None or self.disposing or self._stopping.is_set() or not self.guest.alive:
            code = self.lost_code if self.lost_code in P.LIMIT_CODES else P.E_RUNTIME_LOST
            raise P.ProtocolError(code, f"runtime {self.rt} is gone: {self.lost_message or 'it stopped'}")

    def admit(self) -> None:
        """Refuse a new call (``busy``) while the runtime has MAX_PENDING_CALLS pending or its guest
        has MAX_STDIN_QUEUE bytes it has not read: a wedged guest must not make the daemon buffer
        without bound (what is queued for it counts toward its limits, not the daemon's)."""
        self.ensure_alive()
        calls = len(self.evals) + len(self.dispatches) + len(self.stat_calls)
        if calls >= G.MAX_PENDING_CALLS:
            limit = G.MAX_PENDING_CALLS
            raise P.ProtocolError(P.E_BUSY, f"runtime {self.rt} has {calls} calls pending; the limit is {limit}")
        queued = self.guest.queued()
        if queued >= G.MAX_STDIN_QUEUE:
            raise P.ProtocolError(
                P.E_BUSY,
                f"runtime {self.rt} is not reading its input: {queued / (1 << 20):.1f} MiB wait for it; "
                f"the limit is {G.MAX_STDIN_QUEUE >> 20} MiB",
            )

    def eval(self, msg: M.Eval, route: bytes) -> None:
        try:
            code = bytes(msg.source).decode()
        except UnicodeDecodeError:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "the eval source is not UTF-8") from None
        if msg.timeout_ms is not None and msg.timeout_ms <= 0:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "timeout_ms must be positive")
        self.admit()
        limit = self.eval_timeout if msg.timeout_ms is None else msg.timeout_ms / 1000
        gid = self._gid()
        self.evals.add(gid, Call(route, msg.id), limit, lambda call: self._eval_timed_out(call, limit))
        self.guest.send(G.Eval(id=gid, code=code, filename=values.clean(msg.filename or "")))

    def _eval_timed_out(self, call: Call, limit: float) -> None:
        message = f"eval did not finish within {limit:g}s; the runtime was stopped"
        self.host.to_broker(call.error(P.E_TIMEOUT, message))
        self.lose(P.E_TIMEOUT, message)

    def dispatch(self, msg: M.Dispatch, route: bytes) -> None:
        self.admit()
        self.dispatches.start(msg, route)

    def stats(self, msg: M.Stats, route: bytes) -> None:
        """Counts of everything in flight, from the daemon and from inside the guest (for leak checks)."""
        self.admit()
        gid = self._gid()
        self.stat_calls.add(gid, Call(route, msg.id), STATS_TIMEOUT, self._stats_timed_out)
        self.guest.send(G.StatsQuery(id=gid))

    def _stats_timed_out(self, call: Call) -> None:
        # a guest busy in a loop does not answer; neither does it keep the entry
        self.host.to_broker(call.error(P.E_TIMEOUT, "the guest did not answer stats"))

    def _daemon_counts(self) -> dict[str, int]:
        counts = self.streams.counts()
        counts |= {"fetches": len(self.fetches), "dispatches": len(self.dispatches), "evals": len(self.evals)}
        counts["tools"] = len(self.tools)
        counts["modules"] = len(self.modules)
        counts["stdin_queued"] = self.guest.queued()
        return counts | self.host.held()

    # ---- guest -> runtime ----------------------------------------------------------------------

    def _on_frame(self, header: dict[str, Any], body: Any) -> None:
        fast = G.hot(header)  # one chunk or read per streamed chunk: no record (see wire.guest.hot)
        if fast is not None:
            sid, n = fast
            if n < 0:
                self._chunk(sid, body)
            else:
                self._read(sid, n)
            return
        try:
            msg = G.parse(header, body)
        except P.ProtocolError as exc:
            raise GuestProtocolError(exc.message) from None
        self.ON_GUEST[msg.T](self, msg)

    def _chunk(self, sid: int, data: Any) -> None:
        out = self.streams.outbound.get(sid)
        if out is not None and not out.put_chunk(data):  # None: cancelled meanwhile; the guest learns it
            raise GuestProtocolError(f"guest overran the window of stream {sid}")

    def _read(self, sid: int, n: int) -> None:
        stream = self.streams.inbound.get(sid)
        if stream is not None and not stream.want(n):
            raise GuestProtocolError(f"guest overran the read window of stream {sid}")

    def _on_end(self, msg: G.OutboundEnd) -> None:
        out = self.streams.outbound.get(msg.sid)
        if out is not None:
            out.put_end()

    def _on_error(self, msg: G.OutboundError) -> None:
        out = self.streams.outbound.get(msg.sid)
        if out is not None:
            out.put_error(values.stream_error(msg.error))

    def _on_cancel(self, msg: G.InboundCancel) -> None:
        stream = self.streams.inbound.get(msg.sid)
        if stream is not None:
            stream.cancel()

    def _on_eval_ok(self, msg: G.EvalOk) -> None:
        call = self.evals.take(msg.id)
        if call is None:
            return
        try:  # the bootstrap checked the rules; a guest is untrusted, so they are checked again
            value = values.from_guest(msg.v, msg.blobs, "the default export")
            V.check(value, "the default export")  # its msgpack form within MAX_VALUE too
        except (TypeError, ValueError) as exc:  # not forwardable: the call fails, the runtime lives
            name = "RangeError" if isinstance(exc, (V.TooDeep, V.TooLarge)) else "TypeError"
            self.host.to_broker(call.error(P.E_GUEST, str(exc), name))  # it names "the default export"
            return
        self.host.reply(M.EvalOk(id=call.req_id, c=call.route, value=value))

    def _on_eval_error(self, msg: G.EvalError) -> None:
        call = self.evals.take(msg.id)
        if call is not None:
            self.host.to_broker(call.guest_error(P.E_GUEST, msg.error))

    def _on_console(self, msg: G.Console) -> None:
        if self._console_allowed():
            text = values.cut_utf8(values.clean(msg.text), values.MAX_CONSOLE_BYTES)
            args = values.console_args(msg.v, msg.blobs, text)
            entry = M.Console(rt=self.rt, method=msg.method, level=msg.level, text=text, depth=msg.depth, args=args)
            self.host.to_broker(entry)

    def _console_allowed(self) -> bool:
        """At most CONSOLE_RATE entries per second leave the daemon per runtime."""
        now = asyncio.get_running_loop().time()
        if now - self._console_window >= 1.0:
            if self._console_dropped:
                log.info("runtime %s: %d console entries dropped", self.rt, self._console_dropped)
            self._console_window, self._console_count, self._console_dropped = now, 0, 0
        if self._console_count >= CONSOLE_RATE:
            self._console_dropped += 1
            return False
        self._console_count += 1
        return True

    def _on_stats(self, msg: G.StatsAnswer) -> None:
        call = self.stat_calls.take(msg.id)
        if call is not None:
            guest = {
                "inbound": msg.inbound,
                "outbound": msg.outbound,
                "fetches": msg.fetches,
                "dispatches": msg.dispatches,
                "tools": msg.tools,
            }
            self.host.reply(M.StatsOk(id=call.req_id, c=call.route, daemon=self._daemon_counts(), guest=guest))

    #: guest op -> handler (``ready`` and ``fatal`` are the process's own, daemon/guest.py).
    ON_GUEST: dict[str, Callable[[Runtime, Any], None]] = {
        "chunk": lambda self, msg: self._chunk(msg.sid, msg.data),
        "read": lambda self, msg: self._read(msg.sid, msg.n),
        "end": _on_end,
        "error": _on_error,
        "cancel": _on_cancel,
        "eval_ok": _on_eval_ok,
        "eval_error": _on_eval_error,
        "response": lambda self, msg: self.dispatches.on_response(msg),
        "response_error": lambda self, msg: self.dispatches.on_response_error(msg),
        "fetch": lambda self, msg: self.fetches.on_fetch(msg),
        "fetch_abort": lambda self, msg: self.fetches.on_abort(msg),
        "tool": lambda self, msg: self.tools.on_tool(msg),
        "tool_abort": lambda self, msg: self.tools.on_abort(msg),
        "module": lambda self, msg: self.modules.on_query(msg),
        "console": _on_console,
        "stats": _on_stats,
        "init_ok": lambda self, msg: None,
    }

    # ---- end of life -----------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Have the runtime end (its process broke or exited, a limit was hit, it is disposed);
        ``run`` does the rest. Idempotent: the first reason is kept."""
        if not self._stopping.is_set():
            self._stop_reason = reason
            self._stopping.set()

    def lose(self, code: str, message: str) -> None:
        """Stop the runtime because of ``code`` (timeout, memory limit...)."""
        if self.lost_code is None:
            self.lost_code, self.lost_message = code, message
        self.stop(message)

    def dispose_soon(self) -> None:
        self.disposing = True
        self.stop("the runtime was disposed")

    async def dispose(self) -> None:
        self.dispose_soon()
        await self.finished.wait()

    async def run(self) -> None:
        """The runtime's life (a task of the daemon's scope): wait until something stops it, then
        kill the guest and release everything it held; ``finished`` is set at the very end."""
        try:
            await self._stopping.wait()
        finally:
            try:
                await self.guest.kill(self._stop_reason or "the daemon is shutting down")
                code, message = self._why_lost()
                self.evals.fail_all(lambda call: self.host.to_broker(call.error(code, message)))
                self.dispatches.fail_all(code, message)
                self.stat_calls.fail_all(lambda call: self.host.to_broker(call.error(code, message)))
                self.fetches.fail_all(code, message)
                self.tools.fail_all()
                self.modules.fail_all()
                if not self.disposing:  # before its bodies fail: the owner hears why first, if it can
                    self.host.to_broker(M.RuntimeLost(rt=self.rt, code=code, message=message))
                await self.streams.close(message)
            finally:
                self.finished.set()

    def _why_lost(self) -> tuple[str, str]:
        if self.lost_code is None:
            if self.disposing:
                self.lost_code, self.lost_message = P.E_RUNTIME_LOST, "the runtime was disposed"
            elif self.guest.ran_out_of_memory():
                self.lost_code = P.E_MEMORY_LIMIT
                self.lost_message = (
                    f"the runtime exceeded its memory limit of {self.guest.memory_limit_mb} MB and was stopped"
                )
            else:
                self.lost_code, self.lost_message = P.E_RUNTIME_LOST, self.guest.exit_reason or self._stop_reason
        return self.lost_code, self.lost_message
