"""Issue 8, findings 6 and 10: CPU and memory limits enforced from outside the guest.

A guest that never yields (a serve() handler, a timer, a stream pull) is stopped by the daemon
once it has burned its per-turn CPU limit without answering the daemon's ping; a request that
uses up its CPU budget stops the runtime too; memory is capped by the kernel (a cgroup) where the
daemon may create one, and operators cap what clients may ask for."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import client
from daemon.limits import TurnWatch
from scripts.kit.procs import descendants
from tests.conftest import Broker, await_until

SPIN_HANDLER = "serve(() => { while (true) {} });"


def test_turn_watch_stops_only_a_loop_that_burns_cpu_without_answering() -> None:
    w = TurnWatch(turn_limit=1.0, request_limit=10.0)
    assert w.tick(0.0, False, []) == (1, None)  # ping 1 sent
    assert w.tick(0.9, False, []) == (None, None)  # unanswered, but under the limit
    w.pong(1)
    assert w.tick(5.0, False, []) == (2, None)  # it answered: busy, not stuck; ping 2
    assert w.tick(5.5, True, []) == (None, None)  # an eval runs: its own timeout applies
    assert w.tick(9.0, True, []) == (None, None)
    assert w.tick(9.5, False, []) == (None, None)  # counted again from the last sample in the eval
    _, why = w.tick(10.1, False, [])
    assert why is not None and "stuck" in why
    before = w.answered
    w.pong(7)  # a pong for a ping never sent changes nothing
    assert w.answered == before


def test_turn_watch_shares_cpu_among_waiting_dispatches() -> None:
    w = TurnWatch(turn_limit=100.0, request_limit=2.0)
    a, b = object(), object()
    w.tick(0.0, False, [a, b])
    w.pong(1)
    assert w.tick(3.0, False, [a, b])[1] is None  # 1.5 s each
    w.pong(2)
    assert w.tick(3.4, False, [a])[1] is None  # a: 1.9 s; b finished
    w.pong(3)
    assert "budget" in (w.tick(3.6, False, [a])[1] or "")


async def _other_tenant_works(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    try:
        await rt.eval("serve(() => new Response('fine'))")
        resp = await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=10)
        assert await resp.text() == "fine"
    finally:
        await rt.dispose()


async def test_a_spinning_handler_is_stopped_by_the_cpu_limit(conn: client.Connection) -> None:
    rt = await conn.create_runtime(cpu_limit=1.0)
    await rt.eval(SPIN_HANDLER)
    t0 = time.monotonic()
    with pytest.raises(client.CpuLimitExceeded) as info:
        await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=30)
    assert time.monotonic() - t0 < 10, "the spinning guest was stopped, not waited out"
    assert "stuck" in info.value.message
    with pytest.raises(client.RuntimeLost):  # the runtime is gone, and says why
        await rt.eval("1")
    await _other_tenant_works(conn)


@pytest.mark.parametrize(
    "attack",
    [
        "setTimeout(() => { for (;;) {} }, 10);",  # a timer
        "const f = () => Promise.resolve().then(f); setTimeout(f, 10);",  # microtasks that never end
        # a response body whose pull() never returns
        "serve(() => new Response(new ReadableStream({ pull() { for (;;) {} } })));setTimeout(() => {}, 0);",
    ],
    ids=["timer", "microtasks", "stream-pull"],
)
async def test_a_stuck_event_loop_outside_eval_is_stopped(conn: client.Connection, attack: str) -> None:
    rt = await conn.create_runtime(cpu_limit=1.0)
    await rt.eval(attack)
    if "pull()" in attack:  # the bootstrap pulls before the head (inline or stream?) or after it
        with pytest.raises((client.CpuLimitExceeded, client.StreamError)):
            resp = await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=30)
            await resp.read()

    await await_until(lambda: rt.lost, "the daemon stopped the runtime", timeout=30)
    assert isinstance(rt.lost, client.CpuLimitExceeded), rt.lost
    await _other_tenant_works(conn)


async def test_eval_keeps_its_own_timeout(conn: client.Connection) -> None:
    """A long synchronous eval is bounded by the eval timeout, not by the per-turn CPU limit."""
    rt = await conn.create_runtime(cpu_limit=0.5)
    value = await rt.eval(
        "const t = Date.now(); let n = 0; while (Date.now() - t < 1500) n++; export default n > 0;", timeout=20
    )
    assert value is True
    assert await rt.eval("export default 2") == 2
    await rt.dispose()


async def test_a_request_that_uses_up_its_cpu_budget_stops_the_runtime(conn: client.Connection) -> None:
    """Short turns (each far below the per-turn limit) still add up to the per-request budget."""
    rt = await conn.create_runtime(cpu_limit=5.0, request_cpu=1.0)
    await rt.eval(
        "serve(async () => { for (;;) { const t = Date.now(); while (Date.now() - t < 20) {}"
        " await new Promise((r) => setTimeout(r, 0)); } });"
    )
    t0 = time.monotonic()
    with pytest.raises(client.CpuLimitExceeded) as info:
        await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=30)
    assert time.monotonic() - t0 < 15
    assert "budget" in info.value.message


async def test_a_dispatch_timeout_aborts_the_guest_request(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    await rt.eval(
        "globalThis.aborted = 0;"
        "serve((req) => new Promise((_, reject) => req.signal.addEventListener('abort', () => {"
        " globalThis.aborted++; reject(new Error('aborted')); })));"
    )
    with pytest.raises(client.Timeout):
        await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=0.3)
    await await_until(lambda: rt.eval("export default globalThis.aborted"), "the guest saw the abort", timeout=10)
    await rt.dispose()


async def test_a_spinning_handler_after_a_dispatch_timeout_is_stopped(conn: client.Connection) -> None:
    rt = await conn.create_runtime(cpu_limit=1.0)
    await rt.eval(SPIN_HANDLER)
    with pytest.raises(client.Timeout):
        await rt.dispatch_request(client.Request("GET", "http://x/"), timeout=0.3)

    await await_until(lambda: rt.lost, "the daemon stopped the spinning runtime", timeout=30)
    assert isinstance(rt.lost, client.CpuLimitExceeded), rt.lost


# ---- operator maximums ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory):
    b = Broker(
        tmp_path_factory.mktemp("capped"),
        "--max-memory-mb", "64", "--max-eval-timeout", "5", "--max-cpu-limit", "2", "--pool-size", "1",
    )  # fmt: skip
    yield b
    b.stop()


async def test_clients_cannot_exceed_the_operator_maximums(capped: Broker) -> None:
    async with await client.connect(capped.frontend, timeout=15) as conn:
        for kw in ({"memory_limit_mb": 65}, {"eval_timeout": 6}, {"cpu_limit": 3}, {"request_cpu": 3}):
            with pytest.raises(client.RequestRejected, match="on this daemon"):
                await conn.create_runtime(**kw)  # type: ignore[arg-type]
        rt = await conn.create_runtime(memory_limit_mb=64, eval_timeout=5, cpu_limit=2)
        with pytest.raises(client.RequestRejected, match="on this daemon"):
            await rt.eval("1", timeout=10)
        assert await rt.eval("export default 3", timeout=5) == 3
        await rt.dispose()


# ---- memory ----------------------------------------------------------------------------------------

HOG = (
    "globalThis.keep = []; const t = Date.now();"
    "while (Date.now() - t < 3000) { const b = new Uint8Array(8 << 20); b.fill(1); keep.push(b); }"
    "export default keep.length;"
)


def _deno_anon_mb(parent: int) -> dict[int, float]:
    """Private resident memory (RssAnon: what a cgroup charges it; its mapped Deno binary is shared
    page cache) of every Deno process under ``parent`` (the daemon's spawner starts them)."""
    peaks = {}
    for pid in descendants(parent):
        status = Path(f"/proc/{pid}/status")
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        if fields.get("Name", "").strip() == "deno":
            peaks[int(status.parent.name)] = int(fields.get("RssAnon", "0 kB").split()[0]) / 1024
    return peaks


@pytest.fixture(scope="module", params=["cgroup", "watchdog"])
def memory_broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    extra = ["--no-cgroups"] if request.param == "watchdog" else []
    b = Broker(tmp_path_factory.mktemp(request.param), "--pool-size", "1", *extra)
    if request.param == "cgroup" and "memory caps are cgroups" not in b.log.read_text():
        b.stop()
        pytest.skip("this host lets the daemon create no memory cgroup")
    yield request.param, b
    b.stop()


#: How far above its cap a process may get (MiB), measured on the development machine: none with
#: a cgroup (the kernel refuses the page); with the watchdog alone (50 ms samples near the cap) a
#: guest that allocates ~2 GB/s got 40-60 MiB over (the old 250 ms watchdog: 250-600 MiB).
OVERSHOOT = {"cgroup": 16, "watchdog": 128}


async def test_memory_outside_the_heap_is_capped_without_overshoot(memory_broker: tuple[str, Broker]) -> None:
    """ArrayBuffers allocated as fast as the guest can: the process never holds more than its cap
    (2 x 64 + 128 = 256 MiB; sampled every 5 ms) plus the documented overshoot. With a cgroup the
    kernel refuses the pages; without one the daemon's fast watchdog stops it within a sample or two."""
    kind, broker = memory_broker
    peak = 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, *_deno_anon_mb(broker.pid).values(), 0.0)
            await asyncio.sleep(0.005)

    async with await client.connect(broker.frontend, timeout=15) as conn:
        rt = await conn.create_runtime(memory_limit_mb=64)
        sampler = asyncio.ensure_future(sample())
        try:
            with pytest.raises(client.MemoryLimitExceeded):
                await rt.eval(HOG, timeout=10)
        finally:
            sampler.cancel()
        assert 0 < peak <= 256 + OVERSHOOT[kind], f"peak private memory {peak:.0f} MiB for a 256 MiB cap"
        await _other_tenant_works(conn)
