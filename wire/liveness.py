"""Heartbeat timing that tells a silent peer from a busy self.

A peer is judged dead after some heartbeat intervals without a message. But when our own event
loop is saturated (a broker and its embedded daemon streaming hard on two cores), our heartbeat
task runs late and peers' messages wait unread: that silence is ours, not theirs. ``tick`` sleeps
one interval and returns by how much it overslept, and callers move every peer's last-seen time
forward by that much, so only silence during time we were actually listening counts.
"""

from __future__ import annotations

import asyncio
import time


async def tick(interval: float) -> float:
    """Sleep one heartbeat interval; return the oversleep (our own stall), in seconds."""
    start = time.monotonic()
    await asyncio.sleep(interval)
    return max(0.0, time.monotonic() - start - interval)
