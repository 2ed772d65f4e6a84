"""The one marshalling of values between guest and host (issue 10; protocol.md "Values").

A *value* is what crosses between guest JavaScript and the Python host: an eval's default export,
tool arguments and results, console arguments. On the Python side it is one of None, bool, int,
float, str, bytes, list, dict with str keys, or an aware datetime; anything else is refused by the
side that tries to send it, with a TypeError naming the path of what cannot be sent (never a
silent None). Two bounds hold on every hop: MAX_VALUE bytes and MAX_VALUE_DEPTH levels.

This module holds the Python-side rules once: ``check`` (what the host may send), ``encode`` /
``decode`` (a value to and from its msgpack form, with the ext types below), ``default`` /
``ext_hook`` (the same ext types for a msgpack packer or unpacker), and ``marshal``, the one walk
that validates a Python value and maps its leaves, which daemon/values.py reuses for the guest
channel's JSON tree. Sans-I/O: tests drive it directly.

msgpack form: native msgpack for None, bool, int in [-2^63, 2^64), float (NaN, infinities and -0
kept), str, bin, array, map with str keys; ext type 1 for an int outside that range (its two's
complement, big-endian, fewest bytes); msgpack's own timestamp ext type (-1) for a datetime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

#: Bytes of a marshalled value: its msgpack encoding on the host side; on the guest channel its
#: tree as UTF-8 JSON plus its blobs. Keeps an eval's `ok` within MAX_HEADER (64 KiB).
MAX_VALUE = 48 * 1024
#: Levels of lists and dicts (arrays and objects) a value may nest.
MAX_VALUE_DEPTH = 128
#: The largest integer a JavaScript number holds exactly (Number.MAX_SAFE_INTEGER).
MAX_SAFE_INT = 2**53 - 1
#: msgpack ext type of an integer outside [-2^63, 2^64).
EXT_BIGINT = 1
#: The rule, said once in every refusal.
SENDABLE = "only None, bool, int, float, str, bytes, list, dict with str keys and aware datetime can be sent"


class TooDeep(ValueError):
    """A value nests lists and dicts deeper than MAX_VALUE_DEPTH levels."""


class TooLarge(ValueError):
    """A value takes more than MAX_VALUE bytes marshalled."""


def well_formed(text: str) -> str:
    """``text`` encodable as UTF-8: a lone UTF-16 surrogate (legal in JavaScript and in a Python str
    built from one) becomes U+FFFD; a high-low pair of surrogates becomes the character it encodes."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def too_deep(where: str) -> TooDeep:
    """The one refusal of a value past MAX_VALUE_DEPTH (its path would be MAX_VALUE_DEPTH steps long)."""
    return TooDeep(f"{where} is nested more than {MAX_VALUE_DEPTH} levels deep (lists and dicts)")


def at(where: str, path: str) -> str:
    """``where`` and the path below it, for an error message; a long path keeps its last steps."""
    if len(path) <= 120:
        return f"{where}{path}"
    tail = path[-120:]
    step = min((i for i in (tail.find("."), tail.find("[")) if i >= 0), default=0)
    return f"{where}…{tail[step:]}"


def path_key(key: str) -> str:
    """One step of a path as JavaScript would write it: ``.name`` or ``["odd key"]``."""
    return f".{key}" if key.isidentifier() else f"[{json.dumps(key)}]"


def describe(value: Any) -> str:
    """What a refused Python value is, for the error message."""
    if isinstance(value, datetime):
        return "a naive datetime (give it a tzinfo, e.g. datetime.timezone.utc)"
    name = type(value).__qualname__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True, slots=True)
class Leaves:
    """How ``marshal`` writes the leaves that differ between targets (msgpack, the guest's JSON)."""

    int: Callable[[int], Any]
    float: Callable[[float], Any]
    bytes: Callable[[bytes], Any]
    datetime: Callable[[datetime], Any]
    dict: Callable[[dict[str, Any]], Any]


def marshal(value: Any, leaves: Leaves, where: str = "the value") -> Any:
    """``value`` checked against the rules and rebuilt with ``leaves``: TypeError naming the path of
    the first thing that cannot be sent, TooDeep past MAX_VALUE_DEPTH. Accepted as their base type:
    subclasses of the types above, tuples (as lists), bytearray and memoryview (as bytes)."""

    def walk(v: Any, path: str, depth: int) -> Any:
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            return leaves.int(int(v))
        if isinstance(v, float):
            return leaves.float(float(v))
        if isinstance(v, str):
            return well_formed(str(v))
        if isinstance(v, (bytes, bytearray, memoryview)):
            return leaves.bytes(bytes(v))
        if isinstance(v, datetime) and v.utcoffset() is not None:
            return leaves.datetime(v)
        if isinstance(v, (list, tuple, dict)):
            if depth >= MAX_VALUE_DEPTH:
                raise too_deep(where)
            if not isinstance(v, dict):
                return [walk(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v)]
            out = {}
            for k, item in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"{at(where, path)} has a key that is {describe(k)}: dict keys must be str")
                key = well_formed(str(k))
                out[key] = walk(item, path + path_key(key), depth + 1)
            return leaves.dict(out)
        raise TypeError(f"{at(where, path)} is {describe(v)}: {SENDABLE}")

    return walk(value, "", 0)


# ---- msgpack ---------------------------------------------------------------------------------------


def _bigint_ext(n: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_BIGINT, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))


def default(obj: Any) -> Any:
    """msgpack ``default``: the ext form of an int outside 64 bits and of an aware datetime."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        return _bigint_ext(int(obj))
    if isinstance(obj, datetime) and obj.utcoffset() is not None:
        return msgpack.Timestamp.from_datetime(obj)
    raise TypeError(f"{describe(obj)} cannot be packed: {SENDABLE}")


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: an int from ext type 1 (the timestamp type, -1, is msgpack's own:
    unpack with ``timestamp=3`` for datetimes, or let ``decode`` convert it)."""
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise ValueError(f"unknown msgpack ext type {code}")


def _int(n: int) -> Any:
    return n if -(2**63) <= n < 2**64 else _bigint_ext(n)


_MSGPACK = Leaves(
    int=_int, float=lambda x: x, bytes=lambda b: b, datetime=msgpack.Timestamp.from_datetime, dict=lambda d: d
)


def encode(value: Any, where: str = "the value") -> Any:
    """``value`` as msgpack-native data (ext types as ExtType/Timestamp objects); TypeError/TooDeep
    if it breaks the rules. No size check: see ``check``."""
    return marshal(value, _MSGPACK, where)


@dataclass(frozen=True, slots=True)
class Marshalled:
    """A value already checked and in its msgpack form (``tree``, ``size`` bytes packed; -1 if not
    measured): a record field holding it is packed as it is, so a value is walked once per hop
    however often its record is packed."""

    tree: Any
    size: int = -1


def marshalled(value: Any, where: str = "the value") -> Marshalled:
    """``value`` checked and marshalled once; TypeError naming the path of what cannot be sent,
    TooDeep or TooLarge past the bounds. What a host-side sender calls before it sends."""
    tree = encode(value, where)
    size = len(msgpack.packb(tree, use_bin_type=True))
    if size > MAX_VALUE:
        raise TooLarge(f"{where} takes {size} bytes marshalled; the limit is {MAX_VALUE}")
    return Marshalled(tree, size)


def check(value: Any, where: str = "the value") -> int:
    """The bytes ``value`` takes as msgpack (see ``marshalled``)."""
    return marshalled(value, where).size


def decode(tree: Any, where: str = "the value") -> Any:
    """A value from its msgpack form as the header codec unpacked it (ext types as ExtType, the
    timestamp as Timestamp): ints and datetimes restored, everything checked; ValueError if the
    data is not a value (a peer that breaks the protocol)."""

    def walk(v: Any, path: str, depth: int) -> Any:
        if v is None or isinstance(v, (bool, int, float, bytes)):
            return v
        if isinstance(v, str):
            return well_formed(v)
        if isinstance(v, msgpack.Timestamp):
            try:
                return v.to_datetime()
            except (OverflowError, ValueError) as exc:
                raise ValueError(f"{at(where, path)} is a timestamp out of datetime's range: {exc}") from None
        if isinstance(v, msgpack.ExtType):
            return ext_hook(v.code, v.data)
        if isinstance(v, (list, dict)):
            if depth >= MAX_VALUE_DEPTH:
                raise too_deep(where)
            if isinstance(v, list):
                return [walk(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v)]
            out = {}
            for k, item in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"{at(where, path)} has a map key of type {type(k).__name__}")
                out[well_formed(k)] = walk(item, path + path_key(k), depth + 1)
            return out
        raise ValueError(f"{at(where, path)} is {describe(v)}")

    return walk(tree, "", 0)


def is_special_float(x: float) -> bool:
    """NaN, an infinity or -0: floats JSON cannot write (the guest tree tags them)."""
    return not math.isfinite(x) or (x == 0.0 and math.copysign(1.0, x) < 0)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
