"""Every message on every ROUTER/DEALER link, as one typed record per message type.

protocol.md's message tables are generated from these classes (``python -m wire.spec``) and a
test keeps them equal, so the specification cannot drift from the code. Field docs are the
one-line meanings printed there.

A record is the same on every link it travels; a link may need more of its optional fields than
another (``c``, the client's route, is set by the broker on what it forwards to a daemon). The
link tables at the end say which types each side accepts and which fields it needs.

An ``ok`` is the one polymorphic type: what it carries depends on the request it answers, which
only the waiting side knows. ``Link.parse`` gives a ``Reply`` for it; ``reply.parse(EvalOk)``
finishes the validation once the request is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from wire import protocol as P
from wire.schema import (
    ANY,
    BIN,
    BIN16,
    BODY,
    BOOL,
    ENDPOINT,
    HEADERS,
    INT,
    INT_MAP,
    STR,
    STRS,
    U64,
    VALUE,
    Body,
    F,
    Inline,
    Kind,
    Link,
    Record,
    Reply,
    StreamRef,
    on,
    payload_frame,
    peek,
    record,
    to_frames,
)

__all__ = [
    "Body",
    "Inline",
    "Link",
    "Record",
    "Reply",
    "StreamRef",
    "peek",
    "to_frames",
]

R = TypeVar("R", bound=Record)

_ID = "request id; the reply carries it"
_RT = "runtime id (32 hex characters, minted by the broker)"
_C = "the client's opaque session id (never its route), set by the broker toward daemons; echoed"


@dataclass(frozen=True, slots=True)
class Held:
    """One runtime a daemon hosts, as it reports it in `ready`: what a broker that never saw its
    `create_runtime` (it restarted, or is the standby) needs to route to it and to reclaim it."""

    rt: str
    owner: bytes
    owner_key: bytes | None = None
    name: str | None = None
    keep_alive_ms: int | None = None


_HELD_FIELDS = {"rt": str, "owner": bytes, "owner_key": (bytes, type(None)), "name": (str, type(None)),
                "keep_alive_ms": (int, type(None))}  # fmt: skip


def _held(v: Any, _p: Any) -> tuple[Held, ...]:
    if not isinstance(v, list) or len(v) > P.MAX_RUNTIMES_HELD:
        raise ValueError(f"must be an array of at most {P.MAX_RUNTIMES_HELD} maps")
    out = []
    for item in v:
        if not isinstance(item, dict) or set(item) - set(_HELD_FIELDS) or not {"rt", "owner"} <= set(item):
            raise ValueError("each entry is a map {rt, owner[, owner_key, name, keep_alive_ms]}")
        if not all(isinstance(item[k], _HELD_FIELDS[k]) for k in item):
            raise ValueError("an entry's field has the wrong type")
        out.append(Held(**item))
    return tuple(out)


def _dump_held(v: tuple[Held, ...], _payload: list[Any]) -> Any:
    return [{k: getattr(h, k) for k in _HELD_FIELDS if getattr(h, k) is not None} for h in v]


HELD = Kind("array of {rt, owner, owner_key?, name?, keep_alive_ms?}", _held, _dump_held)


# ---- sessions and liveness -------------------------------------------------------------------------


@record("hello")
class Hello(Record):
    """Client -> broker: start a session (also the first message on a control link)."""

    id: int | None = F(U64, None, "echoed in `welcome`")
    session: bytes | None = F(BIN16, None, "client -> broker: resume the session of this token")


@record("welcome")
class Welcome(Record):
    """Broker -> client (answer to `hello`) and broker -> daemon (answer to `ready`)."""

    id: int | None = F(U64, None, "the `hello`'s id")
    token: bytes | None = F(BIN16, None, "the client's secret token: its control-link identity")
    heartbeat_ms: int = F(INT, doc="the broker's heartbeat interval in ms")


@record("hb")
class Heartbeat(Record):
    """Both directions on both broker links, every heartbeat interval."""

    load: int | None = F(INT, None, "daemon -> broker: runtimes hosted plus starting")
    pipes: int | None = F(INT, None, "daemon -> broker: body pipes open (for `status`)")
    warm: int | None = F(INT, None, "daemon -> broker: pre-started runtimes ready (for `status`)")


@record("bye")
class Bye(Record):
    """Client -> broker: the client leaves; the broker disposes its unnamed runtimes now."""


@record("ready")
class Ready(Record):
    """Daemon -> broker: register (again) with capacity and the control endpoint clients use."""

    capacity: int = F(INT, doc="runtimes it hosts at most (negative is treated as 0)")
    control: str = F(ENDPOINT, doc="its control ROUTER as clients reach it")
    name: str | None = F(STR, None, "shown in logs and create replies")
    load: int = F(INT, 0, "runtimes it already hosts")
    key: str | None = F(STR, None, "its CURVE key (Z85); the broker uses the authenticated one")
    runtimes: tuple[Held, ...] = F(HELD, (), "the runtimes it hosts (protocol.md 3.3, Recovery)")


# ---- client requests (forwarded by the broker with `c` to the daemon) -----------------------------


@record("create_runtime")
class CreateRuntime(Record):
    """Client -> broker -> daemon: place and start a runtime."""

    id: int = F(U64, doc=_ID)
    fetch: bool = F(BOOL, False, "the client answers `fetch` callbacks")
    console: bool = F(BOOL, False, "the client wants `console` messages")
    memory_limit_mb: int | None = F(INT, None, "V8 heap limit (MiB), from 16 to the daemon's maximum")
    eval_timeout_ms: int | None = F(INT, None, "default eval timeout (ms, > 0); default: the daemon's")
    cpu_limit_ms: int | None = F(
        INT, None, "CPU (ms, > 0) one event-loop turn of the guest may use; default: the daemon's"
    )
    request_cpu_ms: int | None = F(INT, None, "CPU (ms) a dispatch may use before its head")
    c: bytes | None = F(BIN, None, _C)
    rt: str | None = F(STR, None, "broker -> daemon: the id the broker minted")
    owner: bytes | None = F(BIN, None, "broker -> daemon: the owner's token")
    owner_key: bytes | None = F(BIN, None, "broker -> daemon, with CURVE: the owner's key (Z85)")
    name: str | None = F(STR, None, "found again by `acquire`; unique per session")
    keep_alive_ms: int | None = F(INT, None, "how long it outlives its session (ms)")
    tools: tuple[str, ...] = F(STRS, (), "the client's tools: async functions (wire/tools.py names)")
    stream_tools: tuple[str, ...] = F(STRS, (), "the client's tools that are async generators")
    modules: bool = F(BOOL, False, "the client answers `module` callbacks")


@record("acquire")
class Acquire(Record):
    """Client -> broker: the session's runtime named `name`; answered by the broker with a `CreateOk`."""

    id: int = F(U64, doc=_ID)
    name: str = F(STR, doc="the name given at `create_runtime`")


@record("eval")
class Eval(Record):
    """Client -> broker -> daemon: evaluate an ES module in the runtime."""

    id: int = F(U64, doc=_ID)
    rt: str = F(STR, doc=_RT)
    source: Any = payload_frame("the source, UTF-8, as the one payload frame")
    timeout_ms: int | None = F(INT, None, "timeout of this evaluation (ms, > 0); default: the runtime's")
    c: bytes | None = F(BIN, None, _C)
    filename: str | None = F(STR, None, "names the source in stacks; *.ts: TypeScript (7.3)")


@record("dispatch")
class Dispatch(Record):
    """Client -> broker -> daemon: one HTTP request for the guest's serve() handler."""

    id: int = F(U64, doc=_ID)
    rt: str = F(STR, doc=_RT)
    method: str = F(STR, doc="HTTP method")
    url: str = F(STR, doc="absolute URL")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, (), "request headers")
    resp_sid: bytes = F(BIN16, doc="the response body's stream id (client-chosen); cancels the request")
    body: Body = F(BODY, None, "request body: absent, inline, or {sid} (endpoint follows in `pipe_ready`)")
    c: bytes | None = F(BIN, None, _C)
    redirect: str = F(STR, "follow", "the Request's redirect mode: follow, manual or error")


@record("stats")
class Stats(Record):
    """Client -> broker -> daemon: what the runtime has in flight on each hop."""

    id: int = F(U64, doc=_ID)
    rt: str = F(STR, doc=_RT)
    c: bytes | None = F(BIN, None, _C)


@record("dispose")
class Dispose(Record):
    """Client -> broker -> daemon: stop the runtime. Without `c` and `id` (broker -> daemon): its
    owner is gone, dispose without replying."""

    rt: str = F(STR, doc=_RT)
    id: int | None = F(U64, None, _ID)
    c: bytes | None = F(BIN, None, _C)


# ---- replies ---------------------------------------------------------------------------------------


@record("error")
class ErrorReply(Record):
    """A failed request (any direction), or the client's refusal of a `fetch` callback."""

    code: str = F(STR, doc="error code (protocol.md, Error codes)")
    message: str = F(STR, doc="human-readable reason")
    id: int | None = F(U64, None, "the request's id (absent when it could not be read)")
    c: bytes | None = F(BIN, None, _C)
    rt: str | None = F(STR, None, "client -> broker: the runtime whose callback this answers")
    name: str | None = F(STR, None, "with `guest_error`: the JS error's name")
    stack: str | None = F(STR, None, "with `guest_error`: the JS error's stack")


@record("ok")
class CreateOk(Record):
    """`ok` to `create_runtime`."""

    id: int = F(U64, doc=_ID)
    rt: str = F(STR, doc=_RT)
    pid: int = F(INT, 0, "the Deno process id on the daemon's host (informational)")
    control: str | None = F(ENDPOINT, None, "broker -> client: the daemon's control endpoint")
    daemon: str | None = F(STR, None, "broker -> client: the daemon's name")
    daemon_key: str | None = F(STR, None, "broker -> client, with CURVE: the daemon's public key (Z85)")
    c: bytes | None = F(BIN, None, _C)


@record("ok")
class EvalOk(Record):
    """`ok` to `eval`."""

    id: int = F(U64, doc=_ID)
    value: Any = F(VALUE, None, "the module's default export, a marshalled value (absent: None)")
    c: bytes | None = F(BIN, None, _C)


@record("ok")
class DispatchOk(Record):
    """`ok` to `dispatch`: the guest's response head (the body may still stream)."""

    id: int = F(U64, doc=_ID)
    status: int = F(INT, doc="200..599")
    status_text: str = F(STR, "", "may be empty")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, (), "response headers")
    body: Body = F(BODY, None, "absent, inline, or {sid: resp_sid, ep}")
    c: bytes | None = F(BIN, None, _C)


@record("ok")
class StatsOk(Record):
    """`ok` to `stats`."""

    id: int = F(U64, doc=_ID)
    daemon: dict[str, int] | None = F(INT_MAP, None, "the daemon's in-flight counts for the runtime")
    guest: dict[str, int] | None = F(INT_MAP, None, "the guest's own in-flight counts")
    c: bytes | None = F(BIN, None, _C)


@record("ok")
class DisposeOk(Record):
    """`ok` to `dispose`."""

    id: int = F(U64, doc=_ID)
    rt: str | None = F(STR, None, _RT)
    c: bytes | None = F(BIN, None, _C)


@record("ok")
class FetchOk(Record):
    """Client -> broker -> daemon: the client's answer to a `fetch` callback (the response head)."""

    id: int = F(U64, doc="the `fetch`'s id")
    rt: str | None = F(STR, None, "client -> broker: the `fetch`'s runtime (the broker checks ownership)")
    status: int = F(INT, doc="200..599")
    status_text: str = F(STR, "", "")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, (), "response headers")
    url: str = F(STR, "", "final URL after redirects")
    redirected: bool = F(BOOL, False, "the response followed a redirect")
    body: Body = F(BODY, None, "absent, inline, or {sid: resp_sid}")


@record("tool_result")
class ToolResult(Record):
    """Client -> broker -> daemon: a tool call's result (its failure is an `error` `tool_failed`)."""

    id: int = F(U64, doc="the `tool`'s id")
    rt: str | None = F(STR, None, "client -> broker: the `tool`'s runtime (the broker checks ownership)")
    value: Any = F(VALUE, None, "the async function's result, a marshalled value")
    items: bool = F(BOOL, False, "an async generator: its items stream on `resp_sid` (pipe in `pipe_ready`)")


@record("module_ok")
class ModuleOk(Record):
    """Client -> broker -> daemon: the resolver's module for a `module` callback (none: `error`
    `module_not_found`)."""

    id: int = F(U64, doc="the `module`'s id")
    rt: str | None = F(STR, None, "client -> broker: the `module`'s runtime")
    url: str = F(STR, doc="its canonical URL (7.3)")
    kind: str = F(STR, "javascript", "javascript, typescript or json")
    source: Any = payload_frame("UTF-8, at most MAX_SOURCE bytes")


# ---- guest callbacks and notices (daemon -> broker -> client) ------------------------------------


@record("fetch")
class Fetch(Record):
    """Daemon -> broker -> client: the guest called fetch(); answer with `ok` (FetchOk) or `error`."""

    id: int = F(U64, doc="callback id (the daemon's id space); echo it in the answer")
    rt: str = F(STR, doc="the runtime whose guest fetches")
    method: str = F(STR, doc="the guest Request's method")
    url: str = F(STR, doc="the guest Request's URL")
    headers: tuple[tuple[str, str], ...] = F(HEADERS, (), "the guest Request's headers")
    redirect: str = F(STR, "follow", "follow, manual or error")
    body: Body = F(BODY, None, "upload body: absent, inline, or {sid, ep} (connect a PULL)")
    resp_sid: bytes = F(
        BIN16, doc="the response body's stream id: a streamed answer is `{sid: resp_sid}`, its pipe in `pipe_ready`"
    )


@record("tool")
class Tool(Record):
    """Daemon -> broker -> client: the guest called `tools.<name>(...args)`; answer with
    `tool_result` or `error`."""

    id: int = F(U64, doc="callback id (the daemon's id space, shared with `fetch`); echo it")
    rt: str = F(STR, doc="the runtime whose guest calls")
    name: str = F(STR, doc="the tool")
    args: Any = F(VALUE, (), "the positional arguments, a list of values (a stream argument: nil)")
    body: Body = F(BODY, None, "a ReadableStream argument: {sid, ep} (connect a PULL)")
    at: int = F(INT, 0, "with `body`: its argument's position")
    resp_sid: bytes = F(BIN16, doc="an async generator's items stream; cancelling it abandons the call")


@record("module")
class Module(Record):
    """Daemon -> broker -> client: the guest imports a module; answer with `module_ok` or `error`."""

    id: int = F(U64, doc="callback id, as `fetch`'s")
    rt: str = F(STR, doc="the runtime whose guest imports")
    specifier: str = F(STR, doc="the import's key (7.3)")
    referrer: str | None = F(STR, None, "the importer's URL")


@record("console")
class Console(Record):
    """Daemon -> broker -> client: one console entry of the guest."""

    rt: str = F(STR, doc=_RT)
    level: str = F(STR, "log", "log, info, warn, error, debug or trace")
    args: list[Any] = F(VALUE, (), "the arguments (a list; 7.5)")
    method: str = F(STR, "log", "the console method")
    text: str = F(STR, "", "as Deno prints it (7.5)")
    depth: int = F(INT, 0, "group depth")


@record("runtime_lost")
class RuntimeLost(Record):
    """Daemon -> broker -> client (or broker -> client): the runtime is gone for good."""

    rt: str = F(STR, doc=_RT)
    code: str = F(STR, P.E_RUNTIME_LOST, "runtime_lost, timeout, memory_limit or cpu_limit")
    message: str = F(STR, "", "human-readable reason")


# ---- control link (client DEALER <-> daemon ROUTER) -------------------------------------------------


@record("cancel")
class Cancel(Record):
    """Control, both directions: cancel the stream `sid` (the receiver stops producing or consuming)."""

    sid: bytes = F(BIN16, doc="the stream")


@record("pipe_ready")
class PipeReady(Record):
    """Control, daemon -> client: the PULL for a dispatch request body is bound; connect and produce."""

    sid: bytes = F(BIN16, doc="the request body's stream id")
    ep: str = F(ENDPOINT, doc="where to connect a PUSH")


@record("status")
class Status(Record):
    """Client -> broker: what the broker knows (`python -m broker status`); any admitted client may ask."""

    id: int = F(U64, doc=_ID)


@record("ok")
class StatusOk(Record):
    """`ok` to `status`: daemons, sessions (by `c`, never token), requests in flight (docs/design.md)."""

    id: int = F(U64, doc=_ID)
    report: Any = F(ANY, doc="a map; its keys are informational, not a contract")


# ---- links ----------------------------------------------------------------------------------------


CLIENT_TO_BROKER = on(
    "client -> broker",
    Hello, Heartbeat, Bye, Status, CreateRuntime, Acquire, Eval, Dispatch, Stats, (Dispose, ("id",)),
    (FetchOk, ("rt",)), (ErrorReply, ("id", "rt")), (ToolResult, ("rt",)), (ModuleOk, ("rt",)),
)  # fmt: skip
BROKER_TO_CLIENT = on(
    "broker -> client",
    (Welcome, ("token",)), Heartbeat, ErrorReply, Fetch, Console, RuntimeLost, Tool, Module,
    replies=("id",),
)  # fmt: skip
DAEMON_TO_BROKER = on(
    "daemon -> broker",
    Ready, Heartbeat, (ErrorReply, ("id", "c")), Fetch, Console, RuntimeLost, Tool, Module,
    replies=("id", "c"),
)  # fmt: skip
BROKER_TO_DAEMON = on(
    "broker -> daemon",
    Welcome, Heartbeat, (CreateRuntime, ("c", "rt", "owner")), (Eval, ("c",)), (Dispatch, ("c",)),
    (Stats, ("c",)), Dispose, FetchOk, ErrorReply, ToolResult, ModuleOk,
)  # fmt: skip
CONTROL_TO_DAEMON = on("control client -> daemon", Hello, Cancel)
CONTROL_TO_CLIENT = on("control daemon -> client", Cancel, PipeReady)

#: Daemon -> client callbacks the client answers (the broker holds them until it does).
CALLBACKS = (Fetch, Tool, Module)

#: Requests on the client link that name a runtime the client must own.
RUNTIME_REQUESTS = (Eval, Dispatch, Stats, Dispose)

#: The reply record of each request, for the side that waits for it.
REPLY_OF: dict[type[Record], type[Record]] = {
    CreateRuntime: CreateOk,
    Acquire: CreateOk,
    Eval: EvalOk,
    Dispatch: DispatchOk,
    Stats: StatsOk,
    Dispose: DisposeOk,
    Hello: Welcome,
    Status: StatusOk,
}

LINKS = (CLIENT_TO_BROKER, BROKER_TO_CLIENT, DAEMON_TO_BROKER, BROKER_TO_DAEMON, CONTROL_TO_DAEMON, CONTROL_TO_CLIENT)


def error(code: str, message: str, id_: int | None = None, **fields: Any) -> ErrorReply:
    """An ``error`` record (``id`` omitted when the offending message had none)."""
    return ErrorReply(code=code, message=message, id=id_, **fields)
