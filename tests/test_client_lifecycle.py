"""Issue 7 (client): every task the client starts is owned and joined; losing a runtime or a daemon
leaves no unretrieved exception behind."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import client
from tests.conftest import Broker, Daemon

UNRETRIEVED = ("never retrieved", "non-socket", "was destroyed but it is pending")


@pytest.fixture
def one_daemon(tmp_path: Path) -> Iterator[tuple[Broker, Daemon]]:
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", "0.2", "--liveness", "3")
    d = Daemon(tmp_path, b, "d1", "--heartbeat", "0.2", "--pool-size", "1")
    try:
        yield b, d
    finally:
        d.stop()
        b.stop()


async def _create_when_ready(conn: client.Connection) -> client.Runtime:
    deadline = time.monotonic() + 30
    while True:
        try:
            return await conn.create_runtime()
        except client.NoCapacity:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_daemon_killed_under_a_pending_dispatch_leaves_no_unretrieved_error(
    one_daemon: tuple[Broker, Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    b, d = one_daemon
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    caplog.set_level(logging.DEBUG)
    try:
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
            for _ in range(5):  # let anything scheduled by the loss run, then collect what it left
                await asyncio.sleep(0.05)
                gc.collect()
        for _ in range(3):
            await asyncio.sleep(0.05)
            gc.collect()
    finally:
        loop.set_exception_handler(None)
    texts = [str(ctx.get("message", "")) + " " + repr(ctx.get("exception")) for ctx in reported]
    texts += [r.getMessage() + (f" {r.exc_info[1]!r}" if r.exc_info else "") for r in caplog.records]
    bad = [t for t in texts if any(s in t for s in UNRETRIEVED)]
    assert not bad, bad
