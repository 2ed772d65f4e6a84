"""Bridges between a body pipe (ZeroMQ, to the client) and a guest stream (the stdio channel).

Inbound (client produces, guest consumes): the guest grants credit with ``read`` (at most
``WINDOW`` chunks outstanding); only against credit does the bridge receive from the PULL pipe.
Outbound (guest produces, client consumes): the guest may have ``WINDOW`` chunks in flight;
each is acknowledged once the PUSH pipe has accepted it. Either way nothing accumulates in the
daemon beyond one window. Both follow the one stream lifecycle of wire.streams (``Consumer``,
``produce``); each stream's pump is a task of its runtime's scope.

Per chunk the bridges do no more than move the bytes: the ``chunk`` and ``ack`` headers of a
stream are encoded once, when it opens (wire.guest.header_of).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from daemon.ports import GuestPort, RuntimeHost, StreamOwner
from wire import guest as G
from wire.messages import Cancel
from wire.pipes import PipeReader, PipeWriter, StreamError
from wire.scope import Scope
from wire.streams import Consumer, Lifecycle, SourceFailed, State, consumer_done, produce, untold

log = logging.getLogger("sandbox_mesh.daemon.streams")

_END = object()  # queued after an outbound stream's last chunk


class InboundStream:
    """Client -> guest: one inbound guest stream, fed from one PULL pipe on demand."""

    def __init__(
        self,
        owner: StreamOwner,
        port: GuestPort,
        scope: Scope,
        gsid: int,
        reader: PipeReader,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        self.owner = owner
        #: what each pipe message becomes for the guest (a streamed tool's items); None: itself
        self.convert = convert
        self.port = port
        self.gsid = gsid
        self.reader = reader
        self.wire_sid = reader.sid
        # the body ended by itself: acknowledge END/ERROR (the client closes its end), or stop a
        # producer whose stream broke
        self.consumer = Consumer(reader, on_finished=lambda: owner.cancel_upstream(self.wire_sid))
        self.closed = False
        self._chunk_head = G.header_of(G.InboundChunk(sid=gsid, data=b""))
        self._credit = asyncio.Event()
        self._credits = 0
        self.task = scope.spawn(self._run(), name=f"inbound-{gsid}")

    def want(self, n: int) -> bool:
        """The guest granted ``n`` more chunks; False if that overruns the window (a protocol violation)."""
        if not 1 <= n <= G.WINDOW or self._credits + n > G.WINDOW:
            return False
        self._credits += n
        self._credit.set()
        return True

    async def _take_credit(self) -> None:
        while not self._credits and not self.closed:
            self._credit.clear()
            await self._credit.wait()
        self._credits -= 1  # once closed, the read that follows fails anyway

    async def _deliver(self, frame: Any) -> None:
        data = frame.buffer if self.convert is None else self.convert(frame.buffer)
        self.port.send_encoded(self._chunk_head, data)
        await self.port.drain()

    async def _run(self) -> None:
        try:
            await self.consumer.pump(self._deliver, self._take_credit)
            self.port.send(G.InboundEnd(sid=self.gsid))
        except StreamError as exc:
            if not self.closed:
                self.port.send(G.InboundError(sid=self.gsid, message=str(exc)))
                if self.consumer.cancel(str(exc)):  # ``convert`` refused it: the producer must stop
                    self.owner.cancel_upstream(self.wire_sid)
        except Exception as exc:  # a pipe failure is the stream's, not the runtime's
            if not self.closed:
                self.port.send(G.InboundError(sid=self.gsid, message=f"body stream failed: {exc}"))
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self.reader.abort(StreamError("stream closed"))
            self.owner.forget_inbound(self)

    def cancel(self, tell_producer: bool = True, tell_guest: bool = False) -> None:
        """Stop the stream and tell the producer (the guest cancelled, or the runtime is going away);
        with ``tell_guest``, a guest still reading sees the stream fail instead of waiting forever.

        The pump is not cancelled: closing the PULL ends a pending read with the reason (a cancelled
        recv could lose a message, wire/pipes.py), and a pump waiting for credit is woken."""
        if self.closed:
            return
        self.closed = True
        self.consumer.cancel("cancelled")
        self._credit.set()
        self.owner.forget_inbound(self)
        if tell_producer:
            self.owner.cancel_upstream(self.wire_sid)
        if tell_guest:
            self.port.send(G.InboundError(sid=self.gsid, message="the body was cancelled"))

    def cancel_by_client(self) -> None:
        """The client stopped producing: the guest must hear of it."""
        self.cancel(tell_producer=False, tell_guest=True)


class OutboundStream:
    """Guest -> client: chunks from one outbound guest stream, written to one PUSH pipe.

    It is its own source for ``produce``: iterating it yields the chunks the guest queued."""

    def __init__(
        self,
        owner: StreamOwner,
        port: GuestPort,
        scope: Scope,
        gsid: int,
        writer: PipeWriter,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.owner = owner
        self.port = port
        self.gsid = gsid
        self.writer = writer
        self.wire_sid = writer.sid
        self.on_done = on_done
        self.life = Lifecycle()
        self.closed = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ack = G.header_of(G.OutboundAck(sid=gsid))
        self._source_failed = False
        self.task = scope.spawn(self._run(), name=f"outbound-{gsid}")

    # ---- from the guest

    def put_chunk(self, data: Any) -> bool:
        """A chunk from the guest; False if the guest overran its window (a protocol violation)."""
        if self._queue.qsize() >= G.WINDOW:
            return False
        self._queue.put_nowait(data)
        return True

    def put_end(self) -> None:
        self._queue.put_nowait(_END)

    def put_error(self, text: str) -> None:
        self._queue.put_nowait(SourceFailed(text))

    # ---- the pump

    def __aiter__(self) -> OutboundStream:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if type(item) is SourceFailed:
            self._source_failed = True
            raise item
        return item

    def _acked(self) -> None:
        self.port.send_encoded(self._ack)

    async def _run(self) -> None:
        try:
            life = await produce(self.writer, self, self.life, self._acked)
            if life.state is State.FAILED and not self._source_failed:  # the pipe failed, not the guest
                log.info("outbound stream %s ended: %s", self.gsid, life.reason)
                if not self.closed:
                    self.port.send(G.OutboundCancel(sid=self.gsid))
            if untold(life, self.writer):  # the client must not wait for this body forever
                self.owner.cancel_upstream(self.wire_sid)
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.forget_outbound(self)
            if self.on_done is not None:
                self.on_done()

    # ---- ending it from outside

    def cancel(self, tell_guest: bool = True) -> None:
        """The consumer cancelled (or the runtime is going away): drop the pipe, stop the guest."""
        if self.closed:
            return
        tell_guest = tell_guest and self.life.state is State.OPEN  # after the END the guest is done
        if self.life.move(State.CANCELLED, "cancelled"):
            self.writer.abort()
        self.task.cancel()  # waits for the queue, sends on the PUSH or waits for the END's ack
        if tell_guest:
            self.port.send(G.OutboundCancel(sid=self.gsid))
        self._finish()

    def cancel_by_client(self) -> None:
        """The client read the END (the pipe may close now), or stopped consuming (the guest stops)."""
        consumer_done(self.writer, self.cancel)

    async def fail(self, message: str) -> None:
        """End the consumer's body with an error (the runtime died under it), best effort."""
        if self.closed:
            return
        if self.life.move(State.FAILED, message):  # produce() leaves the pipe to us
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.writer.fail(message, timeout=0.2, settle=False)
        self._finish()


class StreamTable:
    """A runtime's body streams: by guest sid (guest frames name them) and, in the daemon's
    registry, by wire sid (the client cancels them on the control link)."""

    def __init__(self, host: RuntimeHost, port: GuestPort, scope: Scope) -> None:
        self.host = host
        self.port = port
        self.scope = scope
        self.inbound: dict[int, InboundStream] = {}
        self.outbound: dict[int, OutboundStream] = {}

    def full(self) -> str:
        """Why no more bodies may open now ("" if they may): the guest's fetch() and tools.x() bodies
        and streamed results all count against MAX_STREAMS."""
        if len(self.inbound) + len(self.outbound) < G.MAX_STREAMS:
            return ""
        return f"the runtime has {G.MAX_STREAMS} open bodies, the limit; close or read some first"

    def open_inbound(self, gsid: int, reader: PipeReader, convert: Callable[[Any], Any] | None = None) -> InboundStream:
        stream = InboundStream(self, self.port, self.scope, gsid, reader, convert)
        self.inbound[gsid] = stream
        self.host.register_stream(stream.wire_sid, stream)
        return stream

    def open_outbound(self, gsid: int, writer: PipeWriter, on_done: Callable[[], None] | None = None) -> OutboundStream:
        stream = OutboundStream(self, self.port, self.scope, gsid, writer, on_done)
        self.outbound[gsid] = stream
        self.host.register_stream(stream.wire_sid, stream)
        return stream

    # ---- StreamOwner

    def forget_inbound(self, stream: InboundStream) -> None:
        self.inbound.pop(stream.gsid, None)
        self.host.unregister_stream(stream.wire_sid)

    def forget_outbound(self, stream: OutboundStream) -> None:
        self.outbound.pop(stream.gsid, None)
        self.host.unregister_stream(stream.wire_sid)

    def cancel_upstream(self, wire_sid: bytes) -> None:
        self.host.unregister_stream(wire_sid)
        self.host.to_client(Cancel(sid=wire_sid))

    # ---- the runtime's end

    async def close(self, message: str) -> None:
        """Cancel what the guest reads, fail what it produced, and join every pump."""
        for stream in list(self.inbound.values()):
            stream.cancel()
        outs = list(self.outbound.values())
        await asyncio.gather(*(o.fail(message) for o in outs), return_exceptions=True)
        await self.scope.aclose()

    def counts(self) -> dict[str, int]:
        streams = [*self.inbound.values(), *self.outbound.values()]
        return {
            "inbound": len(self.inbound),
            "outbound": len(self.outbound),
            "open_pipes": sum(not s.reader.closed for s in self.inbound.values())
            + sum(not s.writer.closed for s in self.outbound.values()),
            "tasks": sum(not s.task.done() for s in streams),
        }
