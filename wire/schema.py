"""Typed message records and their codec: the one place a header map is read or written.

A message type is a frozen dataclass whose fields are declared with ``F(kind, ...)``. A *kind*
knows how one field looks on the wire (its name in protocol.md's tables) and checks a received
value. ``parse`` validates a whole header once and returns the record; ``to_frames`` writes it
back. Nothing outside ``wire`` reads a header dict: handlers receive records.

Payload frames are fields too: a body descriptor (``Inline``/``StreamRef``) or an eval source
travels as a raw frame after the header, never inside it, and the record holds it as a value.

This module is sans-I/O: bytes (frames) in, records out, and back; tests drive it directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, TypeVar, dataclass_transform

import msgpack

from wire import values as _values
from wire.protocol import (
    BODY_INLINE,
    E_BAD_MESSAGE,
    E_TOO_LARGE,
    E_UNKNOWN_TYPE,
    E_UNSUPPORTED_VERSION,
    MAX_HEADER,
    VERSION,
    ProtocolError,
)

RecordT = TypeVar("RecordT", bound="Record")


# ---- kinds: how one field looks on the wire -------------------------------------------------------


class Payload:
    """What a payload kind reads and writes: the raw frames after the header."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames
        self.used = 0


@dataclass(frozen=True, slots=True)
class Kind:
    """One field type: ``name`` as protocol.md spells it, ``check`` turns a received value into the
    record's value (or raises ValueError with the reason), ``dump`` the reverse."""

    name: str
    check: Callable[[Any, Payload], Any]
    dump: Callable[[Any, list[Any]], Any] | None = None  # None: the value as it is


def _int(v: Any, _p: Payload) -> int:
    if type(v) is not int:
        raise ValueError("must be an int")
    return v


def _u64(v: Any, _p: Payload) -> int:
    if type(v) is not int or not 0 <= v < 2**63:
        raise ValueError("must be an int in [0, 2^63)")
    return v


def _str(v: Any, _p: Payload) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a str")
    return v


def _bin(v: Any, _p: Payload) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError("must be bin")
    return v


def _bin16(v: Any, _p: Payload) -> bytes:
    if not isinstance(v, bytes) or len(v) != 16:
        raise ValueError("must be 16 bytes of bin")
    return v


def _bool(v: Any, _p: Payload) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be a bool")
    return v


def _endpoint(v: Any, _p: Payload) -> str:
    if not isinstance(v, str) or not v.startswith("tcp://"):
        raise ValueError("must be a tcp:// endpoint")
    return v


def check_headers(v: Any) -> tuple[tuple[str, str], ...]:
    """Headers travel as a list of [name, value] string pairs so repeated names survive."""
    if not isinstance(v, (list, tuple)):
        raise ValueError("must be a list of [name, value] pairs")
    out = []
    for pair in v:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError("each header must be a [name, value] pair of strings")
        name, value = pair
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError("each header must be a [name, value] pair of strings")
        out.append((name, value))
    return tuple(out)


def _headers(v: Any, _p: Payload) -> tuple[tuple[str, str], ...]:
    return check_headers(v)


def _dump_headers(v: Any, _payload: list[Any]) -> Any:
    return [[k, val] for k, val in v]


def _int_map(v: Any, _p: Payload) -> dict[str, int]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and type(n) is int for k, n in v.items()):
        raise ValueError("must be a map of str to int")
    return dict(v)


def _strs(v: Any, _p: Payload) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ValueError("must be an array of str")
    return tuple(v)


def _any(v: Any, _p: Payload) -> Any:
    return v


def _value(v: Any, _p: Payload) -> Any:
    return _values.decode(v)


def _dump_value(v: Any, _payload: list[Any]) -> Any:
    return v.tree if isinstance(v, _values.Marshalled) else _values.encode(v)


# ---- bodies: a descriptor in the header, the bytes of an inline body in a payload frame -----------


@dataclass(frozen=True, slots=True)
class Inline:
    """A complete small body that travels as the message's payload frame."""

    data: Any  # bytes-like (a zmq.Frame's buffer when received without copying)


@dataclass(frozen=True, slots=True)
class StreamRef:
    """A body that travels on its own pipe: ``sid`` names it; ``ep`` is the daemon's bound endpoint
    (absent when the endpoint follows in a ``pipe_ready`` control message)."""

    sid: bytes
    ep: str | None = None


Body = Inline | StreamRef | None


def check_stream_ref(v: Any) -> StreamRef:
    if not isinstance(v, dict) or not isinstance(v.get("sid"), bytes) or len(v["sid"]) != 16:
        raise ValueError("a stream body needs a 16-byte 'sid'")
    ep = v.get("ep")
    if ep is not None and (not isinstance(ep, str) or not ep.startswith("tcp://")):
        raise ValueError("a stream endpoint must be a tcp:// address")
    return StreamRef(v["sid"], ep)


def _dump_ref(ref: StreamRef) -> dict[str, Any]:
    return {"sid": ref.sid} if ref.ep is None else {"sid": ref.sid, "ep": ref.ep}


def _body(v: Any, p: Payload) -> Body:
    if v == BODY_INLINE:
        if len(p.frames) != 1:
            raise ValueError("an inline body needs exactly one payload frame")
        p.used = 1
        return Inline(p.frames[0])
    return check_stream_ref(v)


def _dump_body(v: Body, payload: list[Any]) -> Any:
    if isinstance(v, Inline):
        payload.append(v.data)
        return BODY_INLINE
    assert isinstance(v, StreamRef)
    return _dump_ref(v)


def _pipe(v: Any, _p: Payload) -> StreamRef:
    ref = check_stream_ref(v)
    if ref.ep is None:
        raise ValueError("needs the pipe's 'ep'")
    return ref


def _dump_pipe(v: StreamRef, _payload: list[Any]) -> Any:
    return _dump_ref(v)


INT = Kind("int", _int)
U64 = Kind("id", _u64)
STR = Kind("str", _str)
BIN = Kind("bin", _bin)
BIN16 = Kind("bin16", _bin16)
BOOL = Kind("bool", _bool)
ENDPOINT = Kind("endpoint", _endpoint)
HEADERS = Kind("headers", _headers, _dump_headers)
INT_MAP = Kind("map str->int", _int_map)
STRS = Kind("array of str", _strs)
ANY = Kind("any", _any)
VALUE = Kind("value", _value, _dump_value)  # a marshalled value (wire/values.py)
BODY = Kind("body", _body, _dump_body)
PIPE = Kind("pipe {sid, ep}", _pipe, _dump_pipe)


# ---- declaring records ----------------------------------------------------------------------------

_REQUIRED: Any = MISSING


def F(kind: Kind, default: Any = _REQUIRED, doc: str = "") -> Any:
    """A record field: its wire kind, its default (none: required) and one line for protocol.md."""
    meta = {"kind": kind, "doc": doc}
    if default is _REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def payload_frame(doc: str = "") -> Any:
    """A required field carried as the one payload frame (eval's source)."""
    return dataclasses.field(metadata={"kind": None, "doc": doc, "payload": True})


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    kind: Kind | None  # None: the payload frame itself
    required: bool
    default: Any
    doc: str


class Record:
    """Base of every message record; subclasses are ``@record("type")`` dataclasses."""

    T: ClassVar[str]
    FIELDS: ClassVar[tuple[FieldSpec, ...]]
    __slots__ = ()

    def frames(self) -> list[Any]:
        return to_frames(self)

    def replace(self: RecordT, **changes: Any) -> RecordT:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field,))
def record(type_: str) -> Callable[[type[RecordT]], type[RecordT]]:
    """Make ``cls`` a frozen, slotted, keyword-only dataclass for message type ``type_``."""

    def wrap(cls: type[RecordT]) -> type[RecordT]:
        dc = dataclass(frozen=True, slots=True, kw_only=True)(cls)
        specs = []
        for f in dataclasses.fields(dc):  # type: ignore[arg-type]
            required = f.default is MISSING and f.default_factory is MISSING
            default = None if required else (f.default if f.default is not MISSING else f.default_factory())  # type: ignore[operator]
            specs.append(FieldSpec(f.name, f.metadata.get("kind"), required, default, f.metadata.get("doc", "")))
        dc.T = type_
        dc.FIELDS = tuple(specs)
        return dc

    return wrap


# ---- the codec ------------------------------------------------------------------------------------


def header_of(frames: list[Any]) -> dict[str, Any]:
    """The header map of a message, with the checks every link applies first (protocol.md 2.2)."""
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
    if not isinstance(header.get("t"), str):
        raise ProtocolError(E_BAD_MESSAGE, "header has no string 't' (message type)")
    mid = header.get("id")
    if mid is not None and (type(mid) is not int or not 0 <= mid < 2**63):
        raise ProtocolError(E_BAD_MESSAGE, "'id' must be a non-negative integer")
    return header


def peek(frames: list[Any]) -> tuple[str | None, int | None, dict[str, Any]]:
    """(type, id, header) of a message that failed validation, as far as they can be read.

    Used only to decide whom to tell about a refusal; never to act on the message."""
    try:
        raw = frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:
        return None, None, {}
    if not isinstance(header, dict):
        return None, None, {}
    t = header.get("t") if isinstance(header.get("t"), str) else None
    mid = header.get("id")
    return t, (mid if type(mid) is int and 0 <= mid < 2**63 else None), header


def from_header(
    cls: type[RecordT], header: dict[str, Any], payload: list[Any], required: Iterable[str] = ()
) -> RecordT:
    """Build ``cls`` from a checked header map; ``required`` names optional fields this link needs."""
    p = Payload(payload)
    values: dict[str, Any] = {}
    must = set(required)
    for spec in cls.FIELDS:
        if spec.kind is None:  # the payload frame itself
            if len(payload) != 1:
                raise ProtocolError(E_BAD_MESSAGE, f"{cls.T!r} needs exactly one payload frame ({spec.name})")
            p.used = 1
            values[spec.name] = payload[0]
            continue
        value = header.get(spec.name)
        if value is None:
            if spec.required or spec.name in must:
                raise ProtocolError(E_BAD_MESSAGE, f"{cls.T!r} needs field {spec.name!r} ({spec.kind.name})")
            continue
        try:
            values[spec.name] = spec.kind.check(value, p)
        except ValueError as exc:
            raise ProtocolError(E_BAD_MESSAGE, f"{cls.T!r} field {spec.name!r} {exc}") from None
    if len(payload) != p.used:
        raise ProtocolError(E_BAD_MESSAGE, f"{cls.T!r} has {len(payload)} payload frames, expected {p.used}")
    return cls(**values)


def to_frames(msg: Record) -> list[Any]:
    """The frames of ``msg``: a msgpack header (fields at their default are left out) and payload."""
    header: dict[str, Any] = {"v": VERSION, "t": msg.T}
    payload: list[Any] = []
    for spec in msg.FIELDS:
        value = getattr(msg, spec.name)
        if spec.kind is None:
            payload.append(value)
        elif value is not None and (spec.required or value != spec.default):
            header[spec.name] = value if spec.kind.dump is None else spec.kind.dump(value, payload)
    return [msgpack.packb(header, use_bin_type=True), *payload]


class Reply:
    """A received ``ok``: its fields depend on the request it answers, which only the receiver knows.

    ``id``, ``c`` and ``rt`` are checked at once (they route it); ``parse(cls)`` checks the rest."""

    __slots__ = ("_header", "_payload", "c", "frames", "id", "rt")
    T = "ok"

    def __init__(self, header: dict[str, Any], frames: list[Any], required: tuple[str, ...]) -> None:
        for name, kind in (("id", U64), ("c", BIN), ("rt", STR)):
            value = header.get(name)
            if value is None and name in required:
                raise ProtocolError(E_BAD_MESSAGE, f"'ok' needs field {name!r}")
            if value is not None:
                try:
                    kind.check(value, Payload([]))
                except ValueError as exc:
                    raise ProtocolError(E_BAD_MESSAGE, f"'ok' field {name!r} {exc}") from None
        self.id: int | None = header.get("id")
        self.c: bytes | None = header.get("c")
        self.rt: str | None = header.get("rt")
        self._header = header
        self._payload = list(frames[1:])
        self.frames = frames  # as received, so a router can forward without re-encoding

    def parse(self, cls: type[RecordT]) -> RecordT:
        """The reply as ``cls``; ProtocolError(bad_message) if it does not fit."""
        return from_header(cls, self._header, self._payload)


@dataclass(frozen=True, slots=True)
class Route:
    """Whom a message concerns: its type, ``id`` and the routing fields ``rt`` (str) and ``c`` (bin),
    each None where absent or not of its kind."""

    t: str | None = None
    id: int | None = None
    rt: str | None = None
    c: bytes | None = None


def _route(header: dict[str, Any]) -> Route:
    t, mid, rt, c = (header.get(k) for k in ("t", "id", "rt", "c"))
    return Route(
        t if isinstance(t, str) else None,
        mid if type(mid) is int and 0 <= mid < 2**63 else None,
        rt if isinstance(rt, str) else None,
        c if isinstance(c, bytes) else None,
    )


def route(frames: list[Any]) -> Route:
    """The route of a message that failed validation, as far as its header can be read.

    Used only to decide whom to tell about a refusal; never to act on the message."""
    return _route(peek(frames)[2])


class Envelope:
    """A received message that passed the checks every link applies (protocol.md 2.2) and whose
    type is legal on its link, before its own fields are checked.

    A router decides whom a message concerns from ``route`` first (a request about another
    client's runtime is refused as such, whatever its other fields hold); ``parse()`` then
    validates the rest, once."""

    __slots__ = ("_header", "_link", "frames")

    def __init__(self, link: Link, header: dict[str, Any], frames: list[Any]) -> None:
        self._link = link
        self._header = header
        self.frames = frames  # as received, so a router can forward without re-encoding

    @property
    def route(self) -> Route:
        return _route(self._header)

    def parse(self) -> Record | Reply:
        """The message as its record (an ``ok`` on a reply link: a ``Reply``); raises ProtocolError."""
        return self._link._fields(self._header, self.frames)

    def forward(self, **changes: Any) -> list[Any]:
        """The frames of this message, ``parse``d already, with ``changes`` to its header fields (None
        removes one): what ``parse().replace(**changes).frames()`` gives a receiver, without decoding
        and packing the record's values again. Only the record's own fields are kept."""
        t = self._header["t"]
        entry = self._link.types.get(t)
        names = {spec.name for spec in entry[0].FIELDS} if entry is not None else None
        header = {k: v for k, v in self._header.items() if names is None or k in names or k in ("v", "t")}
        for k, v in changes.items():
            if v is None:
                header.pop(k, None)
            else:
                header[k] = v
        return [msgpack.packb(header, use_bin_type=True), *self.frames[1:]]


@dataclass(frozen=True, slots=True)
class Link:
    """What one side of a link may receive: message type -> (record class, fields this link needs).

    ``replies``: on a link that carries replies, an ``ok`` arrives as a ``Reply`` needing these fields."""

    name: str
    types: dict[str, tuple[type[Record], tuple[str, ...]]]
    replies: tuple[str, ...] | None = None

    def parse(self, frames: list[Any]) -> Record | Reply:
        """Validate and decode frames received on this link; raises ProtocolError, nothing else."""
        return self.open(frames).parse()

    def open(self, frames: list[Any]) -> Envelope:
        """The checks every link applies and the type's legality here; the fields wait for
        ``Envelope.parse``. Raises ProtocolError, nothing else."""
        header = header_of(frames)
        t = header["t"]
        if t not in self.types and not (t == "ok" and self.replies is not None):
            raise ProtocolError(E_UNKNOWN_TYPE, f"message type {t!r} is not valid on {self.name}")
        return Envelope(self, header, frames)

    def _fields(self, header: dict[str, Any], frames: list[Any]) -> Record | Reply:
        """Decode a header that ``open`` checked, with its frames."""
        if header["t"] == "ok" and self.replies is not None:
            return Reply(header, frames, self.replies)
        cls, required = self.types[header["t"]]
        return from_header(cls, header, list(frames[1:]), required)


def on(
    name: str,
    *entries: type[Record] | tuple[type[Record], tuple[str, ...]],
    replies: tuple[str, ...] | None = None,
) -> Link:
    """A link table: record classes, each optionally with the fields that are required here."""
    types: dict[str, tuple[type[Record], tuple[str, ...]]] = {}
    for e in entries:
        cls, required = e if isinstance(e, tuple) else (e, ())
        types[cls.T] = (cls, required)
    return Link(name, types, replies)
