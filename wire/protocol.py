"""The message layer shared by client, broker and daemon: pure functions, no sockets.

Every message on a ROUTER/DEALER link is a list of frames: one msgpack header map
followed by zero or more raw payload frames (bodies travel as bytes, never inside the
header). The header always carries the protocol version ``v`` and the type ``t``;
requests and their replies carry the same ``id``. protocol.md is the normative text;
this module is its executable form, and tests exercise it without sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import msgpack

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
E_GUEST = "guest_error"
E_TIMEOUT = "timeout"
E_MEMORY_LIMIT = "memory_limit"
E_FETCH_FAILED = "fetch_failed"
E_NO_HANDLER = "no_handler"
E_CANCELLED = "cancelled"
E_INTERNAL = "internal"

# Message types per link (protocol.md 3.1).
CLIENT_TO_BROKER = frozenset(
    {"hello", "hb", "bye", "create_runtime", "eval", "dispatch", "stats", "dispose", "ok", "error"}
)
BROKER_TO_CLIENT = frozenset({"welcome", "hb", "ok", "error", "fetch", "console", "runtime_lost"})
DAEMON_TO_BROKER = frozenset({"ready", "hb", "ok", "error", "fetch", "console", "runtime_lost"})
BROKER_TO_DAEMON = frozenset({"welcome", "hb", "create_runtime", "eval", "dispatch", "stats", "dispose", "ok", "error"})
CONTROL_TO_DAEMON = frozenset({"hello", "cancel"})
CONTROL_TO_CLIENT = frozenset({"cancel", "pipe_ready"})

#: Requests on the client link that must name a runtime the client owns.
RUNTIME_REQUESTS = frozenset({"eval", "dispatch", "stats", "dispose"})


@dataclass(slots=True)
class Message:
    """A decoded message: the header map plus raw payload frames (bytes-like)."""

    type: str
    header: dict[str, Any]
    payload: list[Any] = field(default_factory=list)
    raw: Any = None  # the header frame as received, so a router can forward without re-encoding
    sender_key: bytes | None = None  # the CURVE key the sender was admitted with (wire.auth)

    def frames(self) -> list[Any]:
        """The message as frames again (the received header frame when unchanged)."""
        if self.raw is None:
            return [msgpack.packb(self.header, use_bin_type=True), *self.payload]
        return [self.raw, *self.payload]

    @property
    def id(self) -> int | None:
        return self.header.get("id")

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def encode(type_: str, payload: list[Any] | tuple[Any, ...] = (), **fields: Any) -> list[Any]:
    """Build the frames of one message; payload frames are passed through untouched (zero-copy)."""
    header = {"v": VERSION, "t": type_}
    header.update(fields)
    return [msgpack.packb(header, use_bin_type=True), *payload]


def reencode(msg: Message, **changes: Any) -> list[Any]:
    """Frames of ``msg`` with some header fields changed; a value of None removes the field."""
    header = dict(msg.header)
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    return [msgpack.packb(header, use_bin_type=True), *msg.payload]


def decode(frames: list[Any], allowed: frozenset[str]) -> Message:
    """Validate and decode frames received on a link whose legal types are ``allowed``.

    Raises ProtocolError with the code a peer should be told; never anything else.
    """
    if not frames:
        raise ProtocolError(E_BAD_MESSAGE, "empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else raw
    if len(raw) > MAX_HEADER:
        raise ProtocolError(E_TOO_LARGE, f"header frame of {len(raw)} bytes exceeds {MAX_HEADER}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage input
        raise ProtocolError(E_BAD_MESSAGE, f"header frame is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(E_BAD_MESSAGE, "header frame is not a msgpack map")
    if type(header.get("v")) is not int or header["v"] != VERSION:
        raise ProtocolError(E_UNSUPPORTED_VERSION, f"protocol version {header.get('v')!r} is not {VERSION}")
    type_ = header.get("t")
    if not isinstance(type_, str):
        raise ProtocolError(E_BAD_MESSAGE, "header has no string 't' (message type)")
    if type_ not in allowed:
        raise ProtocolError(E_UNKNOWN_TYPE, f"message type {type_!r} is not valid here")
    mid = header.get("id")
    if mid is not None and (not isinstance(mid, int) or isinstance(mid, bool) or not 0 <= mid < 2**63):
        raise ProtocolError(E_BAD_MESSAGE, "'id' must be a non-negative integer")
    return Message(type_, header, list(frames[1:]), frames[0])


def error_frames(code: str, message: str, id_: int | None = None, **fields: Any) -> list[Any]:
    """An ``error`` reply (``id`` omitted when the offending message had none)."""
    if id_ is not None:
        fields["id"] = id_
    return encode("error", code=code, message=message, **fields)


def require(msg: Message, key: str, kind: type | tuple[type, ...]) -> Any:
    """A mandatory header field of the given type, or ProtocolError(bad_message)."""
    value = msg.header.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(E_BAD_MESSAGE, f"{msg.type!r} needs field {key!r} of type {_kind_name(kind)}")
    return value


def optional(msg: Message, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """An optional header field: absent or nil gives ``default``; anything else must be ``kind``."""
    value = msg.header.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(E_BAD_MESSAGE, f"{msg.type!r} field {key!r} must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def new_id() -> bytes:
    """A fresh 16-byte identifier (runtime tokens, stream ids): unguessable, so knowing one is authority."""
    return os.urandom(16)


# ---------------------------------------------------------------------------------------------
# HTTP heads: method, url, status and headers as they travel in message headers.


def check_headers(value: Any) -> list[tuple[str, str]]:
    """Headers travel as a list of [name, value] string pairs so repeated names survive."""
    if not isinstance(value, list):
        raise ProtocolError(E_BAD_MESSAGE, "headers must be a list of [name, value] pairs")
    out = []
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise ProtocolError(E_BAD_MESSAGE, "each header must be a [name, value] pair of strings")
        out.append((pair[0], pair[1]))
    return out


#: A body descriptor in a header: absent/None, "inline" (payload frame 1) or a stream.
BODY_INLINE = "inline"


@dataclass(slots=True, frozen=True)
class StreamRef:
    """A body that travels on its own pipe: ``sid`` names it; ``ep`` is the daemon's bound endpoint
    (absent when the endpoint follows in a ``pipe_ready`` control message)."""

    sid: bytes
    ep: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"sid": self.sid} if self.ep is None else {"sid": self.sid, "ep": self.ep}


def check_body(msg: Message, key: str = "body") -> str | StreamRef | None:
    """Decode a body descriptor; an inline body must come with exactly one payload frame."""
    value = msg.header.get(key)
    if value is None:
        return None
    if value == BODY_INLINE:
        if len(msg.payload) != 1:
            raise ProtocolError(E_BAD_MESSAGE, "an inline body needs exactly one payload frame")
        return BODY_INLINE
    return check_stream_ref(value)


def check_stream_ref(value: Any) -> StreamRef:
    if not isinstance(value, dict) or not isinstance(value.get("sid"), bytes) or len(value["sid"]) != 16:
        raise ProtocolError(E_BAD_MESSAGE, "a stream body needs a 16-byte 'sid'")
    ep = value.get("ep")
    if ep is not None and (not isinstance(ep, str) or not ep.startswith("tcp://")):
        raise ProtocolError(E_BAD_MESSAGE, "a stream endpoint must be a tcp:// address")
    return StreamRef(value["sid"], ep)


# ---------------------------------------------------------------------------------------------
# Pipe messages: what travels on a per-stream PUSH/PULL pipe.
#
# Each pipe message is two frames: a 17-byte tag (one kind byte + the 16-byte stream id) and the
# payload (chunk bytes, empty for END, a UTF-8 message for ERROR). The stream id in every message
# lets the receiver drop anything that is not its stream.

PIPE_DATA = b"D"
PIPE_END = b"E"
PIPE_ERROR = b"X"


def pipe_frames(kind: bytes, sid: bytes, payload: Any = b"") -> list[Any]:
    return [kind + sid, payload]


def parse_pipe(frames: list[Any], sid: bytes) -> tuple[bytes, Any]:
    """(kind, payload) of one pipe message, checked against the stream it must belong to."""
    if len(frames) != 2:
        raise ProtocolError(E_BAD_MESSAGE, f"pipe message has {len(frames)} frames, expected 2")
    tag = frames[0]
    tag = tag.bytes if hasattr(tag, "bytes") else tag
    if len(tag) != 17 or tag[1:] != sid:
        raise ProtocolError(E_BAD_MESSAGE, "pipe message for another stream")
    kind = tag[:1]
    if kind not in (PIPE_DATA, PIPE_END, PIPE_ERROR):
        raise ProtocolError(E_BAD_MESSAGE, f"unknown pipe message kind {kind!r}")
    return kind, frames[1]
