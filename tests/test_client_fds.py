"""Issue 9: a client out of file descriptors refuses the one body that needs another pipe, with a
clear error, and every other stream and the process go on (before: the EMFILE escaped the producer
so a stream hung, or pyzmq's zero-copy collector aborted the whole client)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

#: The client under test, in a process of its own so its descriptor limit can be lowered.
CLIENT = r"""
import asyncio, json, resource, sys, zlib
import client

CHUNKS = 8  # 512 KiB a body: unread, each keeps its pipe open

async def main(frontend):
    conn = await client.connect(frontend, timeout=30)
    rt = await conn.create_runtime()
    await rt.eval('''serve({ async fetch(req) {
      if (req.method === "POST") { let n = 0; for await (const c of req.body) n += c.length; return Response.json({ n }); }
      let i = 0;
      return new Response(new ReadableStream({ pull(c) {
        if (i >= %d) { c.close(); return; }
        c.enqueue(new Uint8Array(65536).fill(i %% 251)); i++;
      } }));
    } })''' % CHUNKS)
    # room for 10 pipes by the client's own count; without that count, ~100 before a real EMFILE
    limit = 256 + 10 * 3  # wire.sockets: FD_RESERVE + 10 * FDS_PER_PIPE
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held, refused = [], None
    for _ in range(300):
        try:
            resp = await asyncio.wait_for(rt.dispatch_request(client.Request("GET", "http://x/")), 30)
        except client.Error as exc:
            refused = exc
            break
        held.append(resp)
    upload = None
    try:
        resp = await asyncio.wait_for(rt.dispatch_request(client.Request("POST", "http://x/", body=bytes(200_000))), 30)
        upload = await resp.json()
    except client.Error as exc:
        upload = {"code": exc.code, "message": str(exc)}
    want = 0
    for i in range(CHUNKS):
        want = zlib.crc32(bytes([i % 251]) * 65536, want)
    intact = 0
    for resp in held:
        intact += zlib.crc32(await asyncio.wait_for(resp.body.read(), 30)) == want
    after = await asyncio.wait_for(rt.dispatch_request(client.Request("POST", "http://x/", body=bytes(200_000))), 30)
    print(json.dumps({
        "held": len(held), "intact": intact,
        "refused": None if refused is None else {"code": refused.code, "message": str(refused)},
        "upload": upload, "after": await after.json(),
    }), flush=True)
    await rt.dispose()
    await conn.close()

asyncio.run(main(sys.argv[1]))
"""


def test_a_client_out_of_descriptors_refuses_one_body_and_keeps_the_others(broker) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, broker.frontend], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    refused = got["refused"]
    assert refused is not None and refused["code"] == "busy", got
    assert "file descriptors" in refused["message"], refused
    assert got["held"] >= 5 and got["intact"] == got["held"], got  # the streams already open finish whole
    # a streamed request body past the limit: the dispatch fails with the same clear error, no hang
    assert got["upload"]["code"] == "busy" and "file descriptors" in got["upload"]["message"], got
    assert got["after"] == {"n": 200_000}, got  # once the others closed, bodies stream again
