"""Measure sandbox-mesh against baselines measured in the same run (issue 4, issue 7 item 8).

    python -m scripts.bench [--quick] [--only NAME[,NAME...]] [--json PATH] [--png PATH] [--readme [PATH]]
    python -m scripts.bench --product-root DIR ...    # measure another checkout's broker, daemon and client
    python -m scripts.bench --compare OLD.json NEW.json
    python -m scripts.bench --from-json PATH --readme  # write README.md's table from an earlier run

The benchmark starts everything itself on 127.0.0.1 -- an aiohttp upstream (``python -m
scripts.kit.upstream``, its own process), a ``python -m broker`` with its embedded local daemon, the
client, the HTTP front and the end clients (this process) -- and stops all of it at the end, also on
Ctrl-C or an error.

Baselines: ``direct`` (the end client talks to the upstream itself, or to a server doing the guest's
work), ``proxy`` (a plain aiohttp reverse proxy streaming with ``iter_any()``, what a user would write
instead) and ``raw zmq`` (a bare pyzmq PUSH/PULL pair moving the same bytes: once with the product's
pipe settings, the transport's ceiling for this product, and once with HWM 16 and 64 KiB frames).
Every figure is the median of several rounds; every ratio is against a baseline of this run.
MB/s means 10^6 bytes per second; MiB is 2^20 bytes; CPU s/GB is CPU seconds per 10^9 bytes moved.

Layout: ``model`` (plan, rows, targets), ``env`` (processes, CPU accounting), ``net`` (HTTP helpers),
``baselines`` (proxy, raw zmq), ``product`` (the guest and the runtimes under test), ``scenarios/``
(one module per group), ``machine`` (the stamp), ``report`` (table, JSON, PNG, README, comparison),
``run`` (running the scenarios) and ``__main__`` (the command line).
"""
