"""protocol.md's tables, generated from the code, and the check that keeps them equal.

``python -m wire.spec`` prints every generated block; ``--check protocol.md`` exits 1 on any
difference, on a limit whose stated value no longer matches its constant, and on a comment that
cites a section protocol.md or docs/design.md does not have (``citation_problems``); ``--write
protocol.md`` rewrites the blocks in place. In protocol.md a block sits between
``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the prose around it is free.

Blocks:

- ``kinds``: the field types used by the message records (``wire.schema`` kinds).
- ``links``: which message types each side of each link accepts (``wire.messages.LINKS``).
- ``messages``: one field table per record (``wire.messages``), from the ``F(kind, default, doc)``
  declarations.
- ``guest-kinds``, ``guest-links``, ``guest-messages``: the same for the daemon<->guest channel,
  from ``wire.guest`` (its records and the ``DAEMON_TO_GUEST`` / ``GUEST_TO_DAEMON`` tables).
- ``errors``: the ``E_*`` codes of ``wire.protocol`` with the meanings in ``ERRORS`` below.
- ``limits``: ``LIMITS`` below; each value is compared with the constant(s) it names (a module
  or constant that is gone is a problem too: point the limit at the constant's new home).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from wire import guest, messages, protocol
from wire.schema import FieldSpec, Link, Record

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "daemon" / "bootstrap.js"

BEGIN = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
END = "<!-- end generated -->"

# ---- what the code cannot say by itself -------------------------------------------------------------

#: Meaning of each field kind (``Kind.name``) used by the records; "payload frame" is a field that
#: travels as a raw frame after the header.
KINDS: dict[str, str] = {
    "int": "msgpack integer (no bool or float)",
    "id": "msgpack integer in `[0, 2^63)`",
    "str": "msgpack str",
    "bin": "msgpack bin",
    "bin16": "bin of 16 random bytes",
    "bool": "msgpack bool",
    "endpoint": "str starting with `tcp://`",
    "headers": "`[name, value]` str pairs; order and repeats kept",
    "map str->int": "map of str to int",
    "array of str": "array of str",
    "array of {rt, owner, owner_key?, name?, keep_alive_ms?}": (
        "array of maps; `owner`: the token, the others as in `create_runtime`"
    ),
    "any": "any msgpack value",
    "value": "a marshalled value: msgpack, ext types 1 and -1 (7.4)",
    "body": '`"inline"` (one payload frame) or `{sid: bin16, ep?: endpoint}` (4)',
    "pipe {sid, ep}": "map `{sid: bin16, ep: endpoint}`, both present",
    "payload frame": "the raw frame after the header",
}

#: Meaning of each field kind of the guest channel's records (``wire.guest``): JSON, not msgpack.
GUEST_KINDS: dict[str, str] = {
    "int": "JSON number, no fraction or exponent",
    "id": "int in `[0, 2^63)`",
    "str": "JSON string",
    "bool": "JSON `true` or `false`",
    "headers": "`[name, value]` string pairs",
    "any": "any JSON value",
    "array": "JSON array",
    "guest body": '`"inline"` (the frame body) or `{sid: id}`; else no body',
    "error {name, message, stack}": "object; parts not `null` kept as strings",
    "error, or anything (ignored)": "an error object, else absent",
    "int 200..599": "int from 200 to 599",
    "follow|manual|error (else follow)": "`follow`, `manual`, `error`; else `follow`",
    "console level": "`log`, `info`, `warn`, `error`, `debug` or `trace`",
    "console method": "a console method name: `log` ... `clear` (7.5)",
    "payload frame": "the frame body (`B` bytes)",
}

#: Meaning of every error code (``wire.protocol.E_*``): who sends it, and what the receiver does.
ERRORS: dict[str, str] = {
    "bad_message": "malformed message or stream id; an answer nobody waits for",
    "unsupported_version": "`v` is not 1",
    "unknown_type": "`t` is not legal on this link and direction",
    "too_large": "a frame above `MAX_FRAME`, a (reply) header above `MAX_HEADER`",
    "unknown_runtime": "not this client's runtime (or not on this daemon)",
    "unknown_client": "no session of the sender (with its key): say `hello` again (3.3)",
    "runtime_lost": "the runtime is gone (also a `runtime_lost.code`)",
    "no_daemon": "no daemon has a free slot",
    "capacity": "the chosen daemon was full",
    "quota": "the session is at its quota of runtimes or unanswered requests (3.3)",
    "guest_error": "the guest threw or answered invalidly (`name`, `message`, `stack`); the runtime lives on",
    "timeout": "an eval (the runtime is stopped; also a `runtime_lost.code`) or `stats` timed out",
    "memory_limit": "the runtime exceeded its memory limit (also a `runtime_lost.code`)",
    "cpu_limit": "the runtime exceeded a CPU limit (3.3) and was stopped (also a `runtime_lost.code`)",
    "fetch_failed": "client: the fetch callback failed or was cancelled",
    "no_handler": "`dispatch` before the guest called `serve()`",
    "cancelled": "the client cancelled `resp_sid` before the response head",
    "internal": "the daemon failed to start the process or to handle the request",
    "busy": "a runtime's, the daemon's (4) or the client's bound is reached, or no runtime could start in time "
    "(3.3); retry later",
    "unavailable": "the broker or the runtime's owner is (for now) unreachable; the call did not complete; retry",
    "unknown_daemon": "broker -> daemon, without id: no registration of the sender; send `ready` again",
    "tool_failed": "client: a tool call failed; `name` and `message` are what the guest's Error says",
    "module_not_found": "client: the resolver has no such module (or failed, or timed out)",
}


@dataclass(frozen=True, slots=True)
class Limit:
    """One row of the limits table: the value the specification states, the places in the code
    that define it (``pkg.module.NAME`` or ``daemon/bootstrap.js:NAME``), and its meaning."""

    name: str
    value: int | float
    unit: str
    places: tuple[str, ...]
    meaning: str


LIMITS: tuple[Limit, ...] = (
    Limit("VERSION", 1, "", ("wire.protocol.VERSION",), "`v` of every header"),
    Limit("MAX_HEADER", 65536, "bytes", ("wire.protocol.MAX_HEADER",), "header frame"),
    Limit("MAX_FRAME", 1048576, "bytes", ("wire.protocol.MAX_FRAME",), "any frame on a ROUTER/DEALER link"),
    Limit("MAX_INLINE_BODY", 65536, "bytes", ("wire.protocol.MAX_INLINE_BODY", "wire.guest.INLINE_MAX"),
          "an inline body (senders; guest: `inline_max`)"),
    Limit("MAX_SOURCE", 983040, "bytes", ("wire.protocol.MAX_SOURCE",), "an eval source (senders)"),
    Limit(
        "MAX_RUNTIMES_HELD", 256, "entries", ("wire.protocol.MAX_RUNTIMES_HELD",), "`ready.runtimes`, capacity"
    ),
    Limit("MAX_NAME", 128, "characters", ("wire.protocol.MAX_NAME",), "a runtime's `name`"),
    Limit("MAX_CHUNK", 262144, "bytes", ("wire.protocol.MAX_CHUNK", "wire.guest.MAX_CHUNK"),
          "a pipe payload; a guest-channel chunk"),
    Limit("PIPE_HWM", 2, "messages", ("wire.sockets.PIPE_HWM",), "pipe `SNDHWM`, `RCVHWM`"),
    Limit("PIPE_SNDBUF", 1572864, "bytes", ("wire.sockets.PIPE_SNDBUF",), "pipe PUSH `SNDBUF`"),
    Limit("PIPE_TAG", 25, "bytes", ("wire.protocol.PIPE_TAG",), "pipe message tag: kind, sid, sequence number"),
    Limit("WINDOW", 4, "chunks", ("wire.guest.WINDOW",), "guest-channel credit and window per stream"),
    Limit("MAX_GUEST_FRAME", 1048576, "bytes", ("wire.channel.MAX_GUEST_FRAME",), "guest -> daemon `L`"),
    Limit("MAX_GUEST_HEADER", 524288, "bytes", ("wire.channel.MAX_GUEST_HEADER",), "guest -> daemon `H`"),
    Limit("MAX_FRAME (bootstrap)", 16777216, "bytes", ("daemon/bootstrap.js:MAX_FRAME",),
          "daemon -> guest `L`, plus 8"),
    Limit("MAX_VALUE", 49152, "bytes", ("wire.guest.MAX_VALUE",), "a marshalled value (7.4)"),
    Limit("MAX_HEAD", 32768, "characters", ("wire.guest.MAX_HEAD",),
          "a guest head: method + URL + (name + value + 4) per header"),
    Limit("MAX_CONSOLE", 16384, "UTF-16 units", ("wire.guest.MAX_CONSOLE",), "a console entry (guest)"),
    Limit("MAX_CONSOLE_ARGS", 64, "arguments", ("wire.guest.MAX_CONSOLE_ARGS",),
          "a console entry (guest; the daemon keeps one more)"),
    Limit("CONSOLE_RATE", 200, "entries/s", ("wire.guest.CONSOLE_RATE",), "console (guest)"),
    Limit("MAX_CONSOLE_VALUE", 12288, "bytes", ("wire.guest.MAX_CONSOLE_VALUE",),
          "a console entry's arguments (guest)"),
    Limit("MAX_ERROR_TEXT", 16384, "UTF-16 units", ("wire.guest.MAX_ERROR_TEXT",),
          "an error's `message`, `stack` (guest)"),
    Limit("MAX_ERROR_NAME", 256, "characters", ("wire.guest.MAX_ERROR_NAME",),
          "an error's `name` (guest; daemon: bytes)"),
    Limit("MAX_STATUS_TEXT", 1024, "characters", ("wire.guest.MAX_STATUS_TEXT",),
          "`statusText` (guest, daemon)"),
    Limit("CONSOLE_RATE (daemon)", 400, "entries/s", ("daemon.runtime.CONSOLE_RATE",), "console, per runtime (daemon)"),
    Limit("MAX_CONSOLE_BYTES", 49152, "bytes", ("daemon.values.MAX_CONSOLE_BYTES",), "a console entry's text (daemon)"),
    Limit("MAX_CONSOLE_ENTRY", 61440, "bytes", ("daemon.values.MAX_CONSOLE_ENTRY",),
          "a console entry's text + msgpack arguments (daemon)"),
    Limit("MAX_ERROR_BYTES", 16384, "bytes", ("daemon.values.MAX_ERROR_BYTES",),
          "an error's `message`, `stack` (daemon)"),
    Limit("MAX_STREAM_ERROR", 4096, "characters", ("daemon.values.MAX_STREAM_ERROR",),
          "a guest stream's error text (daemon)"),
    Limit("START_TIMEOUT", 20.0, "s", ("daemon.guest.START_TIMEOUT",), "process start (`internal` after)"),
    Limit("START_QUEUE_TIMEOUT", 10.0, "s", ("daemon.pool.START_QUEUE_TIMEOUT",),
          "default `--start-queue-timeout` (`busy` after)"),
    Limit("STATS_TIMEOUT", 10.0, "s", ("daemon.runtime.STATS_TIMEOUT",), "guest answer to `stats`"),
    Limit("FETCH_REPLY_TIMEOUT", 300.0, "s", ("daemon.fetches.FETCH_REPLY_TIMEOUT",), "answer to a `fetch`"),
    Limit("MODULE_REPLY_TIMEOUT", 60.0, "s", ("daemon.modules.MODULE_REPLY_TIMEOUT",), "answer to a `module`"),
    Limit("MAX_PENDING_MODULES", 16, "modules", ("wire.guest.MAX_PENDING_MODULES",),
          "a runtime's pending `module`s"),
    Limit("MAX_SPECIFIER", 8192, "characters", ("wire.guest.MAX_SPECIFIER",), "an import's specifier + referrer"),
    Limit("MIN_MEMORY_MB", 16, "MiB", ("daemon.daemon.MIN_MEMORY_MB",), "`memory_limit_mb`"),
    Limit("MAX_MEMORY_MB", 16384, "MiB", ("daemon.daemon.MAX_MEMORY_MB",), "`memory_limit_mb`"),
    Limit("MAX_PENDING_FETCHES", 32, "fetches", ("wire.guest.MAX_PENDING_FETCHES",),
          "a runtime's fetches awaiting their head"),
    Limit("MAX_STREAMS", 256, "bodies", ("wire.guest.MAX_STREAMS",), "a runtime's open bodies (4)"),
    Limit("MAX_PENDING_TOOLS", 64, "calls", ("wire.guest.MAX_PENDING_TOOLS",),
          "a runtime's tool calls awaiting their answer"),
    Limit("TOOL_TIMEOUT", 30.0, "s", ("wire.tools.TOOL_TIMEOUT",),
          "client default: a tool call, or the wait for each item"),
    Limit("TOOL_REPLY_TIMEOUT", 300.0, "s", ("daemon.tools.TOOL_REPLY_TIMEOUT",), "answer to a `tool` (daemon)"),
    Limit("MAX_TOOLS", 128, "tools", ("wire.tools.MAX_TOOLS",), "a runtime's tools (names: `MAX_TOOL_NAME` = 64)"),
    Limit("MAX_PENDING_CALLS", 1024, "calls", ("wire.guest.MAX_PENDING_CALLS",),
          "a runtime's pending calls (`busy`)"),
    Limit("MAX_STDIN_QUEUE", 8388608, "bytes", ("wire.guest.MAX_STDIN_QUEUE",),
          "queued for a guest's stdin (`busy`)"),
    Limit("STREAMS_PER_RUNTIME", 32, "streams", ("daemon.daemon.STREAMS_PER_RUNTIME",),
          "default `--max-streams` per runtime (4)"),
    Limit("MAX_VALUE_DEPTH", 128, "levels", ("wire.guest.MAX_VALUE_DEPTH",), "nesting of a value (7.4)"),
    Limit("TOMBSTONES", 10000, "runtimes", ("broker.core.TOMBSTONES",), "lost runtimes the broker remembers"),
    Limit("MAX_RUNTIMES_PER_CLIENT", 64, "runtimes", ("broker.core.MAX_RUNTIMES_PER_CLIENT",),
          "default `--max-runtimes-per-client`"),
    Limit("MAX_INFLIGHT_PER_CLIENT", 4096, "requests", ("broker.core.MAX_INFLIGHT_PER_CLIENT",),
          "default `--max-inflight-per-client`"),
    Limit("REFUSAL_BUDGET", 100, "messages/s", ("broker.core.REFUSAL_BUDGET",),
          "refusals per connection and second (broker; `runtime_lost`, limit, `quota`, `no_daemon` not counted)"),
    Limit("CONTROL_REFUSAL_BUDGET", 1000, "messages/s", ("daemon.daemon.CONTROL_REFUSAL_BUDGET",),
          "bad control messages (or cancels of unknown sids) per identity and second"),
)  # fmt: skip


# ---- rendering ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _fmt_default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (tuple, list)) and not value:
        return "`[]`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _kind_name(spec: FieldSpec) -> str:
    return "payload frame" if spec.kind is None else spec.kind.name


def _field(spec: FieldSpec) -> str:
    """A field as the tables show it: its name, with ``?`` when optional."""
    return f"`{spec.name}`" + ("" if spec.required else "?")


def _type(spec: FieldSpec) -> str:
    """A field's kind, with `` = default`` when an optional field has one."""
    kind = _cell(_kind_name(spec))
    if spec.required or spec.default is None:
        return kind
    limit = _stated_limit(spec)
    return f"{kind} = `{limit.name}`" if limit else f"{kind} = {_fmt_default(spec.default)}"


def _stated_limit(spec: FieldSpec) -> Limit | None:
    """The limit (9) a field's default is, if any: a row of ``LIMITS`` with the field's name in
    upper case as one of its constants and the default as its value (``init``'s limits). The
    table then names it instead of repeating its value and meaning; a default that drifts from
    it shows as a number again, so the drift is caught."""
    if type(spec.default) is not int:
        return None
    name = spec.name.upper()
    for lim in LIMITS:
        if lim.value == spec.default and any(p.rpartition(".")[2] == name for p in lim.places if ":" not in p):
            return lim
    return None


def records_of(module: ModuleType) -> list[type[Record]]:
    """The record classes defined in ``module``, in definition order."""
    return [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Record) and v.__module__ == module.__name__ and hasattr(v, "T")
    ]


def render_kinds(records: Iterable[type[Record]], meanings: dict[str, str] = KINDS) -> str:
    """The field kinds ``records`` use, each with its meaning from ``meanings``."""
    used: list[str] = []
    for cls in records:
        for spec in cls.FIELDS:
            name = _kind_name(spec)
            if name not in used:
                used.append(name)
    missing = [k for k in used if k not in meanings]
    if missing:
        raise KeyError(f"field kinds without a meaning in wire/spec.py: {missing}")
    rows = [f"| {_cell(name)} | {_cell(meanings[name])} |" for name in sorted(used, key=list(meanings).index)]
    return "\n".join(["| type | on the wire |", "|---|---|", *rows])


def render_links(links: Iterable[Link]) -> str:
    """One matrix: a row per message type, a column per link (receiving side), what it accepts:
    ``yes``, or the record when a type has several (``reply``: the request's), and ``+`` the
    optional fields the link requires; an empty cell: not accepted."""
    links = list(links)
    types: dict[str, list[type[Record]]] = {}
    for link in links:
        for t, (cls, _) in link.types.items():
            types.setdefault(t, [])
            if cls not in types[t]:
                types[t].append(cls)
        if link.replies is not None:
            types.setdefault("ok", [])
    header = "| type | " + " | ".join(_cell(link.name) for link in links) + " |"
    rows = [header, "|---" * (len(links) + 1) + "|"]
    for t, classes in types.items():
        replies = any(t == "ok" and link.replies is not None for link in links)
        shared = len(classes) == 1 and not replies
        cells = []
        for link in links:
            entry = link.types.get(t)
            if t == "ok" and link.replies is not None:
                text, extra = "reply", link.replies
            elif entry is None:
                cells.append("")
                continue
            else:
                cls, extra = entry
                text = "yes" if shared else cls.__name__
            if extra:
                text += " +" + ", ".join(f"`{f}`" for f in extra)
            cells.append(text)
        rows.append(f"| `{t}` |" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return "\n".join(rows)


#: A field (name, kind and meaning) shared by at least this many records is described once, under
#: the table, and named after the message rather than given a row of its own.
COMMON = 3


def render_messages(records: Iterable[type[Record]]) -> str:
    """One table of every record's fields: ``name?`` is optional, ``kind = v`` its default (a
    limit's name when it is one, ``_stated_limit``, without a meaning: 9 has it). A field
    shared by several records (``COMMON``) is described once under the table (``*common*``; with
    a number when one name has several shared meanings) and named after the message, in parentheses,
    unless it has a default there (then it keeps its row, its meaning ``*common*``)."""
    records = list(records)
    seen: dict[tuple[str, str, str], int] = {}
    for cls in records:
        for spec in cls.FIELDS:
            key = (spec.name, _kind_name(spec), spec.doc)
            seen[key] = seen.get(key, 0) + 1
    common = [key for key, n in seen.items() if n >= COMMON and key[2]]
    tag: dict[tuple[str, str, str], str] = {}
    for key in common:
        same = [k for k in common if k[0] == key[0]]
        tag[key] = f"`{key[0]}`" if len(same) == 1 else f"`{key[0]}`({same.index(key) + 1})"
    rows = ["| message | field | type | meaning |", "|---|---|---|---|"]
    shared = {cls.T for cls in records if sum(c.T == cls.T for c in records) > 1}
    for cls in records:
        label = f"`{cls.T}` {cls.__name__}" if cls.T in shared else f"`{cls.T}`"
        own, named = [], []
        for spec in cls.FIELDS:
            key = (spec.name, _kind_name(spec), spec.doc)
            if key in tag and spec.default is None:
                named.append(tag[key] + ("" if spec.required else "?"))
            else:
                meaning = "" if _stated_limit(spec) else _cell(spec.doc)
                own.append((spec, "*common*" if key in tag else meaning))
        if named:
            label += " (" + ", ".join(named) + ")"
        if not own:
            rows.append(f"| {label} | | |" + (" |" if named else " no fields |"))
        for i, (spec, meaning) in enumerate(own):
            first = f"| {label} |" if i == 0 else "| |"
            rows.append(f"{first} {_field(spec)} | {_type(spec)} |" + (f" {meaning} |" if meaning else " |"))
    if common:
        notes = [f"{tag[key]} ({_cell(key[1])}): {_cell(key[2])}" for key in common]
        rows.append("")
        rows.append("*common*: " + "; ".join(notes) + ".")
    return "\n".join(rows)


def error_codes() -> list[tuple[str, str]]:
    """(constant, code) of every ``E_*`` in wire.protocol, in definition order."""
    return [(k, v) for k, v in vars(protocol).items() if k.startswith("E_") and isinstance(v, str)]


def render_errors() -> str:
    codes = error_codes()
    missing = [code for _, code in codes if code not in ERRORS]
    stale = sorted(set(ERRORS) - {code for _, code in codes})
    if missing or stale:
        raise KeyError(f"wire/spec.py ERRORS: codes without a meaning {missing}, meanings without a code {stale}")
    rows = [f"| `{code}` | {_cell(ERRORS[code])} |" for _, code in codes]
    return "\n".join(["| code | meaning |", "|---|---|", *rows])


def _fmt_value(limit: Limit) -> str:
    """The value with its unit; a byte count that is whole KiB, or whole or half MiB, in those
    (exact: 1.5 MiB is 1,572,864 bytes)."""
    v, unit = limit.value, limit.unit
    if unit == "bytes" and isinstance(v, int) and v >= 1024:
        if v >= 1 << 20 and v % (1 << 19) == 0:
            v, unit = v / (1 << 20), "MiB"
        elif v % 1024 == 0:
            v, unit = v // 1024, "KiB"
    text = f"{v:,}" if isinstance(v, int) else f"{v:g}"
    return f"{text} {unit}".strip()


def render_limits() -> str:
    """The limits, each with its value; ``limit_problems`` ties every value to its constant(s)."""
    rows = [f"| `{lim.name}` | {_fmt_value(lim)} | {_cell(lim.meaning)} |" for lim in LIMITS]
    return "\n".join(["| limit | value | bounds |", "|---|---|---|", *rows])


def guest_links() -> tuple[Link, Link]:
    """The guest channel's two directions as link tables (every field of a record is its own)."""
    return (
        Link("daemon -> guest", {t: (cls, ()) for t, cls in guest.DAEMON_TO_GUEST.items()}),
        Link("guest -> daemon", {t: (cls, ()) for t, cls in guest.GUEST_TO_DAEMON.items()}),
    )


def guest_records() -> list[type[Record]]:
    """The guest channel's records: daemon -> guest first, each once."""
    return list(dict.fromkeys([*guest.DAEMON_TO_GUEST.values(), *guest.GUEST_TO_DAEMON.values()]))


#: Every block: name -> its generator.
BLOCKS: dict[str, Callable[[], str]] = {
    "kinds": lambda: render_kinds(records_of(messages)),
    "links": lambda: render_links(messages.LINKS),
    "messages": lambda: render_messages(records_of(messages)),
    "guest-kinds": lambda: render_kinds(guest_records(), GUEST_KINDS),
    "guest-links": lambda: render_links(guest_links()),
    "guest-messages": lambda: render_messages(guest_records()),
    "errors": render_errors,
    "limits": render_limits,
}


def render(name: str) -> str:
    return BLOCKS[name]()


def render_all() -> dict[str, str]:
    """Every block by name."""
    return {name: make() for name, make in BLOCKS.items()}


# ---- limits against the code ----------------------------------------------------------------------


_JS_CONST = r"^const {name} = ([0-9 *+()-]+);"


def _arith(expr: str) -> int:
    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add, ast.Sub)):
            a, b = ev(node.left), ev(node.right)
            return a * b if isinstance(node.op, ast.Mult) else a + b if isinstance(node.op, ast.Add) else a - b
        raise ValueError(f"not a constant expression: {expr!r}")

    return ev(ast.parse(expr.strip(), mode="eval").body)


def code_value(place: str) -> int | float:
    """The value defined at ``place``; LookupError if its module or file no longer defines it."""
    if ":" in place:
        path, name = place.split(":", 1)
        source = (ROOT / path).read_text()
        m = re.search(_JS_CONST.format(name=re.escape(name)), source, re.MULTILINE)
        if m is None:
            raise LookupError(f"{path} no longer defines `const {name} = <number>`; point wire/spec.py LIMITS "
                              "at the constant's new home")  # fmt: skip
        return _arith(m.group(1))
    module_name, name = place.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise LookupError(f"there is no module {module_name}; point wire/spec.py LIMITS at the constant's "
                              "new home") from None  # fmt: skip
        raise
    if not hasattr(module, name):
        raise LookupError(f"{module_name} has no {name}; point wire/spec.py LIMITS at the constant's new home")
    return getattr(module, name)


def limit_problems() -> list[str]:
    """Stated values that differ from the code, or whose constant is gone."""
    problems = []
    for lim in LIMITS:
        for place in lim.places:
            try:
                value = code_value(place)
            except LookupError as exc:
                problems.append(f"limit {lim.name}: {exc}")
                continue
            if value != lim.value:
                problems.append(f"limit {lim.name}: the spec states {lim.value!r} but {place} is {value!r}")
    return problems


# ---- citations of the documents in the code -------------------------------------------------------

#: The documents code comments cite, by the name a citation spells.
DOCUMENTS: dict[str, Path] = {"protocol.md": ROOT / "protocol.md", "design.md": ROOT / "docs" / "design.md"}

_HEADING = re.compile(
    r"^#{1,6}[ \t]+(?:(?P<num>\d+(?:\.\d+)*|Z\d+|Appendix [A-Z])\.?[ \t]+)?(?P<title>.+?)[ \t]*$", re.M
)
_DOC = re.compile(r"\b(protocol\.md|design\.md)\b")
_NUM = r"(?:\d+(?:\.\d+)*|Z\d+|Appendix [A-Z](?:\.\d+)?)(?![\d\w])"
#: ``doc 2.2``, ``doc section 7``, ``doc §7``, ``doc, Z5``, ``doc, Appendix A.2``, ``doc 2.13, 2.14 and 3.1``
_NUMBERED = re.compile(rf",?[ ]*(?:§[ ]*|sections?[ ]+)?(?P<refs>{_NUM}(?:(?:,[ ]*|[ ]+and[ ]+){_NUM})*)")
#: ``doc, "Title"`` or ``doc, Title`` (up to a closing parenthesis, a full stop, a colon or the line's end)
_TITLED = re.compile(r',[ ]*(?:"(?P<quoted>[^"]+)"|(?P<bare>[^\s"][^).;:"\n]*?))[ ]*(?=[).;:"\n]|$)')


@dataclass(frozen=True, slots=True)
class Citation:
    """One section a file cites: ``ref`` is a number (``2.2``, ``Z5``, ``Appendix A``) or a title."""

    path: str
    line: int
    doc: str
    ref: str
    titled: bool


def headings(text: str) -> tuple[set[str], set[str]]:
    """(section numbers, lowercased titles) of a Markdown document's headings; the numbered items
    of an appendix count as sections too (``Appendix A.2``)."""
    nums, titles = set(), set()
    for m in _HEADING.finditer(text):
        if m.group("num"):
            nums.add(m.group("num"))
        titles.add(" ".join(m.group("title").split()).lower())
        if (m.group("num") or "").startswith("Appendix"):
            body = text[m.end() :].split("\n#", 1)[0]
            nums.update(f"{m.group('num')}.{n}" for n in re.findall(r"^(\d+)\. ", body, re.M))
    return nums, titles


def citations_in(text: str, path: str = "") -> list[Citation]:
    """Every citation of protocol.md or design.md in ``text``. A citation continues onto the next
    line of a comment (``#`` or ``//``); a document name followed by a comma always starts one."""
    found = []
    for m in _DOC.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        tail = re.sub(r"[ \t]*\n[ \t]*(?:#+|//+|\*)?[ \t]*", " ", text[m.end() : m.end() + 300])
        if tail.startswith("."):  # "protocol.md." ends a sentence
            continue
        if (n := _NUMBERED.match(tail)) is not None and (tail.startswith((" ", ",")) or n.start("refs") > 0):
            for ref in re.findall(_NUM, n.group("refs")):
                found.append(Citation(path, line, m.group(1), ref, False))
        elif (t := _TITLED.match(tail)) is not None:
            title = t.group("quoted") or t.group("bare")
            found.append(Citation(path, line, m.group(1), " ".join(title.split()), True))
        elif tail.startswith(","):
            found.append(Citation(path, line, m.group(1), tail[1:40].strip(), True))
    return found


def code_files() -> list[Path]:
    """The repository's .py and .js files (no hidden directories, caches or virtualenvs)."""
    skip = {"__pycache__", "node_modules", "venv"}
    return sorted(
        p
        for pattern in ("*.py", "*.js")
        for p in ROOT.rglob(pattern)
        if not any(part.startswith(".") or part in skip for part in p.relative_to(ROOT).parts)
    )


def citation_problems(files: Iterable[Path] | None = None, documents: dict[str, str] | None = None) -> list[str]:
    """Citations in ``files`` (default: ``code_files()``, docs/design.md and README.md) of a section
    that is not a heading of the cited document (``documents``: name -> text, default the files in
    ``DOCUMENTS``)."""
    docs = {name: path.read_text() for name, path in DOCUMENTS.items()} if documents is None else documents
    index = {name: headings(text) for name, text in docs.items()}
    problems = []
    for path in [*code_files(), DOCUMENTS["design.md"], ROOT / "README.md"] if files is None else files:
        rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        for cite in citations_in(path.read_text(errors="replace"), rel):
            nums, titles = index[cite.doc]
            if (cite.ref.lower() not in titles) if cite.titled else (cite.ref not in nums):
                what = f'"{cite.ref}"' if cite.titled else cite.ref
                problems.append(f"{cite.path}:{cite.line}: cites {cite.doc} {what}, which has no such heading")
    return problems


# ---- the document ---------------------------------------------------------------------------------


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks of a document: name -> content (stripped)."""
    found: dict[str, str] = {}
    for m in BEGIN.finditer(text):
        end = text.find(END, m.end())
        if end < 0:
            raise ValueError(f"block {m.group(1)!r} has no {END!r}")
        if m.group(1) in found:
            raise ValueError(f"block {m.group(1)!r} appears twice")
        found[m.group(1)] = text[m.end() : end].strip()
    return found


def check_text(text: str, blocks: dict[str, str] | None = None) -> list[str]:
    """The problems of a document against the code (``blocks``: the generated ones to compare,
    default all). A differing block's problem shows the diff."""
    blocks = render_all() if blocks is None else blocks
    problems = []
    try:
        found = blocks_in(text)
    except ValueError as exc:
        return [str(exc)]
    for name in sorted(set(found) - set(blocks)):
        problems.append(f"block {name!r}: no generator of that name")
    for name, want in blocks.items():
        have = found.get(name)
        if have is None:
            problems.append(f"block {name!r}: missing (add <!-- generated: {name} --> ... {END})")
        elif have != want.strip():
            diff = difflib.unified_diff(
                have.splitlines(), want.strip().splitlines(), "protocol.md", "generated", lineterm="", n=1
            )
            problems.append(f"block {name!r} differs from the code:\n" + "\n".join(diff))
    return problems


def write_text(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every block in ``blocks`` replaced by its generated content."""

    def repl(m: re.Match[str]) -> str:
        want = blocks.get(m.group(1))
        return m.group(0) if want is None else f"<!-- generated: {m.group(1)} -->\n\n{want.strip()}\n\n{END}"

    return re.sub(r"^<!-- generated: ([a-z-]+) -->$.*?" + re.escape(END), repl, text, flags=re.MULTILINE | re.DOTALL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wire.spec", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", metavar="FILE", help="exit 1 if FILE's generated blocks or limits differ from the code")
    g.add_argument("--write", metavar="FILE", help="rewrite FILE's generated blocks from the code")
    args = p.parse_args(argv)
    try:
        blocks = render_all()
    except (KeyError, TypeError, ValueError) as exc:  # e.g. an error code without a meaning
        print(f"cannot generate protocol.md's tables: {exc}", file=sys.stderr)
        return 1
    if args.check:
        problems = [*check_text(Path(args.check).read_text(), blocks), *limit_problems(), *citation_problems()]
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        path = Path(args.write)
        path.write_text(write_text(path.read_text(), blocks))
        return 0
    for name, text in blocks.items():
        print(f"<!-- generated: {name} -->\n\n{text}\n\n{END}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
