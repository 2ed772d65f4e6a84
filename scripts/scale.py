"""Scale check (issue 9): thousands of concurrent checksummed streams, hundreds of live runtimes on
one daemon, a thousand create/eval/dispose cycles; against a real broker, daemon and Deno. Prints
the figures (JSON with ``--json``).

    python -m scripts.scale                                   # 2,000 streams, 200 runtimes, 1,000 cycles
    python -m scripts.scale --streams 500 --runtimes 50 --cycles 100 --only streams,cycles
    python -m scripts.scale --only streams --streams 400 --chunks 48 --stall 15   # consumers pause 15 s

tests/test_scale.py runs the same scenarios at a size that fits the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.bench.env import ROOT, Proc, Processes, poll
from scripts.kit.procs import deno_children, rss_mib
from scripts.kit.upstream import JS_HELPERS

KiB = 1024
CHUNK = 64 * KiB
#: Streams one runtime carries in the stream scenario (wire.guest.MAX_STREAMS is 256 a runtime).
STREAMS_PER_RUNTIME = 200

#: GET /?n=N&s=S: N chunks of 64 KiB, chunk i filled with the byte (S + i) % 251. POST: the body's
#: length and CRC-32, computed by the guest, which pauses ``stall`` ms after the first chunk.
GUEST = (
    JS_HELPERS
    + """
serve({ async fetch(req) {
  const q = new URL(req.url).searchParams;
  if (req.method === "POST") {
    let crc = 0, n = 0;
    for await (const c of req.body) {
      if (n === 0 && q.get("stall")) await new Promise((ok) => setTimeout(ok, Number(q.get("stall"))));
      crc = crc32(c, crc); n += c.length;
    }
    return Response.json({ n, crc });
  }
  const n = Number(q.get("n")), s = Number(q.get("s"));
  let i = 0;
  return new Response(new ReadableStream({ pull(c) {
    if (i >= n) { c.close(); return; }
    c.enqueue(new Uint8Array(65536).fill((s + i) % 251)); i++;
  } }));
} });
"""
)


def chunk(seed: int, i: int) -> bytes:
    return bytes([(seed + i) % 251]) * CHUNK


def body_crc(seed: int, n: int) -> int:
    crc = 0
    for i in range(n):
        crc = zlib.crc32(chunk(seed, i), crc)
    return crc


def fds(pid: int) -> tuple[int, int]:
    """(open descriptors, of which sockets) of process ``pid``."""
    total = sockets = 0
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            total += 1
            sockets += os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:")
    return total, sockets


def snapshot(pid: int) -> dict[str, float]:
    """What the daemon ``pid`` holds now: descriptors, sockets, RSS (MiB), Deno processes."""
    total, socks = fds(pid)
    return {"fds": total, "sockets": socks, "rss_mib": round(rss_mib(pid), 1), "deno": len(deno_children(pid))}


@dataclass
class Cluster:
    broker: Proc
    daemon: Proc
    frontend: str


@contextlib.contextmanager
def cluster(log_dir: Path, daemon_args: tuple[str, ...] = (), broker_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """A broker without a local daemon and one daemon ``d1``, stopped (with every Deno) on exit."""
    procs = Processes(log_dir, ROOT)
    try:
        broker = procs.broker("--no-local-daemon", *broker_args)
        daemon = Proc("d1", [sys.executable, "-m", "daemon", "--broker", broker.field("backend"), "--name", "d1",
                             *daemon_args], log_dir, ROOT)  # fmt: skip
        procs.procs.append(daemon)
        deadline = time.monotonic() + 60
        while "daemon d1 joined" not in broker.tail(1 << 20):
            if time.monotonic() > deadline or daemon.p.poll() is not None:
                raise RuntimeError(f"the daemon did not join: {daemon.tail()}")
            time.sleep(0.05)
        yield Cluster(broker, daemon, broker.field("frontend"))
    finally:
        procs.stop_all()


async def created(conn: Any, timeout: float = 60.0, **kw: Any) -> Any:
    """A runtime, once the daemon has registered with the broker."""
    import client

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await conn.create_runtime(**kw)
        except client.NoCapacity:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def bounded(n: int, parallel: int, job: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """``job(i)`` for i in range(n), at most ``parallel`` at a time."""
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> Any:
        async with gate:
            return await job(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


# ---- streams ---------------------------------------------------------------------------------------


async def streams(
    conn: Any, daemon_pid: int, count: int, chunks: int = 8, timeout: float = 120.0, stall: float = 0.0
) -> dict[str, Any]:
    """``count`` checksummed bodies open at once, half responses (guest -> client), half request
    bodies (client -> guest). Every stream reads or writes its first chunk, then waits until all
    ``count`` are open, then finishes; a body arrives whole or it is counted lost or corrupt.
    With ``stall``, every consumer pauses that long after its first chunk (the client for a
    response, the guest for a request body) while its producer finishes, if the pipe holds it."""
    import client

    runtimes = [await created(conn, memory_limit_mb=512) for _ in range(math.ceil(count / STREAMS_PER_RUNTIME))]
    for rt in runtimes:
        await rt.eval(GUEST)
    before = snapshot(daemon_pid)
    all_open = asyncio.Event()
    opened = 0
    peak: dict[str, float] = {}

    async def barrier() -> None:
        nonlocal opened, peak
        opened += 1
        if opened == count:
            peak = snapshot(daemon_pid)
            all_open.set()
        await all_open.wait()

    async def response(i: int) -> str:
        rt = runtimes[i % len(runtimes)]
        resp = await rt.dispatch_request(client.Request("GET", f"http://x/?n={chunks}&s={i}"))
        crc, n = 0, 0
        first = True
        async for piece in resp.body:
            crc, n = zlib.crc32(piece, crc), n + len(piece)
            if first:
                first = False
                await barrier()
                await asyncio.sleep(stall)
        return "ok" if (n, crc) == (chunks * CHUNK, body_crc(i, chunks)) else "corrupt"

    async def upload(i: int) -> str:
        rt = runtimes[i % len(runtimes)]

        async def body() -> AsyncIterator[bytes]:
            for k in range(chunks):
                yield chunk(i, k)
                if k == 0:
                    await barrier()

        url = f"http://x/?stall={stall * 1000:.0f}"
        resp = await rt.dispatch_request(client.Request("POST", url, body=body()), timeout=timeout)
        got = await resp.json()
        return "ok" if got == {"n": chunks * CHUNK, "crc": body_crc(i, chunks)} else "corrupt"

    async def one(i: int) -> str:
        try:
            async with asyncio.timeout(timeout):
                return await (response(i) if i % 2 == 0 else upload(i))
        except TimeoutError:
            return "lost"
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"[:200]

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.monotonic() - started
    ended = await settled(daemon_pid, before)
    for rt in runtimes:
        await rt.dispose()
    errors = sorted({r for r in results if r.startswith("error")})
    return {
        "streams": count,
        "bytes_each": chunks * CHUNK,
        "consumer_stall_s": stall,
        "all_open_at_once": all_open.is_set(),
        "ok": results.count("ok"),
        "corrupt": results.count("corrupt"),
        "lost": results.count("lost"),
        "errors": len([r for r in results if r.startswith("error")]),
        "error_kinds": errors[:5],
        "seconds": round(elapsed, 1),
        "MiB_per_s": round(count * chunks * CHUNK / elapsed / (1 << 20), 1),
        "daemon_before": before,
        "daemon_all_open": peak,
        "daemon_after": ended,
        "daemon_fds_per_stream": round((peak["fds"] - before["fds"]) / count, 2) if peak else None,
    }


async def settled(pid: int, before: dict[str, float], timeout: float = 20.0) -> dict[str, float]:
    """The daemon's snapshot once its descriptors are back to ``before`` and its RSS has stopped
    falling (its memory trim, daemon.memory.Trimmer, follows the streams' end within a second);
    after ``timeout``, whatever it is then."""
    last = math.inf

    async def quiet() -> dict[str, float] | None:
        nonlocal last
        now = snapshot(pid)
        falling, last = now["rss_mib"] < last - 1, now["rss_mib"]
        return None if now["fds"] > before["fds"] or falling else now

    with contextlib.suppress(TimeoutError):
        return await poll(quiet, timeout, 1.0, "the daemon released what the load took")
    return snapshot(pid)


# ---- runtimes --------------------------------------------------------------------------------------


async def many_runtimes(conn: Any, daemon_pid: int, count: int, parallel: int = 8) -> dict[str, Any]:
    """``count`` runtimes live at once on one daemon, each answering an eval, then all disposed."""
    before = snapshot(daemon_pid)
    started = time.monotonic()
    runtimes = await bounded(count, parallel, lambda _i: created(conn, timeout=120))
    create_s = time.monotonic() - started
    answers = await bounded(count, parallel, lambda i: runtimes[i].eval(f"export default {i} * 2"))
    live = snapshot(daemon_pid)
    await bounded(count, parallel, lambda i: runtimes[i].dispose())
    after = await settled(daemon_pid, before)
    return {
        "runtimes": count,
        "answered": sum(a == i * 2 for i, a in enumerate(answers)),
        "create_seconds": round(create_s, 1),
        "daemon_before": before,
        "daemon_live": live,
        "daemon_after": after,
    }


# ---- cycles ----------------------------------------------------------------------------------------


async def cycles(conn: Any, daemon_pid: int, count: int, parallel: int = 4) -> dict[str, Any]:
    """``count`` create/eval/dispose cycles (``parallel`` lanes); the daemon's descriptors, sockets,
    RSS and Deno processes after the first tenth and at the end should be the same."""
    done = 0
    warm: dict[str, float] = {}

    async def cycle(i: int) -> bool:
        nonlocal done, warm
        rt = await created(conn, timeout=120)
        ok = await rt.eval(f"export default {i} + 1") == i + 1
        await rt.dispose()
        done += 1
        if done == max(1, count // 10):
            warm = snapshot(daemon_pid)
        return ok

    started = time.monotonic()
    oks = await bounded(count, parallel, cycle)
    elapsed = time.monotonic() - started
    end = await settled(daemon_pid, warm)
    return {
        "cycles": count,
        "ok": sum(oks),
        "seconds": round(elapsed, 1),
        "daemon_after_first_tenth": warm,
        "daemon_at_end": end,
    }


# ---- main ------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    import client

    only = set(args.only.split(","))
    figures: dict[str, Any] = {}
    if "streams" in only:
        runtimes = math.ceil(args.streams / STREAMS_PER_RUNTIME)
        daemon_args = ("--max-runtimes", str(runtimes + 2), "--max-streams", str(args.streams + 64))
        with cluster(log_dir / "streams", daemon_args) as c:
            async with await client.connect(c.frontend, timeout=60) as conn:
                figures["streams"] = await streams(
                    conn, c.daemon.pid, args.streams, args.chunks, timeout=args.timeout, stall=args.stall
                )
    if "runtimes" in only:
        quota = ("--max-runtimes-per-client", str(args.runtimes + 8))
        with cluster(log_dir / "runtimes", ("--max-runtimes", str(args.runtimes)), quota) as c:
            async with await client.connect(c.frontend, timeout=60) as conn:
                figures["runtimes"] = await many_runtimes(conn, c.daemon.pid, args.runtimes)
    if "cycles" in only:
        with cluster(log_dir / "cycles") as c:
            async with await client.connect(c.frontend, timeout=60) as conn:
                figures["cycles"] = await cycles(conn, c.daemon.pid, args.cycles)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--chunks", type=int, default=8, help="64 KiB chunks per stream")
    p.add_argument("--stall", type=float, default=0.0, help="seconds each consumer pauses after its first chunk")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a stream may take before it counts as lost")
    p.add_argument("--runtimes", type=int, default=200)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--only", default="streams,runtimes,cycles")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="scale-"))  # every process's stderr, kept for post-mortems
    for sub in ("streams", "runtimes", "cycles"):
        (log_dir / sub).mkdir()
    figures = asyncio.run(run(args, log_dir))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    print(f"logs: {log_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
