"""A user's script of the public client API, type-checked with ``mypy --strict`` by
tests/test_client_api.py (it is not run): every public call a newcomer makes, with the types
mypy infers for it checked by ``assert_type``. The test also checks that mypy rejects a call of a
method a Runtime does not have, so the package's types are really used (py.typed), not Any."""

from __future__ import annotations

from typing import Any, assert_type

from aiohttp import web

import client


async def fetch(request: client.Request) -> client.Response:
    assert_type(request.method, str)
    body: bytes = await request.read()
    return client.Response(200, [("content-type", "text/plain")], body=body)


def console(entry: client.ConsoleEntry) -> None:
    print(entry.level, entry.text)


def lost(exc: client.ConnectionLost) -> None:
    print("lost:", exc.message)


async def main() -> None:
    typed_fetch: client.FetchCallback = fetch
    typed_console: client.ConsoleCallback = console
    async with client.connect("tcp://127.0.0.1:5555", on_lost=lost) as conn:
        assert_type(conn, client.Connection)
        async with await conn.create_runtime(fetch=typed_fetch, console=typed_console) as rt:
            assert_type(rt, client.Runtime)
            value: Any = await rt.eval("export default 1 + 1")
            print(value)
            resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
            assert_type(resp, client.Response)
            assert_type(await resp.text(), str)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", client.aiohttp_handler(rt))
        other = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
        try:
            await other.eval("throw new Error('x')")
        except client.GuestError as exc:
            assert_type(exc.stack, str)
        finally:
            await other.dispose()
    conn2 = await client.connect(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"], connect_timeout=2.0)
    await conn2.close()
