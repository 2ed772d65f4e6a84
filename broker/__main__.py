"""``python -m broker``: bind the frontend and backend, start a local daemon, print one ready line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from broker.broker import Broker
from wire.service import configure_logging, run_until_signalled

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    p.add_argument("--frontend", default=DEFAULT_FRONTEND, help="endpoint clients connect to (%(default)s)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help="endpoint daemons connect to (%(default)s)")
    p.add_argument("--no-local-daemon", action="store_true", help="do not start the embedded daemon")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds (%(default)s)")
    p.add_argument("--liveness", type=int, default=3, help="missed heartbeats before a daemon is dropped")
    p.add_argument("--client-liveness", type=int, default=10, help="missed heartbeats before a client is dropped")
    p.add_argument("--max-runtimes", type=int, default=64, help="capacity of the local daemon (%(default)s)")
    p.add_argument("--pool-size", type=int, default=2, help="pre-started runtimes in the local daemon")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    broker = Broker(
        args.frontend,
        args.backend,
        heartbeat=args.heartbeat,
        daemon_liveness=args.liveness,
        client_liveness=args.client_liveness,
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(broker.run())
        await broker.ready.wait()
        if not args.no_local_daemon:
            from daemon.daemon import Daemon

            local = Daemon(
                broker.backend_endpoint,
                max_runtimes=args.max_runtimes,
                pool_size=args.pool_size,
                heartbeat=args.heartbeat,
                liveness=args.liveness,
                name="local",
            )
            tg.create_task(local.run())
            await local.registered.wait()
        print(f"ready frontend={broker.frontend_endpoint} backend={broker.backend_endpoint}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_logging(args.verbose)
    return run_until_signalled(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
