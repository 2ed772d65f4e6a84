"""Issue 3: every body streams, in all four directions, with backpressure, cancel and errors."""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import client
from scripts.kit.drain import in_flight
from scripts.kit.upstream import BLOCK, JS_HELPERS, Upstream, stream_crc
from tests.conftest import Broker, Daemon, await_until, create_when_ready

MiB = 1 << 20


async def assert_nothing_left(rt: client.Runtime, timeout: float = 15.0) -> None:
    """Every stream, socket, reader and task of the runtime is gone, on every hop (polls: cleanup
    after a cancel is asynchronous)."""
    left = await in_flight(rt, timeout)
    assert not left, f"left behind: {left}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = await Upstream().start()
    yield u
    await u.stop()


async def serve_runtime(rt: client.Runtime) -> tuple[web.AppRunner, str]:
    """An aiohttp server in front of the runtime (the end client talks to this)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", client.aiohttp_handler(rt))
    runner = web.AppRunner(app, handler_cancellation=True)  # aiohttp_handler relies on it
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def front():
    runners: list[web.AppRunner] = []

    async def make(rt: client.Runtime) -> str:
        runner, url = await serve_runtime(rt)
        runners.append(runner)
        return url

    yield make
    for r in runners:
        await r.cleanup()


PASSTHROUGH = """
serve({ async fetch(req) {
  const u = new URL(req.url);
  const up = await fetch(UPSTREAM + "/sse?n=8&gap=0.1&type=text/event-stream&key=" + u.searchParams.get("key"));
  const mode = u.searchParams.get("mode");
  globalThis.teeType = typeof up.body.tee;
  let body = up.body;
  if (mode === "tee") {
    const [a, b] = up.body.tee();
    globalThis.consumed = 0;
    (async () => { for await (const c of b) globalThis.consumed += c.length; })();
    body = a;
  } else if (mode === "transform") {
    body = up.body.pipeThrough(new TransformStream({ transform(chunk, c) { c.enqueue(chunk); } }));
  } else if (mode === "reenqueue") {
    const reader = up.body.getReader();
    body = new ReadableStream({ async pull(c) {
      const { done, value } = await reader.read();
      if (done) c.close(); else c.enqueue(new TextEncoder().encode(new TextDecoder().decode(value)));
    } });
  }
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
} });
"""


@pytest.mark.parametrize("mode", ["plain", "tee", "transform", "reenqueue"])
async def test_llm_stream_chunks_arrive_as_produced(conn, upstream, front, mode) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    await rt.eval(f"const UPSTREAM = {upstream.url!r};\n" + PASSTHROUGH.replace("UPSTREAM", repr(upstream.url)))
    url = await front(rt)
    arrivals = []
    received = 0
    async with aiohttp.ClientSession() as s, s.get(f"{url}/chat?mode={mode}&key={mode}") as r:
        assert r.status == 200
        t0 = time.monotonic()
        buf = b""
        async for chunk in r.content.iter_any():
            received += len(chunk)
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                arrivals.append((time.monotonic() - t0, event))
    assert len(arrivals) == 8, arrivals
    times = [t for t, _ in arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # each gap close to the upstream's 100 ms (generous margins: this is a test, not a benchmark)
    assert all(0.05 < g < 0.2 for g in gaps), gaps
    # the first event arrives long before the last one is produced (~700 ms after the first)
    assert times[-1] - times[0] > 0.5
    assert await rt.eval("export default globalThis.teeType") == "function"
    if mode == "tee":  # the other branch of the tee reads the same bytes, at its own pace
        await await_until(
            lambda: rt.eval(f"export default globalThis.consumed === {received}"),
            f"the tee's second branch has read all {received} bytes",
        )
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_fetched_body_is_a_real_readable_stream(conn, upstream) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    result = await rt.eval(
        f"""
        const base = {upstream.url!r};
        const r1 = await fetch(base + "/sse?n=3&gap=0.01");
        const [a, b] = r1.body.tee();
        const ta = await new Response(a).text(), tb = await new Response(b).text();
        const r2 = await fetch(base + "/sse?n=2&gap=0.01");
        let parts = 0; for await (const c of r2.body) parts++;
        const r3 = await fetch(base + "/bytes?size=1000");
        const ab = await r3.arrayBuffer();
        const r4 = await fetch(base + "/sse?n=2&gap=0");
        let piped = 0;
        await r4.body.pipeTo(new WritableStream({{ write(c) {{ piped += c.length; }} }}));
        export default {{
          isStream: r1.body instanceof ReadableStream, same: ta === tb, events: ta.split("\\n\\n").length - 1,
          parts, ab: ab.byteLength, piped: piped > 0,
        }};
        """
    )
    assert result == {"isStream": True, "same": True, "events": 3, "parts": 2, "ab": 1000, "piped": True}
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_large_bodies_intact_in_all_four_directions(conn, upstream) -> None:
    size = 48 * MiB + 12345
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    await rt.eval(JS_HELPERS)
    # 1. fetch response body: upstream -> client callback -> daemon -> guest
    got = await rt.eval(
        f"""
        const r = await fetch({upstream.url!r} + "/bytes?size={size}");
        let crc = 0, n = 0;
        for await (const c of r.body) {{ crc = crc32(c, crc); n += c.length; }}
        export default {{ n, crc }};
        """,
        timeout=120,
    )
    assert got == {"n": size, "crc": stream_crc(size)}
    # 2. fetch request body (upload): guest -> daemon -> client callback -> upstream
    got = await rt.eval(
        f"""
        let crc = 0, n = 0;
        const body = patternStream({size}, 3).pipeThrough(new TransformStream({{
          transform(c, ctl) {{ crc = crc32(c, crc); n += c.length; ctl.enqueue(c); }} }}));
        const r = await fetch({upstream.url!r} + "/upload?key=up", {{ method: "POST", body, duplex: "half" }});
        export default {{ server: await r.json(), n, crc }};
        """,
        timeout=120,
    )
    assert got["server"] == {"size": size, "crc": got["crc"]} and got["n"] == size
    # 3. serve() response body: guest -> daemon -> client
    await rt.eval(
        """serve({ async fetch(req) {
             if (req.method === "POST") {
               let crc = 0, n = 0;
               for await (const c of req.body) { crc = crc32(c, crc); n += c.length; }
               return Response.json({ n, crc });
             }
             let crc = 0;
             const size = Number(new URL(req.url).searchParams.get("size"));
             const body = patternStream(size, 5).pipeThrough(new TransformStream({
               transform(c, ctl) { crc = crc32(c, crc); ctl.enqueue(c); }, flush() { globalThis.sentCrc = crc; } }));
             return new Response(body);
        } })"""
    )
    resp = await rt.dispatch_request(client.Request("GET", f"http://x/?size={size}"))
    crc, n = 0, 0
    async for chunk in resp.body:
        crc = zlib.crc32(chunk, crc)
        n += len(chunk)
    assert n == size
    assert crc == await rt.eval("export default globalThis.sentCrc")
    # 4. dispatch request body: client -> daemon -> guest
    sent = {"crc": 0, "n": 0}

    async def upload():
        left = size
        while left:
            piece = BLOCK[: min(left, len(BLOCK))]
            sent["crc"] = zlib.crc32(piece, sent["crc"])
            sent["n"] += len(piece)
            left -= len(piece)
            yield piece

    resp = await rt.dispatch_request(client.Request("POST", "http://x/", body=upload()))
    assert await resp.json() == {"n": size, "crc": sent["crc"]}
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_guest_cancel_closes_the_upstream_connection(conn, upstream) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    await rt.eval(
        f"""
        const r = await fetch({upstream.url!r} + "/sse?n=1000&gap=0.02&key=cancelme");
        const reader = r.body.getReader();
        await reader.read();
        await reader.cancel();
        """
    )
    rec = upstream.records["cancelme"]
    await await_until(lambda: rec.closed_at is not None, "the upstream saw its connection closed", interval=0.01)
    assert not rec.finished
    assert rec.written < 1000 * 20
    # AbortController works the same way
    await rt.eval(
        f"""
        const ac = new AbortController();
        const r = await fetch({upstream.url!r} + "/sse?n=1000&gap=0.02&key=abortme", {{ signal: ac.signal }});
        const reader = r.body.getReader();
        await reader.read();
        ac.abort();
        let name; try {{ await reader.read(); }} catch (e) {{ name = e.name; }}
        globalThis.abortName = name;
        """
    )
    assert await rt.eval("export default globalThis.abortName") == "AbortError"
    await await_until(
        lambda: upstream.records["abortme"].closed_at is not None,
        "the upstream saw its connection closed after the abort",
        interval=0.01,
    )
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_end_client_disconnect_cancels_the_guest_body(conn, upstream, front) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    await rt.eval(
        f"""
        globalThis.cancelled = null;
        serve({{ async fetch(req) {{
          if (new URL(req.url).pathname === "/own") {{
            let i = 0;
            return new Response(new ReadableStream({{
              async pull(c) {{ await new Promise(r => setTimeout(r, 20)); c.enqueue(new TextEncoder().encode("tick " + i++ + "\\n")); }},
              cancel(reason) {{ globalThis.cancelled = String(reason); }},
            }}));
          }}
          const up = await fetch({upstream.url!r} + "/sse?n=1000&gap=0.02&key=endclient");
          return new Response(up.body);
        }} }});
        """
    )
    url = await front(rt)
    for path in ("/own", "/proxy"):
        async with aiohttp.ClientSession() as s:
            r = await s.get(url + path)
            await r.content.readany()
            r.close()  # the end client hangs up mid-stream
    await await_until(
        lambda: rt.eval("export default globalThis.cancelled"), "the guest's own body saw the end client's cancel"
    )
    await await_until(
        lambda: upstream.records["endclient"].closed_at is not None, "the upstream saw the end client's cancel"
    )
    assert not upstream.records["endclient"].finished
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_upstream_failure_mid_body_rejects_guest_read_with_type_error(conn, upstream) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    result = await rt.eval(
        f"""
        const r = await fetch({upstream.url!r} + "/fail");
        const reader = r.body.getReader();
        const first = new TextDecoder().decode((await reader.read()).value);
        let err; try {{ while (!(await reader.read()).done); }} catch (e) {{ err = e; }}
        export default {{ first, name: err?.name, message: err?.message }};
        """
    )
    assert result["first"] == "partial body "
    assert result["name"] == "TypeError", result
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_guest_error_mid_body_fails_the_clients_body(conn, front) -> None:
    rt = await conn.create_runtime()
    await rt.eval(
        """serve(() => new Response(new ReadableStream({
             n: 0,
             async pull(c) {
               await new Promise(r => setTimeout(r, 10));
               if (this.n++ === 3) c.error(new RangeError("generator broke"));
               else c.enqueue(new TextEncoder().encode("chunk\\n"));
             } })))"""
    )
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    chunks = []
    with pytest.raises(client.StreamError) as info:
        async for c in resp.body:
            chunks.append(c)
    assert b"".join(chunks) == b"chunk\n" * 3
    assert "generator broke" in str(info.value)
    # through aiohttp the end client sees a broken response, not a clean end
    url = await front(rt)
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_guest_upload_error_reaches_the_fetch_callback(conn) -> None:
    seen = {}

    async def on_fetch(req: client.Request) -> client.Response:
        try:
            await req.read()
        except client.StreamError as exc:
            seen["error"] = str(exc)
            raise
        return client.Response(200)

    rt = await conn.create_runtime(fetch=on_fetch)
    result = await rt.eval(
        """
        const body = new ReadableStream({ n: 0, pull(c) {
          if (this.n++ < 2) c.enqueue(new Uint8Array(100000)); else c.error(new Error("upload source failed")); } });
        let name; try { await fetch("http://x/", { method: "POST", body, duplex: "half" }); } catch (e) { name = e.name; }
        export default name;
        """
    )
    assert result == "TypeError"
    assert "upload source failed" in seen["error"]
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_backpressure_slow_guest_bounds_upstream_and_memory(conn, upstream, broker) -> None:
    import os

    size = 256 * MiB
    client_rss_start = rss_mb(os.getpid())
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    await rt.eval(
        f"""
        globalThis.got = 0;
        globalThis.resume = null;
        const r = await fetch({upstream.url!r} + "/bytes?size={size}&key=slow");
        globalThis.reader = r.body.getReader();
        // read 4 MiB, then stop until told to go on
        while (globalThis.got < 4 * 1024 * 1024) globalThis.got += (await reader.read()).value.length;
        """
    )
    rec = upstream.records["slow"]
    # wait until the upstream is blocked: its byte count stops moving (without backpressure it would
    # run on to the end, and `finished` below says so) ...
    stalled_at = await upstream_stalls(rec, size)
    broker_rss_stalled = rss_mb(broker.pid)
    # ... and stays blocked while the guest keeps not reading (this pause is the scenario, not a wait)
    await asyncio.sleep(1.0)
    got = await rt.eval("export default globalThis.got")
    # the upstream wrote nothing more while the guest was not reading ...
    assert not rec.finished and rec.written == stalled_at, (rec.written, stalled_at)
    # ... and what it wrote beyond what the guest consumed is bounded (pipes + socket buffers)
    buffered = rec.written - got
    print(
        f"\nstalled: upstream wrote {rec.written / MiB:.1f} MiB, guest read {got / MiB:.1f} MiB, "
        f"in flight {buffered / MiB:.1f} MiB; broker+daemon RSS {broker_rss_stalled:.0f} MB"
    )
    assert buffered < 24 * MiB
    # mid-stream the counts show the open stream on every hop (so the zero checks can fail)
    mid = await rt.stats()
    assert mid["daemon"]["inbound"] == 1 and mid["daemon"]["open_pipes"] == 1 and mid["guest"]["inbound"] == 1
    assert mid["client"]["producers"] == 1 and mid["client"]["tasks"] == 1
    # now drain the rest slowly-ish and check the total; memory stays bounded meanwhile
    await rt.eval(
        """
        let n = 0;
        for (;;) { const { done, value } = await reader.read(); if (done) break; globalThis.got += value.length;
                   if (++n % 64 === 0) await new Promise(r => setTimeout(r, 1)); }
        """,
        timeout=300,
    )
    assert await rt.eval("export default globalThis.got") == size
    peak = rss_mb(broker.pid)
    client_growth = rss_mb(os.getpid()) - client_rss_start
    print(f"after 256 MiB: broker+daemon RSS {peak:.0f} MB; client (+upstream) RSS grew {client_growth:.0f} MB")
    assert peak < broker_rss_stalled + 64
    assert client_growth < 64
    await assert_nothing_left(rt)
    await rt.dispose()


async def test_a_long_stall_loses_nothing(conn, upstream) -> None:
    """A consumer that stops reading for longer than any keep-alive timeout still gets every byte."""
    size = 8 * MiB
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    await rt.eval(JS_HELPERS)
    got = await rt.eval(
        f"""
        const r = await fetch({upstream.url!r} + "/bytes?size={size}");
        const reader = r.body.getReader();
        let crc = 0, n = 0, first = true;
        for (;;) {{
          const {{ done, value }} = await reader.read();
          if (done) break;
          crc = crc32(value, crc); n += value.length;
          if (first) {{ first = false; await new Promise(r => setTimeout(r, 7000)); }}
        }}
        export default {{ n, crc }};
        """,
        timeout=60,
    )
    assert got == {"n": size, "crc": stream_crc(size)}
    await assert_nothing_left(rt)
    await rt.dispose()


async def upstream_stalls(rec, size: int, quiet: float = 1.0, timeout: float = 60.0) -> int:
    """Wait until the upstream's response has written nothing for ``quiet`` seconds (it is blocked on
    a full socket) and return how much it wrote; fail if it finishes or never stops within ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = rec.written, time.monotonic()
    while True:
        await asyncio.sleep(0.05)
        assert not rec.finished, f"the upstream wrote all {size} bytes: nothing held it back"
        now = time.monotonic()
        if rec.written != last:
            last, since = rec.written, now
        elif now - since >= quiet:
            return last
        assert now < deadline, f"the upstream never stopped writing within {timeout:g}s ({rec.written} bytes)"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_daemon_killed_mid_stream_fails_the_body(tmp_path: Path) -> None:
    import signal

    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", "0.2")
    d = Daemon(tmp_path, b, "d1", "--heartbeat", "0.2", "--pool-size", "1")
    try:
        async with await client.connect(b.frontend) as conn:
            rt = await create_when_ready(conn)
            await rt.eval(
                """serve(() => new Response(new ReadableStream({ async pull(c) {
                     await new Promise(r => setTimeout(r, 20)); c.enqueue(new Uint8Array(10)); } })))"""
            )
            resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
            assert len(await resp.body.read_chunk()) == 10
            d.stop(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(client.StreamError):
                async with asyncio.timeout(10):
                    async for _ in resp.body:
                        pass
            assert time.monotonic() - t0 < 5
    finally:
        d.stop()
        b.stop()


async def test_an_abandoned_response_body_is_cancelled(conn) -> None:
    import gc

    rt = await conn.create_runtime()
    await rt.eval(
        """serve(() => new Response(new ReadableStream({ async pull(c) {
             await new Promise(r => setTimeout(r, 5)); c.enqueue(new Uint8Array(1000)); } })))"""
    )
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert await resp.body.read_chunk()
    del resp  # never read to the end, never closed
    gc.collect()
    await assert_nothing_left(rt)
    await rt.dispose()


def _stream_id(body: client.Body) -> bytes:
    """The wire id of a streamed body (what an attacker would have to guess or sniff)."""
    sid = getattr(getattr(body, "_stream", None), "sid", None)
    assert isinstance(sid, bytes), f"cannot find the stream id of {body!r}: has client.bodies.Body changed?"
    return sid


async def test_a_cancel_for_another_clients_stream_is_ignored(broker) -> None:
    """Guards the owner check on the daemon's control socket (daemon/daemon.py `_control_loop`: a
    `cancel` is acted on only if the stream's runtime's owner is the sender's token). Two clients
    have runtimes on one daemon; while A's response body is live, B sends a cancel for A's stream id
    on B's own control link to that daemon. A's body must still arrive whole, and nothing leaks.
    Without the check the daemon drops A's pipe and cancels A's guest stream, and this test fails."""
    size, hold = 4 * MiB + 4321, 256 * 1024
    async with (
        await client.connect(broker.frontend, timeout=15) as a,
        await client.connect(broker.frontend, timeout=15) as b,
    ):
        assert a.token != b.token
        rt_a, rt_b = await a.create_runtime(), await b.create_runtime()
        assert rt_a.daemon == rt_b.daemon, "the test needs both runtimes on one daemon"
        assert rt_a._control.endpoint == rt_b._control.endpoint
        await rt_a.eval(JS_HELPERS)
        # A: a checksummed body that pauses after `hold` bytes until told to go on (so it stays live
        # for as long as the test needs), and records whether its stream was ever cancelled
        await rt_a.eval(
            f"""
            globalThis.go = false; globalThis.cancelled = null; globalThis.sentCrc = null;
            serve(() => {{
              const src = patternStream({size}, 11).getReader();
              let sent = 0, crc = 0;
              return new Response(new ReadableStream({{
                async pull(c) {{
                  while (sent >= {hold} && !globalThis.go) await new Promise(r => setTimeout(r, 5));
                  const {{ done, value }} = await src.read();
                  if (done) {{ globalThis.sentCrc = crc; c.close(); return; }}
                  sent += value.length; crc = crc32(value, crc); c.enqueue(value);
                }},
                cancel(reason) {{ globalThis.cancelled = String(reason); }},
              }}));
            }});
            """
        )
        # B: an endless body of its own; cancelling it shows B's control link works, and orders B's
        # control messages (the daemon reads one peer's messages in order)
        await rt_b.eval(
            """
            globalThis.cancelled = null;
            serve(() => new Response(new ReadableStream({
              async pull(c) { await new Promise(r => setTimeout(r, 10)); c.enqueue(new Uint8Array(100)); },
              cancel(reason) { globalThis.cancelled = String(reason); },
            })));
            """
        )
        resp_a = await rt_a.dispatch_request(client.Request("GET", "http://a/"))
        resp_b = await rt_b.dispatch_request(client.Request("GET", "http://b/"))
        crc, n = 0, 0
        first = await resp_a.body.read_chunk()
        assert first
        crc, n = zlib.crc32(first, crc), n + len(first)
        assert await resp_b.body.read_chunk()
        # A's stream is live on the daemon (so the cancel below has something to hit)
        mid = await rt_a.stats()
        assert mid["daemon"]["outbound"] == 1 and mid["daemon"]["registered_streams"] == 1, mid
        # B learns A's stream id (here from A's objects) and cancels it on B's own control link,
        # then cancels its own stream on the same link
        link = b._control(rt_b._control.endpoint, rt_b.daemon_key)
        assert link is rt_b._control and link.sock.identity == b.token
        link.cancel(_stream_id(resp_a.body))
        link.cancel(_stream_id(resp_b.body))
        # once B's own cancel has reached B's guest, the daemon has handled B's forged cancel too
        await await_until(
            lambda: rt_b.eval("export default globalThis.cancelled"), "B's cancel of its own stream reached B's guest"
        )
        assert await rt_a.eval("export default globalThis.cancelled") is None, "A's stream was cancelled by B"
        # A's body goes on to the end, intact
        await rt_a.eval("globalThis.go = true")
        try:
            async with asyncio.timeout(60):
                while (chunk := await resp_a.body.read_chunk()) is not None:
                    crc, n = zlib.crc32(chunk, crc), n + len(chunk)
        except TimeoutError:
            raise AssertionError(f"A's body stalled after {n} of {size} bytes") from None
        assert n == size
        assert crc == await rt_a.eval("export default globalThis.sentCrc")
        assert await rt_a.eval("export default globalThis.cancelled") is None
        await resp_b.body.aclose()
        await assert_nothing_left(rt_a)
        await assert_nothing_left(rt_b)
        await rt_a.dispose()
        await rt_b.dispose()
