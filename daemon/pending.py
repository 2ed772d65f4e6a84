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
