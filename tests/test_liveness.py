"""Issue 9, liveness: stall forgiveness, placement on fresh daemons, paused daemons, create bursts.

The first half drives wire/liveness.py and broker/core.py without sockets; the second starts the
real broker, daemons and Deno, stops a daemon with SIGSTOP and bursts creates at one. Heartbeats
are 0.2 s there, with the default liveness (5): a daemon is dropped after 1 s of silence."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import client
from broker.core import DAEMON
from daemon.spawner import GUEST_NICE
from scripts.kit.procs import deno_children, deno_left, deno_pids, describe
from tests.conftest import Broker, Daemon, await_until, joined
from tests.test_broker_core import D1, D2, World, bag, to_client, to_daemon
from wire import liveness
from wire import messages as M
from wire import protocol as P
from wire.messages import CreateRuntime, Heartbeat, error

# ---- forgiveness (sans-I/O) -------------------------------------------------------------------------------


def test_forgive_excuses_only_silence_that_overlapped_our_stall() -> None:
    assert liveness.forgive(10.0, 14.0, 0.0) == 10.0  # no stall: nothing forgiven
    assert liveness.forgive(10.0, 14.0, 1.5) == 11.5  # silent since before the stall: the stall is excused
    # heard from within the stall window (its messages were read as soon as we woke): all silence excused,
    # but never more: last seen stays at most now
    assert liveness.forgive(13.0, 14.0, 3.0) == 14.0
    assert liveness.forgive(14.0, 14.0, 15.0) == 14.0  # heard from right after a 15 s stop: not pushed to 29
    assert liveness.forgive(15.0, 14.0, 2.0) == 15.0  # (a clock in the future is left alone)


def test_a_peer_heard_from_after_the_brokers_stall_gets_the_usual_timeout_not_more() -> None:
    """The broker stalls for 15 s; the daemon's queued heartbeats are read right after, then it falls
    silent: it is dropped after heartbeat x liveness, not after that plus 15 s (the old `+= stall`)."""
    w = World()
    w.join(D1)
    w.now = 20.0  # the broker's loop was stopped from 5.0 to 20.0; it reads what queued meanwhile first
    assert w.daemon(D1, Heartbeat(load=0)) == []
    assert w.core.tick(20.0, stall=15.0) == [to_daemon(D1, Heartbeat())]
    assert w.core.daemons[D1].last_seen == 20.0
    assert w.core.tick(23.0) == [to_daemon(D1, Heartbeat())]  # 3.0 s: not more than 3 x 1 s
    assert w.core.tick(23.1) == []  # 3.1 s of silence: lost (it would have lived until 38 s)
    assert w.core.daemons == {}


def test_the_default_liveness_survives_a_stall_of_liveness_minus_one_heartbeats() -> None:
    """A daemon that sent `hb` just before it froze for (liveness - 1) heartbeats is never dropped,
    whatever the phase of the broker's ticks; frozen for liveness + 1, it always is."""
    hb, n = 1.0, liveness.LIVENESS
    for phase in (0.0, 0.3, 0.7, 0.99):
        for frozen, survives in (((n - 1) * hb - 0.01, True), ((n + 1) * hb + 0.01, False)):
            core = World().core
            core.daemon_liveness = n
            core.from_daemon(D1, M.Ready(capacity=1, control="tcp://h:1").frames(), None, 0.0)
            ticks = [phase + k * hb for k in range(1, int(frozen / hb) + 3)]
            for t in (t for t in ticks if t < frozen):
                core.tick(t)
            core.from_daemon(D1, Heartbeat().frames(), None, frozen)  # it woke up and said so
            assert (D1 in core.daemons) is survives, (phase, frozen)


# ---- placement prefers daemons heard from lately (sans-I/O) -------------------------------------------------


def test_a_create_is_not_placed_on_a_daemon_silent_for_more_than_fresh_heartbeats() -> None:
    w = World()
    w.hello(b"client-a")
    w.join(D1, capacity=8)  # more free room: chosen while it is fresh
    w.join(D2, capacity=2)
    assert w.place(b"client-a", 1)[0] == D1
    w.now = 1.4  # both last heard from at 0.0: 1.4 heartbeats of silence is fresh enough
    assert w.place(b"client-a", 2)[0] == D1
    w.now = 1.6
    w.daemon(D2, Heartbeat(load=0))  # D1 is silent for 1.6 heartbeats (stopped?), D2 just spoke
    assert w.place(b"client-a", 3)[0] == D2
    w.now = 3.2  # nobody fresh (e.g. the broker itself stalled): by free room again
    assert w.place(b"client-a", 4)[0] == D1


def test_a_create_its_daemon_never_answered_is_placed_again_where_there_is_room() -> None:
    """The chosen daemon is lost before it answers a create: the create goes to another daemon under
    the same runtime id and the client only sees its ok; without room elsewhere, `runtime_lost`."""
    w = World()
    a = b"client-a"
    w.hello(a)
    w.join(D1, capacity=8)
    w.join(D2, capacity=1)
    _, rt = w.place(a, 1)
    _, rt_too = w.place(a, 2)  # both on D1 (more room)
    w.now = 0.9
    w.daemon(D2, Heartbeat(load=0))
    w.now = 3.5  # D1 silent for 3.5 s: lost; D2 has room for one of them
    placed = CreateRuntime(id=1, console=True, c=w.s[a], rt=rt, owner=w.tokens[a])
    lost = "daemon daemon-1 was lost (no heartbeat for 3.5s)"
    assert bag(w.core.tick(w.now)) == bag(
        [
            to_daemon(D2, placed),
            to_client(a, error(P.E_RUNTIME_LOST, lost, 2)),
            to_client(a, M.RuntimeLost(rt=rt_too, message=lost)),
            to_daemon(D2, Heartbeat()),
            to_client(a, Heartbeat()),
        ]
    )
    assert w.core.runtimes[rt].daemon == D2 and w.core.daemons[D2].runtimes == {rt}
    ok = M.CreateOk(id=1, rt=rt, pid=7, control="tcp://daemon-2:1", daemon="daemon-2")
    assert w.daemon(D2, M.CreateOk(id=1, c=w.s[a], rt=rt, pid=7)) == [to_client(a, ok)]
    assert w.daemon(D1, M.CreateOk(id=1, c=w.s[a], rt=rt, pid=3)) == []  # the lost one, late: ignored


def test_a_daemon_the_broker_does_not_know_is_told_so_on_its_heartbeat() -> None:
    """After the broker dropped it (or restarted), a daemon's next `hb` is answered `unknown_client`,
    so it registers again within a heartbeat instead of waiting out heartbeat x liveness of silence."""
    w = World()
    w.join(D1)
    w.now = 3.5
    assert w.core.tick(w.now) == []  # dropped
    told = error(P.E_UNKNOWN_DAEMON, "unknown daemon: register (ready) again")
    assert w.daemon(D1, Heartbeat(load=2)) == [to_daemon(D1, told)]
    assert w.daemon(D1, M.RuntimeLost(rt="0" * 32, code=P.E_RUNTIME_LOST, message="x")) == []  # the rest: dropped
    # a flood of heartbeats is throttled like any refused message
    replies = [w.daemon(D1, Heartbeat()) for _ in range(200)]
    assert sum(len(r) for r in replies) < 110 and all(o.to == DAEMON for r in replies for o in r)


# ---- real processes --------------------------------------------------------------------------------------

HB = "0.2"
TIMEOUT = float(HB) * liveness.LIVENESS  # the default liveness: the tests pass no --liveness


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Broker, Daemon, Daemon]]:
    """A broker without a local daemon; d1 has more room than d2, so it is chosen while fresh, and
    no pool: its Deno processes are its runtimes'."""
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", HB)
    d1 = Daemon(tmp_path, b, "d1", "--heartbeat", HB, "--max-runtimes", "16", "--pool-size", "0")
    d2 = Daemon(tmp_path, b, "d2", "--heartbeat", HB, "--max-runtimes", "4", "--pool-size", "1")
    try:
        yield b, d1, d2
    finally:
        for p in (d1, d2):
            if p.p.poll() is None:  # a test that failed while it was stopped
                os.kill(p.pid, signal.SIGCONT)
            p.stop()
        b.stop()


def _count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


STREAM = """
serve(() => { let i = 0; return new Response(new ReadableStream({ async pull(c) {
  await new Promise(r => setTimeout(r, 10));
  if (i === 200) { c.close(); return; }
  c.enqueue(new TextEncoder().encode(`chunk ${i++};`));
} })); });
"""
WHOLE = "".join(f"chunk {i};" for i in range(200)).encode()


async def _two_runtimes_on_d1(b: Broker, conn: client.Connection) -> list[client.Runtime]:
    """Once both daemons have joined, two runtimes: the pair's placement puts both on d1."""
    await await_until(lambda: joined(b, "d1", "d2"), "both daemons have joined", timeout=60)
    rts = [await conn.create_runtime() for _ in range(2)]
    assert [r.daemon for r in rts] == ["d1", "d1"]
    return rts


async def test_a_daemon_paused_for_half_the_liveness_timeout_loses_nothing(pair) -> None:
    b, d1, _d2 = pair
    async with await client.connect(b.frontend, timeout=20) as conn:
        rts = await _two_runtimes_on_d1(b, conn)
        await rts[0].eval(STREAM)
        resp = await rts[0].dispatch_request(client.Request("GET", "http://x/"))
        assert resp.body is not None
        first = await resp.body.read_chunk()  # the stream is flowing
        os.kill(d1.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        await asyncio.sleep(TIMEOUT / 2)  # the pause under test (the SIGCONT is the event, not a guess)
        os.kill(d1.pid, signal.SIGCONT)
        print(f"d1 stopped for {time.monotonic() - stopped:.2f}s (timeout {TIMEOUT:g}s)")
        rest = await asyncio.wait_for(resp.body.read(), 30)
        assert first is not None and first + rest == WHOLE  # intact: every chunk, in order, once
        for r in rts:
            assert await r.eval(f"export default '{r.id}'") == r.id
        assert _count(b.log, "was lost") == 0 and _count(b.log, "daemon d1 joined") == 1
        assert _count(d1.log, "registering again") == 0


async def test_a_daemon_paused_past_the_timeout_disposes_its_runtimes_and_rejoins_at_once(pair) -> None:
    b, d1, _d2 = pair
    async with await client.connect(b.frontend, timeout=20) as conn:
        rts = await _two_runtimes_on_d1(b, conn)
        guests = set(deno_children(d1.pid))
        assert len(guests) == 2, f"d1 should run a Deno process per runtime: {describe(guests)}"
        pending = asyncio.ensure_future(rts[0].eval("await new Promise(r => setTimeout(r, 60000))"))

        async def under_way() -> bool:
            return (await rts[0].stats())["daemon"]["evals"] == 1

        await await_until(under_way, "the eval is running in d1's guest")

        os.kill(d1.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        # d1 has more room: while fresh it gets the create, which goes to d2 once d1 is dropped; once
        # silent for FRESH heartbeats, d2 gets it at once (before: it failed with d1, runtime_lost)
        elsewhere = await conn.create_runtime(timeout=10)
        assert elsewhere.daemon == "d2"
        # the owner hears promptly that d1's runtimes are lost
        with pytest.raises(client.RuntimeLost, match="d1"):
            await asyncio.wait_for(pending, 10)
        assert time.monotonic() - stopped < TIMEOUT + 4 * float(HB) + 1.0
        await await_until(lambda: time.monotonic() - stopped > 3 * TIMEOUT, "d1 has been stopped for 3 timeouts")
        # while it was stopped, its Deno processes lived on (they are not stopped)
        assert guests & deno_pids(), "d1's Deno processes should still run while it is stopped"

        os.kill(d1.pid, signal.SIGCONT)
        resumed = time.monotonic()
        await await_until(lambda: _count(b.log, "daemon d1 joined") == 2, "d1 joined again", timeout=20)
        rejoined = time.monotonic() - resumed
        print(f"d1 stopped {resumed - stopped:.2f}s; joined again {rejoined:.2f}s after SIGCONT (hb {HB}s)")
        assert "does not know this daemon: registering again" in d1.log.read_text(errors="replace")
        left = await asyncio.to_thread(deno_left, guests)
        assert not left, f"Deno processes of d1's dropped runtimes outlived it: {describe(left)}"
        # nor does a runtime it started for a create it read only on waking (placed on d2 meanwhile)
        await await_until(lambda: not deno_children(d1.pid), "d1 runs no Deno process", timeout=10)
        assert rejoined < 4 * float(HB) + 1.0, f"d1 joined again only {rejoined:.2f}s after SIGCONT"

        # its old runtimes are gone for good (the broker's tombstones answer), new ones work there
        for r in rts:
            with pytest.raises(client.RuntimeLost):
                await conn.call(lambda i, rt=r.id: M.Eval(id=i, rt=rt, source=b"export default 1"), M.EvalOk)
        fresh = [await conn.create_runtime() for _ in range(2)]
        assert "d1" in {r.daemon for r in fresh}
        for r in [*fresh, elsewhere]:
            assert await r.eval("export default 6 * 7") == 42


# ---- a burst of creates -------------------------------------------------------------------------------------

BURST = 150
STARTING = 2
QUEUE_TIMEOUT = 2.0


async def test_a_burst_of_creates_is_started_a_few_at_a_time_and_the_excess_refused_clearly(tmp_path: Path) -> None:
    """150 concurrent creates on a daemon with 5 live runtimes: at most --max-starting processes boot at
    once, a create that waited --start-queue-timeout for a turn is refused with `busy` (client.Busy),
    every other create succeeds, the live runtimes keep answering and the daemon is never dropped."""
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", HB, "--max-runtimes-per-client", "512")
    d = Daemon(tmp_path, b, "d1", "--heartbeat", HB, "--max-runtimes", "256", "--pool-size", "1",
               "--max-starting", str(STARTING), "--start-queue-timeout", str(QUEUE_TIMEOUT))  # fmt: skip
    try:
        async with await client.connect(b.frontend, timeout=30) as conn:
            await await_until(lambda: joined(b, "d1"), "d1 has joined", timeout=60)
            live = [await conn.create_runtime() for _ in range(5)]
            booting: list[int] = []  # Deno processes of d1 that are not (yet) a runtime, sampled

            async def sample() -> None:
                while True:
                    procs = await asyncio.to_thread(deno_children, d.pid)
                    booting.append(len(procs) - len(conn.runtimes))
                    await asyncio.sleep(0.05)

            async def answer(rt: client.Runtime) -> float:
                t0 = time.monotonic()
                assert await rt.eval("export default 1") == 1
                return time.monotonic() - t0

            sampler = asyncio.ensure_future(sample())
            t0 = time.monotonic()
            burst = [asyncio.ensure_future(conn.create_runtime(timeout=30)) for _ in range(BURST)]
            evals = []
            while not all(f.done() for f in burst):  # the live runtimes answer throughout the burst
                evals.append(await asyncio.wait_for(answer(live[len(evals) % 5]), 10))
                await asyncio.wait(burst, timeout=0.05)
            took = time.monotonic() - t0
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            created = [f.result() for f in burst if f.exception() is None]
            refused = [f.exception() for f in burst if f.exception() is not None]
            print(
                f"burst of {BURST}: {len(created)} created, {len(refused)} busy in {took:.1f}s; "
                f"live evals max {max(evals):.3f}s; Deno processes not yet runtimes at most {max(booting)}; "
                f"daemon heartbeats late at most {_max_lateness(d.log):.3f}s"
            )
            assert all(isinstance(e, client.Busy) and "retry later" in str(e) for e in refused), refused[:3]
            assert refused, "a burst this size should outlast the start queue's deadline"
            assert len(created) >= STARTING, "creates should progress while the burst is queued"
            # pool refills + cold starts, and runtimes the client has not heard of yet: a small bound
            assert max(booting) <= STARTING + 1 + 4, f"too many processes booting at once: {max(booting)}"
            for r in live:
                assert await r.eval("export default 2") == 2
            # guests yield the CPU to the daemon (their boots and JavaScript cannot starve its loop)
            niceness = {pid: _nice(pid) for pid in deno_children(d.pid)}
            assert set(niceness.values()) == {_nice(d.pid) + GUEST_NICE}, niceness
            assert _count(b.log, "was lost") == 0 and _count(d.log, "registering again") == 0
    finally:
        d.stop()
        b.stop()


def _max_lateness(log: Path) -> float:
    """The daemon's largest heartbeat delay it logged (its event loop's longest stall)."""
    text = log.read_text(errors="replace")
    return max((float(x) for x in re.findall(r"heartbeat ([0-9.]+)s late", text)), default=0.0)


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
