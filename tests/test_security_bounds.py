"""Issue 8, findings 1, 5 and 9: what one runtime may have pending is bounded, so a hostile guest
cannot exhaust the shared daemon (sockets, memory) nor hang calls with legal but awkward values.

Each test runs its own broker with an embedded daemon, so that its file-descriptor and memory
figures are this test's alone. The attacker runs in a process of its own (another tenant); the
victim's dispatch latency is measured in this one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import client
from tests.conftest import ROOT, Broker, await_until, create_when_ready
from wire import guest as G

MiB = 1 << 20


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, "--heartbeat", "1.0", "--max-runtimes", "8", "--pool-size", "2")
    yield b
    b.stop()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


#: The attacking tenant: a runtime whose fetch callback refuses at once, and a guest that fires
#: 30,000 fetches in one go, then refires each refused one for a while; prints what its fetches saw.
ATTACKER = """
import asyncio, json, sys
import client

FLOOD = '''
const seen = { limited: 0, refused: 0, other: "" };
const until = Date.now() + Number(DURATION_MS);
let running = 0;
let finished;
globalThis.done = new Promise((r) => { finished = r; });
function one(i) {
  running++;
  fetch("http://x/" + i).then(() => {}, (e) => {
    const m = String(e?.message ?? e);
    if (m.includes("pending fetch")) seen.limited++;
    else if (m === "fetch failed") { seen.refused++; if (Date.now() < until) one(i + 30000); }  // the callback's
    else seen.other = m;
  }).finally(() => { if (--running === 0) finished(seen); });
}
// the issue's attack: 30,000 at once; then every fetch the callback refused is fired again,
// which holds the runtime at its bound for DURATION_MS
for (let i = 0; i < 30000; i++) one(i);
export default 0;
'''

async def refuse(req):
    raise RuntimeError("refused")

async def main():
    conn = await client.connect(sys.argv[1], timeout=15)
    rt = await conn.create_runtime(fetch=refuse)
    print("created", flush=True)
    await rt.eval(FLOOD.replace("DURATION_MS", sys.argv[2]), timeout=60)
    print("flooding", flush=True)
    seen = await rt.eval("export default await globalThis.done;", timeout=60)
    print("seen", json.dumps(seen), flush=True)
    await rt.dispose()
    await conn.close()

asyncio.run(main())
"""


async def test_fetch_flood_is_bounded_and_other_tenants_keep_their_latency(own_broker: Broker) -> None:
    """Finding 1: 30,000 fetches refused at once by the callback. The guest gets a TypeError naming
    the limit past MAX_PENDING_FETCHES, the daemon binds no socket for an unanswered fetch (its fd
    count stays bounded), and another client's dispatches keep a p99 under 50 ms."""
    victim = await client.connect(own_broker.frontend, timeout=15)
    try:
        rt = await create_when_ready(victim)
        await rt.eval("serve(() => new Response('ok'));")
        for _ in range(20):  # warm up
            await (await rt.dispatch_request(client.Request("GET", "http://v/"))).read()
        base_fds = fds(own_broker.pid)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACKER, own_broker.frontend, "3500", cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert attacker.stdout is not None
            lines: list[str] = []

            async def read_until(word: str) -> str:
                async with asyncio.timeout(60):
                    while True:
                        raw = await attacker.stdout.readline()
                        assert raw, f"the attacker ended before {word!r}: {lines}"
                        lines.append(raw.decode().strip())
                        if lines[-1].startswith(word):
                            return lines[-1]

            await read_until("flooding")
            latencies: list[float] = []
            peak_fds = 0
            start = time.monotonic()
            while time.monotonic() - start < 3.0:
                t0 = time.perf_counter()
                async with asyncio.timeout(10):
                    resp = await rt.dispatch_request(client.Request("GET", "http://v/"))
                    assert await resp.read() == b"ok"
                latencies.append(time.perf_counter() - t0)
                peak_fds = max(peak_fds, fds(own_broker.pid))
                await asyncio.sleep(0.002)
            seen = await read_until("seen")
            await asyncio.wait_for(attacker.wait(), 30)
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        import json

        counts = json.loads(seen.split(" ", 1)[1])
        assert counts["limited"] >= 30000 - G.MAX_PENDING_FETCHES, counts  # refused by fetch() itself
        assert counts["refused"] > 0 and counts["other"] == "", counts
        assert peak_fds < base_fds + 200, f"broker+daemon fds went from {base_fds} to {peak_fds}"
        print(
            f"victim: {len(latencies)} dispatches, p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, "
            f"p99 {p99(latencies) * 1000:.1f} ms; fds {base_fds} -> {peak_fds}; attacker saw {counts}"
        )
        assert len(latencies) >= 50
        assert p99(latencies) < 0.050, f"victim dispatch p99 {p99(latencies) * 1000:.1f} ms over {len(latencies)}"
        await rt.dispose()
    finally:
        await victim.close()


async def test_open_fetch_bodies_are_bounded(own_broker: Broker) -> None:
    """Finding 1, streams: a guest that keeps fetch responses whose bodies stream, unread, cannot
    hold more than MAX_STREAMS open bodies (each holds a pipe socket in the daemon)."""

    async def streaming(req: client.Request) -> client.Response:
        async def body():
            yield b"x" * 100_000
            await asyncio.sleep(30)

        return client.Response(200, body=body())

    conn = await client.connect(own_broker.frontend, timeout=15)
    try:
        rt = await create_when_ready(conn, fetch=streaming)
        base_fds = fds(own_broker.pid)
        out = await rt.eval(
            """
            const kept = []; let error = "";
            for (let i = 0; i < MAX + 20; i++) {
              try { kept.push(await fetch("http://x/" + i)); } catch (e) { error = String(e.message); break; }
            }
            export default { kept: kept.length, error };
            """.replace("MAX", str(G.MAX_STREAMS)),
            timeout=60,
        )
        assert out["kept"] == G.MAX_STREAMS and "open bodies" in out["error"], out
        grown = fds(own_broker.pid) - base_fds
        assert grown < 4 * G.MAX_STREAMS, f"{grown} more fds for {G.MAX_STREAMS} bodies"  # one socket each
        await rt.dispose()
    finally:
        await conn.close()


async def test_wedged_guest_stdin_is_bounded(own_broker: Broker) -> None:
    """Finding 5: a guest stuck in a loop reads nothing; evals of a 900 KB comment sent to it are
    refused once MAX_STDIN_QUEUE bytes wait for it, so the daemon's memory stays bounded; dispose
    then answers every pending eval at once."""
    conn = await client.connect(own_broker.frontend, timeout=15)
    try:
        rt = await create_when_ready(conn)
        await rt.eval("setTimeout(() => { for (;;) {} }, 50);")
        await asyncio.sleep(0.3)  # not an ordering sleep: the loop starts 50 ms after the eval, we only let it
        base = rss_mb(own_broker.pid)
        source = "//" + "x" * (900 * 1024)
        # at most 16 sent and not yet answered: what the daemon bounds is what waits for the guest
        # (~9 sources fit in MAX_STDIN_QUEUE and stay pending), not what a client may have in transit
        # through the broker at once (300 at a time made the figure a race between arrival and refusal)
        window = asyncio.Semaphore(16)

        async def send_one() -> Any:
            async with window:
                return await rt.eval(source, timeout=60)

        calls = [asyncio.ensure_future(send_one()) for _ in range(300)]
        try:
            async with asyncio.timeout(30):
                busy = 0
                while busy < 250:
                    done = [c for c in calls if c.done()]
                    busy = sum(isinstance(c.exception(), client.RequestRejected) for c in done)
                    await asyncio.sleep(0.05)
            growth = rss_mb(own_broker.pid) - base
            first = next(c for c in calls if c.done() and c.exception() is not None).exception()
            assert first.code == "busy" and "MiB" in str(first), first
            # unbounded, every 900 KB source stays queued for the guest: 300 of them grew it by ~270 MB
            # (303 MB measured before the fix; the window then fills with unanswered evals and the
            # wait above times out); bounded, what is left is MAX_STDIN_QUEUE, the sources in transit
            # and allocator slack (12-19 MB measured)
            assert growth < 120, f"broker+daemon RSS grew {growth:.0f} MB"
            t0 = time.monotonic()
            await rt.dispose()
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
            assert time.monotonic() - t0 < 10
            assert all(isinstance(r, client.Error) for r in results)
        finally:
            for c in calls:
                c.cancel()
    finally:
        await conn.close()


async def test_deep_values_and_bad_status_get_clear_errors(broker: Broker) -> None:
    """Finding 9: a legal value nested 600 deep gets a clear error at once, and a Response whose status
    was redefined to 999 is answered with its real status; the runtime lives on and nothing stays pending on any hop."""
    conn = await client.connect(broker.frontend, timeout=15)
    try:
        rt = await create_when_ready(conn)
        t0 = time.monotonic()
        with pytest.raises(client.GuestError, match="nested"):
            await rt.eval('export default JSON.parse("[".repeat(600) + "]".repeat(600));', timeout=20)
        assert time.monotonic() - t0 < 5
        # deeper than the daemon's own JSON parser could follow: refused in the guest, same error
        with pytest.raises(client.GuestError, match="nested"):
            await rt.eval('export default JSON.parse("[".repeat(5000) + "]".repeat(5000));', timeout=20)
        with pytest.raises(client.GuestError, match="nested"):
            await rt.eval('export default JSON.parse(\'{"a":\'.repeat(3000) + "1" + "}".repeat(3000));', timeout=20)
        assert await rt.eval('export default ["[[[[", {"}": "]]]]"}];') == ["[[[[", {"}": "]]]]"}]
        assert await rt.eval("export default JSON.parse('[[[1]]]');") == [[[1]]]
        await rt.eval(
            """serve(() => { const r = new Response("x"); Object.defineProperty(r, "status", { value: 999 });
            return r; });"""
        )
        t0 = time.monotonic()
        # the bootstrap reads the status through Response.prototype's own getter (finding 8): the
        # redefinition never reaches the head, which says what the Response really holds
        resp = await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=20)
        assert (resp.status, await resp.text()) == (200, "x")
        assert time.monotonic() - t0 < 5
        assert await rt.eval("export default 1 + 1") == 2
        stats = await rt.stats()
        assert not any(stats["daemon"].get(k) for k in ("evals", "dispatches", "fetches", "callbacks")), stats
        await rt.dispose()
    finally:
        await conn.close()


async def test_pending_calls_are_answered_when_the_runtime_stops(broker: Broker) -> None:
    """Finding 9: when a runtime stops (here: it runs out of its memory limit), every call pending in
    it is answered at once on every hop, not after the caller's timeout."""
    conn = await client.connect(broker.frontend, timeout=15)
    try:
        rt = await create_when_ready(conn, memory_limit_mb=64)
        await rt.eval("serve(() => new Promise(() => {}));")
        hung = [asyncio.ensure_future(rt.dispatch_request(client.Request("GET", "http://x/"), timeout=60))]

        async def reached() -> bool:
            return (await rt.stats())["daemon"].get("dispatches") == 1

        await await_until(reached, "the dispatch reached the daemon")
        t0 = time.monotonic()
        with pytest.raises(client.RuntimeLost):
            await rt.eval("const a = []; for (;;) a.push(new Array(1e6).fill(1));", timeout=60)
        results = await asyncio.wait_for(asyncio.gather(*hung, return_exceptions=True), 10)
        assert all(isinstance(r, client.RuntimeLost) for r in results), results
        assert time.monotonic() - t0 < 20
    finally:
        await conn.close()
