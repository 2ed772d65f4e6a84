"""``python -m daemon --broker ENDPOINT``: join a broker, possibly from another host."""

from __future__ import annotations

import argparse
import logging
import sys

from daemon import daemon as D
from daemon.daemon import Daemon
from daemon.pool import MAX_STARTING, START_QUEUE_TIMEOUT
from wire.auth import exposure_warning, load_keypair, load_public_key
from wire.liveness import LIVENESS
from wire.service import configure_logging, run_until_signalled


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daemon", description=__doc__)
    p.add_argument(
        "--broker",
        required=True,
        help="the broker's backend endpoint, e.g. tcp://10.0.0.5:5556; "
        "several, comma-separated, for a primary and standbys (tried in turn when one falls silent)",
    )
    p.add_argument(
        "--orphan-grace",
        type=float,
        default=D.ORPHAN_GRACE,
        help="seconds runtimes live on while no broker is reachable, for one to come back (%(default)s)",
    )
    p.add_argument("--max-runtimes", type=int, default=64, help="runtimes this daemon hosts at most")
    p.add_argument("--bind-host", default=None, help="interface for the control socket and pipes "
                   "(default: the advertised host)")  # fmt: skip
    p.add_argument("--advertise-host", default="127.0.0.1", help="address clients use to reach this daemon")
    p.add_argument("--control-port", type=int, default=0, help="control socket port (default: any free port)")
    p.add_argument("--pool-size", type=int, default=2, help="pre-started runtimes kept warm")
    add_starts(p)
    p.add_argument("--memory-mb", type=int, default=128, help="default runtime heap limit in MB")
    p.add_argument("--eval-timeout", type=float, default=30.0, help="default eval timeout in seconds")
    add_limits(p)
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    p.add_argument(
        "--liveness", type=int, default=LIVENESS, help="missed broker heartbeats before re-registering (%(default)s)"
    )
    p.add_argument("--name", default=None, help="name shown in logs and errors")
    p.add_argument(
        "--curve-keypair",
        help="this daemon's CURVE key pair (NAME.key_secret from `python -m wire.auth`); needs --broker-key",
    )
    p.add_argument("--broker-key", help="the broker's public key file (NAME.key)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


#: (flag, type, default, help) of each operator limit on runtimes.
LIMIT_FLAGS = (
    ("--max-memory-mb", int, D.MAX_MEMORY_MB, "largest memory_limit_mb a client may ask for"),
    ("--max-eval-timeout", float, D.MAX_EVAL_TIMEOUT, "longest eval timeout in seconds a client may ask for"),
    ("--cpu-limit", float, D.DEFAULT_CPU_LIMIT, "default CPU seconds one turn of a guest's event loop may take"),
    ("--request-cpu", float, D.DEFAULT_REQUEST_CPU, "default CPU seconds a dispatch may use before its head"),
    ("--max-cpu-limit", float, D.MAX_CPU_LIMIT, "largest CPU limit in seconds a client may ask for"),
)


def add_starts(p: argparse.ArgumentParser) -> None:
    """How many runtime processes boot at once, and how long a create waits for a turn (also the
    broker's, for its embedded daemon)."""
    p.add_argument("--max-starting", type=int, default=MAX_STARTING,
                   help="runtime processes booting at once; more creates wait (%(default)s)")  # fmt: skip
    p.add_argument("--start-queue-timeout", type=float, default=START_QUEUE_TIMEOUT,
                   help="seconds a create waits to start before it is refused with `busy` (%(default)s)")  # fmt: skip


def add_limits(p: argparse.ArgumentParser) -> None:
    """The operator's limits on runtimes (also the broker's, for its embedded daemon)."""
    for flag, kind, default, text in LIMIT_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=f"{text} (%(default)s)")
    p.add_argument("--no-cgroups", action="store_true", help="no memory cgroups (the RSS watchdog only)")
    p.add_argument("--max-streams", type=int, default=None, help="body streams open at once at most, past "
                   f"it a call gets `busy` (default: {D.STREAMS_PER_RUNTIME} per runtime of capacity)")  # fmt: skip


def limits(args: argparse.Namespace) -> dict[str, object]:
    return {
        "max_memory_mb": args.max_memory_mb,
        "max_eval_timeout": args.max_eval_timeout,
        "cpu_limit": args.cpu_limit,
        "request_cpu": args.request_cpu,
        "max_cpu_limit": args.max_cpu_limit,
        "cgroups": not args.no_cgroups,
        "max_streams": args.max_streams,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_logging(args.verbose)
    bind_host = args.bind_host or args.advertise_host
    warning = exposure_warning([f"tcp://{bind_host}:{args.control_port}"], curve=bool(args.curve_keypair))
    if warning:
        logging.getLogger("daemon").warning("%s (control socket and body pipes)", warning)
    daemon = Daemon(
        args.broker,
        max_runtimes=args.max_runtimes,
        bind_host=bind_host,
        advertise_host=args.advertise_host,
        control_port=args.control_port,
        pool_size=args.pool_size,
        max_starting=args.max_starting,
        start_queue_timeout=args.start_queue_timeout,
        default_memory_mb=args.memory_mb,
        eval_timeout=args.eval_timeout,
        **limits(args),
        heartbeat=args.heartbeat,
        liveness=args.liveness,
        name=args.name,
        orphan_grace=args.orphan_grace,
        keys=load_keypair(args.curve_keypair) if args.curve_keypair else None,
        broker_key=load_public_key(args.broker_key) if args.broker_key else None,
    )
    return run_until_signalled(daemon.run)


if __name__ == "__main__":
    sys.exit(main())
