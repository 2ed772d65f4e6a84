"""protocol.md's tables, generated from the code, and the check that keeps them equal.

``python -m wire.spec`` prints every generated block; ``--check protocol.md`` exits 1 on any
difference (and on a limit whose stated value no longer matches its constant); ``--write
protocol.md`` rewrites the blocks in place. In protocol.md a block sits between
``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the prose around it is free.

Blocks:

- ``kinds``: the field types used by the message records (``wire.schema`` kinds).
- ``links``: which message types each side of each link accepts (``wire.messages.LINKS``).
- ``messages``: one field table per record (``wire.messages``), from the ``F(kind, default, doc)``
  declarations.
- ``guest-links``, ``guest-messages``: the same for the daemon<->guest channel, from
  ``wire.guest.LINKS`` when that module exists (until then protocol.md holds hand-written tables
  in the same format, and these two blocks are reported as not checked).
- ``errors``: the ``E_*`` codes of ``wire.protocol`` with the meanings in ``ERRORS`` below.
- ``limits``: ``LIMITS`` below; each value is compared with the constant(s) it names.
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

from wire import messages, protocol
from wire.schema import FieldSpec, Link, Record

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "daemon" / "bootstrap.js"

BEGIN = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
END = "<!-- end generated -->"

# ---- what the code cannot say by itself -------------------------------------------------------------

#: Meaning of each field kind (``Kind.name``) used by the records; "payload frame" is a field that
#: travels as a raw frame after the header.
KINDS: dict[str, str] = {
    "int": "msgpack integer (a bool or float is not an int)",
    "id": "msgpack integer in `[0, 2^63)`",
    "str": "msgpack str (UTF-8)",
    "bin": "msgpack bin (never str)",
    "bin16": "msgpack bin of 16 bytes (random: a capability)",
    "bool": "msgpack bool",
    "endpoint": "str starting with `tcp://`",
    "headers": "array of `[name, value]` pairs of str; order and repeats kept",
    "map str->int": "map from str to int",
    "array of str": "array of str",
    "any": "any msgpack value",
    "body": '`"inline"` (one payload frame) or `{sid: bin16, ep?: endpoint}` (section 4)',
    "pipe {sid, ep}": "map `{sid: bin16, ep: endpoint}`, both present",
    "payload frame": "the one raw frame after the header",
}

#: Meaning of every error code (``wire.protocol.E_*``): who sends it, and what the receiver does.
ERRORS: dict[str, str] = {
    "bad_message": "malformed header, field, payload or stream id, or an answer nobody waits for",
    "unsupported_version": "`v` is not 1",
    "unknown_type": "`t` is not legal on this link and direction",
    "too_large": "a frame above `MAX_FRAME` or `MAX_HEADER`, or a reply header above `MAX_HEADER`",
    "unknown_runtime": "not a runtime of this client (or not on this daemon)",
    "unknown_client": "the sender has no session at the broker: all its runtimes are gone",
    "runtime_lost": "the runtime is gone for good (also a `runtime_lost.code`)",
    "no_daemon": "no daemon has a free slot",
    "capacity": "the chosen daemon was full",
    "quota": "the client holds its maximum of runtimes or of requests in flight at the broker; retry later",
    "guest_error": "the guest code threw; with `name`, `message`, `stack`; the runtime lives on",
    "timeout": "an eval timed out (the runtime is stopped; also a `runtime_lost.code`), or `stats` did",
    "memory_limit": "the runtime exceeded its memory limit (also a `runtime_lost.code`)",
    "fetch_failed": "client: the fetch callback failed or was cancelled",
    "no_handler": "`dispatch` before the guest called `serve()`",
    "cancelled": "the client cancelled `resp_sid` before the response head",
    "internal": "the daemon could not start the process, or failed handling the request",
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
    Limit("MAX_INLINE_BODY", 65536, "bytes", ("wire.protocol.MAX_INLINE_BODY", "daemon/bootstrap.js:INLINE_MAX"),
          "an inline body (senders)"),
    Limit("MAX_SOURCE", 983040, "bytes", ("wire.protocol.MAX_SOURCE",), "an eval source (senders)"),
    Limit("MAX_CHUNK", 262144, "bytes", ("wire.protocol.MAX_CHUNK", "daemon/bootstrap.js:MAX_CHUNK"),
          "a pipe payload; a guest-channel chunk"),
    Limit("PIPE_HWM", 4, "messages", ("wire.sockets.PIPE_HWM",), "pipe `SNDHWM`, `RCVHWM`"),
    Limit("PIPE_KERNEL_BUFFER", 262144, "bytes", ("wire.sockets.PIPE_KERNEL_BUFFER",), "pipe `SNDBUF`, `RCVBUF`"),
    Limit("END_LINGER_MS", 10000, "ms", ("wire.pipes.END_LINGER_MS",), "linger after END or ERROR"),
    Limit("WINDOW", 4, "chunks", ("daemon.streams.WINDOW", "daemon/bootstrap.js:WINDOW"),
          "guest-channel credit and window per stream"),
    Limit("MAX_GUEST_FRAME", 1048576, "bytes", ("wire.channel.MAX_GUEST_FRAME",), "guest -> daemon `L`"),
    Limit("MAX_GUEST_HEADER", 524288, "bytes", ("wire.channel.MAX_GUEST_HEADER",), "guest -> daemon `H`"),
    Limit("MAX_FRAME (bootstrap)", 16777216, "bytes", ("daemon/bootstrap.js:MAX_FRAME",),
          "daemon -> guest `L`, plus 8"),
    Limit("MAX_VALUE", 49152, "characters", ("daemon/bootstrap.js:MAX_VALUE",), "JSON of an eval's value"),
    Limit("MAX_HEAD", 32768, "characters", ("daemon/bootstrap.js:MAX_HEAD",),
          "method + URL + headers (name + value + 4 each) of a guest head"),
    Limit("MAX_CONSOLE", 16384, "UTF-16 units", ("daemon/bootstrap.js:MAX_CONSOLE",), "a console entry (guest)"),
    Limit("MAX_ERROR_TEXT", 16384, "UTF-16 units", ("daemon/bootstrap.js:MAX_ERROR_TEXT",),
          "an error's `message`, `stack` (guest)"),
    Limit("CONSOLE_RATE (bootstrap)", 200, "entries/s", ("daemon/bootstrap.js:CONSOLE_RATE",), "console (guest)"),
    Limit("CONSOLE_RATE", 400, "entries/s", ("daemon.runtime.CONSOLE_RATE",), "console, per runtime (daemon)"),
    Limit("MAX_CONSOLE_BYTES", 49152, "bytes", ("daemon.runtime.MAX_CONSOLE_BYTES",), "a console entry (daemon)"),
    Limit("MAX_ERROR_BYTES", 16384, "bytes", ("daemon.runtime.MAX_ERROR_BYTES",),
          "an error's `message`, `stack` (daemon)"),
    Limit("START_TIMEOUT", 20.0, "s", ("daemon.guest.START_TIMEOUT",), "process start (`internal` after)"),
    Limit("STATS_TIMEOUT", 10.0, "s", ("daemon.runtime.STATS_TIMEOUT",), "guest answer to `stats`"),
    Limit("FETCH_REPLY_TIMEOUT", 300.0, "s", ("daemon.runtime.FETCH_REPLY_TIMEOUT",), "answer to a `fetch`"),
    Limit("MIN_MEMORY_MB", 16, "MiB", ("daemon.daemon.MIN_MEMORY_MB",), "`memory_limit_mb`"),
    Limit("MAX_MEMORY_MB", 16384, "MiB", ("daemon.daemon.MAX_MEMORY_MB",), "`memory_limit_mb`"),
    Limit("TOMBSTONES", 10000, "runtimes", ("broker.core.TOMBSTONES",), "lost runtimes the broker remembers"),
    Limit("MAX_RUNTIMES_PER_CLIENT", 64, "runtimes", ("broker.core.MAX_RUNTIMES_PER_CLIENT",),
          "a client's runtimes, default of `--max-runtimes-per-client` (`quota` past it)"),
    Limit("MAX_INFLIGHT_PER_CLIENT", 4096, "requests", ("broker.core.MAX_INFLIGHT_PER_CLIENT",),
          "a client's unanswered requests, default of `--max-inflight-per-client` (`quota` past it)"),
    Limit("REFUSAL_BUDGET", 100, "messages/s", ("broker.core.REFUSAL_BUDGET",),
          "refused messages per peer; past it the broker drops the peer's messages unread until the second ends"),
    Limit("CONTROL_REFUSAL_BUDGET", 1000, "messages/s", ("daemon.daemon.CONTROL_REFUSAL_BUDGET",),
          "refused or unknown-stream control messages per peer; past it the daemon drops the peer's unread"),
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


def _req(spec: FieldSpec) -> str:
    if spec.required:
        return "yes"
    if spec.default is None:
        return "no"
    return f"no, {_fmt_default(spec.default)}"


def records_of(module: ModuleType) -> list[type[Record]]:
    """The record classes defined in ``module``, in definition order."""
    return [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Record) and v.__module__ == module.__name__ and hasattr(v, "T")
    ]


def render_kinds(records: Iterable[type[Record]]) -> str:
    used: list[str] = []
    for cls in records:
        for spec in cls.FIELDS:
            name = _kind_name(spec)
            if name not in used:
                used.append(name)
    missing = [k for k in used if k not in KINDS]
    if missing:
        raise KeyError(f"field kinds without a meaning in wire/spec.py KINDS: {missing}")
    rows = [f"| {name} | {_cell(KINDS[name])} |" for name in sorted(used, key=list(KINDS).index)]
    return "\n".join(["| type | on the wire |", "|---|---|", *rows])


def render_links(links: Iterable[Link]) -> str:
    """One matrix: a row per message type, a column per link (receiving side), what it accepts."""
    links = list(links)
    types: dict[str, list[type[Record]]] = {}
    for link in links:
        for t, (cls, _) in link.types.items():
            types.setdefault(t, [])
            if cls not in types[t]:
                types[t].append(cls)
        if link.replies is not None:
            types.setdefault("ok", [])
    header = "| type | record | " + " | ".join(_cell(link.name) for link in links) + " |"
    rows = [header, "|---" * (len(links) + 2) + "|"]
    for t, classes in types.items():
        replies = any(t == "ok" and link.replies is not None for link in links)
        shared = classes[0].__name__ if len(classes) == 1 and not replies else None
        cells = []
        for link in links:
            entry = link.types.get(t)
            if t == "ok" and link.replies is not None:
                text, extra = "reply", link.replies
            elif entry is None:
                cells.append("-")
                continue
            else:
                cls, extra = entry
                text = "yes" if shared else cls.__name__
            if extra:
                text += " +" + ", ".join(f"`{f}`" for f in extra)
            cells.append(text)
        rows.append(f"| `{t}` | {shared or 'per link'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


#: A field (name and meaning) shared by at least this many records is described once, under the table.
COMMON = 3


def render_messages(records: Iterable[type[Record]]) -> str:
    """One table of every record's fields; meanings shared by several records follow it once."""
    records = list(records)
    seen: dict[tuple[str, str], int] = {}
    for cls in records:
        for spec in cls.FIELDS:
            seen[(spec.name, spec.doc)] = seen.get((spec.name, spec.doc), 0) + 1
    common = [key for key, n in seen.items() if n >= COMMON and key[1]]
    names = [name for name, _ in common]
    common = [key for key in common if names.count(key[0]) == 1]  # one shared meaning per name, or none
    rows = ["| message | field | type | req | meaning |", "|---|---|---|---|---|"]
    shared = {cls.T for cls in records if sum(c.T == cls.T for c in records) > 1}
    for cls in records:
        label = f"`{cls.T}` {cls.__name__}" if cls.T in shared else f"`{cls.T}`"
        if not cls.FIELDS:
            rows.append(f"| {label} | - | | | no fields |")
        for i, spec in enumerate(cls.FIELDS):
            meaning = "*common*" if (spec.name, spec.doc) in common else _cell(spec.doc)
            rows.append(
                f"| {label if i == 0 else ''} | `{spec.name}` | {_kind_name(spec)} | {_req(spec)} | {meaning} |"
            )
    if common:
        rows.append("")
        rows.append("*common*: " + "; ".join(f"`{name}`: {_cell(doc)}" for name, doc in common) + ".")
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
    rows = [f"| `{code}` | `{const}` | {_cell(ERRORS[code])} |" for const, code in codes]
    return "\n".join(["| code | constant | meaning |", "|---|---|---|", *rows])


def _fmt_value(limit: Limit) -> str:
    v = limit.value
    text = f"{v:,}" if isinstance(v, int) else f"{v:g}"
    return f"{text} {limit.unit}".strip()


def render_limits() -> str:
    rows = [
        f"| `{lim.name}` | {_fmt_value(lim)} | {', '.join(f'`{p}`' for p in lim.places)} | {_cell(lim.meaning)} |"
        for lim in LIMITS
    ]
    return "\n".join(["| limit | value | defined in | bounds |", "|---|---|---|---|", *rows])


def guest_module() -> ModuleType | None:
    """``wire.guest`` (the daemon<->guest records) if this tree has it yet."""
    try:
        return importlib.import_module("wire.guest")
    except ModuleNotFoundError as exc:
        if exc.name == "wire.guest":
            return None
        raise


#: Why a block cannot be generated in this tree (it is then not checked).
UNAVAILABLE = "wire/guest.py is not in this tree yet: the guest channel tables are hand-written"


def _guest_links() -> tuple[Link, ...] | None:
    guest = guest_module()
    if guest is None:
        return None
    links = tuple(getattr(guest, "LINKS", ()))
    if not links or not all(isinstance(link, Link) for link in links):
        raise TypeError("wire.guest.LINKS must be a tuple of wire.schema.Link")
    return links


def _guest_messages() -> str | None:
    guest = guest_module()
    return None if guest is None else render_messages(records_of(guest))


#: Every block: name -> its generator (None: this tree cannot generate it, see UNAVAILABLE).
BLOCKS: dict[str, Callable[[], str | None]] = {
    "kinds": lambda: render_kinds(records_of(messages)),
    "links": lambda: render_links(messages.LINKS),
    "messages": lambda: render_messages(records_of(messages)),
    "guest-links": lambda: None if (links := _guest_links()) is None else render_links(links),
    "guest-messages": _guest_messages,
    "errors": render_errors,
    "limits": render_limits,
}


def render(name: str) -> str | None:
    return BLOCKS[name]()


def render_all() -> dict[str, str | None]:
    """Every block by name; None for a block this tree cannot generate (see UNAVAILABLE)."""
    return {name: make() for name, make in BLOCKS.items()}


# ---- limits against the code ----------------------------------------------------------------------


class NotInTree(Exception):
    """The module a limit names does not exist in this tree."""


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
    """The value defined at ``place``; NotInTree if its module does not exist, LookupError if the
    module exists but no longer defines it."""
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
            raise NotInTree(f"module {module_name} does not exist in this tree") from None
        raise
    if not hasattr(module, name):
        raise LookupError(f"{module_name} has no {name}; point wire/spec.py LIMITS at the constant's new home")
    return getattr(module, name)


def limit_problems() -> tuple[list[str], list[str]]:
    """(problems, notes): stated values that differ from the code, and places not checked."""
    problems, notes = [], []
    for lim in LIMITS:
        for place in lim.places:
            try:
                value = code_value(place)
            except NotInTree as exc:
                notes.append(f"limit {lim.name}: not checked: {exc}")
                continue
            except LookupError as exc:
                problems.append(f"limit {lim.name}: {exc}")
                continue
            if value != lim.value:
                problems.append(f"limit {lim.name}: the spec states {lim.value!r} but {place} is {value!r}")
    return problems, notes


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


def check_text(text: str, blocks: dict[str, str | None] | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of a document against the code. Each problem is a message with a diff."""
    blocks = render_all() if blocks is None else blocks
    problems, notes = [], []
    try:
        found = blocks_in(text)
    except ValueError as exc:
        return [str(exc)], []
    for name in sorted(set(found) - set(blocks)):
        problems.append(f"block {name!r}: no generator of that name")
    for name, want in blocks.items():
        have = found.get(name)
        if have is None:
            problems.append(f"block {name!r}: missing (add <!-- generated: {name} --> ... {END})")
        elif want is None:
            notes.append(f"block {name!r}: not checked: {UNAVAILABLE}")
        elif have != want.strip():
            diff = difflib.unified_diff(
                have.splitlines(), want.strip().splitlines(), "protocol.md", "generated", lineterm="", n=1
            )
            problems.append(f"block {name!r} differs from the code:\n" + "\n".join(diff))
    return problems, notes


def write_text(text: str, blocks: dict[str, str | None]) -> str:
    """``text`` with every generatable block replaced by its generated content."""

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
        problems, notes = check_text(Path(args.check).read_text(), blocks)
        more, more_notes = limit_problems()
        for line in [*notes, *more_notes]:
            print(f"note: {line}", file=sys.stderr)
        for line in [*problems, *more]:
            print(line, file=sys.stderr)
        return 1 if problems or more else 0
    if args.write:
        path = Path(args.write)
        path.write_text(write_text(path.read_text(), blocks))
        return 0
    for name, text in blocks.items():
        if text is None:
            print(f"<!-- {name}: {UNAVAILABLE} -->\n")
        else:
            print(f"<!-- generated: {name} -->\n\n{text}\n\n{END}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
