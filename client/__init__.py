"""The Python client: create sandboxed JavaScript runtimes through a broker and talk to them.

conn = await client.connect("tcp://127.0.0.1:5555")
rt = await conn.create_runtime(fetch=client.forward_fetch(), console=print)
await rt.eval("serve({ fetch: (req) => new Response('hi') })")
resp = await rt.dispatch_request(client.Request("GET", "http://localhost/"))
"""

from client.bodies import Body
from client.connection import Connection, connect
from client.errors import (
    Busy,
    ConnectionLost,
    CpuLimitExceeded,
    Error,
    GuestError,
    MemoryLimitExceeded,
    NoCapacity,
    NoHandler,
    RequestRejected,
    RuntimeLost,
    StreamError,
    Timeout,
    Unavailable,
    UnknownRuntime,
)
from client.glue import aiohttp_handler, forward_fetch
from client.http import Request, Response
from client.runtime import ConsoleEntry, Runtime
from wire.auth import KeyPair, load_keypair, load_public_key

__all__ = [
    "Body",
    "Busy",
    "Connection",
    "ConnectionLost",
    "ConsoleEntry",
    "CpuLimitExceeded",
    "Error",
    "GuestError",
    "KeyPair",
    "MemoryLimitExceeded",
    "NoCapacity",
    "NoHandler",
    "Request",
    "RequestRejected",
    "Response",
    "Runtime",
    "RuntimeLost",
    "StreamError",
    "Timeout",
    "Unavailable",
    "UnknownRuntime",
    "aiohttp_handler",
    "connect",
    "forward_fetch",
    "load_keypair",
    "load_public_key",
]
