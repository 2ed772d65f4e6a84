"""The daemon <-> guest channel (the stdin/stdout of one Deno process): one record per op, both ways.

Framing (wire/channel.py): u32 BE length of the rest, u32 BE length of the JSON header, the
header (UTF-8 JSON, field ``op``), then the raw body bytes. A record is the header; where an op
carries bytes (a chunk, an inline body) they are a field of the record and travel as the body.

The values bootstrap.js works with are defined here, once, and travel to it in ``init`` (the
first frame after the daemon claims the process); the bootstrap keeps them in variables guest
code cannot reach.

Stream directions are named as in protocol.md: an *inbound* stream is produced by the host and
read by the guest (fetch response bodies, dispatch request bodies); an *outbound* stream is
produced by the guest (serve() response bodies, fetch uploads). Inbound sids come from the
daemon's per-runtime counter, outbound sids and fetch ids from the bootstrap's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from wire import protocol as P
from wire import values as V
from wire.schema import (
    ANY,
    BOOL,
    HEADERS,
    INT,
    STR,
    U64,
    F,
    Inline,
    Kind,
    Payload,
    Record,
    from_header,
    payload_frame,
    record,
)

# ---- the values both sides work with (sent to bootstrap.js in `init`) -----------------------------

#: Chunks a stream may have in flight between daemon and guest, either way.
WINDOW = 4
#: Largest chunk on the channel (and on a pipe); producers split larger ones.
MAX_CHUNK = P.MAX_CHUNK
#: A body complete within this many bytes travels with its head instead of as a stream.
INLINE_MAX = P.MAX_INLINE_BODY
#: Bytes of a marshalled value (an eval's default export): wire/values.py, where the rules live.
MAX_VALUE = V.MAX_VALUE
#: UTF-16 units of text in one console entry (at most 48 KiB of UTF-8).
MAX_CONSOLE = 16 * 1024
#: Arguments of one console entry the bootstrap formats (one more says the rest were dropped).
MAX_CONSOLE_ARGS = 64
#: Console entries per second the bootstrap sends (the daemon forwards at most twice that).
CONSOLE_RATE = 200
#: UTF-16 units kept of an error's message and of its stack.
MAX_ERROR_TEXT = 16 * 1024
#: Characters kept of an error's name (both sides cut it).
MAX_ERROR_NAME = 256
#: Characters of method, URL and headers in one request or response head.
MAX_HEAD = 32 * 1024
#: Characters kept of a response's statusText (both sides cut it).
MAX_STATUS_TEXT = 1024

# ---- what one runtime may have pending (issue 8: one tenant must not exhaust the shared daemon) ----
# The bootstrap gets the first two in `init` and refuses past them with a TypeError naming the
# limit; the daemon enforces them again (a guest past MAX_PENDING_FETCHES is stopped, a stream past
# MAX_STREAMS is refused). Tool calls are host calls like fetch() with a bound of their own.

#: fetch() calls of one runtime waiting for their response head (callbacks at the client).
MAX_PENDING_FETCHES = 32
#: tools.*() calls of one runtime waiting for their result (or an async generator's first answer).
MAX_PENDING_TOOLS = 64
#: `module` callbacks of one runtime waiting for the host's resolver (the bootstrap queues the rest).
MAX_PENDING_MODULES = 16
#: UTF-16 units of an import's specifier plus its referrer (the daemon forwards both in a header).
MAX_SPECIFIER = 8192
#: Bodies one runtime has open at once, both directions (each holds a pipe socket in the daemon).
MAX_STREAMS = 256
#: Calls into one runtime (eval, dispatch, stats) waiting for the guest; more get `busy`.
MAX_PENDING_CALLS = 1024
#: Bytes the daemon queues for one guest's stdin (a guest that does not read); new calls get `busy`.
MAX_STDIN_QUEUE = 8 * 1024 * 1024
#: Levels of arrays and objects in a value (wire/values.py).
MAX_VALUE_DEPTH = V.MAX_VALUE_DEPTH

CONSOLE_LEVELS = frozenset({"log", "info", "warn", "error", "debug", "trace"})
#: The guest's console methods (each makes an entry when it prints; clear always does).
CONSOLE_METHODS = frozenset(
    "log info debug warn error trace assert dir dirxml table group groupCollapsed groupEnd count countReset time "
    "timeLog timeEnd clear".split()
)
#: Bytes of a console entry's marshalled arguments: with its text (MAX_CONSOLE units, at most 48 KiB
#: of UTF-8) the entry stays within MAX_HEADER on the way to the client.
MAX_CONSOLE_VALUE = 12 * 1024


# ---- kinds of the guest channel ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuestStream:
    """A body that streams on the channel under a guest sid (``{"sid": n}`` in a header)."""

    sid: int


GuestBody = Inline | GuestStream | None


def _guest_body(v: Any, p: Payload) -> GuestBody:
    # anything but "inline" or {sid} means no body (what the daemon has always done with it)
    if v == P.BODY_INLINE:
        if len(p.frames) != 1:
            raise ValueError("an inline body needs the frame's body")
        p.used = 1
        return Inline(p.frames[0])
    if isinstance(v, dict):
        return GuestStream(U64.check(v.get("sid"), p))
    return None


def _dump_guest_body(v: GuestBody, payload: list[Any]) -> Any:
    if isinstance(v, Inline):
        payload.append(v.data)
        return P.BODY_INLINE
    return None if v is None else {"sid": v.sid}


@dataclass(frozen=True, slots=True)
class GuestError:
    """An error the bootstrap describes: each part as the guest sent it, stringified (None: absent)."""

    name: str | None = None
    message: str | None = None
    stack: str | None = None


def _error(v: Any, _p: Payload) -> GuestError:
    if not isinstance(v, dict):
        raise ValueError("must be an object {name, message, stack}")
    parts = {k: None if v.get(k) is None else str(v[k]) for k in ("name", "message", "stack")}
    return GuestError(**parts)


def _maybe_error(v: Any, p: Payload) -> GuestError | None:
    return _error(v, p) if isinstance(v, dict) else None


def _redirect(v: Any, _p: Payload) -> str:
    return v if v in ("follow", "manual", "error") else "follow"


def _level(v: Any, _p: Payload) -> str:
    if v not in CONSOLE_LEVELS:
        raise ValueError(f"must be one of {', '.join(sorted(CONSOLE_LEVELS))}")
    return v


def _list(v: Any, _p: Payload) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError("must be an array")
    return v


def _method(v: Any, _p: Payload) -> str:
    if v not in CONSOLE_METHODS:
        raise ValueError("must be a console method")
    return v


GBODY = Kind("guest body", _guest_body, _dump_guest_body)
ERROR = Kind("error {name, message, stack}", _error)
MAYBE_ERROR = Kind("error, or anything (ignored)", _maybe_error)
REDIRECT = Kind("follow|manual|error (else follow)", _redirect)
LEVEL = Kind("console level", _level)
METHOD = Kind("console method", _method)
LIST = Kind("array", _list)

_ID = "the exchange id"
_IN_SID = "an inbound stream's sid (the daemon's counter)"
_OUT_SID = "an outbound stream's sid (the bootstrap's counter)"
_HEADERS = "array of [name, value] string pairs"


# ---- daemon -> guest ------------------------------------------------------------------------------


@record("init")
class Init(Record):
    """First frame after the daemon claims the process for a runtime; the guest answers `init_ok`.
    Every limit the bootstrap applies travels here."""

    fetch: bool = F(BOOL, False, "the host answers fetch(); else fetch() throws TypeError")
    console: bool = F(BOOL, False, "the host wants console entries")
    window: int = F(INT, WINDOW, "chunks in flight per stream, either way")
    max_chunk: int = F(INT, MAX_CHUNK, "largest chunk the guest sends")
    inline_max: int = F(INT, INLINE_MAX, "largest body sent inline with its head")
    max_value: int = F(INT, MAX_VALUE, "bytes of a value: its tree's UTF-8 JSON plus its blobs")
    max_console: int = F(INT, MAX_CONSOLE, "UTF-16 units of text per console entry")
    max_console_args: int = F(INT, MAX_CONSOLE_ARGS, "arguments per console entry")
    console_rate: int = F(INT, CONSOLE_RATE, "console entries per second")
    max_console_value: int = F(INT, MAX_CONSOLE_VALUE, "bytes of a console entry's marshalled arguments")
    max_error_text: int = F(INT, MAX_ERROR_TEXT, "UTF-16 units of an error's message, and of its stack")
    max_error_name: int = F(INT, MAX_ERROR_NAME, "characters of an error's name")
    max_head: int = F(INT, MAX_HEAD, "characters of method, URL and headers of a head")
    max_status_text: int = F(INT, MAX_STATUS_TEXT, "characters of a response's statusText")
    max_pending_fetches: int = F(INT, MAX_PENDING_FETCHES, "fetch() calls waiting for their head")
    max_streams: int = F(INT, MAX_STREAMS, "bodies open at once, both directions")
    max_value_depth: int = F(INT, MAX_VALUE_DEPTH, "levels of arrays and objects a value may nest")
    tools: tuple[str, ...] = F(LIST, (), "names of the host's async-function tools (the `tools` object)")
    stream_tools: tuple[str, ...] = F(LIST, (), "names of the host's async-generator tools")
    max_pending_tools: int = F(INT, MAX_PENDING_TOOLS, "tools.*() calls waiting for their result")
    modules: bool = F(BOOL, False, "the host resolves imports (`module`)")
    max_pending_modules: int = F(INT, MAX_PENDING_MODULES, "`module` calls waiting for their answer")
    max_specifier: int = F(INT, MAX_SPECIFIER, "characters of an import's specifier plus its referrer")
    lexer: str = F(STR, "", "with `modules`: the import lexer's source")


@record("eval")
class Eval(Record):
    """Evaluate `code` as a module; the guest answers `eval_ok` or `eval_error`."""

    id: int = F(U64, doc=_ID)
    code: str = F(STR, doc="the module source")
    filename: str = F(STR, "", "as `eval.filename`")


@record("request")
class Request(Record):
    """Call the serve() handler; the guest answers `response` or `response_error`."""

    id: int = F(U64, doc=_ID)
    method: str = F(STR, doc="HTTP method")
    url: str = F(STR, doc="absolute URL")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, (), _HEADERS)
    body: GuestBody = F(GBODY, None, "the body; a `sid`: an inbound stream")
    redirect: str = F(REDIRECT, "follow", "the Request's redirect mode")


@record("abort")
class Abort(Record):
    """The client gave up on request `id` before its head: abort its signal and forget it."""

    id: int = F(U64, doc=_ID)


@record("fetch_response")
class FetchResponse(Record):
    """Resolve the guest's fetch() `id` with a Response."""

    id: int = F(U64, doc="the guest's fetch id")
    status: int = F(INT, doc="200..599")
    statusText: str = F(STR, "", "status text")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, (), _HEADERS)
    url: str = F(STR, "", "final URL")
    redirected: bool = F(BOOL, False, "the response followed a redirect")
    body: GuestBody = F(GBODY, None, "the body; a `sid`: an inbound stream")


@record("fetch_error")
class FetchError(Record):
    """Reject the guest's fetch() `id` with TypeError(message)."""

    id: int = F(U64, doc="the guest's fetch id")
    message: str = F(STR, doc="the TypeError's message")


@record("tool_result")
class ToolResult(Record):
    """Resolve the guest's tool call `id`: with the value `v` (its blobs: the frame's body), or
    with an async iterable of the items of inbound stream `items` (one chunk per item)."""

    id: int = F(U64, doc="the guest's tool call id")
    v: Any = F(ANY, None, "the result's value tree (bootstrap.js, section values)")
    items: int | None = F(U64, None, "an async generator's items: an inbound stream's sid")
    blobs: Any = payload_frame("the value's blobs")


@record("tool_error")
class ToolError(Record):
    """Reject the guest's tool call `id` with an Error `name`: `message`."""

    id: int = F(U64, doc="the guest's tool call id")
    name: str = F(STR, "Error", "the Error's name")
    message: str = F(STR, doc="the Error's message")


@record("module_source")
class ModuleSource(Record):
    """Answer the guest's `module` `id`: the resolver's module (its source is the frame's body)."""

    id: int = F(U64, doc="the guest's module id")
    url: str = F(STR, doc="as `module_ok`'s")
    kind: str = F(STR, doc="as `module_ok`'s")
    source: Any = payload_frame("UTF-8")


@record("module_error")
class ModuleError(Record):
    """Answer the guest's `module` `id`: no module (the import fails with TypeError(message))."""

    id: int = F(U64, doc="the guest's module id")
    message: str = F(STR, doc="why")


@record("chunk")
class InboundChunk(Record):
    """The next chunk of an inbound stream, sent only against the guest's credit."""

    sid: int = F(U64, doc=_IN_SID)
    data: Any = payload_frame("the chunk (the frame's body), at most MAX_CHUNK bytes")


@record("end")
class InboundEnd(Record):
    """An inbound stream ended."""

    sid: int = F(U64, doc=_IN_SID)


@record("error")
class InboundError(Record):
    """An inbound stream failed (or was cancelled under a guest still reading it)."""

    sid: int = F(U64, doc=_IN_SID)
    message: str = F(STR, doc="the TypeError's message")


@record("ack")
class OutboundAck(Record):
    """One chunk of an outbound stream left the daemon: one credit back."""

    sid: int = F(U64, doc=_OUT_SID)


@record("cancel")
class OutboundCancel(Record):
    """The consumer of an outbound stream is gone: stop producing it."""

    sid: int = F(U64, doc=_OUT_SID)


@record("stats")
class StatsQuery(Record):
    """Answer `stats` with the guest's in-flight counts."""

    id: int = F(U64, doc=_ID)


@record("ping")
class Ping(Record):
    """Answer `pong` from the read loop: the answer shows the guest's event loop turns (CPU limit)."""

    id: int = F(U64, doc="the ping's number")


# ---- guest -> daemon ------------------------------------------------------------------------------


@record("ready")
class Ready(Record):
    """The bootstrap has hidden the channel: the process counts as started."""


@record("fatal")
class Fatal(Record):
    """The bootstrap cannot go on; the daemon kills the process."""

    message: Any = F(ANY, None, "why")


@record("init_ok")
class InitOk(Record):
    """`init` was applied."""


@record("eval_ok")
class EvalOk(Record):
    """An eval finished; `v` and the frame's body are the module's default export (a value)."""

    id: int = F(U64, doc=_ID)
    v: Any = F(ANY, None, "the default export: a value tree (7.4); its blobs are the frame's body")
    blobs: Any = payload_frame("the value's blobs, concatenated (may be empty)")


@record("eval_error")
class EvalError(Record):
    """An eval threw."""

    id: int = F(U64, doc=_ID)
    error: GuestError = F(ERROR, doc="the error")


@record("response")
class Response(Record):
    """The serve() handler's response head to request `id`."""

    id: int = F(U64, doc=_ID)
    status: int = F(INT, doc="200..599; another fails the dispatch, not the runtime")
    statusText: str = F(STR, "", "status text (the daemon keeps MAX_STATUS_TEXT characters)")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, doc=_HEADERS)
    body: GuestBody = F(GBODY, None, "the body; a `sid`: a new outbound stream")


@record("response_error")
class ResponseError(Record):
    """The serve() handler failed (or there is none: `code` "no_handler")."""

    id: int = F(U64, doc=_ID)
    error: GuestError = F(ERROR, doc="the error")
    code: Any = F(ANY, None, '"no_handler" when no serve() handler is registered')


@record("fetch")
class Fetch(Record):
    """The guest called fetch()."""

    id: int = F(U64, doc="a new fetch id")
    method: str = F(STR, doc="the Request's method")
    url: str = F(STR, doc="the Request's URL")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, doc=_HEADERS)
    redirect: str = F(REDIRECT, "follow", "the Request's redirect mode")
    body: GuestBody = F(GBODY, None, "the body; a `sid`: a new outbound stream")


@record("fetch_abort")
class FetchAbort(Record):
    """The guest's fetch signal aborted."""

    id: int = F(U64, doc="the fetch id")


@record("tool")
class Tool(Record):
    """The guest called `tools.<name>(...args)`: `v` is the packed array of its arguments (a
    ReadableStream argument: `null` there, `body` and `at` say which), their blobs the frame's body."""

    id: int = F(U64, doc="a new tool call id")
    name: str = F(STR, doc="the tool")
    v: Any = F(ANY, None, "the arguments' value tree")
    body: GuestBody = F(GBODY, None, "a ReadableStream argument: `{sid}`, a new outbound stream")
    at: int = F(U64, 0, "with `body`: the argument's position")
    blobs: Any = payload_frame("the arguments' blobs")


@record("tool_abort")
class ToolAbort(Record):
    """The guest stopped waiting for tool call `id` (it cancelled the async generator's items first)."""

    id: int = F(U64, doc="the tool call id")


@record("module")
class ModuleQuery(Record):
    """The guest imports `specifier` (not yet in its cache): ask the host's resolver."""

    id: int = F(U64, doc="a new module id")
    specifier: str = F(STR, doc="the import's key")
    referrer: str = F(STR, "", "the importer's URL")


@record("read")
class InboundRead(Record):
    """Credit for `n` more chunks of an inbound stream (outstanding credit at most WINDOW)."""

    sid: int = F(U64, doc=_IN_SID)
    n: int = F(U64, 1, "1..WINDOW")


@record("cancel")
class InboundCancel(Record):
    """The guest no longer reads an inbound stream."""

    sid: int = F(U64, doc=_IN_SID)


@record("chunk")
class OutboundChunk(Record):
    """The next chunk of an outbound stream (at most WINDOW unacknowledged)."""

    sid: int = F(U64, doc=_OUT_SID)
    data: Any = payload_frame("the chunk (the frame's body)")


@record("end")
class OutboundEnd(Record):
    """An outbound stream ended."""

    sid: int = F(U64, doc=_OUT_SID)


@record("error")
class OutboundError(Record):
    """An outbound stream failed."""

    sid: int = F(U64, doc=_OUT_SID)
    error: GuestError | None = F(MAYBE_ERROR, None, "the error (anything but an object: a generic text)")


@record("console")
class Console(Record):
    """One console entry."""

    method: str = F(METHOD, doc="the method called")
    level: str = F(LEVEL, doc="as Deno prints it")
    text: str = F(STR, doc="as Deno prints it")
    depth: int = F(INT, doc="group depth")
    v: Any = F(ANY, None, "the arguments, an array value (7.4)")
    blobs: Any = payload_frame("the value's blobs, concatenated (may be empty)")


@record("stats")
class StatsAnswer(Record):
    """The guest's in-flight counts, answering `stats` `id`."""

    id: int = F(U64, doc=_ID)
    inbound: int = F(U64, doc="inbound streams open")
    outbound: int = F(U64, doc="outbound streams open")
    fetches: int = F(U64, doc="fetches waiting for their response")
    dispatches: int = F(U64, doc="requests being handled")
    tools: int = F(U64, 0, "tool calls waiting for their result")


@record("pong")
class Pong(Record):
    """Answers `ping` `id` (handled by the process, daemon/guest.py, not by the runtime)."""

    id: int = F(U64, doc="the ping's number")


# ---- tables and codec -----------------------------------------------------------------------------

DAEMON_TO_GUEST: dict[str, type[Record]] = {
    c.T: c
    for c in (Init, Eval, Request, Abort, FetchResponse, FetchError, InboundChunk, InboundEnd, InboundError,
              OutboundAck, OutboundCancel, StatsQuery, Ping, ToolResult, ToolError, ModuleSource, ModuleError)
}  # fmt: skip
GUEST_TO_DAEMON: dict[str, type[Record]] = {
    c.T: c
    for c in (Ready, Fatal, InitOk, EvalOk, EvalError, Response, ResponseError, Fetch, FetchAbort, InboundRead,
              InboundCancel, OutboundChunk, OutboundEnd, OutboundError, Console, StatsAnswer, Pong, Tool, ToolAbort,
              ModuleQuery)
}  # fmt: skip


def _frame_use(cls: type[Record]) -> str:
    """How a record uses its frame's body: "always" (a payload field), "inline" (when its body is
    inline) or "" (never: a body sent with it is ignored)."""
    kinds = {spec.kind for spec in cls.FIELDS}
    return "always" if None in kinds else "inline" if GBODY in kinds else ""


_FRAME_USE = {op: _frame_use(cls) for op, cls in GUEST_TO_DAEMON.items()}


def parse(header: dict[str, Any], body: Any) -> Record:
    """The record of one guest frame (``header`` decoded, its ``op`` known); ProtocolError if a
    field is missing or mistyped. Validates once: handlers use the record's values as they are."""
    op = header["op"]
    use = _FRAME_USE[op]
    frames = [body] if use == "always" or (use == "inline" and header.get("body") == P.BODY_INLINE) else []
    return from_header(GUEST_TO_DAEMON[op], header, frames)


def op_of(header: dict[str, Any]) -> str:
    """The op of a frame wire.channel has read (it checked that the op is one of GUEST_TO_DAEMON)."""
    return header["op"]  # type: ignore[no-any-return]


def hot(header: dict[str, Any]) -> tuple[int, int] | None:
    """The hot path: ``(sid, n)`` of a well-formed ``read`` or ``(sid, -1)`` of a well-formed
    ``chunk``, checked without building a record; None for any other frame (parse it).

    One of these crosses the channel per streamed chunk. Building a record costs ~1.5 us, these
    checks ~0.1 us (measured); they are the records' own (InboundRead, OutboundChunk), and a frame
    that fails them goes to ``parse``, which refuses it with the reason."""
    op = header["op"]
    if op == "chunk":
        sid = header.get("sid")
        if type(sid) is int and 0 <= sid < 2**63:
            return sid, -1
    elif op == "read":
        sid, n = header.get("sid"), header.get("n", 1)
        if type(sid) is int and 0 <= sid < 2**63 and type(n) is int and 0 <= n < 2**63:
            return sid, n
    return None


def encode(msg: Record) -> tuple[bytes, Any]:
    """(JSON header, body or None) of one daemon -> guest frame; every field is written out."""
    header: dict[str, Any] = {"op": msg.T}
    payload: list[Any] = []
    for spec in msg.FIELDS:
        value = getattr(msg, spec.name)
        if spec.kind is None:
            payload.append(value)
        else:
            header[spec.name] = value if spec.kind.dump is None else spec.kind.dump(value, payload)
    return json.dumps(header, separators=(",", ":")).encode(), (payload[0] if payload else None)


def header_of(msg: Record) -> bytes:
    """The JSON header of ``msg`` alone: a stream encodes its per-chunk header once (``chunk``/
    ``ack`` frames differ only in their body), so the hot path builds no record and no JSON."""
    return encode(msg)[0]
