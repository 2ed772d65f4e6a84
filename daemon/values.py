"""Guest values made safe to forward: marshalled, encodable, and bounded in bytes.

Everything a guest says is JSON decoded from its channel. A *value* (an eval's default export, a
tool's arguments) arrives as a tree plus the frame's raw body (``from_guest``) and leaves for the
guest the same way (``to_guest``), by the rules of wire/values.py (protocol.md "Values"). Texts
(methods, URLs, headers, console text) are made encodable (``clean``: a lone UTF-16 surrogate,
legal in JavaScript, becomes U+FFFD) and cut to the byte limits that keep every message within
MAX_HEADER downstream. Pure functions; tests drive them directly.

The guest tree is JSON: null, booleans, strings, numbers (an integer only if safe: |n| <= 2^53-1;
any other number is a float), arrays and objects as themselves; what JSON cannot say is an object
tagged by its key ``$``: ``{"$":"f","v":"NaN"|"Infinity"|"-Infinity"|"-0"}`` a float,
``{"$":"n","v":"-1f"}`` an integer in hex (a BigInt), ``{"$":"b","o":offset,"n":length}`` bytes
(that slice of the frame's body), ``{"$":"d","v":ms}`` a date (milliseconds since the epoch, UTC),
``{"$":"o","v":{...}}`` an object that itself has a key ``$``.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

from wire import guest as G
from wire import values as V
from wire.values import TooLarge

#: UTF-8 bytes of text per console entry: what the bootstrap's MAX_CONSOLE UTF-16 units take at most.
MAX_CONSOLE_BYTES = 3 * G.MAX_CONSOLE
#: Bytes of a console entry's text and marshalled arguments together (the record must fit MAX_HEADER).
MAX_CONSOLE_ENTRY = 60 * 1024
#: UTF-8 bytes of a guest error's message, and of its stack.
MAX_ERROR_BYTES = 16 * 1024
#: Characters of a stream error's text written to the pipe.
MAX_STREAM_ERROR = 4096
TRUNCATED = "…[truncated]"


def clean(text: str) -> str:
    """A text from the guest made encodable as UTF-8 (msgpack str): see wire.values.well_formed."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return V.well_formed(text)


# ---- values on the guest channel ---------------------------------------------------------------

_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "-0": -0.0}
_MS = timedelta(milliseconds=1)


def to_guest(value: Any, where: str = "the value") -> tuple[Any, bytes]:
    """(tree, body) of a Python value for the guest: the tree goes in the frame's header as ``v``,
    the body holds the bytes it refers to. TypeError naming the path of what cannot be sent,
    TooDeep/TooLarge past the bounds (the tree's JSON plus the body, MAX_VALUE bytes)."""
    tree, _, body = guest_tree(value, where)
    return tree, body


def guest_tree(value: Any, where: str = "the value") -> tuple[Any, bytes, bytes]:
    """(tree, its JSON as UTF-8, body): ``to_guest`` with the JSON its size check wrote, for a
    header that embeds the tree as it is (a streamed tool's items) instead of writing it again."""
    blobs: list[bytes] = []
    offset = 0

    def blob(b: bytes) -> Any:
        nonlocal offset
        blobs.append(b)
        offset += len(b)
        return {"$": "b", "o": offset - len(b), "n": len(b)}

    def floats(x: float) -> Any:
        if not V.is_special_float(x):
            return x
        return {"$": "f", "v": "NaN" if math.isnan(x) else "-0" if x == 0 else "Infinity" if x > 0 else "-Infinity"}

    leaves = V.Leaves(
        int=lambda n: n if abs(n) <= V.MAX_SAFE_INT else {"$": "n", "v": format(n, "x")},
        float=floats,
        bytes=blob,
        datetime=lambda dt: {"$": "d", "v": (dt - V.EPOCH) // _MS},
        dict=lambda d: {"$": "o", "v": d} if "$" in d else d,
    )
    tree = V.marshal(value, leaves, where)
    text = json.dumps(tree, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(text) + offset > V.MAX_VALUE:
        raise TooLarge(f"{where} takes {len(text) + offset} bytes marshalled; the limit is {V.MAX_VALUE}")
    return tree, text, b"".join(blobs)


def from_guest(tree: Any, body: Any, where: str = "the value") -> Any:
    """The Python value of a guest tree and its frame's body. The bootstrap checked the rules when
    it packed the value; this checks them again (a guest is untrusted) and raises ValueError
    (TooDeep, TooLarge) naming the path of anything that is not a value."""
    raw = memoryview(body if body is not None else b"")
    if raw.nbytes > V.MAX_VALUE:
        raise TooLarge(f"{where} has {raw.nbytes} bytes of blobs; the limit is {V.MAX_VALUE}")

    def tagged(v: dict[str, Any], path: str, depth: int) -> Any:
        tag, x = v.get("$"), v.get("v")
        if tag == "f" and x in _FLOATS:
            return _FLOATS[x]
        if tag == "n" and isinstance(x, str) and 0 < len(x) <= 2 * V.MAX_VALUE:
            try:
                return int(x, 16)
            except ValueError:
                pass
        if tag == "b":
            o, n = v.get("o"), v.get("n")
            if type(o) is int and type(n) is int and 0 <= o and 0 <= n and o + n <= raw.nbytes:
                return bytes(raw[o : o + n])
        if tag == "d" and type(x) in (int, float) and math.isfinite(x):
            try:
                return V.EPOCH + timedelta(milliseconds=x)
            except OverflowError:
                raise ValueError(f"{V.at(where, path)} is a date outside years 1..9999") from None
        if tag == "o" and isinstance(x, dict):
            return plain(x, path, depth)
        raise ValueError(f"{V.at(where, path)} is not a value: {json.dumps(v)[:100]}")

    def plain(v: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        if depth >= V.MAX_VALUE_DEPTH:
            raise V.too_deep(where)
        out = {}
        for k, item in v.items():
            key = V.well_formed(k)
            out[key] = walk(item, path + V.path_key(key), depth + 1)
        return out

    def walk(v: Any, path: str, depth: int) -> Any:
        if v is None or isinstance(v, (bool, float)):
            return v
        if isinstance(v, int):  # a JavaScript number: an int only if it is a safe integer
            return v if abs(v) <= V.MAX_SAFE_INT else float(v)
        if isinstance(v, str):
            return V.well_formed(v)
        if isinstance(v, list):
            if depth >= V.MAX_VALUE_DEPTH:
                raise V.too_deep(where)
            return [walk(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v)]
        if isinstance(v, dict):
            return tagged(v, path, depth) if "$" in v else plain(v, path, depth)
        raise ValueError(f"{V.at(where, path)} is not a value")

    return walk(tree, "", 0)


def cut_utf8(text: str, limit: int) -> str:
    """``text`` within ``limit`` bytes of UTF-8 (headers to the broker are bounded in bytes)."""
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore") + TRUNCATED


def headers(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((clean(k), clean(v)) for k, v in pairs)


def error_parts(err: G.GuestError) -> tuple[str, str, str]:
    """(message, name, stack) of a guest error, cleaned and cut to fit an error reply."""
    return (
        cut_utf8(clean(err.message or ""), MAX_ERROR_BYTES),
        cut_utf8(clean(err.name or ""), G.MAX_ERROR_NAME),
        cut_utf8(clean(err.stack or ""), MAX_ERROR_BYTES),
    )


def stream_error(err: G.GuestError | None) -> str:
    """The text a consumer reads when a guest-produced body fails."""
    if err is None:
        return "the guest's body stream failed"
    name = "Error" if err.name is None else err.name
    return clean(f"{name}: {err.message or ''}"[:MAX_STREAM_ERROR])


def console_args(tree: Any, body: Any, text: str) -> list[Any]:
    """A console entry's arguments (a list value) checked again, and within what MAX_CONSOLE_ENTRY
    leaves beside the entry's ``text``. The bootstrap keeps them within MAX_CONSOLE_VALUE bytes of
    JSON (msgpack may take more: a float is 9 bytes); arguments that still do not fit, or are not
    a value (a tampered channel), become one text saying so: the entry, its text, still goes on."""
    try:
        args = from_guest(tree, body, "the console arguments")
        if not isinstance(args, list):
            raise ValueError("the console arguments are not a list")
        room = MAX_CONSOLE_ENTRY - len(text.encode())
        if V.check(args, "the console arguments") > room:
            raise TooLarge(f"the console arguments take more than the {room} bytes left beside the text")
    except (TypeError, ValueError) as exc:
        return [cut_utf8(f"<arguments not forwarded: {exc}>", 512)]
    return args


def status_text(text: str) -> str:
    return clean(text[: G.MAX_STATUS_TEXT])
