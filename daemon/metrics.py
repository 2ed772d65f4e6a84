"""The daemon's Prometheus metrics (``python -m daemon --metrics-port``, or the broker's for its
embedded daemon).

Counted from the messages of the broker link (``Daemon.observer``): a request (``create_runtime``,
``eval``, ``dispatch``) is timed from its arrival to its ``ok``/``error`` (for a dispatch: the
response head), a ``fetch`` callback from its sending to the client's answer; each ``error`` and
each ``runtime_lost`` (the guest stopped, and why: memory, CPU, crash...) is counted by code.
Read at scrape time: runtimes live, body pipes open, streams and callbacks in flight, the warm
pool, the bytes of body data through the pipes (wire.pipes.BYTES, per process) and client cancels.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from daemon.daemon import Daemon
from wire import pipes
from wire.metrics import LATENCY_BUCKETS, Gauges, Timer, header

P = "sandbox_mesh_daemon_"
_TIMED = frozenset({"create_runtime", "eval", "dispatch", "stats", "dispose"})


class DaemonMetrics:
    """The metrics of ``daemon``, in ``registry`` (a new one by default); installs itself as its observer."""

    def __init__(self, daemon: Daemon, registry: CollectorRegistry | None = None) -> None:
        self.daemon = daemon
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Timer(
            Histogram(
                P + "request_seconds",
                "Requests from arrival to answer (dispatch: to the response head)",
                ["kind"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.callbacks = Timer(
            Histogram(
                P + "callback_seconds",
                "Fetch callbacks from sending to the client's answer",
                ["kind"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.errors = Counter(P + "errors", "Errors answered to requests, by code", ["code"], registry=r)
        self.ended = Counter(
            P + "runtimes_lost",
            "Runtimes stopped on their own (guest kills and crashes), by cause",
            ["cause"],
            registry=r,
        )
        self.disposed = Counter(P + "runtimes_disposed", "Dispose orders received", registry=r)
        r.register(Gauges(self._gauges))
        daemon.observer = self

    def received(self, frames: list[Any]) -> None:
        t, mid, h = header(frames)
        if t in _TIMED and mid is not None:
            self.requests.start((h.get("c"), mid), t)
        elif t in ("ok", "error") and mid is not None and h.get("c") is None:
            self.callbacks.stop(mid)  # the client's answer to a fetch
        if t == "dispose":
            self.disposed.inc()

    def sent(self, frames: list[Any]) -> None:
        t, mid, h = header(frames)
        if t in ("ok", "error") and mid is not None:
            self.requests.stop((h.get("c"), mid))
            if t == "error":
                self.errors.labels(str(h.get("code"))).inc()
        elif t == "fetch" and mid is not None:
            self.callbacks.start(mid, "fetch")
        elif t == "runtime_lost":
            self.ended.labels(str(h.get("code"))).inc()

    def _gauges(self) -> list[tuple[str, str, list[str], list[tuple[list[str], float]]]]:
        d = self.daemon
        pool = d.pool
        return [
            (P + "runtimes_live", "Runtimes hosted", [], [([], len(d.runtimes))]),
            (P + "capacity", "Runtimes this daemon hosts at most", [], [([], d.max_runtimes)]),
            (P + "pipes_open", "Body pipes open (streams in flight, both directions)", [], [([], d.pipes.count())]),
            (P + "streams_cancellable", "Response streams clients may cancel", [], [([], len(d.registry.streams))]),
            (P + "callbacks_waiting", "Fetch callbacks waiting for a client", [], [([], len(d.registry.callbacks))]),
            (P + "pool_warm", "Pre-started runtimes ready", [], [([], pool.warm() if pool is not None else 0)]),
            (
                P + "stream_bytes_total",
                "Body bytes through pipes in this process",
                ["direction"],
                [([k], v) for k, v in pipes.BYTES.items()],
            ),
            (P + "cancels_total", "Streams cancelled by their clients", [], [([], d.registry.cancels)]),
            (P + "registered", "1 while a broker has this daemon registered", [], [([], d.registered.is_set())]),
        ]
