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
    CALLBACKS,
    CLIENT_TO_BROKER,
    DAEMON_TO_BROKER,
    REPLY_OF,
    RUNTIME_REQUESTS,
    Acquire,
    Bye,
    CreateOk,
    CreateRuntime,
    Dispose,
    ErrorReply,
    Heartbeat,
    Ready,
    Record,
    Reply,
    RuntimeLost,
    Status,
    StatusOk,
    Welcome,
    error,
)
from wire.protocol import (
    E_BAD_MESSAGE,
    E_NO_DAEMON,
    E_QUOTA,
    E_RUNTIME_LOST,
    E_TOO_LARGE,
    E_UNAVAILABLE,
    E_UNKNOWN_CLIENT,
    E_UNKNOWN_DAEMON,
    E_UNKNOWN_RUNTIME,
    LIMIT_CODES,
    MAX_FRAME,
    MAX_NAME,
    ProtocolError,
    new_id,
)
from wire.ratelog import RateLog
from wire.schema import Envelope, Link, Route, route

log = logging.getLogger("sandbox_mesh.broker")

#: How many lost runtime ids are remembered, so late callers get "runtime_lost", not "unknown".
TOMBSTONES = 10_000
#: Default of ``--max-runtimes-per-client``: runtimes one client may hold (being created or live).
MAX_RUNTIMES_PER_CLIENT = 64
#: Default of ``--max-keep-alive``: the longest a named runtime may outlive its session (seconds).
MAX_KEEP_ALIVE = 3600.0
#: A named runtime created without ``keep_alive_ms`` outlives its session this long (seconds).
DEFAULT_KEEP_ALIVE = 60.0
#: Default of ``--max-inflight-per-client``: requests of one client a daemon has not answered yet.
MAX_INFLIGHT_PER_CLIENT = 4096
#: Rows of each list in a ``status`` report (the busiest first), so that it fits in one header
#: (MAX_HEADER) however many daemons and sessions there are; the totals are always given.
STATUS_ROWS = 100
#: A ``status`` report is built at most this often (seconds); askers in between get the last one.
STATUS_EVERY = 0.5
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
    pipes: int | None = None  # body pipes open, as its last heartbeat said (status)
    warm: int | None = None  # pre-started runtimes ready, as its last heartbeat said (status)
    key: str | None = None  # CURVE public key (Z85), handed to clients for the direct sockets
    runtimes: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - max(self.load, len(self.runtimes))


@dataclass(slots=True)
class Client:
    """A connected session. Its runtimes belong to its ``token``, not to this connection: a
    client that reconnects (to this broker after a restart, or to a standby) and says hello with
    the token resumes them (protocol.md 3.3, Recovery)."""

    ident: bytes  # its routing id at the frontend: never leaves the broker
    token: bytes  # the session secret: owner of its runtimes, its control-link identity
    last_seen: float
    key: bytes | None = None  # CURVE public key the gate admitted it with; every message must match it
    session: bytes = field(default_factory=new_id)  # what daemons know it by (``c``)
    inflight: int = 0  # its entries in Core.down
    resumed: bool = False  # it said hello with the token of an earlier session


@dataclass(slots=True)
class Runtime:
    rt: str
    owner: bytes  # the owning session's token
    daemon: bytes
    owner_key: bytes | None = None
    name: str | None = None
    keep_alive: float = 0.0  # seconds it outlives its session (named runtimes)
    reclaim_at: float | None = None  # while its session is away: when it is disposed
    ready: bool = True  # False while its create_runtime is pending


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
        reclaim_grace: float | None = None,
        max_keep_alive: float = MAX_KEEP_ALIVE,
    ) -> None:
        self.heartbeat = heartbeat
        self.daemon_liveness = daemon_liveness
        self.client_liveness = client_liveness
        self.max_runtimes_per_client = max_runtimes_per_client
        self.max_inflight_per_client = max_inflight_per_client
        #: how long the runtimes of a session that went silent wait for it to come back
        self.reclaim_grace = heartbeat * client_liveness if reclaim_grace is None else reclaim_grace
        self.max_keep_alive = max_keep_alive
        self.sessions: dict[bytes, Client] = {}  # token -> its connected client
        self.owned: dict[bytes, set[str]] = {}  # token -> its runtimes (connected or not)
        self.born: float | None = None  # when the first message or tick arrived
        self.daemons: dict[bytes, Daemon] = {}
        self.clients: dict[bytes, Client] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.down: dict[tuple[bytes, int], Pending] = {}  # (client session, id) -> daemon
        self.up: dict[tuple[bytes, int], Pending] = {}  # (daemon, id) -> client
        self.tombstones: OrderedDict[str, tuple[bytes, str, str]] = OrderedDict()  # rt -> owner, code, why
        self.budget = Budget(REFUSAL_BUDGET, REFUSAL_WINDOW)  # per (CLIENT or DAEMON, routing id)
        self.ratelog = RateLog(log)
        self._now = 0.0
        self._out: list[Out] = []
        self._status: tuple[float, dict[str, Any]] | None = None  # the last report, and when

    # ---- what the shell calls; each returns the messages to send -------------------------------------

    def from_client(self, ident: bytes, frames: list[Any], sender_key: bytes | None, now: float) -> list[Out]:
        """A message from a client; ``sender_key`` is the CURVE key the gate admitted it with."""
        self._now = now
        self.born = now if self.born is None else self.born
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
        self.born = now if self.born is None else self.born
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
        self.born = now if self.born is None else self.born
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
        for rt in [r for r in self.runtimes.values() if r.reclaim_at is not None and now >= r.reclaim_at]:
            self._send(DAEMON, rt.daemon, Dispose(rt=rt.rt))
            self._bury(rt, E_RUNTIME_LOST, "reclaimed: its session did not come back in time")
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
                "%s sent %d refused messages within %gs: its messages are dropped unread until %gs have passed",
                self.peer(side, ident),
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
                "dropped %d messages of %s unread (over its refusal budget)",
                dropped,
                self.peer(side, ident),
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
            opened = client is None or (hello.session is not None and hello.session != client.token)
            if opened:
                client = self._open_session(ident, hello.session, sender_key, now)
            assert client is not None
            self._send(CLIENT, ident, Welcome(id=hello.id, token=client.token, heartbeat_ms=self._heartbeat_ms))
            for rt_id, (owner, code, message) in self.tombstones.items() if opened and client.resumed else ():
                if owner == client.token:  # lost while it was away: it fails their calls and bodies now
                    self._send(CLIENT, ident, RuntimeLost(rt=rt_id, code=code, message=message))
            return
        if client is None:
            raise ProtocolError(
                E_UNKNOWN_CLIENT,
                "unknown client: say hello first (the broker may have "
                "restarted, or dropped this client after missed heartbeats)",
            )
        client.last_seen = now
        if r.t in ("hb", "bye", "create_runtime", "acquire", "status"):
            msg = env.parse()
            if isinstance(msg, Status):
                if self._status is None or now - self._status[0] >= STATUS_EVERY:
                    self._status = (now, self.status(now))
                report = {**self._status[1], "asker": client.session.hex()[:12]}  # so the CLI can leave itself out
                self._send(CLIENT, ident, StatusOk(id=msg.id, report=report))
            elif isinstance(msg, Bye):
                self._client_lost(ident, "it said goodbye", left=True)
            elif isinstance(msg, CreateRuntime):
                self._create(client, msg)
            elif isinstance(msg, Acquire):
                self._acquire(client, msg)
            return
        rt = self._owned(client, r)  # another client's runtime stays unknown, whatever the message holds
        msg = env.parse()
        if isinstance(msg, RUNTIME_REQUESTS):
            self._check_inflight(client)
            if (client.session, msg.id) in self.down:
                raise ProtocolError(E_BAD_MESSAGE, f"request id {msg.id} is already in flight")
            self._pend(client, msg.id, Pending(rt.daemon, rt.rt, type(msg)))
            self._send(DAEMON, rt.daemon, env.forward(c=client.session))  # checked: packed as received
            return
        pending = self.up.get((rt.daemon, msg.id))  # ok / error answering a daemon's fetch callback
        if pending is None or pending.peer != ident:
            raise ProtocolError(E_BAD_MESSAGE, f"no callback {msg.id} is waiting for an answer")
        del self.up[(rt.daemon, msg.id)]
        self._send(DAEMON, rt.daemon, env.forward(rt=None))

    def _refuse_client(self, ident: bytes, r: Route, exc: ProtocolError) -> None:
        """Answer a refused client message. A refused answer to a daemon's callback fails that
        callback, and the client hears of it without an id: its own request ids are another space."""
        self.ratelog.warning(
            "refused client messages",
            "refused a message from %s: %s",
            self.peer(CLIENT, ident),
            exc.message,
            now=self._now,
        )
        if r.t not in ("ok", "error", "tool_result", "module_ok"):
            self._send(CLIENT, ident, error(exc.code, exc.message, r.id))
            return
        rt = self.runtimes.get(r.rt) if r.rt is not None else None
        client = self.clients.get(ident)
        if rt is not None and client is not None and rt.owner == client.token and r.id is not None:
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
            "impostors", "refused a message for %s from another CURVE key", self.peer(CLIENT, client.ident), now=now
        )
        self._send(CLIENT, client.ident, error(E_UNKNOWN_CLIENT, "unknown client: this session belongs to another key"))

    def _owned(self, client: Client, r: Route) -> Runtime:
        """The client's runtime a message names, judged before the message's other fields."""
        if r.id is None:
            raise ProtocolError(E_BAD_MESSAGE, f"{r.t!r} needs field 'id' (id)")
        if r.rt is None:
            raise ProtocolError(E_BAD_MESSAGE, f"{r.t!r} needs field 'rt' (str)")
        rt = self.runtimes.get(r.rt)
        if rt is not None and rt.owner == client.token:
            return rt
        lost = self.tombstones.get(r.rt)
        if lost is not None and lost[0] == client.token:
            code = lost[1] if lost[1] in LIMIT_CODES else E_RUNTIME_LOST
            raise ProtocolError(code, f"runtime {r.rt} is gone: {lost[2]}")
        if rt is None and client.resumed and self.born is not None and self._now - self.born < self._settling:
            raise ProtocolError(
                E_UNAVAILABLE,
                f"runtime {r.rt} is not known yet: this broker started {self._now - self.born:.1f}s ago and "
                "its daemon may not have registered again; retry",
            )
        raise ProtocolError(E_UNKNOWN_RUNTIME, f"no runtime {r.rt} belongs to this client")

    @property
    def _settling(self) -> float:
        """How long after its start the broker cannot tell an unknown runtime from one whose daemon
        has not registered again yet: the daemons' liveness timeout plus a heartbeat."""
        return self.heartbeat * (self.daemon_liveness + 1)

    def _open_session(self, ident: bytes, token: bytes | None, key: bytes | None, now: float) -> Client:
        """A new session, or the resumption of ``token``'s: by the same client after a broker restart
        or failover, or by a new process that holds the token. With CURVE the key must match the one
        the session's runtimes were created with."""
        if token is not None:
            old = self.sessions.get(token)
            keys = {self.runtimes[rt].owner_key for rt in self.owned.get(token, ())}
            if old is not None:
                keys.add(old.key)
            if keys - {key}:
                raise ProtocolError(E_UNKNOWN_CLIENT, "unknown client: this session belongs to another key")
            if old is not None and old.ident != ident:
                self._client_lost(old.ident, "its session was resumed by another connection", resumed=True)
        if ident in self.clients:
            self._client_lost(ident, "it started another session", left=True)
        client = self.clients[ident] = Client(ident, token or new_id(), now, key=key, resumed=token is not None)
        self.sessions[client.token] = client
        for rt_id in self.owned.get(client.token, ()):
            self.runtimes[rt_id].reclaim_at = None
        return client

    def _acquire(self, client: Client, msg: Acquire) -> None:
        for rt_id in self.owned.get(client.token, ()):
            rt = self.runtimes[rt_id]
            daemon = self.daemons.get(rt.daemon)
            if rt.name == msg.name and daemon is not None and rt.ready:
                self._send(CLIENT, client.ident, self._created(CreateOk(id=msg.id, rt=rt.rt), daemon))
                return
        raise ProtocolError(E_UNKNOWN_RUNTIME, f"this session has no runtime named {msg.name!r}")

    @staticmethod
    def _created(reply: CreateOk, daemon: Daemon) -> CreateOk:
        """A create's ``ok`` with where the client's control link and pipes go (empty values left out)."""
        return reply.replace(control=daemon.control, daemon=daemon.name or None, daemon_key=daemon.key or None)

    def _check_inflight(self, client: Client) -> None:
        if client.inflight >= self.max_inflight_per_client:
            raise ProtocolError(
                E_QUOTA, f"too many requests in flight: at most {self.max_inflight_per_client} per client"
            )

    def _create(self, client: Client, msg: CreateRuntime) -> None:
        owned = self.owned.setdefault(client.token, set())
        if len(owned) >= self.max_runtimes_per_client:
            raise ProtocolError(E_QUOTA, f"too many runtimes: at most {self.max_runtimes_per_client} per client")
        self._check_inflight(client)
        if (client.session, msg.id) in self.down:
            raise ProtocolError(E_BAD_MESSAGE, f"request id {msg.id} is already in flight")
        daemon = self._choose()
        if daemon is None:
            reason = "no daemon is connected" if not self.daemons else "every daemon is at capacity"
            raise ProtocolError(E_NO_DAEMON, f"cannot place a runtime: {reason}")
        keep_alive = 0.0
        if msg.name is not None:
            if not 0 < len(msg.name) <= MAX_NAME:
                raise ProtocolError(E_BAD_MESSAGE, f"a runtime name has 1-{MAX_NAME} characters")
            if any(self.runtimes[r].name == msg.name for r in owned):
                raise ProtocolError(E_BAD_MESSAGE, f"this session already has a runtime named {msg.name!r}")
            keep_alive = DEFAULT_KEEP_ALIVE if msg.keep_alive_ms is None else msg.keep_alive_ms / 1000
        elif msg.keep_alive_ms is not None:
            raise ProtocolError(E_BAD_MESSAGE, "keep_alive_ms needs a name (only named runtimes outlive a session)")
        if not 0 <= keep_alive <= self.max_keep_alive:
            raise ProtocolError(E_BAD_MESSAGE, f"keep_alive_ms must be 0-{self.max_keep_alive * 1000:.0f}")
        rt = Runtime(uuid.uuid4().hex, client.token, daemon.ident, client.key, msg.name, keep_alive, ready=False)
        self.runtimes[rt.rt] = rt
        daemon.runtimes.add(rt.rt)
        owned.add(rt.rt)
        placed = msg.replace(
            c=client.session, rt=rt.rt, owner=client.token, owner_key=client.key,
            keep_alive_ms=int(keep_alive * 1000) if msg.name is not None else None,
        )  # fmt: skip
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

    def _client_lost(self, ident: bytes, why: str, *, left: bool = False, resumed: bool = False) -> None:
        """A session's connection is gone. If it ``left`` (bye), its unnamed runtimes are disposed
        now; if it went silent, they wait ``reclaim_grace`` for it to come back; named ones wait
        their ``keep_alive`` either way (docs/design.md 2.14). ``resumed``: another connection
        holds the session now, nothing is reclaimed."""
        name = self.peer(CLIENT, ident)
        client = self.clients.pop(ident, None)
        if client is None:
            return
        if self.sessions.get(client.token) is client:
            del self.sessions[client.token]
        owned = self.owned.get(client.token, set())
        log.info("%s lost (%s); %d runtimes", name, why, len(owned))
        for rt_id in list(owned) if not resumed else ():
            rt = self.runtimes[rt_id]
            wait = rt.keep_alive if rt.name is not None else 0.0 if left else self.reclaim_grace
            if wait > 0:
                rt.reclaim_at = self._now + wait
            else:
                log.info("runtime %s of %s disposed on daemon %s: its owner %s", rt_id, name,
                         self._daemon_name(rt.daemon), "left" if left else "is gone")  # fmt: skip
                self._send(DAEMON, rt.daemon, Dispose(rt=rt_id))
                self._forget(rt_id)  # also drops its callbacks: the dispose ends them at the daemon
        for key, pending in list(self.up.items()):  # its guests' fetches: nobody will answer them
            if pending.peer == ident:
                del self.up[key]
                self._send(DAEMON, key[0], error(E_UNAVAILABLE, f"the runtime's owner is gone ({why})", key[1]))
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
                self._send(DAEMON, ident, error(E_UNKNOWN_DAEMON, "unknown daemon: register (ready) again"))
            return
        daemon.last_seen = now
        if isinstance(msg, Heartbeat):
            daemon.load = daemon.load if msg.load is None else msg.load
            daemon.pipes, daemon.warm = msg.pipes, msg.warm
        elif isinstance(msg, (Reply, ErrorReply)):
            self._daemon_reply(daemon, msg)
        else:  # fetch, console, runtime_lost: about one of this daemon's runtimes
            rt = self.runtimes.get(msg.rt)
            if rt is None or rt.daemon != ident:
                if isinstance(msg, CALLBACKS):
                    self._send(DAEMON, ident, error(E_UNKNOWN_RUNTIME, "no such runtime", msg.id))
                return
            owner = self.sessions.get(rt.owner)
            if isinstance(msg, RuntimeLost):
                self._bury(rt, msg.code, msg.message)
            elif owner is None:  # its session is away (reconnecting, or gone for good)
                if isinstance(msg, CALLBACKS):
                    why = "the runtime's owner is not connected"
                    self._send(DAEMON, ident, error(E_UNAVAILABLE, why, msg.id))
                return
            elif isinstance(msg, CALLBACKS):
                self.up[(ident, msg.id)] = Pending(owner.ident, rt.rt, type(msg))
            if owner is not None:
                self._send(CLIENT, owner.ident, frames)  # byte-for-byte, as received

    def _register(self, ident: bytes, msg: Ready, sender_key: bytes | None, now: float) -> None:
        """A daemon (re)joins with the runtimes it hosts: those this broker knows move to it, those
        it never saw are adopted (it restarted, or is the standby), those it declared lost are
        disposed (the daemon was dropped, e.g. after a long pause). A session that is not connected
        gets ``reclaim_grace`` (or a named runtime's keep_alive) to come back (protocol.md 3.3, Recovery)."""
        old = [d.ident for d in self.daemons.values() if d.ident == ident or (msg.name and d.name == msg.name)]
        daemon = Daemon(
            ident,
            ident.hex() if msg.name is None else msg.name,
            max(0, msg.capacity),
            msg.control,
            now,
            load=msg.load,
            # with CURVE, the key it authenticated with, never one it merely claims
            key=sender_key.decode() if sender_key else msg.key,
        )
        for held in msg.runtimes:
            rt = self.runtimes.get(held.rt)
            if held.rt in self.tombstones:
                self._send(DAEMON, ident, Dispose(rt=held.rt))
                continue
            if rt is None:
                wait = max(self.reclaim_grace, (held.keep_alive_ms or 0) / 1000)
                rt = self.runtimes[held.rt] = Runtime(
                    held.rt, held.owner, ident, held.owner_key, held.name, (held.keep_alive_ms or 0) / 1000,
                    reclaim_at=None if held.owner in self.sessions else now + wait,
                )  # fmt: skip
                self.owned.setdefault(held.owner, set()).add(held.rt)
            elif (d := self.daemons.get(rt.daemon)) is not None:
                d.runtimes.discard(held.rt)
            rt.daemon = ident
            daemon.runtimes.add(held.rt)
        for gone in old:  # what it no longer lists is lost
            self._daemon_lost(gone, "it registered again")
        self.daemons[ident] = daemon
        self._send(DAEMON, ident, Welcome(heartbeat_ms=self._heartbeat_ms))
        log.info("daemon %s joined (capacity %d, %d runtimes)", daemon.name, daemon.capacity, len(msg.runtimes))

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
            self._forget(pending.rt)
            return
        if pending.kind is CreateRuntime and pending.rt in self.runtimes:
            if ok:
                rt = self.runtimes[pending.rt]
                rt.ready = True
                reply = self._created(reply, daemon)
                log.info("runtime %s created on daemon %s for %s%s", rt.rt, daemon.name, self._owner(rt.owner),
                         f" (named {rt.name!r})" if rt.name else "")  # fmt: skip
            else:
                self._forget(pending.rt)
        elif pending.kind is Dispose and ok:
            log.info("runtime %s disposed on daemon %s by its owner %s", pending.rt, daemon.name,
                     self._owner(self.runtimes[pending.rt].owner) if pending.rt in self.runtimes else "?")  # fmt: skip
            self._forget(pending.rt)
        self._send(CLIENT, pending.client, reply.replace(c=None))

    def _refuse_daemon(self, ident: bytes, r: Route, exc: ProtocolError) -> None:
        """A refused reply fails the client request it answers; a refused fetch fails at the daemon."""
        self.ratelog.warning(
            "refused daemon messages",
            "refused a message from %s: %s",
            self.peer(DAEMON, ident),
            exc.message,
            now=self._now,
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
        elif r.t in ("fetch", "tool", "module") and r.id is not None:
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
                if pending.orphan:
                    continue
                rt = self.runtimes.get(pending.rt)
                if rt is not None and rt.daemon != ident:  # it lives on, on the daemon's new registration
                    why = f"{message}; the runtime lives on, retry"
                    self._send(CLIENT, pending.client, error(E_UNAVAILABLE, why, key[1]))
                else:
                    self._send(CLIENT, pending.client, error(E_RUNTIME_LOST, message, key[1]))
        for key in [k for k in self.up if k[0] == ident]:
            del self.up[key]
        for rt_id in list(daemon.runtimes):
            rt = self.runtimes.get(rt_id)
            if rt is not None:
                self._bury(rt, E_RUNTIME_LOST, message)
                if (owner := self.sessions.get(rt.owner)) is not None:
                    self._send(CLIENT, owner.ident, RuntimeLost(rt=rt_id, code=E_RUNTIME_LOST, message=message))

    def peer(self, side: Literal["client", "daemon"], ident: bytes) -> str:
        """A peer as logs name it: a daemon by its name, a client by its session's ``c`` (and CURVE
        key); a routing id (hex) only for a peer that never registered or said hello."""
        if side == DAEMON:
            daemon = self.daemons.get(ident)
            return f"daemon {daemon.name}" if daemon is not None else f"unregistered daemon {ident.hex()}"
        client = self.clients.get(ident)
        if client is None:
            return f"client {ident.hex()} (no session)"
        return f"client c={client.session.hex()[:12]}" + (f" key={client.key.decode()[:8]}" if client.key else "")

    def _owner(self, token: bytes) -> str:
        client = self.sessions.get(token)
        return self.peer(CLIENT, client.ident) if client is not None else "a session not connected"

    def _daemon_name(self, ident: bytes) -> str:
        daemon = self.daemons.get(ident)
        return daemon.name if daemon is not None else "?"

    # ---- read-only views (status, metrics) ------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """What ``python -m broker status`` prints. Sessions are named by their ``c`` (what daemons
        know them by), never by token or routing id: a status reader must not learn a session's secret."""
        per_session: dict[bytes, list[Runtime]] = {}
        for rt in self.runtimes.values():
            per_session.setdefault(rt.owner, []).append(rt)
        daemons = sorted(self.daemons.values(), key=lambda d: -len(d.runtimes))[:STATUS_ROWS]
        clients = sorted(self.clients.values(), key=lambda c: -len(per_session.get(c.token, ())))[:STATUS_ROWS]
        return {
            "uptime_s": round(now - self.born, 1) if self.born is not None else 0.0,
            "daemons_total": len(self.daemons),
            "sessions_total": len(self.clients),
            "daemons": [
                {
                    "name": d.name[:MAX_NAME],
                    "control": d.control,
                    "capacity": d.capacity,
                    "runtimes": len(d.runtimes),
                    "load": d.load,
                    "pipes": d.pipes,
                    "warm": d.warm,
                    "last_heartbeat_s": round(now - d.last_seen, 2),
                }
                for d in daemons
            ],
            "sessions": [
                {
                    "c": c.session.hex()[:12],
                    "key": c.key.decode() if c.key else None,
                    "runtimes": len(per_session.get(c.token, ())),
                    "named": sum(rt.name is not None for rt in per_session.get(c.token, ())),
                    "in_flight": c.inflight,
                    "last_heartbeat_s": round(now - c.last_seen, 2),
                }
                for c in clients
            ],
            "away": {  # sessions not connected whose runtimes wait to be reclaimed or resumed
                "sessions": sum(token not in self.sessions for token in per_session),
                "runtimes": sum(len(rts) for token, rts in per_session.items() if token not in self.sessions),
            },
            "runtimes": len(self.runtimes),
            "requests_in_flight": len(self.down),
            "callbacks_in_flight": len(self.up),
            "tombstones": len(self.tombstones),
        }

    # ---- bookkeeping ---------------------------------------------------------------------------------

    def _bury(self, rt: Runtime, code: str, message: str) -> None:
        log.info("runtime %s of %s lost on daemon %s: %s: %s", rt.rt, self._owner(rt.owner),
                 self._daemon_name(rt.daemon), code, message)  # fmt: skip
        self.tombstones[rt.rt] = (rt.owner, code, message)
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
        owned = self.owned.get(rt.owner)
        if owned is not None:
            owned.discard(rt_id)
            if not owned and rt.owner not in self.sessions:
                del self.owned[rt.owner]


def _open(frames: list[Any], link: Link) -> Envelope:
    """Refuse oversized frames before even looking at them, then the checks every link applies."""
    too_big = next((len(f) for f in frames if len(f) > MAX_FRAME), None)
    if too_big is not None:
        raise ProtocolError(E_TOO_LARGE, f"a frame of {too_big} bytes exceeds {MAX_FRAME}")
    return link.open(frames)
