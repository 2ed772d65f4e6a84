"""Heartbeat timing that tells a silent peer from a busy self.

A peer is judged dead after some heartbeat intervals without a message. But when our own event
loop is saturated (a broker and its embedded daemon streaming hard on two cores) or the whole
process was stopped (SIGSTOP, a VM pause), our heartbeat task runs late and peers' messages wait
unread: that silence is ours, not theirs. ``tick`` sleeps one interval and returns by how much it
overslept (our stall); ``forgive`` then excuses the part of a peer's silence that fell within the
stall, and only that part: a peer heard from during or after the stall (its messages were read
right after we woke) has nothing to forgive, and a last-seen time never moves past ``now``, so
after a stall a peer gets exactly the usual ``heartbeat x liveness`` of silence, not that plus
the stall (once a 15 s stop made a daemon wait 19 s before noticing it had been dropped).

Defaults (docs/design.md 5.1): heartbeat 1 s, liveness 5. A peer stalled for S seconds looks
silent for up to S plus one heartbeat (its last ``hb`` may have left just before the stall), and
the judge looks once per heartbeat, so a stall shorter than ``(liveness - 1) x heartbeat`` (4 s)
is always survived and a dead peer is noticed within ``(liveness + 1) x heartbeat`` (6 s).
"""

from __future__ import annotations

import asyncio
import time

#: Missed heartbeat intervals after which a peer is judged lost (broker <-> daemon, client -> broker).
LIVENESS = 5
#: A daemon silent for longer than this many heartbeats is not chosen for a new runtime while
#: another with room was heard from more recently (a stalled or dying daemon would fail it).
FRESH = 1.5


async def tick(interval: float) -> float:
    """Sleep one heartbeat interval; return the oversleep (our own stall), in seconds."""
    start = time.monotonic()
    await asyncio.sleep(interval)
    return max(0.0, time.monotonic() - start - interval)


def forgive(last_seen: float, now: float, stall: float) -> float:
    """A peer's last-seen time with the silence we caused forgiven.

    Our stall covered (at least) the ``stall`` seconds before ``now``; the peer's silence is
    ``last_seen .. now``. Only their overlap is forgiven, so the result never exceeds ``now`` and a
    peer heard from after the stall began (``last_seen >= now - stall``) gains nothing from it."""
    if stall <= 0.0 or last_seen >= now:
        return last_seen
    return last_seen + min(stall, now - last_seen)
