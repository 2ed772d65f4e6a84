"""Prometheus metrics shared by the broker and the daemon: the HTTP endpoint, and the counting of
the messages a service sends and receives on its broker link.

Each service keeps its own ``CollectorRegistry`` (two services in one process, e.g. a broker and
its embedded daemon, do not mix their series) and serves it with aiohttp on ``--metrics-port``, so
the endpoint lives on the service's event loop and stops with it. Counters that follow the flow of
messages are fed by the service's shell from each message's header (``observe``); gauges are read
from the service's state when Prometheus scrapes (a collector), so they cost nothing in between.
Names: ``sandbox_mesh_<service>_<what>``; docs/design.md lists them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wire.schema import peek
from wire.service import Fatal

#: Latency buckets in seconds: from a warm dispatch (~1 ms) to the 60 s dispatch default.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Requests whose start is remembered for a latency; past this, the oldest are forgotten (their
#: replies never came: their peer was lost), so the table stays bounded.
MAX_TIMED = 100_000


class Observer(Protocol):
    """Counts the messages of a link: the service calls it with each message's frames."""

    def sent(self, frames: list[Any]) -> None: ...

    def received(self, frames: list[Any]) -> None: ...


def header(frames: list[Any]) -> tuple[str | None, int | None, dict[str, Any]]:
    """(type, id, header) of a message the service already accepted or built."""
    return peek(frames)


class Timer:
    """Latency of requests from their start to their answer, keyed by what identifies them on the link."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._started: dict[Any, tuple[float, str]] = {}

    def start(self, key: Any, kind: str) -> None:
        if len(self._started) >= MAX_TIMED:
            self._started.pop(next(iter(self._started)))
        self._started[key] = (time.monotonic(), kind)

    def stop(self, key: Any) -> None:
        started = self._started.pop(key, None)
        if started is not None:
            self.histogram.labels(started[1]).observe(time.monotonic() - started[0])


class Gauges(Collector):
    """Values computed at scrape time by ``read``: yields (name, help, labels, [(label values, value)]).
    A name ending in ``_total`` is a counter read from the code's own running count (exposed with
    TYPE counter, so that ``rate()`` treats a restart as a reset); any other name is a gauge."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        for name, text, labels, samples in self._read():
            family: Metric
            if name.endswith("_total"):
                family = CounterMetricFamily(name.removesuffix("_total"), text, labels=labels)
            else:
                family = GaugeMetricFamily(name, text, labels=labels)
            for values, value in samples:
                family.add_metric(values, value)
            yield family


@contextlib.asynccontextmanager
async def serve(registry: CollectorRegistry, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``registry`` at http://host:port/metrics while the block runs; yields the bound port
    (``port`` 0: any free one). A port in use is ``Fatal``: one line, exit code 1."""

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise Fatal(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
