"""Bad input to the broker and the daemon gets an error reply or is dropped and logged; neither crashes.

Here the test itself plays a misbehaving peer over raw ZeroMQ sockets: a client that sends
garbage to the broker, and a broker that sends garbage to a real daemon process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

import client
from tests.conftest import Daemon, free_port
from wire import messages as M
from wire import protocol as P


async def _recv(sock: zmq.asyncio.Socket, timeout: float = 10.0) -> list[bytes]:
    async with asyncio.timeout(timeout):
        return await sock.recv_multipart()


def _hdr(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[0])


@pytest.fixture
async def raw_client(broker):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.frontend)
    yield sock
    sock.close(0)
    ctx.term()


async def test_broker_answers_garbage_with_errors_and_keeps_serving(broker, raw_client) -> None:
    s = raw_client
    cases = [
        ([b"\xc1\xc1 not msgpack"], P.E_BAD_MESSAGE),
        ([msgpack.packb([1, 2, 3])], P.E_BAD_MESSAGE),
        ([msgpack.packb({"v": 99, "t": "hello", "id": 1})], P.E_UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 1, "t": "launch_missiles", "id": 2})], P.E_UNKNOWN_TYPE),
        ([msgpack.packb({"v": 1, "t": "eval", "id": 3, "rt": "x"})], P.E_UNKNOWN_CLIENT),  # no hello first
        ([msgpack.packb({"v": True, "t": "hello", "id": 5})], P.E_UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 1, "t": "hello", "id": 4}), b"x" * (P.MAX_FRAME + 1)], P.E_TOO_LARGE),
        ([msgpack.packb({"v": 1, "t": "hello", "id": "nope"})], P.E_BAD_MESSAGE),
    ]
    for frames, code in cases:
        await s.send_multipart(frames)
        reply = _hdr(await _recv(s))
        assert reply["t"] == "error", (frames[0][:20], reply)
        assert reply["code"] == code, (frames[0][:20], reply)
    # after hello, requests with missing or mistyped fields are refused too
    await s.send_multipart([msgpack.packb({"v": 1, "t": "hello", "id": 10})])
    assert _hdr(await _recv(s))["t"] == "welcome"
    for header, code in [
        ({"t": "eval", "id": 11}, P.E_BAD_MESSAGE),  # no rt
        ({"t": "eval", "id": 12, "rt": 5}, P.E_BAD_MESSAGE),
        ({"t": "dispatch", "id": 13, "rt": "00" * 16}, P.E_UNKNOWN_RUNTIME),
        ({"t": "ok", "id": 14, "rt": "00" * 16}, P.E_UNKNOWN_RUNTIME),
        ({"t": "create_runtime"}, P.E_BAD_MESSAGE),  # no id
    ]:
        await s.send_multipart([msgpack.packb({"v": 1, **header})])
        reply = _hdr(await _recv(s))
        assert (reply["t"], reply["code"]) == ("error", code), (header, reply)
    # an empty message (only the routing frame) is dropped, not fatal
    await s.send_multipart([b""])
    # a frame above libzmq's hard cap makes the broker drop the connection, not crash
    monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        await s.send_multipart([msgpack.packb({"v": 1, "t": "hb"}), b"x" * (16 * P.MAX_FRAME + 1)])
        try:
            event = parse_monitor_message(await _recv(monitor, timeout=30))
        except TimeoutError:
            raise AssertionError("the broker never dropped the connection that sent an oversized frame") from None
        assert event["event"] == zmq.EVENT_DISCONNECTED, event
    finally:
        s.disable_monitor()
        monitor.close(0)
    async with await client.connect(broker.frontend) as conn:
        rt = await conn.create_runtime()
        assert await rt.eval("export default 'fine'") == "fine"


async def test_client_refuses_oversized_source(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    with pytest.raises(client.RequestRejected) as info:
        await rt.eval("//" + "x" * P.MAX_SOURCE)
    assert info.value.code == P.E_TOO_LARGE
    assert await rt.eval("export default 2") == 2
    await rt.dispose()


@pytest.fixture
async def fake_broker(tmp_path: Path):
    """A ROUTER playing the broker for one real daemon process."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = free_port()
    sock.bind(f"tcp://127.0.0.1:{port}")

    class FakeBroker:
        backend = f"tcp://127.0.0.1:{port}"

    d = Daemon(tmp_path, FakeBroker, "victim", "--pool-size", "1", "--heartbeat", "0.5")  # type: ignore[arg-type]
    try:
        frames = await _recv(sock, 60)
        ident = frames[0]
        ready = _hdr(frames[1:])
        assert ready["t"] == "ready"
        await sock.send_multipart([ident, M.Welcome(heartbeat_ms=500).frames()[0]])
        d.control = ready["control"]
        yield sock, ident, d
    finally:
        d.stop()
        sock.close(0)
        ctx.term()


async def _reply_to(sock: zmq.asyncio.Socket, req_id: int) -> dict:
    """The daemon's reply with this id, skipping heartbeats."""
    while True:
        frames = await _recv(sock)
        h = _hdr(frames[1:])
        if h.get("id") == req_id and h["t"] in ("ok", "error"):
            return h


async def test_daemon_survives_malformed_messages(fake_broker) -> None:
    sock, ident, d = fake_broker
    route = b"client-1"
    send = lambda *frames: sock.send_multipart([ident, *frames])  # noqa: E731
    await send(b"garbage")
    await send(msgpack.packb({"v": 1, "t": "format_disk", "id": 1, "c": route}))
    await send(
        msgpack.packb(
            {
                "v": 1,
                "t": "create_runtime",
                "id": 2,
                "c": route,
                "rt": "r1",
                "owner": b"o" * 16,
                "memory_limit_mb": 10**9,
            }
        )
    )
    assert (await _reply_to(sock, 2))["code"] == P.E_BAD_MESSAGE
    await send(msgpack.packb({"v": 1, "t": "eval", "id": 3, "c": route, "rt": "nope"}), b"1")
    assert (await _reply_to(sock, 3))["code"] == P.E_UNKNOWN_RUNTIME
    await send(msgpack.packb({"v": 1, "t": "create_runtime", "id": 4, "c": route, "rt": "r1", "owner": b"o" * 16}))
    assert (await _reply_to(sock, 4))["t"] == "ok"
    # eval without its source frame, dispatch with bad headers / bad body descriptor / short resp_sid
    await send(msgpack.packb({"v": 1, "t": "eval", "id": 5, "c": route, "rt": "r1"}))
    assert (await _reply_to(sock, 5))["code"] == P.E_BAD_MESSAGE
    base = {"v": 1, "t": "dispatch", "c": route, "rt": "r1", "method": "GET", "url": "http://x/"}
    for i, extra in enumerate(
        [
            {"headers": "nope", "resp_sid": b"s" * 16},
            {"headers": [["a", 1]], "resp_sid": b"s" * 16},
            {"headers": [], "resp_sid": b"short"},
            {"headers": [], "resp_sid": b"s" * 16, "body": {"sid": b"bad"}},
            {"headers": [], "resp_sid": b"s" * 16, "body": "inline"},  # inline without its frame
        ],
        start=6,
    ):
        await send(msgpack.packb({**base, "id": i, **extra}))
        assert (await _reply_to(sock, i))["code"] == P.E_BAD_MESSAGE, extra
    await send(msgpack.packb({"v": 1, "t": "eval", "id": 20, "c": route, "rt": "r1"}), b"\xff\xfe not utf8")
    assert (await _reply_to(sock, 20))["code"] == P.E_BAD_MESSAGE
    # a fetch reply nobody asked for is ignored
    await send(msgpack.packb({"v": 1, "t": "ok", "id": 999, "status": 200}))
    # still alive and serving
    await send(msgpack.packb({"v": 1, "t": "eval", "id": 21, "c": route, "rt": "r1"}), b"export default 6*7")
    reply = await _reply_to(sock, 21)
    assert reply == {"v": 1, "t": "ok", "id": 21, "c": route, "value": 42}
    assert d.p.poll() is None


async def test_daemon_control_socket_ignores_garbage_and_foreign_cancels(fake_broker) -> None:
    sock, ident, d = fake_broker
    route = b"client-1"
    await sock.send_multipart(
        [ident, msgpack.packb({"v": 1, "t": "create_runtime", "id": 1, "c": route, "rt": "r1", "owner": b"o" * 16})]
    )
    assert (await _reply_to(sock, 1))["t"] == "ok"
    ctx = zmq.asyncio.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.connect(d.control)
    for frames in (
        [b"junk"],
        [msgpack.packb({"v": 1, "t": "cancel"})],
        [msgpack.packb({"v": 1, "t": "cancel", "sid": b"x" * 16})],
    ):
        await ctl.send_multipart(frames)
    ctl.close(0)
    ctx.term()
    await sock.send_multipart(
        [ident, msgpack.packb({"v": 1, "t": "eval", "id": 2, "c": route, "rt": "r1"}), b"export default 'ok'"]
    )
    assert (await _reply_to(sock, 2))["value"] == "ok"


async def test_a_refused_callback_answer_fails_that_callback_only(conn: client.Connection) -> None:
    """The broker refuses an oversized fetch answer; the guest's fetch fails, nothing else does."""

    async def on_fetch(req: client.Request) -> client.Response:
        return client.Response(200, [("x-huge", "h" * (P.MAX_HEADER + 10))], b"never delivered")

    rt = await conn.create_runtime(fetch=on_fetch)
    slow = asyncio.ensure_future(rt.eval("await new Promise(r => setTimeout(r, 300)); export default 'other'"))
    result = await rt.eval(
        "let e; try { await fetch('http://x/'); } catch (err) { e = err; }\nexport default [e?.name, e?.message];"
    )
    assert result[0] == "TypeError" and "too_large" not in result[1] and "refused" in result[1]
    assert await slow == "other"  # an unrelated request with a colliding id space is untouched
    await rt.dispose()
