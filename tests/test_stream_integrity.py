"""Issue 9: a body arrives whole or its consumer gets an error, however long the consumer stalls.

A producer that has written END keeps its pipe until the consumer acknowledges it (protocol.md 5);
before, it closed with a 10 s linger and libzmq discarded the tail of a body whose consumer was
further behind, and the consumer waited forever.
"""

from __future__ import annotations

import asyncio
import zlib

import client
from scripts.kit.upstream import JS_HELPERS, stream_crc
from tests.test_streaming import assert_nothing_left, upstream  # noqa: F401 (a fixture)

MiB = 1 << 20
#: Longer than the old linger (10 s) with a margin: the producer is long done when the reader resumes.
STALL = 15.5
#: Fits into what the pipe, the kernel and the guest channel buffer: the producer finishes during the stall.
SIZE = 3 * MiB + 4321

STALLING_GUEST = f"""
const STALL = {STALL * 1000};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
globalThis.readStalling = async (body) => {{
  const reader = body.getReader();
  let crc = 0, n = 0, first = true;
  for (;;) {{
    const {{ done, value }} = await reader.read();
    if (done) break;
    crc = crc32(value, crc); n += value.length;
    if (first) {{ first = false; await sleep(STALL); }}
  }}
  return {{ n, crc }};
}};
serve({{ async fetch(req) {{
  if (req.method === "POST") return Response.json(await readStalling(req.body));
  let crc = 0;
  const body = patternStream({SIZE}, 5).pipeThrough(new TransformStream({{
    transform(c, ctl) {{ crc = crc32(c, crc); ctl.enqueue(c); }}, flush() {{ globalThis.sentCrc = crc; }} }}));
  return new Response(body);
}} }});
"""


async def read_stalling(body: client.Body) -> tuple[int, int]:
    """Read ``body`` with a STALL-second pause after its first chunk: (bytes, CRC32)."""
    first = await body.read_chunk()
    assert first is not None
    await asyncio.sleep(STALL)  # the stall is what is tested, not an ordering of events
    crc, n = zlib.crc32(first), len(first)
    async for chunk in body:
        crc, n = zlib.crc32(chunk, crc), n + len(chunk)
    return n, crc


async def test_a_consumer_stalled_past_the_old_linger_gets_every_byte(conn, upstream) -> None:  # noqa: F811
    """Every direction with a finite body, at once: fetch response to the guest, dispatch response
    to the client, fetch upload to the client's callback, dispatch request body to the guest."""
    uploads: list[tuple[int, int]] = []

    async def stalling_callback(request: client.Request) -> client.Response:
        assert isinstance(request.body, client.Body)
        uploads.append(await read_stalling(request.body))
        return client.Response(200, body=b"ok")

    forwarding = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    serving = await conn.create_runtime()
    uploading = await conn.create_runtime(fetch=stalling_callback)
    for rt in (forwarding, serving, uploading):
        await rt.eval(JS_HELPERS + STALLING_GUEST)

    async def fetch_response_to_guest() -> None:
        got = await forwarding.eval(
            f"""const r = await fetch({upstream.url!r} + "/bytes?size={SIZE}&key=stall");
            export default await readStalling(r.body);""",
            timeout=60,
        )
        assert got == {"n": SIZE, "crc": stream_crc(SIZE)}
        assert upstream.records["stall"].finished

    async def dispatch_response_to_client() -> None:
        resp = await serving.dispatch_request(client.Request("GET", "http://x/"))
        assert isinstance(resp.body, client.Body)
        n, crc = await read_stalling(resp.body)
        assert (n, crc) == (SIZE, await serving.eval("export default globalThis.sentCrc"))

    async def upload_to_callback() -> None:
        await uploading.eval(
            f"""const r = await fetch("http://callback/", {{ method: "POST", body: patternStream({SIZE}, 3) }});
            export default await r.text();""",
            timeout=60,
        )
        crc = await uploading.eval(
            f"""let crc = 0; for await (const c of patternStream({SIZE}, 3)) crc = crc32(c, crc);
            export default crc;"""
        )
        assert uploads == [(SIZE, crc)]

    async def dispatch_request_to_guest() -> None:
        data = bytes(range(256)) * (SIZE // 256)
        resp = await serving.dispatch_request(client.Request("POST", "http://x/", body=data), timeout=60)
        assert await resp.json() == {"n": len(data), "crc": zlib.crc32(data)}

    async with asyncio.timeout(90):  # before the fix, the consumers waited forever for the tail
        async with asyncio.TaskGroup() as tg:
            for direction in (
                fetch_response_to_guest, dispatch_response_to_client, upload_to_callback, dispatch_request_to_guest
            ):  # fmt: skip
                tg.create_task(direction())
    for rt in (forwarding, serving, uploading):
        await assert_nothing_left(rt)
        await rt.dispose()
