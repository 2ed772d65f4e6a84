"""A scope owns the tasks it starts and joins them: structured concurrency without fail-fast.

``asyncio.TaskGroup`` cancels every sibling when one child fails; a daemon's children are
independent (one stream's failure is not its runtime's, one runtime's is not the daemon's), so a
scope logs a failed child and carries on. What it shares with a TaskGroup is the point: no task
outlives its owner, because the owner's ``close`` cancels and then awaits every child.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("daemon.scope")

T = TypeVar("T")


class ScopeClosed(RuntimeError):
    """A task was started in a scope that is closing or closed (its owner is going away)."""


class Scope:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a child of this scope."""
        if self.closed:
            coro.close()
            raise ScopeClosed(f"{self.name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)  # owner: this scope (close joins it)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        """Children still running."""
        return len(self._tasks)

    async def join(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``) for the children to finish on their own."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        """Refuse new children, cancel the running ones and wait until every one has finished
        (a child calling this on its own scope is not waited for)."""
        self.closed = True
        current = asyncio.current_task()
        while tasks := [t for t in self._tasks if t is not current]:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
