"""A task scope for a long-lived object: every task it starts is joined when the object closes.

This is asyncio.TaskGroup's contract (nothing started here outlives ``aclose``) for objects whose
lifetime is not one ``async with`` block: a connection, a runtime. Unlike a TaskGroup, one failing
task does not cancel its siblings (one broken fetch callback must not stop the others); its
exception is logged when it ends, so no "Task exception was never retrieved" can appear later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("client")

T = TypeVar("T")


class Scope:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this scope; refused once the scope is closed."""
        if self.closed:
            coro.close()
            raise RuntimeError(f"scope {self.name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s of %s failed", task.get_name(), self.name, exc_info=exc)

    @property
    def running(self) -> int:
        return sum(not t.done() for t in self._tasks)

    def cancel(self) -> None:
        """Cancel every task but the caller (they finish on their own; ``aclose`` joins them)."""
        me = asyncio.current_task()
        for task in self._tasks:
            if task is not me:
                task.cancel()

    async def aclose(self) -> None:
        """Refuse new tasks, cancel the running ones and wait until each has finished.

        The task calling this (when it belongs to the scope) is left to finish by itself."""
        self.closed = True
        me = asyncio.current_task()
        while others := [t for t in self._tasks if t is not me and not t.done()]:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
