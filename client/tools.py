"""Host tools: Python functions the guest calls as ``await tools.<name>(...args)``.

``conn.create_runtime(tools={"search": search, "rows": rows})``: each value is an ``async def``
(the guest's call resolves with its result) or an async generator function (the guest's call
returns, at once, a ReadableStream of its items: ``for await (const row of tools.rows())``; bytes
items can be piped into a Response). The guest's positional arguments are the function's:
``tools.search({q: "x"}, 3)`` calls ``search({"q": "x"}, 3)``; a ReadableStream argument arrives
as a ``client.Body``. Values cross with the one marshalling of wire/values.py.

Each call has a timeout (``tool_timeout=`` of the runtime, default ``TOOL_TIMEOUT``; per tool
``client.tool(fn, timeout=5)``): for an async generator it bounds the wait for each item. What
the guest sees of a failure is chosen on purpose: a ``ToolError(message, name=...)`` becomes an
Error with that name and message; any other exception is logged here with its traceback and the
guest sees only ``Error: tools.<name> failed`` (host exception classes and texts never reach
untrusted code).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wire import tools as T

TOOL_TIMEOUT = T.TOOL_TIMEOUT


class ToolError(Exception):
    """Raised by a tool: the guest's call rejects with an Error of this ``name`` and ``message``
    (the only host exception whose text the guest sees)."""

    def __init__(self, message: str, *, name: str = "Error") -> None:
        super().__init__(message)
        self.message = str(message)
        self.name = str(name)


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool function with its own timeout (``client.tool(fn, timeout=...)``)."""

    fn: Callable[..., Any]
    timeout: float | None = None
    #: An async generator function: its items stream to the guest (found once, not per call).
    stream: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        call = getattr(self.fn, "__call__", None)  # noqa: B004
        object.__setattr__(self, "stream", inspect.isasyncgenfunction(self.fn) or inspect.isasyncgenfunction(call))


def tool(fn: Callable[..., Any], *, timeout: float | None = None) -> Tool:
    """``fn`` as a tool whose calls (or, for an async generator, each item) may take ``timeout``
    seconds instead of the runtime's ``tool_timeout``."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"a tool's timeout must be positive, not {timeout!r}")
    return Tool(fn, timeout)


def _is_async(fn: object) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (fn, call))


def check_tools(tools: Mapping[str, Any] | None) -> dict[str, Tool]:
    """The tools as ``Tool``s, refused at the call that passes them: TypeError for a value that is
    not an async function or async generator function, ValueError for a name the guest cannot
    have (not an identifier, or one that would shadow its globals: wire/tools.py)."""
    if tools is None:
        return {}
    if not isinstance(tools, Mapping):
        raise TypeError(f"tools must be a dict of name -> async function, not {type(tools).__name__}")
    out: dict[str, Tool] = {}
    for name, value in tools.items():
        t = value if isinstance(value, Tool) else Tool(value)
        if not _is_async(t.fn):
            raise TypeError(f"tool {name!r} must be an async def function or an async generator function, not {t.fn!r}")
        out[name] = t
    T.check_names(list(out))
    return out
