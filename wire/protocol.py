"""The protocol's constants and its smallest pieces: version, limits, error codes, ids, pipe frames.

Every message on a ROUTER/DEALER link is a list of frames: one msgpack header map followed by
zero or more raw payload frames (bodies travel as bytes, never inside the header). The records
that read and write those headers are in wire.schema and wire.messages; what travels on a
per-stream pipe is coded here (``pipe_frames``/``parse_pipe``). protocol.md is the normative
text; tests exercise all of it without sockets.
"""

from __future__ import annotations

import os
from typing import Any

VERSION = 1

#: Largest header frame any peer accepts (headers hold metadata, never bodies).
MAX_HEADER = 64 * 1024
#: Largest single payload frame on a request/reply link (an inline body).
MAX_INLINE_BODY = 64 * 1024
#: Largest frame the broker accepts (checked per frame, with an error reply; libzmq's own hard
#: cap, ZMQ_MAXMSGSIZE, is 16 times this and drops the connection).
MAX_FRAME = 1024 * 1024
#: Largest chunk carried by one pipe message; producers split bigger chunks.
MAX_CHUNK = 256 * 1024
#: Largest guest source accepted by eval (the source travels inline in a frame).
MAX_SOURCE = MAX_FRAME - MAX_HEADER
#: Most runtimes one daemon reports in its `ready` (so the header stays under MAX_HEADER: an entry
#: is at most ~240 bytes with a MAX_NAME name); a daemon's capacity is capped to it.
MAX_RUNTIMES_HELD = 256
#: Longest runtime name (characters).
MAX_NAME = 128


class ProtocolError(Exception):
    """A frame that does not follow protocol.md; ``code`` is the error code to reply with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Error codes (protocol.md, "Error codes").
E_BAD_MESSAGE = "bad_message"
E_UNSUPPORTED_VERSION = "unsupported_version"
E_UNKNOWN_TYPE = "unknown_type"
E_TOO_LARGE = "too_large"
E_UNKNOWN_RUNTIME = "unknown_runtime"
E_UNKNOWN_CLIENT = "unknown_client"
E_RUNTIME_LOST = "runtime_lost"
E_NO_DAEMON = "no_daemon"
E_CAPACITY = "capacity"
E_QUOTA = "quota"
E_GUEST = "guest_error"
E_TIMEOUT = "timeout"
E_MEMORY_LIMIT = "memory_limit"
E_CPU_LIMIT = "cpu_limit"
E_FETCH_FAILED = "fetch_failed"
E_NO_HANDLER = "no_handler"
E_CANCELLED = "cancelled"
E_INTERNAL = "internal"
E_BUSY = "busy"
E_UNAVAILABLE = "unavailable"
E_UNKNOWN_DAEMON = "unknown_daemon"
E_TOOL_FAILED = "tool_failed"
E_MODULE_NOT_FOUND = "module_not_found"

#: The codes a stopped runtime keeps in every later answer about it (others become runtime_lost).
LIMIT_CODES = frozenset({E_MEMORY_LIMIT, E_CPU_LIMIT})


def new_id() -> bytes:
    """A fresh 16-byte identifier (runtime tokens, stream ids): unguessable, so knowing one is authority."""
    return os.urandom(16)


#: A body descriptor in a header: absent/None, "inline" (payload frame 1) or a stream (wire.schema).
BODY_INLINE = "inline"


# ---------------------------------------------------------------------------------------------
# Pipe messages: what travels on a per-stream PUSH/PULL pipe.
#
# Each pipe message is two frames: a 25-byte tag (one kind byte, the 16-byte stream id, and the
# message's sequence number as an unsigned 64-bit big-endian integer, counting from 0) and the
# payload (chunk bytes, empty for END, a UTF-8 message for ERROR). The stream id in every message
# lets the receiver drop anything that is not its stream; the sequence number lets it notice a
# message that never arrived (a lost connection, or a second peer that took it), so a stream
# with a gap fails instead of ending short.

PIPE_DATA = b"D"
PIPE_END = b"E"
PIPE_ERROR = b"X"
#: Bytes of a pipe tag: kind, stream id, sequence number.
PIPE_TAG = 1 + 16 + 8


def pipe_tag(kind: bytes, sid: bytes, seq: int) -> bytes:
    return kind + sid + seq.to_bytes(8, "big")


def pipe_frames(kind: bytes, sid: bytes, seq: int, payload: Any = b"") -> list[Any]:
    return [pipe_tag(kind, sid, seq), payload]


def parse_pipe(frames: list[Any], sid: bytes, seq: int) -> tuple[bytes, Any]:
    """(kind, payload) of one pipe message, checked against the stream it must belong to and the
    sequence number it must carry (the count of messages received before it)."""
    if len(frames) != 2:
        raise ProtocolError(E_BAD_MESSAGE, f"pipe message has {len(frames)} frames, expected 2")
    tag = frames[0]
    tag = tag.bytes if hasattr(tag, "bytes") else tag
    if len(tag) != PIPE_TAG or tag[1:17] != sid:
        raise ProtocolError(E_BAD_MESSAGE, "pipe message for another stream")
    kind = tag[:1]
    if kind not in (PIPE_DATA, PIPE_END, PIPE_ERROR):
        raise ProtocolError(E_BAD_MESSAGE, f"unknown pipe message kind {kind!r}")
    got = int.from_bytes(tag[17:], "big")
    if got != seq:
        raise ProtocolError(E_BAD_MESSAGE, f"pipe message {got} arrived where {seq} was expected: the stream lost data")
    return kind, frames[1]
