"""Dispatches: a client's HTTP request to the guest's serve() handler, until its response head.

The request body (if it streams) is an inbound stream; the response body (if it streams) is an
outbound stream bound under the ``resp_sid`` the client chose. Until the head arrives, the client
may cancel the dispatch on the control link by that sid: the pending dispatch is registered under
it and cancels itself (the guest's request signal is aborted and the client answered at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from daemon import values
from daemon.pending import Call, Pending
from daemon.ports import GuestPort, RuntimeHost
from daemon.streams import InboundStream, StreamTable
from wire import guest as G
from wire import http as H
from wire import messages as M
from wire import protocol as P
from wire.channel import GuestProtocolError
from wire.schema import Inline, StreamRef


@dataclass(slots=True, eq=False)
class PendingDispatch(Call):
    """A dispatch waiting for the guest's response head (a ClientCancellable under ``resp_sid``)."""

    gid: int
    resp_sid: bytes
    on_cancel: Callable[[PendingDispatch], None]
    request_body: InboundStream | None = None

    def cancel_by_client(self) -> None:
        self.on_cancel(self)


class Dispatches:
    def __init__(self, host: RuntimeHost, port: GuestPort, streams: StreamTable, next_gid: Callable[[], int]) -> None:
        self.host = host
        self.port = port
        self.streams = streams
        self.next_gid = next_gid
        self.pending: Pending[int, PendingDispatch] = Pending("dispatch")

    def __len__(self) -> int:
        return len(self.pending)

    def start(self, msg: M.Dispatch, route: bytes) -> None:
        call = PendingDispatch(route, msg.id, self.next_gid(), msg.resp_sid, self._cancelled)
        body: G.GuestBody = None
        match msg.body:
            case Inline():
                body = msg.body
            case StreamRef(sid=sid):
                reader, ep = self.host.bind_reader(sid)
                call.request_body = self.streams.open_inbound(self.next_gid(), reader)
                body = G.GuestStream(call.request_body.gsid)
                self.host.to_client(M.PipeReady(sid=sid, ep=ep))
        self.pending.add(call.gid, call)
        self.host.register_stream(call.resp_sid, call)
        request = G.Request(id=call.gid, method=msg.method, url=msg.url, headers=msg.headers, body=body)
        self.port.send(request.replace(redirect=msg.redirect))

    def _cancelled(self, call: PendingDispatch) -> None:
        """The response was cancelled before its head: abort the guest's request signal, and answer
        now (the client has given up), whatever the guest does later."""
        if self.pending.take(call.gid) is not None:
            self.port.send(G.Abort(id=call.gid))
            self._end(call)
            self.host.to_broker(call.error(P.E_CANCELLED, "the client cancelled the request"))

    def _end(self, call: PendingDispatch) -> None:
        self.host.unregister_stream(call.resp_sid)
        if call.request_body is not None and not call.request_body.closed:
            call.request_body.cancel(tell_guest=True)

    def on_response(self, msg: G.Response) -> None:
        call = self.pending.take(msg.id)
        if call is None:
            if isinstance(msg.body, G.GuestStream):  # a response nobody waits for: stop the guest producing it
                self.port.send(G.OutboundCancel(sid=msg.body.sid))
            return
        if isinstance(msg.body, G.GuestStream) and msg.body.sid in self.streams.outbound:
            raise GuestProtocolError(f"stream id {msg.body.sid} reused")
        refusal = self._refusal(msg)
        if refusal is not None:  # legal for the guest to send, not to forward: this dispatch fails
            if isinstance(msg.body, G.GuestStream):
                self.port.send(G.OutboundCancel(sid=msg.body.sid))
            self._end(call)
            self.host.to_broker(call.error(P.E_GUEST, refusal, "TypeError"))
            return
        body: Inline | StreamRef | None
        if isinstance(msg.body, G.GuestStream):
            try:
                writer, ep = self.host.bind_writer(call.resp_sid)
            except P.ProtocolError as exc:  # the daemon's stream cap, or no descriptor left: this call fails
                self.port.send(G.OutboundCancel(sid=msg.body.sid))
                self._end(call)
                self.host.to_broker(call.error(exc.code, exc.message))
                return
            self.streams.open_outbound(msg.body.sid, writer, on_done=lambda: self._end(call))
            body = StreamRef(call.resp_sid, ep)
        else:
            self._end(call)
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

    def _refusal(self, msg: G.Response) -> str | None:
        """Why a response head the guest sent cannot be forwarded (None: it can)."""
        if not 200 <= msg.status <= 599:
            return f"the serve() handler returned status {msg.status}, outside 200-599"
        try:  # a forged head (a patched Headers iterator...) never reaches the client
            H.check_response_head(msg.statusText, msg.headers)
        except H.HeadError as exc:
            return f"invalid response from the serve() handler: {exc}"
        open_bodies = len(self.streams.inbound) + len(self.streams.outbound)
        if isinstance(msg.body, G.GuestStream) and open_bodies >= G.MAX_STREAMS:
            return f"the runtime has {G.MAX_STREAMS} open bodies, the limit"
        return None

    def on_response_error(self, msg: G.ResponseError) -> None:
        call = self.pending.take(msg.id)
        if call is not None:
            self._end(call)
            code = P.E_NO_HANDLER if msg.code == "no_handler" else P.E_GUEST
            self.host.to_broker(call.guest_error(code, msg.error))

    def fail_all(self, code: str, message: str) -> None:
        """The runtime is gone: every dispatch waiting for its head fails with ``code``."""

        def fail(call: PendingDispatch) -> None:
            self.host.to_broker(call.error(code, message))
            self.host.unregister_stream(call.resp_sid)

        self.pending.fail_all(fail)
