"""Issue 8, finding 4: a body pipe admits its owner only, and a consumer notices a lost message.

A daemon binds one pipe per body on an ephemeral port. A PUSH sends round-robin to every peer that
completed a handshake, and a PULL fair-queues from every peer, so anyone who could connect to a
victim's pipe (a co-tenant on the host, or an authorized CURVE client that owns a runtime on the same
daemon) received every other chunk of the victim's body while the victim's body ended "normally"
with half its bytes, or killed an upload with one forged message. Now each pipe has a ZAP domain of
its own that admits only the runtime's owner (its CURVE key; without CURVE a PLAIN password that is
the stream id), and pipe messages carry sequence numbers, so a gap fails the stream with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

import client
from client.bodies import Inbound
from scripts.kit.upstream import JS_HELPERS
from tests.conftest import Broker, await_until, create_when_ready, make_keys
from wire import protocol as P
from wire import sockets, streams
from wire.auth import load_keypair, load_public_key
from wire.pipes import PipeReader, PipeWriter, StreamError

KiB = 1024
CHUNK = 64 * KiB
CHUNKS = 96  # 6 MiB: far more than a stalled pipe holds (PIPE_HWM x 2 + kernel buffers), so most of
TAIL = 4321  # the body moves while the intruders are connected

#: A response body of CHUNKS distinct 64 KiB chunks and a tail; the victim checks it by CRC.
SERVE_CHUNKS = f"""
serve((req) => {{
  if (req.method === "POST") return (async () => {{
    let crc = 0, n = 0;
    try {{ for await (const c of req.body) {{ crc = crc32(c, crc); n += c.length; }} }}
    catch (e) {{ return Response.json({{ error: String(e), n }}); }}
    return Response.json({{ n, crc }});
  }})();
  let i = 0;
  return new Response(new ReadableStream({{ pull(c) {{
    if (i < {CHUNKS}) c.enqueue(new Uint8Array({CHUNK}).fill(i++ & 255));
    else {{ c.enqueue(new Uint8Array({TAIL}).fill(7)); c.close(); }}
  }} }}));
}});
"""
SIZE = CHUNKS * CHUNK + TAIL
EXPECTED_CRC = zlib.crc32(b"".join(bytes([i & 255]) * CHUNK for i in range(CHUNKS)) + bytes([7]) * TAIL)

_OUTCOMES = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
)


def record_dials(conn: client.Connection) -> list[tuple[int, str]]:
    """The (socket type, endpoint) of every pipe ``conn`` dials from now on: how the test learns a
    victim's live pipe endpoint (an attacker would scan the daemon's ports)."""
    seen: list[tuple[int, str]] = []
    real = conn.dial

    def dial(kind: int, endpoint: str, *rest: Any) -> zmq.asyncio.Socket:
        seen.append((kind, endpoint))
        return real(kind, endpoint, *rest)

    conn.dial = dial  # type: ignore[method-assign]
    return seen


async def handshake(sock: zmq.asyncio.Socket, endpoint: str) -> int:
    """Connect ``sock`` to ``endpoint`` and return how its first ZMTP handshake ended (a monitor
    event): the intruder is either in (SUCCEEDED) or refused before any message moved."""
    mon = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        async with asyncio.timeout(20):
            while True:
                event = parse_monitor_message(await mon.recv_multipart())["event"]
                if event in _OUTCOMES:
                    return event
    finally:
        sock.disable_monitor()
        mon.close(0)


async def drain(sock: zmq.asyncio.Socket, got: list[int]) -> None:
    """Read whatever reaches an intruder, counting payload bytes (runs until cancelled)."""
    while True:
        frames = await sock.recv_multipart()
        got.append(sum(len(f) for f in frames[1:]))


async def read_all(body: client.Body) -> tuple[int, int]:
    """(bytes, crc) of a body, bounded: a body whose END went to someone else never ends."""
    crc = n = 0
    try:
        async with asyncio.timeout(20):  # it takes well under a second
            while (chunk := await body.read_chunk()) is not None:
                crc, n = zlib.crc32(chunk, crc), n + len(chunk)
    except TimeoutError:
        raise AssertionError(f"the victim's body stalled after {n} of {SIZE} bytes") from None
    return n, crc


async def own_stream_sid(rt: client.Runtime) -> tuple[client.Body, bytes]:
    """A live response body of the co-tenant's own runtime, and its stream id (a pipe secret the
    co-tenant legitimately holds: it must not open anyone else's pipe)."""
    resp = await rt.dispatch_request(client.Request("GET", "http://own/"))
    sid = resp.body._stream.sid  # type: ignore[attr-defined]
    assert isinstance(sid, bytes) and len(sid) == 16
    return resp.body, sid


@dataclass
class Tenants:
    rt: client.Runtime  # the victim's
    tenant: client.Connection
    own_body: client.Body  # a live body of the co-tenant's own runtime
    own_sid: bytes  # its stream id: a pipe secret the co-tenant legitimately holds
    dials: list[tuple[int, str]]  # the victim's pipes from now on


@contextlib.asynccontextmanager
async def two_tenants(broker: Broker) -> AsyncIterator[Tenants]:
    """A victim and a co-tenant, each with a runtime serving SERVE_CHUNKS on the same daemon."""
    async with (
        await client.connect(broker.frontend, timeout=15) as victim,
        await client.connect(broker.frontend, timeout=15) as tenant,
    ):
        rt, rt_t = await victim.create_runtime(), await tenant.create_runtime()
        assert rt.daemon == rt_t.daemon, "the test needs both runtimes on one daemon"
        await rt.eval(JS_HELPERS)
        await rt.eval(SERVE_CHUNKS)
        await rt_t.eval(SERVE_CHUNKS)
        own_body, own_sid = await own_stream_sid(rt_t)
        yield Tenants(rt, tenant, own_body, own_sid, record_dials(victim))
        await rt.dispose()
        await rt_t.dispose()


def intruder(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


async def test_a_co_tenant_cannot_read_a_victims_response_body(broker: Broker) -> None:
    """Without CURVE: a raw PULL with no credentials, and a second client presenting the secret of
    its own stream, connect to the victim's live response pipe. Before the fix the raw PULL got in
    and took every other chunk (the victim's body stalled or came out short); now both are refused
    during the handshake, receive nothing, and the victim's body arrives whole."""
    ctx = sockets.context()
    async with two_tenants(broker) as t:
        resp = await t.rt.dispatch_request(client.Request("GET", "http://victim/"))
        (kind, ep), *_ = t.dials
        assert kind == zmq.PULL
        raw = intruder(ctx, zmq.PULL)
        cotenant = t.tenant.dial(zmq.PULL, ep, t.own_sid, None)
        snooped: list[int] = []
        try:
            # the raw PULL has no credentials at all (NULL mechanism)
            outcome = await handshake(raw, ep)
            readers = [asyncio.create_task(drain(s, snooped)) for s in (raw, cotenant)]
            try:
                n, crc = await read_all(resp.body)
                # a last look: nothing was queued for the intruders either
                assert not await raw.poll(200) and not await cotenant.poll(200)
            finally:
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        finally:
            raw.close(0)
            cotenant.close(0)
        assert snooped == [], f"the intruders received {sum(snooped)} bytes of the victim's body"
        assert (n, crc) == (SIZE, EXPECTED_CRC), f"the victim's body came out short: {n} of {SIZE} bytes"
        assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a peer without credentials got into the pipe"
        # the co-tenant's own stream still works (its secret opens its own pipe)
        assert zlib.crc32(await t.own_body.read()) == EXPECTED_CRC


async def test_a_co_tenant_cannot_inject_into_a_victims_upload(broker: Broker) -> None:
    """Without CURVE, a client-produced stream (a dispatch request body: the daemon's PULL): an
    intruding PUSH that sends one forged message used to kill the victim's upload (and, knowing the
    sid, could have spliced data into it). Now the intruders never complete the handshake; the guest
    reads the upload whole."""
    ctx = sockets.context()
    async with two_tenants(broker) as t:
        intruders_in = asyncio.Event()
        chunks = [bytes([i % 251]) * CHUNK for i in range(CHUNKS)]

        async def upload() -> AsyncIterator[bytes]:
            await intruders_in.wait()  # the victim's pipe is connected; the intruders have tried
            for c in chunks:
                yield c

        call = asyncio.create_task(t.rt.dispatch_request(client.Request("POST", "http://victim/", body=upload())))
        intruders: list[zmq.asyncio.Socket] = []
        try:
            await await_until(lambda: t.dials, "the victim dialled its upload pipe")
            (kind, ep), *_ = t.dials
            assert kind == zmq.PUSH
            raw = intruder(ctx, zmq.PUSH)
            intruders += [raw, t.tenant.dial(zmq.PUSH, ep, t.own_sid, None)]
            outcome = await handshake(raw, ep)
            for sock in intruders:  # a forged message each (queued locally at most: neither is in)
                sock.send_multipart([P.PIPE_DATA + P.new_id() + bytes(8), b"forged"], flags=zmq.NOBLOCK)
            intruders_in.set()
            async with asyncio.timeout(60):
                resp = await call
            got = await resp.json()
        finally:
            intruders_in.set()
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            for sock in intruders:
                sock.close(0)
        assert got == {"n": CHUNKS * CHUNK, "crc": zlib.crc32(b"".join(chunks))}, got
        assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a peer without credentials got into the pipe"
        await t.own_body.aclose()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return make_keys(tmp_path, ("broker", "alice", "mallory"), ("alice", "mallory"))  # mallory: an authorized co-tenant


async def test_with_curve_an_authorized_co_tenant_cannot_read_a_victims_body(keys: Path) -> None:
    """With CURVE (a broker and its embedded daemon, sharing one ZAP handler), mallory is authorized
    and owns a runtime on alice's daemon, so her key opened every pipe of that daemon (the daemon
    admitted any runtime owner's key): her PULL took every other chunk of alice's body. Now each
    pipe admits only its owner's key: mallory is refused."""
    s = keys / "secrets"
    b = Broker(keys, "--curve-keypair", str(s / "broker.key_secret"), "--authorized-keys", str(keys / "authorized"))
    broker_key = load_public_key(s / "broker.key")
    try:
        alice = await client.connect(b.frontend, keypair=load_keypair(s / "alice.key_secret"), broker_key=broker_key)
        mallory = await client.connect(
            b.frontend, keypair=load_keypair(s / "mallory.key_secret"), broker_key=broker_key
        )
        async with alice, mallory:
            rt = await create_when_ready(alice)
            rt_m = await mallory.create_runtime()
            assert rt.daemon == rt_m.daemon and rt.daemon_key == rt_m.daemon_key is not None
            await rt.eval(SERVE_CHUNKS)
            await rt_m.eval(SERVE_CHUNKS)
            own_body, own_sid = await own_stream_sid(rt_m)
            dials = record_dials(alice)
            resp = await rt.dispatch_request(client.Request("GET", "http://alice/"))
            (_, ep), *_ = dials
            snoop = mallory.dial(zmq.PULL, ep, own_sid, rt.daemon_key)
            got: list[int] = []
            try:
                outcome = await handshake(snoop, ep)
                reader = asyncio.create_task(drain(snoop, got))
                try:
                    n, crc = await read_all(resp.body)
                    assert not await snoop.poll(200)
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
            finally:
                snoop.close(0)
            assert got == [], f"mallory received {sum(got)} bytes of alice's body"
            assert (n, crc) == (SIZE, EXPECTED_CRC), f"alice's body came out short: {n} of {SIZE} bytes"
            assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED, "another authorized key got into alice's pipe"
            await own_body.aclose()
            await rt.dispose()
            await rt_m.dispose()
    finally:
        b.stop()


def drop_the_third_data_message(sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    """Make ``sock`` lose its third DATA message in transit, as a dropped connection or a second peer
    taking it would: the producer believes it was sent."""
    real = sock.send_multipart
    count = 0

    def send_multipart(frames: list[Any], *args: Any, **kw: Any) -> Any:
        nonlocal count
        if bytes(frames[0][:1]) == P.PIPE_DATA:
            count += 1
            if count == 3:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
        return real(frames, *args, **kw)

    sock.send_multipart = send_multipart  # type: ignore[method-assign]
    return sock


async def test_a_lost_message_fails_the_guests_read_instead_of_ending_short(broker: Broker) -> None:
    """A message of the victim's upload is lost on its way: the daemon's reader sees the next
    message's sequence number and fails the stream, so the guest's read rejects (TypeError) instead
    of ending cleanly one chunk short (what it did before sequence numbers)."""
    async with await client.connect(broker.frontend, timeout=15) as conn:
        rt = await conn.create_runtime()
        await rt.eval(JS_HELPERS)
        await rt.eval(SERVE_CHUNKS)
        real = conn.dial
        conn.dial = lambda *a: drop_the_third_data_message(real(*a))  # type: ignore[method-assign]
        chunks = [bytes([i % 251]) * CHUNK for i in range(16)]

        async def upload() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        resp = await rt.dispatch_request(client.Request("POST", "http://x/", body=upload()))
        got = await resp.json()
        assert "error" in got, f"the guest read a body with a hole in it as complete: {got}"
        assert "TypeError" in got["error"] and "lost data" in got["error"], got
        assert got["n"] <= 2 * CHUNK, got  # never past the gap (an erroring ReadableStream may drop what it queued)
        await rt.dispose()


@pytest.mark.parametrize(
    ("seqs", "clean"),
    [
        ([0, 1, 2, ("E", 3)], True),  # whole
        ([0, 1, 3, ("E", 4)], False),  # DATA 2 missing
        ([0, 1, ("E", 3)], False),  # the last DATA missing: END is all that shows it
        ([0, 1, ("X", 3)], False),  # ERROR after a gap: still an error (the gap's)
        ([0, 0, ("E", 2)], False),  # a repeat (a second producer) is no better than a gap
    ],
)
async def test_the_client_fails_a_body_with_a_gap(seqs: list[Any], clean: bool) -> None:
    """The consuming side on the client (client.Body over a PipeReader): a producer built from the
    wire helpers skips a sequence number; the body raises client.StreamError instead of ending."""
    sid = P.new_id()
    push = sockets.pipe(sockets.context(), zmq.PUSH)  # bound, like a daemon's
    push.bind("tcp://127.0.0.1:*")
    pull = sockets.pipe(sockets.context(), zmq.PULL)
    pull.connect(push.getsockopt(zmq.LAST_ENDPOINT).decode())
    body = Inbound(streams.Consumer(PipeReader(pull, sid)), lambda _sid: None, lambda _s: None).body()
    try:
        for item in seqs:
            kind, seq = (P.PIPE_DATA, item) if isinstance(item, int) else (item[0].encode(), item[1])
            payload = b"x" * 10 if kind == P.PIPE_DATA else b""
            async with asyncio.timeout(10):
                await push.send_multipart(P.pipe_frames(kind, sid, seq, payload))
        if clean:
            assert await body.read() == b"x" * 30
        else:
            with pytest.raises(client.StreamError, match="lost data"):
                await body.read()
    finally:
        await body.aclose()
        push.close(0)


async def test_a_long_error_text_is_cut_and_still_reaches_the_consumer() -> None:
    """ERROR text longer than MAX_CHUNK used to exceed the pipe's MAXMSGSIZE and drop the connection,
    leaving the consumer waiting (protocol.md's former Appendix A.4); it is cut to MAX_CHUNK bytes."""
    sid = P.new_id()
    pull = sockets.pipe(sockets.context(), zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    push = sockets.pipe(sockets.context(), zmq.PUSH)
    push.connect(pull.getsockopt(zmq.LAST_ENDPOINT).decode())
    writer, reader = PipeWriter(push, sid, connect_timeout=10), PipeReader(pull, sid)
    failing: asyncio.Future[None] | None = None
    try:
        await writer.send(b"abc")
        # fail() holds the pipe until the consumer acknowledges the ERROR (protocol.md 5): run it aside
        failing = asyncio.ensure_future(writer.fail("\u00e9" * P.MAX_CHUNK))  # 2 bytes each in UTF-8
        async with asyncio.timeout(10):
            assert (await reader.read()) == b"abc"
            with pytest.raises(StreamError) as err:
                await reader.read()
            assert not failing.done()  # nothing was discarded while the ERROR was unread
            writer.release()  # the consumer's control cancel
            await failing
        assert str(err.value) == "\u00e9" * (P.MAX_CHUNK // 2)
    finally:
        if failing is not None:
            failing.cancel()
        writer.abort()
        reader.abort(StreamError("done"))
