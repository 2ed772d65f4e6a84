"""Multi-host for real (issue 9, item 6): a broker, two daemons and a client on hosts of their own.

    python -m scripts.multihost [--size-mib 64] [--delay-ms 10] [--rounds 3] [--json PATH]

Each host is a network namespace (root only; nothing is configured in the root namespace, and
traffic goes only to addresses of these namespaces). A bridge in a namespace of its own joins them
on 10.77.0.0/24: broker .1, daemon d1 .2, daemon d2 .3 by veth pairs, the client .4 by a *delay
link*: two TAP devices, one the client's interface, one a port of the bridge, joined by ``relay``
(below), a process that forwards every Ethernet frame after holding it ``delay`` ms, each way. This
kernel has no netem; a delaying TCP relay would not do either (it acknowledges at once, so the
sender's TCP window would never see the round trip that is being measured). Frames keep their
order (one FIFO per direction, with release times that never decrease); all links use a 65,000-byte
MTU so that the relay, a Python process, moves few large frames (its ceiling is measured too).

The run: the broker (``--no-local-daemon``, bound on its namespace's address) and two daemons
(``--advertise-host`` their own address) start in their namespaces; a client process in the client
namespace evals on a runtime of each daemon and moves a ``size`` body each way (CRC-32 checked).
Then the link gets ``delay`` ms each way, and the client measures eval and dispatch round trips and
stream throughput (daemon -> client, a serve() body), next to raw ZeroMQ PUSH/PULL over the same
link: with kernel-tuned buffers (the target: the product moves at least 0.8x that), and with the
fixed 256 KiB buffers the pipes had before (what the window capped throughput to). Everything runs
in processes this command started, stopped at the end (also on an error or Ctrl-C) before the
namespaces are deleted; each process also dies with its parent (PR_SET_PDEATHSIG) and the relay
stops by itself after ``--max-seconds``.

Roles (internal; ``python -m scripts.multihost ROLE ...`` inside a namespace): ``relay``,
``client``, ``zsource``, ``zsink``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.kit.launch import terminate
from scripts.kit.procs import deno_left, descendants

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
HOSTS = {"broker": 1, "d1": 2, "d2": 3, "client": 4}
MTU = 65000
MiB = 1 << 20
#: The payload of one pipe message, and of one raw ZeroMQ message (wire.protocol.MAX_CHUNK).
CHUNK = 256 * 1024
#: The pipes' former fixed SO_SNDBUF/SO_RCVBUF: the raw ZeroMQ run that shows what it capped.
OLD_KERNEL_BUFFER = 256 * 1024
#: Bytes the relay holds per direction at most (a router's queue: beyond it, frames are dropped).
RELAY_QUEUE = 64 * MiB
FRONTEND, BACKEND = 5555, 5556

# ---- availability --------------------------------------------------------------------------------


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, TAP devices)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun (the delay link's TAP devices)"
    probe = f"mhprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


# ---- the network ---------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def list_namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (killed before it could clean up:
    its processes died with it, PR_SET_PDEATHSIG, but named namespaces stay until deleted)."""
    for ns in list_namespaces():
        m = re.fullmatch(r"mh(\d+)x[0-9a-f]{4}-\w+", ns)
        if m and not Path(f"/proc/{m[1]}").exists():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def addr(host: str) -> str:
    return f"{SUBNET}.{HOSTS[host]}"


@dataclass
class Net:
    """The namespaces and links of one run; names unique per run (``tag``)."""

    tag: str = field(default_factory=lambda: f"mh{os.getpid()}x{secrets.token_hex(2)}")
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def up(self) -> None:
        remove_stale()
        for host in ("bridge", *HOSTS):
            _ip("netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            _ip("-n", self.ns(host), "link", "set", "lo", "up")
        br = self.ns("bridge")
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        for host in HOSTS:
            port = f"p-{host}"
            if host == "client":  # the delay link: two TAP devices the relay joins
                _ip("-n", self.ns(host), "tuntap", "add", "dev", "eth0", "mode", "tap")
                _ip("-n", br, "tuntap", "add", "dev", port, "mode", "tap")
            else:
                _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns(host))
            _ip("-n", br, "link", "set", port, "mtu", str(MTU), "master", "br0", "up")
            _ip("-n", self.ns(host), "link", "set", "eth0", "mtu", str(MTU), "up")
            _ip("-n", self.ns(host), "addr", "add", f"{addr(host)}/24", "dev", "eth0")
        _ip("-n", br, "link", "set", "br0", "mtu", str(MTU), "up")

    def pids(self) -> set[int]:
        """Every process still in one of our namespaces."""
        found: set[int] = set()
        for ns in self.made:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
            found |= {int(p) for p in r.stdout.split()}
        return found

    def down(self) -> set[int]:
        """Kill what is left in our namespaces (processes we started, and theirs), delete them;
        returns the pids that had to be killed here."""
        left = self.pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made.clear()
        return left


# ---- processes -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan if we are killed
    os.setsid()


class Proc:
    """``python ARGV`` run inside namespace ``ns``; stderr kept in ``logs/NAME.log``."""

    def __init__(self, ns: str, argv: list[str], name: str, logs: Path, stdin: bool = False) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        self._logf = self.log.open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *argv],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._logf,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )  # fmt: skip
        self._buf = b""

    def line(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix`` (others are skipped)."""
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                if raw.decode(errors="replace").startswith(prefix):
                    return raw.decode().strip()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} printed no {prefix!r} line within {timeout:g}s: {self.tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} ended (rc {self.p.wait(5)}) before {prefix!r}: {self.tail()}")
                self._buf += chunk

    def result(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.line("result ", timeout).split(" ", 1)[1])

    def tell(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text.encode() + b"\n")
        self.p.stdin.flush()

    def tail(self) -> str:
        self._logf.flush()
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self, timeout: float = 15) -> None:
        terminate(self.p, timeout)
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._logf.close()


@dataclass
class Cluster:
    """A running set-up: the network, the relay, the broker and two daemons."""

    net: Net
    logs: Path
    procs: list[Proc] = field(default_factory=list)
    relay: Proc | None = None
    delay_ms: float = 0.0

    def spawn(self, host: str, argv: list[str], name: str, stdin: bool = False) -> Proc:
        p = Proc(self.net.ns(host), argv, name, self.logs, stdin)
        self.procs.append(p)
        return p

    def start(self, max_seconds: float) -> None:
        self.relay = self.spawn(
            "bridge",
            ["-m", "scripts.multihost", "relay", "--peer-netns", f"/run/netns/{self.net.ns('client')}",
             "--max-seconds", str(max_seconds)],
            "relay", stdin=True,
        )  # fmt: skip
        self.relay.line("ready", 15)
        b = addr("broker")
        broker = self.spawn(
            "broker",
            ["-m", "broker", "--frontend", f"tcp://{b}:{FRONTEND}", "--backend", f"tcp://{b}:{BACKEND}",
             "--no-local-daemon", "--heartbeat", "1.0"],
            "broker",
        )  # fmt: skip
        broker.line("ready ", 60)
        for d in ("d1", "d2"):
            self.spawn(
                d,
                ["-m", "daemon", "--broker", f"tcp://{b}:{BACKEND}", "--advertise-host", addr(d), "--name", d,
                 "--max-runtimes", "2", "--pool-size", "1", "--no-cgroups"],
                d,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not all(f"daemon {d} joined" in broker.log.read_text(errors="replace") for d in ("d1", "d2")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemons did not join within 60 s: {broker.tail()}")
            time.sleep(0.1)

    def set_delay(self, ms: float) -> None:
        assert self.relay is not None
        self.relay.tell(f"delay {ms}")
        self.relay.line(f"ok delay {ms:g}", 10)
        self.delay_ms = ms

    def client(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run the client role in the client namespace; its result."""
        p = self.spawn("client", ["-m", "scripts.multihost", "client", *args], f"client{len(self.procs)}")
        try:
            return p.result(timeout)
        finally:
            p.stop()

    def raw_zmq(self, size: int, kernel_buffer: int | None, src: str = "d1", dst: str = "client") -> float:
        """MB/s of a bare PUSH (bound in ``src``) -> PULL (in ``dst``) moving ``size`` bytes."""
        buf = ["--kernel-buffer", str(kernel_buffer)] if kernel_buffer else []
        source = self.spawn(src, ["-m", "scripts.multihost", "zsource", "--bind", addr(src), "--size", str(size),
                                  *buf], f"zsource{len(self.procs)}")  # fmt: skip
        try:
            port = source.line("ready port=", 15).split("=", 1)[1]
            sink = self.spawn(dst, ["-m", "scripts.multihost", "zsink", "--connect", f"tcp://{addr(src)}:{port}",
                                    *buf], f"zsink{len(self.procs)}")  # fmt: skip
            try:
                got = sink.result(120)
            finally:
                sink.stop()
        finally:
            source.stop()
        if got["bytes"] != size:
            raise RuntimeError(f"raw zmq moved {got['bytes']} of {size} bytes")
        return (size - CHUNK) / got["seconds"] / 1e6  # timed from the first message: the bytes after it

    def stop(self) -> set[int]:
        """Stop every process (daemons before the broker: they stop their runtimes), then delete
        the namespaces. Returns what outlived its process and had to be killed here: Deno runtimes
        (they run in sandbox namespaces of their own, so they are found as descendants) and anything
        left in our namespaces. Empty when the product cleaned up after itself."""
        tree = {pid for p in self.procs for pid in descendants(p.p.pid)}
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        survivors = deno_left(tree, timeout=10)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return survivors | self.net.down()


@contextlib.contextmanager
def cluster(logs: Path, max_seconds: float = 600, survivors: set[int] | None = None) -> Iterator[Cluster]:
    """A running Cluster, stopped and deleted at the end however the block ends; what had to be
    killed then (see Cluster.stop) is added to ``survivors``."""
    net = Net()
    c = Cluster(net, logs)
    try:
        net.up()
        c.start(max_seconds)
        yield c
    finally:
        left = c.stop()
        if survivors is not None:
            survivors |= left


# ---- role: relay (the delay link) ----------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class Hold:
    """One direction of the link: frames leave ``delay`` after they came, in the order they came."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.last_due = 0.0
        self.frames = self.dropped = 0
        self.wake = asyncio.Event()

    def take(self, delay: float) -> None:
        """Reader callback: queue every frame waiting on ``src``."""
        while True:
            try:
                frame = os.read(self.src, 70000)
            except BlockingIOError:
                break
            if self.queued + len(frame) > RELAY_QUEUE:
                self.dropped += 1
                continue
            self.last_due = max(time.monotonic() + delay, self.last_due)  # never before an earlier frame
            self.queue.append((self.last_due, frame))
            self.queued += len(frame)
        self.wake.set()

    async def send(self) -> None:
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            wait = self.queue[0][0] - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:
                _, frame = self.queue.popleft()
                self.queued -= len(frame)
                self.frames += 1
                try:
                    os.write(self.dst, frame)
                except OSError:  # the kernel refused it (queue full, link down): a lost frame, as on a wire
                    self.dropped += 1


async def relay_role(a: str, b: str, peer_netns: str, max_seconds: float) -> None:
    """Join TAP ``b`` (this namespace) and TAP ``a`` (in ``peer_netns``); ``delay MS`` on stdin sets
    the hold of each direction; stops at stdin's end or after ``max_seconds``."""
    fd_b = open_tap(b)
    enter_netns(peer_netns)
    fd_a = open_tap(a)
    delay = 0.0
    loop = asyncio.get_running_loop()
    ab, ba = Hold(fd_a, fd_b), Hold(fd_b, fd_a)
    loop.add_reader(fd_a, lambda: ab.take(delay))
    loop.add_reader(fd_b, lambda: ba.take(delay))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    try:
        async with asyncio.timeout(max_seconds), asyncio.TaskGroup() as tg:
            tg.create_task(ab.send())
            tg.create_task(ba.send())
            while line := await reader.readline():
                cmd, _, value = line.decode().strip().partition(" ")
                if cmd == "delay":
                    delay = float(value) / 1000
                    print(f"ok delay {float(value):g}", flush=True)
                elif cmd == "stats":
                    print("result " + json.dumps({"frames": ab.frames + ba.frames, "dropped": ab.dropped + ba.dropped}))
            raise asyncio.CancelledError  # stdin closed: the orchestrator is gone
    except (TimeoutError, asyncio.CancelledError):
        pass
    finally:
        loop.remove_reader(fd_a)
        loop.remove_reader(fd_b)
        os.close(fd_a)
        os.close(fd_b)


# ---- roles: raw ZeroMQ ---------------------------------------------------------------------------


def _zmq_pipe(kind: int, kernel_buffer: int | None) -> Any:
    import zmq

    from wire.sockets import PIPE_HWM

    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.SNDHWM, PIPE_HWM)
    sock.setsockopt(zmq.RCVHWM, PIPE_HWM)
    sock.setsockopt(zmq.LINGER, 2000)
    if kernel_buffer:
        sock.setsockopt(zmq.SNDBUF, kernel_buffer)
        sock.setsockopt(zmq.RCVBUF, kernel_buffer)
    return sock


def zsource_role(bind: str, size: int, kernel_buffer: int | None) -> None:
    """Bind a PUSH (as a daemon binds its pipes), send ``size`` bytes in CHUNK messages, then END."""
    import zmq

    sock = _zmq_pipe(zmq.PUSH, kernel_buffer)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDTIMEO, 60_000)
    port = sock.bind_to_random_port(f"tcp://{bind}")
    print(f"ready port={port}", flush=True)
    block, tag = block_bytes(CHUNK), b"D" * 25
    full, rest = divmod(size, CHUNK)
    for _ in range(full):
        sock.send_multipart([tag, block], copy=False)
    if rest:
        sock.send_multipart([tag, block[:rest]])
    sock.send_multipart([b"E" * 25, b""])
    sock.setsockopt(zmq.LINGER, -1)
    sock.close()
    # term() waits until END is out: at interpreter exit pyzmq would not (the last messages lost);
    # the orchestrator stops this process after the sink's result in any case
    zmq.Context.instance().term()


def zsink_role(connect: str, kernel_buffer: int | None) -> None:
    """Connect a PULL, read until END; the time from the first message to END."""
    import zmq

    sock = _zmq_pipe(zmq.PULL, kernel_buffer)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.connect(connect)
    n, t0 = 0, 0.0
    while True:
        try:
            tag, payload = sock.recv_multipart(copy=False)
        except zmq.Again:
            raise TimeoutError(f"zsink: nothing for 20 s after {n} bytes") from None
        if not t0:
            t0 = time.perf_counter()
        if tag.bytes[:1] == b"E":
            break
        n += len(payload)
    dt = time.perf_counter() - t0
    sock.close(0)
    print("result " + json.dumps({"bytes": n, "seconds": dt}), flush=True)


# ---- role: client --------------------------------------------------------------------------------


def block_bytes(n: int) -> bytes:
    """The body pattern, the same the guest makes (GUEST's ``block``)."""
    return bytes((i * 7 + 3) & 255 for i in range(n))


def body_crc(size: int) -> int:
    block, crc, left = block_bytes(CHUNK), 0, size
    while left:
        crc = zlib.crc32(block[: min(left, CHUNK)], crc)
        left -= min(left, CHUNK)
    return crc


GUEST = (
    """
const CHUNK = CHUNK_BYTES;
const block = new Uint8Array(CHUNK).map((_, i) => (i * 7 + 3) & 255);
const table = new Int32Array(256).map((_, n) => {
  let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; return c;
});
serve({ async fetch(req) {
  const u = new URL(req.url);
  if (u.pathname === "/ping") return new Response("pong");
  if (u.pathname === "/gen") {
    let left = Number(u.searchParams.get("size"));
    return new Response(new ReadableStream({ pull(c) {
      if (left <= 0) { c.close(); return; }
      const n = Math.min(left, CHUNK); left -= n; c.enqueue(block.slice(0, n));
    } }));
  }
  let crc = -1, n = 0;  // /crc: the CRC-32 and size of the request body
  for await (const chunk of req.body) {
    n += chunk.length;
    for (let i = 0; i < chunk.length; i++) crc = table[(crc ^ chunk[i]) & 255] ^ (crc >>> 8);
  }
  return Response.json({ size: n, crc: (crc ^ -1) >>> 0 });
} });
"""
).replace("CHUNK_BYTES", str(CHUNK))


async def _chunks(size: int) -> AsyncIterator[bytes]:
    block = block_bytes(CHUNK)
    while size > 0:
        yield block[: min(size, CHUNK)]
        size -= CHUNK


async def client_role(broker: str, size: int, rounds: int, check: bool) -> dict[str, Any]:
    import client

    conn = await client.connect(broker, timeout=30)
    rts: list[client.Runtime] = []
    try:
        while len({rt.daemon for rt in rts}) < 2:  # one runtime on each daemon (each hosts 2 at most)
            if len(rts) == 4:
                raise RuntimeError(f"4 runtimes, all on {rts[0].daemon}: the broker never used the other daemon")
            rts.append(await conn.create_runtime())
        out: dict[str, Any] = {"daemons": sorted({rt.daemon for rt in rts})}
        out["evals"] = [await rt.eval(f"export default {{ on: {rt.daemon!r}, v: 6 * 7 }}") for rt in rts]
        rt = next(r for r in rts if r.daemon == "d1")
        await rt.eval(GUEST)

        async def timed(coro_fn: Any) -> float:
            t0 = time.perf_counter()
            await coro_fn()
            return (time.perf_counter() - t0) * 1000

        async def ping() -> None:
            resp = await rt.dispatch_request(client.Request("GET", "http://mh/ping"))
            assert await resp.read() == b"pong"

        out["eval_ms"] = statistics.median([await timed(lambda: rt.eval("export default 1")) for _ in range(20)])
        out["dispatch_ms"] = statistics.median([await timed(ping) for _ in range(20)])
        expected = body_crc(size)
        down, first = [], []
        for _ in range(rounds):
            t_req = time.perf_counter()
            resp = await rt.dispatch_request(client.Request("GET", f"http://mh/gen?size={size}"))
            crc, n, t0 = 0, 0, 0.0
            async for chunk in resp.body:
                if not t0:  # timed from the first chunk, as the raw ZeroMQ sink is: the same bytes
                    t0 = time.perf_counter()
                    first.append((t0 - t_req) * 1000)
                crc, n = zlib.crc32(chunk, crc), n + len(chunk)
            down.append((size - CHUNK) / (time.perf_counter() - t0) / 1e6)
            if (n, crc) != (size, expected):
                raise RuntimeError(f"download: {n} bytes, crc {crc:#x}; expected {size}, {expected:#x}")
        out["down_mbps"] = statistics.median(down)
        out["first_chunk_ms"] = statistics.median(first)  # request to first body byte (pipe set-up)
        if check:  # the other direction, checked by the guest
            t0 = time.perf_counter()
            resp = await rt.dispatch_request(client.Request("POST", "http://mh/crc", body=_chunks(size)))
            got = json.loads(await resp.read())
            out["up_mbps"] = size / (time.perf_counter() - t0) / 1e6
            if got != {"size": size, "crc": expected}:
                raise RuntimeError(f"upload: the guest got {got}; sent {size} bytes, crc {expected:#x}")
        return out
    finally:
        for rt in rts:
            with contextlib.suppress(Exception):
                await rt.dispose()
        await conn.close()


# ---- the run -------------------------------------------------------------------------------------


def measure(c: Cluster, size: int, delay_ms: float, rounds: int) -> dict[str, Any]:
    """Everything the script reports: checks without delay, then figures with ``delay_ms`` each way."""
    broker = f"tcp://{addr('broker')}:{FRONTEND}"
    out: dict[str, Any] = {"size_mib": size / MiB, "delay_ms_each_way": delay_ms}
    c.set_delay(0)
    out["no_delay"] = c.client("--broker", broker, "--size", str(size), "--rounds", "1", "--check")
    out["relay_alone_mbps"] = c.raw_zmq(size, None)  # the delay link with no delay: its own ceiling
    out["veth_mbps"] = c.raw_zmq(size, None, dst="broker")  # the same without the relay
    c.set_delay(delay_ms)
    out["delayed"] = c.client("--broker", broker, "--size", str(size), "--rounds", str(rounds))
    out["raw_zmq_mbps"] = statistics.median([c.raw_zmq(size, None) for _ in range(rounds)])
    out["raw_zmq_old_buffers_mbps"] = c.raw_zmq(size, OLD_KERNEL_BUFFER)
    out["ratio"] = out["delayed"]["down_mbps"] / out["raw_zmq_mbps"]
    return out


def report(r: dict[str, Any]) -> str:
    d, nd = r["delayed"], r["no_delay"]
    rtt = 2 * r["delay_ms_each_way"]
    return "\n".join([
        f"hosts: broker, daemons {', '.join(nd['daemons'])}, client; evals {nd['evals']}",
        f"no delay: {r['size_mib']:g} MiB down {nd['down_mbps']:.1f} MB/s, up {nd['up_mbps']:.1f} MB/s "
        f"(CRC-32 checked); relay alone (raw zmq) {r['relay_alone_mbps']:.1f} MB/s, "
        f"veth without relay {r['veth_mbps']:.1f} MB/s",
        f"{rtt:g} ms RTT: eval round trip p50 {d['eval_ms']:.1f} ms, dispatch round trip p50 "
        f"{d['dispatch_ms']:.1f} ms, "
        f"request to a streamed body's first chunk {d['first_chunk_ms']:.1f} ms",
        f"{rtt:g} ms RTT: stream daemon -> client {d['down_mbps']:.1f} MB/s; raw zmq (kernel-tuned buffers) "
        f"{r['raw_zmq_mbps']:.1f} MB/s -> ratio {r['ratio']:.2f} (target >= 0.8); raw zmq with the old fixed "
        f"256 KiB buffers {r['raw_zmq_old_buffers_mbps']:.1f} MB/s",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.multihost", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role")
    ap.add_argument("--size-mib", type=float, default=64)
    ap.add_argument("--delay-ms", type=float, default=10, help="added each way (10: a 20 ms round trip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--max-seconds", type=float, default=600, help="the relay stops by itself after this")
    r = sub.add_parser("relay")
    r.add_argument("--a", default="eth0")
    r.add_argument("--b", default="p-client")
    r.add_argument("--peer-netns", required=True)
    r.add_argument("--max-seconds", type=float, default=600)
    cl = sub.add_parser("client")
    cl.add_argument("--broker", required=True)
    cl.add_argument("--size", type=int, required=True)
    cl.add_argument("--rounds", type=int, default=1)
    cl.add_argument("--check", action="store_true")
    zs = sub.add_parser("zsource")
    zs.add_argument("--bind", required=True)
    zs.add_argument("--size", type=int, required=True)
    zs.add_argument("--kernel-buffer", type=int)
    zk = sub.add_parser("zsink")
    zk.add_argument("--connect", required=True)
    zk.add_argument("--kernel-buffer", type=int)
    args = ap.parse_args(argv)
    if args.role == "relay":
        asyncio.run(relay_role(args.a, args.b, args.peer_netns, args.max_seconds))
    elif args.role == "client":
        result = asyncio.run(client_role(args.broker, args.size, args.rounds, args.check))
        print("result " + json.dumps(result), flush=True)
    elif args.role == "zsource":
        zsource_role(args.bind, args.size, args.kernel_buffer)
    elif args.role == "zsink":
        zsink_role(args.connect, args.kernel_buffer)
    else:
        why = unavailable()
        if why:
            print(f"multihost: cannot run: {why}", file=sys.stderr)
            return 2
        logs = Path(f"/tmp/multihost-{os.getpid()}")
        logs.mkdir(exist_ok=True)
        t0 = time.monotonic()
        with cluster(logs, args.max_seconds) as c:
            result = measure(c, int(args.size_mib * MiB), args.delay_ms, args.rounds)
        print(report(result))
        print(f"({time.monotonic() - t0:.1f} s; logs in {logs}; command `python -m scripts.multihost "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`)")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
