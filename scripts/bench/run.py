"""Running the scenarios: the processes of a run, each scenario under a timeout, a new broker if one
died, and a clean stop on Ctrl-C or SIGTERM. Imports the product (through scenarios), so it is
imported only after ``env.use_product``."""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts.bench.env import Env, Proc, Processes, say, settle_children
from scripts.bench.model import POOL_SIZE, Plan, Row
from scripts.bench.net import end_client
from scripts.bench.scenarios import SCENARIOS

BROKER_ARGS = ("--max-runtimes", "200")


def _describe(exc: BaseException) -> str:
    """The error text of a failed scenario; a TaskGroup's error names its distinct sub-errors."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, BaseExceptionGroup):
        subs = sorted({_describe(e) for e in exc.exceptions})
        text += " [" + "; ".join(subs[:3]) + (f"; +{len(subs) - 3} more" if len(subs) > 3 else "") + "]"
    return text


async def run_scenario(env: Env, name: str) -> list[Row]:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(env.plan.scenario_timeout):
            rows = await SCENARIOS[name](env)
    except Exception as exc:
        rows = [Row(name, "error", error=_describe(exc))]
    say(f"{name}: {'FAILED ' + rows[0].error if rows[0].error else 'done'} in {time.monotonic() - t0:.1f} s")
    return rows


async def ensure_broker(env: Env, procs: Processes, broker: Proc, rows: list[Row]) -> Proc:
    """If the broker died during the last scenario, say so in its rows and start a new one."""
    code = broker.p.poll()
    if code is None:
        # the next scenario starts from a quiet broker: this one's runtimes gone, the pool refilled
        await settle_children(env, POOL_SIZE, timeout=15)
        return broker
    last = " | ".join(broker.tail(4000).strip().splitlines()[-2:])
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
    message = f"the broker process died ({how}) during this scenario; its log ends: {last}"
    say(message)
    for row in rows:
        row.error = f"{row.error}; {message}" if row.error else message
    broker = await asyncio.to_thread(procs.broker, *BROKER_ARGS)
    env.frontend, env.broker_pid = broker.field("frontend"), broker.pid
    say(f"started a new broker, pid {broker.pid}")
    return broker


async def run_all(
    plan: Plan, names: list[str], procs: Processes, upstream: Proc, broker: Proc, rows: list[Row], extras: dict
) -> None:
    """Run the scenarios in order, appending to ``rows`` and ``extras`` (so an interrupt keeps them)."""
    async with end_client() as session:
        env = Env(plan, upstream.field("url"), upstream.pid, broker.field("frontend"), broker.pid, session, extras)
        for name in names:
            say(f"{name} ...")
            scenario_rows = await run_scenario(env, name)
            rows += scenario_rows
            broker = await ensure_broker(env, procs, broker, scenario_rows)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: not an Exception, so no scenario's error handling swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _handle_signals(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def not_run(names: list[str], rows: list[Row], why: str) -> list[Row]:
    done = {r.scenario for r in rows}
    return [Row(name, "error", error=why) for name in names if name not in done]


def run(plan: Plan, names: list[str], product_root: Path) -> tuple[list[Row], dict[str, Any], Interrupted | None]:
    """Start the upstream and a broker, run ``names``, stop everything; returns (rows, extras, interrupt)."""
    # our own handlers (asyncio.run then installs none): the finally below always stops what we started
    _handle_signals(_interrupt)
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    procs = Processes(logs, product_root)
    rows: list[Row] = []
    extras: dict[str, Any] = {}
    interrupted: Interrupted | None = None
    try:
        upstream = procs.upstream()
        broker = procs.broker(*BROKER_ARGS)
        say(f"upstream {upstream.field('url')}, broker pid {broker.pid} {broker.ready_line}; logs in {logs}")
        asyncio.run(run_all(plan, names, procs, upstream, broker, rows, extras))
    except Interrupted as exc:
        interrupted = exc
        say(f"interrupted by {exc}; stopping everything")
        rows += not_run(names, rows, f"not run or not finished: interrupted by {exc}")
    except Exception as exc:
        rows += not_run(names, rows, f"the run failed: {type(exc).__name__}: {exc}")
    finally:
        _handle_signals(signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        procs.stop_all()
        _handle_signals(signal.SIG_DFL)
    return rows, extras, interrupted
