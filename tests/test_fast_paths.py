"""Fast paths of the message hops (docs/design.md 2.16): the embedded daemon's inproc link, and
receiving a queued message without an asyncio future."""

from __future__ import annotations

import os
from pathlib import Path

import client
from tests.conftest import Broker


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
