"""``python -m broker``: bind the frontend and backend, start a local daemon, print one ready line.

``python -m broker status [--frontend EP]``: print what a running broker knows (its daemons,
sessions, requests in flight)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from typing import Any

from broker.broker import Broker
from broker.core import MAX_INFLIGHT_PER_CLIENT, MAX_KEEP_ALIVE, MAX_RUNTIMES_PER_CLIENT
from wire.auth import exposure_warning, load_authorized, load_keypair
from wire.liveness import LIVENESS
from wire.service import configure_from, parser, run_until_signalled

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

log = logging.getLogger("sandbox_mesh.broker")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def make_parser() -> argparse.ArgumentParser:
    from daemon.__main__ import add_runtimes

    p = parser("python -m broker", __doc__)
    p.add_argument("--frontend", default=DEFAULT_FRONTEND, help="endpoint clients connect to")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help="endpoint daemons connect to")
    p.add_argument("--no-local-daemon", action="store_true", help="do not start the embedded daemon")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    p.add_argument("--liveness", type=int, default=LIVENESS, help="missed heartbeats before a daemon is dropped")
    p.add_argument("--client-liveness", type=int, default=10, help="missed heartbeats before a client is dropped")
    p.add_argument(
        "--max-runtimes-per-client",
        type=int,
        default=MAX_RUNTIMES_PER_CLIENT,
        help="runtimes one client may hold; more are refused with `quota`",
    )
    p.add_argument(
        "--max-inflight-per-client",
        type=int,
        default=MAX_INFLIGHT_PER_CLIENT,
        help="requests of one client not answered yet; more are refused with `quota`",
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
        help="longest keep_alive in seconds a named runtime may ask for",
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
    local = p.add_argument_group("the embedded daemon (not with --no-local-daemon)")
    add_runtimes(local)  # type: ignore[arg-type]
    return p


async def serve(args: argparse.Namespace) -> None:
    from wire.metrics import serve as serve_metrics

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
        metrics=args.metrics_port is not None,
    )
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        tg.create_task(broker.run())
        await broker.ready.wait()
        extra = ""
        if broker.metrics is not None:
            port = await stack.enter_async_context(
                serve_metrics(broker.metrics.registry, args.metrics_host, args.metrics_port)
            )
            extra = f" metrics=http://{args.metrics_host}:{port}/metrics"
        if not args.no_local_daemon:
            from daemon.__main__ import runtime_settings
            from daemon.daemon import Daemon

            local = Daemon(
                broker.local_endpoint,
                heartbeat=args.heartbeat,
                liveness=args.liveness,
                name="local",
                **runtime_settings(args),  # type: ignore[arg-type]
                keys=keys,
                broker_key=keys.public if keys else None,
            )
            if broker.metrics is not None:  # its series join the broker's, at the same endpoint
                from daemon.metrics import DaemonMetrics

                DaemonMetrics(local, broker.metrics.registry)
            tg.create_task(local.run())
            await local.registered.wait()
        print(f"ready frontend={broker.frontend_endpoint} backend={broker.backend_endpoint}{extra}", flush=True)


# ---- python -m broker status ---------------------------------------------------------------------


def parse_status(argv: list[str]) -> argparse.Namespace:
    return make_status_parser().parse_args(argv)


def make_status_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m broker status",
        "Print what a running broker knows: daemons, sessions, requests in flight.",
        metrics=False,
    )
    p.add_argument("--frontend", default=DEFAULT_FRONTEND, help="the broker's frontend endpoint")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--curve-keypair", help="a CURVE key pair the broker authorizes (with CURVE)")
    p.add_argument("--broker-key", help="the broker's public key file (with CURVE)")
    return p


async def ask_status(args: argparse.Namespace) -> dict[str, Any]:
    import client
    from wire import messages as M
    from wire.auth import load_public_key

    keypair = load_keypair(args.curve_keypair) if args.curve_keypair else None
    broker_key = load_public_key(args.broker_key) if args.broker_key else None
    conn = await client.connect(args.frontend, timeout=args.timeout, keypair=keypair, broker_key=broker_key,
                                reconnect=0)  # fmt: skip
    try:
        reply = await conn.call(lambda i: M.Status(id=i), M.StatusOk)
    finally:
        await conn.close()
    report: dict[str, Any] = reply.report
    return report


def render_status(report: dict[str, Any]) -> str:
    """The report as a few aligned tables; the session asking is left out (it is this command)."""
    asking = any(c["c"] == report.get("asker") for c in report["sessions"])
    lines = [
        f"broker up {report['uptime_s']}s: {report['runtimes']} runtimes, {report['requests_in_flight']} requests "
        f"and {report['callbacks_in_flight']} callbacks in flight, {report['tombstones']} lost runtimes remembered",
        "",
        f"daemons ({report['daemons_total']}{_shown(report['daemons'], report['daemons_total'])}):",
        f"  {'NAME':<24} {'CONTROL':<28} {'CAPACITY':>8} {'RUNTIMES':>8} {'LOAD':>5} {'WARM':>5} {'PIPES':>6} "
        f"{'LAST HB':>8}",
    ]
    for d in report["daemons"]:
        lines.append(
            f"  {d['name']:<24} {d['control']:<28} {d['capacity']:>8} {d['runtimes']:>8} {d['load']:>5} "
            f"{_dash(d['warm']):>5} {_dash(d['pipes']):>6} {d['last_heartbeat_s']:>7}s"
        )
    lines += [
        "",
        f"sessions ({report['sessions_total'] - asking} connected"
        f"{_shown(report['sessions'], report['sessions_total'])}; "
        f"{report['away']['sessions']} away holding "
        f"{report['away']['runtimes']} runtimes):",
        f"  {'SESSION':<14} {'KEY':<42} {'RUNTIMES':>8} {'NAMED':>6} {'IN FLIGHT':>9} {'LAST HB':>8}",
    ]
    for c in report["sessions"]:
        if c["c"] == report.get("asker"):
            continue  # this status request's own connection
        lines.append(
            f"  {c['c']:<14} {c['key'] or '-':<42} {c['runtimes']:>8} {c['named']:>6} {c['in_flight']:>9} "
            f"{c['last_heartbeat_s']:>7}s"
        )
    return "\n".join(lines)


def _dash(v: int | None) -> str:
    return "-" if v is None else str(v)


def _shown(rows: list[Any], total: int) -> str:
    return "" if len(rows) == total else f", the {len(rows)} with most runtimes shown"


def status(argv: list[str]) -> int:
    import zmq

    import client

    args = parse_status(argv)
    configure_from(args)
    try:
        report = asyncio.run(ask_status(args))
    except (client.Error, ValueError, zmq.ZMQError) as exc:
        print(f"python -m broker status: {args.frontend}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render_status(report), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status(argv[1:])
    args = parse(argv)
    configure_from(args)
    warning = exposure_warning([args.frontend, args.backend], curve=bool(args.curve_keypair))
    if warning:
        log.warning("%s", warning)
    return run_until_signalled(lambda: serve(args), "python -m broker")


if __name__ == "__main__":
    sys.exit(main())
