"""Process entry-point helpers shared by ``python -m broker`` and ``python -m daemon``: the options
every service has (version, logging, metrics), logging setup, and running until a signal.

Every logger of the product lives under one namespace, ``sandbox_mesh`` (``sandbox_mesh.broker``,
``sandbox_mesh.daemon.pool``, ``sandbox_mesh.client``...), so an application embedding the client,
or an operator, sets the level of all of it in one place. ``--log-level`` applies to that namespace;
other libraries (asyncio, aiohttp) stay at WARNING so DEBUG does not drown in their chatter.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata

import zmq

#: The root of every logger of the product.
NAMESPACE = "sandbox_mesh"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


class Fatal(Exception):
    """A condition that ends a service with a one-line message and exit code 1 (no traceback)."""


def version() -> str:
    try:
        return metadata.version("sandbox-mesh")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def parser(prog: str, description: str | None, *, metrics: bool = True) -> argparse.ArgumentParser:
    """An argument parser whose --help shows every option's default, with the common options
    (and ``--metrics-port``, for a service)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"%(prog)s (sandbox-mesh) {version()}")
    p.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", help="level of the product's logs"
    )
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines, or one JSON object a line")
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level DEBUG")
    if not metrics:
        return p
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port at /metrics (default: no metrics)")  # fmt: skip
    p.add_argument("--metrics-host", default="127.0.0.1", help="interface of the metrics HTTP server")
    return p


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option's help, except where the help already says its
    default, and for flags (off unless given), --help and --version."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text
        if action.default is None:
            return f"{text} (default: none)"
        return super()._get_help_string(action)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str | bool = "INFO", fmt: str = "text") -> None:
    """Log to stderr: the product at ``level`` (True: DEBUG, False: INFO, for -v), the rest at WARNING."""
    if isinstance(level, bool):
        level = "DEBUG" if level else "INFO"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(NAMESPACE).setLevel(level)


def configure_from(args: argparse.Namespace) -> None:
    configure_logging("DEBUG" if args.verbose else args.log_level, args.log_format)


def run_until_signalled(main: Callable[[], Awaitable[int | None]], prog: str = "") -> int:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives; cancellation does the clean-up.

    Returns the exit code: ``main``'s (0 if it returns None or is stopped by a signal), or 1 after
    one line on stderr if it failed with ``Fatal`` or could not bind an address already in use."""

    async def runner() -> int | None:
        task = asyncio.ensure_future(main())  # owner: this runner, which awaits it below
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return None

    try:
        return asyncio.run(runner()) or 0
    except (Exception, BaseExceptionGroup) as exc:
        fatal = _fatal(exc)
        if fatal is None:
            raise
        print(f"{prog or 'error'}: {fatal}", file=sys.stderr, flush=True)
        return 1


def _fatal(exc: BaseException) -> str | None:
    """The one-line message of a failure that needs no traceback, found inside exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return next((m for e in exc.exceptions if (m := _fatal(e)) is not None), None)
    if isinstance(exc, Fatal):
        return str(exc)
    if isinstance(exc, (zmq.ZMQError, OSError)) and exc.errno == errno.EADDRINUSE:
        return f"address already in use ({exc})"
    return None
