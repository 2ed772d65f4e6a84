"""The module loader (issue 10, section 2): guest imports answered by the host's resolver only.

Every test runs real runtimes (broker, daemon, Deno). A ``Recorder`` is a resolver that serves a
dict of modules and records every question, so a test can say what the loader asked for, and
that it asked nothing else: the loader itself never opens a file or reaches the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import client
from client.modules import Module, directory, from_dict
from daemon import modules as daemon_modules
from tests.conftest import ROOT, Broker, await_until


class Recorder:
    """A resolver over ``from_dict(table)`` that records each ``(specifier, referrer)`` it is asked."""

    def __init__(self, table: dict[str, str | Module], extra: dict[str, Module] | None = None) -> None:
        self.inner = from_dict(table) if table else None
        self.extra = extra or {}
        self.asked: list[tuple[str, str | None]] = []

    async def __call__(self, specifier: str, referrer: str | None) -> Module | None:
        self.asked.append((specifier, referrer))
        if specifier in self.extra:
            return self.extra[specifier]
        return None if self.inner is None else await self.inner(specifier, referrer)

    def specifiers(self) -> list[str]:
        return [s for s, _ in self.asked]


async def guest_error(rt: client.Runtime, source: str, filename: str | None = None) -> client.GuestError:
    with pytest.raises(client.GuestError) as info:
        await rt.eval(source, filename=filename)
    return info.value


def test_vendored_lexer_is_the_pinned_release() -> None:
    data = daemon_modules.LEXER.read_bytes()
    assert hashlib.sha256(data).hexdigest() == daemon_modules.LEXER_SHA256
    assert data.startswith(b"/* es-module-lexer 3.0.5 */")
    assert "MIT License" in daemon_modules.LEXER.with_name("es-module-lexer.LICENSE").read_text()


async def test_static_dynamic_relative_json_imports(conn: client.Connection) -> None:
    resolver = Recorder(
        {
            "util.ts": "export function add(a: number, b: number): number { return a + b; }",
            "lib/a.js": "import { add } from '../util.ts';\nexport default add(1, 2);\n"
            "export const later = () => import('./b.js');\nexport * from './c.js';",
            "lib/b.js": "export const b = 'bee';",
            "lib/c.js": "export const c = 'sea';",
            "data.json": '{"x": [1, 2]}',
        }
    )
    rt = await conn.create_runtime(modules=resolver)
    value = await rt.eval(
        """
        import a, { later, c } from "./lib/a.js";
        import data from "./data.json" with { type: "json" };
        const { b } = await later();
        const spec = "./lib/" + "b.js";                 // an expression: resolved when it runs
        export default [a, data, c, b, (await import(spec)).b];
        """
    )
    assert value == [3, {"x": [1, 2]}, "sea", "bee", "bee"]
    # relative specifiers arrive resolved against the importing module's URL, each asked once
    assert sorted(resolver.asked) == sorted(
        [
            ("file:///lib/a.js", "file:///main.js"),
            ("file:///data.json", "file:///main.js"),
            ("file:///util.ts", "file:///lib/a.js"),
            ("file:///lib/c.js", "file:///lib/a.js"),
            ("file:///lib/b.js", "file:///lib/a.js"),
        ]
    )
    await rt.dispose()


async def test_import_meta_names_the_module_not_its_blob(conn: client.Connection) -> None:
    resolver = Recorder(
        {
            "lib/a.js": "export const here = import.meta.url, sib = import.meta.resolve('./b.js');\n"
            "export const load = () => import(new URL('./b.js', import.meta.url).href);",
            "lib/b.js": "export default 'b';",
        }
    )
    rt = await conn.create_runtime(modules=resolver)
    value = await rt.eval(
        "import { here, sib, load } from '../lib/a.js';\n"
        "export default [import.meta.url, here, sib, (await load()).default];",
        filename="app/main.ts",
    )
    assert value == ["file:///app/main.ts", "file:///lib/a.js", "file:///lib/b.js", "b"]
    await rt.dispose()


async def test_each_url_is_asked_once_and_is_one_instance(conn: client.Connection) -> None:
    resolver = Recorder(
        {
            "counter.js": "export let n = 0; export function bump() { return ++n; }",
            "x/user.js": "import { bump } from '../counter.js'; export const first = bump();",
        }
    )
    rt = await conn.create_runtime(modules=resolver)
    assert await rt.eval("import { bump } from './counter.js'; export default bump();") == 1
    assert await rt.eval("import { first } from '/x/user.js'; export default first;") == 2
    assert await rt.eval("import { n } from 'counter.js'; export default n;") == 2  # bare: asked, same URL
    value = await rt.eval("export default (await import('./x/../counter.js')).bump();")
    assert value == 3  # the same instance, not asked again: the key file:///counter.js is cached
    assert resolver.specifiers().count("file:///counter.js") == 1
    assert resolver.specifiers().count("counter.js") == 1
    await rt.dispose()


async def test_none_raise_and_timeout_give_module_not_found(
    conn: client.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()

    async def resolver(specifier: str, referrer: str | None) -> Module | None:
        if specifier.endswith("boom.js"):
            raise RuntimeError("database password is hunter2")
        if specifier.endswith("slow.js"):
            await gate.wait()
        if specifier.endswith("wrong.js"):
            return "export default 1"  # type: ignore[return-value]  # not a client.Module
        return None

    rt = await conn.create_runtime(modules=resolver, module_timeout=0.5)
    err = await guest_error(rt, "\nimport './none.js';", filename="main.js")
    assert err.name == "TypeError"
    assert 'Module not found "./none.js" imported from main.js' in err.message
    assert "no such module" in err.message
    assert "at main.js:2:9" in str(err)
    with caplog.at_level(logging.ERROR, logger="sandbox_mesh.client.runtime"):
        err = await guest_error(rt, "import './boom.js';")
    assert 'Module not found "./boom.js"' in err.message and "resolver failed" in err.message
    assert "hunter2" not in str(err) and "RuntimeError" not in str(err)  # host text never reaches the guest
    assert "hunter2" in caplog.text and "Traceback" in caplog.text  # it is logged on the host
    err = await guest_error(rt, "import './wrong.js';")
    assert "resolver failed" in err.message  # (logged too, counted: at most one line a second per runtime)
    err = await guest_error(rt, "export default await import('./slow.js');")
    assert 'Module not found "./slow.js"' in err.message and "did not answer within 0.5s" in err.message
    gate.set()
    # a failure is not cached: the next import asks again, and the runtime lives on
    assert await rt.eval("export default 7") == 7
    assert (await rt.stats())["daemon"]["modules"] == 0
    await rt.dispose()


async def test_resolver_must_be_async(conn: client.Connection) -> None:
    with pytest.raises(TypeError, match="modules must be an async function"):
        await conn.create_runtime(modules=lambda s, r: None)  # type: ignore[arg-type]


async def test_import_cycle_is_a_clear_error(conn: client.Connection) -> None:
    resolver = Recorder(
        {"a.js": "import './b.js'; export const a = 1;", "b.js": "import './a.js'; export const b = 2;"}
    )
    rt = await conn.create_runtime(modules=resolver)
    err = await guest_error(rt, "import './a.js';")
    assert "Import cycle: file:///a.js -> file:///b.js -> file:///a.js" in err.message
    # a dynamic import of an ancestor is no cycle
    resolver.inner = from_dict({"p.js": "export const later = () => import('./q.js');", "q.js": "import './p.js';"})
    resolver.extra = {}
    assert await rt.eval("import { later } from './p.js'; await later(); export default 'ok';") == "ok"
    await rt.dispose()


#: What the guest imports to reach past the resolver, and the key the loader asks the resolver for.
ESCAPES = {
    "file:///etc/passwd": "file:///etc/passwd",
    "/etc/passwd": "file:///etc/passwd",
    "../../..": "file:///",
    "http://127.0.0.1:1/x.js": "http://127.0.0.1:1/x.js",
    "https://example.com/x.js": "https://example.com/x.js",
    "npm:lodash": "npm:lodash",
    "jsr:@std/path": "jsr:@std/path",
}


async def test_the_loader_never_opens_what_the_resolver_did_not_hand_out(conn: client.Connection) -> None:
    resolver = Recorder({})
    rt = await conn.create_runtime(modules=resolver)
    for specifier, key in ESCAPES.items():
        resolver.asked.clear()
        for how in (f"import x from {specifier!r};", f"await import({specifier!r});"):
            err = await guest_error(rt, how)
            assert f'Module not found "{specifier}"' in err.message, (how, err.message)
        assert resolver.specifiers() == [key, key], specifier  # asked (a failure is not cached), never opened
    # a data: URL is its own source; what it imports still comes from the resolver only
    resolver.asked.clear()
    err = await guest_error(rt, "import 'data:text/javascript,import \"file:///etc/passwd\"';")
    assert 'Module not found "file:///etc/passwd"' in err.message
    assert resolver.specifiers() == ["file:///etc/passwd"]
    # a Blob URL the guest makes is not read either: it is a specifier like any other
    resolver.asked.clear()
    err = await guest_error(
        rt,
        """
        const url = URL.createObjectURL(new Blob(["import 'file:///etc/passwd';"], { type: "text/javascript" }));
        await import(url);
        """,
    )
    assert 'Module not found "blob:' in err.message
    assert len(resolver.asked) == 1 and resolver.asked[0][0].startswith("blob:")
    # node: built-ins are Deno's: the safe ones load, the others are refused; neither asks
    resolver.asked.clear()
    assert await rt.eval("import { join } from 'node:path'; export default join('a', 'b');") == "a/b"
    err = await guest_error(rt, "await import('node:fs');")
    assert "not available in this sandbox" in err.message
    assert resolver.asked == []
    assert "root:" not in str(await rt.eval("export default 'still alive'"))
    await rt.dispose()


async def test_the_resolver_may_hand_out_any_specifier(conn: client.Connection) -> None:
    served = {
        "npm:lodash": Module("export default (a) => a.length;", "npm:lodash"),
        "https://cdn.example/x.ts": Module("export const x: number = 42;", "https://cdn.example/x.ts"),
        "https://cdn.example/y.js": Module("export const y = 1;", "https://cdn.example/y.js"),
    }
    served["https://cdn.example/x.ts"] = Module(
        "import { y } from './y.js';\nexport const x: number = 41 + y;", "https://cdn.example/x.ts"
    )
    resolver = Recorder({}, served)
    rt = await conn.create_runtime(modules=resolver)
    value = await rt.eval(
        "import len from 'npm:lodash'; import { x } from 'https://cdn.example/x.ts'; export default [len('abc'), x];"
    )
    assert value == [3, 42]
    assert ("https://cdn.example/y.js", "https://cdn.example/x.ts") in resolver.asked
    await rt.dispose()


async def test_type_only_imports_do_not_ask(conn: client.Connection) -> None:
    resolver = Recorder(
        {"impl.ts": "import type { Shape } from './types.ts';\nexport const area = (s: Shape): number => s.w * s.h;"}
    )
    rt = await conn.create_runtime(modules=resolver)
    value = await rt.eval(
        "import type { Shape } from './types.ts';\nimport { area } from './impl.ts';\n"
        "const s: Shape = { w: 2, h: 3 };\nexport default area(s);",
        filename="main.ts",
    )
    assert value == 6
    assert "file:///types.ts" not in resolver.specifiers()
    await rt.dispose()


# ---- helpers ---------------------------------------------------------------------------------------


async def test_from_dict() -> None:
    resolve = from_dict({"a.js": "1", "lib/b.ts": "2", "lodash": Module("3", "npm:lodash"), "d.json": "{}"})
    assert await resolve("file:///a.js", None) == Module("1", "file:///a.js", "javascript")
    assert (await resolve("./b.ts", "file:///lib/x.js")) == Module("2", "file:///lib/b.ts", "typescript")
    assert (await resolve("lodash", "file:///main.js")).url == "npm:lodash"  # type: ignore[union-attr]
    assert (await resolve("d.json", None)).kind == "json"  # type: ignore[union-attr]
    assert await resolve("file:///nope.js", None) is None
    assert await resolve("https://x/a.js", None) is None
    with pytest.raises(PermissionError):
        await resolve("../../a.js", None)
    with pytest.raises(PermissionError):
        from_dict({"../x.js": ""})
    with pytest.raises(ValueError):
        from_dict({"http://x/y.js": ""})
    with pytest.raises(ValueError):
        Module("", "file:///x.js", "python")


async def test_directory_refuses_what_leaves_the_root(tmp_path: Path, conn: client.Connection) -> None:
    root = tmp_path / "app"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "util.ts").write_text("export const twice = (n: number): number => 2 * n;")
    (root / "main.js").write_text("import { twice } from './lib/util.ts'; export default twice(21);")
    (root / "cfg.json").write_text('{"on": true}')
    secret = tmp_path / "secret.js"
    secret.write_text("export default 'root: the secret';")
    os.symlink(secret, root / "evil.js")  # a file symlink leaving the root
    os.symlink(tmp_path, root / "up")  # a directory symlink leaving it
    os.symlink(root / "lib" / "util.ts", root / "alias.ts")  # one that stays inside is fine
    resolve = directory(root)
    assert (await resolve("file:///lib/util.ts", None)).kind == "typescript"  # type: ignore[union-attr]
    assert (await resolve("./alias.ts", None)).url == "file:///alias.ts"  # type: ignore[union-attr]
    assert (await resolve(str(root / "main.js"), None)).url == "file:///main.js"  # type: ignore[union-attr]
    assert await resolve("file:///missing.js", None) is None
    for bad in (
        "../secret.js",
        "lib/../../secret.js",
        "/etc/passwd",
        str(secret),
        "file:///evil.js",
        "file:///up/secret.js",
    ):
        with pytest.raises(PermissionError):
            await resolve(bad, None)
    rt = await conn.create_runtime(modules=resolve)
    assert await rt.eval(
        "import v from './main.js'; import c from './cfg.json' with { type: 'json' }; export default [v, c];"
    ) == [42, {"on": True}]
    for spec in ("./evil.js", "./up/secret.js"):
        err = await guest_error(rt, f"import s from {spec!r}; export default s;")
        assert "resolver failed" in err.message and "root:" not in str(err)
    await rt.dispose()


async def test_a_resumed_named_runtime_takes_the_new_connections_resolver(broker: Broker) -> None:
    first_resolver = Recorder({"a.js": "export default 'from the first'"})
    second_resolver = Recorder({"b.js": "export default 'from the second'"})
    async with client.connect(broker.frontend) as first:
        rt = await first.create_runtime(name="modular", keep_alive=30, modules=first_resolver)
        assert await rt.eval("import a from './a.js'; export default a;") == "from the first"
        session = first.session
    async with client.connect(broker.frontend, session=session) as second:
        again = await second.runtime("modular", modules=second_resolver)
        # the module loaded before is cached in the guest; a new one asks this connection's resolver
        assert await again.eval("import a from './a.js'; import b from './b.js'; export default [a, b];") == [
            "from the first",
            "from the second",
        ]
        assert second_resolver.specifiers() == ["file:///b.js"]
        await again.dispose()


async def test_an_import_pending_when_its_owner_leaves_is_answered(broker: Broker) -> None:
    """The connection whose resolver was asked goes away: the guest's import fails at once (the
    broker answers the callback for the gone owner), and the runtime lives on for its session."""
    asked = asyncio.Event()

    async def stuck(specifier: str, referrer: str | None) -> Module | None:
        asked.set()
        await asyncio.Event().wait()  # never answers: cancelled when its connection closes
        return None

    async with client.connect(broker.frontend) as first:
        rt = await first.create_runtime(name="left-behind", keep_alive=30, modules=stuck)
        await rt.eval(
            "globalThis.outcome = import('./never.js').then(() => 'loaded', (e) => e.message);"
            "globalThis.outcome.then((m) => { globalThis.done = m; });"
        )
        await asyncio.wait_for(asked.wait(), 30)
        session = first.session
    async with client.connect(broker.frontend, session=session) as second:
        again = await second.runtime("left-behind")
        message = await await_until(
            lambda: again.eval("export default globalThis.done ?? null"), "the pending import was answered"
        )
        assert 'Module not found "./never.js"' in message, message
        assert (await again.stats())["daemon"]["modules"] == 0
        await again.dispose()


def test_the_figures_script_runs() -> None:
    """scripts/module_figures.py (the loader's costs, quoted in docs/design.md 2.3a) at a small size."""
    run = subprocess.run(
        [sys.executable, "-m", "scripts.module_figures", "--rounds", "2", "--chain", "4", "--fan", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "a chain of 4 modules" in run.stdout and "2 TypeScript modules" in run.stdout, run.stdout
