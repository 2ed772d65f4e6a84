"""Issue 10, section 1: host tools, with real runtimes (broker, daemon, Deno) and real tool functions.

The guest calls ``await tools.<name>(...)``; values cross with the one marshalling both ways; an
async generator tool streams its items on a pipe with backpressure, stops when the guest breaks
out of its loop, and fails after the items before its failure. What the guest sees of a host
failure is chosen (ToolError) or generic: never a host exception's class, text or path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

import client
from client.tools import check_tools
from tests.conftest import await_until
from wire import guest as G
from wire import messages as M
from wire import tools as T

SECRET = "s3cr3t-/home/host/app/tools.py"


class HostBug(Exception):
    pass


async def idle(rt: client.Runtime) -> dict[str, dict[str, int]]:
    """The runtime's stats once every hop has nothing in flight (tool calls, streams, tasks)."""

    async def quiet() -> Any:
        s = await rt.stats()
        busy = (
            s["client"]["tools"] + s["client"]["tasks"] + s["client"]["bodies"] + s["daemon"]["tools"]
            + s["daemon"]["inbound"] + s["daemon"]["outbound"] + s["daemon"]["callbacks"] + s["guest"]["tools"]
            + s["guest"]["inbound"] + s["guest"]["outbound"]
        )  # fmt: skip
        return s if busy == 0 else None

    return await await_until(quiet, "every hop has no tool call, stream or task in flight", timeout=15)


# ---- names ------------------------------------------------------------------------------------------


async def test_tool_names_and_kinds_are_refused_before_anything_is_sent(conn: client.Connection) -> None:
    async def ok() -> None: ...

    def plain() -> None: ...

    before = conn._ids
    for name in (
        "fetch",
        "console",
        "Object",
        "tools",
        "toString",
        "then",
        "Deno",
        "serve",
        "1st",
        "a-b",
        "",
        "x" * 65,
    ):
        with pytest.raises(ValueError, match="tool name"):
            await conn.create_runtime(tools={name: ok})
    with pytest.raises(TypeError, match="async def"):
        await conn.create_runtime(tools={"plain": plain})
    with pytest.raises(TypeError, match="async def"):
        await conn.create_runtime(tools={"lam": lambda: 1})
    with pytest.raises(ValueError, match="timeout"):
        client.tool(ok, timeout=0)
    assert conn._ids == before, "a refused tool name must be refused before any request is sent"
    # the daemon checks too (a client that skipped the check)
    with pytest.raises(client.RequestRejected, match="would shadow"):
        await conn.call(lambda id_: M.CreateRuntime(id=id_, tools=("fetch",)), M.CreateOk)


async def test_guest_globals_list_is_the_guests_and_tools_is_frozen(conn: client.Connection) -> None:
    async def search(q: Any) -> Any:
        return q

    async with await conn.create_runtime(tools={"search": search}) as rt:
        got = await rt.eval("""
            const names = Object.getOwnPropertyNames(globalThis);
            let replaced = true;
            try { tools.search = () => 1; } catch { replaced = false; }
            let added = true;
            try { tools.other = () => 1; } catch { added = false; }
            export default { names, frozen: Object.isFrozen(tools), replaced, added,
              still: await tools.search("x"), keys: Object.keys(tools), typ: typeof tools.search };
        """)
    unknown = set(got["names"]) - T.GUEST_GLOBALS - T.RESERVED
    assert not unknown, f"guest globals missing from wire/tools.py GUEST_GLOBALS: {sorted(unknown)}"
    assert got["frozen"] and not got["replaced"] and not got["added"] and got["still"] == "x"
    assert got["keys"] == ["search"] and got["typ"] == "function"


# ---- calls ------------------------------------------------------------------------------------------


async def test_tool_call_values_errors_and_timeouts(conn: client.Connection, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []

    async def search(query: dict[str, Any], limit: int = 10) -> Any:
        seen.append((query, limit))
        return {"hits": [query["q"], limit], "raw": b"\x00\xff", "big": 2**70, "at": datetime(2024, 1, 2, tzinfo=UTC)}

    async def refuse(why: str) -> None:
        raise client.ToolError(f"no: {why}", name="PermissionError")

    async def broken() -> None:
        raise HostBug(f"database at {SECRET} is down")

    async def slow() -> None:
        await asyncio.sleep(30)

    async def hang() -> None:
        await asyncio.sleep(30)

    async def bad_result() -> Any:
        return {1, 2}

    tools = {"search": search, "refuse": refuse, "broken": broken, "slow": client.tool(slow, timeout=0.3),
             "hang": client.tool(hang, timeout=1.5), "bad_result": bad_result}  # fmt: skip
    caplog.set_level(logging.WARNING, logger="sandbox_mesh.client.runtime")
    async with await conn.create_runtime(tools=tools, tool_timeout=20) as rt:
        got = await rt.eval("""
            const r = await tools.search({q: "x", n: 2n ** 65n}, 3);
            const catchIt = async (p) => { try { await p; return "resolved"; }
              catch (e) { return {name: e.name, message: e.message, str: String(e), stack: String(e.stack)}; } };
            let sendFn = null;
            try { await tools.search({q: () => 1}); } catch (e) { sendFn = [e.name, e.message]; }
            export default {
              hits: r.hits, raw: r.raw instanceof Uint8Array ? [...r.raw] : null, big: typeof r.big,
              at: r.at instanceof Date ? r.at.toISOString() : null,
              refuse: await catchIt(tools.refuse("private")), broken: await catchIt(tools.broken()),
              slow: await catchIt(tools.slow()), bad: await catchIt(tools.bad_result()), sendFn,
            };
        """)
        assert seen[0] == ({"q": "x", "n": 2**65}, 3), "positional arguments map to the function's, values intact"
        assert got["hits"] == ["x", 3] and got["raw"] == [0, 255] and got["big"] == "bigint"
        assert got["at"] == "2024-01-02T00:00:00.000Z"
        assert got["refuse"]["name"] == "PermissionError" and got["refuse"]["message"] == "no: private"
        assert got["broken"]["name"] == "Error" and got["broken"]["message"] == "tools.broken failed"
        assert got["bad"]["message"] == "tools.bad_result failed"
        assert got["slow"]["name"] == "TimeoutError" and "tools.slow timed out after 0.3s" in got["slow"]["message"]
        assert got["sendFn"][0] == "TypeError" and "tools.search: arguments[0].q is a function" in got["sendFn"][1]
        for what in ("broken", "bad", "slow"):
            text = repr(got[what])
            assert "HostBug" not in text and SECRET not in text and ".py" not in text and "set" not in text, text
        # the host has the whole story, with the traceback
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "HostBug" in logged and SECRET in logged and "Traceback" in logged
        # a hanging call is in flight on every hop, and counted; its timeout ends it everywhere
        await rt.eval("globalThis.pending = tools.hang().catch((e) => e.name);")
        s = await rt.stats()
        assert s["client"]["tools"] == 1 and s["daemon"]["tools"] == 1 and s["guest"]["tools"] == 1
        await idle(rt)
        assert await rt.eval("export default await globalThis.pending") == "TimeoutError"


async def test_tool_call_bound_and_stats_return_to_zero(conn: client.Connection) -> None:
    gate = asyncio.Event()

    async def wait(i: int) -> int:
        async with asyncio.timeout(30):
            await gate.wait()
        return i

    async with await conn.create_runtime(tools={"wait": wait}) as rt:
        await rt.eval(f"""
            globalThis.calls = [];
            for (let i = 0; i < {G.MAX_PENDING_TOOLS}; i++) calls.push(tools.wait(i));
            globalThis.over2 = await tools.wait(-1).then(() => "resolved", (e) => e.message);
        """)
        s = await rt.stats()
        assert s["guest"]["tools"] == G.MAX_PENDING_TOOLS == s["daemon"]["tools"]
        await await_until(
            lambda: rt._tool_calls == G.MAX_PENDING_TOOLS, "every call is being served by the host", timeout=10
        )
        over = await rt.eval("export default globalThis.over2")
        assert f"{G.MAX_PENDING_TOOLS} tool calls pending" in over
        gate.set()
        total = await rt.eval("export default (await Promise.all(calls)).reduce((a, b) => a + b, 0)")
        assert total == sum(range(G.MAX_PENDING_TOOLS))
        await idle(rt)


# ---- streamed tools -----------------------------------------------------------------------------------


async def test_stream_tool_items_bytes_and_failure_after_items(conn: client.Connection) -> None:
    async def rows(n: int) -> AsyncIterator[Any]:
        for i in range(n):
            yield {"i": i}

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"hello ", b"streamed ", b"world"):
            yield part

    async def flaky() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise HostBug(SECRET)

    async def told() -> AsyncIterator[int]:
        yield 1
        raise client.ToolError("quota reached", name="QuotaError")

    async with await conn.create_runtime(tools={"rows": rows, "chunks": chunks, "flaky": flaky, "told": told}) as rt:
        got = await rt.eval("""
            const seen = [];
            for await (const row of tools.rows(5)) seen.push(row.i);
            const text = await new Response(tools.chunks()).text();
            const drain = async (it) => { const items = []; try { for await (const x of it) items.push(x); }
              catch (e) { return {items, name: e.name, message: e.message}; } return {items}; };
            export default { seen, text, flaky: await drain(tools.flaky()), told: await drain(tools.told()),
              isStream: tools.rows(1) instanceof ReadableStream };
        """)
        assert got["seen"] == [0, 1, 2, 3, 4]
        assert got["text"] == "hello streamed world", "bytes items pipe into a Response"
        assert got["flaky"] == {"items": [1, 2], "name": "Error", "message": "tools.flaky failed"}
        assert got["told"] == {"items": [1], "name": "QuotaError", "message": "quota reached"}
        assert got["isStream"]
        await idle(rt)


async def test_stream_tool_backpressure_and_break_closes_the_generator(conn: client.Connection) -> None:
    produced = 0
    closed_at: list[float] = []
    item = b"x" * (32 * 1024)

    async def rows() -> AsyncIterator[bytes]:
        nonlocal produced
        try:
            for _ in range(2000):  # 64 MB if nothing held it back
                produced += 1
                yield item
        finally:
            closed_at.append(time.monotonic())

    async with await conn.create_runtime(tools={"rows": rows}) as rt:
        await rt.eval("""
            globalThis.it = tools.rows()[Symbol.asyncIterator]();
            await it.next();  // one item read, then the guest stops reading
        """)

        # the producer stalls: its count stops growing, far below what it would make unchecked
        async def stalled() -> bool:
            before = produced
            await asyncio.sleep(0.5)  # a window to see that nothing more is produced
            return produced == before

        await await_until(stalled, "the generator stalls behind the guest that stopped reading")
        assert produced < 400, f"a guest that stops reading must stall the generator ({produced} items produced)"
        print(f"stalled at {produced} items of 32 KiB")
        broke = time.monotonic()
        await rt.eval("await it.return();")  # what `break` in for-await does
        await await_until(lambda: closed_at, "the generator's finally ran", timeout=10)
        assert closed_at[0] - broke < 2.0, f"aclose took {closed_at[0] - broke:.3f}s"
        print(f"the generator's finally ran {(closed_at[0] - broke) * 1000:.1f} ms after the guest's break")
        assert produced < 400
        await idle(rt)
        # cancelled before any answer (tool_abort; its cancel may overtake the call): nothing lingers
        await rt.eval("for (let i = 0; i < 20; i++) await tools.rows().cancel();")
        await idle(rt)


async def test_a_guest_that_patches_stream_readers_still_gets_every_item(conn: client.Connection) -> None:
    """The bootstrap reads a streamed tool's items through methods it captured: a guest's patched
    getReader/read cannot fail the stream it iterates, which left the items' own stream (and the
    host's generator) open, out of the guest's reach, for the runtime's life."""

    async def rows(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with await conn.create_runtime(tools={"rows": rows}) as rt:
        got = await rt.eval("""
            ReadableStream.prototype.getReader = () => { throw new Error("patched getReader"); };
            ReadableStreamDefaultReader.prototype.read = () => { throw new Error("patched read"); };
            const seen = [];
            for await (const i of tools.rows(5)) seen.push(i);
            export default seen;
        """)
        assert got == [0, 1, 2, 3, 4]
        await idle(rt)


async def test_stream_argument_reaches_the_tool_as_a_body(conn: client.Connection) -> None:
    async def count(label: str, body: client.Body, extra: bytes) -> Any:
        total = 0
        async for chunk in body:
            total += len(chunk)
        return {"label": label, "total": total, "extra": len(extra)}

    async with await conn.create_runtime(tools={"count": count}) as rt:
        got = await rt.eval("""
            let n = 0;
            const stream = new ReadableStream({ pull(c) {
              if (n++ < 40) c.enqueue(new Uint8Array(100000)); else c.close(); } });
            export default await tools.count("up", stream, new Uint8Array(7));
        """)
        assert got == {"label": "up", "total": 4_000_000, "extra": 7}
        await idle(rt)


# ---- the fetch callback follows the same rule -------------------------------------------------------


async def test_a_failing_fetch_callback_shows_the_guest_a_generic_error(conn: client.Connection) -> None:
    async def fetch(request: client.Request) -> client.Response:
        raise ConnectionError(f"Cannot connect to host 127.0.0.1:1 ({SECRET})")

    async with await conn.create_runtime(fetch=fetch) as rt:
        got = await rt.eval("""
            try { await fetch("http://127.0.0.1:1/"); } catch (e) { globalThis.e = e; }
            export default { name: e.name, message: e.message, stack: String(e.stack) };
        """)
    assert got["name"] == "TypeError" and got["message"] == "fetch failed"
    assert "ConnectionError" not in repr(got) and SECRET not in repr(got) and "127.0.0.1:1" not in got["message"]


async def test_a_host_body_failing_midway_shows_the_guest_a_generic_error(
    conn: client.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The same rule for the bodies the host produces: a fetch callback's response body, and a
    dispatched request's body, that fail after some chunks give the guest those chunks, then an
    error that names no host exception (it is logged on the host with its traceback)."""

    async def failing() -> AsyncIterator[bytes]:
        yield b"first "
        raise HostBug(f"disk on fire at {SECRET}")

    async def fetch(request: client.Request) -> client.Response:
        return client.Response(200, body=failing())

    caplog.set_level(logging.ERROR, logger="sandbox_mesh.client.runtime")
    async with await conn.create_runtime(fetch=fetch) as rt:
        got = await rt.eval("""
            const read = async (body) => { const reader = body.getReader(); let text = "";
              try { for (;;) { const r = await reader.read(); if (r.done) return text; text += new TextDecoder().decode(r.value); } }
              catch (e) { return [text, e.name, e.message, String(e.stack)]; } };
            serve(async (req) => Response.json(await read(req.body)));
            export default await read((await fetch("http://upstream/")).body);
        """)
        response = await rt.dispatch_request(client.Request("POST", "http://in/", [], failing()))
        dispatched = json.loads(await response.read())
    for text, name, message, stack in (got, dispatched):
        assert text == "first " and name == "TypeError" and message == "the host's body failed", (text, message)
        assert "HostBug" not in stack and SECRET not in stack
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count("HostBug") >= 1 and SECRET in logged and "Traceback" in logged


def test_check_tools_accepts_async_callables_and_tool_wrappers() -> None:
    class Search:
        async def __call__(self, q: str) -> str:
            return q

    async def gen() -> AsyncIterator[int]:
        yield 1

    got = check_tools({"search": Search(), "gen": client.tool(gen, timeout=2)})
    assert not got["search"].stream and got["gen"].stream and got["gen"].timeout == 2


async def test_the_tools_demo_streams_its_answer_through_aiohttp(conn: client.Connection) -> None:
    from scripts import tools_demo

    events = await tools_demo.demo(conn, "how do host tools work")
    texts = [e for _, e in events]
    assert texts[0] == 'event: sources\ndata: ["Sandboxes","Tools"]', "the search tool's documents, by title"
    assert texts[-1].startswith("event: done"), texts
    answer = "".join(json.loads(e[len("data: ") :]) for e in texts if e.startswith("data: "))
    assert answer.startswith("Q: how do host tools work. A: Each runtime is a Deno process")
    assert answer.strip().endswith("Host tools are async Python functions the guest awaits.")
    # streamed as produced (50 ms apart), not all at once at the end
    times = [t for t, e in events if e.startswith("data: ")]
    assert times[-1] - times[0] > 0.3, f"the tokens arrived together: {times}"


async def test_a_named_runtime_resumed_elsewhere_gets_that_connections_tools(
    broker: Any, conn: client.Connection
) -> None:
    async def old(x: int) -> str:
        return f"old {x}"

    async def new(x: int) -> str:
        return f"new {x}"

    rt = await conn.create_runtime(name="tooled", keep_alive=10, tools={"lookup": old})
    assert await rt.eval("export default await tools.lookup(1)") == "old 1"
    async with client.connect(broker.frontend, session=conn.session, timeout=15) as other:
        with pytest.raises(TypeError, match="async def"):
            await other.runtime("tooled", tools={"lookup": lambda x: x})
        again = await other.runtime("tooled", tools={"lookup": new})
        assert await again.eval("export default await tools.lookup(2)") == "new 2"
        # a tool this connection does not serve: the guest gets the generic error, not a hang
        bare = await client.connect(broker.frontend, session=conn.session, timeout=15)
        try:
            third = await bare.runtime("tooled")
            got = await third.eval("export default await tools.lookup(3).catch((e) => e.message)")
            assert got == "tools.lookup failed"
            await third.dispose()
        finally:
            await bare.close()


async def test_a_connection_that_closes_mid_stream_ends_its_streams_in_the_kept_runtime(broker: Any) -> None:
    """A named runtime outlives its connection: a tool's item stream (and a fetch callback's
    response body) that connection was producing must end for the guest when it closes (an error
    after the items sent), not leave the guest's read, the daemon's pipe and the stats waiting for
    bytes that will never come."""
    closed: list[str] = []

    async def rows() -> AsyncIterator[int]:
        try:
            for i in range(10**6):
                yield i
        finally:
            closed.append("rows")

    async def fetch(request: client.Request) -> client.Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * 1024
            finally:
                closed.append("fetch")

        return client.Response(200, body=body())

    async with client.connect(broker.frontend) as first:
        rt = await first.create_runtime(name="kept", keep_alive=30, tools={"rows": rows}, fetch=fetch)
        await rt.eval("""
            const drain = async (it) => { try { for (;;) { if ((await it.next()).done) return "done"; } }
              catch (e) { return `${e.name}: ${e.message}`; } };
            const items = tools.rows()[Symbol.asyncIterator]();
            await items.next();
            const body = (await fetch("http://upstream/")).body[Symbol.asyncIterator]();
            await body.next();
            globalThis.ends = { items: null, body: null };
            drain(items).then((e) => { ends.items = e; });
            drain(body).then((e) => { ends.body = e; });
        """)
        session = first.session
    assert sorted(closed) == ["fetch", "rows"]
    async with client.connect(broker.frontend, session=session) as second:
        again = await second.runtime("kept")
        ends = await await_until(
            lambda: again.eval("export default ends.items && ends.body ? ends : null"),
            "the guest's reads of the gone connection's streams ended",
            timeout=10,
        )
        assert ends == {"items": "TypeError: the body was cancelled", "body": "TypeError: the body was cancelled"}
        s = await idle(again)
        assert s["daemon"]["open_pipes"] == 0
        await again.dispose()
