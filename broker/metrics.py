"""The broker's Prometheus metrics (``python -m broker --metrics-port``).

Counted from the messages the shell sends (the core stays free of metrics): a create's ``ok``
(it carries the daemon's ``control``) is a runtime created, a ``create_runtime`` to a daemon a
placement, a ``dispose`` to a daemon a runtime disposed, a ``runtime_lost`` to an owner a lost
runtime, an ``error`` an error or refusal by code. Read from the core at scrape time: what is live.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from broker.core import CLIENT, Core, Out
from wire.metrics import Gauges, header

P = "sandbox_mesh_broker_"


class BrokerMetrics:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.registry = CollectorRegistry()
        r = self.registry
        self.created = Counter(P + "runtimes_created", "Runtimes created (create answered ok)", registry=r)
        self.disposed = Counter(P + "runtimes_disposed", "Dispose orders sent to daemons", registry=r)
        self.lost = Counter(P + "runtimes_lost", "Runtime losses reported to owners, by code", ["code"], registry=r)
        self.placed = Counter(P + "placements", "Runtimes placed, by daemon", ["daemon"], registry=r)
        self.errors = Counter(P + "errors", "Errors and refusals sent, by peer and code", ["peer", "code"], registry=r)
        r.register(Gauges(self._gauges))

    def sent(self, out: Out) -> None:
        t, _id, h = header(out.frames)
        if t == "error":
            self.errors.labels(out.to, str(h.get("code"))).inc()
        elif out.to == CLIENT:
            if t == "ok" and "control" in h:
                self.created.inc()
            elif t == "runtime_lost":
                self.lost.labels(str(h.get("code"))).inc()
        elif t == "create_runtime":
            daemon = self.core.daemons.get(out.ident)
            self.placed.labels(daemon.name if daemon is not None else "?").inc()
        elif t == "dispose":
            self.disposed.inc()

    def _gauges(self) -> list[tuple[str, str, list[str], list[tuple[list[str], float]]]]:
        core = self.core
        daemons = list(core.daemons.values())
        rows: list[Any] = [
            (P + "runtimes_live", "Runtimes the broker knows", [], [([], len(core.runtimes))]),
            (P + "daemons", "Daemons registered", [], [([], len(daemons))]),
            (P + "sessions", "Client sessions connected", [], [([], len(core.clients))]),
            (P + "daemon_runtimes", "Runtimes per daemon", ["daemon"], [([d.name], len(d.runtimes)) for d in daemons]),
            (P + "daemon_capacity", "Capacity per daemon", ["daemon"], [([d.name], d.capacity) for d in daemons]),
            (
                P + "requests_in_flight",
                "Requests waiting for an answer: client->daemon (down), daemon fetch callbacks (up)",
                ["direction"],
                [(["down"], len(core.down)), (["up"], len(core.up))],
            ),
            (
                P + "dropped_unread_total",
                "Messages of flooding peers dropped unread",
                [],
                [([], core.budget.drops)],
            ),
        ]
        return rows
