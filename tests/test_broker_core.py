"""The broker's decisions without sockets or processes: broker.core fed with frames, and every
message it sends compared exactly (refusals: protocol.md 2.2; daemon loss, client loss, runtime
states and heartbeats: docs/design.md 2.13, 2.14, 3.1 and 5.1)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import broker.core
from broker.core import CLIENT, DAEMON, Core, Out
from wire import protocol as P
from wire.messages import (
    BROKER_TO_CLIENT,
    BROKER_TO_DAEMON,
    Acquire,
    Bye,
    Console,
    CreateOk,
    CreateRuntime,
    Dispatch,
    DispatchOk,
    Dispose,
    DisposeOk,
    ErrorReply,
    Eval,
    EvalOk,
    Fetch,
    FetchOk,
    Heartbeat,
    Held,
    Hello,
    Ready,
    Record,
    RuntimeLost,
    Stats,
    StreamRef,
    Welcome,
    error,
)

A, B = b"client-a", b"client-b"
D1, D2 = b"daemon-1", b"daemon-2"
SID = b"s" * 16
RESP = StreamRef(b"r" * 16, "tcp://127.0.0.1:7000")
UNKNOWN_CLIENT = (
    "unknown client: say hello first (the broker may have restarted, or dropped this client after missed heartbeats)"
)


def raw(**header: Any) -> list[Any]:
    """The frames of a header no record would write (malformed on purpose)."""
    return [msgpack.packb({"v": 1, **header}, use_bin_type=True)]


def to_client(ident: bytes, msg: Record) -> Out:
    return Out(CLIENT, ident, msg.frames())


def to_daemon(ident: bytes, msg: Record) -> Out:
    return Out(DAEMON, ident, msg.frames())


def unknown(rt: str, mid: int | None = None) -> Record:
    return error(P.E_UNKNOWN_RUNTIME, f"no runtime {rt} belongs to this client", mid)


def bag(outs: list[Out]) -> list[tuple[Any, ...]]:
    """Messages without their order (a set's iteration order is not the protocol's)."""
    return sorted((o.to, o.ident, *(bytes(f) for f in o.frames)) for o in outs)


def fetch(rt: str, fid: int = 5) -> Fetch:
    return Fetch(id=fid, rt=rt, method="GET", url="http://up/", resp_sid=RESP.sid)


class World:
    """A core and a clock; clients and daemons are routing ids that send records or raw frames."""

    def __init__(self, **limits: int) -> None:
        self.core = Core(heartbeat=1.0, daemon_liveness=3, client_liveness=10, **limits)
        self.now = 0.0
        self.tokens: dict[bytes, bytes] = {}
        self.s: dict[bytes, bytes] = {}  # each client's session id: its ``c`` at the daemons
        self.keys: dict[bytes, bytes | None] = {}  # the CURVE key each client said hello with

    def client(self, ident: bytes, msg: Record | list[Any], key: Any = ...) -> list[Out]:
        """From client ``ident``, with the CURVE key it said hello with unless ``key`` is given."""
        key = self.keys.get(ident) if key is ... else key
        return self.core.from_client(ident, msg if isinstance(msg, list) else msg.frames(), key, self.now)

    def daemon(self, ident: bytes, msg: Record | list[Any], key: bytes | None = None) -> list[Out]:
        return self.core.from_daemon(ident, msg if isinstance(msg, list) else msg.frames(), key, self.now)

    def join(self, ident: bytes, capacity: int = 4, load: int = 0) -> None:
        ready = Ready(capacity=capacity, control=f"tcp://{ident.decode()}:1", name=ident.decode(), load=load)
        assert self.daemon(ident, ready) == [to_daemon(ident, Welcome(heartbeat_ms=1000))]

    def hello(self, ident: bytes, key: bytes | None = None) -> bytes:
        self.keys[ident] = key
        (out,) = self.client(ident, Hello(id=0), key)
        welcome = BROKER_TO_CLIENT.parse(out.frames)
        assert isinstance(welcome, Welcome) and welcome.token is not None
        assert out == to_client(ident, Welcome(id=0, token=welcome.token, heartbeat_ms=1000))
        self.tokens[ident] = welcome.token
        self.s[ident] = self.core.clients[ident].session
        assert self.s[ident] != ident and len(self.s[ident]) == 16  # daemons never learn the routing id
        return welcome.token

    def place(self, client: bytes, req_id: int = 1) -> tuple[bytes, str]:
        """Send a create_runtime; return the daemon it was placed on and the minted runtime id."""
        (out,) = self.client(client, CreateRuntime(id=req_id, console=True))
        fwd = BROKER_TO_DAEMON.parse(out.frames)
        assert isinstance(fwd, CreateRuntime) and fwd.rt is not None
        placed = CreateRuntime(
            id=req_id, console=True, c=self.s[client], rt=fwd.rt, owner=self.tokens[client], owner_key=self.keys[client]
        )
        assert out == to_daemon(out.ident, placed)
        return out.ident, fwd.rt

    def create(self, client: bytes, req_id: int = 1) -> tuple[bytes, str]:
        """A runtime created end to end: placed, and the daemon's ok forwarded to its client."""
        daemon, rt = self.place(client, req_id)
        name = daemon.decode()
        expect = CreateOk(id=req_id, rt=rt, pid=7, control=f"tcp://{name}:1", daemon=name)
        assert self.daemon(daemon, CreateOk(id=req_id, c=self.s[client], rt=rt, pid=7)) == [to_client(client, expect)]
        return daemon, rt


@pytest.fixture
def w() -> World:
    world = World()
    world.join(D1)
    world.hello(A)
    world.hello(B)
    return world


# ---- sessions ------------------------------------------------------------------------------------------


def test_hello_mints_one_token_per_client_and_the_broker_sets_owner_fields() -> None:
    w = World()
    token = w.hello(A, key=b"K" * 40)
    assert w.hello(A, key=b"K" * 40) == token  # a repeated hello: the same session
    assert w.hello(B) != token
    w.join(D1)
    (out,) = w.client(A, CreateRuntime(id=1))
    rt = BROKER_TO_DAEMON.parse(out.frames).rt
    assert out == to_daemon(D1, CreateRuntime(id=1, c=w.s[A], rt=rt, owner=token, owner_key=b"K" * 40))
    # whatever a client claims, the broker sets the route, the runtime id and the owner
    spoof = CreateRuntime(id=2, c=A, rt="mine", owner=token, owner_key=b"K" * 40)
    (out,) = w.client(B, spoof)
    rt = BROKER_TO_DAEMON.parse(out.frames).rt
    assert rt != "mine" and out == to_daemon(D1, CreateRuntime(id=2, c=w.s[B], rt=rt, owner=w.tokens[B]))


def test_anything_but_hello_from_an_unknown_client_is_unknown_client() -> None:
    w = World()
    w.join(D1)
    assert w.client(A, Eval(id=3, rt="x", source=b"1")) == [to_client(A, error(P.E_UNKNOWN_CLIENT, UNKNOWN_CLIENT, 3))]
    assert w.client(A, raw(t="eval", id=4)) == [to_client(A, error(P.E_UNKNOWN_CLIENT, UNKNOWN_CLIENT, 4))]
    assert w.client(A, Heartbeat()) == [to_client(A, error(P.E_UNKNOWN_CLIENT, UNKNOWN_CLIENT))]
    # an answer to a callback is told without its id: the client's own ids are another space
    assert w.client(A, FetchOk(id=5, rt="x", status=200)) == [to_client(A, error(P.E_UNKNOWN_CLIENT, UNKNOWN_CLIENT))]
    assert w.core.clients == {}


def test_bye_disposes_the_clients_runtimes_and_ends_the_session(w: World) -> None:
    _, rt = w.create(A)
    assert w.client(A, Bye()) == [to_daemon(D1, Dispose(rt=rt))]
    assert w.client(A, Eval(id=2, rt=rt, source=b"1")) == [to_client(A, error(P.E_UNKNOWN_CLIENT, UNKNOWN_CLIENT, 2))]
    assert w.core.runtimes == {} and w.core.daemons[D1].runtimes == set()


# ---- placement ---------------------------------------------------------------------------------------------


def test_placement_picks_the_daemon_with_the_most_free_capacity() -> None:
    w = World()
    w.hello(A)
    w.join(D1, capacity=2)
    w.join(D2, capacity=5)
    assert [w.place(A, i)[0] for i in range(1, 6)] == [D2, D2, D2, D1, D2]  # free: 2/5, 2/4, 2/3, 2/2, 1/2


def test_placement_ties_go_to_the_earliest_registered_and_full_daemons_refuse() -> None:
    w = World()
    w.hello(A)
    w.join(D1, capacity=2)
    w.join(D2, capacity=2)
    assert [w.place(A, i)[0] for i in range(1, 5)] == [D1, D2, D1, D2]
    why = "cannot place a runtime: every daemon is at capacity"
    assert w.client(A, CreateRuntime(id=5)) == [to_client(A, error(P.E_NO_DAEMON, why, 5))]
    assert len(w.core.runtimes) == 4


def test_free_capacity_is_capacity_minus_the_larger_of_load_and_placed_runtimes() -> None:
    w = World()
    w.hello(A)
    w.join(D1, capacity=4, load=3)  # 1 free
    w.join(D2, capacity=2)  # 2 free
    assert w.place(A, 1)[0] == D2  # now 1 and 1
    assert w.place(A, 2)[0] == D1  # a tie; one placed within D1's reported load of 3: still 1 free
    assert w.place(A, 3)[0] == D1  # the same tie again
    assert w.daemon(D1, Heartbeat(load=4)) == []  # D1 reports itself full
    assert w.place(A, 4)[0] == D2
    why = "cannot place a runtime: every daemon is at capacity"
    assert w.client(A, CreateRuntime(id=5)) == [to_client(A, error(P.E_NO_DAEMON, why, 5))]


def test_no_daemon_and_a_negative_capacity() -> None:
    w = World()
    w.hello(A)
    why = "cannot place a runtime: no daemon is connected"
    assert w.client(A, CreateRuntime(id=1)) == [to_client(A, error(P.E_NO_DAEMON, why, 1))]
    w.join(D1, capacity=-3)
    why = "cannot place a runtime: every daemon is at capacity"
    assert w.client(A, CreateRuntime(id=2)) == [to_client(A, error(P.E_NO_DAEMON, why, 2))]


def test_create_ok_tells_the_client_where_the_daemon_is() -> None:
    w = World()
    w.hello(A)
    ready = Ready(capacity=1, control="tcp://h:9", key="claimed")
    # with CURVE, the key the daemon authenticated with wins over the one it claims
    assert w.daemon(D1, ready, key=b"authenticated") == [to_daemon(D1, Welcome(heartbeat_ms=1000))]
    _, rt = w.place(A)
    expect = CreateOk(id=1, rt=rt, pid=9, control="tcp://h:9", daemon=D1.hex(), daemon_key="authenticated")
    assert w.daemon(D1, CreateOk(id=1, c=w.s[A], rt=rt, pid=9)) == [to_client(A, expect)]


def test_a_failed_create_forgets_the_runtime() -> None:
    w = World()
    w.hello(A)
    w.join(D1, capacity=1)
    _, rt = w.place(A)
    assert w.daemon(D1, error(P.E_CAPACITY, "full", 1, c=w.s[A])) == [to_client(A, error(P.E_CAPACITY, "full", 1))]
    assert w.core.runtimes == {} and w.core.daemons[D1].free == 1
    assert w.client(A, Eval(id=2, rt=rt, source=b"1")) == [to_client(A, unknown(rt, 2))]


# ---- routing and ownership ---------------------------------------------------------------------------------


def test_requests_reach_the_runtimes_daemon_and_replies_their_client(w: World) -> None:
    _, rt = w.create(A)
    w.join(D2)
    source = b"export default 1"
    assert w.client(A, Eval(id=2, rt=rt, source=source)) == [to_daemon(D1, Eval(id=2, rt=rt, source=source, c=w.s[A]))]
    assert w.daemon(D1, EvalOk(id=2, value=[1, "x"], c=w.s[A])) == [to_client(A, EvalOk(id=2, value=[1, "x"]))]
    assert w.daemon(D1, EvalOk(id=2, value=1, c=w.s[A])) == []  # answered already
    w.client(A, Dispatch(id=3, rt=rt, method="GET", url="http://x/", resp_sid=SID))
    assert w.daemon(D2, DispatchOk(id=3, status=200, c=w.s[A])) == []  # not the daemon it went to
    ok = DispatchOk(id=3, status=201, headers=(("a", "1"),), body=StreamRef(SID, "tcp://d:2"), c=w.s[A])
    assert w.daemon(D1, ok) == [to_client(A, ok.replace(c=None))]
    assert w.daemon(D1, error(P.E_GUEST, "boom", 9, c=w.s[A])) == []  # nothing pending


def test_a_client_can_only_address_its_own_runtimes(w: World) -> None:
    _, rt = w.create(A)
    assert w.client(B, Eval(id=1, rt=rt, source=b"1")) == [to_client(B, unknown(rt, 1))]
    assert w.client(B, Dispose(id=2, rt=rt)) == [to_client(B, unknown(rt, 2))]
    # ownership is checked before the other fields: another client's runtime stays unknown
    assert w.client(B, raw(t="dispatch", id=3, rt=rt)) == [to_client(B, unknown(rt, 3))]
    why = "'dispatch' needs field 'method' (str)"
    assert w.client(A, raw(t="dispatch", id=3, rt=rt)) == [to_client(A, error(P.E_BAD_MESSAGE, why, 3))]
    assert rt in w.core.runtimes and w.core.down == {}


def test_dispose_ok_forgets_the_runtime(w: World) -> None:
    _, rt = w.create(A)
    assert w.client(A, Dispose(id=2, rt=rt)) == [to_daemon(D1, Dispose(id=2, rt=rt, c=w.s[A]))]
    assert w.daemon(D1, DisposeOk(id=2, rt=rt, c=w.s[A])) == [to_client(A, DisposeOk(id=2, rt=rt))]
    assert w.client(A, Eval(id=3, rt=rt, source=b"1")) == [to_client(A, unknown(rt, 3))]
    assert w.core.daemons[D1].runtimes == set() and not w.core.owned.get(w.core.clients[A].token)


def test_callbacks_reach_the_owner_as_received_and_answers_go_back_without_rt(w: World) -> None:
    _, rt = w.create(A)
    for msg in (fetch(rt), Console(rt=rt, level="warn", args=("hi",))):
        frames = msg.frames()
        (out,) = w.daemon(D1, frames)
        assert out == Out(CLIENT, A, frames) and out.frames is frames  # byte-for-byte
    answer = FetchOk(id=5, rt=rt, status=200, body=StreamRef(RESP.sid))
    assert w.client(A, answer) == [to_daemon(D1, answer.replace(rt=None))]
    assert w.core.up == {}
    again = error(P.E_BAD_MESSAGE, "no callback 5 is waiting for an answer")
    assert w.client(A, answer) == [to_client(A, again)]  # without id: the callback's id is the daemon's
    w.daemon(D1, fetch(rt, 6))
    refusal = error(P.E_FETCH_FAILED, "no", 6, rt=rt)
    assert w.client(A, refusal) == [to_daemon(D1, refusal.replace(rt=None))]


def test_a_callback_about_a_runtime_not_on_that_daemon_is_refused_there(w: World) -> None:
    _, rt = w.create(A)
    w.join(D2)
    assert w.daemon(D2, fetch(rt)) == [to_daemon(D2, error(P.E_UNKNOWN_RUNTIME, "no such runtime", 5))]
    assert w.daemon(D2, Console(rt=rt)) == []
    assert w.daemon(D2, RuntimeLost(rt=rt)) == []
    assert rt in w.core.runtimes and w.core.up == {}


def test_only_the_owner_answers_a_callback(w: World) -> None:
    _, rt = w.create(A)
    w.daemon(D1, fetch(rt))
    assert w.client(B, FetchOk(id=5, rt=rt, status=200)) == [to_client(B, unknown(rt))]
    assert w.client(B, raw(t="ok", id=5, rt=rt, status="x")) == [to_client(B, unknown(rt))]
    assert (D1, 5) in w.core.up


# ---- tombstones --------------------------------------------------------------------------------------------


def test_a_lost_runtime_answers_late_calls_with_its_code(w: World) -> None:
    _, rt1 = w.create(A, 1)
    _, rt2 = w.create(A, 2)
    w.daemon(D1, fetch(rt1))
    lost = RuntimeLost(rt=rt1, code=P.E_MEMORY_LIMIT, message="over 128 MiB").frames()
    assert w.daemon(D1, lost) == [Out(CLIENT, A, lost)]
    assert w.core.up == {}  # its callbacks are dropped unanswered
    w.daemon(D1, RuntimeLost(rt=rt2, code=P.E_TIMEOUT, message="eval timed out"))
    gone1 = f"runtime {rt1} is gone: over 128 MiB"
    assert w.client(A, Eval(id=3, rt=rt1, source=b"1")) == [to_client(A, error(P.E_MEMORY_LIMIT, gone1, 3))]
    gone2 = f"runtime {rt2} is gone: eval timed out"
    assert w.client(A, Stats(id=4, rt=rt2)) == [to_client(A, error(P.E_RUNTIME_LOST, gone2, 4))]
    assert w.client(B, Stats(id=5, rt=rt1)) == [to_client(B, unknown(rt1, 5))]  # a tombstone is the owner's
    # a late answer to the dropped callback: the client hears why, without id; the daemon nothing
    assert w.client(A, FetchOk(id=5, rt=rt1, status=200)) == [to_client(A, error(P.E_MEMORY_LIMIT, gone1))]


def test_tombstones_are_bounded(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker.core, "TOMBSTONES", 2)
    rts = [w.create(A, i)[1] for i in range(3)]
    for rt in rts:
        w.daemon(D1, RuntimeLost(rt=rt, message="gone"))
    assert list(w.core.tombstones) == [rts[1], rts[2]]
    assert w.client(A, Stats(id=9, rt=rts[0])) == [to_client(A, unknown(rts[0], 9))]


# ---- refusals (protocol.md 2.2) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code", "mid"),
    [
        ([b"\xc1 not msgpack"], P.E_BAD_MESSAGE, None),
        ([], P.E_BAD_MESSAGE, None),
        (raw(t="eval", id=7, rt=5), P.E_BAD_MESSAGE, 7),
        (raw(t="eval", id=7), P.E_BAD_MESSAGE, 7),
        (raw(t="create_runtime"), P.E_BAD_MESSAGE, None),
        (raw(t="create_runtime", id=7, memory_limit_mb="big"), P.E_BAD_MESSAGE, 7),
        (raw(t="launch", id=7), P.E_UNKNOWN_TYPE, 7),
        ([msgpack.packb({"v": 2, "t": "hb", "id": 7})], P.E_UNSUPPORTED_VERSION, 7),
        ([*raw(t="eval", id=7, rt="x"), b"x" * (P.MAX_FRAME + 1)], P.E_TOO_LARGE, 7),
        (raw(t="eval", id=-1, rt="x"), P.E_BAD_MESSAGE, None),
        (raw(t="ok", id=7, rt="x"), P.E_UNKNOWN_RUNTIME, None),  # an answer: never with its id
    ],
)
def test_a_refused_client_message_is_answered_with_its_id_when_readable(w: World, frames, code, mid) -> None:
    (out,) = w.client(A, frames)
    reply = BROKER_TO_CLIENT.parse(out.frames)
    assert (out.to, out.ident, reply.T, reply.code, reply.id) == (CLIENT, A, "error", code, mid)
    assert w.core.down == {}


def test_a_refused_callback_answer_fails_the_callback_at_the_daemon(w: World) -> None:
    _, rt = w.create(A)
    w.daemon(D1, fetch(rt))
    bad = raw(t="ok", id=5, rt=rt, status="200")
    why = "'ok' field 'status' must be an int"
    assert w.client(A, bad) == [
        to_daemon(D1, error(P.E_BAD_MESSAGE, f"the client's answer was refused: {why}", 5)),
        to_client(A, error(P.E_BAD_MESSAGE, why)),  # without id: another id space
    ]
    assert w.core.up == {}
    assert w.client(A, bad) == [to_client(A, error(P.E_BAD_MESSAGE, why))]  # no longer pending: the client only


def test_a_refused_reply_fails_the_clients_request(w: World) -> None:
    _, rt = w.create(A)
    w.join(D2)
    w.client(A, Dispatch(id=2, rt=rt, method="GET", url="http://x/", resp_sid=SID))
    bad = raw(t="ok", id=2, c=w.s[A], status="x")
    assert w.daemon(D2, bad) == []  # not from the daemon the request went to
    why = "the daemon's reply was refused: 'ok' field 'status' must be an int"
    assert w.daemon(D1, bad) == [to_client(A, error(P.E_BAD_MESSAGE, why, 2))]
    assert w.core.down == {} and rt in w.core.runtimes  # a dispatch leaves the runtime alone


def test_a_refused_create_or_dispose_reply_also_disposes_the_runtime(w: World) -> None:
    _, rt = w.place(A, 1)
    why = "the daemon's reply was refused: 'ok' needs field 'rt' (str)"
    assert w.daemon(D1, raw(t="ok", id=1, c=w.s[A], pid=3)) == [
        to_daemon(D1, Dispose(rt=rt)),
        to_client(A, error(P.E_BAD_MESSAGE, why, 1)),
    ]
    assert w.core.runtimes == {}
    _, rt = w.create(A, 2)
    w.client(A, Dispose(id=3, rt=rt))
    big = [*DisposeOk(id=3, rt=rt, c=w.s[A]).frames(), b"x" * (P.MAX_FRAME + 1)]
    why = f"the daemon's reply was refused: a frame of {P.MAX_FRAME + 1} bytes exceeds {P.MAX_FRAME}"
    assert w.daemon(D1, big) == [to_daemon(D1, Dispose(rt=rt)), to_client(A, error(P.E_TOO_LARGE, why, 3))]
    assert w.core.runtimes == {} and w.core.daemons[D1].runtimes == set()


def test_a_refused_fetch_is_answered_at_the_daemon_and_other_refusals_dropped(w: World) -> None:
    _, rt = w.create(A)
    why = "'fetch' needs field 'method' (str)"
    assert w.daemon(D1, raw(t="fetch", id=5, rt=rt)) == [to_daemon(D1, error(P.E_BAD_MESSAGE, why, 5))]
    assert w.core.up == {}
    for frames in (raw(t="console", rt=5), raw(t="runtime_lost"), raw(t="ready"), raw(t="hb", load="x"), [b"\xc1"]):
        assert w.daemon(D1, frames) == []
    # registered or not
    why = "'fetch' needs field 'rt' (str)"
    assert w.daemon(b"stranger", raw(t="fetch", id=5)) == [to_daemon(b"stranger", error(P.E_BAD_MESSAGE, why, 5))]
    assert rt in w.core.runtimes and list(w.core.daemons) == [D1]


def test_an_unregistered_daemon_is_not_listened_to(w: World) -> None:
    _, rt = w.place(A)
    # its heartbeats are answered: register again (it was dropped, or this broker restarted)
    told = error(P.E_UNKNOWN_DAEMON, "unknown daemon: register (ready) again")
    assert w.daemon(b"stranger", Heartbeat(load=1)) == [to_daemon(b"stranger", told)]
    assert w.daemon(b"stranger", fetch(rt)) == []
    assert w.daemon(b"stranger", CreateOk(id=1, c=w.s[A], rt=rt)) == []
    assert w.core.up == {} and (w.s[A], 1) in w.core.down and list(w.core.daemons) == [D1]


# ---- orphaned creates and client loss ---------------------------------------------------------------------


def test_a_create_whose_client_left_is_disposed_when_it_completes(w: World) -> None:
    _, rt = w.place(A, 1)
    assert w.client(A, Bye()) == [to_daemon(D1, Dispose(rt=rt))]  # the daemon may not have it yet
    assert w.core.runtimes == {} and w.core.down[(w.s[A], 1)].orphan
    assert w.daemon(D1, CreateOk(id=1, c=w.s[A], rt=rt, pid=3)) == [to_daemon(D1, Dispose(rt=rt))]  # nothing to A
    assert w.core.down == {}


def test_a_failed_or_refused_orphaned_create_tells_nobody(w: World) -> None:
    _, rt_a = w.place(A, 1)
    _, rt_b = w.place(B, 1)
    assert w.core.client_gone(A, "its connection is gone") == []  # it may come back: nothing disposed yet
    w.core.client_gone(B, "its connection is gone")
    assert w.daemon(D1, error(P.E_INTERNAL, "no", 1, c=w.s[A])) == []
    assert rt_a not in w.core.runtimes
    assert w.daemon(D1, raw(t="ok", id=1, c=w.s[B])) == [to_daemon(D1, Dispose(rt=rt_b))]  # refused, still disposed
    assert w.core.down == {}


def test_client_loss_forgets_its_requests_and_callbacks_and_reclaims_its_runtimes_after_the_grace(w: World) -> None:
    _, rt = w.create(A)
    w.client(A, Eval(id=2, rt=rt, source=b"1"))
    w.daemon(D1, fetch(rt))
    gone = error(P.E_UNAVAILABLE, "the runtime's owner is gone (its connection is gone)", 5)
    assert w.core.client_gone(A, "its connection is gone") == [to_daemon(D1, gone)]  # its pending callback
    assert w.core.client_gone(A, "again") == []
    assert w.core.down == {} and w.core.up == {} and rt in w.core.runtimes
    assert w.daemon(D1, EvalOk(id=2, value=1, c=w.s[A])) == []
    away = error(P.E_UNAVAILABLE, "the runtime's owner is not connected", 6)
    assert w.daemon(D1, fetch(rt, 6)) == [to_daemon(D1, away)]
    w.now = w.core.reclaim_grace - 0.5
    w.daemon(D1, Heartbeat(load=1))
    assert to_daemon(D1, Dispose(rt=rt)) not in w.core.tick(w.now)
    w.now = w.core.reclaim_grace + 0.5
    w.daemon(D1, Heartbeat(load=1))
    assert to_daemon(D1, Dispose(rt=rt)) in w.core.tick(w.now)
    assert w.core.runtimes == {} and w.core.owned == {}
    assert w.daemon(D1, fetch(rt, 7)) == [to_daemon(D1, error(P.E_UNKNOWN_RUNTIME, "no such runtime", 7))]
    w.hello(A)  # a new session: the old runtime is another session's
    assert w.client(A, Stats(id=3, rt=rt)) == [to_client(A, unknown(rt, 3))]


# ---- daemon loss and liveness -----------------------------------------------------------------------------


def test_daemon_loss_fails_pending_requests_and_tells_owners(w: World) -> None:
    _, rt_a = w.create(A, 1)
    _, rt_b = w.create(B, 1)
    _, rt_new = w.place(A, 2)  # still being created
    w.client(B, Eval(id=2, rt=rt_b, source=b"1"))
    w.daemon(D1, fetch(rt_a))
    w.now = 3.5
    message = "daemon daemon-1 was lost (no heartbeat for 3.5s)"
    assert bag(w.core.tick(w.now)) == bag(
        [
            to_client(A, error(P.E_RUNTIME_LOST, message, 2)),
            to_client(B, error(P.E_RUNTIME_LOST, message, 2)),
            to_client(A, RuntimeLost(rt=rt_a, message=message)),
            to_client(B, RuntimeLost(rt=rt_b, message=message)),
            to_client(A, RuntimeLost(rt=rt_new, message=message)),
            to_client(A, Heartbeat()),
            to_client(B, Heartbeat()),
        ]
    )
    assert w.core.daemons == {} and w.core.runtimes == {} and w.core.down == {} and w.core.up == {}
    gone = f"runtime {rt_new} is gone: {message}"
    assert w.client(A, Eval(id=3, rt=rt_new, source=b"1")) == [to_client(A, error(P.E_RUNTIME_LOST, gone, 3))]
    assert w.daemon(D1, EvalOk(id=2, value=1, c=w.s[B])) == []  # a late reply from the lost daemon


def test_a_daemon_that_registers_again_is_a_new_daemon(w: World) -> None:
    _, rt = w.create(A)
    message = "daemon daemon-1 was lost (it registered again)"
    assert w.daemon(D1, Ready(capacity=1, control="tcp://h:2")) == [
        to_client(A, RuntimeLost(rt=rt, message=message)),
        to_daemon(D1, Welcome(heartbeat_ms=1000)),
    ]
    assert w.core.daemons[D1].runtimes == set() and w.core.daemons[D1].control == "tcp://h:2"


def test_heartbeats_and_liveness_forgive_the_brokers_own_stalls() -> None:
    w = World()
    w.join(D1)
    w.hello(A)
    hb = [to_daemon(D1, Heartbeat()), to_client(A, Heartbeat())]
    assert w.core.tick(3.0) == hb  # silent for 3.0 s: not more than 3 x 1 s
    assert w.core.tick(3.5, stall=1.0) == hb  # 2.5 s of silence while the broker was listening
    assert w.core.tick(4.0) == hb  # last seen at 1.0 (after the stall): 3.0 s
    assert w.core.tick(4.1) == [to_client(A, Heartbeat())]
    assert w.core.daemons == {}


def test_a_silent_client_is_lost_and_its_runtimes_disposed_after_the_grace() -> None:
    w = World()
    w.join(D1)
    w.hello(A)
    _, rt = w.create(A)  # A last seen at 0
    w.now = 5.0
    w.hello(A)  # a repeated hello is no sign of life
    w.now = 9.0
    w.daemon(D1, Heartbeat(load=1))
    assert w.core.tick(10.0) == [to_daemon(D1, Heartbeat()), to_client(A, Heartbeat())]
    assert w.core.tick(10.5) == [to_daemon(D1, Heartbeat())]  # lost: its runtimes wait for it a grace
    assert w.core.clients == {} and rt in w.core.runtimes
    w.now = 10.0 + w.core.reclaim_grace
    w.daemon(D1, Heartbeat(load=1))
    assert w.core.tick(w.now + 0.5) == [to_daemon(D1, Heartbeat()), to_daemon(D1, Dispose(rt=rt))]
    assert w.core.runtimes == {}


# ---- sessions cannot be taken over (issue 8, finding 3) ------------------------------------------------


def test_daemons_know_an_opaque_session_that_a_new_hello_replaces(w: World) -> None:
    _, rt = w.create(A)
    (out,) = w.client(A, Eval(id=2, rt=rt, source=b"1"))
    assert out == to_daemon(D1, Eval(id=2, rt=rt, source=b"1", c=w.s[A]))  # not A's routing id
    old = w.s[A]
    w.client(A, Bye())
    w.hello(A)
    assert w.s[A] != old
    _, rt2 = w.create(A, 2)
    w.client(A, Eval(id=2, rt=rt2, source=b"1"))
    assert w.daemon(D1, EvalOk(id=2, value=1, c=old)) == []  # the old session's late reply goes nowhere
    assert w.daemon(D1, EvalOk(id=2, value=1, c=A)) == []  # nor does one addressed by routing id
    assert w.daemon(D1, EvalOk(id=2, value=1, c=w.s[A])) == [to_client(A, EvalOk(id=2, value=1))]


def test_with_curve_only_the_key_that_said_hello_may_use_the_session() -> None:
    w = World()
    w.join(D1)
    k1, k2 = b"1" * 40, b"2" * 40
    token = w.hello(A, key=k1)
    _, rt = w.create(A)
    w.daemon(D1, fetch(rt))
    refused = [to_client(A, error(P.E_UNKNOWN_CLIENT, "unknown client: this session belongs to another key"))]
    for msg in (
        Eval(id=2, rt=rt, source=b"1"),
        Bye(),
        Hello(id=3),  # no token for another key
        FetchOk(id=5, rt=rt, status=200),
        raw(t="ok", id=5, rt=rt, status="x"),  # not even a refused answer fails the owner's callback
        Heartbeat(),
    ):
        assert w.client(A, msg, key=k2) == refused
        assert w.client(A, msg, key=None) == refused
    assert rt in w.core.runtimes and (D1, 5) in w.core.up and w.core.clients[A].token == token
    assert w.core.clients[A].last_seen == 0 and w.core.down == {}
    # the key that said hello is still served
    assert w.client(A, Eval(id=4, rt=rt, source=b"1"), key=k1) == [
        to_daemon(D1, Eval(id=4, rt=rt, source=b"1", c=w.s[A]))
    ]


# ---- per-client quotas ---------------------------------------------------------------------------------


def test_a_client_holds_at_most_its_quota_of_runtimes() -> None:
    w = World(max_runtimes_per_client=2)
    w.join(D1, capacity=10)
    w.hello(A)
    w.hello(B)
    _, rt1 = w.create(A, 1)
    w.place(A, 2)  # being created counts too
    why = "too many runtimes: at most 2 per client"
    assert w.client(A, CreateRuntime(id=3)) == [to_client(A, error(P.E_QUOTA, why, 3))]
    w.create(B, 1)  # another client is not affected
    w.client(A, Dispose(id=4, rt=rt1))
    w.daemon(D1, DisposeOk(id=4, rt=rt1, c=w.s[A]))
    w.place(A, 5)  # room again


def test_a_client_has_at_most_its_quota_of_requests_in_flight() -> None:
    w = World(max_inflight_per_client=2)
    w.join(D1)
    w.hello(A)
    w.hello(B)
    _, rt = w.create(A, 1)
    _, rt_b = w.create(B, 1)
    assert w.client(A, Eval(id=2, rt=rt, source=b"1"))[0].to == DAEMON
    why = "request id 2 is already in flight"
    assert w.client(A, Eval(id=2, rt=rt, source=b"1")) == [to_client(A, error(P.E_BAD_MESSAGE, why, 2))]
    assert w.client(A, Stats(id=3, rt=rt))[0].to == DAEMON
    why = "too many requests in flight: at most 2 per client"
    assert w.client(A, Eval(id=4, rt=rt, source=b"1")) == [to_client(A, error(P.E_QUOTA, why, 4))]
    assert w.client(A, CreateRuntime(id=5)) == [to_client(A, error(P.E_QUOTA, why, 5))]
    assert w.client(B, Eval(id=2, rt=rt_b, source=b"1"))[0].to == DAEMON  # B has its own quota
    w.daemon(D1, EvalOk(id=2, value=1, c=w.s[A]))
    assert w.client(A, Eval(id=6, rt=rt, source=b"1"))[0].to == DAEMON  # answered: room again
    w.daemon(D1, raw(t="ok", id=3, c=w.s[A], x="stats must be a map"))  # a refused reply frees its slot too
    assert w.core.clients[A].inflight == 1
    w.now = 4.0  # the daemon is lost: every pending request is answered, and the counts follow
    w.core.tick(w.now)
    assert w.core.down == {} and w.core.clients[A].inflight == 0 and w.core.clients[B].inflight == 0


# ---- floods (issue 8, finding 2) ----------------------------------------------------------------------


def test_a_peer_past_its_refusal_budget_is_dropped_unread_until_the_window_ends(
    w: World, caplog: pytest.LogCaptureFixture
) -> None:
    _, rt = w.create(B)
    flooder = b"flooder"
    caplog.set_level("INFO", logger="sandbox_mesh.broker")
    answered = [w.client(flooder, [b"\xc1 garbage"]) for _ in range(5 * broker.core.REFUSAL_BUDGET)]
    assert all(len(outs) == 1 for outs in answered[: broker.core.REFUSAL_BUDGET])
    assert all(outs == [] for outs in answered[broker.core.REFUSAL_BUDGET :])
    # the others are served meanwhile, their own refusals counted on their own
    assert w.client(B, Eval(id=2, rt=rt, source=b"1")) == [to_daemon(D1, Eval(id=2, rt=rt, source=b"1", c=w.s[B]))]
    assert w.client(B, Stats(id=3, rt="x")) == [to_client(B, unknown("x", 3))]
    # a daemon-side flood: the same budget, per daemon connection
    assert sum(len(w.daemon(b"stranger", raw(t="fetch", id=1))) for _ in range(500)) == broker.core.REFUSAL_BUDGET
    assert w.daemon(D1, raw(t="fetch", id=1)) != []
    assert len(caplog.records) < 10  # a few lines, not one per refused message
    w.now = broker.core.REFUSAL_WINDOW
    w.core.tick(w.now)
    assert w.core.budget.peers == {}
    assert len(w.client(flooder, [b"\xc1 garbage"])) == 1  # a new window
    assert any("dropped 400 messages of client" in r.getMessage() for r in caplog.records)
    assert any("more in the last" in r.getMessage() for r in caplog.records)


def test_refusals_a_correct_client_meets_in_bursts_do_not_count(w: World) -> None:
    _, rt = w.create(A)
    w.daemon(D1, RuntimeLost(rt=rt, message="gone"))  # requests racing the loss are refused...
    for i in range(3 * broker.core.REFUSAL_BUDGET):
        assert w.client(A, Eval(id=i, rt=rt, source=b"1"))[0].to == CLIENT
    assert w.client(A, Heartbeat()) == [] and w.core.budget.peers == {}  # ...but A is not throttled


# ---- recovery: sessions by token, daemons re-registering with their runtimes (issue 9) ------------------


def held(rt: str, owner: bytes, **kw: Any) -> Held:
    return Held(rt=rt, owner=owner, **kw)


def test_a_restarted_broker_adopts_what_a_daemon_lists_and_the_session_resumes_it() -> None:
    w = World()  # a broker that knows nothing: it has just restarted
    token, rt = b"t" * 16, "a" * 32
    ready = Ready(capacity=4, control="tcp://d1:1", name="d1", runtimes=(held(rt, token),))
    assert w.daemon(D1, ready) == [to_daemon(D1, Welcome(heartbeat_ms=1000))]
    assert w.core.runtimes[rt].reclaim_at == w.core.reclaim_grace  # its session has that long to come back
    assert w.core.daemons[D1].free == 3
    (out,) = w.client(A, Hello(id=0, session=token))
    assert out == to_client(A, Welcome(id=0, token=token, heartbeat_ms=1000))
    assert w.core.runtimes[rt].reclaim_at is None
    s = w.core.clients[A].session
    assert w.client(A, Eval(id=1, rt=rt, source=b"1")) == [to_daemon(D1, Eval(id=1, rt=rt, source=b"1", c=s))]
    w.hello(B)  # a session of its own: another's runtime stays unknown
    assert w.client(B, Eval(id=1, rt=rt, source=b"1")) == [to_client(B, unknown(rt, 1))]


def test_a_resumed_sessions_unknown_runtime_is_unavailable_until_the_daemons_had_time_to_register() -> None:
    w = World()
    w.client(A, Hello(id=0, session=b"t" * 16))
    rt = "b" * 32
    (out,) = w.client(A, Stats(id=1, rt=rt))
    assert BROKER_TO_CLIENT.parse(out.frames).code == P.E_UNAVAILABLE
    w.now = w.core.heartbeat * (w.core.daemon_liveness + 1) + 0.1
    w.client(A, Heartbeat())
    assert w.client(A, Stats(id=2, rt=rt)) == [to_client(A, unknown(rt, 2))]


def test_a_runtime_declared_lost_is_disposed_when_its_daemon_registers_again(w: World) -> None:
    _, rt = w.create(A)
    _, kept = w.create(A, 2)
    w.core.tick(5.0)  # D1 silent for 3 heartbeats: dropped, its runtimes lost
    assert rt not in w.core.runtimes
    # it resumes and registers again (a new routing id, the same name), listing what it still hosts
    ready = Ready(capacity=4, control="tcp://daemon-1:1", name="daemon-1", runtimes=(held(rt, w.tokens[A]),))
    assert w.daemon(D2, ready) == [to_daemon(D2, Dispose(rt=rt)), to_daemon(D2, Welcome(heartbeat_ms=1000))]
    (out,) = w.client(A, Stats(id=3, rt=rt))
    assert BROKER_TO_CLIENT.parse(out.frames).code == P.E_RUNTIME_LOST  # as its owner was told
    assert rt not in w.core.runtimes and kept not in w.core.runtimes


def test_a_daemon_registering_again_keeps_what_it_lists_and_loses_the_rest(w: World) -> None:
    _, rt = w.create(A)
    _, gone = w.create(A, 2)
    w.client(A, Eval(id=3, rt=rt, source=b"1"))  # in flight on the old registration
    w.client(A, Eval(id=4, rt=gone, source=b"1"))
    ready = Ready(capacity=4, control="tcp://daemon-1:2", name="daemon-1", runtimes=(held(rt, w.tokens[A]),))
    outs = [(o.to, o.ident, BROKER_TO_CLIENT.parse(o.frames)) for o in w.daemon(D2, ready) if o.to == CLIENT]
    answers = {m.id: m.code for _, _, m in outs if isinstance(m, ErrorReply)}
    assert answers == {3: P.E_UNAVAILABLE, 4: P.E_RUNTIME_LOST}  # the eval of the kept one may be retried
    assert [m.rt for _, _, m in outs if isinstance(m, RuntimeLost)] == [gone]
    assert w.core.runtimes[rt].daemon == D2 and gone not in w.core.runtimes and D1 not in w.core.daemons
    s = w.s[A]
    assert w.client(A, Eval(id=5, rt=rt, source=b"1")) == [to_daemon(D2, Eval(id=5, rt=rt, source=b"1", c=s))]


def test_named_runtimes_outlive_their_session_and_are_found_by_acquire(w: World) -> None:
    (out,) = w.client(A, CreateRuntime(id=1, name="agent", keep_alive_ms=5000))
    placed = BROKER_TO_DAEMON.parse(out.frames)
    assert placed.name == "agent" and placed.keep_alive_ms == 5000
    w.daemon(D1, CreateOk(id=1, c=w.s[A], rt=placed.rt, pid=7))
    (out,) = w.client(A, CreateRuntime(id=2, name="agent"))
    assert "already has a runtime named 'agent'" in BROKER_TO_CLIENT.parse(out.frames).message
    (out,) = w.client(A, CreateRuntime(id=3, keep_alive_ms=5))
    assert "keep_alive_ms needs a name" in BROKER_TO_CLIENT.parse(out.frames).message
    _, plain = w.create(A, 4)
    token = w.tokens[A]
    assert w.client(A, Bye()) == [to_daemon(D1, Dispose(rt=plain))]  # the unnamed one goes now
    assert w.core.runtimes[placed.rt].reclaim_at == w.now + 5
    (out,) = w.client(B, Acquire(id=1, name="agent"))  # another session: not found
    assert BROKER_TO_CLIENT.parse(out.frames).code == P.E_UNKNOWN_RUNTIME
    w.client(b"client-c", Hello(id=0, session=token))  # a new connection with the token
    found = CreateOk(id=1, rt=placed.rt, control="tcp://daemon-1:1", daemon="daemon-1")
    assert w.client(b"client-c", Acquire(id=1, name="agent")) == [to_client(b"client-c", found)]
    assert w.core.runtimes[placed.rt].reclaim_at is None
    w.core.client_gone(b"client-c", "gone")
    w.now = 100.0
    w.daemon(D1, Heartbeat())
    assert to_daemon(D1, Dispose(rt=placed.rt)) in w.core.tick(w.now)


def test_with_curve_a_session_resumes_only_from_its_key() -> None:
    w = World()
    w.join(D1)
    w.hello(A, key=b"k" * 40)
    w.create(A)
    token = w.tokens[A]
    (out,) = w.client(B, Hello(id=0, session=token), key=b"e" * 40)
    assert BROKER_TO_CLIENT.parse(out.frames).code == P.E_UNKNOWN_CLIENT
    assert w.core.sessions[token].ident == A and B not in w.core.clients
    (out,) = w.client(B, Hello(id=0, session=token), key=b"k" * 40)  # the same key, another connection
    assert BROKER_TO_CLIENT.parse(out.frames).token == token and A not in w.core.clients


def test_a_resumed_session_hears_which_of_its_runtimes_were_lost_while_it_was_away(w: World) -> None:
    _, rt = w.create(A)
    _, kept = w.create(A, 2)
    w.core.client_gone(A, "its connection is gone")
    w.daemon(D1, RuntimeLost(rt=rt, code=P.E_MEMORY_LIMIT, message="too big"))
    outs = w.client(b"client-c", Hello(id=0, session=w.tokens[A]))
    assert outs[1:] == [to_client(b"client-c", RuntimeLost(rt=rt, code=P.E_MEMORY_LIMIT, message="too big"))]
    assert kept in w.core.runtimes and w.core.runtimes[kept].reclaim_at is None
