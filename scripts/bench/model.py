"""What a run does (the plans) and what it reports (rows with targets); no I/O here."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

MiB = 1 << 20

#: The scenarios in the order a run takes them (scenarios/ implements them; the command line, which
#: must not import the product before --product-root is applied, validates names against this).
SCENARIO_NAMES = (
    "llm_stream", "bulk_passthrough", "bulk_upload", "bulk_dispatch_body", "slow_consumer", "concurrent_streams",
    "dispatch_rtt", "create_runtime", "cancel_latency", "idle_runtimes", "tool_rtt", "tool_stream",
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    rounds: int
    bulk: int  # bytes per bulk transfer
    slow: int  # bytes of the slow consumer's body
    slow_pauses: int  # pauses per slow body (one sample each)
    slow_settle: float  # seconds the guest pauses before a sample
    streams: int  # concurrent streams
    stream_runtimes: int  # runtimes they are spread over
    rtt_requests: int  # sequential dispatches per round
    rps_requests: int  # dispatches per round at RPS_IN_FLIGHT
    creates_warm: int
    creates_cold: int
    create_pause: float  # seconds between creates, so the warm pool refills
    creates_sustained: int  # creates per round at SUSTAINED_RATE
    cancels: int  # cancels per round
    idle_runtimes: int
    scenario_timeout: float
    sse_events: int = 20
    sse_gap: float = 0.05
    stream_size: int = MiB


FULL = Plan(
    rounds=5, bulk=512 * MiB, slow=1024 * MiB, slow_pauses=8, slow_settle=0.3, streams=1000, stream_runtimes=50,
    rtt_requests=500, rps_requests=4000, creates_warm=10, creates_cold=5, create_pause=0.5, creates_sustained=100,
    cancels=10, idle_runtimes=20, scenario_timeout=900,
)  # fmt: skip
QUICK = Plan(
    rounds=3, bulk=64 * MiB, slow=128 * MiB, slow_pauses=4, slow_settle=0.15, streams=200, stream_runtimes=10,
    rtt_requests=200, rps_requests=1000, creates_warm=5, creates_cold=3, create_pause=0.3, creates_sustained=40,
    cancels=5, idle_runtimes=10, scenario_timeout=120,
)  # fmt: skip
RPS_IN_FLIGHT = 32
#: Runtime creates per second in create_runtime's sustained figure: faster than the pool refills.
SUSTAINED_RATE = 20.0
#: A heap limit other than the daemon's default (128 MB), so create_runtime cannot use the pool.
COLD_MEMORY_MB = 160
#: Pre-started runtimes in the broker's local daemon (its --pool-size default).
POOL_SIZE = 2
#: A reader's pause longer than a ZMTP heartbeat timeout (5 s; pipes once had one, and then lost the
#: bytes queued in them), and the body read with it.
LONG_PAUSE = 6.0
LONG_PAUSE_BODY = 32 * MiB
#: Body the guest cancels in cancel_latency: large enough that the upstream is blocked writing it.
CANCEL_BODY = 1024 * MiB


@dataclass(frozen=True)
class Target:
    op: str  # "<=" or ">="
    limit: float
    on: str = "value"  # "value" or "ratio"
    unit: str = ""

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x <= self.limit if self.op == "<=" else x >= self.limit

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit and self.on == "value" else ""
        return f"{'ratio ' if self.on == 'ratio' else ''}{self.op} {self.limit:g}{unit}"


@dataclass
class Row:
    scenario: str
    figure: str
    value: float | None = None
    unit: str = ""
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    rounds: list[float] = field(default_factory=list)
    baseline_rounds: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def figure(
    scenario: str,
    name: str,
    unit: str,
    rounds: list[float],
    *,
    target: Target | None = None,
    baseline: tuple[str, list[float]] | None = None,
    ratio: bool = True,
    note: str = "",
    value: float | None = None,
) -> Row:
    """One row: the median of ``rounds`` (or ``value``), against the median of a baseline's rounds."""
    row = Row(scenario, name, median(rounds) if value is None else value, unit, rounds=list(rounds), note=note)
    if baseline is not None:
        row.baseline, row.baseline_rounds = baseline[0], list(baseline[1])
        row.baseline_value = median(baseline[1])
        if ratio and row.value is not None and row.baseline_value:
            row.ratio = row.value / row.baseline_value
    if target is not None:
        row.target = str(target)
        row.met = target.met(row.value, row.ratio)
    return row


def throughput_rows(
    scenario: str, mbps: dict[str, list[float]], *, floor: float | None = None, proxy_ratio: float = 0.5
) -> list[Row]:
    """product MB/s against direct (with the absolute target), proxy (the ratio target) and the raw zmq
    ceilings (with the product's pipe settings, and the older HWM 16 / 64 KiB one) when measured."""
    rows = [
        figure(
            scenario,
            "MB/s",
            "MB/s",
            mbps["product"],
            baseline=("direct", mbps["direct"]),
            target=Target(">=", floor, unit="MB/s") if floor is not None else None,
        ),
        figure(
            scenario,
            "MB/s vs proxy",
            "MB/s",
            mbps["product"],
            baseline=("proxy", mbps["proxy"]),
            target=Target(">=", proxy_ratio, on="ratio"),
        ),
    ]
    for name, label in (("raw_product", "product settings"), ("raw", "HWM 16, 64 KiB frames")):
        if name in mbps:
            rows.append(
                figure(
                    scenario, f"MB/s vs raw zmq ({label})", "MB/s", mbps["product"], baseline=("raw zmq", mbps[name])
                )
            )
    return rows


def to_mbps(size: int, seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [size / 1e6 / s for s in secs] for name, secs in seconds.items()}
