"""Liveness measurements with real processes (issue 9; figures in docs/design.md 5.1).

    python -m scripts.liveness burst --creates 150 --heartbeat 0.2 --liveness 3 -- --max-starting 1000
    python -m scripts.liveness pause --stop 15
    python -m scripts.liveness spin --guests 30

Both start a broker (no local daemon) and one daemon (arguments after ``--`` are the daemon's).
``burst`` creates ``--live`` runtimes, then ``--creates`` at once while one live runtime is asked to
eval every 50 ms, and prints what became of the creates, the evals' latency, whether the daemon was
dropped and by how much its heartbeats ran late (its log: its event loop's stalls). ``pause``
SIGSTOPs the daemon under two runtimes (one with an eval pending) for ``--stop`` seconds, and
prints when the owner heard of the loss, how long after SIGCONT the daemon joined again and
whether its runtimes' Deno processes were gone by then. ``spin`` has ``--guests`` runtimes burn
50 ms of CPU per timer turn for 8 s while a quiet one is asked to eval every 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import client
from scripts.kit.procs import deno_children, deno_pids
from tests.conftest import Broker, Daemon, await_until, joined
from wire.liveness import LIVENESS


async def burst(args: argparse.Namespace, tmp: Path) -> None:
    hb = ["--heartbeat", str(args.heartbeat), "--liveness", str(args.liveness)]
    b = Broker(tmp, "--no-local-daemon", *hb, "--max-runtimes-per-client", "100000")
    d = Daemon(tmp, b, "d1", *hb, "--max-runtimes", str(args.live + args.creates + 8), *args.daemon)
    try:
        async with await client.connect(b.frontend, timeout=60) as conn:
            await await_until(lambda: joined(b, "d1"), "the daemon has joined", timeout=60)
            live = [await conn.create_runtime() for _ in range(args.live)]
            lat: list[float] = []

            async def probe() -> None:
                while True:
                    t0 = time.monotonic()
                    await live[0].eval("export default 1")
                    lat.append(time.monotonic() - t0)
                    await asyncio.sleep(0.05)

            prober = asyncio.ensure_future(probe())
            t0 = time.monotonic()
            done = await asyncio.gather(*(conn.create_runtime(timeout=60) for _ in range(args.creates)),
                                        return_exceptions=True)  # fmt: skip
            took = time.monotonic() - t0
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
            outcome: dict[str, int] = {}
            for r in done:
                name = "created" if isinstance(r, client.Runtime) else type(r).__name__
                outcome[name] = outcome.get(name, 0) + 1
            alive = 0  # (a dropped daemon's runtimes are lost)
            for r in live:
                try:
                    alive += await r.eval("export default 1") == 1
                except client.Error:
                    pass
    finally:
        d.stop()
        b.stop()
    lat.sort()
    late = [float(x) for x in re.findall(r"heartbeat ([0-9.]+)s late", d.log.read_text(errors="replace"))]
    dropped = alive < args.live or "registering again" in d.log.read_text(errors="replace")
    print(f"{args.creates} creates in {took:.1f}s: {outcome}; live runtimes alive after: {alive}/{args.live}")
    if lat:
        print(f"live evals during the burst: {len(lat)}, p50 {lat[len(lat) // 2]:.3f}s, max {lat[-1]:.3f}s")
    print(f"daemon dropped: {dropped}; its heartbeats late at most {max(late, default=0):.3f}s "
          f"({len(late)} times more than a quarter heartbeat)")  # fmt: skip


async def pause(args: argparse.Namespace, tmp: Path) -> None:
    hb = ["--heartbeat", str(args.heartbeat), "--liveness", str(args.liveness)]
    b = Broker(tmp, "--no-local-daemon", *hb)
    d = Daemon(tmp, b, "d1", *hb, "--pool-size", "0", *args.daemon)
    try:
        async with await client.connect(b.frontend, timeout=60) as conn:
            await await_until(lambda: joined(b, "d1"), "the daemon has joined", timeout=60)
            rts = [await conn.create_runtime() for _ in range(2)]
            guests = set(deno_children(d.pid))
            os.kill(d.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                await rts[0].eval("await new Promise(r => setTimeout(r, 600000))", timeout=args.stop + 60)
            except client.RuntimeLost:
                print(f"the owner heard its runtimes were lost {time.monotonic() - t0:.2f}s after SIGSTOP")
            await await_until(lambda: time.monotonic() - t0 > args.stop, "the stop has lasted", args.stop + 5)
            os.kill(d.pid, signal.SIGCONT)
            t1 = time.monotonic()
            await await_until(lambda: b.log.read_text().count("daemon d1 joined") == 2, "it joined again", 120)
            rejoined = time.monotonic() - t1
            left = guests & deno_pids()
            print(f"stopped {t1 - t0:.1f}s; joined again {rejoined:.2f}s after SIGCONT "
                  f"(heartbeat {args.heartbeat:g}s); its runtimes' Deno processes left then: {len(left)}")  # fmt: skip
            fresh = await conn.create_runtime()
            print(f"a new runtime on {fresh.daemon}: eval -> {await fresh.eval('export default 42')}")
    finally:
        if d.p.poll() is None:
            os.kill(d.pid, signal.SIGCONT)
        d.stop()
        b.stop()


SPIN = "globalThis.spin = () => { const t = Date.now(); while (Date.now() - t < 50) {} setTimeout(spin, 0); }; spin();"


async def spin(args: argparse.Namespace, tmp: Path) -> None:
    hb = ["--heartbeat", str(args.heartbeat), "--liveness", str(args.liveness)]
    b = Broker(tmp, "--no-local-daemon", *hb, "--max-runtimes-per-client", "100000")
    d = Daemon(tmp, b, "d1", *hb, "--max-runtimes", str(args.guests + 8), *args.daemon)
    try:
        async with await client.connect(b.frontend, timeout=60) as conn:
            await await_until(lambda: joined(b, "d1"), "the daemon has joined", timeout=60)
            quiet = await conn.create_runtime()
            busy = [await conn.create_runtime() for _ in range(args.guests)]
            before = len(d.log.read_text(errors="replace"))
            for r in busy:
                await r.eval(SPIN)
            lat: list[float] = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8:
                t = time.monotonic()
                try:
                    await quiet.eval("export default 1")
                except client.Error as exc:
                    print(f"the quiet runtime failed: {exc}")
                    break
                lat.append(time.monotonic() - t)
                await asyncio.sleep(0.05)
            log = d.log.read_text(errors="replace")[before:]
    finally:
        d.stop()
        b.stop()
    late = [float(x) for x in re.findall(r"heartbeat ([0-9.]+)s late", log)]
    lat.sort()
    print(f"{args.guests} spinning guests: daemon heartbeats late at most {max(late, default=0):.3f}s "
          f"({len(late)} times); quiet evals p50 {lat[len(lat) // 2]:.3f}s, max {lat[-1]:.3f}s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, daemon = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m scripts.liveness", description=__doc__)
    p.add_argument("scenario", choices=("burst", "pause", "spin"))
    p.add_argument("--creates", type=int, default=150, help="burst: creates at once (%(default)s)")
    p.add_argument("--live", type=int, default=5, help="burst: live runtimes before (%(default)s)")
    p.add_argument("--stop", type=float, default=15.0, help="pause: seconds stopped (%(default)s)")
    p.add_argument("--guests", type=int, default=30, help="spin: busy runtimes (%(default)s)")
    p.add_argument("--heartbeat", type=float, default=None, help="(pause: 1.0, else 0.2)")
    p.add_argument("--liveness", type=int, default=LIVENESS, help="(%(default)s)")
    args = p.parse_args(ours)
    args.daemon = daemon
    if args.heartbeat is None:
        args.heartbeat = 1.0 if args.scenario == "pause" else 0.2
    with tempfile.TemporaryDirectory(prefix=f"liveness-{args.scenario}-") as tmp:
        asyncio.run({"burst": burst, "pause": pause, "spin": spin}[args.scenario](args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
