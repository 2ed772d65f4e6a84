"""The documentation is true (issue 11, Documentation).

README's Python compiles, and its quick start and callback examples run against a real broker;
the limits and defaults it documents are the code's; the guest environment is as it describes
(globals, hidden names, imports, run in a real runtime); every flag the docs give
`python -m broker` or `python -m daemon` is one they accept; the systemd units in deploy/systemd
parse, name command lines the programs accept and pass `systemd-analyze verify` where it is
installed; and the bundled LLM demo's SSE transform keeps `data:` lines whole wherever chunks are
split (an upper-casing transform once turned them into `DATA:`, which EventSource ignores).
"""

from __future__ import annotations

import ast
import configparser
import inspect
import json
import logging
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import client
from broker import core as broker_core
from client import glue
from client import modules as client_modules
from client import runtime as client_runtime
from client import tools as client_tools
from daemon import daemon as D
from daemon import fetches, guest, pool
from daemon import modules as daemon_modules
from daemon import tools as daemon_tools
from scripts import llm_stream_demo as demo
from tests.conftest import ROOT, Broker, await_until
from wire import guest as G
from wire import protocol as P
from wire import tools as wire_tools

README = ROOT / "README.md"
OPERATING = ROOT / "docs" / "operating.md"
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
#: The endpoint the README's examples use: the broker's default frontend.
README_ENDPOINT = "tcp://127.0.0.1:5555"

# ---- reading the docs ----------------------------------------------------------------------------


def code_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in ``text`` tagged ``lang``."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        if m.group(1) == lang:
            out.append((text.count("\n", 0, m.start()) + 2, m.group(2)))
    return out


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown text."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def paragraph(text: str, lead: str) -> str:
    """The paragraph of ``text`` that starts with ``lead`` (e.g. ``**Hidden.**``)."""
    start = text.index(lead)
    end = text.find("\n\n", start)
    return text[start : end if end >= 0 else len(text)]


def identifiers(text: str) -> list[str]:
    """The JavaScript identifiers written as code (`name`) in ``text``."""
    return [n for n in re.findall(r"`([^`]+)`", text) if re.fullmatch(r"[A-Za-z_$][\w$]*", n)]


def readme() -> str:
    return README.read_text()


def table(text: str) -> dict[str, list[str]]:
    """The first Markdown table of ``text``: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def limits_table() -> dict[str, list[str]]:
    """The README's table of guest limits and defaults."""
    text = section(readme(), "What the guest can do")
    return table(text[text.index("**Limits and defaults**") :])


def g(x: float) -> str:
    return f"{x:g}"


# ---- Python in the docs ----------------------------------------------------------------------------


def test_every_python_block_compiles() -> None:
    """Top-level ``await`` is allowed: the README's fragments are parts of async functions."""
    count = 0
    for doc in (README, OPERATING):
        for line, code in code_blocks(doc.read_text(), "python"):
            compile(code, f"{doc.name}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            count += 1
    assert count >= 5, f"only {count} Python blocks found: is the fence pattern still right?"


def test_quick_start_runs_against_a_real_broker(broker: Broker) -> None:
    """The quick start as a reader pastes it, pointed at the test broker instead of the default one."""
    blocks = code_blocks(section(readme(), "Quick start"), "python")
    assert len(blocks) == 1, "the quick start should be one block to paste"
    code = blocks[0][1]
    assert README_ENDPOINT in code
    run = subprocess.run(
        [sys.executable, "-c", code.replace(README_ENDPOINT, broker.frontend)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "hello from the sandbox" in run.stdout
    assert "200 you asked for /hello" in run.stdout
    assert "Traceback" not in run.stderr, run.stderr


async def test_callback_examples_work(conn: client.Connection, caplog: pytest.LogCaptureFixture) -> None:
    """The fetch and console callbacks of the README's Callbacks section, used by a real guest."""
    text = section(readme(), "Callbacks")
    assert f"up to {G.MAX_PENDING_FETCHES} at once" in text
    ns: dict[str, Any] = {}
    for line, code in code_blocks(text, "python"):
        exec(compile(code, f"README.md:{line}", "exec"), ns)
    caplog.set_level(logging.INFO, logger="guest")
    rt = await conn.create_runtime(fetch=ns["fetch"], console=ns["console"])
    try:
        value = await rt.eval("""
            const ok = await fetch("https://api.example.com/v1/answer");
            const denied = await fetch("https://elsewhere.example/");
            console.warn("careful", { a: 1 });
            export default { ok: [ok.status, await ok.text()], denied: [denied.status, await denied.text()] };
        """)
        assert value == {"ok": [200, "Hello world"], "denied": [403, "not allowed"]}
        record = await await_until(
            lambda: next((r for r in caplog.records if r.name == "guest"), None), "the console entry is logged"
        )
        assert (record.levelno, record.getMessage()) == (logging.WARNING, "careful { a: 1 }")
    finally:
        await rt.dispose()


async def test_tools_example_runs(conn: client.Connection) -> None:
    """The host-tools example of "What the guest can do", against a real runtime (its assert is the check)."""
    blocks = code_blocks(section(readme(), "What the guest can do"), "python")
    assert len(blocks) == 1, "one tools example expected"
    line, code = blocks[0]
    ns: dict[str, Any] = {"conn": conn}
    compiled = compile(code, f"README.md:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    await eval(compiled, ns)  # the README's own code
    await ns["rt"].dispose()
    assert ns["found"]["got"] == [0, 1, 2]


def test_the_marshalling_table_has_every_row() -> None:
    """The README's value table names each kind wire/values.py accepts, and refuses what it refuses."""
    text = section(readme(), "What the guest can do")
    rows = table(text[text.index("**Values**") :])
    hosts = " ".join(cells[0] for cells in rows.values())
    for kind in ("`None`", "`bool`", "`int`", "`float`", "`str`", "`bytes`", "`datetime`", "`list`", "`dict`"):
        assert kind in hosts, f"the marshalling table has no row for {kind}"
    refused = next(cells for label, cells in rows.items() if label.startswith("anything else"))
    assert "TypeError" in refused[0] and "TypeError" in refused[1]


# ---- what the docs say about the guest ----------------------------------------------------------


def test_documented_limits_are_the_codes() -> None:
    """Each row of the README's limits table against the constant it documents."""
    rows = limits_table()
    daemon_defaults = inspect.signature(D.Daemon.__init__).parameters
    from daemon.__main__ import parse as daemon_parse

    cli = daemon_parse(["--broker", "tcp://127.0.0.1:1"])
    assert cli.eval_timeout == daemon_defaults["eval_timeout"].default
    assert cli.memory_mb == daemon_defaults["default_memory_mb"].default
    assert guest.process_cap_mb(100) == 2 * 100 + 128  # "2 x heap + 128 MiB"
    expected = {
        "eval timeout": [f"{g(cli.eval_timeout)} s;", f"`--max-eval-timeout` ({g(D.MAX_EVAL_TIMEOUT)} s)"],
        "dispatch timeout": [f"{g(client_runtime.DISPATCH_TIMEOUT)} s to the response head"],
        "JS heap": [
            f"{cli.memory_mb} MB;",
            "2 x heap + 128 MiB",
            f"({D.MIN_MEMORY_MB} up to `--max-memory-mb`, {D.MAX_MEMORY_MB})",
        ],
        "CPU per event-loop turn": [f"{g(D.DEFAULT_CPU_LIMIT)} s", f"`--max-cpu-limit` ({g(D.MAX_CPU_LIMIT)} s)"],
        "CPU per dispatch before its head": [f"{g(D.DEFAULT_REQUEST_CPU)} s"],
        "fetch callback's answer (the head)": [f"{g(fetches.FETCH_REPLY_TIMEOUT)} s;"],
        "`fetch()` calls pending": [f"{G.MAX_PENDING_FETCHES};"],
        "bodies open at once, both directions": [str(G.MAX_STREAMS)],
        "eval source": [f"{P.MAX_SOURCE} bytes"],
        "eval value, tool argument/result/item": [f"{G.MAX_VALUE} bytes marshalled, {G.MAX_VALUE_DEPTH} levels deep"],
        "console": [
            f"{G.CONSOLE_RATE} entries/s",
            f"{G.MAX_CONSOLE} characters and {G.MAX_CONSOLE_ARGS} arguments",
            f"{G.MAX_CONSOLE_VALUE} bytes of marshalled arguments",
        ],
        "tool call": [f"{g(client_tools.TOOL_TIMEOUT)} s", f"gives up at {g(daemon_tools.TOOL_REPLY_TIMEOUT)} s"],
        "tool calls pending": [f"{G.MAX_PENDING_TOOLS};"],
        "tools per runtime": [f"{wire_tools.MAX_TOOLS}, names of at most {wire_tools.MAX_TOOL_NAME} characters"],
        "resolver's answer": [
            f"{g(client_runtime.MODULE_TIMEOUT)} s;",
            f"gives up at {g(daemon_modules.MODULE_REPLY_TIMEOUT)} s",
        ],
        "module queries in flight": [f"{G.MAX_PENDING_MODULES} per runtime"],
        "module source, URL, specifier": [
            f"{P.MAX_SOURCE} bytes, {client_modules.MAX_URL} characters, {G.MAX_SPECIFIER} characters"
        ],
        "request or response head": [f"{G.MAX_HEAD} characters"],
        "runtimes per client": [f"{broker_core.MAX_RUNTIMES_PER_CLIENT} (", "`quota`"],
        "`forward_fetch`": [
            f"{g(glue.FETCH_TIMEOUT)} s to the response head, {g(glue.CONNECT_TIMEOUT)} s to connect, "
            f"{glue.MAX_REDIRECTS} redirects, {glue.MAX_CONNECTIONS} upstream connections"
        ],
    }
    assert set(expected) <= set(rows), f"rows missing from the table: {set(expected) - set(rows)}"
    for label, parts in expected.items():
        row = " | ".join(rows[label])
        for part in parts:
            assert part in row, f"README limits row {label!r} should say {part!r}: {row}"


async def test_documented_guest_environment_is_real(conn: client.Connection) -> None:
    """The README's lists against the code that defines them, and then inside a real runtime."""
    text = section(readme(), "What the guest can do")
    hidden = identifiers(paragraph(text, "**Hidden.**").split("and WebGPU")[0])
    bootstrap = (ROOT / "daemon" / "bootstrap.js").read_text()
    found = re.search(r"const HIDDEN = \[(.*?)\];", bootstrap, re.DOTALL)
    assert found is not None, "bootstrap.js has no HIDDEN list any more"
    removed = set(re.findall(r'"(\w+)"', found.group(1)))
    assert removed <= set(hidden), f"hidden by bootstrap.js, not in the README: {removed - set(hidden)}"
    imports = paragraph(text, "**Imports.**")
    allowed = sorted(re.findall(r"`node:([\w/]+)`", imports.split("Every other")[0]))
    assert set(allowed) == set(pool.ALLOWED_NODE_MODULES)
    globals_ = identifiers(paragraph(text, "**Globals.**").split("The sandbox adds")[0])
    assert len(globals_) > 20
    unavailable = "fetch() is unavailable"
    assert f"`TypeError: {unavailable}`" in text
    blocked = "module node:NAME is not available in this sandbox"
    assert blocked in imports

    rt = await conn.create_runtime()  # no fetch callback: fetch() must say so
    try:
        value = await rt.eval(f"""
            const outcome = async (f) => {{ try {{ await f(); return "ok"; }} catch (e) {{ return `${{e.name}}: ${{e.message}}`; }} }};
            const present = {json.dumps(globals_)}.filter((n) => typeof globalThis[n] === "undefined");
            const visible = {json.dumps(hidden)}.filter((n) => n in globalThis);
            const imports = {{}};
            for (const name of {json.dumps(allowed)}) imports[name] = await outcome(() => import(`node:${{name}}`));
            for (const spec of ["node:fs", "node:child_process", "npm:left-pad", "jsr:@std/path", "https://deno.land/x/a.js"]) {{
              imports[spec] = await outcome(() => import(spec));
            }}
            export default {{
              missing: present, visible, imports,
              serve: typeof serve, console: typeof console.log, gpu: "gpu" in navigator,
              gpuClasses: Object.getOwnPropertyNames(globalThis).filter((n) => n.startsWith("GPU")),
              fetch: await outcome(() => fetch("https://example.com/")),
              data: (await import("data:text/javascript,export default 42")).default,
            }};
        """)
    finally:
        await rt.dispose()
    assert value["missing"] == [], "documented globals missing in the guest"
    assert value["visible"] == [], "documented as hidden, yet visible to the guest"
    imports_ = value["imports"]
    assert {name: imports_[name] for name in allowed} == dict.fromkeys(allowed, "ok")
    assert imports_["node:fs"] == "TypeError: " + blocked.replace("NAME", "fs")
    assert imports_["node:child_process"] == "TypeError: " + blocked.replace("NAME", "child_process")
    for spec in ("npm:left-pad", "jsr:@std/path", "https://deno.land/x/a.js"):
        assert imports_[spec] != "ok", f"{spec} imported"
    assert value["fetch"].startswith(f"TypeError: {unavailable}")
    assert (value["serve"], value["console"], value["data"]) == ("function", "function", 42)
    assert (value["gpu"], value["gpuClasses"]) == (False, [])


# ---- command lines in the docs -------------------------------------------------------------------


@cache
def help_text(program: str) -> str:
    """The --help of ``program``: "broker", "daemon" or "broker status"."""
    module, *command = program.split()
    run = subprocess.run(
        [sys.executable, "-m", module, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def has_flag(program: str, flag: str) -> bool:
    """Whether ``flag`` (or subcommand) is in the program's --help, spelled out: argparse would also
    take an abbreviation, which breaks once another option shares the prefix."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text(program)) is not None


def documented_flags() -> list[tuple[str, str, str]]:
    """(program, flag or subcommand, where) for each `python -m broker|daemon` command in the docs'
    shell blocks, and each daemon flag the README's limits table names."""
    out = []
    for doc in (README, OPERATING):
        text = doc.read_text()
        for line_no, code in code_blocks(text, "sh"):
            for i, line in enumerate(code.splitlines()):
                for m in re.finditer(r"python -m (broker|daemon)\b([^#&|;]*)", line):
                    where = f"{doc.name}:{line_no + i}"
                    program, words = m.group(1), m.group(2).split()
                    if program == "broker" and words[:1] == ["status"]:
                        out.append((program, "status", where))
                        program = "broker status"  # its options are the subcommand's
                    out += [(program, w.split("=")[0], where) for w in words if w.startswith("--")]
    for cells in limits_table().values():
        for m in re.finditer(r"(broker )?`(--[\w-]+)`", cells[-1]):
            # a daemon's flag is the broker's too (for its embedded daemon), as the README says
            programs = ["broker"] if m.group(1) else ["daemon", "broker"]
            out += [(program, m.group(2), "README.md limits table") for program in programs]
    return out


def test_documented_flags_exist() -> None:
    """Every option the docs pass to the broker or the daemon is in its --help."""
    flags = documented_flags()
    assert len(flags) > 30, f"only {len(flags)} flags found in the docs: is the pattern still right?"
    wrong = [
        f"{where}: python -m {program} has no {flag}" for program, flag, where in flags if not has_flag(program, flag)
    ]
    assert not wrong, "\n".join(wrong)


# ---- systemd units --------------------------------------------------------------------------------


def load_unit(path: Path) -> configparser.ConfigParser:
    """A unit file read as systemd would: sections and keys case-sensitive, continuation lines joined."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text().replace("\\\n", " "), source=str(path))
    return parser


def exec_argv(unit: configparser.ConfigParser) -> list[str]:
    """ExecStart with the unit's Environment= values (and %H) substituted, as systemd runs it."""
    env = {}
    for assignment in shlex.split(unit["Service"].get("Environment", "")):
        key, _, value = assignment.partition("=")
        env[key] = value.replace("%H", socket.gethostname())
    command = unit["Service"]["ExecStart"].replace("%H", socket.gethostname())
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(command)]


@pytest.mark.parametrize("path", UNITS, ids=[p.name for p in UNITS])
def test_systemd_unit_runs_the_program(path: Path) -> None:
    unit = load_unit(path)
    for section_, key in [("Unit", "Description"), ("Unit", "After"), ("Service", "ExecStart"), ("Service", "User"),
                          ("Service", "Restart"), ("Service", "KillSignal"), ("Install", "WantedBy")]:  # fmt: skip
        assert unit.get(section_, key, fallback=""), f"{path.name} has no {key}= in [{section_}]"
    argv = exec_argv(unit)
    program = path.stem.removeprefix("sandbox-mesh-")
    assert argv[0].endswith("/python") and argv[1:3] == ["-m", program], argv
    abbreviated = [w for w in argv[3:] if w.startswith("--") and not has_flag(program, w.split("=")[0])]
    assert not abbreviated, f"{path.name}: not options of python -m {program} as spelled: {abbreviated}"
    # the command line as the program's own parser sees it (types included), then --help
    check = f"import sys; from {program}.__main__ import parse; print(parse(sys.argv[1:]))"
    for args in ([sys.executable, "-c", check, *argv[3:]], [sys.executable, *argv[1:3], "--help"]):
        run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{path.name}: {shlex.join(args[1:])}: {run.stderr}"


@pytest.mark.parametrize("path", UNITS, ids=[p.name for p in UNITS])
def test_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / path.name  # with this interpreter in place of the unit's (verify checks it exists)
    copy.write_text(path.read_text().replace("/opt/sandbox-mesh/venv/bin/python", sys.executable))
    run = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert not re.search(r"Unknown|Invalid|Failed|not executable|[Ii]gnoring", output), output


def test_units_are_found() -> None:
    assert [p.name for p in UNITS] == ["sandbox-mesh-broker.service", "sandbox-mesh-daemon.service"]


# ---- the SSE caveat: the LLM demo's transform -------------------------------------------------------

#: An SSE stream with every kind of line EventSource reads: named events with ids, a multi-line
#: data field, a comment, CRLF line ends, a field without a space, and non-ASCII text.
SSE = (
    ": the stream starts\n\n"
    'event: token\nid: 1\ndata: {"content": "Hello"}\n\n'
    'event: token\nid: 2\ndata: {"content": " wörld, ça va?"}\n\n'
    "data: first line\ndata:second line\n\n"
    'retry: 3000\r\ndata: {"content": "crlf"}\r\n\r\n'
    "data: [DONE]\n\n"
)


def event_source(stream: str) -> list[tuple[str, str, str]]:
    """The events EventSource dispatches for ``stream``: (type, data, last event id), parsed as the
    HTML standard says (unknown fields are ignored: a `DATA:` line delivers nothing)."""
    events, data, kind, last_id = [], [], "", ""
    for line in re.split(r"\r\n|\r|\n", stream):
        if not line:
            if data:
                events.append((kind or "message", "\n".join(data), last_id))
            data, kind = [], ""
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            kind = value
        elif field == "id":
            last_id = value
    return events


@pytest.mark.parametrize("size", [1, 3, 7, 64])
async def test_demo_transform_keeps_sse_data_lines(conn: client.Connection, size: int) -> None:
    """The demo's guest, mode=transform, on an SSE stream cut into ``size``-byte chunks (so that
    field names and UTF-8 sequences are split): the events are the original ones, data upper-cased."""
    chunks = [SSE.encode()[i : i + size] for i in range(0, len(SSE.encode()), size)]
    llm_url = "https://llm.example/v1/chat"

    async def llm(request: client.Request) -> client.Response:
        assert request.url == llm_url

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return client.Response(200, {"content-type": "text/event-stream"}, body())

    rt = await conn.create_runtime(fetch=llm)
    try:
        await rt.eval(demo.guest_source(llm_url))
        resp = await rt.dispatch_request(client.Request("GET", "http://localhost/?mode=transform"))
        out = (await resp.read()).decode()
    finally:
        await rt.dispose()
    expected = [(kind, data.upper(), last_id) for kind, data, last_id in event_source(SSE)]
    assert len(expected) == 5
    assert event_source(out) == expected, out


def test_demo_runs(broker: Broker) -> None:
    """The demo script itself, against the test broker: its transform's events arrive as `data:`."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "llm_stream_demo.py"), "--broker", broker.frontend],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    transformed = run.stdout.split("through the sandbox (transform):")[1].split("gaps:")[0]
    events = re.findall(r"\+\s*\d+ ms  (.*)", transformed)
    assert events == [f"data: {json.dumps({'content': word}).upper()}" for word in demo.WORDS], run.stdout
