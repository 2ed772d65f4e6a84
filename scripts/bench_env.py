"""What scripts/bench.py runs its scenarios on: processes it owns, HTTP servers, end clients and
the baselines (a plain aiohttp reverse proxy, a bare pyzmq PUSH/PULL pair).

Everything binds 127.0.0.1. Nothing here belongs to the product; it only drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import zmq
import zmq.asyncio
from aiohttp import web
from bench_upstream import BLOCK, block_chunks

from tests.procs import descendants

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
MiB = 1 << 20
#: HTTP headers a proxy never forwards (one hop's framing, not the message).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "content-length", "host"}
)  # fmt: skip


# ---- processes --------------------------------------------------------------------------------------


class Proc:
    """A child process in its own session, with stderr in a log file; ``stop`` leaves nothing behind."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._logf = self.log.open("wb")
        self.p = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._logf, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.ready_line = ""

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_ready(self, prefix: str, timeout: float) -> str:
        """Wait for a stdout line starting with ``prefix``; raise (with the log tail) if none comes."""
        found: list[str] = []

        def read() -> None:
            assert self.p.stdout is not None
            for raw in self.p.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith(prefix):
                    found.append(line)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            raise RuntimeError(f"{self.name} did not print {prefix!r} within {timeout:g}s: {self.tail()}")
        self.ready_line = found[0]
        return self.ready_line

    def field(self, key: str) -> str:
        for part in self.ready_line.split():
            if part.startswith(key + "="):
                return part.split("=", 1)[1]
        raise RuntimeError(f"{self.name} ready line has no {key}=: {self.ready_line!r}")

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, SIGKILL; then SIGKILL whatever it started that outlived it.

        The daemon puts each Deno process in a process group of its own, so the descendants are
        collected before the signal rather than found through the group afterwards.
        """
        children = [(pid, start_time(pid)) for pid in descendants(self.p.pid)] if self.p.poll() is None else []
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.p.kill()
                self.p.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.p.pid, signal.SIGKILL)  # the group it led
        for pid, started in children:
            if started is not None and start_time(pid) == started:  # still that process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._logf.close()


class Processes:
    """The processes one bench run owns, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], ready: str, timeout: float = 90.0) -> Proc:
        proc = Proc(name, argv, self.log_dir)
        self.procs.append(proc)
        proc.wait_ready(ready, timeout)
        return proc

    def upstream(self) -> Proc:
        return self.start("upstream", [sys.executable, str(SCRIPTS / "bench_upstream.py")], "ready ")

    def broker(self, *extra: str) -> Proc:
        argv = [
            sys.executable,
            "-m",
            "broker",
            "--frontend",
            f"tcp://127.0.0.1:{free_port()}",
            "--backend",
            f"tcp://127.0.0.1:{free_port()}",
            *extra,
        ]
        return self.start("broker", argv, "ready ")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- /proc --------------------------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def rss_mib(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes sharing them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 if it is gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def tcp_queued(port: int) -> int:
    """Bytes in the send queues of the server ``port``'s own established TCP connections: what the
    upstream has written that is still in *its* kernel, not yet with any component of ours."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, state, queues = cols[1], cols[3], cols[4]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:  # ESTABLISHED, server side
                    total += int(queues.split(":")[0], 16)
    return total


def deno_children(pid: int) -> list[int]:
    """The Deno processes under ``pid`` (the broker's embedded daemon starts them)."""
    out = []
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if b"deno" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
    return out


# ---- HTTP servers -----------------------------------------------------------------------------------


async def start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free 127.0.0.1 port (no access log, a backlog for 1,000 connects)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def proxy_app(upstream: str, session: aiohttp.ClientSession) -> web.Application:
    """The reverse proxy a user would write instead: stream both bodies with ``iter_any()``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content.iter_any() if request.can_read_body else None
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=data) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionError:
                pass  # the end client hung up; leaving the block closes the upstream connection
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.asynccontextmanager
async def proxy(upstream: str) -> AsyncIterator[str]:
    """A running reverse proxy in front of ``upstream``; yields its URL."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    runner, url = await start_site(proxy_app(upstream, session))
    try:
        yield url
    finally:
        await runner.cleanup()
        await session.close()


# ---- end clients -----------------------------------------------------------------------------------------


def end_client(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60),
    )


async def read_all(session: aiohttp.ClientSession, url: str, expect: int) -> float:
    """GET ``url`` and read the body to the end; returns seconds from request to last byte."""
    t0 = time.perf_counter()
    n = 0
    async with session.get(url) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            n += len(chunk)
    dt = time.perf_counter() - t0
    if n != expect:
        raise RuntimeError(f"read {n} bytes from {url}, expected {expect}")
    return dt


async def read_crc(session: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """GET ``url``; returns (bytes, crc32) of the body."""
    crc, n = 0, 0
    async with session.get(url) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
    return n, crc


def expected_crc(size: int) -> int:
    crc = 0
    for chunk in block_chunks(size):
        crc = zlib.crc32(chunk, crc)
    return crc


async def sse_arrivals(session: aiohttp.ClientSession, url: str, expect: int) -> list[float]:
    """GET an event stream; returns when each event arrived, in seconds since the request was sent."""
    arrivals: list[float] = []
    buf = b""
    t0 = time.perf_counter()
    async with session.get(url) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            now = time.perf_counter() - t0
            buf += chunk
            while b"\n\n" in buf:
                _, buf = buf.split(b"\n\n", 1)
                arrivals.append(now)
    if len(arrivals) != expect:
        raise RuntimeError(f"got {len(arrivals)} events from {url}, expected {expect}")
    return arrivals


async def body_source(size: int) -> AsyncIterator[bytes]:
    """An upload body: ``size`` bytes in 64 KiB chunks."""
    for chunk in block_chunks(size):
        yield chunk


async def upload(session: aiohttp.ClientSession, url: str, size: int) -> float:
    """POST ``size`` bytes (streamed) to an upstream /upload; returns seconds until its answer."""
    t0 = time.perf_counter()
    async with session.post(url, data=body_source(size)) as r:
        r.raise_for_status()
        got = (await r.json())["size"]
    dt = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"the upstream counted {got} bytes, expected {size}")
    return dt


async def upstream_stats(session: aiohttp.ClientSession, upstream: str, key: str) -> dict | None:
    async with session.get(f"{upstream}/stats", params={"key": key}) as r:
        return await r.json()


# ---- the transport's ceiling ------------------------------------------------------------------------


async def raw_zmq_seconds(size: int, frame: int = 64 * 1024, hwm: int = 16) -> float:
    """Move ``size`` bytes over a bare asyncio PUSH/PULL pair on TCP loopback, ``frame`` at a time."""
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        for sock in (pull, push):
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        block = BLOCK[:frame] if frame <= len(BLOCK) else bytes(frame)
        frames, rest = divmod(size, frame)

        async def send() -> None:
            for _ in range(frames):
                await push.send(block, copy=False)
            if rest:
                await push.send(block[:rest])
            await push.send(b"")

        async def receive() -> int:
            n = 0
            while True:
                msg = await pull.recv(copy=False)
                if len(msg) == 0:
                    return n
                n += len(msg)

        t0 = time.perf_counter()
        _, got = await asyncio.gather(send(), receive())
        dt = time.perf_counter() - t0
        if got != size:
            raise RuntimeError(f"raw zmq moved {got} bytes, expected {size}")
        return dt
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
