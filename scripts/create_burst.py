"""A burst of concurrent creates at one daemon that already hosts live runtimes (issue 9).

    python -m scripts.create_burst --creates 150 --heartbeat 0.2 --liveness 3 -- --max-starting 1000

starts a broker (no local daemon) and one daemon (the arguments after ``--`` are the daemon's),
creates ``--live`` runtimes, then ``--creates`` at once, while one of the live runtimes is asked
to eval every 50 ms. It prints what became of the creates, the live evals' latency, whether the
daemon was dropped and by how much its heartbeats ran late (its log: its event loop's stalls).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import client
from tests.conftest import Broker, Daemon, await_until, joined


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, daemon = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m scripts.create_burst", description=__doc__)
    p.add_argument("--creates", type=int, default=150)
    p.add_argument("--live", type=int, default=5)
    p.add_argument("--heartbeat", type=float, default=0.2)
    p.add_argument("--liveness", type=int, default=5)
    args = p.parse_args(ours)
    args.daemon = daemon
    with tempfile.TemporaryDirectory(prefix="create-burst-") as tmp:
        asyncio.run(burst(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
