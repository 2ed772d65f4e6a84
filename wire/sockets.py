"""Socket set-up shared by every process: one context, and the options each socket role needs.

The numbers here are the ones protocol.md documents; change them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from wire.protocol import MAX_CHUNK, MAX_FRAME

#: Messages a pipe socket queues on each side; with MAX_CHUNK this bounds a stalled stream.
PIPE_HWM = 2
#: SO_SNDBUF of a pipe's producing (PUSH) side, sized to a bandwidth-delay product: a stream moves
#: at most about PIPE_SNDBUF per round trip (measured: ~75 MB/s at 20 ms RTT, ~150 at 10 ms), and a
#: stalled one leaves at most 2/3 of the kernel's doubled value unsent (2 MiB; autotuning would grow
#: it to the host's tcp_wmem[2], 4 MiB by default). The receiving side stays autotuned (4.2).
PIPE_SNDBUF = 1536 * 1024
#: Messages a read loop handles in a row before it lets every other task run (see ``Reader``).
READ_BATCH = 32
#: Seconds a read loop rests after a full batch of mostly dropped (flooding) messages.
FLOOD_PAUSE = 0.001

#: Descriptors one open pipe costs a process at most: the socket's mailbox (an eventfd), the
#: listening socket (the daemon binds every pipe) and its one TCP connection (docs/design.md, Z4).
FDS_PER_PIPE = 3
#: Descriptors a process keeps for everything but pipes (links, guests' stdio, HTTP, logs).
FD_RESERVE = 256

_context: zmq.asyncio.Context | None = None


def context() -> zmq.asyncio.Context:
    """The process-wide asyncio context, sized for thousands of concurrent pipes.

    libzmq refuses a socket past ZMQ_MAX_SOCKETS (default 1,023, closed sockets still lingering
    included) with EMFILE. Every socket holds at least one descriptor, so a socket limit equal to
    the descriptor limit is never the one reached first: the only limit left is the descriptor
    limit, raised here to the hard limit, which ``pipe_room`` turns into a count of pipes."""
    global _context
    if _context is None or _context.closed:
        _raise_fd_limit()
        _context = zmq.asyncio.Context()
        _context.set(zmq.MAX_SOCKETS, max(1024, min(fd_limit(), _context.get(zmq.SOCKET_LIMIT))))
        # pyzmq frees zero-copy frames through sockets of its garbage-collector thread, made on the
        # first such frame: make them now, while descriptors are plentiful (made at EMFILE under
        # load, their failure inside libzmq's free callback aborts the process)
        zmq.Frame(bytes(zmq.COPY_THRESHOLD), copy=False)
    return _context


def fd_limit() -> int:
    """This process's soft limit on open descriptors (RLIMIT_NOFILE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def pipe_room(reserved: int = 0) -> int:
    """How many pipes this process can hold open at once without running out of descriptors, when
    ``reserved`` descriptors (besides FD_RESERVE) go to other things. The limit is read each time:
    an operator may change it while the process runs (prlimit)."""
    return max(0, (fd_limit() - FD_RESERVE - reserved) // FDS_PER_PIPE)


def _raise_fd_limit() -> None:
    # 1,000 streams need more than the usual soft limit of 1,024 descriptors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 1 << 20), hard))


def _link(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    """A request/reply link socket: deep queues (messages are small), bounded frames."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    # no ZMTP heartbeats: the application heartbeats already judge peers (wire.liveness), and
    # libzmq 4.3.5 can abort the process (stream_engine_base.cpp:310 `!_io_error`) when a
    # heartbeat timeout meets a busy connection
    return sock


def router(ctx: zmq.asyncio.Context, *, handover: bool = True) -> zmq.asyncio.Socket:
    """A ROUTER that reports unroutable peers instead of dropping silently and refuses huge frames.

    With ``handover``, a peer that connects with a routing id already in use takes it over (a
    reconnecting peer gets its messages back at once). Without it, libzmq ignores the newcomer
    while the first connection lasts: nobody can take over a connected peer's identity.
    """
    sock = _link(ctx, zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1 if handover else 0)
    return sock


def dealer(ctx: zmq.asyncio.Context, identity: bytes | None = None) -> zmq.asyncio.Socket:
    sock = _link(ctx, zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    return sock


def pipe(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    """A PUSH or PULL end of one body stream: small queues so backpressure reaches the producer."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, PIPE_HWM)
    sock.setsockopt(zmq.RCVHWM, PIPE_HWM)
    # a fixed buffer turns off the kernel's autotuning and caps a stream at buffer/RTT (the former
    # 256 KiB on both sides: 13.5 MB/s over 20 ms). RCVBUF stays autotuned: the receive buffer grows
    # to about twice what the consumer read per round trip, so it follows the bandwidth-delay
    # product and stays small behind a slow consumer. The send side's autotuning grows to
    # tcp_wmem[2] whatever the consumer does and holds most of it unsent once the consumer stalls,
    # so the PUSH gets PIPE_SNDBUF (docs/design.md 4.2 derives the bound, benchmarks.md has figures)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CHUNK + 1024)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.PUSH:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDBUF, PIPE_SNDBUF)
    # no ZMTP heartbeats here: a consumer that stops reading stops reading the pongs too, and
    # libzmq would then drop a healthy but stalled stream (losing data). Peer loss reaches a pipe
    # through the runtime instead (runtime_lost, client loss at the broker).
    return sock


def bind_pipe(
    ctx: zmq.asyncio.Context, kind: int, bind_host: str, guard: Callable[[zmq.Socket], None]
) -> zmq.asyncio.Socket:
    """A pipe bound on an ephemeral port (``advertised`` says where peers connect to it).

    ``guard`` sets up who may connect before the socket binds (wire.auth.Gate.serve_pipe): a PUSH
    sends round-robin to every connected peer, so a pipe must never be open to all."""
    sock = pipe(ctx, kind)
    try:
        guard(sock)
        sock.bind(f"tcp://{bind_host}:*")  # the kernel picks a free ephemeral port
    except Exception:
        sock.close(0)
        raise
    return sock


def advertised(sock: zmq.asyncio.Socket, advertise_host: str) -> str:
    """The endpoint peers connect to, for a socket bound on an ephemeral port."""
    port = sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
    return f"tcp://{advertise_host}:{port}"


def send_now(sock: zmq.asyncio.Socket, frames: list[Any]) -> None:
    """Send without waiting: raises zmq.Again (queue full) or EHOSTUNREACH (unknown peer) at once.

    An asyncio socket reports such errors in the future it returns; with DONTWAIT and no other
    send queued that future is already done, so the error can be raised here. (Sending through a
    synchronous shadow instead would bypass pyzmq's edge-triggered event bookkeeping and stall
    pending receives.)
    """
    if sock.closed:  # pyzmq would orphan a future holding ENOTSOCK (logged at GC as never retrieved)
        raise zmq.ZMQError(zmq.ENOTSOCK)
    fut = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    if fut.done():
        exc = fut.exception()
        if exc is not None:
            raise exc
    else:  # another send was queued first: let it finish on its own, but never lose its error
        fut.add_done_callback(_log_send_failure)


def _log_send_failure(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logging.getLogger("sandbox_mesh.wire").warning("queued send failed: %s", fut.exception())


class Reader:
    """Reads a socket in bounded batches, and lets every other task run between two full batches.

    While input is queued, pyzmq's asyncio ``recv_multipart`` returns an already finished future,
    and awaiting it gives the event loop no turn: a loop over a flooded socket would handle every
    queued message (seconds of them) before any heartbeat, timer or other socket. ``batch()`` waits
    for one message, takes at most ``size - 1`` more that are already queued, and before the next
    batch yields once if this one was full. The extra messages are taken through a synchronous
    shadow without waiting (a fifth of the asyncio receive's cost per message); the next asyncio
    receive re-reads the socket's events, so no wake-up is lost.

    A loop that dropped most of a full batch (a peer past its refusal budget) calls ``flooded``:
    the next batch then waits ``FLOOD_PAUSE`` instead of one turn. The flood then reaches the
    process at most ``size`` messages per pause (the rest waits in the flooder's own queues and
    TCP), so the process stays mostly idle and keeps its quick wake-ups for everyone else.
    """

    def __init__(self, sock: zmq.asyncio.Socket, size: int = READ_BATCH, *, copy: bool = False) -> None:
        self.sock = sock
        self.size = size
        self.copy = copy
        self._now = zmq.Socket.shadow(sock.underlying)
        self._full = False
        self._flooded = False

    def flooded(self) -> None:
        self._flooded = True

    async def batch(self) -> list[list[Any]]:
        if self._full:
            await asyncio.sleep(FLOOD_PAUSE if self._flooded else 0)
        self._flooded = False
        got = [await self.sock.recv_multipart(copy=self.copy)]
        while len(got) < self.size and not self.sock.closed:
            try:
                got.append(self._now.recv_multipart(zmq.NOBLOCK, copy=self.copy))
            except zmq.Again:
                break
        self._full = len(got) == self.size
        return got


def has_input(sock: zmq.asyncio.Socket) -> bool:
    """A message is waiting that the reader has not taken yet: the peer is not silent, we were slow.

    Liveness checks ask this first, so a stall of our own event loop never reads as a dead peer.
    """
    return not sock.closed and bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
