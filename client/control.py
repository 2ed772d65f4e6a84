"""The control link to one daemon: a DEALER whose identity is the client's token.

It carries ``cancel`` both ways and ``pipe_ready`` to the client. Every runtime of this client on
that daemon holds a lease on the one link; the last ``release`` closes it. A closed link sends
nothing: the daemon is gone, or none of our runtimes is left on it to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

import zmq
import zmq.asyncio

from wire import messages as M
from wire import sockets
from wire.protocol import ProtocolError
from wire.scope import Scope

log = logging.getLogger("sandbox_mesh.client")

#: Cancels of unknown streams remembered (most are acknowledgements of ended ones: harmless).
UNCLAIMED = 256
#: How long a closed link keeps trying to deliver what was queued on it (the cancels a closing
#: runtime sends for its streams); closing never waits for it (the context is never terminated).
_LINGER_MS = 1000


class ControlLink:
    def __init__(self, sock: zmq.asyncio.Socket, endpoint: str, scope: Scope) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.closed = False
        self._leases = 0
        #: stream id -> what stops its producer when the daemon cancels it
        self._producers: dict[bytes, Callable[[], object]] = {}
        #: stream id -> resolved with the endpoint of the daemon's PULL when pipe_ready arrives
        self._pipes: dict[bytes, asyncio.Future[str]] = {}
        #: the latest cancels of streams nobody watched: a cancel can overtake the callback that
        #: names its stream (the control link is direct, the callback goes through the broker)
        self._unclaimed: OrderedDict[bytes, None] = OrderedDict()
        self._send(M.Hello())
        self._reader = scope.spawn(self._read(), name=f"client-control-{endpoint}")

    def acquire(self) -> ControlLink:
        self._leases += 1
        return self

    def release(self) -> None:
        self._leases -= 1
        if self._leases <= 0:
            self.close()

    # ---- what a runtime uses ---------------------------------------------------------------------

    def cancel(self, sid: bytes) -> None:
        """Tell the daemon to stop stream ``sid`` (its producer or its consumer)."""
        self._send(M.Cancel(sid=sid))

    def watch(self, sid: bytes, stop: Callable[[], object]) -> None:
        """Call ``stop`` if the daemon cancels stream ``sid`` (we produce it)."""
        self._producers[sid] = stop

    def cancelled(self, sid: bytes) -> bool:
        """Whether the daemon cancelled ``sid`` before anyone watched it (forgets it)."""
        if sid not in self._unclaimed:
            return False
        del self._unclaimed[sid]
        return True

    def unwatch(self, sid: bytes) -> None:
        self._producers.pop(sid, None)

    def expect_pipe(self, sid: bytes) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pipes[sid] = fut
        return fut

    def forget_pipe(self, sid: bytes) -> None:
        self._pipes.pop(sid, None)

    # ---- the socket --------------------------------------------------------------------------------

    def _send(self, msg: M.Record) -> None:
        if self.closed:  # pyzmq orphans a failed future when sending on a closed socket
            return
        with contextlib.suppress(zmq.ZMQError):
            sockets.send_now(self.sock, msg.frames())

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                msg = M.CONTROL_TO_CLIENT.parse(frames)
            except ProtocolError as exc:
                log.warning("bad control message from %s: %s", self.endpoint, exc.message)
                continue
            if isinstance(msg, M.Cancel):
                stop = self._producers.pop(msg.sid, None)
                if stop is not None:
                    stop()
                else:
                    self._unclaimed[msg.sid] = None
                    if len(self._unclaimed) > UNCLAIMED:
                        self._unclaimed.popitem(last=False)
            elif isinstance(msg, M.PipeReady):
                waiter = self._pipes.pop(msg.sid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg.ep)

    def close(self) -> None:
        """Stop reading and close the socket; the reader task is joined by the connection's scope."""
        if not self.closed:
            self.closed = True
            self._reader.cancel()
            self.sock.close(linger=_LINGER_MS)
