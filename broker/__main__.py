"""``python -m broker``: bind the frontend and backend, start a local daemon, print one ready line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from broker.broker import Broker
from broker.core import MAX_INFLIGHT_PER_CLIENT, MAX_KEEP_ALIVE, MAX_RUNTIMES_PER_CLIENT
from wire.auth import exposure_warning, load_authorized, load_keypair
from wire.liveness import LIVENESS
from wire.service import configure_logging, run_until_signalled

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    p.add_argument("--frontend", default=DEFAULT_FRONTEND, help="endpoint clients connect to (%(default)s)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help="endpoint daemons connect to (%(default)s)")
    p.add_argument("--no-local-daemon", action="store_true", help="do not start the embedded daemon")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds (%(default)s)")
    p.add_argument(
        "--liveness", type=int, default=LIVENESS, help="missed heartbeats before a daemon is dropped (%(default)s)"
    )
    p.add_argument("--client-liveness", type=int, default=10, help="missed heartbeats before a client is dropped")
    p.add_argument("--max-runtimes", type=int, default=64, help="capacity of the local daemon (%(default)s)")
    p.add_argument("--pool-size", type=int, default=2, help="pre-started runtimes in the local daemon")
    from daemon.__main__ import add_limits, add_starts

    add_starts(p)
    add_limits(p)
    p.add_argument(
        "--max-runtimes-per-client",
        type=int,
        default=MAX_RUNTIMES_PER_CLIENT,
        help="runtimes one client may hold; more are refused with `quota` (%(default)s)",
    )
    p.add_argument(
        "--max-inflight-per-client",
        type=int,
        default=MAX_INFLIGHT_PER_CLIENT,
        help="requests of one client not answered yet; more are refused with `quota` (%(default)s)",
    )
    p.add_argument(
        "--reclaim-grace",
        type=float,
        default=None,
        help="seconds the unnamed runtimes of a silent client wait for it to reconnect before they are "
        "disposed (default: its liveness timeout, --client-liveness x --heartbeat)",
    )
    p.add_argument(
        "--max-keep-alive",
        type=float,
        default=MAX_KEEP_ALIVE,
        help="longest keep_alive in seconds a named runtime may ask for (%(default)s)",
    )
    p.add_argument(
        "--curve-keypair",
        help="this broker's CURVE key pair (NAME.key_secret from "
        "`python -m wire.auth`); turns on authentication and encryption",
    )
    p.add_argument(
        "--authorized-keys",
        help="directory (or file) of public keys of the clients (and, without --daemon-keys, daemons) "
        "allowed in (with --curve-keypair)",
    )
    p.add_argument(
        "--daemon-keys",
        help="directory (or file) of the public keys of the daemons allowed to join; without it, "
        "--authorized-keys admits daemons too",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    keys = load_keypair(args.curve_keypair) if args.curve_keypair else None
    authorized = load_authorized(args.authorized_keys) if args.authorized_keys else set()
    daemon_keys = load_authorized(args.daemon_keys) if args.daemon_keys else None
    if keys is not None:  # the embedded daemon uses the broker's own key pair
        (authorized if daemon_keys is None else daemon_keys).add(keys.public)
    broker = Broker(
        args.frontend,
        args.backend,
        heartbeat=args.heartbeat,
        daemon_liveness=args.liveness,
        client_liveness=args.client_liveness,
        keys=keys,
        authorized=authorized,
        daemon_keys=daemon_keys,
        max_runtimes_per_client=args.max_runtimes_per_client,
        max_inflight_per_client=args.max_inflight_per_client,
        reclaim_grace=args.reclaim_grace,
        max_keep_alive=args.max_keep_alive,
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(broker.run())
        await broker.ready.wait()
        if not args.no_local_daemon:
            from daemon.__main__ import limits
            from daemon.daemon import Daemon

            local = Daemon(
                broker.backend_endpoint,
                max_runtimes=args.max_runtimes,
                pool_size=args.pool_size,
                max_starting=args.max_starting,
                start_queue_timeout=args.start_queue_timeout,
                heartbeat=args.heartbeat,
                liveness=args.liveness,
                name="local",
                **limits(args),  # type: ignore[arg-type]
                keys=keys,
                broker_key=keys.public if keys else None,
            )
            tg.create_task(local.run())
            await local.registered.wait()
        print(f"ready frontend={broker.frontend_endpoint} backend={broker.backend_endpoint}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_logging(args.verbose)
    warning = exposure_warning([args.frontend, args.backend], curve=bool(args.curve_keypair))
    if warning:
        logging.getLogger("broker").warning("%s", warning)
    return run_until_signalled(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
