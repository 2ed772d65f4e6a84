"""Issue 7 (client): every task the client starts is owned and joined; losing a runtime or a daemon
leaves no unretrieved exception behind; an end client hanging up reaches the guest at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import client
from tests.conftest import Broker, Daemon

UNRETRIEVED = ("never retrieved", "non-socket", "was destroyed but it is pending")


@pytest.fixture
async def no_unretrieved(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """``await check()`` fails if the loop reported (or anything logged) an unretrieved exception or
    a destroyed pending task; it collects garbage first, since those reports fire at collection."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    caplog.set_level(logging.DEBUG)

    async def check() -> None:
        for _ in range(3):
            await asyncio.sleep(0.05)
            gc.collect()
        texts = [f"{ctx.get('message')} {ctx.get('exception')!r}" for ctx in reported]
        texts += [r.getMessage() + (f" {r.exc_info[1]!r}" if r.exc_info else "") for r in caplog.records]
        bad = [t for t in texts if any(s in t for s in UNRETRIEVED)]
        assert not bad, bad

    try:
        yield check
    finally:
        loop.set_exception_handler(None)


@pytest.fixture
def one_daemon(tmp_path: Path) -> Iterator[tuple[Broker, Daemon]]:
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", "0.2", "--liveness", "3")
    d = Daemon(tmp_path, b, "d1", "--heartbeat", "0.2", "--pool-size", "1")
    try:
        yield b, d
    finally:
        d.stop()
        b.stop()


async def _until(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _create_when_ready(conn: client.Connection) -> client.Runtime:
    """The daemon registers shortly after it starts: place until it is there."""
    created: list[client.Runtime] = []

    async def placed() -> bool:
        with contextlib.suppress(client.NoCapacity):
            created.append(await conn.create_runtime())
        return bool(created)

    await _until(placed, 30)
    return created[0]


async def test_daemon_killed_under_a_pending_dispatch_leaves_no_unretrieved_error(
    one_daemon: tuple[Broker, Daemon], no_unretrieved: Callable[[], Awaitable[None]]
) -> None:
    b, d = one_daemon
    async with await client.connect(b.frontend, timeout=10) as conn:
        rt = await _create_when_ready(conn)
        await rt.eval("serve(() => new Promise(() => {}))")  # a handler that never answers
        pending = asyncio.ensure_future(rt.dispatch_request(client.Request("GET", "http://x/")))

        async def dispatched() -> bool:
            return (await rt.stats())["daemon"].get("dispatches", 0) == 1

        await _until(dispatched)
        d.stop(signal.SIGKILL)
        with pytest.raises(client.RuntimeLost):
            await asyncio.wait_for(pending, 10)
        del pending
        with pytest.raises(client.RuntimeLost):
            await rt.eval("1")
        await no_unretrieved()
    await no_unretrieved()


STALLING_BODY = """
globalThis.cancelled = null;
serve(() => new Response(new ReadableStream({
  start(c) { c.enqueue(new TextEncoder().encode("first\\n")); },
  pull() { return new Promise(() => {}); },  // then nothing, ever
  cancel(reason) { globalThis.cancelled = String(reason); },
})));
"""


@pytest.mark.parametrize("cancellation", [True, False], ids=["handler_cancellation", "default_app"])
async def test_end_client_hanging_up_on_a_stalled_body_cancels_the_guest(
    conn: client.Connection, cancellation: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing is written while the guest stalls, so only aiohttp's handler cancellation (or, in an
    app that has it off, aiohttp_handler's own watch of the connection) can tell aiohttp_handler
    that the end client is gone."""
    rt = await conn.create_runtime()
    await rt.eval(STALLING_BODY)
    app = web.Application()
    app.router.add_get("/", client.aiohttp_handler(rt))
    runner = web.AppRunner(app, handler_cancellation=cancellation)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.get(f"http://127.0.0.1:{runner.addresses[0][1]}/")
            assert await r.content.readany() == b"first\n"
            r.close()  # the end client hangs up while the guest is silent

        async def guest_cancelled() -> bool:
            return await rt.eval("export default globalThis.cancelled") is not None

        await _until(guest_cancelled, 5)

        async def all_closed() -> bool:
            stats = await rt.stats()
            return not any(v for counts in stats.values() for v in counts.values())

        await _until(all_closed, 5)
        warned = [r for r in caplog.records if "handler_cancellation is off" in r.getMessage()]
        assert len(warned) == (0 if cancellation else 1)
    finally:
        await runner.cleanup()
    await rt.dispose()


async def test_closing_the_connection_joins_every_task_and_fails_open_bodies(
    broker: Broker, no_unretrieved: Callable[[], Awaitable[None]]
) -> None:
    before = asyncio.all_tasks()
    fetch_started = asyncio.Event()
    fetch_ended: list[str] = []

    async def on_fetch(_req: client.Request) -> client.Response:
        fetch_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            fetch_ended.append("cancelled")
            raise
        raise AssertionError("unreachable")

    conn = await client.connect(broker.frontend, timeout=15)
    rt = await conn.create_runtime(fetch=on_fetch, console=lambda _e: asyncio.sleep(3600))
    await rt.eval(STALLING_BODY + 'globalThis.pending = fetch("http://upstream/"); console.log("x");')
    await asyncio.wait_for(fetch_started.wait(), 10)
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    assert await resp.body.read_chunk() == b"first\n"
    stats = (await rt.stats())["client"]
    assert stats["bodies"] == 1 and stats["producers"] == 1 and stats["tasks"] == 2, stats

    await conn.close()

    left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    assert not left, left
    assert fetch_ended == ["cancelled"]
    with pytest.raises(client.StreamError):
        await resp.body.read_chunk()
    with pytest.raises(client.ConnectionLost):
        await rt.eval("1")
    await conn.close()  # a second close is harmless
    await no_unretrieved()
