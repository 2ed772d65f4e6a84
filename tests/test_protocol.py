"""The wire codec on its own, without sockets: what goes in comes out, and bad frames are refused
with the code protocol.md gives."""

from __future__ import annotations

import msgpack
import pytest

from wire import protocol as P
from wire.channel import FrameReader, GuestProtocolError, decode_header, encode_frame


def test_encode_decode_round_trip_keeps_payload_frames_untouched() -> None:
    body = memoryview(b"\x00\xffraw bytes")
    frames = P.encode("dispatch", [body], id=7, rt="abc", headers=[["a", "1"], ["a", "2"]], body="inline")
    assert frames[1] is body
    msg = P.decode(frames, P.CLIENT_TO_BROKER)
    assert (msg.type, msg.id, msg.get("rt")) == ("dispatch", 7, "abc")
    assert P.check_headers(msg.get("headers")) == [("a", "1"), ("a", "2")]
    assert P.check_body(msg) == P.BODY_INLINE
    assert msg.frames()[0] is frames[0]  # forwarded without re-encoding


def test_reencode_changes_and_removes_fields() -> None:
    msg = P.decode(P.encode("ok", id=1, c=b"route", value=3), P.DAEMON_TO_BROKER)
    out = msgpack.unpackb(P.reencode(msg, c=None, extra="x")[0])
    assert out == {"v": 1, "t": "ok", "id": 1, "value": 3, "extra": "x"}


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], P.E_BAD_MESSAGE),
        ([b"\xc1"], P.E_BAD_MESSAGE),
        ([msgpack.packb("a string")], P.E_BAD_MESSAGE),
        ([msgpack.packb({"v": 2, "t": "hello"})], P.E_UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 1})], P.E_BAD_MESSAGE),
        ([msgpack.packb({"v": 1, "t": "welcome"})], P.E_UNKNOWN_TYPE),  # not legal from a client
        ([msgpack.packb({"v": 1, "t": "hello", "id": -1})], P.E_BAD_MESSAGE),
        ([msgpack.packb({"v": 1, "t": "hello", "id": True})], P.E_BAD_MESSAGE),
        ([msgpack.packb({"v": 1, "t": "hello", "pad": "x" * P.MAX_HEADER})], P.E_TOO_LARGE),
        ([msgpack.packb({1: 2})], P.E_BAD_MESSAGE),
    ],
)
def test_decode_refuses_bad_frames_with_the_right_code(frames, code) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frames, P.CLIENT_TO_BROKER)
    assert info.value.code == code


def test_field_checks() -> None:
    msg = P.decode(P.encode("eval", id=1, rt=5), P.CLIENT_TO_BROKER)
    with pytest.raises(P.ProtocolError, match="'rt'"):
        P.require(msg, "rt", str)
    assert P.optional(msg, "timeout_ms", int) is None
    for bad in ("x", [["a"]], [["a", 1]], [1]):
        with pytest.raises(P.ProtocolError):
            P.check_headers(bad)
    for bad in ({"sid": b"short"}, {"sid": "x" * 16}, {"sid": b"s" * 16, "ep": "ipc://nope"}, 5):
        with pytest.raises(P.ProtocolError):
            P.check_stream_ref(bad)
    ref = P.check_stream_ref({"sid": b"s" * 16, "ep": "tcp://h:1"})
    assert ref == P.StreamRef(b"s" * 16, "tcp://h:1") and P.check_stream_ref(ref.to_wire()) == ref
    with pytest.raises(P.ProtocolError, match="inline"):
        P.check_body(P.decode(P.encode("dispatch", id=1, body="inline"), P.CLIENT_TO_BROKER))


def test_pipe_messages() -> None:
    sid = P.new_id()
    assert P.parse_pipe(P.pipe_frames(P.PIPE_DATA, sid, b"abc"), sid) == (P.PIPE_DATA, b"abc")
    assert P.parse_pipe(P.pipe_frames(P.PIPE_END, sid), sid)[0] == P.PIPE_END
    with pytest.raises(P.ProtocolError, match="another stream"):
        P.parse_pipe(P.pipe_frames(P.PIPE_DATA, P.new_id(), b"x"), sid)
    with pytest.raises(P.ProtocolError, match="kind"):
        P.parse_pipe([b"Q" + sid, b""], sid)
    with pytest.raises(P.ProtocolError, match="frames"):
        P.parse_pipe([b"D" + sid], sid)


def test_guest_channel_frames() -> None:
    head, body = encode_frame({"op": "chunk", "sid": 3}, b"12345")
    total, hlen = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
    assert total == 4 + hlen + 5 and body == b"12345"
    assert decode_header(head[8:]) == {"op": "chunk", "sid": 3}
    for raw in (b"not json", b"[1]", b'{"op": "format_disk"}', b"\xff"):
        with pytest.raises(GuestProtocolError):
            decode_header(raw)


def test_frame_reader_reassembles_frames_of_every_size_from_a_pipe() -> None:
    """Small frames come out of the staging buffer, large bodies are read straight into their own."""
    import os
    import threading

    sizes = [0, 1, 100, 16 * 1024 - 30, 70_000, 256 * 1024, 3, 256 * 1024 + 7]
    frames = [encode_frame({"op": "chunk", "sid": i}, bytes([i]) * n if n else None) for i, n in enumerate(sizes)]
    wire = b"".join(h + (b or b"") for h, b in frames)
    r, w = os.pipe()
    os.set_blocking(r, False)

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            for i in range(0, len(wire), 5000):  # dribble it in, splitting frames anywhere
                f.write(wire[i : i + 5000])
                f.flush()

    t = threading.Thread(target=write)
    t.start()
    reader, got, eof = FrameReader(r), [], False
    while not eof:
        more, eof = reader.feed()
        got += more
    t.join()
    os.close(r)
    assert [h["sid"] for h, _ in got] == list(range(len(sizes)))
    assert [bytes(b) for _, b in got] == [bytes([i]) * n for i, n in enumerate(sizes)]


def test_frame_reader_refuses_oversized_frames() -> None:
    import os

    r, w = os.pipe()
    os.write(w, (10**8).to_bytes(4, "big") + (10).to_bytes(4, "big"))
    os.set_blocking(r, False)
    with pytest.raises(GuestProtocolError, match="out of bounds"):
        FrameReader(r).feed()
    os.close(r)
    os.close(w)
