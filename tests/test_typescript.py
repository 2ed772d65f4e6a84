"""TypeScript, filenames, stacks and syntax errors (issue 10, section 3's first two points).

Deno strips the types of a Blob module of type application/typescript and keeps every line and
column, so stacks point into the source as written; the bootstrap names each Blob by its filename
(or module URL) in `e.stack` inside the guest and in GuestError.stack on the host.
"""

from __future__ import annotations

import pytest

import client
from client.modules import Module, from_dict
from tests.conftest import await_until

TS = """interface Point { x: number; y: number }
type Pair<T> = [T, T];
enum Color { Red = 1, Green }
function norm(p: Point): number {
  return Math.abs(p.x) + Math.abs(p.y);
}
const pair: Pair<number> = [norm({ x: -2, y: 3 } as Point), Color.Green];
export default pair satisfies Pair<number>;
"""


async def test_typescript_eval_runs_with_types_stripped(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    assert await rt.eval(TS, filename="main.ts") == [5, 2]
    # not type-checked: a type error runs as JavaScript
    assert await rt.eval("const n: number = 'not a number' as any;\nexport default n;", filename="loose.mts") == (
        "not a number"
    )
    for bad in ("", "x" * 1025, 7, "\ud800.ts", "two\nlines.js", "nul\0.js"):
        with pytest.raises(TypeError, match="filename"):
            await rt.eval("export default 1", filename=bad)  # type: ignore[arg-type]
    jsx = "const React = { createElement: (t: string, _p: unknown, ...c: unknown[]) => [t, ...c] };\n"
    assert await rt.eval(jsx + "export default <b>{1 + 1}</b>;", filename="view.tsx") == ["b", 2]
    await rt.dispose()


async def test_stacks_name_the_file_with_original_line_and_column(conn: client.Connection) -> None:
    logs: list[str] = []
    rt = await conn.create_runtime(console=lambda e: logs.append(e.text))
    source = (
        "type Job = { id: number };\n"
        "function run(job: Job): never {\n"
        "  throw new RangeError(`job ${job.id} failed`);\n"
        "}\n"
        "try { run({ id: 1 }); } catch (e) { console.log(e.stack); }\n"
        "run({ id: 7 } as Job);\n"
    )
    with_types = await _error(rt, source, "jobs/run.ts")
    assert with_types.name == "RangeError" and with_types.message == "job 7 failed"
    lines = str(with_types).splitlines()
    assert lines[0] == "RangeError: job 7 failed"
    assert lines[1].strip() == "at run (jobs/run.ts:3:9)"  # the original position, types and all
    assert lines[2].strip() == "at jobs/run.ts:6:1"
    assert with_types.stack == str(with_types)
    # inside the guest, e.stack names the file too
    await await_until(lambda: bool(logs), "the console entry arrived")
    assert logs[0].splitlines()[1].strip() == "at run (jobs/run.ts:3:9)"
    # a plain JavaScript source is named by its filename as well (it was blob:null/<uuid>)
    js = await _error(rt, "const f = () => { null.x; };\nf();", "task.js")
    assert js.name == "TypeError"
    assert "at f (task.js:1:24)" in str(js) and "blob:" not in str(js)
    await rt.dispose()


async def test_syntax_errors_name_line_and_column(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    err = await _error(rt, "const a = 1;\nconst b: number = ;\n", "broken.ts")
    assert err.name == "SyntaxError"
    assert err.message == "Expression expected (broken.ts:2:19)"
    assert str(err).startswith("SyntaxError: Expression expected (broken.ts:2:19)\n")
    assert str(err).rstrip().endswith("at broken.ts:2:19")
    assert "2 | const b: number = ;" in str(err)  # the code frame
    js = await _error(rt, "let x = 1;\nlet x = 2;", "dup.js")
    assert js.name == "SyntaxError" and "(dup.js:2:5)" in js.message, js.message
    assert str(js).splitlines()[0] == f"SyntaxError: {js.message}"
    nameless = await _error(rt, "this is not javascript", None)  # without a filename: still line and column
    assert nameless.name == "SyntaxError" and ":1:6)" in nameless.message
    assert await rt.eval("export default 'alive'") == "alive"
    await rt.dispose()


async def test_typescript_modules_by_url_or_kind(conn: client.Connection) -> None:
    resolver = from_dict(
        {
            "lib/shapes.ts": "export interface S { w: number }\n"
            "export const area = (s: S): number => {\n  if (s.w < 0) throw new Error('negative');\n  return s.w * s.w;\n};",
            "plain.js": Module("export const k: number = 3;", "file:///plain.js", "typescript"),
        }
    )
    logs: list[str] = []
    rt = await conn.create_runtime(modules=resolver, console=lambda e: logs.append(e.text))
    assert (
        await rt.eval(
            "import { area } from './lib/shapes.ts'; import { k } from './plain.js'; export default area({ w: k });"
        )
        == 9
    )
    err = await _error(rt, "import { area } from './lib/shapes.ts';\narea({ w: -1 });", "main.ts")
    assert "at area (file:///lib/shapes.ts:3:22)" in str(err)
    assert "at main.ts:2:1" in str(err)
    # a dynamic import's syntax error is a SyntaxError in the guest too
    resolver2 = from_dict({"bad.ts": "export const x: = 1;"})
    rt2 = await conn.create_runtime(modules=resolver2)
    value = await rt2.eval(
        "try { await import('./bad.ts'); } catch (e) { export_ = [e.name, e.message]; }\nvar export_;\nexport default export_;"
    )
    assert value[0] == "SyntaxError" and "(file:///bad.ts:1:" in value[1], value
    await rt.dispose()
    await rt2.dispose()


async def _error(rt: client.Runtime, source: str, filename: str | None) -> client.GuestError:
    try:
        await rt.eval(source, filename=filename)
    except client.GuestError as exc:
        return exc
    raise AssertionError("the eval did not fail")
