"""Issue 2: placement over several daemons, daemon loss, ownership, limits and clean shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import client
from scripts.kit.procs import deno_left, deno_pids, describe
from scripts.kit.procs import descendants as children_of
from tests.conftest import Broker, Daemon, await_until, joined
from wire import messages as M


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Broker, Daemon, Daemon]]:
    """A broker without a local daemon, and two daemon processes (heartbeat 0.2 s, liveness 3)."""
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", "0.2", "--liveness", "3")
    d1 = Daemon(tmp_path, b, "d1", "--heartbeat", "0.2", "--max-runtimes", "8", "--pool-size", "1")
    d2 = Daemon(tmp_path, b, "d2", "--heartbeat", "0.2", "--max-runtimes", "8", "--pool-size", "1")
    try:
        yield b, d1, d2
    finally:
        for p in (d1, d2, b):
            p.stop()


async def _runtimes_on_both_daemons(b: Broker, conn: client.Connection) -> list[client.Runtime]:
    """Wait (with a deadline) until the broker has both daemons, then create runtimes until both hold
    one: the broker places on the daemon with the most free room, so two or three creates suffice."""
    await await_until(lambda: joined(b, "d1", "d2"), "both daemons have joined the broker", timeout=60)
    rts: list[client.Runtime] = []
    for _ in range(4):  # each daemon has room for 8
        rts.append(await conn.create_runtime())
        if {r.daemon for r in rts} == {"d1", "d2"}:
            return rts
    raise AssertionError(f"4 runtimes all went to one daemon: {[r.daemon for r in rts]}")


async def test_runtimes_spread_over_two_daemons(cluster) -> None:
    b, _d1, _d2 = cluster
    async with await client.connect(b.frontend, timeout=10) as conn:
        rts = await _runtimes_on_both_daemons(b, conn)
        rts += [await conn.create_runtime() for _ in range(4)]
        assert {r.daemon for r in rts} == {"d1", "d2"}
        # every runtime works, wherever it is
        vals = await asyncio.gather(*(r.eval(f"export default '{r.id}'") for r in rts))
        assert vals == [r.id for r in rts]
        counts = {d: sum(r.daemon == d for r in rts) for d in ("d1", "d2")}
        assert abs(counts["d1"] - counts["d2"]) <= 1


async def test_killed_daemon_gives_owner_a_clear_error(cluster) -> None:
    b, d1, _d2 = cluster
    async with await client.connect(b.frontend, timeout=10) as conn:
        rts = await _runtimes_on_both_daemons(b, conn)
        victim = next(r for r in rts if r.daemon == "d1")
        survivor = next(r for r in rts if r.daemon == "d2")
        await victim.eval("serve(() => new Promise(() => {}))")  # a dispatch that never answers
        pending = asyncio.ensure_future(victim.dispatch_request(client.Request("GET", "http://x/")))

        # kill the daemon only once the dispatch is pending in the guest
        async def dispatch_in_guest() -> bool:
            return (await victim.stats())["guest"]["dispatches"] == 1

        await await_until(dispatch_in_guest, "the dispatch is pending in d1's guest")
        guests_of_d1 = children_of(d1.pid)
        assert guests_of_d1, "daemon d1 should have Deno children"
        d1.stop(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(client.RuntimeLost) as info:
            await asyncio.wait_for(pending, 10)
        waited = time.monotonic() - t0
        assert "d1" in str(info.value)
        assert waited < 5, f"pending call took {waited:.1f}s to fail (heartbeat 0.2s x 3)"
        with pytest.raises(client.RuntimeLost):
            await victim.eval("1")
        assert await survivor.eval("export default 'still here'") == "still here"
        # the killed daemon's Deno processes die with it (PR_SET_PDEATHSIG)
        left = deno_left(guests_of_d1)
        assert not left, f"Deno outlived its daemon: {describe(left)}"


async def test_client_cannot_touch_another_clients_runtime(broker) -> None:
    async with await client.connect(broker.frontend) as alice, await client.connect(broker.frontend) as mallory:
        rt = await alice.create_runtime()
        await rt.eval("globalThis.secret = 's3cret'")
        # mallory forges requests naming alice's runtime id
        forged = [
            (lambda i: M.Eval(id=i, rt=rt.id, source=b"export default globalThis.secret"), M.EvalOk),
            (lambda i: M.Dispose(id=i, rt=rt.id), M.DisposeOk),
            (lambda i: M.Dispatch(id=i, rt=rt.id, method="GET", url="http://x/", resp_sid=b"0" * 16), M.DispatchOk),
        ]
        for make, reply in forged:
            with pytest.raises(client.UnknownRuntime):
                await mallory.call(make, reply)
        assert await rt.eval("export default globalThis.secret") == "s3cret"
        await rt.dispose()


async def test_memory_limit_kills_only_that_runtime(conn: client.Connection) -> None:
    hog = await conn.create_runtime(memory_limit_mb=64)
    bystander = await conn.create_runtime()
    with pytest.raises(client.MemoryLimitExceeded) as info:
        await hog.eval("const keep = []; while (true) keep.push(new Array(1e6).fill(Math.random()));", timeout=60)
    assert "64 MB" in str(info.value)
    with pytest.raises(client.MemoryLimitExceeded):
        await hog.eval("1")
    assert await bystander.eval("export default 7") == 7
    await bystander.dispose()


async def test_memory_outside_the_js_heap_is_limited_too(conn: client.Connection) -> None:
    """ArrayBuffers live outside V8's heap limit; the daemon watches the whole process."""
    hog = await conn.create_runtime(memory_limit_mb=64)
    with pytest.raises(client.MemoryLimitExceeded) as info:
        await hog.eval(
            "const keep = []; for (let i = 0; i < 100; i++) { keep.push(new Uint8Array(16 << 20).fill(1));"
            " await new Promise(r => setTimeout(r, 20)); }",
            timeout=60,
        )
    assert "64 MB" in str(info.value)


async def test_eval_timeout_stops_a_runaway_guest(conn: client.Connection) -> None:
    rt = await conn.create_runtime(eval_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(client.Timeout) as info:
        await rt.eval("while (true) {}")
    assert time.monotonic() - t0 < 10
    assert "0.5s" in str(info.value)
    with pytest.raises(client.RuntimeLost):
        await rt.eval("1")
    # a per-call timeout overrides the runtime's default
    rt2 = await conn.create_runtime(eval_timeout=30)
    with pytest.raises(client.Timeout):
        await rt2.eval("await new Promise(() => {})", timeout=0.3)


async def test_broker_sigterm_leaves_no_deno_behind(tmp_path: Path) -> None:
    b = Broker(tmp_path, "--pool-size", "2")
    try:
        async with await client.connect(b.frontend) as conn:
            rts = [await conn.create_runtime() for _ in range(3)]
            assert [await r.eval("export default 1") for r in rts] == [1, 1, 1]
            kids = set(children_of(b.pid))
            assert len(kids & deno_pids()) >= 3
    finally:
        rc = b.stop(signal.SIGTERM)
    assert rc == 0
    left = deno_left(kids)
    assert not left, f"Deno processes outlived the broker: {describe(left)}"


async def test_broker_killed_fails_pending_calls_and_leaves_no_deno(tmp_path: Path) -> None:
    b = Broker(tmp_path, "--heartbeat", "0.3")
    async with await client.connect(b.frontend) as conn:
        rt = await conn.create_runtime()
        kids = set(children_of(b.pid)) & deno_pids()
        assert kids
        pending = asyncio.ensure_future(rt.eval("globalThis.started = true; await new Promise(() => {})", timeout=60))
        # kill the broker only once the eval is pending in the guest
        await await_until(lambda: rt.eval("export default globalThis.started"), "the eval started in the guest")
        b.stop(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(client.ConnectionLost):
            await asyncio.wait_for(pending, 15)
        assert time.monotonic() - t0 < 5, "heartbeat 0.3 s x 5 should notice the broker is gone"
        with pytest.raises(client.ConnectionLost):
            await rt.eval("1")
    # the embedded daemon died with the broker; its Deno processes follow (PR_SET_PDEATHSIG)
    left = deno_left(kids)
    assert not left, f"Deno processes outlived the broker: {describe(left)}"
