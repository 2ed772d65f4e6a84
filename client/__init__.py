"""The Python client: create sandboxed JavaScript runtimes through a broker and talk to them.

async with client.connect("tcp://127.0.0.1:5555") as conn:
    async with await conn.create_runtime(fetch=client.forward_fetch(), console=print) as rt:
        await rt.eval("serve({ fetch: (req) => new Response('hi') })")
        resp = await rt.dispatch_request(client.Request("GET", "http://localhost/"))

The package is typed (py.typed): callbacks are ``FetchCallback`` and ``ConsoleCallback``.
"""

from client import modules
from client.bodies import Body
from client.connection import Connecting, Connection, connect
from client.errors import (
    AuthenticationFailed,
    Busy,
    ConnectionLost,
    CpuLimitExceeded,
    Error,
    GuestError,
    InvalidEndpoint,
    MemoryLimitExceeded,
    NoCapacity,
    NoHandler,
    RequestRejected,
    RuntimeLost,
    StreamError,
    Timeout,
    Unavailable,
    UnknownRuntime,
    Unreachable,
)
from client.glue import aiohttp_handler, forward_fetch
from client.http import Request, Response
from client.modules import Module, Resolver
from client.runtime import ConsoleCallback, ConsoleEntry, FetchCallback, Runtime
from client.tools import Tool, ToolError, tool
from wire.auth import KeyPair, load_keypair, load_public_key

__all__ = [
    "AuthenticationFailed",
    "Body",
    "Busy",
    "Connecting",
    "Connection",
    "ConnectionLost",
    "ConsoleCallback",
    "ConsoleEntry",
    "CpuLimitExceeded",
    "Error",
    "FetchCallback",
    "GuestError",
    "InvalidEndpoint",
    "KeyPair",
    "MemoryLimitExceeded",
    "Module",
    "NoCapacity",
    "NoHandler",
    "Request",
    "RequestRejected",
    "Resolver",
    "Response",
    "Runtime",
    "RuntimeLost",
    "StreamError",
    "Timeout",
    "Tool",
    "ToolError",
    "Unavailable",
    "UnknownRuntime",
    "Unreachable",
    "aiohttp_handler",
    "connect",
    "forward_fetch",
    "load_keypair",
    "load_public_key",
    "modules",
    "tool",
]
