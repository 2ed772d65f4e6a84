"""LLM tool code in a sandbox: the guest answers a question by calling two host tools and streams
the answer back, token by token, through an aiohttp server in front (client.aiohttp_handler).

    python scripts/tools_demo.py                       # starts its own broker
    python scripts/tools_demo.py --broker tcp://127.0.0.1:5555

The host offers ``search`` (an async function: documents for a query) and ``generate`` (an async
generator: an answer's tokens, as a model would stream them). The guest, untrusted code an LLM
might have written, only sees ``tools.search`` and ``tools.generate``; each token it reads from the
generator it writes to its HTTP response as a server-sent event, so the end client sees them as
they are produced, ~50 ms apart.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import client
from scripts.llm_stream_demo import demo_main, site

GUEST = """
serve({ async fetch(req) {
  const q = new URL(req.url).searchParams.get("q") ?? "";
  const docs = await tools.search({ q, limit: 2 });
  const enc = new TextEncoder();
  const body = new ReadableStream({
    async start(ctl) {
      ctl.enqueue(enc.encode(`event: sources\\ndata: ${JSON.stringify(docs.map((d) => d.title))}\\n\\n`));
      try {
        for await (const token of tools.generate(q, docs.map((d) => d.text))) {
          ctl.enqueue(enc.encode(`data: ${JSON.stringify(token)}\\n\\n`));
        }
        ctl.enqueue(enc.encode("event: done\\ndata: {}\\n\\n"));
      } catch (e) {
        ctl.enqueue(enc.encode(`event: error\\ndata: ${JSON.stringify(e.name + ": " + e.message)}\\n\\n`));
      }
      ctl.close();
    },
  });
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
} });
"""

DOCS = [
    {"title": "Sandboxes", "text": "Each runtime is a Deno process with no access to the host."},
    {"title": "Tools", "text": "Host tools are async Python functions the guest awaits."},
    {"title": "Streams", "text": "Bodies stream on their own pipes with backpressure."},
]


async def search(query: dict[str, Any]) -> list[dict[str, Any]]:
    """The host's search tool: documents whose words meet the query's (a database, in real life)."""
    words = set(str(query.get("q", "")).lower().split())
    hits = [d for d in DOCS if words & set(d["text"].lower().replace(".", "").split())] or DOCS
    return hits[: int(query.get("limit", 3))]


async def generate(question: str, context: list[str], gap: float = 0.05) -> AsyncIterator[str]:
    """The host's model: streams an answer's tokens (a real one would call an LLM API here)."""
    for token in f"Q: {question}. A: {' '.join(context)}".split(" "):
        await asyncio.sleep(gap)
        yield token + " "


async def ask(url: str) -> list[tuple[float, str]]:
    """GET ``url`` as an SSE client: each event with its arrival time (s)."""
    out = []
    async with ClientSession() as s, s.get(url) as r:
        t0 = time.monotonic()
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                out.append((time.monotonic() - t0, event.decode()))
    return out


async def demo(conn: client.Connection, question: str) -> list[tuple[float, str]]:
    """Create the runtime with the two tools, serve it behind aiohttp, ask it ``question``."""
    async with await conn.create_runtime(tools={"search": search, "generate": generate}) as rt:
        await rt.eval(GUEST)
        front = web.Application()
        front.router.add_get("/", client.aiohttp_handler(rt))
        async with site(front) as url:
            return await ask(f"{url}/?q={question}")


async def run(broker: str) -> None:
    async with client.connect(broker) as conn:
        for t, event in await demo(conn, "how do host tools work"):
            print(f"  +{t * 1000:6.0f} ms  {event}")


def main() -> None:
    demo_main(__doc__, run)


if __name__ == "__main__":
    main()
