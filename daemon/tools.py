"""Guest tool calls: the guest calls ``tools.<name>(...args)``, the client runs the host function.

A call goes to the client as a ``tool`` callback (like a guest fetch, daemon/fetches.py: the same
callback registry, the same route through the broker) and waits here, under the guest's call id,
for the client's ``tool_result`` or ``error``. An async function's result is a value; an async
generator's items stream on a pipe of their own (``resp_sid``; the daemon binds it when the
answer says so, and tells the client with ``pipe_ready``), each pipe message one item, which this
module turns into one guest-channel chunk (``ItemStream``): the guest's credit bounds the items in
flight exactly as it bounds body chunks. A ReadableStream argument is an outbound stream, as a
fetch upload.

What the guest sees of a failure is decided here or by the client, never taken from a host
exception: the client's ``tool_failed`` error carries the name and message meant for the guest
(a ``client.ToolError``'s, or a generic text naming the tool); anything else becomes a generic
error naming the tool.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon import values
from daemon.pending import GuestCalls
from daemon.ports import GuestPort, RuntimeHost
from daemon.streams import OutboundStream, StreamTable
from wire import guest as G
from wire import messages as M
from wire import protocol as P
from wire import tools as T
from wire import values as V
from wire.channel import GuestProtocolError
from wire.pipes import StreamError
from wire.schema import StreamRef

#: How long the daemon waits for the client's answer to a tool call (the client applies the
#: tool's own timeout, wire.tools.TOOL_TIMEOUT by default; this is the backstop).
TOOL_REPLY_TIMEOUT = 300.0


@dataclass(slots=True, eq=False)
class ToolCall:
    """A guest tool call waiting for the client's answer to callback ``fid`` (a CallbackWaiter)."""

    gid: int
    name: str
    resp_sid: bytes
    upload: OutboundStream | None
    tools: Tools
    fid: int = 0

    def answer(self, reply: M.Record) -> None:
        self.tools.answered(self, reply)

    def refuse(self, message: str, error: M.ErrorReply | None = None) -> None:
        self.tools.refused(self, error)


class Tools(GuestCalls[ToolCall]):
    def __init__(
        self,
        host: RuntimeHost,
        port: GuestPort,
        streams: StreamTable,
        next_gid: Callable[[], int],
        rt: str,
        names: frozenset[str],
    ) -> None:
        super().__init__("tool", G.MAX_PENDING_TOOLS)
        self.host = host
        self.port = port
        self.streams = streams
        self.next_gid = next_gid
        self.rt = rt
        self.names = names

    # ---- the guest

    def on_tool(self, msg: G.Tool) -> None:
        self.admit(msg.id)
        sid = msg.body.sid if isinstance(msg.body, G.GuestStream) else None
        if sid is not None and sid in self.streams.outbound:
            raise GuestProtocolError(f"stream id {sid} reused")
        refusal = "" if msg.name in self.names else f"tools.{values.clean(msg.name)[:64]} is not a tool of this runtime"
        args: Any = None
        if not refusal:
            try:
                args = values.from_guest(msg.v, msg.blobs)
            except (TypeError, ValueError) as exc:  # the bootstrap packs only what it can: this guest forged it
                refusal = f"tools.{msg.name}: its arguments cannot be sent: {exc}"
            if not refusal and not isinstance(args, list):
                refusal = f"tools.{msg.name}: its arguments must be an array"
        body: StreamRef | None = None
        upload = None
        if not refusal and sid is not None:
            wire_sid = P.new_id()
            try:
                refusal = self.streams.full()
                if not refusal:
                    writer, ep = self.host.bind_writer(wire_sid)
            except P.ProtocolError as exc:  # the daemon's stream cap, or no descriptor left
                refusal = exc.message
            if not refusal:
                upload = self.streams.open_outbound(sid, writer)
                body = StreamRef(wire_sid, ep)
        callback = None
        if not refusal:
            packed = V.Marshalled(V.encode(args))  # walked once, though packed twice below
            callback = M.Tool(id=0, rt=self.rt, name=msg.name, args=packed, body=body, at=msg.at, resp_sid=P.new_id())
            size = len(callback.frames()[0])
            if size > P.MAX_HEADER:
                refusal = (
                    f"tools.{msg.name}: its arguments take {size} bytes, more than {P.MAX_HEADER}; "
                    "pass large data as a ReadableStream"
                )
        if refusal or callback is None:
            if sid is not None:
                if upload is not None:
                    upload.cancel()
                else:
                    self.port.send(G.OutboundCancel(sid=sid))
            self.port.send(G.ToolError(id=msg.id, name="TypeError", message=refusal))
            return
        call = ToolCall(msg.id, msg.name, callback.resp_sid, upload, self)
        call.fid = self.host.add_callback(call)
        self.pending.add(msg.id, call, TOOL_REPLY_TIMEOUT, self._timed_out)
        self.host.to_broker(callback.replace(id=call.fid))

    def on_abort(self, msg: G.ToolAbort) -> None:
        call = self.pending.take(msg.id)
        if call is not None:
            self._drop(call)
            if call.upload is not None:
                call.upload.cancel()

    # ---- the client

    def answered(self, call: ToolCall, reply: M.Record) -> None:
        if self.pending.take(call.gid) is None:
            return
        if not isinstance(reply, M.ToolResult):  # a fetch's answer to a tool call
            self._failed(call, "Error", f"tools.{call.name} failed")
            self.streams.cancel_upstream(call.resp_sid)
            return
        if not reply.items:
            try:
                tree, blobs = values.to_guest(reply.value)
            except (TypeError, ValueError):
                self._failed(call, "Error", f"tools.{call.name} failed: its result cannot reach the guest")
                return
            self.port.send(G.ToolResult(id=call.gid, v=tree, items=None, blobs=blobs))
            return
        try:
            refusal = self.streams.full()
            if not refusal:
                reader, ep = self.host.bind_reader(call.resp_sid)
        except P.ProtocolError as exc:
            refusal = exc.message
        if refusal:
            self.streams.cancel_upstream(call.resp_sid)
            self._failed(call, "TypeError", f"tools.{call.name}: {refusal}")
            return
        gsid = self.next_gid()
        self.streams.open_inbound(gsid, reader, convert=lambda data: item_chunk(call.name, data))
        self.host.to_client(M.PipeReady(sid=call.resp_sid, ep=ep))
        self.port.send(G.ToolResult(id=call.gid, v=None, items=gsid, blobs=b""))

    def refused(self, call: ToolCall, error: M.ErrorReply | None) -> None:
        """The client failed the call (``tool_failed``: its name and message are for the guest), or
        it could not be asked or answered: a generic error naming the tool."""
        if self.pending.take(call.gid) is None:
            return
        if error is not None and error.code == P.E_TOOL_FAILED:
            name = values.cut_utf8(values.clean(error.name or "Error"), G.MAX_ERROR_NAME)
            self._failed(call, name, values.cut_utf8(values.clean(error.message), values.MAX_ERROR_BYTES))
        else:
            self._failed(call, "Error", f"tools.{call.name} failed: the host did not answer")

    # ---- ends

    def _failed(self, call: ToolCall, name: str, message: str) -> None:
        if call.upload is not None:
            call.upload.cancel()
        self.port.send(G.ToolError(id=call.gid, name=name, message=message))

    def _timed_out(self, call: ToolCall) -> None:
        self._drop(call)
        self._failed(call, "TimeoutError", f"tools.{call.name}: the host did not answer within {TOOL_REPLY_TIMEOUT:g}s")

    def _drop(self, call: ToolCall) -> None:
        """Nobody will answer ``call`` now: forget its callback and tell the client to stop it."""
        self.host.drop_callback(call.fid)
        self.streams.cancel_upstream(call.resp_sid)

    def fail_all(self) -> None:
        """The runtime is gone: forget every call (uploads fail with the runtime's streams)."""
        self.pending.fail_all(self._drop)


_U32 = struct.Struct(">I")


def item_chunk(name: str, data: Any) -> bytes:
    """One item of a streamed tool, from its pipe message (wire.tools) to its guest chunk: u32 BE
    length of a JSON header (``{"v": tree}`` or ``{"error": {name, message}}``), the header, the
    value's blobs. StreamError (the guest's iteration fails) if the client sent something else."""
    try:
        ok, got = T.unpack(data)
        if ok:
            _, tree, blobs = values.guest_tree(got)
            head = b'{"v":' + tree + b"}"  # the JSON the size check wrote, not written again
        else:
            error = {"error": {"name": values.clean(got[0])[:256], "message": values.clean(got[1])}}
            head, blobs = json.dumps(error, separators=(",", ":"), allow_nan=False).encode(), b""
    except (TypeError, ValueError):
        raise StreamError(f"tools.{name}: the host sent an item the guest cannot read") from None
    return b"".join((_U32.pack(len(head)), head, blobs))
