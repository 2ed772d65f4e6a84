"""The message records on their own, without sockets: every record survives a round trip, each link
accepts exactly its types, and bad frames are refused with the code protocol.md gives."""

from __future__ import annotations

import msgpack
import pytest

from wire import messages as M
from wire import protocol as P
from wire.schema import Reply

SID = b"s" * 16


def _samples() -> list[M.Record]:
    """One filled-in instance of every record, optional fields set to non-defaults."""
    return [
        M.Hello(id=1),
        M.Welcome(id=1, token=SID, heartbeat_ms=1000),
        M.Heartbeat(load=3),
        M.Bye(),
        M.Ready(capacity=4, control="tcp://h:1", name="d", load=1, key="k" * 40),
        M.CreateRuntime(
            id=2,
            fetch=True,
            console=True,
            memory_limit_mb=64,
            eval_timeout_ms=5,
            c=b"r",
            rt="a" * 32,
            owner=SID,
            owner_key=b"k" * 40,
        ),
        M.Eval(id=3, rt="x", source=b"export default 1", timeout_ms=9, c=b"r"),
        M.Dispatch(
            id=4,
            rt="x",
            method="POST",
            url="http://h/",
            headers=(("a", "1"), ("a", "2")),
            resp_sid=SID,
            body=M.Inline(b"hi"),
            c=b"r",
        ),
        M.Stats(id=5, rt="x", c=b"r"),
        M.Dispose(rt="x", id=6, c=b"r"),
        M.ErrorReply(code="guest_error", message="m", id=7, c=b"r", rt="x", name="TypeError", stack="at"),
        M.CreateOk(id=8, rt="x", pid=9, control="tcp://h:2", daemon="d", daemon_key="k", c=b"r"),
        M.EvalOk(id=9, value={"a": [1, 2.5, None]}, c=b"r"),
        M.DispatchOk(
            id=10, status=201, status_text="Created", headers=(("k", "v"),), body=M.StreamRef(SID, "tcp://h:3"), c=b"r"
        ),
        M.StatsOk(id=11, daemon={"evals": 0}, guest={"inbound": 1}, c=b"r"),
        M.DisposeOk(id=12, rt="x", c=b"r"),
        M.FetchOk(
            id=13,
            rt="x",
            status=200,
            status_text="OK",
            headers=(("a", "b"),),
            url="http://u/",
            redirected=True,
            body=M.StreamRef(SID),
        ),
        M.Fetch(
            id=14,
            rt="x",
            method="GET",
            url="http://u/",
            headers=(("a", "b"),),
            redirect="manual",
            body=M.StreamRef(SID, "tcp://h:4"),
            resp_sid=b"t" * 16,
        ),
        M.Console(rt="x", method="table", level="warn", text="a b", depth=2, args=["a", b"b", 2**70]),
        M.RuntimeLost(rt="x", code="memory_limit", message="gone"),
        M.Cancel(sid=SID),
        M.PipeReady(sid=SID, ep="tcp://h:6"),
    ]


@pytest.mark.parametrize("msg", _samples(), ids=lambda m: type(m).__name__)
def test_every_record_round_trips_on_some_link(msg: M.Record) -> None:
    frames = msg.frames()
    parsed = []
    for link in M.LINKS:
        try:
            got = link.parse(frames)
        except P.ProtocolError:
            continue
        if isinstance(got, Reply):
            got = got.parse(type(msg))
        elif type(got) is not type(msg):
            continue  # an `ok` this link reads as another reply
        parsed.append(got)
    assert parsed, f"no link accepts {type(msg).__name__}"
    for got in parsed:
        assert got == msg


def test_payload_frames_pass_through_untouched() -> None:
    body = memoryview(b"\x00\xffraw bytes")
    frames = M.Dispatch(id=1, rt="x", method="GET", url="u", resp_sid=SID, body=M.Inline(body)).frames()
    assert frames[1] is body
    assert msgpack.unpackb(frames[0])["body"] == "inline"


def test_defaults_are_left_out_of_the_header() -> None:
    header = msgpack.unpackb(M.CreateRuntime(id=1).frames()[0])
    assert header == {"v": 1, "t": "create_runtime", "id": 1}


def test_links_require_the_fields_they_route_by() -> None:
    ev = M.Eval(id=1, rt="x", source=b"")
    assert M.CLIENT_TO_BROKER.parse(ev.frames()) == ev
    with pytest.raises(P.ProtocolError, match="'c'") as info:
        M.BROKER_TO_DAEMON.parse(ev.frames())
    assert info.value.code == P.E_BAD_MESSAGE
    with pytest.raises(P.ProtocolError, match="'rt'"):
        M.CLIENT_TO_BROKER.parse(M.FetchOk(id=1, status=200).frames())
    with pytest.raises(P.ProtocolError, match="'c'"):
        M.DAEMON_TO_BROKER.parse(M.EvalOk(id=1).frames())


def test_a_reply_is_parsed_by_the_request_it_answers() -> None:
    reply = M.BROKER_TO_CLIENT.parse(M.DispatchOk(id=3, status=200, body=M.Inline(b"x")).frames())
    assert isinstance(reply, Reply) and reply.id == 3
    assert reply.parse(M.DispatchOk).body == M.Inline(b"x")
    with pytest.raises(P.ProtocolError, match="'status'"):
        M.BROKER_TO_CLIENT.parse(M.EvalOk(id=3).frames()).parse(M.DispatchOk)  # type: ignore[union-attr]


def _raw(**header: object) -> list[bytes]:
    return [msgpack.packb({"v": 1, **header}, use_bin_type=True)]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], P.E_BAD_MESSAGE),
        ([b"\xc1"], P.E_BAD_MESSAGE),
        ([msgpack.packb("a string")], P.E_BAD_MESSAGE),
        ([msgpack.packb({"v": 2, "t": "hello"})], P.E_UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": True, "t": "hello"})], P.E_UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 1})], P.E_BAD_MESSAGE),
        (_raw(t="welcome", heartbeat_ms=1), P.E_UNKNOWN_TYPE),  # not legal from a client
        (_raw(t="hello", id=-1), P.E_BAD_MESSAGE),
        (_raw(t="hello", id=True), P.E_BAD_MESSAGE),
        (_raw(t="hello", id=1.0), P.E_BAD_MESSAGE),
        (_raw(t="hello", pad="x" * P.MAX_HEADER), P.E_TOO_LARGE),
        ([msgpack.packb({1: 2})], P.E_BAD_MESSAGE),
        (_raw(t="eval", id=1, rt=5), P.E_BAD_MESSAGE),
        (_raw(t="eval", id=1, rt="x"), P.E_BAD_MESSAGE),  # no source frame
        ([*_raw(t="eval", id=1, rt="x"), b"a", b"b"], P.E_BAD_MESSAGE),
        (_raw(t="dispatch", id=1, rt="x", method="GET", url="u", resp_sid=b"short"), P.E_BAD_MESSAGE),
        (_raw(t="dispatch", id=1, rt="x", method="GET", url="u", resp_sid=SID, body="inline"), P.E_BAD_MESSAGE),
        (_raw(t="dispatch", id=1, rt="x", method="GET", url="u", resp_sid=SID, headers=[["a"]]), P.E_BAD_MESSAGE),
        (_raw(t="dispatch", id=1, rt="x", method="GET", url="u", resp_sid=SID, headers=[["a", 1]]), P.E_BAD_MESSAGE),
        (
            _raw(t="dispatch", id=1, rt="x", method="GET", url="u", resp_sid=SID, body={"sid": "x" * 16}),
            P.E_BAD_MESSAGE,
        ),
        (
            _raw(t="dispatch", id=1, rt="x", method="GET", url="u", resp_sid=SID, body={"sid": SID, "ep": "ipc://x"}),
            P.E_BAD_MESSAGE,
        ),
        ([*_raw(t="stats", id=1, rt="x"), b"extra"], P.E_BAD_MESSAGE),
        (_raw(t="create_runtime", id=1, fetch="yes"), P.E_BAD_MESSAGE),
        (_raw(t="dispose", rt="x"), P.E_BAD_MESSAGE),  # a client's dispose needs an id
    ],
)
def test_the_client_link_refuses_bad_frames_with_the_right_code(frames, code) -> None:
    with pytest.raises(P.ProtocolError) as info:
        M.CLIENT_TO_BROKER.parse(frames)
    assert info.value.code == code


def test_peek_reads_what_it_can_of_a_refused_message() -> None:
    assert M.peek(_raw(t="eval", id=7, rt=5)) == ("eval", 7, {"v": 1, "t": "eval", "id": 7, "rt": 5})
    assert M.peek([b"\xc1"]) == (None, None, {})
    assert M.peek(_raw(t=3, id=-2))[:2] == (None, None)


def test_a_forwarded_message_reads_as_the_replaced_record() -> None:
    """The broker forwards a checked client message by patching its header (Envelope.forward): the
    daemon reads what ``parse().replace(...)`` would have sent; fields no record has are dropped."""
    value = {"big": 2**70, "xs": [1.5, None, "é"], "b": b"\x01\x02"}
    sent = M.ToolResult(id=7, rt="r1", value=value).frames()
    header = msgpack.unpackb(sent[0], raw=False)
    header["junk"] = "x" * 100
    env = M.CLIENT_TO_BROKER.open([msgpack.packb(header, use_bin_type=True)])
    msg = env.parse()
    forwarded = env.forward(rt=None)
    assert "junk" not in msgpack.unpackb(forwarded[0], raw=False)
    assert M.BROKER_TO_DAEMON.parse(forwarded) == M.BROKER_TO_DAEMON.parse(msg.replace(rt=None).frames())
