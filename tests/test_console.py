"""Issue 10, section 4: the full console, as structured entries whose text is what Deno prints."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

import client
from wire import guest as G

DENO = str(Path(os.environ.get("VIRTUAL_ENV", "/work/main/.venv")) / "bin" / "deno")

# Every console method whose output does not depend on the time or on where the code runs (a
# stack): the guest's entries must say exactly what Deno itself prints for the same calls.
SCRIPT = r"""
console.log("plain", 42, -0, 10n, null, undefined, true, [1, "two", { three: [3] }]);
console.log("%s is %d years and %i days, %f%% sure: %o %O %j", "Ada", 36.6, 7.9, 99.5, { a: 1 }, { b: [2] }, "x");
console.log("%c styled", "color: red", "and more");
console.info("info", { nested: { deeper: { deepest: { gone: 1 } } } });
console.debug("debug", new Map([[1, { a: 2 }]]), new Set(["s"]));
console.warn("warn", new Error("boom").message);
console.error("error", Symbol("sym"), () => 1, class Foo {});
console.assert(true, "never printed");
console.assert(false);
console.assert(false, "with %s", "a message", 3);
console.assert(0, { an: "object" });
console.dir({ a: { b: { c: { d: { e: { f: 1 } } } } } });
console.dir("a string", { depth: 0 });
console.dirxml({ x: 1 }, "two");
console.table([{ a: 1, b: "two" }, { a: 3, c: true }]);
console.table([[1, 2], [3, 4, 5]], ["0"]);
console.table({ row: { col: 1 }, other: { col: 2 } });
console.table("not tabular");
console.group("outer");
console.log("in outer");
console.groupCollapsed("inner", 2);
console.warn("in inner\nsecond line");
console.table([{ a: 1 }]);
console.group();
console.error("deepest");
console.groupEnd();
console.groupEnd();
console.log("back in outer");
console.groupEnd();
console.groupEnd();
console.log("top");
console.count();
console.count();
console.count("x");
console.countReset();
console.count();
console.countReset("never");
console.timeEnd("nope");
console.timeLog("nope", "extra");
console.time("t");
console.time("t");
console.log(new Uint8Array([1, 2, 3]), new Date(0), "%");
"""


def deno_prints(script: str) -> str:
    """What Deno itself prints for ``script`` (stdout and stderr in order, no colors)."""
    env = {"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    out = subprocess.run(
        [DENO, "eval", "--quiet", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60
    )
    assert out.returncode == 0, out.stdout.decode()
    return out.stdout.decode()


async def test_console_print_prints_what_deno_prints(conn: client.Connection, capsys: pytest.CaptureFixture) -> None:
    expected = deno_prints(SCRIPT)
    assert "┌" in expected and "Assertion failed: with a message 3" in expected  # the script covers them
    capsys.readouterr()
    rt = await conn.create_runtime(console=print)
    await rt.eval(SCRIPT)
    await rt.eval("export default 0")  # console entries travel before the eval's reply, in order
    assert capsys.readouterr().out == expected
    await rt.dispose()


async def test_entries_carry_method_level_depth_and_the_arguments_as_values(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    await rt.eval(
        r"""
        console.log("a", 1, 2.5, 2n ** 70n, new Uint8Array([1, 2]), new Date(0), { x: [1, null] }, undefined);
        console.group("g");
        console.info(() => 1, new Map([[1, 2]]), [Symbol("s")]);
        console.groupCollapsed();
        console.debug("deep", NaN);
        console.groupEnd(); console.groupEnd(); console.groupEnd();
        console.assert(false, "m");
        console.count("c");
        console.timeEnd("t");
        console.trace("here", 1);
        console.clear();
        const cycle = {}; cycle.self = cycle;
        console.table([{ a: 1 }], ["a"]);
        console.log(cycle);
        """
    )
    await rt.eval("export default 0")
    got = [(e.method, e.level, e.group_depth) for e in entries]
    assert got == [
        ("log", "log", 0),
        ("group", "log", 0),  # the label prints at the outer depth
        ("info", "info", 1),
        ("debug", "debug", 2),  # groupCollapsed() without a label prints nothing: no entry
        ("assert", "error", 0),
        ("count", "log", 0),
        ("timeEnd", "warn", 0),
        ("trace", "trace", 0),
        ("clear", "log", 0),
        ("table", "log", 0),
        ("log", "log", 0),
    ]
    log, group, info, debug, failed, count, time_end, trace, clear, table, cycle = entries
    assert log.args == ["a", 1, 2.5, 2**70, b"\x01\x02", datetime(1970, 1, 1, tzinfo=UTC), {"x": [1, None]}, None]
    assert log.text == "a 1 2.5 1180591620717411303424n Uint8Array(2) [ 1, 2 ] 1970-01-01T00:00:00.000Z " \
        "{ x: [ 1, null ] } undefined"  # fmt: skip
    assert (group.text, group.args) == ("g", ["g"])
    # what cannot be marshalled, at any depth, arrives as its formatted text: the entry is never dropped
    assert info.args == ["[Function (anonymous)]", "Map(1) { 1 => 2 }", ["Symbol(s)"]]
    assert info.text == "  [Function (anonymous)] Map(1) { 1 => 2 } [ Symbol(s) ]"
    assert debug.text == "    deep NaN" and debug.args[0] == "deep" and debug.args[1] != debug.args[1]
    assert (failed.text, failed.args) == ("Assertion failed: m", [False, "m"])
    assert (count.text, time_end.text) == ("c: 1", "Timer 't' does not exist")
    assert trace.text.startswith("Trace: here 1\n    at ") and "/dev/fd/" not in trace.text, trace.text
    assert (clear.text, clear.args) == ("", [])  # no terminal escape sequences travel
    assert table.args == [[{"a": 1}], ["a"]]
    assert cycle.text == "<ref *1> { self: [Circular *1] }"
    assert cycle.args == [{"self": "<ref *1> { self: [Circular *1] }"}]  # where the cycle closes
    assert str(table) == table.text and table.text.startswith("┌")
    await rt.dispose()


async def test_timers_and_counters_follow_the_console_standard(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    await rt.eval(
        """
        console.timeEnd("nope");
        console.time("t");
        await new Promise((ok) => setTimeout(ok, 5));
        console.timeLog("t", "half", { way: true });
        console.timeEnd("t");
        console.timeEnd("t");
        console.timeLog();
        console.count(); console.countReset(); console.count(); console.countReset("other");
        """
    )
    await rt.eval("export default 0")
    texts = [(e.level, e.text) for e in entries]
    assert texts[0] == ("warn", "Timer 'nope' does not exist")  # once, and no time
    assert texts[1][0] == "log" and re.fullmatch(r"t: \d+(\.\d+)?ms half \{ way: true \}", texts[1][1]), texts[1]
    assert texts[2][0] == "log" and re.fullmatch(r"t: \d+(\.\d+)?ms", texts[2][1]), texts[2]
    assert float(texts[2][1][3:-2]) >= 5
    assert texts[3:] == [
        ("warn", "Timer 't' does not exist"),
        ("warn", "Timer 'default' does not exist"),
        ("log", "default: 1"),
        ("log", "default: 1"),
        ("warn", "Count for 'other' does not exist"),
    ]
    assert entries[1].args == ["t", "half", {"way": True}]
    await rt.dispose()


async def test_large_and_many_arguments_stay_within_the_bounds(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    await rt.eval(
        """
        console.log("small", "x".repeat(100000), new Uint8Array(100000), 3);
        console.log(...Array.from({ length: 100 }, (_, i) => i));
        const custom = { [Symbol.for("Deno.customInspect")]() { throw new Error("no"); } };
        try { console.log(custom); } catch (e) { console.log("thrown:", e.message); }  // as Deno's console does
        Promise.reject(custom);  // reported as uncaught: an entry that says what failed
        await new Promise((ok) => setTimeout(ok, 10));
        """
    )
    await rt.eval("export default 0")
    big, many, thrown, uncaught = entries
    assert big.args[0] == "small" and big.args[3] == 3
    assert big.args[1].endswith("…[truncated]") and len(big.args[1]) < G.MAX_CONSOLE_VALUE
    assert big.args[2].startswith("Uint8Array(100000) [")  # too large to send: its text (Deno's, abridged)
    assert len(big.text) <= G.MAX_CONSOLE + len("…[truncated]")
    assert many.args == [*range(G.MAX_CONSOLE_ARGS), f"…[{100 - G.MAX_CONSOLE_ARGS} more arguments]"]
    assert many.text == " ".join(str(i) for i in range(100))  # the text is Deno's, of every argument
    assert thrown.text == "thrown: no"
    assert (uncaught.level, uncaught.text) == ("error", "<console.error failed: no>")
    assert await rt.eval("export default 'alive'") == "alive"
    await rt.dispose()
