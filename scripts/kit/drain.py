"""Waiting until a runtime has nothing in flight, as its ``stats()`` sees it on every hop."""

from __future__ import annotations

import asyncio
import time

import client


async def in_flight(rt: client.Runtime, timeout: float) -> dict[str, int]:
    """Poll ``rt.stats()`` until every hop's counts (client, daemon, guest) are zero, for at most
    ``timeout`` seconds (cleanup after a cancel or an error is asynchronous). Returns what is still
    in flight then, as ``{"hop.counter": n}``: empty when the runtime drained."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await rt.stats()
        left = {f"{hop}.{k}": v for hop, counts in stats.items() for k, v in counts.items() if v}
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)
