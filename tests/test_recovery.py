"""Issue 9: a broker restart or failover loses nothing that lives on daemons; sessions resume;
named runtimes outlive their connection; what a dead client leaves is reclaimed; a daemon that was
dropped after a long pause learns it and cleans up. Real processes, SIGKILL and SIGSTOP
(protocol.md 3.3 Recovery, docs/design.md 2.15)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

import client
from scripts.kit.procs import deno_children, deno_pids
from tests.conftest import ROOT, Broker, Daemon, await_until, create_when_ready, joined, make_keys
from wire.auth import load_keypair, load_public_key

T = TypeVar("T")
HB = "0.2"  # heartbeats of every process here: losses are noticed within a second
CHUNKS, CHUNK = 40, 64 * 1024

# A response body the guest produces slowly (40 chunks, one per 50 ms), each byte a function of
# its position, so the client can check every byte after the broker went away mid-stream.
SLOW_BODY = f"""
globalThis.n = 41;
serve(() => {{
  let i = 0;
  return new Response(new ReadableStream({{
    async pull(c) {{
      if (i >= {CHUNKS}) {{ c.close(); return; }}
      const chunk = new Uint8Array({CHUNK});
      for (let k = 0; k < chunk.length; k++) chunk[k] = (i * 7 + k) & 255;
      c.enqueue(chunk);
      i++;
      await new Promise((r) => setTimeout(r, 50));
    }},
  }}));
}});
"""


def expected_digest() -> str:
    h = hashlib.sha256()
    for i in range(CHUNKS):
        h.update(bytes((i * 7 + k) & 255 for k in range(CHUNK)))
    return h.hexdigest()


async def retrying(call: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
    """What an application does with a retryable error: try again, within a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except client.Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def read_all(body: client.Body) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    async for chunk in body:
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def brokers(tmp: Path, n: int, *extra: str) -> list[Broker]:
    return [
        Broker(tmp, "--no-local-daemon", "--heartbeat", HB, "--liveness", "3", "--client-liveness", "5", *extra,
               name=f"broker{i}")
        for i in range(n)
    ]  # fmt: skip


async def test_a_broker_restart_loses_no_runtime_no_state_and_no_byte_in_flight(tmp_path: Path) -> None:
    (b,) = brokers(tmp_path, 1)
    d = Daemon(tmp_path, b, "d1", "--heartbeat", HB, "--liveness", "3", "--pool-size", "1")
    try:
        async with await client.connect(b.frontend, timeout=10, reconnect=30) as conn:
            rt = await create_when_ready(conn)
            await rt.eval(SLOW_BODY)
            before = set(deno_children(d.pid))
            resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
            assert resp.body is not None
            reading = asyncio.ensure_future(read_all(resp.body))
            # an eval that is still running in the guest when the broker dies (it ends there later)
            pending = asyncio.ensure_future(rt.eval("await new Promise((r) => setTimeout(r, 1500))"))
            await await_until(lambda: rt.stats(), "the runtime answers stats")  # the eval is at the daemon
            b.stop(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(client.Unavailable):  # in flight through the broker: retryable
                await asyncio.wait_for(pending, 10)
            assert time.monotonic() - t0 < 5
            assert not reading.done()  # the body streams on its pipe, past the broker
            b.restart()
            back = time.monotonic()
            assert await retrying(lambda: rt.eval("export default globalThis.n + 1")) == 42  # same state
            restored = time.monotonic() - back
            assert conn.reconnects == 1 and rt.lost is None
            n, digest = await asyncio.wait_for(reading, 30)
            assert (n, digest) == (CHUNKS * CHUNK, expected_digest())  # 0 bytes lost
            assert set(deno_children(d.pid)) == before  # the same Deno processes: nothing re-created
            assert restored < 5, f"service restored {restored:.2f}s after the broker was back"
            print(f"service restored {restored * 1000:.0f} ms after the broker printed ready")
            # a new runtime, and the old one's counters back to zero on every hop
            assert await (await conn.create_runtime()).eval("export default 1") == 1

            async def drained() -> bool:
                stats = await rt.stats()
                return all(v == 0 for hop in stats.values() for v in hop.values())

            await await_until(drained, "every hop's counters are back to zero", timeout=10)
    finally:
        d.stop()
        b.stop()


async def test_a_standby_broker_takes_over_when_the_primary_is_killed(tmp_path: Path) -> None:
    primary, standby = brokers(tmp_path, 2)
    d = Daemon(tmp_path, [primary, standby], "d1", "--heartbeat", HB, "--liveness", "3", "--pool-size", "1")
    try:
        await await_until(lambda: joined(primary, "d1"), "d1 joined the primary", timeout=60)
        async with await client.connect([primary.frontend, standby.frontend], timeout=10, reconnect=30) as conn:
            rt = await create_when_ready(conn)
            await rt.eval("globalThis.n = 41")
            primary.stop(signal.SIGKILL)
            t0 = time.monotonic()
            assert await retrying(lambda: rt.eval("export default globalThis.n + 1")) == 42
            took = time.monotonic() - t0
            assert conn.endpoint == standby.frontend and joined(standby, "d1")
            assert took < 10, f"failover took {took:.1f}s"
            print(f"failover: service back {took * 1000:.0f} ms after SIGKILL of the primary")
            assert await (await conn.create_runtime()).eval("export default 2") == 2
    finally:
        d.stop()
        for b in (primary, standby):
            b.stop()


async def test_a_named_runtime_outlives_its_connection_then_is_reclaimed(tmp_path: Path) -> None:
    b = Broker(tmp_path, "--heartbeat", HB, "--client-liveness", "5", "--pool-size", "1")
    try:
        async with await client.connect(b.frontend, timeout=10) as first:
            named = await first.create_runtime(name="agent", keep_alive=3)
            plain = await first.create_runtime()
            await named.eval("globalThis.memory = ['remembered']")
            named_pid, plain_pid = named.pid, plain.pid
            assert {named_pid, plain_pid} <= deno_pids()
            session = first.session
            with pytest.raises(client.RequestRejected, match="already has a runtime named"):
                await first.create_runtime(name="agent")
        closed = time.monotonic()
        # the plain one went with its connection; the named one waits for its session
        await await_until(lambda: plain_pid not in deno_pids(), "the unnamed runtime was disposed", timeout=10)
        async with await client.connect(b.frontend, timeout=10) as stranger:
            with pytest.raises(client.UnknownRuntime):
                await stranger.runtime("agent")  # another session: not found, whatever the name
        async with await client.connect(b.frontend, timeout=10, session=session) as second:
            again = await second.runtime("agent")
            assert again.id == named.id and again.name == "agent"
            assert await again.eval("export default globalThis.memory") == ["remembered"]
            assert time.monotonic() - closed < 3
        closed = time.monotonic()
        await asyncio.sleep(0)  # the bye is on its way
        assert named_pid in deno_pids()
        await await_until(lambda: named_pid not in deno_pids(), "the named runtime was reclaimed", timeout=15)
        waited = time.monotonic() - closed
        assert waited > 2, f"reclaimed after {waited:.1f}s, before its keep_alive of 3s"
        async with await client.connect(b.frontend, timeout=10, session=session) as third:
            with pytest.raises(client.UnknownRuntime):
                await third.runtime("agent")
    finally:
        b.stop()


KILLED_CLIENT = """
import asyncio, json, sys
import client

async def main():
    conn = await client.connect(sys.argv[1], timeout=10)
    plain = await conn.create_runtime()
    named = await conn.create_runtime(name="kept", keep_alive=float(sys.argv[2]))
    print(json.dumps({"plain": plain.pid, "named": named.pid}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_clients_runtimes_are_reclaimed_after_its_grace_and_keep_alive(tmp_path: Path) -> None:
    b = Broker(tmp_path, "--heartbeat", HB, "--client-liveness", "5", "--reclaim-grace", "1", "--pool-size", "1")
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the test waits on it in a thread)
        [sys.executable, "-c", KILLED_CLIENT, b.frontend, "4"], cwd=ROOT, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        pids = json.loads(line)
        proc.kill()
        killed = time.monotonic()
        # the broker sees the connection close at once (else after its liveness, 5 x 0.2 s); then
        # unnamed: the reclaim grace (1 s); named: its keep_alive (4 s)
        await await_until(lambda: pids["plain"] not in deno_pids(), "the unnamed runtime was reclaimed", timeout=15)
        plain_after = time.monotonic() - killed
        assert pids["named"] in deno_pids(), "the named runtime must wait for its keep_alive"
        await await_until(lambda: pids["named"] not in deno_pids(), "the named runtime was reclaimed", timeout=20)
        named_after = time.monotonic() - killed
        assert 1 < plain_after < 10 and named_after > 4, (plain_after, named_after)
        print(f"killed client: unnamed runtime reclaimed after {plain_after:.1f}s, named after {named_after:.1f}s")
    finally:
        proc.kill()
        proc.wait(10)
        b.stop()


async def test_a_daemon_paused_past_its_liveness_is_dropped_and_cleans_up_when_it_resumes(tmp_path: Path) -> None:
    (b,) = brokers(tmp_path, 1)
    d1 = Daemon(tmp_path, b, "d1", "--heartbeat", HB, "--liveness", "3", "--pool-size", "1")
    try:
        async with await client.connect(b.frontend, timeout=10) as conn:
            rt = await create_when_ready(conn)
            await rt.eval("globalThis.n = 1")
            pid = rt.pid
            pending = asyncio.ensure_future(rt.eval("await new Promise(() => {})", timeout=60))
            await await_until(lambda: rt.stats(), "the runtime answers stats")
            os.kill(d1.pid, signal.SIGSTOP)
            try:
                with pytest.raises(client.RuntimeLost) as info:  # 3 x 0.2 s of silence: dropped
                    await asyncio.wait_for(pending, 10)
                assert not isinstance(info.value, client.Unavailable)
            finally:
                os.kill(d1.pid, signal.SIGCONT)
            resumed = time.monotonic()
            # it hears it was dropped, registers again, and the broker has it dispose what it declared lost
            await await_until(lambda: pid not in deno_pids(), "the dropped runtime's Deno is gone", timeout=10)
            await await_until(lambda: b.log.read_text().count("daemon d1 joined") >= 2, "d1 joined again", timeout=10)
            rejoined = time.monotonic() - resumed
            with pytest.raises(client.RuntimeLost):
                await rt.eval("1")
            fresh = await create_when_ready(conn)
            assert await fresh.eval("export default 7") == 7 and fresh.daemon == "d1"
            print(f"paused daemon: rejoined and cleaned up {rejoined * 1000:.0f} ms after SIGCONT")
    finally:
        d1.stop()
        b.stop()


PAUSED_CLIENT = """
import asyncio, json, sys
import client

async def main():
    conn = await client.connect(sys.argv[1], timeout=10, reconnect=30)
    rt = await conn.create_runtime()
    await rt.eval("globalThis.n = 1")
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        for _ in range(200):  # what an application does with a retryable error
            try:
                value = await rt.eval("export default ++globalThis.n")
                break
            except client.Unavailable:
                await asyncio.sleep(0.05)
        print(json.dumps({"value": value, "reconnects": conn.reconnects}), flush=True)

asyncio.run(main())
"""


async def test_a_client_paused_past_its_liveness_resumes_its_session(tmp_path: Path) -> None:
    b = Broker(tmp_path, "--heartbeat", HB, "--client-liveness", "5", "--reclaim-grace", "20", "--pool-size", "1")
    proc = subprocess.Popen(  # noqa: ASYNC220 (the test talks to it through its pipes, in a thread)
        [sys.executable, "-c", PAUSED_CLIENT, b.frontend], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def ask() -> dict[str, int]:
        stdin.write(b"go\n")
        stdin.flush()
        return json.loads(await asyncio.wait_for(asyncio.to_thread(stdout.readline), 30))

    async def pause(seconds: float) -> None:
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)  # the pause itself is what is under test
        finally:
            proc.send_signal(signal.SIGCONT)

    try:
        assert json.loads(await asyncio.wait_for(asyncio.to_thread(stdout.readline), 60)) == {"ready": True}
        await pause(0.3)  # under the broker's 5 x 0.2 s: nothing happens
        assert await ask() == {"value": 2, "reconnects": 0}
        await pause(3)  # the broker drops the connection; the runtime waits out the grace
        await await_until(lambda: "lost (no heartbeat" in b.log.read_text(), "the broker dropped the client")
        assert await ask() == {"value": 3, "reconnects": 1}  # the session resumed, state and all
    finally:
        proc.kill()
        proc.wait(10)
        b.stop()


async def test_with_curve_a_session_resumes_after_a_restart_only_from_its_owners_key(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ("broker", "daemon", "alice", "bob"), ("daemon", "alice", "bob"))
    s = keys / "secrets"
    curve = ("--curve-keypair", str(s / "broker.key_secret"), "--authorized-keys", str(keys / "authorized"))
    (b,) = brokers(keys, 1, *curve)
    d = Daemon(keys, b, "d1", "--curve-keypair", str(s / "daemon.key_secret"), "--broker-key", str(s / "broker.key"),
               "--heartbeat", HB, "--liveness", "3", "--pool-size", "1")  # fmt: skip
    broker_key = load_public_key(s / "broker.key")
    try:
        alice = await client.connect(b.frontend, keypair=load_keypair(s / "alice.key_secret"), broker_key=broker_key)
        async with alice:
            rt = await create_when_ready(alice)
            await rt.eval("globalThis.n = 41")
            b.stop(signal.SIGKILL)
            b.restart()
            assert await retrying(lambda: rt.eval("export default globalThis.n + 1")) == 42
            # bob holds the token (it leaked), but not alice's key: the session stays hers
            with pytest.raises(client.ConnectionLost, match="belongs to another key"):
                await client.connect(
                    b.frontend, keypair=load_keypair(s / "bob.key_secret"), broker_key=broker_key,
                    session=alice.session, timeout=5,
                )  # fmt: skip
            assert await rt.eval("export default globalThis.n") == 41
    finally:
        d.stop()
        b.stop()


async def test_a_daemon_stopped_with_sigterm_reports_its_runtimes_lost_at_once(tmp_path: Path) -> None:
    """Its runtime_lost notices go out before its broker link closes: owners need not wait for the
    broker's liveness timeout (here 5 x 1 s) to hear of it."""
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", "1", "--liveness", "5")
    d = Daemon(tmp_path, b, "d1", "--heartbeat", "1", "--liveness", "5", "--pool-size", "1")
    try:
        async with await client.connect(b.frontend, timeout=10) as conn:
            rt = await create_when_ready(conn)
            pending = asyncio.ensure_future(rt.eval("await new Promise(() => {})", timeout=60))
            await await_until(lambda: rt.stats(), "the runtime answers stats")
            t0 = time.monotonic()
            d.stop(signal.SIGTERM)
            with pytest.raises(client.RuntimeLost) as info:
                await asyncio.wait_for(pending, 15)
            took = time.monotonic() - t0
            assert "shutting down" in str(info.value), info.value
            assert took < 4, f"the owner heard of the loss after {took:.1f}s, as if the daemon had died"
    finally:
        d.stop()
        b.stop()
