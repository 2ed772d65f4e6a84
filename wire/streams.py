"""The one lifecycle of a body stream, shared by every hop that produces or consumes one.

A stream is produced into a PipeWriter and consumed from a PipeReader (wire.pipes: the
transport). Whoever holds either end follows the same state machine::

    OPEN --end-->    ENDED       the producer sent END after its last chunk; the consumer saw it
    OPEN --fail-->   FAILED      the producer's source failed (ERROR in-band), or the pipe broke
    OPEN --cancel--> CANCELLED   the consumer gave up, or the runtime/peer went away

The first transition wins and the terminal states have no exits, so a late END after a cancel
(or a cancel after the END) changes nothing. ``produce`` and ``Consumer`` are the pumps: the
client's uploads and fetch answers, and the daemon's guest-produced bodies, all go through
``produce``; the client's ``Body`` and the daemon's guest-bound streams read through ``Consumer``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from wire.pipes import PipeReader, PipeWriter, StreamError


class State(enum.Enum):
    OPEN = "open"
    ENDED = "ended"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: state -> states it may move to (terminal states: none).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.OPEN: frozenset({State.ENDED, State.FAILED, State.CANCELLED}),
    State.ENDED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


class Lifecycle:
    """The state of one end of one stream; ``move`` is the only way to change it."""

    __slots__ = ("reason", "state")

    def __init__(self) -> None:
        self.state = State.OPEN
        self.reason = ""

    def move(self, to: State, reason: str = "") -> bool:
        """Take the transition if it is legal from the current state; True if this call took it."""
        if to not in TRANSITIONS[self.state]:
            return False
        self.state, self.reason = to, reason
        return True

    @property
    def done(self) -> bool:
        return self.state is not State.OPEN


class SourceFailed(Exception):
    """Raised by a producer's source: the consumer gets an in-band ERROR with this text."""


def describe(exc: BaseException) -> str:
    """The text a consumer sees when a producer's source fails with ``exc``."""
    if isinstance(exc, SourceFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


async def produce(
    writer: PipeWriter,
    source: AsyncIterable[Any],
    life: Lifecycle | None = None,
    on_sent: Callable[[], None] | None = None,
) -> Lifecycle:
    """Write every chunk of ``source`` to ``writer``, then END; a failing source becomes ERROR.

    Each send waits while the consumer is behind (backpressure); ``on_sent`` runs after each chunk
    has been accepted by the pipe (the daemon acknowledges it to the guest then). After END or
    ERROR this waits, however long the consumer stalls, until the consumer acknowledges it
    (``writer.release()``) or the pipe is dropped: closing earlier could discard the tail.
    Cancelling the task that runs this drops the pipe at once (the consumer's read fails) and
    re-raises, unless the canceller first moved ``life`` to a terminal state itself: ending the
    pipe is then its job (e.g. writing ERROR when the producer's runtime died). A pipe that breaks
    under us (the consumer went away) ends as FAILED without an ERROR.
    """
    life = life or Lifecycle()
    try:
        async for chunk in source:
            await writer.send(chunk)
            if on_sent is not None:
                on_sent()
        await writer.end()
        life.move(State.ENDED)
        await writer.settle()  # until the consumer has the END: closing earlier could lose the tail
    except asyncio.CancelledError:
        # else whoever ended it first owns the pipe's end; after our END the pipe is still ours
        if life.move(State.CANCELLED, "cancelled") or life.state is State.ENDED:
            writer.abort()
        raise
    except StreamError as exc:  # the pipe itself failed (e.g. the consumer never connected)
        writer.abort()
        life.move(State.FAILED, str(exc))
    except Exception as exc:
        message = describe(exc)
        if life.move(State.FAILED, message):
            await writer.fail(message)
        else:
            writer.abort()
    return life


def untold(life: Lifecycle, writer: PipeWriter) -> bool:
    """The stream failed and no ERROR reached the pipe (it broke, or the consumer never connected):
    the consumer hears of it only if the producer sends a control ``cancel`` (protocol.md 5)."""
    return life.state is State.FAILED and not writer.last_sent


def consumer_done(writer: PipeWriter, stop: Callable[[], object]) -> None:
    """The consumer's control ``cancel`` reached the producer of ``writer``: after END or ERROR
    it is the acknowledgement that releases the pipe, before it the order to stop producing."""
    if writer.last_sent:
        writer.release()
    else:
        stop()


class Consumer:
    """The reading end of one stream: ``next()`` pulls one chunk on demand (that is the backpressure).

    ``on_finished`` runs once this end stops reading by itself (a control ``cancel`` to the
    producer): after END or ERROR that is the acknowledgement, so the producer may close its end
    (wire.pipes, PipeWriter.settle); after a broken stream (a gap) it stops the producer. A
    cancel from our side (``cancel``) tells the producer itself, so it does not run then."""

    __slots__ = ("life", "on_finished", "reader")

    def __init__(self, reader: PipeReader, on_finished: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self.life = Lifecycle()
        self.on_finished = on_finished

    @property
    def sid(self) -> bytes:
        return self.reader.sid

    async def next(self) -> Any:
        """The next chunk (a zmq.Frame), None at the end; raises StreamError if the stream failed."""
        if self.life.done:
            if self.life.state is State.ENDED:
                return None
            raise StreamError(self.life.reason or "stream closed")
        try:
            frame = await self.reader.read_frame()
        except StreamError as exc:
            if self.life.move(State.FAILED, str(exc)):  # not cancelled meanwhile: it ended by itself
                self._finished()
            raise StreamError(self.life.reason) from None
        if frame is None:
            self.life.move(State.ENDED)
            self._finished()
        return frame

    def _finished(self) -> None:
        if self.on_finished is not None:
            on_finished, self.on_finished = self.on_finished, None
            on_finished()

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop reading for good (a pending ``next`` raises); True if the stream was still open."""
        took = self.life.move(State.CANCELLED, reason)
        self.reader.abort(StreamError(reason))
        return took

    async def pump(
        self,
        on_chunk: Callable[[Any], Awaitable[None]],
        credit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Hand every chunk to ``on_chunk``, each only once ``credit`` allows; returns at the end.

        StreamError propagates (the caller tells its consumer); the reader is closed either way."""
        try:
            while True:
                if credit is not None:
                    await credit()
                frame = await self.next()
                if frame is None:
                    return
                await on_chunk(frame)
        finally:
            if not self.reader.closed:
                self.reader.abort(StreamError("stream closed"))
