"""Issue 9: forward_fetch's connection limit fails or queues visibly, never deadlocks.

A guest that holds many fetched bodies unread used to hang on aiohttp's pool of 100 connections
(every one held by an unread body) until a timeout minutes away. A real guest makes 120 streamed
fetches of a real aiohttp upstream here: either the extra ones fail at once with an error that says
why, or (bodies read as they come) all of them complete, queued behind the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

import client

N = 120
PART = 64 * 1024  # bytes before and after the gate: each body is 2 * PART


@dataclass
class Held:
    """An upstream whose bodies send ``PART`` bytes, then wait for ``gate`` before the rest: an
    unread body really holds its connection. Counts requests and the most open at once."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    finished: int = 0
    open: int = 0
    most_open: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            resp = web.StreamResponse()
            resp.content_length = 2 * PART
            await resp.prepare(request)
            await resp.write(b"a" * PART)
            async with asyncio.timeout(60):  # bounded: a test that failed does not keep it forever
                await self.gate.wait()
            await resp.write(b"b" * PART)
            await resp.write_eof()
            self.finished += 1
            return resp
        finally:
            self.open -= 1


@pytest.fixture
async def held() -> AsyncIterator[Held]:
    h = Held()
    app = web.Application()
    app.router.add_get("/held", h.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    h.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield h
    h.gate.set()
    await runner.cleanup()


def fetch_all(url: str, read: bool) -> str:
    """A guest module making N fetches, at most 30 awaiting their head at once (the runtime allows
    32); with ``read`` each body is read at once, else every response is kept unread in ``held``."""
    return f"""
    globalThis.held = [];
    const errors = [];
    let pending = 0, bytes = 0;
    const waiters = [];
    async function one(i) {{
      while (pending >= 30) await new Promise((r) => waiters.push(r));
      pending++;
      try {{
        const r = await fetch("{url}/held?i=" + i);
        if ({"true" if read else "false"}) {{
          const n = (await r.arrayBuffer()).byteLength;  // not "bytes += await": that reads bytes first
          bytes += n;
        }} else held.push(r);
      }} catch (e) {{
        errors.push(String(e.message ?? e));
      }} finally {{
        pending--;
        waiters.shift()?.();
      }}
    }}
    await Promise.all(Array.from({{ length: {N} }}, (_, i) => one(i)));
    export default {{ ok: {"bytes" if read else "held.length"}, errors }};
    """


async def test_unread_bodies_past_the_limit_fail_the_extra_fetches_clearly(
    conn: client.Connection, held, caplog: pytest.LogCaptureFixture
) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True, pool_timeout=1.0))
    # 100 bodies (the default max_connections) stay unread: the other 20 fetches fail after 1 s
    got = await asyncio.wait_for(rt.eval(fetch_all(held.url, read=False), timeout=30), 40)
    assert got["ok"] == 100, got
    assert len(got["errors"]) == N - 100, got
    # the guest learns that they failed (issue 10: no host texts for it), the host's log says why
    assert set(got["errors"]) == {"fetch failed"}, got["errors"][:3]
    why = [r.getMessage() for r in caplog.records if "the fetch callback failed" in r.getMessage()]
    assert why and all("max_connections" in m and "within 1s" in m for m in why), why[:1]
    assert held.requests == 100 and held.most_open == 100
    held.gate.set()  # the held bodies are intact, and read to the end now
    total = await rt.eval(
        "let n = 0; for (const r of held) n += (await r.arrayBuffer()).byteLength; export default n;", timeout=30
    )
    assert total == 100 * 2 * PART
    # their connections came back: a fetch made now gets one at once
    assert await rt.eval(f'export default (await (await fetch("{held.url}/held")).arrayBuffer()).byteLength') == (
        2 * PART
    )
    await rt.dispose()


async def test_bodies_read_as_they_come_all_complete_queued_behind_the_limit(conn: client.Connection, held) -> None:
    held.gate.set()
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True, max_connections=8))
    got = await asyncio.wait_for(rt.eval(fetch_all(held.url, read=True), timeout=60), 70)
    assert got == {"ok": N * 2 * PART, "errors": []}
    assert held.finished == N
    assert held.most_open <= 8  # the limit held: the other fetches waited for a connection
    await rt.dispose()


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        client.forward_fetch(max_connections=0)
