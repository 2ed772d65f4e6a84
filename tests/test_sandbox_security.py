"""Guest code cannot get out of its sandbox: no files, sockets, environment, processes, remote or npm
modules, Workers, writes to the daemon channel, or Deno internals; and the runtime keeps working after
every attempt.

Each guest probe runs its attempts inside try/catch and returns a JSON summary through
``export default``; the assertions check the concrete outcome of every attempt, so a check fails if an
attempt ever succeeds (or fails for some other reason than the sandbox).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import client
from daemon import sandbox
from daemon.guest import BOOTSTRAP
from scripts.kit.procs import deno_pids
from scripts.kit.procs import descendants as children_of
from tests.conftest import await_until

#: Defines ``attempt(name, fn)``: records ``{ok: true, value}`` or ``{ok: false, name, message}`` in ``out``.
PROBE = """
const out = {};
async function attempt(name, fn) {
  try { out[name] = { ok: true, value: await fn() }; }
  catch (e) { out[name] = { ok: false, name: String(e?.name), message: String(e?.message ?? e) }; }
}
"""

BLOCKED = "is not available in this sandbox"
NO_READ = "Requires read access"

#: node: built-ins blocked by the import map, grouped by what they would give the guest.
FILE_MODULES = ["node:fs", "fs", "node:fs/promises", "node:module", "node:sqlite"]
NET_MODULES = ["node:net", "net", "node:http", "node:https", "node:http2", "node:tls", "node:dgram", "node:dns",
               "node:dns/promises", "node:_http_agent", "node:inspector"]  # fmt: skip
ENV_MODULES = ["node:process", "process", "NODE:process", "node:os", "os", "node:v8", "node:vm"]
SPAWN_MODULES = ["node:child_process", "child_process", "node:cluster", "node:worker_threads", "node:wasi",
                 "node:repl"]  # fmt: skip


async def probe(rt: client.Runtime, body: str) -> dict[str, Any]:
    result = await rt.eval(PROBE + body + "\nexport default out;")
    assert isinstance(result, dict)
    return result


async def assert_alive(rt: client.Runtime) -> None:
    """The runtime still evaluates code (a garbage write to the channel would have killed it)."""
    assert await rt.eval("export default { sum: 40 + 2, serve: typeof serve }") == {"sum": 42, "serve": "function"}


def rejected(result: dict[str, Any], name: str, *fragments: str) -> dict[str, Any]:
    """Assert attempt ``name`` threw, with every fragment in its message; returns the attempt."""
    r = result[name]
    assert r["ok"] is False, f"{name} succeeded: {r!r}"
    for fragment in fragments:
        assert fragment in r["message"], f"{name}: {fragment!r} not in {r['message']!r}"
    return r


def blocked_imports(names: list[str]) -> str:
    """Guest code that tries ``import(name)`` for each name and records the outcome."""
    return "".join(
        f"await attempt({json.dumps(n)}, async () => Object.keys(await import({json.dumps(n)})));\n" for n in names
    )


class Listener:
    """A TCP server on 127.0.0.1 that counts connection attempts (none may ever arrive)."""

    def __init__(self) -> None:
        self.connections = 0
        self.peer_ports: list[int] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.peer_ports.append(writer.get_extra_info("peername")[1])
            writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def connections_before_ours(self) -> int:
        """Connect to the listener ourselves and wait until it has accepted that connection: any
        connection opened before ours (by a guest) has been accepted and counted by then, as the
        listener accepts in arrival order. Returns how many other connections it has seen."""
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        ours = writer.get_extra_info("sockname")[1]
        try:
            await await_until(lambda: ours in self.peer_ports, "the listener accepted our own connection")
        finally:
            writer.close()
        return self.connections - 1

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


# ---- 1. files -------------------------------------------------------------------------------------


async def test_guest_cannot_read_files(conn: client.Connection) -> None:
    passwd = await asyncio.to_thread(Path("/etc/passwd").read_text)
    assert "root:" in passwd  # so "root:" in a result would mean the file leaked
    rt = await conn.create_runtime()
    result = await probe(
        rt,
        """
        await attempt("deno", () => typeof Deno);
        await attempt("file_import", async () => Object.keys(await import("file:///etc/passwd")));
        await attempt("json_import", async () => (await import("file:///etc/passwd", { with: { type: "json" } })).default);
        await attempt("json_import_abs", async () => (await import("/etc/passwd", { with: { type: "json" } })).default);
        await attempt("text_import", async () => (await import("file:///etc/passwd", { with: { type: "text" } })).default);
        await attempt("bytes_import", async () => (await import("file:///etc/passwd", { with: { type: "bytes" } })).default);
        await attempt("static_in_data", async () => (await import(
          "data:text/javascript,import p from 'file:///etc/passwd' with { type: 'json' }; export default p")).default);
        await attempt("fetch_file", async () => await (await fetch("file:///etc/passwd")).text());
        """
        + blocked_imports(FILE_MODULES),
    )
    assert result["deno"] == {"ok": True, "value": "undefined"}
    rejected(result, "file_import", NO_READ, "/etc/passwd")
    rejected(result, "json_import", NO_READ, "/etc/passwd")
    rejected(result, "json_import_abs", "not in import map")  # a bare path does not resolve from a blob: module
    rejected(result, "text_import", NO_READ, "/etc/passwd")
    bytes_import = rejected(result, "bytes_import")["message"]  # unsupported today; a read needs permission anyway
    assert "not a valid module type" in bytes_import or NO_READ in bytes_import
    rejected(result, "static_in_data", NO_READ, "/etc/passwd")
    assert rejected(result, "fetch_file", "no fetch callback")["name"] == "TypeError"
    for name in FILE_MODULES:
        rejected(result, name, BLOCKED)
    assert "root:" not in json.dumps(result)
    await assert_alive(rt)
    await rt.dispose()


async def test_guest_file_fetch_is_decided_by_the_host(conn: client.Connection) -> None:
    seen: list[str] = []

    async def on_fetch(req: client.Request) -> client.Response:
        seen.append(req.url)
        return client.Response(403, [("content-type", "text/plain")], b"the host says no")

    rt = await conn.create_runtime(fetch=on_fetch)
    result = await probe(
        rt,
        """
        await attempt("fetch_file", async () => { const r = await fetch("file:///etc/passwd");
                                                  return { status: r.status, text: await r.text() }; });
        """,
    )
    # the request went to the host, which answered; nothing was read locally
    assert result["fetch_file"] == {"ok": True, "value": {"status": 403, "text": "the host says no"}}
    assert seen == ["file:///etc/passwd"]
    await assert_alive(rt)
    await rt.dispose()


# ---- 2. sockets -----------------------------------------------------------------------------------


async def test_guest_cannot_open_sockets(conn: client.Connection) -> None:
    async with Listener() as server:
        rt = await conn.create_runtime()
        result = await probe(
            rt,
            f"""
            const port = {server.port};
            await attempt("deno_connect", () => Deno.connect({{ hostname: "127.0.0.1", port }}));
            await attempt("websocket", () => new Promise((resolve, reject) => {{
              const ws = new WebSocket(`ws://127.0.0.1:${{port}}/`);
              ws.onopen = () => resolve("open");
              ws.onerror = (e) => reject(new Error(`websocket error event: ${{e.message}}`));
            }}));
            await attempt("event_source", () => new Promise((resolve, reject) => {{
              const es = new EventSource(`http://127.0.0.1:${{port}}/`);
              es.onopen = () => resolve("open");
              es.onerror = () => {{ es.close(); reject(new Error("event source error event")); }};
            }}));
            await attempt("fetch", async () => (await fetch(`http://127.0.0.1:${{port}}/`)).status);
            """
            + blocked_imports(NET_MODULES),
        )
        assert await server.connections_before_ours() == 0
    rejected(result, "deno_connect", "Deno is not defined")
    ws = rejected(result, "websocket", "Requires net access", "127.0.0.1")
    assert ws["name"] == "NotCapable"
    rejected(result, "event_source", "event source error event")  # and the listener saw no connection
    rejected(result, "fetch", "no fetch callback")
    for name in NET_MODULES:
        rejected(result, name, BLOCKED)
    await assert_alive(rt)
    await rt.dispose()


# ---- 3. environment -------------------------------------------------------------------------------


async def test_guest_cannot_read_the_environment(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    result = await probe(
        rt,
        """
        await attempt("deno_env", () => Deno.env.toObject());
        await attempt("process_env", () => process.env);
        await attempt("global_process", () => [typeof globalThis.process, "process" in globalThis]);
        await attempt("meta_env", () => typeof import.meta.env);
        await attempt("style_text", async () => (await import("node:util")).styleText("red", "x"));
        await attempt("query_variant", async () => Object.keys(await import("node:process?x")));
        await attempt("from_data_module", async () => (await import(
          "data:text/javascript,import * as p from 'node:process'; export default Object.keys(p.default.env)")).default);
        """
        + blocked_imports(ENV_MODULES),
    )
    rejected(result, "deno_env", "Deno is not defined")
    rejected(result, "process_env", "process is not defined")
    assert result["global_process"] == {"ok": True, "value": ["undefined", False]}
    assert result["meta_env"] == {"ok": True, "value": "undefined"}
    # util.styleText looks for process.env internally and finds nothing
    rejected(result, "style_text")
    rejected(result, "query_variant", "Unsupported scheme")
    rejected(result, "from_data_module", BLOCKED)  # the import map applies to every module, not just evals
    for name in ENV_MODULES:
        rejected(result, name, BLOCKED)
    text = json.dumps(result)
    for secret in ("DENO_DIR", "sandbox-daemon-", "/usr/bin:/bin"):  # what the daemon puts in the environment
        assert secret not in text
    await assert_alive(rt)
    await rt.dispose()


# ---- 4. processes ---------------------------------------------------------------------------------


async def test_guest_cannot_spawn_processes(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    result = await probe(
        rt,
        """
        await attempt("deno_command", () => new Deno.Command("/bin/sh", { args: ["-c", "true"] }).outputSync());
        await attempt("deno_run", () => Deno.run({ cmd: ["/bin/true"] }));
        await attempt("process_binding", () => process.binding("spawn_sync"));
        """
        + blocked_imports(SPAWN_MODULES),
    )
    rejected(result, "deno_command", "Deno is not defined")
    rejected(result, "deno_run", "Deno is not defined")
    rejected(result, "process_binding", "process is not defined")
    for name in SPAWN_MODULES:
        rejected(result, name, BLOCKED)
    for pid in deno_pids():
        assert children_of(pid) == [], f"runtime process {pid} has children"
    await assert_alive(rt)
    await rt.dispose()


# ---- 5. remote and npm modules --------------------------------------------------------------------


async def test_guest_cannot_import_remote_or_npm_modules(conn: client.Connection) -> None:
    async with Listener() as server:
        rt = await conn.create_runtime()
        result = await probe(
            rt,
            f"""
            await attempt("https", async () => Object.keys(await import("https://deno.land/std@0.224.0/path/mod.ts")));
            await attempt("http_local", async () => Object.keys(await import("http://127.0.0.1:{server.port}/x.js")));
            await attempt("http_port1", async () => Object.keys(await import("http://127.0.0.1:1/x.js")));
            await attempt("npm", async () => Object.keys(await import("npm:left-pad")));
            await attempt("jsr", async () => Object.keys(await import("jsr:@std/path")));
            await attempt("static_in_data", async () => Object.keys(await import(
              "data:text/javascript,import 'http://127.0.0.1:{server.port}/y.js'; export default 1")));
            await attempt("ext", async () => Object.keys(await import("ext:deno_node/process.ts")));
            """,
        )
        assert await server.connections_before_ours() == 0
    rejected(result, "https", "--no-remote")
    rejected(result, "http_local", "Requires import access", "127.0.0.1")
    rejected(result, "http_port1", "Requires import access")
    rejected(result, "npm", "--no-npm")
    rejected(result, "jsr", "--no-remote")
    rejected(result, "static_in_data", "Requires import access", "127.0.0.1")
    rejected(result, "ext", "only allowed from ext: and node: modules")
    await assert_alive(rt)
    await rt.dispose()


# ---- 6. Workers -----------------------------------------------------------------------------------


async def test_guest_cannot_start_a_worker(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    result = await probe(
        rt,
        """
        const src = URL.createObjectURL(new Blob(["postMessage(typeof Deno)"], { type: "text/javascript" }));
        await attempt("typeofs", () => [typeof Worker, typeof self.Worker, typeof SharedWorker, typeof ServiceWorker,
                                        "Worker" in globalThis]);
        await attempt("new_worker", () => new Worker(src, { type: "module" }));
        await attempt("sloppy_this", () => typeof Function("return this")().Worker);
        await attempt("indirect_eval", () => (0, eval)("typeof Worker"));
        await attempt("window_proto", () => Object.getOwnPropertyNames(Object.getPrototypeOf(globalThis))
                                              .concat(Object.getOwnPropertyNames(EventTarget.prototype))
                                              .filter((n) => /worker/i.test(n)));
        await attempt("new_window", () => new globalThis.constructor());
        await attempt("in_data_module", async () =>
          (await import("data:text/javascript,export default typeof Worker")).default);
        await attempt("worker_ctor_anywhere", () => {
          // any constructor reachable from globalThis whose name mentions Worker
          const found = [];
          for (const k of Reflect.ownKeys(globalThis)) {
            const d = Reflect.getOwnPropertyDescriptor(globalThis, k);
            const v = d && "value" in d ? d.value : undefined;
            if (typeof v === "function" && /worker/i.test(v.name)) found.push(v.name);
          }
          return found;
        });
        """
        + blocked_imports(["node:worker_threads", "worker_threads"]),
    )
    assert result["typeofs"] == {"ok": True, "value": ["undefined"] * 4 + [False]}
    rejected(result, "new_worker", "Worker is not defined")
    assert result["sloppy_this"] == {"ok": True, "value": "undefined"}
    assert result["indirect_eval"] == {"ok": True, "value": "undefined"}
    assert result["window_proto"] == {"ok": True, "value": []}
    rejected(result, "new_window", "Illegal constructor")
    assert result["in_data_module"] == {"ok": True, "value": "undefined"}
    assert result["worker_ctor_anywhere"] == {"ok": True, "value": []}
    rejected(result, "node:worker_threads", BLOCKED)
    rejected(result, "worker_threads", BLOCKED)
    await assert_alive(rt)
    await rt.dispose()


# ---- 7. the daemon channel ------------------------------------------------------------------------


async def test_guest_cannot_write_to_the_daemon_channel(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    result = await probe(
        rt,
        """
        const garbage = "\\u0000\\u0000\\u0000\\u0010garbage frame!!\\n";
        await attempt("deno_stdout", () => Deno.stdout.writeSync(new TextEncoder().encode(garbage)));
        await attempt("fs_write_fd1", async () => (await import("node:fs")).writeSync(1, garbage));
        await attempt("process_stdout", async () => (await import("node:process")).stdout.write(garbage));
        await attempt("tty", async () => new (await import("node:tty")).WriteStream(1).write(garbage));
        await attempt("node_console", async () => new (await import("node:console")).Console(
          { stdout: { write() {} } }).log(garbage));
        await attempt("net_fd1", async () => new (await import("node:net")).Socket({ fd: 1 }).write(garbage));
        await attempt("readline", async () => (await import("node:readline")).createInterface({}));
        await attempt("dialogs", () => [typeof alert, typeof confirm, typeof prompt, typeof close]);
        await attempt("alert", () => alert(garbage));
        await attempt("worker", () => new Worker("data:text/javascript,Deno.stdout.writeSync(new Uint8Array(8))"));
        """,
    )
    rejected(result, "deno_stdout", "Deno is not defined")
    for name in ("fs_write_fd1", "process_stdout", "tty", "node_console", "net_fd1", "readline"):
        rejected(result, name, BLOCKED)
    assert result["dialogs"] == {"ok": True, "value": ["undefined"] * 4}
    rejected(result, "alert", "alert is not defined")
    rejected(result, "worker", "Worker is not defined")
    await assert_alive(rt)
    assert entries == []  # nothing reached the console callback either
    await rt.dispose()


async def test_node_helpers_that_warn_or_log_do_not_reach_the_channel(conn: client.Connection) -> None:
    """The allowed node: modules print through the guest's console (or nowhere), never to stdout."""
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    result = await probe(
        rt,
        """
        const util = await import("node:util");
        await attempt("util_log", () => util.log("via util.log"));
        await attempt("debuglog", () => util.debuglog("sandbox")("via debuglog"));
        await attempt("deprecate", () => util.deprecate(() => 1, "deprecated!", "DEP_SANDBOX")());
        await attempt("url_parse", async () => (await import("node:url")).parse("http://x/y").pathname);
        await attempt("punycode", async () => (await import("node:punycode")).toASCII("bücher.example"));
        await attempt("buffer_ctor", async () => (await import("node:buffer")).Buffer(4).length);
        await attempt("max_listeners", async () => {
          const { EventEmitter } = await import("node:events");
          const e = new EventEmitter(); e.setMaxListeners(1); e.on("a", () => {}); e.on("a", () => {});
          return e.listenerCount("a");
        });
        await attempt("assert", async () => (await import("node:assert")).strictEqual(1, 2));
        await new Promise((r) => setTimeout(r, 50));  // warnings are emitted on a later tick
        """,
    )
    assert result["util_log"]["ok"] is True
    assert result["url_parse"] == {"ok": True, "value": "/y"}
    rejected(result, "assert", "strictly equal")
    await assert_alive(rt)
    texts = [e.text for e in entries]
    assert any("via util.log" in t for t in texts)  # util.log goes through the guest's console
    await rt.dispose()


#: Ways a guest can tamper with the intrinsics the bootstrap used to write a frame. Each is applied
#: around a console.log and a fetch upload (frames without and with a body), then undone.
TAMPERING = {
    "subarray": """
        const orig = Uint8Array.prototype.subarray;
        Uint8Array.prototype.subarray = function () { return new TextEncoder().encode("GARBAGE!GARBAGE!"); };
        const undo = () => { Uint8Array.prototype.subarray = orig; };
    """,
    "typedarray_subarray": """
        const TA = Object.getPrototypeOf(Uint8Array.prototype);
        const orig = TA.subarray;
        TA.subarray = function () { return new TextEncoder().encode("GARBAGE!GARBAGE!"); };
        const undo = () => { TA.subarray = orig; };
    """,
    "species": """
        const orig = Object.getOwnPropertyDescriptor(Uint8Array.prototype, "constructor");
        class Evil extends Uint8Array {
          static get [Symbol.species]() { return function () { return new TextEncoder().encode("GARBAGE!GARBAGE!"); }; }
        }
        Uint8Array.prototype.constructor = Evil;
        const undo = () => { Object.defineProperty(Uint8Array.prototype, "constructor", orig); };
    """,
    "set": """
        const TA = Object.getPrototypeOf(Uint8Array.prototype);
        const orig = TA.set;
        TA.set = function () {};
        const undo = () => { TA.set = orig; };
    """,
    "length": """
        const TA = Object.getPrototypeOf(Uint8Array.prototype);
        const orig = Object.getOwnPropertyDescriptor(TA, "length");
        Object.defineProperty(TA, "length", { get() { return 3; }, configurable: true });
        const undo = () => { Object.defineProperty(TA, "length", orig); };
    """,
    "byte_length": """
        const TA = Object.getPrototypeOf(Uint8Array.prototype);
        const orig = Object.getOwnPropertyDescriptor(TA, "byteLength");
        Object.defineProperty(TA, "byteLength", { get() { return 1 << 20; }, configurable: true });
        const undo = () => { Object.defineProperty(TA, "byteLength", orig); };
    """,
    "buffer": """
        const TA = Object.getPrototypeOf(Uint8Array.prototype);
        const orig = Object.getOwnPropertyDescriptor(TA, "buffer");
        Object.defineProperty(TA, "buffer", { get() { return new ArrayBuffer(64); }, configurable: true });
        const undo = () => { Object.defineProperty(TA, "buffer", orig); };
    """,
    "data_view": """
        const orig = DataView.prototype.setUint32;
        DataView.prototype.setUint32 = function (at, v) { return orig.call(this, at, 0xdeadbeef); };
        const undo = () => { DataView.prototype.setUint32 = orig; };
    """,
    "text_encoder": """
        const orig = TextEncoder.prototype.encode;
        TextEncoder.prototype.encode = function (s) { return orig.call(this, "not json " + s); };
        const undo = () => { TextEncoder.prototype.encode = orig; };
    """,
    "function_call": """
        const { call, apply, bind } = Function.prototype;
        Function.prototype.call = function () { return new TextEncoder().encode("GARBAGE!GARBAGE!"); };
        Function.prototype.apply = Function.prototype.call;
        const undo = () => { Object.assign(Function.prototype, { call, apply, bind }); };
    """,
    "json_stringify": """
        const orig = JSON.stringify;
        JSON.stringify = () => '{"op":"eval_ok","id":1,"v":"forged"}';
        const undo = () => { JSON.stringify = orig; };
    """,
    "to_json": """
        Object.prototype.toJSON = function () { return { op: "eval_ok", id: 1, v: "forged" }; };
        Array.prototype.toJSON = function () { return "forged"; };
        const undo = () => { delete Object.prototype.toJSON; delete Array.prototype.toJSON; };
    """,
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
async def test_tampered_intrinsics_do_not_let_the_guest_write_to_the_channel(conn: client.Connection, how: str) -> None:
    """The bootstrap writes frames with intrinsics it captured before the guest ran, so a guest that
    replaces them (to make the bootstrap write garbage or forged frames) changes nothing on the channel."""
    entries: list[client.ConsoleEntry] = []
    uploads: list[bytes] = []
    undone = asyncio.Event()

    def on_console(entry: client.ConsoleEntry) -> None:
        entries.append(entry)
        if entry.text == "undone":
            undone.set()

    async def on_fetch(req: client.Request) -> client.Response:
        uploads.append(await req.read())
        try:  # answer only after the guest has undone its tampering (it logs "undone" then)
            await asyncio.wait_for(undone.wait(), 30)
        except TimeoutError:
            return client.Response(599, [], b"the guest never logged that it had undone its tampering")
        return client.Response(200, [], b"echo:" + uploads[-1])

    rt = await conn.create_runtime(console=on_console, fetch=on_fetch)
    value = await rt.eval(
        TAMPERING[how]
        + """
        let pending;
        try {
          console.log("written while tampered", [1, 2]);  // a frame without a body
          pending = fetch("http://host.test/", { method: "POST", body: "uploaded while tampered" });  // with a body
          await new Promise((r) => setTimeout(r, 0));  // the upload frame goes out before this timer fires
        } finally { undo(); }
        console.log("undone");
        const resp = await pending;
        export default { status: resp.status, text: await resp.text() };
        """
    )
    assert value == {"status": 200, "text": "echo:uploaded while tampered"}
    await assert_alive(rt)
    assert uploads == [b"uploaded while tampered"]
    assert [(e.level, e.args) for e in entries] == [
        ("log", ["written while tampered", "[ 1, 2 ]"]),
        ("log", ["undone"]),
    ]
    await rt.dispose()


# ---- 8. Deno internals ----------------------------------------------------------------------------

#: Property names that would mean a capability leaked (found anywhere reachable from the guest).
SUSPICIOUS = [
    "Deno", "process", "Worker", "core", "ops", "internal", "binding", "dlopen", "Command", "spawn", "spawnSync",
    "execSync", "readTextFile", "readFileSync", "openSync", "writeSync", "connect", "listen", "env", "stdout",
    "stdin", "stderr", "resources", "exit", "kill", "cwd", "chdir", "umask", "pid", "ppid", "hostname",
    "osRelease", "loadavg", "networkInterfaces", "systemMemoryInfo", "print", "localStorage", "caches",
]  # fmt: skip
#: Symbol-keyed properties Deno puts on web classes that expose nothing: inspect hooks, the host-object
#: marker of Blob/File, and ImageBitmap's native accessor of its own pixels.
HARMLESS_SYMBOLS = ["Symbol(Deno.privateCustomInspect)", "Symbol(Deno.core.hostObject)", "Symbol(Deno_bitmapData)"]
ALLOWED_NODE = ["buffer", "events", "path", "path/posix", "path/win32", "url", "util", "util/types",
                "string_decoder", "querystring", "assert", "assert/strict", "punycode", "stream/web"]  # fmt: skip

SCAN = """
const SUSPICIOUS = new Set(%(suspicious)s);
const HARMLESS = new Set(%(harmless)s);
const roots = [["globalThis", globalThis], ["import.meta", import.meta]];
for (const m of %(allowed)s) roots.push([`node:${m}`, await import(`node:${m}`)]);
// what Deno hands a custom inspector
console.log({ [Symbol.for("Deno.customInspect")](inspect, options) { roots.push(["customInspect", [inspect, options]]); return ""; } });
console.log({ [Symbol.for("nodejs.util.inspect.custom")](depth, options, inspect) { roots.push(["nodeInspect", [options, inspect]]); return ""; } });
// the results of the getters on globalThis and navigator (lazily created globals)
for (const [name, obj] of [["globalThis", globalThis], ["navigator", navigator]]) {
  for (const k of Reflect.ownKeys(obj)) {
    const d = Reflect.getOwnPropertyDescriptor(obj, k);
    if (d && d.get) { try { roots.push([`${name}.${String(k)}()`, d.get.call(obj)]); } catch { /* throws */ } }
  }
}
const seen = new WeakSet();
const hits = [];
const queue = roots.slice();
let visited = 0;
while (queue.length) {
  const [path, obj] = queue.shift();
  if (obj === null || (typeof obj !== "object" && typeof obj !== "function") || seen.has(obj)) continue;
  seen.add(obj);
  visited++;
  let keys = [];
  try { keys = Reflect.ownKeys(obj); } catch { /* revoked proxy */ }
  for (const k of keys) {
    const name = typeof k === "symbol" ? `[${String(k)}]` : k;
    if (typeof k === "string" && SUSPICIOUS.has(k)) hits.push(`${path}.${name}`);
    if (typeof k === "symbol" && /deno|internal|core/i.test(String(k)) && !HARMLESS.has(String(k))) hits.push(`${path}.${name}`);
    let d;
    try { d = Reflect.getOwnPropertyDescriptor(obj, k); } catch { continue; }
    if (!d) continue;
    if ("value" in d) queue.push([`${path}.${name}`, d.value]);
    if (d.get) queue.push([`${path}.get ${name}`, d.get]);
    if (d.set) queue.push([`${path}.set ${name}`, d.set]);
  }
  let proto = null;
  try { proto = Reflect.getPrototypeOf(obj); } catch { /* proxy */ }
  if (proto) queue.push([`${path}.__proto__`, proto]);
}
export default { visited, hits };
"""


async def test_no_deno_internals_are_reachable(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    lists = {"suspicious": SUSPICIOUS, "harmless": HARMLESS_SYMBOLS, "allowed": ALLOWED_NODE}
    scan = SCAN % {name: json.dumps(values) for name, values in lists.items()}
    result = await rt.eval(scan)
    assert result["visited"] > 1000  # the walk really went through the globals
    # URL.prototype.hostname and URLPattern.prototype.hostname are URL components, not os.hostname()
    assert [h for h in result["hits"] if not re.search(r"\.URL(Pattern)?(\(\))?\.prototype\.hostname$", h)] == []
    await assert_alive(rt)
    await rt.dispose()


async def test_deno_internal_symbols_ffi_and_bootstrap_are_unreachable(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    bootstrap = BOOTSTRAP.resolve().as_uri()
    result = await probe(
        rt,
        f"""
        await attempt("typeof_deno", () => [typeof Deno, typeof globalThis.Deno, typeof self.Deno, "Deno" in globalThis]);
        await attempt("internal_symbol", () => [typeof globalThis[Symbol.for("Deno.internal")],
                                                typeof globalThis[Symbol.for("Deno.core")]]);
        await attempt("deno_internal", () => Deno[Deno.internal]);
        await attempt("dlopen", () => Deno.dlopen("libc.so.6", {{ getpid: {{ parameters: [], result: "i32" }} }}));
        await attempt("global_symbols", () => Object.getOwnPropertySymbols(globalThis).map((s) => s.description));
        await attempt("bootstrap", async () => Reflect.ownKeys(await import({json.dumps(bootstrap)})).map(String));
        await attempt("main", async () => Reflect.ownKeys(await import("file:///dev/fd/3")).map(String));
        await attempt("main_fresh", async () => Object.keys(await import("file:///dev/fd/3?again")));
        await attempt("import_meta", () => ({{ keys: Reflect.ownKeys(import.meta).map(String),
                                               url: import.meta.url, main: import.meta.main }}));
        await attempt("wasm", () => typeof WebAssembly.instantiate);
        """
        + blocked_imports(["node:module", "module", "node:sea", "node:test"]),
    )
    assert result["typeof_deno"] == {"ok": True, "value": ["undefined", "undefined", "undefined", False]}
    assert result["internal_symbol"] == {"ok": True, "value": ["undefined", "undefined"]}
    rejected(result, "deno_internal", "Deno is not defined")
    rejected(result, "dlopen", "Deno is not defined")
    symbols = result["global_symbols"]["value"]
    assert all("Deno" not in (s or "") and "internal" not in (s or "") for s in symbols), symbols
    # the main module (bootstrap.js, read from an inherited descriptor) is cached: importing it again
    # yields its (empty) namespace, never a second run; the file itself is not readable
    assert result["main"] == {"ok": True, "value": ["Symbol(Symbol.toStringTag)"]}
    rejected(result, "main_fresh", NO_READ)
    rejected(result, "bootstrap", NO_READ)
    meta = result["import_meta"]["value"]
    assert set(meta["keys"]) <= {"url", "main", "resolve", "filename", "dirname"}
    assert meta["url"].startswith("blob:") and meta["main"] is False
    assert result["wasm"] == {"ok": True, "value": "function"}
    for name in ("node:module", "module", "node:sea", "node:test"):
        rejected(result, name, BLOCKED)
    await assert_alive(rt)
    await rt.dispose()


async def test_stack_frames_expose_no_internal_functions(conn: client.Connection) -> None:
    """V8 call sites of the bootstrap and Deno frames give neither their function nor their `this`."""
    rt = await conn.create_runtime()
    await rt.eval(
        """
        serve(() => {
          const frames = [];
          const saved = Error.prepareStackTrace;
          Error.prepareStackTrace = (e, sites) => {
            for (const s of sites) frames.push({ file: String(s.getFileName()), fn: typeof s.getFunction(),
                                                 self: typeof s.getThis() });
            return "";
          };
          try { new Error("probe").stack; } finally { Error.prepareStackTrace = saved; }
          return new Response(JSON.stringify(frames));
        });
        """
    )
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    frames = await resp.json()
    assert any(f["file"] == "/dev/fd/3" for f in frames), frames  # the walk saw bootstrap frames
    for f in frames:
        if not f["file"].startswith("blob:"):  # the guest's own frames may show the guest's own functions
            assert (f["fn"], f["self"]) == ("undefined", "undefined"), f
    await assert_alive(rt)
    await rt.dispose()


async def test_storage_is_not_shared_between_runtimes(conn: client.Connection) -> None:
    """`localStorage` is gone; a `new Storage()` the guest builds lives in its own process only."""
    a = await conn.create_runtime()
    b = await conn.create_runtime()
    src = """
        const s = new Storage();
        const before = s.getItem("secret");
        s.setItem("secret", "from A");
        export default { before, localStorage: typeof localStorage, sessionStorage: typeof sessionStorage };
    """
    assert await a.eval(src) == {"before": None, "localStorage": "undefined", "sessionStorage": "undefined"}
    assert await b.eval(src) == {"before": None, "localStorage": "undefined", "sessionStorage": "undefined"}
    await assert_alive(a)
    await asyncio.gather(a.dispose(), b.dispose())


# ---- native code, disk writes and the OS sandbox (issue 8, finding 7) --------------------------

#: Every web API in the global scope that could plausibly reach native code or the disk, exercised.
SWEEP = """
await attempt("gpu", async () => [typeof navigator.gpu, "gpu" in navigator, String(await navigator.gpu?.requestAdapter())]);
await attempt("gpu_classes", () => Object.getOwnPropertyNames(globalThis).filter((n) => n.startsWith("GPU")));
await attempt("canvas_webgpu", () => new OffscreenCanvas(4, 4).getContext("webgpu"));
await attempt("canvas_bitmap", () => typeof new OffscreenCanvas(4, 4).getContext("bitmaprenderer"));
await attempt("image_bitmap", async () => typeof await createImageBitmap(new ImageData(4, 4)));
await attempt("broadcast", () => { const b = new BroadcastChannel("x"); b.postMessage(1); b.close(); return true; });
await attempt("locks", async () => await navigator.locks.request("x", () => "locked"));
await attempt("storage", () => { const s = new Storage(); s.setItem("a", "b"); return s.getItem("a"); });
await attempt("cache_storage", () => typeof new CacheStorage());
await attempt("intl", () => new Intl.DateTimeFormat("ja-JP-u-ca-japanese", { timeZone: "Asia/Tokyo" }).format(0));
await attempt("temporal", () => typeof String(Temporal.Now.zonedDateTimeISO("Europe/Paris")));
await attempt("websocket", () => typeof new WebSocket("ws://127.0.0.1:9/"));
await attempt("eventsource", () => { new EventSource("http://127.0.0.1:9/").close(); return true; });
await attempt("compression", async () => (await new Response(new Blob(["x"]).stream()
  .pipeThrough(new CompressionStream("gzip"))).arrayBuffer()).byteLength > 0);
await attempt("subtle", async () => (await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true,
  ["sign"])).privateKey.type);
await attempt("wasm", async () => typeof await WebAssembly.compile(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0])));
"""


def guest_pids(broker: Any) -> set[int]:
    return set(children_of(broker.pid)) & deno_pids()


def mapped_libraries(pid: int) -> set[str]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split()[5] for line in maps.splitlines() if len(line.split()) > 5 and ".so" in line.split()[5]}


def proc_status(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return f.read()


def guest_home(pid: int) -> Path | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    homes = [e[5:].decode() for e in env if e.startswith(b"HOME=")]
    return Path(homes[0]) if homes else None


async def test_webgpu_is_gone_and_no_web_api_loads_native_code(conn: client.Connection, broker: Any) -> None:
    """navigator.gpu loaded LLVM and DRM drivers into the guest and wrote a shader cache under HOME.
    Now WebGPU is gone, and no web API the guest can reach maps a library an idle guest does not."""
    rt = await conn.create_runtime()

    def idle_libraries() -> set[str]:  # the guests alive now (pool processes come and go)
        libs: set[str] = set().union(*(mapped_libraries(p) for p in guest_pids(broker)))
        return libs if any("libc.so" in lib or "libc-" in lib for lib in libs) else set()

    before = await await_until(idle_libraries, "guest processes' memory maps could be read")
    result = await probe(rt, SWEEP)
    assert result["gpu"] == {"ok": True, "value": ["undefined", False, "undefined"]}
    assert result["gpu_classes"] == {"ok": True, "value": []}
    assert result["canvas_webgpu"] == {"ok": True, "value": None}
    # everything else still works as before, in-process
    assert result["canvas_bitmap"]["value"] == "object" and result["image_bitmap"]["value"] == "object"
    assert result["locks"]["value"] == "locked" and result["storage"]["value"] == "b"
    assert result["compression"]["value"] is True and result["subtle"]["value"] == "private"
    rejected(result, "cache_storage", "Illegal constructor")
    rejected(result, "websocket", "net access")
    after = {p: mapped_libraries(p) - before for p in guest_pids(broker)}
    assert {p: sorted(libs) for p, libs in after.items() if libs} == {}
    await assert_alive(rt)
    await rt.dispose()


async def test_each_guest_has_a_private_home_removed_when_it_ends(conn: client.Connection, broker: Any) -> None:
    """HOME, TMPDIR and the XDG dirs of each guest process are its own empty dir, gone after it ends."""
    rt = await conn.create_runtime()
    await assert_alive(rt)
    homes = {p: guest_home(p) for p in guest_pids(broker)}
    assert len(homes) >= 2 and None not in homes.values(), homes
    assert len(set(homes.values())) == len(homes), homes  # one per process, never shared
    real_home = Path.home().resolve()
    for home in homes.values():
        assert home is not None and home.is_dir() and not any(home.iterdir()), home
        assert home.stat().st_mode & 0o077 == 0 and real_home not in home.resolve().parents
    await rt.dispose()
    await await_until(lambda: any(guest_home(p) is None for p in homes), "the disposed runtime's process ended")
    gone = [p for p in homes if guest_home(p) is None]
    await await_until(lambda: all(not homes[p].exists() for p in gone), "its private dir was removed")  # type: ignore[union-attr]
    assert all(h.exists() for p, h in homes.items() if p not in gone)  # type: ignore[union-attr]


CONFINED = r"""
import ctypes, json, os, socket, sys
out = {}
def attempt(name, fn):
    try:
        out[name] = {"ok": True, "value": fn()}
    except OSError as e:
        out[name] = {"ok": False, "errno": e.errno}
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(nr, *args)
    if r < 0:
        raise OSError(ctypes.get_errno(), "")
    return r
def write(path):
    with open(path, "w") as f:
        f.write("x")
attempt("write_home", lambda: write(os.path.join(os.environ["HOME"], "f")))
attempt("write_tmp", lambda: write(sys.argv[1]))
attempt("mkdir_home", lambda: os.mkdir(os.path.join(os.environ["HOME"], "d")))
attempt("read", lambda: len(open("/etc/passwd").read()) > 0)
attempt("connect", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=2).close())
attempt("signal_parent", lambda: os.kill(int(sys.argv[3]), 0))
attempt("ptrace", lambda: call(101, 0, 0, 0, 0))  # PTRACE_TRACEME
attempt("bpf", lambda: call(321, 0, 0, 0))
attempt("unshare", lambda: call(272, 0x20000))  # CLONE_NEWNS
status = open("/proc/self/status").read()
out["no_new_privs"] = "NoNewPrivs:\t1" in status
out["seccomp"] = "Seccomp:\t2" in status
out["netns"] = os.readlink("/proc/self/ns/net")
print(json.dumps(out))
"""


async def test_a_confined_process_cannot_write_connect_signal_or_trace(tmp_path: Path) -> None:
    """The OS layers under every guest, tried directly: even an API that slipped through Deno's
    permissions could not write a file, open a socket, signal another process or trace one."""
    layers = sandbox.available()
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    target = tmp_path / "outside"
    me = os.getpid()
    async with Listener() as listener:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-S", "-c", CONFINED, str(target), str(listener.port), str(os.getpid()),
            env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, stdout=asyncio.subprocess.PIPE,
            preexec_fn=lambda: sandbox.confine(layers, me),
        )  # fmt: skip
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
        assert await listener.connections_before_ours() == 0
    result = json.loads(out)
    assert result["read"] == {"ok": True, "value": True}
    assert result["no_new_privs"] is True
    if layers.landlock:
        for name in ("write_home", "write_tmp", "mkdir_home"):
            assert result[name]["ok"] is False, (name, result[name])
        assert not target.exists() and not any(home.iterdir())
    if layers.landlock >= 6:
        assert result["signal_parent"]["ok"] is False
    if layers.netns or layers.landlock >= 4:
        assert result["connect"]["ok"] is False
    if layers.netns:
        assert result["netns"] != os.readlink("/proc/self/ns/net")
    if layers.seccomp:
        assert result["seccomp"] is True
        for name in ("ptrace", "bpf", "unshare"):
            assert result[name] == {"ok": False, "errno": 1}, (name, result[name])
    # on this project's Linux CI and dev hosts every layer is available: a missing one is a regression
    assert layers.netns and layers.landlock >= 6 and layers.seccomp, layers.describe()


async def test_guest_processes_run_confined(conn: client.Connection, broker: Any) -> None:
    """The real guests: no new privileges, a seccomp filter, their own network namespace."""
    rt = await conn.create_runtime()
    await assert_alive(rt)
    ours = os.readlink("/proc/self/ns/net")
    for pid in guest_pids(broker):
        status = proc_status(pid)
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status, pid
        assert os.readlink(f"/proc/{pid}/ns/net") != ours, pid
    await rt.dispose()


# ---- heads read through intrinsics (issue 8, finding 8: the bootstrap's part) -------------------

#: Guest code that patches everything a head could be read through, after Deno validated it.
FORGE_HEADS = r"""
function* forged() { yield ["Transfer-Encoding ", "chunked"]; yield ["x-evil", "a\r\nInjected: 1"]; }
Headers.prototype[Symbol.iterator] = forged;
Headers.prototype.entries = forged;
Headers.prototype.forEach = function (cb, self) { for (const [k, v] of forged()) cb.call(self, v, k, this); };
Object.defineProperty(Request.prototype, "method", { get: () => "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\nGET" });
Object.defineProperty(Request.prototype, "url", { get: () => "http://evil.test/\r\nX: y" });
Object.defineProperty(Request.prototype, "headers", { get: () => new Headers({ "x-other": "1" }) });
Object.defineProperty(Response.prototype, "status", { get: () => 999 });
Object.defineProperty(Response.prototype, "statusText", { get: () => "OK\r\nX-Injected: 1" });
Object.defineProperty(Response.prototype, "headers", { get: () => ({ [Symbol.iterator]: forged }) });
const slice = String.prototype.slice;
String.prototype.slice = function (...a) { return this.startsWith("Created") ? "OK\r\nX: 1" : slice.apply(this, a); };
"""


async def test_patched_prototypes_cannot_forge_the_heads_the_guest_sends(conn: client.Connection) -> None:
    """Heads go out exactly as Deno validated them, whatever the guest patched afterwards."""
    seen: list[client.Request] = []

    async def on_fetch(req: client.Request) -> client.Response:
        seen.append(req)
        return client.Response(200, [("content-type", "text/plain")], await req.read())

    rt = await conn.create_runtime(fetch=on_fetch)
    await rt.eval(
        """
        const req = new Request("http://api.test/v1", { method: "POST", headers: { "x-real": "1" }, body: "up" });
        const res = new Response("made", { status: 201, statusText: "Created", headers: { "x-real": "2" } });
        """
        + FORGE_HEADS
        + """
        serve(async () => {
          const r = await fetch(req);
          const own = new Response(await r.text(), { status: 201, statusText: "Created", headers: { "x-real": "2" } });
          Object.defineProperty(own, "status", { value: 999 });
          return own;
        });
        """
    )
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert (resp.status, resp.status_text, await resp.text()) == (201, "Created", "up")
    assert [(k, v) for k, v in resp.headers.items() if k.startswith("x-")] == [("x-real", "2")]
    [req] = seen
    assert (req.method, req.url, await req.read()) == ("POST", "http://api.test/v1", b"up")
    assert [(k, v) for k, v in req.headers.items() if k.startswith("x-")] == [("x-real", "1")]
    await rt.dispose()
