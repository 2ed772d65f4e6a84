"""Rate-limited logging: a flood of refused messages costs a few log lines, not one line each.

Each kind of event (a fixed string chosen by the caller, never peer data, so the table stays small)
is logged at most once per ``interval``: the first occurrence in full, the others only counted.
The count is reported in one summary line when the kind is next logged after the interval, or by
``flush`` (called periodically, e.g. from a heartbeat), whichever comes first. The clock is the
caller's (``now``), so a sans-I/O core can use it with its own notion of time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

#: Seconds between two full lines of one kind.
INTERVAL = 1.0


@dataclass(slots=True)
class _Kind:
    since: float  # when the last full line of this kind was written
    level: int
    suppressed: int = 0


class RateLog:
    """Log each kind of event at most once per ``interval``, with a count of the ones left out."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._kinds: dict[str, _Kind] = {}

    def log(self, level: int, kind: str, msg: str, *args: Any, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        entry = self._kinds.get(kind)
        if entry is not None and now - entry.since < self.interval:
            entry.suppressed += 1
            return
        if entry is not None:
            self._summary(kind, entry, now)
        self._kinds[kind] = _Kind(now, level)
        self.logger.log(level, msg, *args)

    def warning(self, kind: str, msg: str, *args: Any, now: float | None = None) -> None:
        self.log(logging.WARNING, kind, msg, *args, now=now)

    def flush(self, now: float | None = None) -> None:
        """Report the counts of every kind whose interval has passed, and forget those kinds."""
        now = time.monotonic() if now is None else now
        for kind, entry in list(self._kinds.items()):
            if now - entry.since >= self.interval:
                self._summary(kind, entry, now)
                del self._kinds[kind]

    def _summary(self, kind: str, entry: _Kind, now: float) -> None:
        if entry.suppressed:
            took = now - entry.since
            text = "%s: %d more in the last %.1fs (not logged one by one)"
            self.logger.log(entry.level, text, kind, entry.suppressed, took)
