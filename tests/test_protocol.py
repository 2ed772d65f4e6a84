"""Pipe frames and the guest channel's framing on their own, without sockets: what goes in comes
out, and bad frames are refused (the link messages: tests/test_messages.py)."""

from __future__ import annotations

import pytest

from wire import protocol as P
from wire.channel import FrameReader, GuestProtocolError, decode_header, encode_frame


def test_pipe_messages() -> None:
    sid = P.new_id()
    assert P.parse_pipe(P.pipe_frames(P.PIPE_DATA, sid, 0, b"abc"), sid, 0) == (P.PIPE_DATA, b"abc")
    assert P.parse_pipe(P.pipe_frames(P.PIPE_END, sid, 7), sid, 7)[0] == P.PIPE_END
    with pytest.raises(P.ProtocolError, match="another stream"):
        P.parse_pipe(P.pipe_frames(P.PIPE_DATA, P.new_id(), 0, b"x"), sid, 0)
    with pytest.raises(P.ProtocolError, match="kind"):
        P.parse_pipe([P.pipe_tag(b"Q", sid, 0), b""], sid, 0)
    with pytest.raises(P.ProtocolError, match="frames"):
        P.parse_pipe([P.pipe_tag(b"D", sid, 0)], sid, 0)
    with pytest.raises(P.ProtocolError, match="another stream"):  # a tag without its sequence number
        P.parse_pipe([b"D" + sid, b"x"], sid, 0)
    # a message that never arrived: the next one (DATA or END) is refused, not taken as the end
    for kind in (P.PIPE_DATA, P.PIPE_END, P.PIPE_ERROR):
        with pytest.raises(P.ProtocolError, match="2 arrived where 1 was expected"):
            P.parse_pipe(P.pipe_frames(kind, sid, 2), sid, 1)


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
