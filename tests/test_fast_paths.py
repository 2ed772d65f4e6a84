"""Fast paths of the message hops (docs/design.md 2.16): the embedded daemon's inproc link, and
receiving a queued message without an asyncio future."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import zmq

import client
from tests.conftest import Broker
from wire import sockets


def tcp_peers(pid: int) -> set[int]:
    """The remote ports of the established TCP connections process ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and f[9] in inodes:  # ESTABLISHED, one of its sockets
                ports.add(int(f[2].rsplit(":", 1)[1], 16))
    return ports


async def test_embedded_daemon_uses_inproc(broker: Broker) -> None:
    """The local daemon registered and serves runtimes, yet the broker process holds no TCP
    connection to its own backend port: the link is inproc (a TCP link would show up twice)."""
    async with client.connect(broker.frontend) as conn:
        rt = await conn.create_runtime()
        assert await rt.eval("export default 1 + 1") == 2
        await rt.dispose()
    backend_port = int(broker.backend.rsplit(":", 1)[1])
    assert backend_port not in tcp_peers(broker.pid)


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
