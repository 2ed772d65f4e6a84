"""One runtime as the daemon sees it: a guest process plus every exchange in flight with it.

The broker-facing side (eval, dispatch, stats, fetch answers: records the daemon has validated)
and the guest-facing side (frames on the stdio channel, each parsed once into a wire.guest record
and handed to the handler its op names in ``ON_GUEST``) meet here. A runtime can name only its own
exchanges and streams, because every id it uses is looked up in its own tables. It reaches the
daemon only through its ``RuntimeHost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon import values
from daemon.channel import GuestProtocolError
from daemon.guest import GuestProcess
from daemon.pending import Pending
from daemon.ports import RuntimeHost
from daemon.scope import Scope
from daemon.streams import InboundStream, OutboundStream, StreamTable
from wire import guest as G
from wire import messages as M
from wire import protocol as P
from wire.pipes import PipeReader
from wire.schema import Inline, StreamRef

log = logging.getLogger("daemon.runtime")

#: Console entries per second and runtime the daemon forwards, whatever the guest did to the
#: bootstrap's own limit: the daemon->broker link is shared by every runtime.
CONSOLE_RATE = 2 * G.CONSOLE_RATE
#: How long a stats call waits for the guest's own counts.
STATS_TIMEOUT = 10.0
#: How long the daemon waits for a client to answer a guest fetch (the head, not the body).
FETCH_REPLY_TIMEOUT = 300.0
_MAX_ID = 2**63


@dataclass(slots=True, eq=False)
class Call:
    """A client request waiting for the guest (eval or stats)."""

    route: bytes  # the broker's route to the client ("c")
    req_id: int


@dataclass(slots=True, eq=False)
class PendingDispatch(Call):
    """A dispatch waiting for the guest's response head; registered under its ``resp_sid``, so the
    client can cancel it before the head (then the guest's request is aborted)."""

    gid: int
    resp_sid: bytes
    on_cancel: Callable[[PendingDispatch], None]
    request_body: InboundStream | None = None

    def cancel_by_client(self) -> None:
        self.on_cancel(self)


@dataclass(slots=True, eq=False)
class GuestFetch:
    """A guest fetch() waiting for the client's answer to its ``fetch`` callback ``fid``."""

    gid: int
    resp_sid: bytes
    resp_reader: PipeReader
    upload: OutboundStream | None
    runtime: Runtime
    fid: int = field(default=0)

    def answer(self, reply: M.FetchOk) -> None:
        self.runtime.fetch_answered(self, reply)

    def refuse(self, message: str) -> None:
        self.runtime.fetch_refused(self, message)


class Runtime:
    def __init__(
        self, host: RuntimeHost, rt: str, guest: GuestProcess, eval_timeout: float, *, fetch: bool, console: bool
    ) -> None:
        self.host = host
        self.rt = rt
        self.guest = guest
        self.eval_timeout = eval_timeout
        self.evals: Pending[int, Call] = Pending("eval")
        self.dispatches: Pending[int, PendingDispatch] = Pending("dispatch")
        self.stat_calls: Pending[int, Call] = Pending("stats")
        self.fetches: Pending[int, GuestFetch] = Pending("fetch")
        self.streams = StreamTable(host, guest, Scope(f"runtime {rt}"))
        self._next = 0
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
        guest.send(G.Init(fetch=fetch, console=console))

    def _gid(self) -> int:
        self._next += 1
        return self._next

    def _error(self, call: Call, code: str, message: str, name: str | None = None, stack: str | None = None) -> None:
        self.host.to_broker(M.error(code, message, call.req_id, c=call.route, name=name, stack=stack))

    def _guest_error(self, call: Call, code: str, err: G.GuestError) -> None:
        """The guest's error, cleaned and cut to fit an error reply."""
        self._error(call, code, *values.error_parts(err))

    # ---- broker -> runtime ---------------------------------------------------------------------

    def ensure_alive(self) -> None:
        """Refuse new work once the runtime is going away (its process may already be gone)."""
        if self.lost_code is not None or self.disposing or self._stopping.is_set() or not self.guest.alive:
            code = P.E_MEMORY_LIMIT if self.lost_code == P.E_MEMORY_LIMIT else P.E_RUNTIME_LOST
            raise P.ProtocolError(code, f"runtime {self.rt} is gone: {self.lost_message or 'it stopped'}")

    def eval(self, msg: M.Eval, route: bytes) -> None:
        try:
            code = bytes(msg.source).decode()
        except UnicodeDecodeError:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "the eval source is not UTF-8") from None
        if msg.timeout_ms is not None and msg.timeout_ms <= 0:
            raise P.ProtocolError(P.E_BAD_MESSAGE, "timeout_ms must be positive")
        self.ensure_alive()
        limit = self.eval_timeout if msg.timeout_ms is None else msg.timeout_ms / 1000
        gid = self._gid()
        self.evals.add(gid, Call(route, msg.id), limit, lambda call: self._eval_timed_out(call, limit))
        self.guest.send(G.Eval(id=gid, code=code))

    def _eval_timed_out(self, call: Call, limit: float) -> None:
        message = f"eval did not finish within {limit:g}s; the runtime was stopped"
        self._error(call, P.E_TIMEOUT, message)
        self.lose(P.E_TIMEOUT, message)

    def stats(self, msg: M.Stats, route: bytes) -> None:
        """Counts of everything in flight, from the daemon and from inside the guest (for leak checks)."""
        self.ensure_alive()
        gid = self._gid()
        self.stat_calls.add(gid, Call(route, msg.id), STATS_TIMEOUT, self._stats_timed_out)
        self.guest.send(G.StatsQuery(id=gid))

    def _stats_timed_out(self, call: Call) -> None:
        # a guest busy in a loop does not answer; neither does it keep the entry
        self._error(call, P.E_TIMEOUT, "the guest did not answer stats")

    def _daemon_counts(self) -> dict[str, int]:
        counts = self.streams.counts()
        counts["open_pipes"] += sum(not f.resp_reader.closed for f in self.fetches)
        return {
            **counts,
            "fetches": len(self.fetches),
            "dispatches": len(self.dispatches),
            "evals": len(self.evals),
            **self.host.held(),
        }

    def dispatch(self, msg: M.Dispatch, route: bytes) -> None:
        self.ensure_alive()
        call = PendingDispatch(route, msg.id, self._gid(), msg.resp_sid, self._dispatch_cancelled)
        body: G.GuestBody = None
        match msg.body:
            case Inline():
                body = msg.body
            case StreamRef(sid=sid):
                reader, ep = self.host.bind_reader(sid)
                call.request_body = self.streams.open_inbound(self._gid(), reader)
                body = G.GuestStream(call.request_body.gsid)
                self.host.to_client(M.PipeReady(sid=sid, ep=ep))
        self.dispatches.add(call.gid, call)
        self.host.register_stream(call.resp_sid, call)
        self.guest.send(G.Request(id=call.gid, method=msg.method, url=msg.url, headers=msg.headers, body=body))

    def _dispatch_cancelled(self, call: PendingDispatch) -> None:
        """The response was cancelled before its head: abort the guest's request signal, and answer
        now (the client has given up), whatever the guest does later."""
        if self.dispatches.take(call.gid) is not None:
            self.guest.send(G.Abort(id=call.gid))
            self._end_dispatch(call)
            self._error(call, P.E_CANCELLED, "the client cancelled the request")

    def _end_dispatch(self, call: PendingDispatch) -> None:
        self.host.unregister_stream(call.resp_sid)
        if call.request_body is not None and not call.request_body.closed:
            call.request_body.cancel(tell_guest=True)

    def fetch_answered(self, f: GuestFetch, reply: M.FetchOk) -> None:
        """The client answered one of our guest's fetches with a response head."""
        if self.fetches.take(f.gid) is None:
            return
        if not 200 <= reply.status <= 599:
            self._fetch_failed(f, f"invalid response from the fetch callback: status {reply.status} is outside 200-599")
            return
        body: G.GuestBody = None
        match reply.body:
            case StreamRef(sid=sid) if sid != f.resp_sid:
                message = "response stream id does not match the one offered"
                self._fetch_failed(f, f"invalid response from the fetch callback: {message}")
                return
            case StreamRef():
                body = G.GuestStream(self.streams.open_inbound(self._gid(), f.resp_reader).gsid)
            case _:
                f.resp_reader.abort(P.ProtocolError(P.E_CANCELLED, "unused"))
                body = reply.body
        self.guest.send(
            G.FetchResponse(
                id=f.gid,
                status=reply.status,
                statusText=reply.status_text,
                headers=reply.headers,
                url=reply.url,
                redirected=reply.redirected,
                body=body,
            )
        )

    def fetch_refused(self, f: GuestFetch, message: str) -> None:
        """The client refused one of our guest's fetches (or answered with something unreadable)."""
        if self.fetches.take(f.gid) is not None:
            self._fetch_failed(f, message)

    def _fetch_failed(self, f: GuestFetch, message: str) -> None:
        f.resp_reader.abort(P.ProtocolError(P.E_CANCELLED, message))
        if f.upload is not None:
            f.upload.cancel()
        self.guest.send(G.FetchError(id=f.gid, message=message))

    def _fetch_timed_out(self, f: GuestFetch) -> None:
        self._drop_fetch(f)
        self._fetch_failed(f, f"the host did not answer fetch() within {FETCH_REPLY_TIMEOUT:g}s")

    def _drop_fetch(self, f: GuestFetch, reason: P.ProtocolError | None = None) -> None:
        """Nobody will answer ``f`` now: forget its callback and tell the client to stop its body."""
        self.host.drop_callback(f.fid)
        self.streams.cancel_upstream(f.resp_sid)
        if reason is not None:
            f.resp_reader.abort(reason)

    # ---- guest -> runtime ----------------------------------------------------------------------

    def _on_frame(self, header: dict[str, Any], body: Any) -> None:
        op = header["op"]
        # The hot path: one chunk or read per streamed chunk. A record costs ~1.5 us to build and a
        # dict lookup ~0.1 us (measured); the checks here are the records' own (non-negative int
        # sid and n), and any frame that fails them is parsed as a record, which says why.
        if op == "chunk":
            sid = header.get("sid")
            if type(sid) is int and 0 <= sid < _MAX_ID:
                self._chunk(sid, body)
                return
        elif op == "read":
            sid, n = header.get("sid"), header.get("n", 1)
            if type(sid) is int and 0 <= sid < _MAX_ID and type(n) is int and 0 <= n < _MAX_ID:
                self._read(sid, n)
                return
        try:
            msg = G.parse(header, body)
        except P.ProtocolError as exc:
            raise GuestProtocolError(exc.message) from None
        self.ON_GUEST[op](self, msg)

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
        if call is not None:
            self.host.reply(M.EvalOk(id=call.req_id, c=call.route, value=values.clean(msg.value)))

    def _on_eval_error(self, msg: G.EvalError) -> None:
        call = self.evals.take(msg.id)
        if call is not None:
            self._guest_error(call, P.E_GUEST, msg.error)

    def _on_response(self, msg: G.Response) -> None:
        call = self.dispatches.take(msg.id)
        if call is None:
            if isinstance(msg.body, G.GuestStream):  # a response nobody waits for: stop the guest producing it
                self.guest.send(G.OutboundCancel(sid=msg.body.sid))
            return
        body: Inline | StreamRef | None
        if isinstance(msg.body, G.GuestStream):
            if msg.body.sid in self.streams.outbound:
                raise GuestProtocolError(f"stream id {msg.body.sid} reused")
            writer, ep = self.host.bind_writer(call.resp_sid)
            self.streams.open_outbound(msg.body.sid, writer, on_done=lambda: self._end_dispatch(call))
            body = StreamRef(call.resp_sid, ep)
        else:
            self._end_dispatch(call)
            body = msg.body
        head = M.DispatchOk(
            id=call.req_id,
            c=call.route,
            status=msg.status,
            status_text=values.status_text(msg.statusText),
            headers=values.headers(msg.headers),
            body=body,
        )
        self.host.reply(head)

    def _on_response_error(self, msg: G.ResponseError) -> None:
        call = self.dispatches.take(msg.id)
        if call is not None:
            self._end_dispatch(call)
            self._guest_error(call, P.E_NO_HANDLER if msg.code == "no_handler" else P.E_GUEST, msg.error)

    def _on_fetch(self, msg: G.Fetch) -> None:
        if msg.id in self.fetches:
            raise GuestProtocolError(f"fetch id {msg.id} reused")
        upload = None
        body: Inline | StreamRef | None
        if isinstance(msg.body, G.GuestStream):
            if msg.body.sid in self.streams.outbound:
                raise GuestProtocolError(f"stream id {msg.body.sid} reused")
            wire_sid = P.new_id()
            writer, ep = self.host.bind_writer(wire_sid)
            upload = self.streams.open_outbound(msg.body.sid, writer)
            body = StreamRef(wire_sid, ep)
        else:
            body = msg.body
        resp_sid = P.new_id()
        reader, resp_ep = self.host.bind_reader(resp_sid)
        f = GuestFetch(msg.id, resp_sid, reader, upload, self)
        f.fid = self.host.add_callback(f)
        self.fetches.add(msg.id, f, FETCH_REPLY_TIMEOUT, self._fetch_timed_out)
        callback = M.Fetch(
            id=f.fid,
            rt=self.rt,
            method=values.clean(msg.method),
            url=values.clean(msg.url),
            headers=values.headers(msg.headers),
            redirect=msg.redirect,
            body=body,
            resp=StreamRef(resp_sid, resp_ep),
        )
        self.host.to_broker(callback)

    def _on_fetch_abort(self, msg: G.FetchAbort) -> None:
        f = self.fetches.take(msg.id)
        if f is not None:
            self._drop_fetch(f, P.ProtocolError(P.E_CANCELLED, "aborted"))
            if f.upload is not None:
                f.upload.cancel()

    def _on_console(self, msg: G.Console) -> None:
        args = values.console_args(msg.args)
        if self._console_allowed():
            self.host.to_broker(M.Console(rt=self.rt, level=msg.level, args=args))

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
            }
            self.host.reply(M.StatsOk(id=call.req_id, c=call.route, daemon=self._daemon_counts(), guest=guest))

    def _on_init_ok(self, msg: G.InitOk) -> None:
        pass

    #: guest op -> handler (``ready`` and ``fatal`` are the process's, daemon/guest.py).
    ON_GUEST: dict[str, Callable[[Runtime, Any], None]] = {
        "chunk": lambda self, msg: self._chunk(msg.sid, msg.data),
        "read": lambda self, msg: self._read(msg.sid, msg.n),
        "end": _on_end,
        "error": _on_error,
        "cancel": _on_cancel,
        "eval_ok": _on_eval_ok,
        "eval_error": _on_eval_error,
        "response": _on_response,
        "response_error": _on_response_error,
        "fetch": _on_fetch,
        "fetch_abort": _on_fetch_abort,
        "console": _on_console,
        "stats": _on_stats,
        "init_ok": _on_init_ok,
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
                self._fail_pending(code, message)
                await self.streams.close(message)
                if not self.disposing:
                    self.host.to_broker(M.RuntimeLost(rt=self.rt, code=code, message=message))
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

    def _fail_pending(self, code: str, message: str) -> None:
        def fail_dispatch(call: PendingDispatch) -> None:
            self._error(call, code, message)
            self.host.unregister_stream(call.resp_sid)

        self.evals.fail_all(lambda call: self._error(call, code, message))
        self.dispatches.fail_all(fail_dispatch)
        self.stat_calls.fail_all(lambda call: self._error(call, code, message))
        self.fetches.fail_all(lambda f: self._drop_fetch(f, P.ProtocolError(code, message)))
