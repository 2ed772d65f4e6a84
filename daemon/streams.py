"""Bridges between a body pipe (ZeroMQ, to the client) and a guest stream (the stdio channel).

Inbound (client produces, guest consumes): the guest grants credit with ``read`` (at most
``WINDOW`` chunks outstanding); only against credit does the bridge receive from the PULL pipe.
Outbound (guest produces, client consumes): the guest may have ``WINDOW`` chunks in flight;
each is acknowledged once the PUSH pipe has accepted it. Either way nothing accumulates in the
daemon beyond one window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wire.pipes import PipeReader, PipeWriter, StreamError

if TYPE_CHECKING:
    from daemon.runtime import Runtime

log = logging.getLogger("daemon.streams")

#: Chunks a stream may have in flight between daemon and guest (must match WINDOW in bootstrap.js).
WINDOW = 4


class InboundStream:
    """Client -> guest: one guest stream id, fed from one PULL pipe on demand."""

    def __init__(self, runtime: Runtime, gsid: int, reader: PipeReader) -> None:
        self.runtime = runtime
        self.gsid = gsid
        self.reader = reader
        self.wire_sid = reader.sid
        self._credit = asyncio.Event()
        self._credits = 0
        self.closed = False
        self.task = asyncio.create_task(self._pump(), name=f"inbound-{gsid}")

    def want(self, n: int) -> bool:
        """The guest granted ``n`` more chunks; False if that overruns the window (a protocol violation)."""
        if not 1 <= n <= WINDOW or self._credits + n > WINDOW:
            return False
        self._credits += n
        self._credit.set()
        return True

    async def _pump(self) -> None:
        send = self.runtime.guest.send
        try:
            while True:
                if not self._credits:
                    self._credit.clear()
                    await self._credit.wait()
                self._credits -= 1
                frame = await self.reader.read_frame()
                if frame is None:
                    send({"op": "end", "sid": self.gsid})
                    break
                send({"op": "chunk", "sid": self.gsid}, frame.buffer)
                await self.runtime.guest.drain()
        except StreamError as exc:
            if not self.closed:
                send({"op": "error", "sid": self.gsid, "message": str(exc)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a pipe failure is the stream's, not the runtime's
            if not self.closed:
                send({"op": "error", "sid": self.gsid, "message": f"body stream failed: {exc}"})
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self.reader.abort(StreamError("stream closed"))
            self.runtime.forget_inbound(self)

    def cancel(self, tell_producer: bool = True, tell_guest: bool = False) -> None:
        """Stop the stream and tell the producer (the guest cancelled, or the runtime is going away);
        with ``tell_guest``, a guest still reading sees the stream fail instead of waiting forever."""
        if self.closed:
            return
        self.closed = True
        self.reader.abort(StreamError("cancelled"))
        self.task.cancel()
        self.runtime.forget_inbound(self)
        if tell_producer:
            self.runtime.cancel_upstream(self.wire_sid)
        if tell_guest:
            self.runtime.guest.send({"op": "error", "sid": self.gsid, "message": "the body was cancelled"})


class OutboundStream:
    """Guest -> client: chunks from one guest stream id, written to one PUSH pipe."""

    def __init__(
        self, runtime: Runtime, gsid: int, writer: PipeWriter, on_done: Callable[[], None] | None = None
    ) -> None:
        self.runtime = runtime
        self.gsid = gsid
        self.writer = writer
        self.wire_sid = writer.sid
        self.on_done = on_done
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed = False
        self.task = asyncio.create_task(self._pump(), name=f"outbound-{gsid}")

    def put(self, kind: str, value: Any) -> bool:
        """A frame from the guest; False if the guest overran its window (a protocol violation)."""
        if kind == "chunk" and self.queue.qsize() >= WINDOW:
            return False
        self.queue.put_nowait((kind, value))
        return True

    async def _pump(self) -> None:
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "chunk":
                    await self.writer.send(value)
                    self.runtime.guest.send({"op": "ack", "sid": self.gsid})
                elif kind == "end":
                    await self.writer.end()
                    break
                else:
                    await self.writer.fail(value)
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("outbound stream %s ended: %s", self.gsid, exc)
            self.writer.abort()
            if not self.closed:
                self.runtime.guest.send({"op": "cancel", "sid": self.gsid})
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self.runtime.forget_outbound(self)
            if self.on_done is not None:
                self.on_done()

    def cancel(self, tell_guest: bool = True) -> None:
        """The consumer cancelled (or the runtime is going away): drop the pipe, stop the guest."""
        if self.closed:
            return
        self.writer.abort()
        self.task.cancel()
        if tell_guest:
            self.runtime.guest.send({"op": "cancel", "sid": self.gsid})
        self._finish()

    async def fail(self, message: str) -> None:
        """End the consumer's body with an error (the runtime died under it), best effort."""
        if self.closed:
            return
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        await self.writer.fail(message, timeout=0.2)
        self._finish()
