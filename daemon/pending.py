"""The one table of work waiting for an answer: evals, dispatches and stats waiting for the guest,
guest fetches waiting for the client. Each entry may carry a deadline; taking it (the answer came)
cancels the deadline, and the table fails whatever is left when the runtime goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from daemon import values
from wire import guest as G
from wire import messages as M
from wire.channel import GuestProtocolError

K = TypeVar("K")
V = TypeVar("V")


class Pending(Generic[K, V]):
    __slots__ = ("_entries", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[K, tuple[V, asyncio.TimerHandle | None]] = {}

    def add(self, key: K, item: V, timeout: float | None = None, on_timeout: Callable[[V], None] | None = None) -> None:
        """Wait for ``key``; after ``timeout`` seconds the entry is taken and ``on_timeout(item)`` runs."""
        if key in self._entries:
            raise KeyError(f"{self.name} {key!r} is already pending")
        timer = None
        if timeout is not None and on_timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, self._expire, key, on_timeout)
        self._entries[key] = (item, timer)

    def _expire(self, key: K, on_timeout: Callable[[V], None]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            on_timeout(entry[0])

    def take(self, key: K) -> V | None:
        """The entry for ``key``, removed (its deadline cancelled); None if nothing waits for it."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if entry[1] is not None:
            entry[1].cancel()
        return entry[0]

    def fail_all(self, fail: Callable[[V], None]) -> None:
        """Take every entry and hand it to ``fail`` (the runtime is going away)."""
        entries, self._entries = self._entries, {}
        for item, timer in entries.values():
            if timer is not None:
                timer.cancel()
            fail(item)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[V]:
        return iter([item for item, _ in self._entries.values()])


class GuestCalls(Generic[V]):
    """The guest's calls of one kind to its host (``fetch()``, ``tools.x()``, ``import``) waiting for
    the client, by the id the guest chose. The bootstrap never reuses an id nor goes past ``limit``:
    a guest that does went around it, a channel violation that ends the runtime."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.pending: Pending[int, V] = Pending(kind)

    def __len__(self) -> int:
        return len(self.pending)

    def admit(self, gid: int) -> None:
        """Check a new call's id against those pending, and the count against the limit."""
        if gid in self.pending:
            raise GuestProtocolError(f"{self.kind} id {gid} reused")
        if len(self.pending) >= self.limit:
            raise GuestProtocolError(f"more than {self.limit} {self.kind} calls pending")


@dataclass(slots=True, eq=False)
class Call:
    """A client request waiting for the guest: where its answer goes."""

    route: bytes  # the broker's route to the client ("c")
    req_id: int

    def error(self, code: str, message: str, name: str | None = None, stack: str | None = None) -> M.ErrorReply:
        return M.error(code, message, self.req_id, c=self.route, name=name, stack=stack)

    def guest_error(self, code: str, err: G.GuestError) -> M.ErrorReply:
        """The guest's own error, cleaned and cut to fit an error reply."""
        return self.error(code, *values.error_parts(err))
