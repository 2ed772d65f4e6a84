"""One runtime as the daemon sees it: a guest process plus every exchange in flight with it.

The broker-facing side (eval, dispatch, fetch callbacks) and the guest-facing side (frames on
the stdio channel) meet here. Every guest frame is checked before it is acted on; a runtime can
name only its own exchanges and streams, because all ids it uses are looked up in its own maps.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.guest import GuestProcess, GuestProtocolError
from daemon.streams import InboundStream, OutboundStream
from wire import protocol as P
from wire.pipes import PipeReader

if TYPE_CHECKING:
    from daemon.daemon import Daemon

log = logging.getLogger("daemon.runtime")

CONSOLE_LEVELS = frozenset({"log", "info", "warn", "error", "debug", "trace"})
MAX_CONSOLE_BYTES = 48 * 1024  # UTF-8 bytes of text per console entry
MAX_ERROR_BYTES = 16 * 1024  # UTF-8 bytes of a guest error's message, and of its stack
#: Console entries per second and runtime the daemon forwards (the bootstrap allows 200/s).
CONSOLE_RATE = 400
#: How long a stats call waits for the guest's own counts.
STATS_TIMEOUT = 10.0
#: How long the daemon waits for a client to answer a guest fetch (the head, not the body).
FETCH_REPLY_TIMEOUT = 300.0


@dataclass(slots=True)
class Call:
    """A client request waiting for the guest (eval or dispatch)."""

    route: bytes  # the broker's route to the client ("c")
    req_id: int
    timer: asyncio.TimerHandle | None = None
    resp_sid: bytes | None = None
    request_body: InboundStream | None = None
    answered: bool = False


@dataclass(slots=True)
class GuestFetch:
    """A guest fetch() waiting for the client's callback."""

    gid: int
    fid: int
    resp_sid: bytes
    resp_reader: PipeReader
    upload: OutboundStream | None = None
    timer: asyncio.TimerHandle | None = None


def _int(h: dict[str, Any], key: str) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise GuestProtocolError(f"{h.get('op')!r} needs a non-negative integer {key!r}")
    return v


def clean(value: Any) -> Any:
    """A JSON value from the guest made encodable as msgpack: lone UTF-16 surrogates (legal in JS
    strings) become U+FFFD, integers beyond 64 bits become floats. Legal guest values must never
    break an encoder on the daemon's side."""
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else float(value)
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {clean(str(k)): clean(v) for k, v in value.items()}
    return None


def _str(h: dict[str, Any], key: str) -> str:
    v = h.get(key)
    if not isinstance(v, str):
        raise GuestProtocolError(f"{h.get('op')!r} needs a string {key!r}")
    return clean(v)


def _headers(h: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        return [(clean(k), clean(v)) for k, v in P.check_headers(h.get("headers"))]
    except P.ProtocolError as exc:
        raise GuestProtocolError(exc.message) from None


def cut_utf8(text: str, limit: int) -> str:
    """``text`` within ``limit`` bytes of UTF-8 (headers to the broker are bounded in bytes)."""
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore") + "…[truncated]"


def _guest_error(h: dict[str, Any]) -> dict[str, str]:
    err = h.get("error")
    if not isinstance(err, dict):
        raise GuestProtocolError(f"{h.get('op')!r} needs an 'error' object")
    limits = {"name": 256, "message": MAX_ERROR_BYTES, "stack": MAX_ERROR_BYTES}
    return {k: cut_utf8(clean(str(err.get(k, ""))), n) for k, n in limits.items()}


class Runtime:
    def __init__(
        self,
        daemon: Daemon,
        rt: str,
        owner: bytes,
        guest: GuestProcess,
        eval_timeout: float,
    ) -> None:
        self.daemon = daemon
        self.rt = rt
        self.owner = owner
        self.owner_key: bytes | None = None  # the owner's CURVE key, admitted while this runtime lives
        self.guest = guest
        self.eval_timeout = eval_timeout
        self.evals: dict[int, Call] = {}
        self.dispatches: dict[int, Call] = {}
        self.fetches: dict[int, GuestFetch] = {}
        self.stat_calls: dict[int, Call] = {}
        self.inbound: dict[int, InboundStream] = {}
        self.outbound: dict[int, OutboundStream] = {}
        self._next = 0
        self._console_window = 0.0
        self._console_count = 0
        self._console_dropped = 0
        self.disposing = False
        self.lost_code: str | None = None
        self.lost_message = ""
        self.closed = asyncio.get_running_loop().create_future()
        guest.on_frame = self._on_frame
        guest.on_exit = self._on_exit

    def _gid(self) -> int:
        self._next += 1
        return self._next

    # ---- broker -> runtime ---------------------------------------------------------------------

    def ensure_alive(self) -> None:
        """Refuse new work once the runtime is going away (its process may already be gone)."""
        if self.lost_code is not None or self.disposing or not self.guest.alive:
            code = P.E_MEMORY_LIMIT if self.lost_code == P.E_MEMORY_LIMIT else P.E_RUNTIME_LOST
            raise P.ProtocolError(code, f"runtime {self.rt} is gone: {self.lost_message or 'it stopped'}")

    def eval(self, route: bytes, req_id: int, code: str, timeout: float | None) -> None:
        self.ensure_alive()
        gid = self._gid()
        call = Call(route, req_id)
        limit = self.eval_timeout if timeout is None else timeout
        call.timer = asyncio.get_running_loop().call_later(limit, self._eval_timed_out, gid, limit)
        self.evals[gid] = call
        self.guest.send({"op": "eval", "id": gid, "code": code})

    def _eval_timed_out(self, gid: int, limit: float) -> None:
        call = self.evals.pop(gid, None)
        if call is None:
            return
        message = f"eval did not finish within {limit:g}s; the runtime was stopped"
        self.daemon.reply_error(call.route, call.req_id, P.E_TIMEOUT, message)
        self.lose(P.E_TIMEOUT, message)

    def stats(self, route: bytes, req_id: int) -> None:
        """Counts of everything in flight, from the daemon and from inside the guest (for leak checks)."""
        self.ensure_alive()
        gid = self._gid()
        call = self.stat_calls[gid] = Call(route, req_id)
        call.timer = asyncio.get_running_loop().call_later(STATS_TIMEOUT, self._stats_timed_out, gid)
        self.guest.send({"op": "stats", "id": gid})

    def _stats_timed_out(self, gid: int) -> None:
        call = self.stat_calls.pop(gid, None)
        if call is not None:  # a guest busy in a loop does not answer; neither does it keep the entry
            self.daemon.reply_error(call.route, call.req_id, P.E_TIMEOUT, "the guest did not answer stats")

    def _daemon_counts(self) -> dict[str, int]:
        return {
            "inbound": len(self.inbound),
            "outbound": len(self.outbound),
            "fetches": len(self.fetches),
            "dispatches": len(self.dispatches),
            "evals": len(self.evals),
            "registered_streams": sum(1 for rt, _ in self.daemon.streams.values() if rt is self),
            "callbacks": sum(1 for rt, _ in self.daemon.callbacks.values() if rt is self),
            "open_pipes": sum(not s.reader.closed for s in self.inbound.values())
            + sum(not s.writer.closed for s in self.outbound.values())
            + sum(not f.resp_reader.closed for f in self.fetches.values()),
            "tasks": sum(not s.task.done() for s in [*self.inbound.values(), *self.outbound.values()]),
        }

    def dispatch(self, msg: P.Message) -> None:
        self.ensure_alive()
        route, req_id = msg.header["c"], msg.id
        gid = self._gid()
        call = Call(route, req_id, resp_sid=msg.header["resp_sid"])
        head: dict[str, Any] = {
            "op": "request",
            "id": gid,
            "method": msg.header["method"],
            "url": msg.header["url"],
            "headers": msg.header["headers"],
        }
        body = P.check_body(msg)
        payload = None
        if body == P.BODY_INLINE:
            head["body"] = "inline"
            payload = msg.payload[0]
        elif isinstance(body, P.StreamRef):
            reader, ep = self.daemon.bind_reader(body.sid)
            stream = self._add_inbound(reader)
            call.request_body = stream
            head["body"] = {"sid": stream.gsid}
            self.daemon.control_send(self.owner, P.encode("pipe_ready", sid=body.sid, ep=ep))
        else:
            head["body"] = None
        self.dispatches[gid] = call
        self.daemon.register_stream(call.resp_sid, self, ("dispatch", gid))
        self.guest.send(head, payload)

    def fetch_reply(self, fid: int, msg: P.Message) -> None:
        """The client answered one of our guest's fetches (``ok`` with a head, or ``error``)."""
        gid = self.daemon.callbacks.pop(fid, (None, None))[1]
        f = self.fetches.pop(gid, None) if gid is not None else None
        if f is None:
            return
        if f.timer:
            f.timer.cancel()
        if msg.type == "error":
            self._fetch_failed(f, str(msg.get("message", "fetch failed")))
            return
        try:
            status = P.require(msg, "status", int)
            if not 200 <= status <= 599:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"status {status} is outside 200-599")
            headers = P.check_headers(msg.get("headers", []))
            body = P.check_body(msg)
            if isinstance(body, P.StreamRef) and body.sid != f.resp_sid:
                raise P.ProtocolError(P.E_BAD_MESSAGE, "response stream id does not match the one offered")
        except P.ProtocolError as exc:
            self._fetch_failed(f, f"invalid response from the fetch callback: {exc.message}")
            return
        head: dict[str, Any] = {
            "op": "fetch_response",
            "id": f.gid,
            "status": status,
            "statusText": str(msg.get("status_text") or ""),
            "headers": headers,
            "url": str(msg.get("url") or ""),
            "redirected": bool(msg.get("redirected")),
        }
        payload = None
        if isinstance(body, P.StreamRef):
            stream = self._add_inbound(f.resp_reader)
            head["body"] = {"sid": stream.gsid}
        else:
            f.resp_reader.abort(P.ProtocolError(P.E_CANCELLED, "unused"))
            if body == P.BODY_INLINE:
                head["body"] = "inline"
                payload = msg.payload[0]
            else:
                head["body"] = None
        self.guest.send(head, payload)

    def _fetch_failed(self, f: GuestFetch, message: str) -> None:
        f.resp_reader.abort(P.ProtocolError(P.E_CANCELLED, message))
        if f.upload is not None:
            f.upload.cancel()
        self.guest.send({"op": "fetch_error", "id": f.gid, "message": message})

    def _fetch_timed_out(self, gid: int) -> None:
        f = self.fetches.pop(gid, None)
        if f is not None:
            self.daemon.callbacks.pop(f.fid, None)
            self.cancel_upstream(f.resp_sid)
            self._fetch_failed(f, f"the host did not answer fetch() within {FETCH_REPLY_TIMEOUT:g}s")

    # ---- control: a client cancelled a stream it consumes or produces -------------------------

    def cancel_stream(self, target: Any) -> None:
        if isinstance(target, InboundStream):  # the client stopped producing: the guest must hear of it
            target.cancel(tell_producer=False, tell_guest=True)
        elif isinstance(target, OutboundStream):  # the client stopped consuming: the guest stops producing
            target.cancel()
        elif isinstance(target, tuple) and target[0] == "dispatch":
            # the response was cancelled before its head: abort the guest's request signal, and
            # answer now (the client has given up), whatever the guest does later
            call = self.dispatches.pop(target[1], None)
            if call is not None:
                self.guest.send({"op": "abort", "id": target[1]})
                self._end_dispatch(call)
                self.daemon.reply_error(call.route, call.req_id, P.E_CANCELLED, "the client cancelled the request")

    def cancel_upstream(self, wire_sid: bytes) -> None:
        self.daemon.unregister_stream(wire_sid)
        self.daemon.control_send(self.owner, P.encode("cancel", sid=wire_sid))

    # ---- guest -> runtime ----------------------------------------------------------------------

    def _on_frame(self, h: dict[str, Any], body: bytes) -> None:
        op = h["op"]
        if op == "read":
            stream = self.inbound.get(_int(h, "sid"))
            if stream is not None and not stream.want(_int(h, "n") if "n" in h else 1):
                raise GuestProtocolError(f"guest overran the read window of stream {stream.gsid}")
        elif op == "chunk" or op == "end" or op == "error":
            sid = _int(h, "sid")
            out = self.outbound.get(sid)
            if out is None:
                return  # cancelled meanwhile; the guest learns through "cancel"
            value: Any = body if op == "chunk" else (None if op == "end" else self._stream_error(h))
            if not out.put(op, value):
                raise GuestProtocolError(f"guest overran the window of stream {sid}")
        elif op == "cancel":
            stream = self.inbound.get(_int(h, "sid"))
            if stream is not None:
                stream.cancel()
        elif op == "eval_ok" or op == "eval_error":
            call = self.evals.pop(_int(h, "id"), None)
            if call is None:
                return
            if call.timer:
                call.timer.cancel()
            if op == "eval_ok":
                self.daemon.reply(call.route, call.req_id, value=clean(h.get("value")))
            else:
                err = _guest_error(h)
                self.daemon.reply_error(
                    call.route, call.req_id, P.E_GUEST, err["message"], name=err["name"], stack=err["stack"]
                )
        elif op == "response" or op == "response_error":
            self._on_response(h, body)
        elif op == "fetch":
            self._on_fetch(h, body)
        elif op == "fetch_abort":
            f = self.fetches.pop(_int(h, "id"), None)
            if f is not None:
                if f.timer:
                    f.timer.cancel()
                self.daemon.callbacks.pop(f.fid, None)
                self.cancel_upstream(f.resp_sid)
                f.resp_reader.abort(P.ProtocolError(P.E_CANCELLED, "aborted"))
                if f.upload is not None:
                    f.upload.cancel()
        elif op == "console":
            level = h.get("level")
            args = h.get("args")
            if level not in CONSOLE_LEVELS or not isinstance(args, list):
                raise GuestProtocolError("malformed console entry")
            budget, out = MAX_CONSOLE_BYTES, []
            for a in args[:65]:  # the whole entry must fit a broker header, counted in bytes
                text = cut_utf8(clean(str(a)), budget)
                budget -= len(text.encode())
                out.append(text)
                if budget <= 0:
                    break
            args = out
            if not self._console_allowed():
                return
            self.daemon.to_broker(P.encode("console", rt=self.rt, level=level, args=args))
        elif op == "stats":
            call = self.stat_calls.pop(_int(h, "id"), None)
            if call is not None:
                if call.timer:
                    call.timer.cancel()
                guest = {k: _int(h, k) for k in ("inbound", "outbound", "fetches", "dispatches")}
                self.daemon.reply(call.route, call.req_id, daemon=self._daemon_counts(), guest=guest)
        elif op == "init_ok":
            pass
        else:
            raise GuestProtocolError(f"op {op!r} is not valid from a claimed runtime")

    def _console_allowed(self) -> bool:
        """At most CONSOLE_RATE entries per second leave the daemon per runtime, whatever the guest
        did to the bootstrap's own limit: the daemon->broker link is shared by every runtime."""
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

    def _stream_error(self, h: dict[str, Any]) -> str:
        err = h.get("error")
        if isinstance(err, dict):
            return clean(f"{err.get('name', 'Error')}: {err.get('message', '')}"[:4096])
        return "the guest's body stream failed"

    def _on_response(self, h: dict[str, Any], body: bytes) -> None:
        gid = _int(h, "id")
        call = self.dispatches.pop(gid, None)
        if call is None:
            b = h.get("body")
            if isinstance(b, dict):  # a response nobody waits for: stop the guest producing it
                self.guest.send({"op": "cancel", "sid": _int(b, "sid")})
            return
        if h["op"] == "response_error":
            self._end_dispatch(call)
            err = _guest_error(h)
            code = P.E_NO_HANDLER if h.get("code") == "no_handler" else P.E_GUEST
            self.daemon.reply_error(call.route, call.req_id, code, err["message"], name=err["name"], stack=err["stack"])
            return
        status = _int(h, "status")
        if not 200 <= status <= 599:
            raise GuestProtocolError(f"response status {status} out of range")
        fields: dict[str, Any] = {
            "status": status,
            "status_text": _str(h, "statusText")[:1024] if "statusText" in h else "",
            "headers": _headers(h),
        }
        b = h.get("body")
        assert call.resp_sid is not None
        if isinstance(b, dict):
            gsid = _int(b, "sid")
            if gsid in self.outbound:
                raise GuestProtocolError(f"stream id {gsid} reused")
            writer, ep = self.daemon.bind_writer(call.resp_sid)
            stream = OutboundStream(self, gsid, writer, on_done=lambda: self._end_dispatch(call))
            self.outbound[gsid] = stream
            self.daemon.register_stream(call.resp_sid, self, stream)
            fields["body"] = {"sid": call.resp_sid, "ep": ep}
            self.daemon.reply(call.route, call.req_id, **fields)
        else:
            self._end_dispatch(call)
            if b == "inline":
                fields["body"] = "inline"
                self.daemon.reply(call.route, call.req_id, [body], **fields)
            else:
                self.daemon.reply(call.route, call.req_id, **fields)

    def _end_dispatch(self, call: Call) -> None:
        if call.resp_sid is not None:
            self.daemon.unregister_stream(call.resp_sid)
        if call.request_body is not None and not call.request_body.closed:
            call.request_body.cancel(tell_guest=True)

    def _on_fetch(self, h: dict[str, Any], body: bytes) -> None:
        gid = _int(h, "id")
        if gid in self.fetches:
            raise GuestProtocolError(f"fetch id {gid} reused")
        fields: dict[str, Any] = {
            "rt": self.rt,
            "method": _str(h, "method"),
            "url": _str(h, "url"),
            "headers": _headers(h),
            "redirect": h.get("redirect") if h.get("redirect") in ("follow", "manual", "error") else "follow",
        }
        payload: list[Any] = []
        b = h.get("body")
        upload = None
        if b == "inline":
            fields["body"] = "inline"
            payload = [body]
        elif isinstance(b, dict):
            gsid = _int(b, "sid")
            if gsid in self.outbound:
                raise GuestProtocolError(f"stream id {gsid} reused")
            wire_sid = P.new_id()
            writer, ep = self.daemon.bind_writer(wire_sid)
            upload = OutboundStream(self, gsid, writer, on_done=lambda: self.daemon.unregister_stream(wire_sid))
            self.outbound[gsid] = upload
            self.daemon.register_stream(wire_sid, self, upload)
            fields["body"] = {"sid": wire_sid, "ep": ep}
        resp_sid = P.new_id()
        reader, resp_ep = self.daemon.bind_reader(resp_sid)
        fields["resp"] = {"sid": resp_sid, "ep": resp_ep}
        fid = self.daemon.next_id()
        f = GuestFetch(gid, fid, resp_sid, reader, upload)
        f.timer = asyncio.get_running_loop().call_later(FETCH_REPLY_TIMEOUT, self._fetch_timed_out, gid)
        self.fetches[gid] = f
        self.daemon.callbacks[fid] = (self, gid)
        self.daemon.to_broker(P.encode("fetch", payload, id=fid, **fields))

    # ---- streams ---------------------------------------------------------------------------------

    def _add_inbound(self, reader: PipeReader) -> InboundStream:
        stream = InboundStream(self, self._gid(), reader)
        self.inbound[stream.gsid] = stream
        self.daemon.register_stream(reader.sid, self, stream)
        return stream

    def forget_inbound(self, stream: InboundStream) -> None:
        self.inbound.pop(stream.gsid, None)
        self.daemon.unregister_stream(stream.wire_sid)

    def forget_outbound(self, stream: OutboundStream) -> None:
        self.outbound.pop(stream.gsid, None)
        self.daemon.unregister_stream(stream.wire_sid)

    # ---- end of life -----------------------------------------------------------------------------

    def lose(self, code: str, message: str) -> None:
        """Stop the runtime because of ``code`` (timeout, memory limit...)."""
        if self.lost_code is None:
            self.lost_code, self.lost_message = code, message
        self.daemon.spawn(self.guest.kill(message))

    async def dispose(self) -> None:
        self.disposing = True
        await self.guest.kill("the runtime was disposed")
        await self.closed

    def _on_exit(self, reason: str) -> None:
        if self.lost_code is None:
            if self.disposing:
                self.lost_code, self.lost_message = P.E_RUNTIME_LOST, "the runtime was disposed"
            elif self.guest.ran_out_of_memory():
                self.lost_code = P.E_MEMORY_LIMIT
                self.lost_message = (
                    f"the runtime exceeded its memory limit of {self.guest.memory_limit_mb} MB and was stopped"
                )
            else:
                self.lost_code, self.lost_message = P.E_RUNTIME_LOST, reason
        code, message = self.lost_code, self.lost_message
        for call in [*self.evals.values(), *self.dispatches.values(), *self.stat_calls.values()]:
            if call.timer:
                call.timer.cancel()
            self.daemon.reply_error(call.route, call.req_id, code, message)
            if call.resp_sid is not None:
                self.daemon.unregister_stream(call.resp_sid)
        self.evals.clear()
        self.dispatches.clear()
        self.stat_calls.clear()
        for f in self.fetches.values():
            if f.timer:
                f.timer.cancel()
            self.daemon.callbacks.pop(f.fid, None)
            self.cancel_upstream(f.resp_sid)
            f.resp_reader.abort(P.ProtocolError(code, message))
        self.fetches.clear()
        for stream in list(self.inbound.values()):
            stream.cancel()
        outs = list(self.outbound.values())
        self.daemon.spawn(self._finish(outs, code, message))

    async def _finish(self, outs: list[OutboundStream], code: str, message: str) -> None:
        await asyncio.gather(*(o.fail(message) for o in outs), return_exceptions=True)
        if not self.disposing:
            self.daemon.to_broker(P.encode("runtime_lost", rt=self.rt, code=code, message=message))
        self.daemon.forget_runtime(self)
        if not self.closed.done():
            self.closed.set_result(None)
