"""Body streams between the client and a daemon, on wire.streams' one lifecycle.

Inbound: a body the daemon produces (a serve() response, a guest's fetch upload) is an ``Inbound``
stream, owned by its runtime's registry until it ends; what the application holds is a ``Body``,
a thin view that pulls one chunk from the pipe per step (that is the backpressure). The runtime
fails every open stream when it is lost, disposed or its connection closes.

One case has no structural owner: an application that drops an unfinished Body without closing
it. Nothing but the garbage collector can tell that the Body is unreachable, and cancelling idle
bodies on a timer would break legitimately stalled readers, so the stream keeps a weak reference
to its Body whose callback only *schedules* the cancel on the event loop (it may fire inside any
allocation, even one in the middle of a zmq send on the control socket).

Outbound: ``send_body`` produces an application body into a pipe through ``wire.streams.produce``.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from typing import Any

from client.errors import StreamError
from client.http import BodyType
from wire import streams
from wire.pipes import PipeWriter
from wire.pipes import StreamError as PipeStreamError

CLOSED_BY_READER = "the body was closed by its reader"
ABANDONED = "the body was abandoned by its reader"


class Inbound:
    """One body stream arriving from the daemon; ``on_cancel(sid)`` tells the daemon we gave up,
    ``on_done(self)`` takes it out of the runtime's registry."""

    __slots__ = ("_body", "_closed", "_on_cancel", "_on_done", "consumer")

    def __init__(
        self,
        consumer: streams.Consumer,
        on_cancel: Callable[[bytes], None],
        on_done: Callable[[Inbound], None],
    ) -> None:
        self.consumer = consumer
        self._on_cancel = on_cancel
        self._on_done = on_done
        self._closed = False  # the reader closed it: reads return None from then on
        self._body: weakref.ref[Body] | None = None

    @property
    def sid(self) -> bytes:
        return self.consumer.sid

    @property
    def done(self) -> bool:
        return self.consumer.life.done

    def body(self) -> Body:
        """The application's view of this stream (one per stream)."""
        body = Body(self)
        loop = asyncio.get_running_loop()
        self._body = weakref.ref(body, lambda _ref: _soon(loop, self._abandoned))
        return body

    async def read(self) -> bytes | None:
        if self._closed:
            return None
        try:
            frame = await self.consumer.next()
        except PipeStreamError as exc:
            self._on_done(self)
            raise StreamError(str(exc)) from None
        if frame is None:
            self._on_done(self)
            return None
        data: bytes = frame.bytes
        return data

    def cancel(self, reason: str = CLOSED_BY_READER) -> None:
        """The reader gives up: the daemon stops producing; a pending read raises StreamError."""
        self._closed = True
        if self.consumer.cancel(reason):
            self._on_cancel(self.sid)
        self._on_done(self)

    def fail(self, reason: str) -> None:
        """The producer is gone (runtime or daemon lost): reads raise StreamError(reason)."""
        self.consumer.cancel(reason)
        self._on_done(self)

    def _abandoned(self) -> None:
        if not self.done:
            self.cancel(ABANDONED)


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to cancel
        loop.call_soon_threadsafe(callback)


class Body:
    """A body arriving from a runtime: iterate it, ``read()`` it whole, or ``aclose()`` it early."""

    __slots__ = ("__weakref__", "_stream")

    def __init__(self, stream: Inbound) -> None:
        self._stream = stream

    @property
    def finished(self) -> bool:
        return self._stream.done

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._stream.read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read_chunk(self) -> bytes | None:
        """The next chunk as it was produced, or None at the end."""
        return await self._stream.read()

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self._stream.read()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Stop reading: the producer is told to cancel (an upstream HTTP connection is closed)."""
        self._stream.cancel()

    def cancel(self) -> None:
        self._stream.cancel()

    def abort(self, reason: str) -> None:
        """The producer is gone (runtime or daemon lost): a pending read raises StreamError."""
        self._stream.fail(reason)


#: What the guest reads when a body the host produces fails: the host's exception (logged by
#: ``on_fail``) never reaches untrusted code, as for a tool or the fetch callback.
BODY_FAILED = "the host's body failed"


async def send_body(
    writer: PipeWriter,
    body: BodyType,
    on_cancel: Callable[[], None],
    on_fail: Callable[[BaseException], None],
) -> None:
    """Write ``body`` to ``writer`` and END (a failing source: ``on_fail`` is told why, the
    consumer gets ERROR ``BODY_FAILED``); the source is closed after.

    Cancelling drops the pipe and calls ``on_cancel`` (the consumer must not wait for bytes that
    will never come)."""
    chunks = _told(_chunks(body), on_fail)
    try:
        life = await streams.produce(writer, chunks)
        if streams.untold(life, writer):
            on_cancel()
    except asyncio.CancelledError:
        on_cancel()
        raise
    finally:
        # quietly, both: an aclose that raises (e.g. a generator still running) must never keep the
        # source, an upstream connection, open (the soak's abort check found one left open)
        await aclose_quietly(chunks)
        await aclose_quietly(body)


async def _told(chunks: AsyncIterable[Any], on_fail: Callable[[BaseException], None]) -> AsyncGenerator[Any]:
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        on_fail(exc)
        raise streams.SourceFailed(BODY_FAILED) from None


def _chunks(body: BodyType) -> AsyncIterable[Any]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return _once(body)
    if body is None:
        return _once(b"")
    return body


async def _once(data: bytes | bytearray | memoryview) -> AsyncIterator[Any]:
    yield data


async def aclose_quietly(body: BodyType) -> None:
    if isinstance(body, AsyncIterable):
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
