"""Guest fetches: the guest calls fetch(), the client answers the ``fetch`` callback.

The daemon names the response body's stream (``resp_sid``) when it asks, but binds a pipe for it
only when the client's answer says the body streams, and then tells the client where with
``pipe_ready`` on the control link (as for a dispatch's request body): a fetch waiting for its
answer holds no socket, and an inline answer never needs one. An upload body is an outbound
stream. A runtime has at most MAX_PENDING_FETCHES fetches pending and MAX_STREAMS bodies open.
Each fetch waits in the pending table under the guest's fetch id, and in the daemon's callback
registry under its callback id, until the client answers, refuses, the guest aborts, the wait
times out or the runtime goes away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from daemon import values
from daemon.pending import GuestCalls
from daemon.ports import GuestPort, RuntimeHost
from daemon.streams import OutboundStream, StreamTable
from wire import guest as G
from wire import http as H
from wire import messages as M
from wire import protocol as P
from wire.channel import GuestProtocolError
from wire.schema import Inline, StreamRef

#: How long the daemon waits for a client to answer a guest fetch (the head, not the body).
FETCH_REPLY_TIMEOUT = 300.0


@dataclass(slots=True, eq=False)
class GuestFetch:
    """A guest fetch() waiting for the client's answer to callback ``fid`` (a CallbackWaiter)."""

    gid: int
    resp_sid: bytes
    upload: OutboundStream | None
    fetches: Fetches
    fid: int = field(default=0)

    def answer(self, reply: M.Record) -> None:
        if isinstance(reply, M.FetchOk):
            self.fetches.answered(self, reply)
        else:  # a tool's answer to a fetch
            self.fetches.refused(self, "invalid response from the fetch callback")

    def refuse(self, message: str, error: M.ErrorReply | None = None) -> None:
        self.fetches.refused(self, message)


class Fetches(GuestCalls[GuestFetch]):
    def __init__(
        self, host: RuntimeHost, port: GuestPort, streams: StreamTable, next_gid: Callable[[], int], rt: str
    ) -> None:
        super().__init__("fetch", G.MAX_PENDING_FETCHES)
        self.host = host
        self.port = port
        self.streams = streams
        self.next_gid = next_gid
        self.rt = rt

    # ---- the guest

    def on_fetch(self, msg: G.Fetch) -> None:
        self.admit(msg.id)
        try:  # a forged head (a patched Headers iterator...) never reaches the client
            H.check_request_head(msg.method, msg.url, msg.headers)
        except H.HeadError as exc:
            if isinstance(msg.body, G.GuestStream):
                self.port.send(G.OutboundCancel(sid=msg.body.sid))
            self.port.send(G.FetchError(id=msg.id, message=f"fetch() refused: {exc}"))
            return
        upload = None
        body: Inline | StreamRef | None
        if isinstance(msg.body, G.GuestStream):
            if msg.body.sid in self.streams.outbound:
                raise GuestProtocolError(f"stream id {msg.body.sid} reused")
            wire_sid = P.new_id()
            try:
                refusal = self.streams.full()
                if not refusal:
                    writer, ep = self.host.bind_writer(wire_sid)
            except P.ProtocolError as exc:  # the daemon's stream cap, or no descriptor left
                refusal = exc.message
            if refusal:  # this fetch fails, the runtime goes on
                self.port.send(G.OutboundCancel(sid=msg.body.sid))
                self.port.send(G.FetchError(id=msg.id, message=refusal))
                return
            upload = self.streams.open_outbound(msg.body.sid, writer)
            body = StreamRef(wire_sid, ep)
        else:
            body = msg.body
        f = GuestFetch(msg.id, P.new_id(), upload, self)
        f.fid = self.host.add_callback(f)
        self.pending.add(msg.id, f, FETCH_REPLY_TIMEOUT, self._timed_out)
        callback = M.Fetch(
            id=f.fid,
            rt=self.rt,
            method=values.clean(msg.method),
            url=values.clean(msg.url),
            headers=values.headers(msg.headers),
            redirect=msg.redirect,
            body=body,
            resp_sid=f.resp_sid,
        )
        self.host.to_broker(callback)

    def on_abort(self, msg: G.FetchAbort) -> None:
        f = self.pending.take(msg.id)
        if f is not None:
            self._drop(f)
            if f.upload is not None:
                f.upload.cancel()

    # ---- the client

    def answered(self, f: GuestFetch, reply: M.FetchOk) -> None:
        """The client answered with a response head."""
        if self.pending.take(f.gid) is None:
            return
        if not 200 <= reply.status <= 599:
            self._failed(f, f"invalid response from the fetch callback: status {reply.status} is outside 200-599")
            return
        try:
            H.check_response_head(reply.status_text, reply.headers)
        except H.HeadError as exc:
            self._failed(f, f"invalid response from the fetch callback: {exc}")
            return
        body: G.GuestBody = None
        match reply.body:
            case StreamRef(sid=sid) if sid != f.resp_sid:
                message = "response stream id does not match the one offered"
                self._failed(f, f"invalid response from the fetch callback: {message}")
                return
            case StreamRef():
                try:
                    refusal = self.streams.full()
                    if not refusal:  # only now: a streamed answer needs a pipe
                        reader, ep = self.host.bind_reader(f.resp_sid)
                except P.ProtocolError as exc:  # the daemon's stream cap, or no descriptor left
                    refusal = exc.message
                if refusal:  # this fetch fails, the runtime goes on
                    self.streams.cancel_upstream(f.resp_sid)
                    self._failed(f, refusal)
                    return
                body = G.GuestStream(self.streams.open_inbound(self.next_gid(), reader).gsid)
                self.host.to_client(M.PipeReady(sid=f.resp_sid, ep=ep))
            case _:
                body = reply.body
        head = G.FetchResponse(
            id=f.gid,
            status=reply.status,
            statusText=reply.status_text,
            headers=reply.headers,
            url=reply.url,
            redirected=reply.redirected,
            body=body,
        )
        self.port.send(head)

    def refused(self, f: GuestFetch, message: str) -> None:
        """The client refused (or answered with something unreadable)."""
        if self.pending.take(f.gid) is not None:
            self._failed(f, message)

    # ---- ends

    def _failed(self, f: GuestFetch, message: str) -> None:
        if f.upload is not None:
            f.upload.cancel()
        self.port.send(G.FetchError(id=f.gid, message=message))

    def _timed_out(self, f: GuestFetch) -> None:
        self._drop(f)
        self._failed(f, f"the host did not answer fetch() within {FETCH_REPLY_TIMEOUT:g}s")

    def _drop(self, f: GuestFetch) -> None:
        """Nobody will answer ``f`` now: forget its callback and tell the client to stop its body."""
        self.host.drop_callback(f.fid)
        self.streams.cancel_upstream(f.resp_sid)

    def fail_all(self, code: str, message: str) -> None:
        """The runtime is gone: forget every fetch (its upload fails with the runtime's streams)."""
        self.pending.fail_all(self._drop)
