"""``python -m daemon --broker ENDPOINT``: join a broker, possibly from another host."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from daemon import daemon as D
from daemon.daemon import Daemon
from daemon.pool import MAX_STARTING, START_QUEUE_TIMEOUT
from wire.auth import exposure_warning, load_keypair, load_public_key
from wire.liveness import LIVENESS
from wire.service import configure_from, parser, run_until_signalled

log = logging.getLogger("sandbox_mesh.daemon")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def make_parser() -> argparse.ArgumentParser:
    p = parser("python -m daemon", __doc__)
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
        help="seconds runtimes live on while no broker is reachable, for one to come back",
    )
    p.add_argument("--bind-host", default=None, help="interface for the control socket and pipes "
                   "(default: the advertised host)")  # fmt: skip
    p.add_argument("--advertise-host", default="127.0.0.1", help="address clients use to reach this daemon")
    p.add_argument("--control-port", type=int, default=0, help="control socket port (0: any free port)")
    add_runtimes(p)
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    p.add_argument("--liveness", type=int, default=LIVENESS, help="missed broker heartbeats before re-registering")
    p.add_argument("--name", default=None, help="name shown in logs and errors (default: HOST:PID)")
    p.add_argument(
        "--curve-keypair",
        help="this daemon's CURVE key pair (NAME.key_secret from `python -m wire.auth`); needs --broker-key",
    )
    p.add_argument("--broker-key", help="the broker's public key file (NAME.key)")
    return p


#: (flag, type, default, help) of each operator setting of runtimes; ``python -m broker`` has them
#: too, for its embedded daemon.
RUNTIME_FLAGS = (
    ("--max-runtimes", int, 64, "runtimes this daemon hosts at most"),
    ("--pool-size", int, 2, "pre-started runtimes kept warm"),
    ("--max-starting", int, MAX_STARTING, "runtime processes booting at once; more creates wait"),
    ("--start-queue-timeout", float, START_QUEUE_TIMEOUT, "seconds a create waits to start before `busy`"),
    ("--memory-mb", int, D.DEFAULT_MEMORY_MB, "default runtime heap limit in MB"),
    ("--eval-timeout", float, 30.0, "default eval timeout in seconds"),
    ("--max-memory-mb", int, D.MAX_MEMORY_MB, "largest memory_limit_mb a client may ask for"),
    ("--max-eval-timeout", float, D.MAX_EVAL_TIMEOUT, "longest eval timeout in seconds a client may ask for"),
    ("--cpu-limit", float, D.DEFAULT_CPU_LIMIT, "default CPU seconds one turn of a guest's event loop may take"),
    ("--request-cpu", float, D.DEFAULT_REQUEST_CPU, "default CPU seconds a dispatch may use before its head"),
    ("--max-cpu-limit", float, D.MAX_CPU_LIMIT, "largest CPU limit in seconds a client may ask for"),
)


def add_runtimes(p: argparse.ArgumentParser) -> None:
    """The operator's settings of runtimes: capacity, pool, start queue, limits (also the broker's,
    for its embedded daemon)."""
    for flag, kind, default, text in RUNTIME_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--no-cgroups", action="store_true", help="no memory cgroups (the RSS watchdog only)")
    p.add_argument("--max-streams", type=int, default=None, help="body streams open at once at most, past "
                   f"it a call gets `busy` (default: {D.STREAMS_PER_RUNTIME} per runtime of capacity)")  # fmt: skip


def runtime_settings(args: argparse.Namespace) -> dict[str, object]:
    """The ``Daemon`` keyword arguments of ``add_runtimes``' options."""
    return {
        "max_runtimes": args.max_runtimes,
        "pool_size": args.pool_size,
        "max_starting": args.max_starting,
        "start_queue_timeout": args.start_queue_timeout,
        "default_memory_mb": args.memory_mb,
        "eval_timeout": args.eval_timeout,
        "max_memory_mb": args.max_memory_mb,
        "max_eval_timeout": args.max_eval_timeout,
        "cpu_limit": args.cpu_limit,
        "request_cpu": args.request_cpu,
        "max_cpu_limit": args.max_cpu_limit,
        "cgroups": not args.no_cgroups,
        "max_streams": args.max_streams,
    }


async def serve(daemon: Daemon, metrics_host: str, metrics_port: int | None) -> int:
    """Run the daemon (and its metrics endpoint). Says so when no broker answers its registration,
    and exits with 1 if it is stopped without ever having reached one."""
    from wire.metrics import serve as serve_metrics

    async with contextlib.AsyncExitStack() as stack:
        if metrics_port is not None:
            from daemon.metrics import DaemonMetrics

            metrics = DaemonMetrics(daemon)
            port = await stack.enter_async_context(serve_metrics(metrics.registry, metrics_host, metrics_port))
            log.info("metrics at http://%s:%d/metrics", metrics_host, port)
        reached = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(daemon.run(), name="daemon")
                await _watch_registration(daemon)
                reached.set()
        except asyncio.CancelledError:
            if reached.is_set():
                raise
        if not reached.is_set():
            log.error("daemon %s stopped without ever reaching a broker (tried %s)", daemon.name,
                      ", ".join(daemon.brokers))  # fmt: skip
            return 1
    return 0


async def _watch_registration(daemon: Daemon) -> None:
    """Return once a broker has welcomed the daemon. One clear line if none has within twice its
    liveness timeout (the daemon keeps trying; its own log lines say each attempt)."""
    patience = daemon.heartbeat * daemon.liveness * 2
    try:
        async with asyncio.timeout(patience):
            await daemon.registered.wait()
    except TimeoutError:
        log.error(
            "daemon %s has not reached a broker within %gs (trying %s): is `python -m broker` running there, and is "
            "this its --backend endpoint? With CURVE: does --broker-key match the broker's key pair, and is this "
            "daemon's key authorized (--daemon-keys)? Still trying.",
            daemon.name, patience, ", ".join(daemon.brokers),
        )  # fmt: skip
        await daemon.registered.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_from(args)
    bind_host = args.bind_host or args.advertise_host
    warning = exposure_warning([f"tcp://{bind_host}:{args.control_port}"], curve=bool(args.curve_keypair))
    if warning:
        log.warning("%s (control socket and body pipes)", warning)
    daemon = Daemon(
        args.broker,
        bind_host=bind_host,
        advertise_host=args.advertise_host,
        control_port=args.control_port,
        **runtime_settings(args),  # type: ignore[arg-type]
        heartbeat=args.heartbeat,
        liveness=args.liveness,
        name=args.name,
        orphan_grace=args.orphan_grace,
        keys=load_keypair(args.curve_keypair) if args.curve_keypair else None,
        broker_key=load_public_key(args.broker_key) if args.broker_key else None,
    )
    return run_until_signalled(lambda: serve(daemon, args.metrics_host, args.metrics_port), "python -m daemon")


if __name__ == "__main__":
    sys.exit(main())
