"""The broker: places runtimes on daemons and routes every message by runtime id.

Two ROUTER sockets: the frontend (clients) and the backend (daemons). The broker never sees
body bytes beyond small inline bodies: streams go directly between client and daemon. Its whole
state is four maps (daemons, clients, runtimes, pending requests in both directions), and each
incoming message is handled by one short function below.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq

from wire import liveness, sockets
from wire import protocol as P
from wire.auth import Gate, KeyPair, user_key

log = logging.getLogger("broker")

#: How many lost runtime ids are remembered, so late callers get "runtime_lost", not "unknown".
TOMBSTONES = 10_000


@dataclass(slots=True)
class Daemon:
    ident: bytes
    name: str
    capacity: int
    control: str
    last_seen: float
    load: int = 0
    key: str | None = None  # CURVE public key (Z85), handed to clients for the direct sockets
    runtimes: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - max(self.load, len(self.runtimes))


@dataclass(slots=True)
class Client:
    ident: bytes
    token: bytes
    last_seen: float
    runtimes: set[str] = field(default_factory=set)
    key: bytes | None = None  # CURVE public key the gate admitted it with


@dataclass(slots=True)
class Runtime:
    rt: str
    owner: bytes
    daemon: bytes


@dataclass(slots=True)
class Pending:
    """A request travelling client -> daemon (down) or daemon -> client (up)."""

    peer: bytes  # the daemon (down) or the client (up) that must answer
    rt: str
    kind: str
    orphan: bool = False  # a create_runtime whose client is gone: dispose what it creates


class Broker:
    def __init__(
        self,
        frontend: str,
        backend: str,
        *,
        heartbeat: float = 1.0,
        daemon_liveness: int = 3,
        client_liveness: int = 10,
        keys: KeyPair | None = None,
        authorized: set[bytes] | None = None,
        daemon_keys: set[bytes] | None = None,
    ) -> None:
        self.frontend_endpoint = frontend
        self.backend_endpoint = backend
        self.heartbeat = heartbeat
        self.daemon_liveness = daemon_liveness
        self.client_liveness = client_liveness
        self.keys = keys
        self.authorized = authorized or set()  # client keys (and daemon keys, unless daemon_keys)
        self.daemon_keys = daemon_keys if daemon_keys is not None else self.authorized
        self.ctx = sockets.context()
        self.daemons: dict[bytes, Daemon] = {}
        self.clients: dict[bytes, Client] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.down: dict[tuple[bytes, int], Pending] = {}  # (client, id) -> daemon
        self.up: dict[tuple[bytes, int], Pending] = {}  # (daemon, id) -> client
        self.tombstones: OrderedDict[tuple[bytes, str], tuple[str, str]] = OrderedDict()
        self.front: zmq.asyncio.Socket | None = None
        self.back: zmq.asyncio.Socket | None = None
        self.ready = asyncio.Event()

    # ---- I/O edges ---------------------------------------------------------------------------------

    async def run(self) -> None:
        self.front = sockets.router(self.ctx)
        self.back = sockets.router(self.ctx)
        # the gate's default set stays empty here: the broker's sockets have their own per-domain
        # sets, and an embedded daemon's control socket and pipes admit runtime owners only
        gate = Gate.for_context(self.ctx, self.keys) if self.keys is not None else None
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.MAXMSGSIZE, 16 * P.MAX_FRAME)  # hard cap: libzmq drops the peer
        if gate is not None:
            gate.serve(self.front, "clients", self.authorized)
            gate.serve(self.back, "daemons", self.daemon_keys)
        try:
            self.front.bind(self.frontend_endpoint)
            self.back.bind(self.backend_endpoint)
            self.frontend_endpoint = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.backend_endpoint = self.back.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(self.front, self._from_client), name="broker-frontend")
                tg.create_task(self._read(self.back, self._from_daemon), name="broker-backend")
                tg.create_task(self._heartbeats(), name="broker-heartbeat")
        finally:
            for sock in (self.front, self.back):
                sock.close(0)
            if gate is not None:
                gate.stop()

    async def _read(self, sock: zmq.asyncio.Socket, handle: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            ident = frames[0].bytes
            try:
                handle(ident, frames[1:])
            except Exception:
                log.exception("failed to handle a message; dropped")

    def _send(self, sock: zmq.asyncio.Socket | None, ident: bytes, frames: list[Any]) -> bool:
        """Send without ever blocking the router; False only if the peer is gone (not merely slow)."""
        assert sock is not None
        try:
            sockets.send_now(sock, [ident, *frames])
            return True
        except zmq.ZMQError as exc:
            log.warning("message to %s dropped: %s", ident.hex(), exc.strerror)
            return exc.errno != zmq.EHOSTUNREACH

    def to_client(self, ident: bytes, frames: list[Any]) -> None:
        if not self._send(self.front, ident, frames) and ident in self.clients:
            self._client_lost(ident, "its connection is gone")

    def to_daemon(self, ident: bytes, frames: list[Any]) -> None:
        self._send(self.back, ident, frames)

    def _decode(self, frames: list[Any], allowed: frozenset[str]) -> P.Message:
        """Decode, refusing oversized frames before even looking at them."""
        too_big = next((len(f) for f in frames if len(f) > P.MAX_FRAME), None)
        if too_big is not None:
            raise P.ProtocolError(P.E_TOO_LARGE, f"a frame of {too_big} bytes exceeds {P.MAX_FRAME}")
        msg = P.decode(frames, allowed)
        msg.sender_key = user_key(frames[0]) if self.keys is not None else None
        return msg

    # ---- clients -------------------------------------------------------------------------------------

    def _from_client(self, ident: bytes, frames: list[Any]) -> None:
        try:
            self._client_message(ident, self._decode(frames, P.CLIENT_TO_BROKER))
        except P.ProtocolError as exc:
            self._refuse_client(ident, frames, exc)

    def _refuse_client(self, ident: bytes, frames: list[Any], exc: P.ProtocolError) -> None:
        """Answer a refused client message. A refused answer to a daemon's callback fails that
        callback, and the client hears of it without an id: its own request ids are another space."""
        log.warning("refused a message from client %s: %s", ident.hex(), exc.message)
        h = _peek(frames)
        mid = _valid_id(h.get("id"))
        if h.get("t") not in ("ok", "error"):
            self.to_client(ident, P.error_frames(exc.code, exc.message, mid))
            return
        rt = self.runtimes.get(h["rt"]) if isinstance(h.get("rt"), str) else None
        if rt is not None and rt.owner == ident and mid is not None:
            pending = self.up.get((rt.daemon, mid))
            if pending is not None and pending.peer == ident:
                del self.up[(rt.daemon, mid)]
                why = f"the client's answer was refused: {exc.message}"
                self.to_daemon(rt.daemon, P.error_frames(exc.code, why, mid))
        self.to_client(ident, P.error_frames(exc.code, exc.message))

    def _client_message(self, ident: bytes, msg: P.Message) -> None:
        now = time.monotonic()
        client = self.clients.get(ident)
        if msg.type == "hello":
            if client is None:
                client = self.clients[ident] = Client(ident, P.new_id(), now, key=msg.sender_key)
            self.to_client(ident, P.encode("welcome", id=msg.id, token=client.token,
                                           heartbeat_ms=int(self.heartbeat * 1000)))  # fmt: skip
            return
        if client is None:
            raise P.ProtocolError(
                P.E_UNKNOWN_CLIENT,
                "unknown client: say hello first (the broker may have "
                "restarted, or dropped this client after missed heartbeats)",
            )
        client.last_seen = now
        t = msg.type
        if t == "hb":
            return
        if t == "bye":
            self._client_lost(ident, "it said goodbye")
            return
        req_id = P.require(msg, "id", int)
        if t == "create_runtime":
            self._create(client, msg, req_id)
            return
        rt = self._owned(client, P.require(msg, "rt", str))
        if t in P.RUNTIME_REQUESTS:
            self.down[(ident, req_id)] = Pending(rt.daemon, rt.rt, t)
            self.to_daemon(rt.daemon, P.reencode(msg, c=ident))
        else:  # ok / error answering a daemon's fetch callback
            pending = self.up.get((rt.daemon, req_id))
            if pending is None or pending.peer != ident:
                raise P.ProtocolError(P.E_BAD_MESSAGE, f"no callback {req_id} is waiting for an answer")
            del self.up[(rt.daemon, req_id)]
            self.to_daemon(rt.daemon, P.reencode(msg, rt=None))

    def _owned(self, client: Client, rt_id: str) -> Runtime:
        rt = self.runtimes.get(rt_id)
        if rt is not None and rt.owner == client.ident:
            return rt
        lost = self.tombstones.get((client.ident, rt_id))
        if lost is not None:
            code = lost[0] if lost[0] == P.E_MEMORY_LIMIT else P.E_RUNTIME_LOST
            raise P.ProtocolError(code, f"runtime {rt_id} is gone: {lost[1]}")
        raise P.ProtocolError(P.E_UNKNOWN_RUNTIME, f"no runtime {rt_id} belongs to this client")

    def _create(self, client: Client, msg: P.Message, req_id: int) -> None:
        live = [d for d in self.daemons.values() if d.free > 0]
        if not live:
            reason = "no daemon is connected" if not self.daemons else "every daemon is at capacity"
            raise P.ProtocolError(P.E_NO_DAEMON, f"cannot place a runtime: {reason}")
        daemon = max(live, key=lambda d: d.free)
        rt = Runtime(uuid.uuid4().hex, client.ident, daemon.ident)
        self.runtimes[rt.rt] = rt
        daemon.runtimes.add(rt.rt)
        client.runtimes.add(rt.rt)
        self.down[(client.ident, req_id)] = Pending(daemon.ident, rt.rt, "create_runtime")
        self.to_daemon(
            daemon.ident, P.reencode(msg, c=client.ident, rt=rt.rt, owner=client.token, owner_key=client.key)
        )

    def _client_lost(self, ident: bytes, why: str) -> None:
        client = self.clients.pop(ident, None)
        if client is None:
            return
        log.info("client %s lost (%s); disposing %d runtimes", ident.hex(), why, len(client.runtimes))
        for rt_id in list(client.runtimes):
            rt = self.runtimes.get(rt_id)
            if rt is not None:
                self.to_daemon(rt.daemon, P.encode("dispose", rt=rt_id))
                self._forget(rt_id)  # also drops its callbacks: the dispose ends them at the daemon
        for key, pending in list(self.down.items()):
            if key[0] == ident:
                if pending.kind == "create_runtime":
                    pending.orphan = True  # the runtime it creates must not outlive its client
                else:
                    del self.down[key]

    # ---- daemons -------------------------------------------------------------------------------------

    def _from_daemon(self, ident: bytes, frames: list[Any]) -> None:
        try:
            self._daemon_message(ident, self._decode(frames, P.DAEMON_TO_BROKER))
        except P.ProtocolError as exc:
            self._refuse_daemon(ident, frames, exc)

    def _refuse_daemon(self, ident: bytes, frames: list[Any], exc: P.ProtocolError) -> None:
        """A refused reply fails the client request it answers; a refused fetch fails at the daemon."""
        log.warning("refused a message from daemon %s: %s", ident.hex(), exc.message)
        h = _peek(frames)
        mid = _valid_id(h.get("id"))
        if h.get("t") in ("ok", "error"):
            c = h.get("c")
            pending = self.down.get((c, mid)) if isinstance(c, bytes) and mid is not None else None
            if pending is not None and pending.peer == ident:
                del self.down[(c, mid)]  # type: ignore[index]
                if pending.kind in ("create_runtime", "dispose"):  # the runtime must not stay half-known
                    self.to_daemon(ident, P.encode("dispose", rt=pending.rt))
                    self._forget(pending.rt)
                if not pending.orphan:
                    why = f"the daemon's reply was refused: {exc.message}"
                    self.to_client(c, P.error_frames(exc.code, why, mid))
        elif h.get("t") == "fetch" and mid is not None:
            self.to_daemon(ident, P.error_frames(exc.code, exc.message, mid))

    def _daemon_message(self, ident: bytes, msg: P.Message) -> None:
        now = time.monotonic()
        t = msg.type
        if t == "ready":
            if ident in self.daemons:
                self._daemon_lost(ident, "it registered again")
            self.daemons[ident] = Daemon(
                ident,
                str(msg.get("name", ident.hex())),
                max(0, P.require(msg, "capacity", int)),
                P.require(msg, "control", str),
                now,
                load=P.optional(msg, "load", int, 0),
                # with CURVE, the key it authenticated with, never one it merely claims
                key=msg.sender_key.decode() if msg.sender_key else P.optional(msg, "key", str),
            )
            log.info("daemon %s joined (capacity %d)", self.daemons[ident].name, self.daemons[ident].capacity)
            self.to_daemon(ident, P.encode("welcome", heartbeat_ms=int(self.heartbeat * 1000)))
            return
        daemon = self.daemons.get(ident)
        if daemon is None:
            return  # not registered (the broker restarted): silence makes it register again
        daemon.last_seen = now
        if t == "hb":
            daemon.load = P.optional(msg, "load", int, daemon.load)
        elif t in ("ok", "error"):
            self._daemon_reply(daemon, msg)
        else:  # fetch, console, runtime_lost: about one of this daemon's runtimes
            rt = self.runtimes.get(P.require(msg, "rt", str))
            if rt is None or rt.daemon != ident:
                if t == "fetch" and msg.id is not None:
                    self.to_daemon(ident, P.error_frames(P.E_UNKNOWN_RUNTIME, "no such runtime", msg.id))
                return
            if t == "fetch":
                self.up[(ident, P.require(msg, "id", int))] = Pending(rt.owner, rt.rt, "fetch")
            elif t == "runtime_lost":
                self._bury(rt, str(msg.get("code", P.E_RUNTIME_LOST)), str(msg.get("message", "")))
            self.to_client(rt.owner, msg.frames())

    def _daemon_reply(self, daemon: Daemon, msg: P.Message) -> None:
        client = P.require(msg, "c", bytes)
        key = (client, P.require(msg, "id", int))
        pending = self.down.get(key)
        if pending is None or pending.peer != daemon.ident:
            return  # the client is gone, or the request was already answered
        del self.down[key]
        if pending.orphan:  # its client left while the runtime was being created
            if msg.type == "ok":
                self.to_daemon(daemon.ident, P.encode("dispose", rt=pending.rt))
            return
        rt = self.runtimes.get(pending.rt)
        if pending.kind == "create_runtime" and rt is not None:
            if msg.type == "ok":
                extra = {"control": daemon.control, "daemon": daemon.name, "daemon_key": daemon.key}
                msg = P.Message(msg.type, {**msg.header, **{k: v for k, v in extra.items() if v}}, [])
            else:
                self._forget(rt.rt)
        elif pending.kind == "dispose" and msg.type == "ok":
            self._forget(pending.rt)
        self.to_client(client, P.reencode(msg, c=None))

    def _daemon_lost(self, ident: bytes, why: str) -> None:
        daemon = self.daemons.pop(ident, None)
        if daemon is None:
            return
        message = f"daemon {daemon.name} was lost ({why})"
        log.warning("%s; %d runtimes lost", message, len(daemon.runtimes))
        for key, pending in list(self.down.items()):
            if pending.peer == ident:
                del self.down[key]
                self.to_client(key[0], P.error_frames(P.E_RUNTIME_LOST, message, key[1]))
        for key in [k for k in self.up if k[0] == ident]:
            del self.up[key]
        for rt_id in list(daemon.runtimes):
            rt = self.runtimes.get(rt_id)
            if rt is not None:
                self._bury(rt, P.E_RUNTIME_LOST, message)
                self.to_client(rt.owner, P.encode("runtime_lost", rt=rt_id, code=P.E_RUNTIME_LOST, message=message))

    # ---- bookkeeping ---------------------------------------------------------------------------------

    def _bury(self, rt: Runtime, code: str, message: str) -> None:
        self.tombstones[(rt.owner, rt.rt)] = (code, message)
        while len(self.tombstones) > TOMBSTONES:
            self.tombstones.popitem(last=False)
        self._forget(rt.rt)

    def _forget(self, rt_id: str) -> None:
        rt = self.runtimes.pop(rt_id, None)
        if rt is None:
            return
        for key in [k for k, p in self.up.items() if p.rt == rt_id]:
            del self.up[key]  # callbacks of a runtime that is gone will never be answered
        if (d := self.daemons.get(rt.daemon)) is not None:
            d.runtimes.discard(rt_id)
        if (c := self.clients.get(rt.owner)) is not None:
            c.runtimes.discard(rt_id)

    async def _heartbeats(self) -> None:
        hb = P.encode("hb")
        while True:
            stall = await liveness.tick(self.heartbeat)
            for peer in [*self.daemons.values(), *self.clients.values()]:
                peer.last_seen += stall
            for _ in range(100):  # judge peers once the messages already queued have been read
                if not (sockets.has_input(self.front) or sockets.has_input(self.back)):
                    break
                await asyncio.sleep(0)
            now = time.monotonic()
            for ident, daemon in list(self.daemons.items()):
                if now - daemon.last_seen > self.heartbeat * self.daemon_liveness:
                    self._daemon_lost(ident, f"no heartbeat for {now - daemon.last_seen:.1f}s")
                else:
                    self.to_daemon(ident, hb)
            for ident, client in list(self.clients.items()):
                if now - client.last_seen > self.heartbeat * self.client_liveness:
                    self._client_lost(ident, f"no heartbeat for {now - client.last_seen:.1f}s")
                else:
                    self.to_client(ident, hb)


def _peek(frames: list[Any]) -> dict[Any, Any]:
    """The header of a message that failed validation, as far as it can be read (else empty)."""
    try:
        header = P.msgpack.unpackb(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
    except Exception:
        return {}
    return header if isinstance(header, dict) else {}


def _valid_id(mid: Any) -> int | None:
    return mid if type(mid) is int and 0 <= mid < 2**63 else None
