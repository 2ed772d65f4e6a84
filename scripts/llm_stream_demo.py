"""The reported scenario, replayed: a mock LLM streams SSE events 100 ms apart, a sandboxed guest
fetches it and passes the body through serve() (plainly, via tee(), via a TransformStream that
upper-cases each event's data), an aiohttp server sits in front, and an end client prints when
each event reached it.

    python scripts/llm_stream_demo.py                       # starts its own broker
    python scripts/llm_stream_demo.py --broker tcp://127.0.0.1:5555

If streaming works, the arrival times are ~100 ms apart; a buffering sandbox would show every
event at once after the last one was produced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import ClientSession, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import itertools

import client

GUEST = """
// A transform of an SSE stream must leave the field names ("data:", "event:", "id:", "retry:") as
// they are: EventSource ignores a line whose field it does not know, so upper-casing the whole
// text ("DATA: ...") delivers no event at all. It must also work on whole lines: a chunk may end
// in the middle of one (and a TextDecoderStream keeps a UTF-8 sequence split across chunks whole).
function mapSseData(fn) {
  let rest = "";
  const mapLine = (line) => (line.startsWith("data:") ? "data:" + fn(line.slice(5)) : line);
  return new TransformStream({
    transform(text, ctl) {
      const lines = (rest + text).split("\\n");
      rest = lines.pop();
      if (lines.length) ctl.enqueue(lines.map(mapLine).join("\\n") + "\\n");
    },
    flush(ctl) {
      if (rest) ctl.enqueue(mapLine(rest));
    },
  });
}

serve({ async fetch(req) {
  const mode = new URL(req.url).searchParams.get("mode");
  const llm = await fetch(LLM_URL);
  let body = llm.body;
  if (mode === "tee") {
    const [forClient, forLog] = llm.body.tee();
    (async () => {
      let n = 0;
      for await (const c of forLog) n += c.length;
      console.log(`tee branch read ${n} bytes`);
    })();
    body = forClient;
  } else if (mode === "transform") {
    body = llm.body
      .pipeThrough(new TextDecoderStream())
      .pipeThrough(mapSseData((text) => text.toUpperCase()))
      .pipeThrough(new TextEncoderStream());
  }
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
} });
"""


def guest_source(llm_url: str) -> str:
    """The guest module: serve() answers each request with the SSE stream fetched from ``llm_url``
    (``?mode=plain``, ``tee`` or ``transform``: upper-cased data, field names kept)."""
    return f"const LLM_URL = {json.dumps(llm_url)};\n{GUEST}"


WORDS = ["Hello", " from", " a", " streaming", " LLM", " answer", "."]


async def mock_llm(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for word in WORDS:
        await resp.write(f"data: {json.dumps({'content': word})}\n\n".encode())
        await asyncio.sleep(0.1)
    await resp.write_eof()
    return resp


@contextlib.asynccontextmanager
async def site(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True)  # client.aiohttp_handler needs it
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def own_broker() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready "):
            raise SystemExit(f"broker did not start: {line!r}")
        yield line.split("frontend=")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def timeline(url: str) -> list[tuple[float, str]]:
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


async def run(broker: str) -> None:
    llm_app = web.Application()
    llm_app.router.add_get("/v1/chat", mock_llm)
    async with site(llm_app) as llm_url, await client.connect(broker) as conn:
        fetch = client.forward_fetch(allow_private=True)  # the mock LLM is on 127.0.0.1
        rt = await conn.create_runtime(fetch=fetch, console=lambda e: print("   guest:", e.text))
        await rt.eval(guest_source(llm_url + "/v1/chat"))
        front = web.Application()
        front.router.add_get("/", client.aiohttp_handler(rt))
        async with site(front) as front_url:
            print("direct from the mock LLM:")
            for t, event in await timeline(llm_url + "/v1/chat"):
                print(f"  +{t * 1000:6.0f} ms  {event}")
            for mode in ("plain", "tee", "transform"):
                print(f"through the sandbox ({mode}):")
                events = await timeline(f"{front_url}/?mode={mode}")
                for t, event in events:
                    print(f"  +{t * 1000:6.0f} ms  {event}")
                gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
                print(f"  gaps: {', '.join(f'{g * 1000:.0f}' for g in gaps)} ms")
        await rt.dispose()


def demo_main(doc: str | None, run: Callable[[str], Awaitable[None]]) -> None:
    """A demo's command line: ``run`` against ``--broker``, or against a broker of its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", help="frontend endpoint of a running broker (default: start one)")
    args = p.parse_args()
    if args.broker:
        asyncio.run(run(args.broker))
    else:
        with own_broker() as endpoint:
            asyncio.run(run(endpoint))


def main() -> None:
    demo_main(__doc__, run)


if __name__ == "__main__":
    main()
