"""Guest values made safe to forward: encodable, and bounded in bytes.

Everything a guest says is JSON decoded from its channel. Before any of it goes on to the broker
(as msgpack) or into a pipe, strings are made encodable (a lone UTF-16 surrogate, legal in
JavaScript, becomes U+FFFD), integers fit 64 bits, and texts are cut to the byte limits that keep
every message within MAX_HEADER downstream. Pure functions; tests drive them directly.
"""

from __future__ import annotations

from typing import Any

from wire import guest as G

#: UTF-8 bytes of text per console entry: what the bootstrap's MAX_CONSOLE UTF-16 units take at most.
MAX_CONSOLE_BYTES = 3 * G.MAX_CONSOLE
#: UTF-8 bytes of a guest error's message, and of its stack.
MAX_ERROR_BYTES = 16 * 1024
#: Characters of a stream error's text written to the pipe.
MAX_STREAM_ERROR = 4096
TRUNCATED = "…[truncated]"


class TooDeep(ValueError):
    """A value nests arrays and objects deeper than ``wire.guest.MAX_VALUE_DEPTH`` levels."""


def clean(value: Any, depth: int = 0) -> Any:
    """A JSON value from the guest made encodable as msgpack: lone UTF-16 surrogates become
    U+FFFD, integers beyond 64 bits become floats, object keys become strings. Legal guest values
    must never break an encoder on the daemon's side: one nested deeper than MAX_VALUE_DEPTH
    raises TooDeep (msgpack and Python's stack have limits of their own)."""
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else float(value)
    if isinstance(value, (list, dict)) and depth >= G.MAX_VALUE_DEPTH:
        raise TooDeep(f"the value is nested more than {G.MAX_VALUE_DEPTH} levels deep")
    if isinstance(value, list):
        return [clean(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {clean(str(k)): clean(v, depth + 1) for k, v in value.items()}
    return None


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


def console_args(args: list[Any]) -> tuple[str, ...]:
    """A console entry's arguments as texts, all together within MAX_CONSOLE_BYTES of UTF-8 (the
    bootstrap sends at most MAX_CONSOLE_ARGS, plus one saying the rest were dropped)."""
    budget, out = MAX_CONSOLE_BYTES, []
    for a in args[: G.MAX_CONSOLE_ARGS + 1]:
        text = cut_utf8(clean(str(a)), budget)
        budget -= len(text.encode())
        out.append(text)
        if budget <= 0:
            break
    return tuple(out)


def status_text(text: str) -> str:
    return clean(text[: G.MAX_STATUS_TEXT])
