"""Issue 9: at a resource limit of the daemon (its stream cap, its file descriptors) the one call
that exceeded it gets a clear error, and every other stream and the runtime go on intact."""

from __future__ import annotations

import os
import resource
import zlib
from pathlib import Path

import pytest

import client
from tests.conftest import Broker, Daemon, await_until, create_when_ready, joined

#: serve(): GET /?n=N answers N chunks of 64 KiB, chunk i filled with the byte i % 251.
SERVE_CHUNKS = """
serve({ fetch(req) {
  const n = Number(new URL(req.url).searchParams.get("n"));
  let i = 0;
  return new Response(new ReadableStream({ pull(c) {
    if (i >= n) { c.close(); return; }
    c.enqueue(new Uint8Array(65536).fill(i % 251)); i++;
  } }));
} });
"""
CHUNKS = 24  # 1.5 MiB a body: more than the pipe holds, so every held stream keeps its pipe busy


def expected_crc(n: int) -> int:
    crc = 0
    for i in range(n):
        crc = zlib.crc32(bytes([i % 251]) * 65536, crc)
    return crc


async def open_streams(rt: client.Runtime, count: int) -> list[client.Response]:
    """``count`` streamed responses, each connected (its first chunk read), none finished."""
    held = []
    for _ in range(count):
        resp = await rt.dispatch_request(client.Request("GET", f"http://x/?n={CHUNKS}"))
        first = await resp.body.read_chunk()
        assert first == bytes(65536)  # chunk 0 (a read never splits a 64 KiB guest chunk)
        held.append(resp)
    return held


async def finish_intact(held: list[client.Response]) -> None:
    want = expected_crc(CHUNKS)
    for resp in held:
        rest = await resp.body.read()
        assert zlib.crc32(rest, zlib.crc32(bytes(65536))) == want and len(rest) == (CHUNKS - 1) * 65536


async def refused_busy(rt: client.Runtime) -> client.RequestRejected:
    with pytest.raises(client.RequestRejected) as info:
        await rt.dispatch_request(client.Request("GET", f"http://x/?n={CHUNKS}"))
    assert info.value.code == "busy", info.value
    return info.value


@pytest.fixture
def cluster(tmp_path: Path):
    procs: list = []

    def start(*daemon_args: str) -> tuple[Broker, Daemon]:
        b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", "0.5")
        procs.append(b)
        d = Daemon(tmp_path, b, "d1", "--heartbeat", "0.5", "--pool-size", "1", *daemon_args)
        procs.append(d)
        return b, d

    yield start
    for p in reversed(procs):
        p.stop()


async def test_the_stream_over_the_daemons_cap_gets_busy_and_the_others_finish(cluster) -> None:
    b, _ = cluster("--max-streams", "4")
    await await_until(lambda: joined(b, "d1"), "d1 joined")
    async with await client.connect(b.frontend, timeout=15) as conn:
        called: list[client.Request] = []

        async def fetch(request: client.Request) -> client.Response:
            called.append(request)  # the daemon must refuse the upload before asking us
            return client.Response(status=500)

        rt = await create_when_ready(conn, fetch=fetch)

        async def upload_refused() -> dict:
            return await rt.eval(
                """
                const body = new ReadableStream({ pull(c) { c.enqueue(new Uint8Array(70000)); c.close(); } });
                let message = "";
                try { await fetch("http://up/", { method: "POST", body, duplex: "half" }); }
                catch (e) { message = String(e.message); }
                export default message;
                """
            )

        await rt.eval(SERVE_CHUNKS)
        held = await open_streams(rt, 4)
        error = await refused_busy(rt)
        assert "4 body pipes open" in error.message and "--max-streams 4" in error.message
        # a guest fetch whose upload needs a pipe fails in the guest; the runtime lives on
        assert "body pipes open" in await upload_refused() and not called
        assert await rt.eval("export default 6 * 7") == 42
        await finish_intact(held)
        # once the streams are acknowledged and closed, the cap admits new ones
        resp = await await_until(lambda: _try_stream(rt), "a stream admitted after the others ended")
        await finish_intact([resp])
        await rt.dispose()


async def _try_stream(rt: client.Runtime) -> client.Response | None:
    try:
        resp = await rt.dispatch_request(client.Request("GET", f"http://x/?n={CHUNKS}"))
    except client.RequestRejected as exc:
        assert exc.code == "busy", exc
        return None
    assert await resp.body.read_chunk() == bytes(65536)
    return resp


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_daemon_short_of_file_descriptors_refuses_one_stream_not_the_runtime(cluster) -> None:
    """The descriptor limit is lowered under the running daemon (prlimit(2)): the stream that would
    need more gets `busy` naming the limit; the open ones finish intact, the runtime works on."""
    b, d = cluster()
    await await_until(lambda: joined(b, "d1"), "d1 joined")
    async with await client.connect(b.frontend, timeout=15) as conn:
        rt = await create_when_ready(conn)
        await rt.eval(SERVE_CHUNKS)
        base = await open_streams(rt, 1)  # the first stream's socket set-up is paid for
        await finish_intact(base)
        # room for exactly 3 more pipes: wire.sockets keeps FD_RESERVE descriptors for the rest
        # (8 per hosted runtime) and counts FDS_PER_PIPE per pipe
        from daemon.daemon import FDS_PER_RUNTIME
        from wire.sockets import FD_RESERVE, FDS_PER_PIPE

        limit = FD_RESERVE + FDS_PER_RUNTIME + 3 * FDS_PER_PIPE + 1
        assert open_fds(d.pid) < limit - 3 * FDS_PER_PIPE, "the daemon already holds more descriptors than planned"
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (limit, limit))
        held = await open_streams(rt, 3)
        error = await refused_busy(rt)
        assert f"{limit} file descriptors" in error.message
        assert await rt.eval("export default 6 * 7") == 42
        await finish_intact(held)
        resp = await await_until(lambda: _try_stream(rt), "a stream admitted after the others ended")
        await finish_intact([resp])
        await rt.dispose()
