"""The broker's whole state and one short handler per message: no sockets, no clock, no tasks.

Sans-I/O, in h11's and Majordomo's shape: the shell (broker.py) feeds in each received message
with the time it arrived, and sends the ``Out`` records a handler returns. The state is five maps:
daemons, clients, runtimes, requests pending in each direction (down: client -> daemon, up: a
daemon's fetch callback -> client) and the tombstones of lost runtimes.

What a daemon learns of a client is an opaque session id (``c``), never its routing id: the
routing id is the client's address at the frontend, and a peer that knew it could try to speak
as that client. With CURVE, every message of a session must come from the key that said hello.
Per client, the runtimes and the requests in flight are bounded (``quota``); per peer, refused
messages are (``REFUSAL_BUDGET``): past it, the peer's messages are dropped unread for the rest
of the second, so a flood costs the others almost nothing.

A runtime is placed on the live daemon with the most free capacity; a client can only address
its own runtimes; replies are routed by the request they answer. Who is told about a refused
message: protocol.md 2.2; what a lost daemon or client leaves behind, and the states of a
runtime: docs/design.md 2.13, 2.14 and 3.1.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from wire import liveness
from wire.budget import Budget
from wire.messages import (
    CLIENT_TO_BROKER,
    DAEMON_TO_BROKER,
    REPLY_OF,
    RUNTIME_REQUESTS,
    Bye,
    CreateRuntime,
    Dispose,
    ErrorReply,
    Fetch,
    Heartbeat,
    Ready,
    Record,
    Reply,
    RuntimeLost,
    Welcome,
    error,
)
from wire.protocol import (
    E_BAD_MESSAGE,
    E_NO_DAEMON,
    E_QUOTA,
    E_RUNTIME_LOST,
    E_TOO_LARGE,
    E_UNKNOWN_CLIENT,
    E_UNKNOWN_RUNTIME,
    LIMIT_CODES,
    MAX_FRAME,
    ProtocolError,
    new_id,
)
from wire.ratelog import RateLog
from wire.schema import Envelope, Link, Route, route

log = logging.getLogger("broker")

#: How many lost runtime ids are remembered, so late callers get "runtime_lost", not "unknown".
TOMBSTONES = 10_000
#: Default of ``--max-runtimes-per-client``: runtimes one client may hold (being created or live).
MAX_RUNTIMES_PER_CLIENT = 64
#: Default of ``--max-inflight-per-client``: requests of one client a daemon has not answered yet.
MAX_INFLIGHT_PER_CLIENT = 4096
#: Refused messages a peer (client or daemon connection) may send per ``REFUSAL_WINDOW`` seconds;
#: past it, its messages are dropped unread, unanswered, until the window ends.
REFUSAL_BUDGET = 100
REFUSAL_WINDOW = 1.0
#: Refusals a correct client meets in bursts (racing a runtime's loss or limit, at its quota, while no
#: daemon has room): answered, but not counted against the budget.
_NOT_STRIKES = frozenset({E_RUNTIME_LOST, *LIMIT_CODES, E_QUOTA, E_NO_DAEMON})

CLIENT: Literal["client"] = "client"
DAEMON: Literal["daemon"] = "daemon"

_HB = Heartbeat().frames()


@dataclass(frozen=True, slots=True)
class Out:
    """One message to send: to a client (frontend) or a daemon (backend), by routing id."""

    to: Literal["client", "daemon"]
    ident: bytes
    frames: list[Any]


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
    ident: bytes  # its routing id at the frontend: never leaves the broker
    token: bytes
    last_seen: float
    runtimes: set[str] = field(default_factory=set)
    key: bytes | None = None  # CURVE public key the gate admitted it with; every message must match it
    session: bytes = field(default_factory=new_id)  # what daemons know it by (``c``)
    inflight: int = 0  # its entries in Core.down


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
    kind: type[Record]  # the request: CreateRuntime, Eval, ... (down) or Fetch (up)
    orphan: bool = False  # a create_runtime whose client is gone: dispose what it creates
    client: bytes = b""  # down: the routing id of the client that asked
    placed: Record | None = None  # a create_runtime as sent to its daemon: placed again if that one is lost


class Core:
    """The broker's state machine: feed it messages and heartbeat ticks, send what it returns."""

    def __init__(
        self,
        *,
        heartbeat: float = 1.0,
        daemon_liveness: int = liveness.LIVENESS,
        client_liveness: int = 10,
        max_runtimes_per_client: int = MAX_RUNTIMES_PER_CLIENT,
        max_inflight_per_client: int = MAX_INFLIGHT_PER_CLIENT,
    ) -> None:
        self.heartbeat = heartbeat
        self.daemon_liveness = daemon_liveness
        self.client_liveness = client_liveness
        self.max_runtimes_per_client = max_runtimes_per_client
        self.max_inflight_per_client = max_inflight_per_client
        self.daemons: dict[bytes, Daemon] = {}
        self.clients: dict[bytes, Client] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.down: dict[tuple[bytes, int], Pending] = {}  # (client session, id) -> daemon
        self.up: dict[tuple[bytes, int], Pending] = {}  # (daemon, id) -> client
        self.tombstones: OrderedDict[tuple[bytes, str], tuple[str, str]] = OrderedDict()
        self.budget = Budget(REFUSAL_BUDGET, REFUSAL_WINDOW)  # per (CLIENT or DAEMON, routing id)
        self.ratelog = RateLog(log)
        self._now = 0.0
        self._out: list[Out] = []

    # ---- what the shell calls; each returns the messages to send -------------------------------------

    def from_client(self, ident: bytes, frames: list[Any], sender_key: bytes | None, now: float) -> list[Out]:
        """A message from a client; ``sender_key`` is the CURVE key the gate admitted it with."""
        self._now = now
        if self._over_budget(CLIENT, ident, now):
            return []  # a flooding peer: dropped unread
        client = self.clients.get(ident)
        if client is not None and client.key != sender_key:
            self._impostor(client, now)
            return self._flush()
        try:
            self._client_message(ident, _open(frames, CLIENT_TO_BROKER), sender_key, now)
        except ProtocolError as exc:
            if exc.code not in _NOT_STRIKES:
                self._strike(CLIENT, ident, now)
            self._refuse_client(ident, route(frames), exc)
        return self._flush()

    def from_daemon(self, ident: bytes, frames: list[Any], sender_key: bytes | None, now: float) -> list[Out]:
        """A message from a daemon; ``sender_key`` is the CURVE key the gate admitted it with."""
        self._now = now
        if self._over_budget(DAEMON, ident, now):
            return []
        try:
            self._daemon_message(ident, _open(frames, DAEMON_TO_BROKER).parse(), frames, sender_key, now)
        except ProtocolError as exc:
            self._strike(DAEMON, ident, now)
            self._refuse_daemon(ident, route(frames), exc)
        return self._flush()

    def client_gone(self, ident: bytes, why: str) -> list[Out]:
        """The shell could not reach a client (its connection is gone): as if it had left."""
        self._client_lost(ident, why)
        return self._flush()

    def tick(self, now: float, stall: float = 0.0) -> list[Out]:
        """One heartbeat: judge every peer's silence and send a heartbeat to each live one.

        ``stall`` is how long the shell could not listen (its event loop overran the heartbeat
        interval): that silence is the broker's, not the peers', and is forgiven."""
        self._now = now
        self._forgive(now)
        self.ratelog.flush(now)
        for peer in [*self.daemons.values(), *self.clients.values()]:
            peer.last_seen = liveness.forgive(peer.last_seen, now, stall)
        for ident, daemon in list(self.daemons.items()):
            if now - daemon.last_seen > self.heartbeat * self.daemon_liveness:
                self._daemon_lost(ident, f"no heartbeat for {now - daemon.last_seen:.1f}s")
            else:
                self._send(DAEMON, ident, _HB)
        for ident, client in list(self.clients.items()):
            if now - client.last_seen > self.heartbeat * self.client_liveness:
                self._client_lost(ident, f"no heartbeat for {now - client.last_seen:.1f}s")
            else:
                self._send(CLIENT, ident, _HB)
        return self._flush()

    def _send(self, to: Literal["client", "daemon"], ident: bytes, msg: Record | list[Any]) -> None:
        self._out.append(Out(to, ident, msg if isinstance(msg, list) else msg.frames()))

    def _flush(self) -> list[Out]:
        out, self._out = self._out, []
        return out

    # ---- the refusal budget: a peer that floods is throttled, nobody else ------------------------------

    def _over_budget(self, side: Literal["client", "daemon"], ident: bytes, now: float) -> bool:
        return self.budget.over((side, ident), now)

    def _strike(self, side: Literal["client", "daemon"], ident: bytes, now: float) -> None:
        if self.budget.strike((side, ident), now):
            self.ratelog.warning(
                f"throttled {side}s",
                "%s %s sent %d refused messages within %gs: its messages are dropped unread until %gs have passed",
                side,
                ident.hex(),
                REFUSAL_BUDGET,
                REFUSAL_WINDOW,
                REFUSAL_WINDOW,
                now=now,
            )

    def _forgive(self, now: float) -> None:
        """Forget the windows that have ended (the table holds only this window's offenders)."""
        for (side, ident), dropped in self.budget.expire(now):
            self.ratelog.log(
                logging.INFO,
                "floods dropped",
                "dropped %d messages of %s %s unread (over its refusal budget)",
                dropped,
                side,
                ident.hex(),
                now=now,
            )

    def _pend(self, client: Client, req_id: int, pending: Pending) -> None:
        pending.client = client.ident
        self.down[(client.session, req_id)] = pending
        client.inflight += 1

    def _unpend(self, key: tuple[bytes, int]) -> Pending:
        pending = self.down.pop(key)
        if (client := self.clients.get(pending.client)) is not None and client.session == key[0]:
            client.inflight -= 1
        return pending

    @property
    def _heartbeat_ms(self) -> int:
        return int(self.heartbeat * 1000)

    # ---- clients -------------------------------------------------------------------------------------

    def _client_message(self, ident: bytes, env: Envelope, sender_key: bytes | None, now: float) -> None:
        r = env.route
        client = self.clients.get(ident)
        if r.t == "hello":
            hello = env.parse()
            if client is None:
                client = self.clients[ident] = Client(ident, new_id(), now, key=sender_key)
            self._send(CLIENT, ident, Welcome(id=hello.id, token=client.token, heartbeat_ms=self._heartbeat_ms))
            return
        if client is None:
            raise ProtocolError(
                E_UNKNOWN_CLIENT,
                "unknown client: say hello first (the broker may have "
                "restarted, or dropped this client after missed heartbeats)",
            )
        client.last_seen = now
        if r.t in ("hb", "bye", "create_runtime"):
            msg = env.parse()
            if isinstance(msg, Bye):
                self._client_lost(ident, "it said goodbye")
            elif isinstance(msg, CreateRuntime):
                self._create(client, msg)
            return
        rt = self._owned(client, r)  # another client's runtime stays unknown, whatever the message holds
        msg = env.parse()
        if isinstance(msg, RUNTIME_REQUESTS):
            self._check_inflight(client)
            if (client.session, msg.id) in self.down:
                raise ProtocolError(E_BAD_MESSAGE, f"request id {msg.id} is already in flight")
            self._pend(client, msg.id, Pending(rt.daemon, rt.rt, type(msg)))
            self._send(DAEMON, rt.daemon, msg.replace(c=client.session))
            return
        pending = self.up.get((rt.daemon, msg.id))  # ok / error answering a daemon's fetch callback
        if pending is None or pending.peer != ident:
            raise ProtocolError(E_BAD_MESSAGE, f"no callback {msg.id} is waiting for an answer")
        del self.up[(rt.daemon, msg.id)]
        self._send(DAEMON, rt.daemon, msg.replace(rt=None))

    def _refuse_client(self, ident: bytes, r: Route, exc: ProtocolError) -> None:
        """Answer a refused client message. A refused answer to a daemon's callback fails that
        callback, and the client hears of it without an id: its own request ids are another space."""
        self.ratelog.warning(
            "refused client messages", "refused a message from client %s: %s", ident.hex(), exc.message, now=self._now
        )
        if r.t not in ("ok", "error"):
            self._send(CLIENT, ident, error(exc.code, exc.message, r.id))
            return
        rt = self.runtimes.get(r.rt) if r.rt is not None else None
        if rt is not None and rt.owner == ident and r.id is not None:
            pending = self.up.get((rt.daemon, r.id))
            if pending is not None and pending.peer == ident:
                del self.up[(rt.daemon, r.id)]
                why = f"the client's answer was refused: {exc.message}"
                self._send(DAEMON, rt.daemon, error(exc.code, why, r.id))
        self._send(CLIENT, ident, error(exc.code, exc.message))

    def _impostor(self, client: Client, now: float) -> None:
        """Only the key that opened a session may use it, whatever routing id a peer presents
        (with CURVE; without it both keys are None). Refused unread: nothing of the session changes."""
        self._strike(CLIENT, client.ident, now)
        self.ratelog.warning(
            "impostors", "refused a message for client %s from another CURVE key", client.ident.hex(), now=now
        )
        self._send(CLIENT, client.ident, error(E_UNKNOWN_CLIENT, "unknown client: this session belongs to another key"))

    def _owned(self, client: Client, r: Route) -> Runtime:
        """The client's runtime a message names, judged before the message's other fields."""
        if r.id is None:
            raise ProtocolError(E_BAD_MESSAGE, f"{r.t!r} needs field 'id' (id)")
        if r.rt is None:
            raise ProtocolError(E_BAD_MESSAGE, f"{r.t!r} needs field 'rt' (str)")
        rt = self.runtimes.get(r.rt)
        if rt is not None and rt.owner == client.ident:
            return rt
        lost = self.tombstones.get((client.ident, r.rt))
        if lost is not None:
            code = lost[0] if lost[0] in LIMIT_CODES else E_RUNTIME_LOST
            raise ProtocolError(code, f"runtime {r.rt} is gone: {lost[1]}")
        raise ProtocolError(E_UNKNOWN_RUNTIME, f"no runtime {r.rt} belongs to this client")

    def _check_inflight(self, client: Client) -> None:
        if client.inflight >= self.max_inflight_per_client:
            raise ProtocolError(
                E_QUOTA, f"too many requests in flight: at most {self.max_inflight_per_client} per client"
            )

    def _create(self, client: Client, msg: CreateRuntime) -> None:
        if len(client.runtimes) >= self.max_runtimes_per_client:
            raise ProtocolError(E_QUOTA, f"too many runtimes: at most {self.max_runtimes_per_client} per client")
        self._check_inflight(client)
        if (client.session, msg.id) in self.down:
            raise ProtocolError(E_BAD_MESSAGE, f"request id {msg.id} is already in flight")
        daemon = self._choose()
        if daemon is None:
            reason = "no daemon is connected" if not self.daemons else "every daemon is at capacity"
            raise ProtocolError(E_NO_DAEMON, f"cannot place a runtime: {reason}")
        rt = Runtime(uuid.uuid4().hex, client.ident, daemon.ident)
        self.runtimes[rt.rt] = rt
        daemon.runtimes.add(rt.rt)
        client.runtimes.add(rt.rt)
        placed = msg.replace(c=client.session, rt=rt.rt, owner=client.token, owner_key=client.key)
        self._pend(client, msg.id, Pending(daemon.ident, rt.rt, CreateRuntime, placed=placed))
        self._send(DAEMON, daemon.ident, placed)

    def _choose(self) -> Daemon | None:
        """The daemon for a new runtime: the most free room, among those heard from within FRESH
        heartbeats if any has room (one silent for longer may be stopped or dying; docs/design.md 5.1)."""
        live = [d for d in self.daemons.values() if d.free > 0]
        fresh = [d for d in live if self._now - d.last_seen <= self.heartbeat * liveness.FRESH]
        return max(fresh or live, key=lambda d: d.free, default=None)  # ties: the earliest registered

    def _place_again(self, pending: Pending) -> bool:
        """A create its daemon never answered (the daemon was lost): send it to another daemon with
        room, under the same runtime id, so the client never hears of the loss. False if none has room."""
        rt = self.runtimes.get(pending.rt)
        daemon = self._choose()
        if rt is None or daemon is None or pending.placed is None:
            return False
        rt.daemon = pending.peer = daemon.ident
        daemon.runtimes.add(rt.rt)
        self._send(DAEMON, daemon.ident, pending.placed)
        return True

    def _client_lost(self, ident: bytes, why: str) -> None:
        client = self.clients.pop(ident, None)
        if client is None:
            return
        log.info("client %s lost (%s); disposing %d runtimes", ident.hex(), why, len(client.runtimes))
        for rt_id in list(client.runtimes):
            rt = self.runtimes.get(rt_id)
            if rt is not None:
                self._send(DAEMON, rt.daemon, Dispose(rt=rt_id))
                self._forget(rt_id)  # also drops its callbacks: the dispose ends them at the daemon
        for key, pending in list(self.down.items()):
            if key[0] == client.session:
                if pending.kind is CreateRuntime:
                    pending.orphan = True  # the runtime it creates must not outlive its client
                else:
                    del self.down[key]

    # ---- daemons -------------------------------------------------------------------------------------

    def _daemon_message(
        self, ident: bytes, msg: Record | Reply, frames: list[Any], sender_key: bytes | None, now: float
    ) -> None:
        if isinstance(msg, Ready):
            self._register(ident, msg, sender_key, now)
            return
        daemon = self.daemons.get(ident)
        if daemon is None:  # dropped after a silence (e.g. it was stopped), or the broker restarted
            if isinstance(msg, Heartbeat):  # tell it at once: it registers again (the rest is dropped)
                self._strike(DAEMON, ident, now)
                self._send(DAEMON, ident, error(E_UNKNOWN_CLIENT, "unknown daemon: register again"))
            return
        daemon.last_seen = now
        if isinstance(msg, Heartbeat):
            daemon.load = daemon.load if msg.load is None else msg.load
        elif isinstance(msg, (Reply, ErrorReply)):
            self._daemon_reply(daemon, msg)
        else:  # fetch, console, runtime_lost: about one of this daemon's runtimes
            rt = self.runtimes.get(msg.rt)
            if rt is None or rt.daemon != ident:
                if isinstance(msg, Fetch):
                    self._send(DAEMON, ident, error(E_UNKNOWN_RUNTIME, "no such runtime", msg.id))
                return
            if isinstance(msg, Fetch):
                self.up[(ident, msg.id)] = Pending(rt.owner, rt.rt, Fetch)
            elif isinstance(msg, RuntimeLost):
                self._bury(rt, msg.code, msg.message)
            self._send(CLIENT, rt.owner, frames)  # byte-for-byte, as received

    def _register(self, ident: bytes, msg: Ready, sender_key: bytes | None, now: float) -> None:
        if ident in self.daemons:
            self._daemon_lost(ident, "it registered again")
        daemon = self.daemons[ident] = Daemon(
            ident,
            ident.hex() if msg.name is None else msg.name,
            max(0, msg.capacity),
            msg.control,
            now,
            load=msg.load,
            # with CURVE, the key it authenticated with, never one it merely claims
            key=sender_key.decode() if sender_key else msg.key,
        )
        log.info("daemon %s joined (capacity %d)", daemon.name, daemon.capacity)
        self._send(DAEMON, ident, Welcome(heartbeat_ms=self._heartbeat_ms))

    def _daemon_reply(self, daemon: Daemon, msg: Reply | ErrorReply) -> None:
        assert msg.c is not None and msg.id is not None  # the daemon link requires both
        key = (msg.c, msg.id)
        pending = self.down.get(key)
        if pending is None or pending.peer != daemon.ident:
            return  # the client is gone, or the request was already answered
        # an ok's fields depend on the request; one that does not fit is refused (_refuse_daemon)
        reply = msg.parse(REPLY_OF[pending.kind]) if isinstance(msg, Reply) else msg
        ok = isinstance(msg, Reply)
        self._unpend(key)
        if pending.orphan:  # its client left while the runtime was being created
            if ok:
                self._send(DAEMON, daemon.ident, Dispose(rt=pending.rt))
            return
        if pending.kind is CreateRuntime and pending.rt in self.runtimes:
            if ok:  # where the client's control link and pipes go (empty values are left out)
                reply = reply.replace(control=daemon.control, daemon=daemon.name or None, daemon_key=daemon.key or None)
            else:
                self._forget(pending.rt)
        elif pending.kind is Dispose and ok:
            self._forget(pending.rt)
        self._send(CLIENT, pending.client, reply.replace(c=None))

    def _refuse_daemon(self, ident: bytes, r: Route, exc: ProtocolError) -> None:
        """A refused reply fails the client request it answers; a refused fetch fails at the daemon."""
        self.ratelog.warning(
            "refused daemon messages", "refused a message from daemon %s: %s", ident.hex(), exc.message, now=self._now
        )
        if r.t in ("ok", "error") and r.c is not None and r.id is not None:
            pending = self.down.get((r.c, r.id))
            if pending is None or pending.peer != ident:
                return
            self._unpend((r.c, r.id))
            if pending.kind in (CreateRuntime, Dispose):  # the runtime must not stay half-known
                self._send(DAEMON, ident, Dispose(rt=pending.rt))
                self._forget(pending.rt)
            if not pending.orphan:
                why = f"the daemon's reply was refused: {exc.message}"
                self._send(CLIENT, pending.client, error(exc.code, why, r.id))
        elif r.t == "fetch" and r.id is not None:
            self._send(DAEMON, ident, error(exc.code, exc.message, r.id))

    def _daemon_lost(self, ident: bytes, why: str) -> None:
        daemon = self.daemons.pop(ident, None)
        if daemon is None:
            return
        message = f"daemon {daemon.name} was lost ({why})"
        log.warning("%s; %d runtimes lost", message, len(daemon.runtimes))
        for key, pending in list(self.down.items()):
            if pending.peer == ident:
                if pending.kind is CreateRuntime and not pending.orphan and self._place_again(pending):
                    daemon.runtimes.discard(pending.rt)
                    log.info("runtime %s placed again on %s", pending.rt, self.daemons[pending.peer].name)
                    continue
                self._unpend(key)
                if not pending.orphan:
                    self._send(CLIENT, pending.client, error(E_RUNTIME_LOST, message, key[1]))
        for key in [k for k in self.up if k[0] == ident]:
            del self.up[key]
        for rt_id in list(daemon.runtimes):
            rt = self.runtimes.get(rt_id)
            if rt is not None:
                self._bury(rt, E_RUNTIME_LOST, message)
                self._send(CLIENT, rt.owner, RuntimeLost(rt=rt_id, code=E_RUNTIME_LOST, message=message))

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


def _open(frames: list[Any], link: Link) -> Envelope:
    """Refuse oversized frames before even looking at them, then the checks every link applies."""
    too_big = next((len(f) for f in frames if len(f) > MAX_FRAME), None)
    if too_big is not None:
        raise ProtocolError(E_TOO_LARGE, f"a frame of {too_big} bytes exceeds {MAX_FRAME}")
    return link.open(frames)
