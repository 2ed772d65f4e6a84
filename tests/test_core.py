"""Issue 2: eval, serve() dispatch, fetch and console callbacks, through real processes."""

from __future__ import annotations

import asyncio

import pytest

import client


async def test_eval_returns_default_export_and_runs_top_level_await(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    value = await rt.eval("const x = await Promise.resolve(20); export default { sum: x + 22, s: 'ok' };")
    assert value == {"sum": 42, "s": "ok"}
    # module state persists on globalThis between evals
    await rt.eval("globalThis.counter = 5;")
    assert await rt.eval("export default globalThis.counter * 2;") == 10
    await rt.dispose()


async def test_guest_exception_raises_guest_error_with_stack(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    with pytest.raises(client.GuestError) as info:
        await rt.eval("function deep() { throw new RangeError('out of range: 7'); }\ndeep();")
    err = info.value
    assert err.name == "RangeError"
    assert err.message == "out of range: 7"
    assert "deep" in err.stack and "RangeError: out of range: 7" in err.stack
    assert isinstance(err, client.Error)
    with pytest.raises(client.GuestError) as info:
        await rt.eval("throw 'a plain string'")
    assert "a plain string" in info.value.message
    with pytest.raises(client.GuestError) as info:
        await rt.eval("this is not javascript")
    assert info.value.name == "SyntaxError"
    # the runtime keeps working after guest errors
    assert await rt.eval("export default 1") == 1
    await rt.dispose()


async def test_serve_dispatch_status_headers_and_body(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    await rt.eval(
        """
        serve({
          async fetch(req) {
            const body = await req.text();
            const headers = new Headers({ "content-type": "application/json", "x-method": req.method });
            headers.append("set-cookie", "a=1");
            headers.append("set-cookie", "b=2");
            return new Response(JSON.stringify({ url: req.url, body, auth: req.headers.get("authorization") }),
                                { status: 201, statusText: "Made", headers });
          }
        });
        """
    )
    resp = await rt.dispatch_request(
        client.Request("POST", "http://example.test/path?q=1", {"authorization": "Bearer t"}, b"payload")
    )
    assert resp.status == 201
    assert resp.status_text == "Made"
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-method"] == "POST"
    assert resp.headers.getall("set-cookie") == ["a=1", "b=2"]
    assert await resp.json() == {"url": "http://example.test/path?q=1", "body": "payload", "auth": "Bearer t"}
    await rt.dispose()


async def test_serve_accepts_a_bare_function_and_promises(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    await rt.eval(
        "serve(async (req) => { await new Promise(r => setTimeout(r, 10)); return new Response(null, {status: 204}); })"
    )
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert resp.status == 204
    assert await resp.read() == b""
    await rt.dispose()


async def test_dispatch_without_handler_and_handler_errors(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    with pytest.raises(client.NoHandler):
        await rt.dispatch_request(client.Request("GET", "http://x/"))
    await rt.eval("serve({ fetch() { throw new TypeError('handler broke'); } })")
    with pytest.raises(client.GuestError) as info:
        await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert info.value.name == "TypeError" and info.value.message == "handler broke"
    await rt.eval("serve(() => 'not a response')")
    with pytest.raises(client.GuestError) as info:
        await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert "Response" in info.value.message
    await rt.dispose()


async def test_guest_fetch_reaches_the_client_callback(conn: client.Connection) -> None:
    seen: list[client.Request] = []

    async def on_fetch(req: client.Request) -> client.Response:
        seen.append(req)
        body = await req.read()
        return client.Response(
            202,
            [("content-type", "text/plain"), ("set-cookie", "x=1"), ("set-cookie", "y=2")],
            b"echo:" + body,
            status_text="Accepted",
        )

    rt = await conn.create_runtime(fetch=on_fetch)
    result = await rt.eval(
        """
        const r = await fetch("https://api.example.test/v1?k=v", {
          method: "PUT", headers: { "x-key": "abc" }, body: "up" });
        export default { status: r.status, statusText: r.statusText, text: await r.text(),
                         cookies: r.headers.getSetCookie(), url: r.url, tee: typeof r.body };
        """
    )
    assert result == {
        "status": 202,
        "statusText": "Accepted",
        "text": "echo:up",
        "cookies": ["x=1", "y=2"],
        "url": "https://api.example.test/v1?k=v",
        "tee": "object",
    }
    assert seen[0].method == "PUT"
    assert seen[0].url == "https://api.example.test/v1?k=v"
    assert seen[0].headers["x-key"] == "abc"
    await rt.dispose()


async def test_fetch_callback_failure_rejects_with_type_error(conn: client.Connection) -> None:
    async def on_fetch(req: client.Request) -> client.Response:
        raise ConnectionRefusedError("upstream refused")

    rt = await conn.create_runtime(fetch=on_fetch)
    result = await rt.eval(
        "let e; try { await fetch('http://x/'); } catch (err) { e = err; }\n"
        "export default { name: e.name, message: e.message };"
    )
    assert result["name"] == "TypeError"
    assert "upstream refused" in result["message"]
    await rt.dispose()


async def test_fetch_without_callback_rejects_with_clear_type_error(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    result = await rt.eval(
        "let e; try { await fetch('http://x/'); } catch (err) { e = err; }\n"
        "export default { name: e.name, message: e.message };"
    )
    assert result["name"] == "TypeError"
    assert "no fetch callback" in result["message"]
    await rt.dispose()


async def test_console_entries_reach_the_callback(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    await rt.eval("console.log('hello', 42, {a: [1, 2]}); console.warn('careful'); console.error(new Error('bad'));")
    await rt.eval("export default 0")  # console entries travel before the eval reply, in order
    assert [e.level for e in entries] == ["log", "warn", "error"]
    assert entries[0].args == ["hello", "42", "{ a: [ 1, 2 ] }"]
    assert entries[1].text == "careful"
    assert "Error: bad" in entries[2].args[0]
    await rt.dispose()


async def test_unhandled_rejection_is_reported_not_fatal(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    rt = await conn.create_runtime(console=entries.append)
    await rt.eval("Promise.reject(new Error('nobody listens')); await new Promise(r => setTimeout(r, 20));")
    assert await rt.eval("export default 'alive'") == "alive"
    assert any("nobody listens" in e.text for e in entries)
    await rt.dispose()


async def test_calls_after_dispose_fail_clearly(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    await rt.dispose()
    with pytest.raises(client.RuntimeLost):
        await rt.eval("1")


async def test_many_runtimes_concurrently(conn: client.Connection) -> None:
    rts = await asyncio.gather(*(conn.create_runtime() for _ in range(8)))
    values = await asyncio.gather(*(rt.eval(f"export default {i} * 3") for i, rt in enumerate(rts)))
    assert values == [i * 3 for i in range(8)]
    assert len({rt.id for rt in rts}) == 8
    await asyncio.gather(*(rt.dispose() for rt in rts))


async def test_legitimate_but_awkward_guest_values_never_break_the_runtime(conn: client.Connection) -> None:
    """Values that are legal JS but awkward for the wire (lone surrogates, huge integers, huge
    results or log lines, oversized heads) give clear errors or clean values, never a dead runtime."""
    entries: list[client.ConsoleEntry] = []

    async def never_called(_req: client.Request) -> client.Response:
        raise AssertionError("the oversized fetch is refused before it reaches the host")

    rt = await conn.create_runtime(console=entries.append, fetch=never_called)
    assert await rt.eval("export default 1e20") == 1e20
    assert await rt.eval("export default '\\ud800x'") == "\ufffdx"
    await rt.eval("console.log('\\ud800', 'x'.repeat(200000))")
    await rt.eval("export default 0")
    assert entries[0].args[0] == "\ufffd"
    assert len(entries[0].text) < 64 * 1024 and entries[0].args[1].endswith("[truncated]")
    with pytest.raises(client.GuestError) as info:
        await rt.eval("export default 'y'.repeat(1000000)")
    assert info.value.name == "RangeError" and "too large" in info.value.message
    result = await rt.eval(
        "let e; try { await fetch('http://x/' + 'a'.repeat(100000)); } catch (err) { e = err; }\n"
        "export default [e.name, e.message];"
    )
    assert result[0] == "TypeError" and "limit" in result[1]
    await rt.eval("serve(() => new Response(new ReadableStream({ start(c) { c.error(new Error('early')); } })))")
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    with pytest.raises(client.StreamError, match="early"):
        await resp.read()
    await rt.eval(
        "serve(() => new Response(new ReadableStream({ async pull(c) { await null; c.error(new Error('\\ud800 bad')); } })))"
    )
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    with pytest.raises(client.StreamError, match="\ufffd bad"):
        await resp.read()
    with pytest.raises(client.GuestError) as info:
        await rt.eval("throw new Error('z'.repeat(600000))")
    assert info.value.message.endswith("[truncated]") and len(info.value.message) < 20000
    # within the bootstrap's character limits, but many bytes once escaped or encoded
    with pytest.raises(client.GuestError) as info:
        await rt.eval("throw new Error('€'.repeat(16000))")
    assert info.value.message.startswith("€€€")
    with pytest.raises(client.GuestError) as info:  # 40000 characters, 80000 bytes marshalled
        await rt.eval("export default 'é'.repeat(40000)")
    assert info.value.name == "RangeError" and "80002 bytes marshalled" in info.value.message
    await rt.eval("console.log('\\x01'.repeat(16000))")
    await rt.eval("serve(() => new Response('ok', { headers: { 'x-big': '\\x01'.repeat(20000) } }))")
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert (resp.status, await resp.read()) == (200, b"ok")
    assert await rt.eval("export default 'alive'") == "alive"
    await rt.dispose()


async def test_a_console_flood_is_rate_limited_and_spares_other_runtimes(conn: client.Connection) -> None:
    entries: list[client.ConsoleEntry] = []
    flood = await conn.create_runtime(console=entries.append)
    other = await conn.create_runtime()
    await flood.eval(
        "globalThis.stop = false; (async () => { while (!globalThis.stop) {"
        " for (let i = 0; i < 1000; i++) console.log('x'.repeat(1000)); await new Promise(r => setTimeout(r, 0)); } })();"
    )
    t0 = asyncio.get_running_loop().time()
    for _ in range(10):  # the other runtime answers promptly throughout
        assert await asyncio.wait_for(other.eval("export default 1"), 5) == 1
        await asyncio.sleep(0.2)  # the scenario: probe at intervals while the flood runs (not a wait)
    elapsed = asyncio.get_running_loop().time() - t0
    await flood.eval("globalThis.stop = true;")
    assert len(entries) <= 250 * (elapsed + 1)
    assert any("console entries dropped" in e.text for e in entries)
    await flood.dispose()
    await other.dispose()


async def test_a_sub_millisecond_eval_timeout_is_rounded_up_not_refused(conn: client.Connection) -> None:
    """A positive limit below 1 ms must reach the daemon as 1 ms (it refuses 0 as malformed)."""
    rt = await conn.create_runtime(eval_timeout=0.0004)
    with pytest.raises(client.Timeout):
        await rt.eval("while (true) {}")
    rt2 = await conn.create_runtime()
    with pytest.raises(client.Timeout):
        await rt2.eval("while (true) {}", timeout=0.0004)
