"""A per-peer budget of refused messages: a peer that floods is throttled, and nobody else.

Each peer (any hashable key: a routing id, a token) may have ``limit`` messages refused per
``window`` seconds; past that, ``over`` says to drop its messages unread until the window ends.
Only the peers refused in the current window are remembered (``expire`` forgets the rest), so
the table stays as small as one window's offenders. The clock is the caller's (``now``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class Strikes:
    """A peer's refused messages in its current window, and how many were dropped past the limit."""

    since: float
    count: int = 0
    dropped: int = 0


class Budget:
    def __init__(self, limit: int, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self.peers: dict[Hashable, Strikes] = {}
        self.drops = 0  # messages dropped so far, all peers

    def over(self, peer: Hashable, now: float) -> bool:
        """Whether to drop this peer's message unread (counted as dropped)."""
        strikes = self.peers.get(peer)
        if strikes is None or strikes.count < self.limit:
            return False
        if now - strikes.since >= self.window:
            del self.peers[peer]
            return False
        strikes.dropped += 1
        self.drops += 1
        return True

    def strike(self, peer: Hashable, now: float) -> bool:
        """Count one refused message of ``peer``; True when this one used up its budget."""
        strikes = self.peers.get(peer)
        if strikes is None or now - strikes.since >= self.window:
            strikes = self.peers[peer] = Strikes(now)
        strikes.count += 1
        return strikes.count == self.limit

    def expire(self, now: float) -> list[tuple[Hashable, int]]:
        """Forget the windows that have ended; returns (peer, messages dropped) of the throttled ones."""
        ended = [(peer, s) for peer, s in self.peers.items() if now - s.since >= self.window]
        for peer, _ in ended:
            del self.peers[peer]
        return [(peer, s.dropped) for peer, s in ended if s.dropped]
