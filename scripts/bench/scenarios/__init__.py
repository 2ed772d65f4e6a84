"""The scenarios, in the order a run takes them. Each is ``async def name(env) -> list[Row]``: it
measures the product and its baselines in the same run and returns its rows (medians of rounds)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from scripts.bench.env import Env
from scripts.bench.model import SCENARIO_NAMES, Row
from scripts.bench.scenarios.bulk import bulk_dispatch_body, bulk_passthrough, bulk_upload
from scripts.bench.scenarios.concurrent import concurrent_streams
from scripts.bench.scenarios.latency import dispatch_rtt, llm_stream
from scripts.bench.scenarios.runtimes import cancel_latency, create_runtime, idle_runtimes
from scripts.bench.scenarios.slow import slow_consumer
from scripts.bench.scenarios.tools import tool_rtt, tool_stream

SCENARIOS: dict[str, Callable[[Env], Awaitable[list[Row]]]] = {
    f.__name__: f
    for f in (
        llm_stream,
        bulk_passthrough,
        bulk_upload,
        bulk_dispatch_body,
        slow_consumer,
        concurrent_streams,
        dispatch_rtt,
        create_runtime,
        cancel_latency,
        idle_runtimes,
        tool_rtt,
        tool_stream,
    )
}
assert tuple(SCENARIOS) == SCENARIO_NAMES, "model.SCENARIO_NAMES lists the scenarios for the command line"
