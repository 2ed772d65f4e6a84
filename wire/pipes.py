"""The two ends of a per-stream PUSH/PULL pipe, shared by client and daemon.

Backpressure is the point: the reader receives one message only when its consumer asks for
the next chunk, and the writer's send blocks once the small high-water marks are full, so a
slow consumer stalls the producer instead of growing a buffer. END and ERROR travel in-band
after the data, so they can never overtake it. Every message carries its sequence number, so a
message that never arrived (a dropped connection, or a peer that was not meant to be there) fails
the stream instead of shortening it.

Who may connect to a pipe is settled before any message moves: the daemon binds each pipe behind
its ZAP gate (``wire.auth.Gate.serve_pipe``), and the client dials with ``wire.auth.pipe_client``.

Cancellation follows the rule of docs/design.md, Z5: a pending recv on a data socket is never
cancelled on purpose; instead the socket is closed (``abort``), and the pending read raises the
reason it was closed with.

The producer never closes a pipe that may still hold messages the consumer has not taken: closing
would leave them to a linger timer, and libzmq discards what is queued when it expires (a consumer
stalled longer would wait forever, its body cut short). After END or ERROR the writer keeps its
socket (LINGER 0 but open, so nothing is ever discarded) until the consumer acknowledges the last
message with a control ``cancel`` (``release``) or the stream's owner drops it (``abort``: the
runtime or the peer is gone, and the consumer hears that instead).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from wire import sockets
from wire.protocol import MAX_CHUNK, PIPE_DATA, PIPE_END, PIPE_ERROR, ProtocolError, parse_pipe, pipe_tag

#: How long an ERROR written because the runtime ended may flush (ms): no acknowledgement is
#: awaited then, the consumer hears ``runtime_lost`` anyway. END and other ERRORs wait for theirs.
ERROR_LINGER_MS = 10_000
#: Awaiting a socket that is always ready never suspends; yield to the event loop this often so a
#: busy stream cannot starve heartbeats and other streams.
YIELD_EVERY = 8


#: Body bytes this process has read from ("in") and written to ("out") pipes: the metrics' source.
BYTES = {"in": 0, "out": 0}


class StreamError(Exception):
    """A body stream ended abnormally: the producer failed, was cancelled, or its peer was lost."""


class PipeReader:
    """The consuming end (PULL) of one stream."""

    def __init__(self, sock: zmq.asyncio.Socket, sid: bytes) -> None:
        self.sock = sock
        self.sid = sid
        self.finished = False
        self._abort_reason: BaseException | None = None
        self._count = 0
        self._seq = 0  # messages received: the sequence number the next one must carry

    async def read_frame(self) -> zmq.Frame | None:
        """The next chunk as a zmq.Frame (zero-copy), or None at the end of the stream."""
        if self.finished:
            return None
        if self._abort_reason is not None:
            raise self._abort_reason
        try:
            frames = await self._recv()
        except (asyncio.CancelledError, zmq.ZMQError) as exc:
            task = asyncio.current_task()
            cancelled_by_us = isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling()
            if self._abort_reason is not None and not cancelled_by_us:
                raise self._abort_reason from None
            raise
        try:
            kind, payload = parse_pipe(frames, self.sid, self._seq)
        except ProtocolError as exc:
            self.abort(StreamError(f"the body stream broke: {exc.message}"))
            raise self._abort_reason from None  # type: ignore[misc]
        self._seq += 1
        if kind == PIPE_DATA:
            BYTES["in"] += len(payload)
            return payload
        self.finished = True
        self.sock.close(0)
        if kind == PIPE_END:
            return None
        assert kind == PIPE_ERROR
        raise StreamError(bytes(payload.buffer).decode("utf-8", "replace") or "stream failed")

    async def _recv(self) -> list[zmq.Frame]:
        self._count += 1
        if self._count % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        while True:
            try:
                return await self.sock.recv_multipart(copy=False)
            except zmq.Again:
                # libzmq can report POLLIN before a CURVE-encrypted message is complete (seen with a
                # ZAP handler in the same context); the message follows, so wait again
                await asyncio.sleep(0)

    async def read(self) -> bytes | None:
        frame = await self.read_frame()
        return None if frame is None else frame.bytes

    def abort(self, reason: BaseException) -> None:
        """Stop reading for good: close the socket so a pending read raises ``reason``."""
        if self._abort_reason is None and not self.finished:
            self._abort_reason = reason
        if not self.sock.closed:
            self.sock.close(0)

    @property
    def closed(self) -> bool:
        return self.sock.closed


class PipeWriter:
    """The producing end (PUSH) of one stream."""

    def __init__(self, sock: zmq.asyncio.Socket, sid: bytes, connect_timeout: float = 30.0) -> None:
        self.sock = sock
        self.sid = sid
        self.connect_timeout = connect_timeout
        self._connected = False
        self._seq = 0  # messages the pipe has taken: the sequence number of the next one
        #: END or ERROR is written: a consumer's cancel now acknowledges it (``release``)
        self.last_sent = False
        self._released = asyncio.Event()

    async def _send(self, kind: bytes, payload: Any) -> None:
        if (self._seq + 1) % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        frames = [pipe_tag(kind, self.sid, self._seq), payload]
        if self._connected:
            await self.sock.send_multipart(frames, copy=False)
        else:
            # the first send blocks until the consumer has connected: bound it
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self.sock.send_multipart(frames, copy=False)
            except TimeoutError:
                raise StreamError(f"the consumer did not connect within {self.connect_timeout:g}s") from None
            self._connected = True
        self._seq += 1

    async def send(self, data: Any) -> None:
        """Send one chunk, split to MAX_CHUNK; waits while the consumer is behind (backpressure)."""
        view = memoryview(data)
        BYTES["out"] += view.nbytes
        if view.nbytes <= MAX_CHUNK:
            if view.nbytes:
                await self._send(PIPE_DATA, data)
            return
        view = view.cast("B")
        for start in range(0, view.nbytes, MAX_CHUNK):
            await self._send(PIPE_DATA, view[start : start + MAX_CHUNK])

    async def end(self) -> None:
        """Mark the end in-band (after every chunk: backpressure still applies to it)."""
        await self._send(PIPE_END, b"")
        self.last_sent = True

    async def settle(self) -> None:
        """After END or ERROR: hold the socket, unread messages included, until the consumer
        acknowledges (``release``); the stream's owner going away cancels this wait."""
        try:
            await self._released.wait()
        finally:
            self.abort()

    def release(self) -> None:
        """The consumer is done with the stream (it read END or ERROR, or gave up): close now."""
        self._released.set()
        self.abort()

    async def fail(self, message: str, timeout: float = 1.0, settle: bool = True) -> None:
        """Tell the consumer the stream failed, then wait for its acknowledgement (``settle``), or
        without ``settle`` (the runtime is gone) let the ERROR flush for at most ERROR_LINGER_MS.
        Sending is best effort within ``timeout``; the text is cut to MAX_CHUNK bytes (a longer
        frame would drop the connection instead). Closes even when cancelled while the send waits
        (a dead consumer): an unclosed socket stays registered with the event loop, open for good."""
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    payload = message.encode("utf-8", "replace")[:MAX_CHUNK].decode("utf-8", "ignore").encode()
                    await self.sock.send_multipart([pipe_tag(PIPE_ERROR, self.sid, self._seq), payload])
                    self.last_sent = True
        except BaseException:
            self.abort()
            raise
        if self.last_sent and settle:
            await self.settle()
        elif not self.sock.closed:
            self.sock.close(ERROR_LINGER_MS)

    def abort(self) -> None:
        """Drop the stream at once (the consumer cancelled or acknowledged, or the owner is gone)."""
        if not self.sock.closed:
            self.sock.close(0)
        self._released.set()

    @property
    def closed(self) -> bool:
        return self.sock.closed


def fd_room() -> tuple[int, str]:
    """The pipes this process's descriptor limit leaves room for, and why that many."""
    return sockets.pipe_room(), "as many as its file descriptors allow"


class PipeCount:
    """The pipe sockets a process holds open: a new one is refused (``refuse(reason)`` is raised)
    before the process runs out of descriptors, so only the call that asked for it fails.

    Waiting for EMFILE is not enough: libzmq aborts the whole process when some of its internal
    calls meet it (resolving a bind address; the epoll set of pyzmq's zero-copy garbage collector
    starting late), and the last descriptors belong to what is not a pipe (links, guests, HTTP).
    ``room()`` says how many pipes may be open and why: by default ``wire.sockets.pipe_room()``;
    the daemon adds its stream cap. It is read at each open, so a lowered limit applies at once.
    """

    def __init__(self, refuse: Callable[[str], Exception], room: Callable[[], tuple[int, str]] = fd_room) -> None:
        self._refuse = refuse
        self._room = room
        self._socks: set[zmq.asyncio.Socket] = set()

    def open(self, make: Callable[[], zmq.asyncio.Socket]) -> zmq.asyncio.Socket:
        room, why = self._room()
        if len(self._socks) >= room and self.count() >= room:
            raise self._refuse(f"has {room} body pipes open, {why}")
        try:
            sock = make()
        except zmq.ZMQError as exc:
            raise self._refuse(f"cannot open a body pipe ({exc.strerror})") from None
        self._socks.add(sock)
        return sock

    def count(self) -> int:
        """Pipes open now (closed ones are forgotten here)."""
        self._socks = {s for s in self._socks if not s.closed}
        return len(self._socks)
