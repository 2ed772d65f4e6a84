"""Fast paths of the message hops (docs/design.md 2.16): a queued message is received without an
asyncio future."""

from __future__ import annotations

import asyncio

import zmq

from wire import sockets


async def test_recv_now_takes_only_what_is_queued() -> None:
    """recv_now returns a queued message, None when nothing is queued (the caller then awaits the
    asyncio receive, which still gets the next message) and None once the socket is closed."""
    ctx = sockets.context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://test-recv-now")
        push.connect("inproc://test-recv-now")
        shadow = zmq.Socket.shadow(pull.underlying)
        assert sockets.recv_now(shadow, pull, copy=True) is None
        await push.send_multipart([b"a", b"1"])
        assert await pull.poll(5000) == zmq.POLLIN
        assert sockets.recv_now(shadow, pull, copy=True) == [b"a", b"1"]
        assert sockets.recv_now(shadow, pull, copy=True) is None
        await push.send_multipart([b"b"])
        assert await asyncio.wait_for(pull.recv_multipart(), 5) == [b"b"]
    finally:
        pull.close(0)
        push.close(0)
    assert sockets.recv_now(shadow, pull, copy=True) is None
