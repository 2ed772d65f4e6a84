"""The product under test: runtimes running the benchmark guest, behind ``client.aiohttp_handler``.

Only the client API every checkout has is used (``client.connect``, ``create_runtime(fetch=...)``,
``rt.eval``, ``rt.dispatch_request``, ``rt.dispose``, ``client.aiohttp_handler``,
``client.forward_fetch``), so ``--product-root`` can measure an older checkout with this harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

import client
from scripts.bench.env import Env
from scripts.bench.net import start_site

GUEST = r"""
const UP = __UPSTREAM__;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const BLOCK = new Uint8Array(65536);
for (let i = 0; i < BLOCK.length; i++) BLOCK[i] = Math.imul(i, 2654435761) >>> 24;
const blockStream = (size) => {
  let left = size;
  return new ReadableStream({ pull(c) {
    if (left <= 0) { c.close(); return; }
    const n = Math.min(BLOCK.length, left);
    left -= n;
    c.enqueue(BLOCK.slice(0, n));
  } });
};

serve({ async fetch(req) {
  const u = new URL(req.url);
  const path = u.pathname.replace(/^\/rt\/\d+/, "");
  if (path === "/sse" || path === "/bytes") {  // passthrough: the fetched body is the served body
    const up = await fetch(UP + path + u.search);
    return new Response(up.body, { status: up.status,
      headers: { "content-type": up.headers.get("content-type") ?? "application/octet-stream" } });
  }
  if (path === "/gen") return new Response(blockStream(Number(u.searchParams.get("size"))));
  if (path === "/count") {  // the upstream's POST /count does the same work: the bulk_dispatch_body baseline
    let n = 0;
    for await (const c of req.body) n += c.byteLength;
    return Response.json({ n });
  }
  return new Response("ok");
} });

const bench = globalThis.bench = {
  async upload(size, key) {
    const body = blockStream(size);
    const r = await fetch(UP + "/upload?key=" + key, { method: "POST", body, duplex: "half" });
    return (await r.json()).size;
  },
  async readWithPause(size, pauseMs) {  // a quarter, one long pause, the rest
    const r = await fetch(UP + `/bytes?size=${size}`);
    const reader = r.body.getReader();
    let n = 0, paused = false;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      n += value.byteLength;
      if (!paused && n >= size / 4) { paused = true; await sleep(pauseMs); }
    }
    return n;
  },
  slow: null,
  startSlow(size, key, step) {
    const s = bench.slow = { got: 0, paused: false, done: false, error: null, resume: null };
    (async () => {
      const r = await fetch(UP + `/bytes?size=${size}&key=${key}`);
      const reader = r.body.getReader();
      let next = step;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        s.got += value.byteLength;
        if (s.got >= next && s.got < size) {
          next += step;
          await new Promise((resolve) => { s.resume = resolve; s.paused = true; });
          s.paused = false;
        }
      }
      s.done = true;
    })().catch((e) => { s.error = String(e); s.done = true; });
  },
  resumeSlow() { const r = bench.slow.resume; bench.slow.resume = null; if (r) r(); },
  open: null,
  async openForCancel(size, key) {  // a body the guest has started reading and then left alone
    const r = await fetch(UP + `/bytes?size=${size}&key=${key}`);
    bench.open = r.body.getReader();
    await bench.open.read();
  },
  async cancelOpen() { const reader = bench.open; bench.open = null; await reader.cancel(); },
};
"""


@dataclass
class Product:
    conn: client.Connection
    runtimes: list[client.Runtime]
    url: str  # the HTTP front; runtime i serves under /rt/i

    def rt_url(self, i: int = 0) -> str:
        return f"{self.url}/rt/{i}"


def front_app(runtimes: list[client.Runtime]) -> web.Application:
    """The HTTP front the end client talks to: client.aiohttp_handler(rt) per runtime."""
    handlers = [client.aiohttp_handler(rt) for rt in runtimes]

    async def route(request: web.Request) -> web.StreamResponse:
        return await handlers[int(request.match_info["i"])](request)

    app = web.Application()
    app.router.add_route("*", "/rt/{i}/{tail:.*}", route)
    return app


async def create_runtimes(conn: client.Connection, n: int, upstream: str, parallel: int = 8) -> list[client.Runtime]:
    """``n`` runtimes with forward_fetch() and the bench guest, created ``parallel`` at a time."""
    gate = asyncio.Semaphore(parallel)
    source = GUEST.replace("__UPSTREAM__", json.dumps(upstream))

    async def one() -> client.Runtime:
        async with gate:
            rt = await conn.create_runtime(fetch=_forward_fetch())
            await rt.eval(source)
            return rt

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _forward_fetch() -> Any:
    """forward_fetch() allowed to reach the bench's upstream on 127.0.0.1 (an older checkout, from
    ``--product-root``, has no address policy and no allow_private)."""
    try:
        return client.forward_fetch(allow_private=True)
    except TypeError:
        return client.forward_fetch()


@contextlib.asynccontextmanager
async def connection(env: Env) -> AsyncIterator[client.Connection]:
    conn = await client.connect(env.frontend, timeout=30)
    try:
        yield conn
    finally:
        # "bye" makes the broker dispose every runtime of this connection
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 15)


@contextlib.asynccontextmanager
async def product(env: Env, runtimes: int = 1) -> AsyncIterator[Product]:
    """Runtimes running the bench guest behind an aiohttp front; all gone on exit."""
    async with connection(env) as conn:
        rts = await create_runtimes(conn, runtimes, env.upstream)
        runner, url = await start_site(front_app(rts))
        try:
            yield Product(conn, rts, url)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 15)


async def guest_eval(rt: client.Runtime, code: str, timeout: float = 30) -> Any:
    return await rt.eval(code, timeout=timeout)
