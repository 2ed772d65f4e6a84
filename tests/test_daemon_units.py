"""The daemon's pieces on their own, without processes or sockets: the guest channel records, the
cleaning of guest values, the pending-work table and the task scope."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from daemon import values
from daemon.guest import BOOTSTRAP
from daemon.pending import Pending
from wire import guest as G
from wire import messages as M
from wire import protocol as P
from wire.channel import decode_header
from wire.protocol import ProtocolError
from wire.schema import Inline
from wire.scope import Scope, ScopeClosed

# ---- guest channel records ------------------------------------------------------------------------


def parse(raw: str, body: bytes = b"") -> object:
    return G.parse(decode_header(raw.encode()), body)


def test_guest_frames_parse_to_records() -> None:
    assert parse('{"op":"read","sid":3}') == G.InboundRead(sid=3, n=1)
    assert parse('{"op":"chunk","sid":3}', b"abc") == G.OutboundChunk(sid=3, data=b"abc")
    resp = parse(
        '{"op":"response","id":1,"status":201,"statusText":"Created","headers":[["a","1"]],"body":"inline"}', b"hi"
    )
    assert resp == G.Response(id=1, status=201, statusText="Created", headers=(("a", "1"),), body=Inline(b"hi"))
    fetch = parse('{"op":"fetch","id":2,"method":"GET","url":"u","headers":[],"redirect":"x","body":{"sid":4}}')
    assert fetch == G.Fetch(id=2, method="GET", url="u", headers=(), redirect="follow", body=G.GuestStream(4))
    err = parse('{"op":"eval_error","id":1,"error":{"name":"E","message":5}}')
    assert err == G.EvalError(id=1, error=G.GuestError(name="E", message="5", stack=None))
    # a stream error that is not an object still ends the stream (with a generic text)
    assert parse('{"op":"error","sid":1,"error":"nope"}') == G.OutboundError(sid=1, error=None)
    # a body sent with an op that has none is ignored; an unknown body descriptor means none
    assert parse('{"op":"end","sid":1}', b"stray") == G.OutboundEnd(sid=1)
    assert parse('{"op":"response","id":1,"status":200,"headers":[],"body":7}').body is None


@pytest.mark.parametrize(
    "raw",
    [
        '{"op":"read","sid":-1}',
        '{"op":"read","sid":true}',
        '{"op":"read","sid":1,"n":"2"}',
        '{"op":"chunk"}',
        '{"op":"response","id":1,"status":200}',  # headers are required
        '{"op":"response","id":1,"status":200,"headers":[["a",1]]}',
        '{"op":"response","id":1,"status":200,"headers":[],"body":{"sid":"x"}}',
        '{"op":"eval_error","id":1,"error":"a string"}',
        '{"op":"console","method":"log","level":"shout","text":"","depth":0}',
        '{"op":"console","method":"shout","level":"log","text":"","depth":0}',
        '{"op":"console","method":"log","level":"log","text":1,"depth":0}',
        '{"op":"stats","id":1,"inbound":0,"outbound":0,"fetches":0}',
        '{"op":"fetch","id":1,"method":5,"url":"u","headers":[]}',
    ],
)
def test_malformed_guest_frames_are_refused(raw: str) -> None:
    with pytest.raises(ProtocolError):
        parse(raw)


def test_every_guest_op_has_a_record_and_every_daemon_op_encodes() -> None:
    from daemon.runtime import Runtime

    handled = set(Runtime.ON_GUEST) | {"ready", "fatal", "pong"}  # the process's own
    assert handled == set(G.GUEST_TO_DAEMON)
    head, body = G.encode(G.InboundChunk(sid=7, data=b"xyz"))
    assert json.loads(head) == {"op": "chunk", "sid": 7} and body == b"xyz"
    head, body = G.encode(G.Request(id=1, method="GET", url="u", headers=(("a", "b"),), body=Inline(b"q")))
    assert json.loads(head) == {"op": "request", "id": 1, "method": "GET", "url": "u", "headers": [["a", "b"]],
                                "body": "inline", "redirect": "follow"}  # fmt: skip
    assert body == b"q"
    assert json.loads(G.header_of(G.OutboundAck(sid=3))) == {"op": "ack", "sid": 3}


def test_bootstrap_takes_every_limit_from_init() -> None:
    """The limits are defined once (wire/guest.py) and bootstrap.js reads each from `init`."""
    init = json.loads(G.encode(G.Init(fetch=True))[0])
    assert init["window"] == G.WINDOW and init["max_chunk"] == G.MAX_CHUNK and init["fetch"] is True
    source = BOOTSTRAP.read_text()
    for field in init:
        if field not in ("op", "fetch", "console", "tools", "stream_tools", "modules", "lexer"):  # the rest are limits
            assert re.search(rf"\b{field}: [A-Z_]+", source), f"bootstrap.js does not read {field!r} from init"
    # no limit is spelled out in the bootstrap itself any more (MAX_FRAME is its own read limit)
    assert re.findall(r"const (?:MAX|WINDOW|INLINE|CONSOLE)\w*", source) == ["const MAX_FRAME"]


def test_the_bootstrap_console_has_exactly_the_console_methods_the_daemon_accepts() -> None:
    source = BOOTSTRAP.read_text()
    listed = re.search(r"for \(const method of \[([^\]]*)\]\) \{\n  defineProperty\(guestConsole", source)
    assert listed, "bootstrap.js: the list of console methods moved"
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == G.CONSOLE_METHODS


# ---- cleaning guest values ------------------------------------------------------------------------


def test_clean_makes_guest_texts_encodable() -> None:
    assert values.clean("a\ud800b") == "a\ufffdb"
    assert values.clean("fine ü") == "fine ü"
    with pytest.raises(TypeError):  # values go through from_guest (tests/test_values.py), never here
        values.clean(2**64)  # type: ignore[arg-type]


def test_texts_are_cut_in_utf8_bytes() -> None:
    assert values.cut_utf8("abc", 3) == "abc"
    cut = values.cut_utf8("é" * 10, 5)  # 2 bytes each: two whole characters fit
    assert cut == "éé" + values.TRUNCATED
    err = G.GuestError(name="N" * 1000, message="m" * (values.MAX_ERROR_BYTES + 1), stack=None)
    message, name, stack = values.error_parts(err)
    assert len(name.encode()) <= G.MAX_ERROR_NAME + len(values.TRUNCATED.encode())
    assert message.endswith(values.TRUNCATED) and stack == ""
    assert values.stream_error(None) == "the guest's body stream failed"
    assert values.stream_error(G.GuestError(message="boom")) == "Error: boom"
    assert values.status_text("x" * 5000) == "x" * G.MAX_STATUS_TEXT


def test_console_args_fit_one_header_with_the_text() -> None:
    assert values.console_args(["a", {"$": "b", "o": 0, "n": 2}, 1.5], b"xy", "text") == ["a", b"xy", 1.5]
    text = "t" * values.MAX_CONSOLE_BYTES
    fits = ["x" * (values.MAX_CONSOLE_ENTRY - len(text) - 8)]
    assert values.console_args(fits, b"", text) == fits
    (refused,) = values.console_args([*fits, "y" * 100], b"", text)  # the text leaves no room for them
    assert refused.startswith("<arguments not forwarded: the console arguments take more than")
    entry = M.Console(rt="r", method="log", level="log", text=text, args=fits)
    assert sum(len(f) for f in entry.frames()) < P.MAX_HEADER
    # not a value (only a tampered bootstrap sends these): the entry still goes on, with one text
    assert values.console_args({"not": "a list"}, b"", "")[0].startswith("<arguments not forwarded")
    assert values.console_args([{"$": "b", "o": 5, "n": 9}], b"", "")[0].startswith("<arguments not forwarded")


# ---- the pending table ----------------------------------------------------------------------------


async def test_pending_take_cancels_the_deadline() -> None:
    expired: list[str] = []
    table: Pending[int, str] = Pending("eval")
    table.add(1, "one", 0.01, expired.append)
    table.add(2, "two", 0.01, expired.append)
    table.add(3, "three")  # no deadline
    with pytest.raises(KeyError):
        table.add(1, "again")
    assert table.take(1) == "one" and table.take(1) is None
    await asyncio.sleep(0.05)
    assert expired == ["two"]  # taken on expiry: gone from the table
    assert 2 not in table and 3 in table and len(table) == 1 and list(table) == ["three"]


async def test_pending_fail_all_empties_the_table() -> None:
    expired: list[str] = []
    failed: list[str] = []
    table: Pending[int, str] = Pending("fetch")
    table.add(1, "a", 0.01, expired.append)
    table.add(2, "b")
    table.fail_all(failed.append)
    await asyncio.sleep(0.03)
    assert failed == ["a", "b"] and expired == [] and len(table) == 0


# ---- the scope ------------------------------------------------------------------------------------


async def test_scope_close_cancels_and_joins_children() -> None:
    scope = Scope("test")
    finished: list[str] = []

    async def child(name: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            await asyncio.sleep(0)  # clean-up that itself awaits: close waits for it
            finished.append(name)

    async def failing() -> None:
        raise ValueError("one child's failure is not its siblings'")

    scope.spawn(child("short", 0))
    scope.spawn(child("long", 60))
    scope.spawn(failing())
    await asyncio.sleep(0.01)
    assert finished == ["short"] and len(scope) == 1
    await scope.aclose()
    assert finished == ["short", "long"] and len(scope) == 0
    coro = child("late", 0)
    with pytest.raises(ScopeClosed):
        scope.spawn(coro)


# ---- a runtime between a fake daemon and a fake guest ------------------------------------------------


class FakeGuest:
    """The GuestProcess surface a Runtime uses; frames it is sent are kept as decoded headers."""

    memory_limit_mb = 128

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.exit_reason: str | None = None
        self.on_frame = self.on_stop = None

    alive = property(lambda self: self.exit_reason is None)

    def send(self, msg: object) -> None:
        self.send_encoded(*G.encode(msg))  # type: ignore[arg-type]

    def send_encoded(self, header: bytes, body: object = None) -> None:
        self.sent.append(json.loads(header))

    async def drain(self) -> None:
        pass

    def queued(self) -> int:
        return 0

    async def kill(self, reason: str) -> None:
        self.exit_reason = self.exit_reason or reason

    def ran_out_of_memory(self) -> bool:
        return False

    def frame(self, **header: object) -> None:
        self.on_frame(decode_header(json.dumps(header).encode()), b"")  # type: ignore[misc]


class FakeHost:
    """A RuntimeHost that keeps what the runtime sends and registers."""

    def __init__(self) -> None:
        self.out: list[object] = []
        self.streams: dict[bytes, object] = {}

    def to_broker(self, msg: object) -> None:
        self.out.append(msg)

    reply = to_client = to_broker

    def register_stream(self, sid: bytes, entry: object) -> None:
        self.streams[sid] = entry

    def unregister_stream(self, sid: bytes) -> None:
        self.streams.pop(sid, None)

    def held(self) -> dict[str, int]:
        return {"registered_streams": len(self.streams), "callbacks": 0}


async def test_runtime_routes_guest_ops_and_releases_everything_at_its_end() -> None:
    from daemon.runtime import Runtime

    guest, host = FakeGuest(), FakeHost()
    rt = Runtime(host, "r1", guest, 30.0, fetch=False, console=True)  # type: ignore[arg-type]
    life = asyncio.get_running_loop().create_task(rt.run())  # owner: this test (awaited below)
    assert guest.sent[0]["op"] == "init" and guest.sent[0]["window"] == G.WINDOW
    rt.eval(M.Eval(id=7, rt="r1", source=b"export default 1", c=b"c"), b"c")
    assert guest.sent[-1] == {"op": "eval", "id": 1, "code": "export default 1", "filename": ""}
    guest.frame(op="eval_ok", id=1, v={"x": "\ud800"})
    assert host.out[-1] == M.EvalOk(id=7, c=b"c", value={"x": "\ufffd"})
    # a dispatch the client cancels before its head: the guest's request is aborted, the client answered
    rt.dispatch(M.Dispatch(id=8, rt="r1", method="GET", url="http://x/", resp_sid=b"s" * 16, c=b"c"), b"c")
    assert guest.sent[-1]["op"] == "request" and guest.sent[-1]["id"] == 2
    host.streams[b"s" * 16].cancel_by_client()  # type: ignore[attr-defined]
    assert guest.sent[-1] == {"op": "abort", "id": 2} and host.out[-1].code == "cancelled"  # type: ignore[attr-defined]
    assert not host.streams
    guest.frame(op="response", id=2, status=200, headers=[], body=None)  # late: ignored
    guest.frame(op="console", method="timeEnd", level="warn", text="hi \ud800", depth=1, v=["hi", 3])
    assert host.out[-1] == M.Console(rt="r1", method="timeEnd", level="warn", text="hi \ufffd", depth=1, args=["hi", 3])
    # the end: what is pending fails with the reason, the runtime reports itself lost
    rt.eval(M.Eval(id=9, rt="r1", source=b"for(;;);", c=b"c"), b"c")
    rt.stop("the runtime process exited")
    await life
    assert host.out[-2] == M.error("runtime_lost", "the runtime process exited", 9, c=b"c")
    assert host.out[-1] == M.RuntimeLost(rt="r1", code="runtime_lost", message="the runtime process exited")
    with pytest.raises(ProtocolError):
        rt.ensure_alive()


# ---- the spawner ----------------------------------------------------------------------------------


async def test_the_spawner_starts_guests_as_its_own_children() -> None:
    """Guests are forked by the spawner helper, not by the daemon's (possibly huge) process: the
    child's parent is the helper, it gets the descriptors asked for, and its exit is seen."""
    import os

    from daemon import sandbox, spawner

    out_r, out_w = os.pipe()
    source = os.open("/dev/null", os.O_RDONLY)
    try:
        child = await spawner.start_child(
            ["/bin/sh", "-c", 'echo "$$ $PPID"; test -r /dev/fd/3 && echo fd3'],
            {"PATH": "/usr/bin:/bin"}, "/", out_w, None, sandbox.Layers("", 0, False), source, 3,
        )  # fmt: skip
    finally:
        os.close(out_w)
        os.close(source)
    try:
        out = b""
        while chunk := await asyncio.to_thread(os.read, out_r, 100):
            out += chunk
        first, second = out.decode().splitlines()
        pid, ppid = map(int, first.split())
        assert pid == child.pid and ppid == spawner.get().pid and ppid != os.getpid()
        assert second == "fd3"
        await asyncio.wait_for(child.wait(), 10)
        assert child.returncode is not None
    finally:
        os.close(out_r)
        spawner.shutdown()
