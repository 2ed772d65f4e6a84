"""A task scope for a long-lived object: every task it starts is joined when the object closes.

This is asyncio.TaskGroup's contract (nothing started here outlives ``aclose``) for objects whose
lifetime is not one ``async with`` block: a connection, a client runtime, a daemon, a daemon
runtime's streams, the warm pool. Unlike a TaskGroup, one failing child does not cancel its
siblings (one stream's failure is not its runtime's, one broken fetch callback must not stop the
others); its exception is logged when it ends, so no "Task exception was never retrieved" can
appear later. Client and daemon share this one implementation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("sandbox_mesh.wire.scope")

T = TypeVar("T")


class ScopeClosed(RuntimeError):
    """A task was started in a scope that is closing or closed (its owner is going away)."""


class Scope:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a child of this scope; ScopeClosed once the scope is closing."""
        if self.closed:
            coro.close()
            raise ScopeClosed(f"{self.name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)  # owner: this scope (aclose joins it)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        """Children still running."""
        return sum(not t.done() for t in self._tasks)

    def cancel(self) -> None:
        """Cancel every child but the caller (they finish on their own; ``aclose`` joins them)."""
        me = asyncio.current_task()
        for task in self._tasks:
            if task is not me:
                task.cancel()

    async def join(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``) for the children to finish on their own."""
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def aclose(self) -> None:
        """Refuse new children, cancel the running ones and wait until every one has finished.

        The task calling this (when it belongs to the scope) is left to finish by itself."""
        self.closed = True
        me = asyncio.current_task()
        while others := [t for t in self._tasks if t is not me and not t.done()]:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
