"""The broker's I/O shell: the two ROUTER sockets, the ZAP gate, the read loops and the heartbeat.

Clients connect to the frontend, daemons to the backend. The broker never sees body bytes beyond
small inline bodies: streams go directly between client and daemon. What the broker decides
lives in core.py, without sockets; this shell feeds it every received message and sends what it
answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from broker.core import CLIENT, MAX_INFLIGHT_PER_CLIENT, MAX_KEEP_ALIVE, MAX_RUNTIMES_PER_CLIENT, Core, Out
from broker.metrics import BrokerMetrics
from wire import liveness, sockets
from wire import protocol as P
from wire.auth import Gate, KeyPair, user_key
from wire.protocol import MAX_FRAME
from wire.ratelog import RateLog
from wire.service import Fatal

log = logging.getLogger("sandbox_mesh.broker")
drops = RateLog(log)

Feed = Callable[[bytes, list[Any], bytes | None, float], list[Out]]


class Broker:
    def __init__(
        self,
        frontend: str,
        backend: str,
        *,
        heartbeat: float = 1.0,
        daemon_liveness: int = liveness.LIVENESS,
        client_liveness: int = 10,
        keys: KeyPair | None = None,
        authorized: set[bytes] | None = None,
        daemon_keys: set[bytes] | None = None,
        max_runtimes_per_client: int = MAX_RUNTIMES_PER_CLIENT,
        max_inflight_per_client: int = MAX_INFLIGHT_PER_CLIENT,
        reclaim_grace: float | None = None,
        max_keep_alive: float = MAX_KEEP_ALIVE,
        metrics: bool = False,
    ) -> None:
        self.frontend_endpoint = frontend
        self.backend_endpoint = backend
        #: Where a daemon in this process connects: the backend itself over ``inproc://`` (no TCP
        #: stack and no I/O-thread hop each way: a tool call's round trip crosses this link twice;
        #: docs/design.md 2.16), or the TCP backend when CURVE is on (inproc has no security mechanism).
        self.local_endpoint = backend
        self.heartbeat = heartbeat
        self.keys = keys
        self.authorized = authorized or set()  # client keys (and daemon keys, unless daemon_keys)
        self.daemon_keys = daemon_keys if daemon_keys is not None else self.authorized
        self.core = Core(
            heartbeat=heartbeat,
            daemon_liveness=daemon_liveness,
            client_liveness=client_liveness,
            max_runtimes_per_client=max_runtimes_per_client,
            max_inflight_per_client=max_inflight_per_client,
            reclaim_grace=reclaim_grace,
            max_keep_alive=max_keep_alive,
        )
        #: Prometheus metrics, counted from what ``_send`` sends (``metrics.registry`` to serve them)
        self.metrics = BrokerMetrics(self.core) if metrics else None
        self.ctx = sockets.context()
        self.front: zmq.asyncio.Socket | None = None
        self.back: zmq.asyncio.Socket | None = None
        self.ready = asyncio.Event()

    # ---- I/O edges ---------------------------------------------------------------------------------

    async def run(self) -> None:
        # no handover at the frontend: a connection can never take over a connected client's
        # routing id (and so its session); daemons re-register under a new id anyway
        self.front = sockets.router(self.ctx, handover=False)
        self.back = sockets.router(self.ctx)
        # the gate's default set stays empty here: the broker's sockets have their own per-domain
        # sets, and an embedded daemon's control socket and pipes admit runtime owners only
        gate = Gate.for_context(self.ctx, self.keys) if self.keys is not None else None
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_FRAME)  # hard cap: libzmq drops the peer
        if gate is not None:
            gate.serve(self.front, "clients", self.authorized)
            gate.serve(self.back, "daemons", self.daemon_keys)
        try:
            for sock, endpoint, flag in ((self.front, self.frontend_endpoint, "--frontend"),
                                         (self.back, self.backend_endpoint, "--backend")):  # fmt: skip
                try:
                    sock.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise Fatal(f"cannot bind {flag} {endpoint}: {exc.strerror}") from None
            self.frontend_endpoint = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.backend_endpoint = self.back.getsockopt(zmq.LAST_ENDPOINT).decode()
            if self.keys is None:  # with CURVE the embedded daemon authenticates like any other, over TCP
                self.local_endpoint = f"inproc://sandbox-mesh-backend-{P.new_id().hex()}"
                self.back.bind(self.local_endpoint)
            self.ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(self.front, self.core.from_client), name="broker-frontend")
                tg.create_task(self._read(self.back, self.core.from_daemon), name="broker-backend")
                tg.create_task(self._heartbeats(), name="broker-heartbeat")
        finally:
            for sock in (self.front, self.back):
                sock.close(0)
            if gate is not None:
                gate.stop()

    async def _read(self, sock: zmq.asyncio.Socket, feed: Feed) -> None:
        reader = sockets.Reader(sock)  # the other socket and the heartbeat get their turns during a flood
        budget = self.core.budget
        while True:
            batch = await reader.batch()
            drops, now = budget.drops, time.monotonic()
            for frames in batch:
                ident, rest = frames[0].bytes, frames[1:]
                sender_key = user_key(rest[0]) if self.keys is not None and rest else None
                try:
                    self._send(feed(ident, rest, sender_key, now))
                except Exception:
                    log.exception("failed to handle a message; dropped")
            if 2 * (budget.drops - drops) >= reader.size:
                reader.flooded()

    def _send(self, outs: list[Out]) -> None:
        """Send without ever blocking a router. A message the queue has no room for is dropped; a
        client that is gone (not merely slow) is reported to the core, which disposes its runtimes."""
        for out in outs:
            if self.metrics is not None:
                self.metrics.sent(out)
            sock = self.front if out.to == CLIENT else self.back
            assert sock is not None
            try:
                sockets.send_now(sock, [out.ident, *out.frames])
            except zmq.ZMQError as exc:
                drops.warning(
                    "dropped sends", "message to %s dropped: %s", self.core.peer(out.to, out.ident), exc.strerror
                )
                if out.to == CLIENT and exc.errno == zmq.EHOSTUNREACH:
                    self._send(self.core.client_gone(out.ident, "its connection is gone"))

    async def _heartbeats(self) -> None:
        while True:
            stall = await liveness.tick(self.heartbeat)
            for _ in range(100):  # judge peers once the messages already queued have been read
                if not (sockets.has_input(self.front) or sockets.has_input(self.back)):
                    break
                await asyncio.sleep(0)
            self._send(self.core.tick(time.monotonic(), stall))
