"""Issue 11, "Client API": the client as a newcomer meets it. A wrong port or key fails fast and
says why, ``async with`` works on connections and runtimes, the package is typed (mypy --strict on
a user script), errors are where developers look (the guest stack, callback tracebacks, the 502s
and truncations of aiohttp_handler, a lost connection), wrong host-side types are refused at the
call, and nothing is printed at exit after a runtime was lost. Real broker, daemons, Deno, aiohttp."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import client
from tests.conftest import ROOT, Broker, Daemon, await_until, create_when_ready, free_port, make_keys
from wire.auth import load_keypair, load_public_key

HB = "0.2"  # heartbeats of the brokers and daemons started here: losses are noticed within a second


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---- connecting ------------------------------------------------------------------------------------


async def test_connect_to_no_broker_fails_fast_naming_the_endpoint_and_the_fix() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(client.Unreachable) as info:
        async with client.connect(endpoint):
            pass
    took = time.monotonic() - t0
    assert took < 10, f"connect took {took:.1f}s to fail (default: 5 s)"
    assert endpoint in str(info.value) and "python -m broker" in str(info.value)
    assert isinstance(info.value, client.Timeout)  # what code written for the old error catches

    # a server that is no ZeroMQ peer: the connection is accepted, the handshake never completes
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(client.Unreachable, match="no ZeroMQ handshake completed"):
            await client.connect(f"tcp://127.0.0.1:{port}", connect_timeout=1.0)
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


def test_a_malformed_endpoint_is_the_callers_error_said_at_the_call() -> None:
    for bad in ("127.0.0.1:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "tcp:/127.0.0.1:5555", "tcp://a b:1", ""):
        with pytest.raises(client.InvalidEndpoint, match="endpoint"):
            client.connect(bad)  # before any socket or await: nothing to clean up
    with pytest.raises(ValueError):  # InvalidEndpoint is a ValueError too
        client.connect(["tcp://127.0.0.1:1", "localhost"])


async def test_keys_missing_unauthorized_or_for_another_broker_are_said_so(tmp_path: Path, broker: Broker) -> None:
    keys = make_keys(tmp_path, ("broker", "alice", "eve"), ("alice",))
    s = keys / "secrets"
    b = Broker(keys, "--no-local-daemon", "--curve-keypair", str(s / "broker.key_secret"),
               "--authorized-keys", str(keys / "authorized"))  # fmt: skip
    broker_key = load_public_key(s / "broker.key")
    try:
        # refusals come at once: a long connect_timeout is not waited for
        t0 = time.monotonic()
        with pytest.raises(client.AuthenticationFailed, match="it requires CURVE keys") as info:
            await client.connect(b.frontend, connect_timeout=20)
        assert b.frontend in str(info.value)
        with pytest.raises(client.AuthenticationFailed, match="authorized-keys"):
            await client.connect(
                b.frontend, keypair=load_keypair(s / "eve.key_secret"), broker_key=broker_key, connect_timeout=20
            )
        # the broker cannot even read a hello sealed for another key: it hangs up, every time
        with pytest.raises(client.AuthenticationFailed, match="is broker_key the broker's public key"):
            await client.connect(
                b.frontend,
                keypair=load_keypair(s / "alice.key_secret"),
                broker_key=load_public_key(s / "eve.key"),
                connect_timeout=20,
            )
        # keys for a broker that uses none (the shared one): said as such, or (if the broker sees the
        # mismatch first and hangs up) as a failed handshake that names both causes
        with pytest.raises(client.AuthenticationFailed, match=r"does not use CURVE keys|does it use keys at all"):
            await client.connect(
                broker.frontend, keypair=load_keypair(s / "alice.key_secret"), broker_key=broker_key, connect_timeout=20
            )
        assert time.monotonic() - t0 < 10
        async with client.connect(b.frontend, keypair=load_keypair(s / "alice.key_secret"), broker_key=broker_key):
            pass
    finally:
        b.stop()


async def test_async_with_connect_and_with_create_runtime_close_and_dispose(broker: Broker) -> None:
    async with client.connect(broker.frontend, timeout=15) as conn:
        assert isinstance(conn, client.Connection)
        async with await conn.create_runtime() as rt:
            assert await rt.eval("export default 6 * 7") == 42
            pid = rt.pid
        assert rt.lost is not None and rt.id not in conn.runtimes
        with pytest.raises(client.RuntimeLost):
            await rt.eval("export default 1")
        await await_until(lambda: not alive(pid), "the disposed runtime's Deno process has ended")
        # the earlier forms work as they did
        async with await client.connect(broker.frontend, timeout=15) as other:
            assert await (await other.create_runtime()).eval("export default 1") == 1
        assert other.closed is not None
    assert conn.closed is not None


# ---- typing ----------------------------------------------------------------------------------------


def mypy(tmp: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` run from ``cwd``, the package found on the path (from a user's directory,
    as an installed package: only its py.typed makes it typed there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp / ".mypy_cache"), *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_is_typed_and_mypy_strict_accepts_a_users_script_and_catches_a_typo(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    user = project / "user_api.py"
    user.write_text((ROOT / "tests" / "typing" / "user_api.py").read_text())
    done = mypy(tmp_path, project, user.name)
    assert done.returncode == 0, done.stdout + done.stderr
    typo = project / "typo.py"
    typo.write_text(
        "import client\n\n\nasync def main(conn: client.Connection) -> None:\n"
        "    async with await conn.create_runtime() as rt:\n"
        "        await rt.no_such_method()\n"
    )
    done = mypy(tmp_path, project, typo.name)
    assert done.returncode == 1 and '"Runtime" has no attribute "no_such_method"' in done.stdout, done.stdout
    # and the package itself is strict-clean (its own errors only: wire/ is followed silently)
    done = mypy(tmp_path, ROOT, "--follow-imports=silent", "-p", "client")
    assert done.returncode == 0, done.stdout + done.stderr


# ---- errors where the developer looks --------------------------------------------------------------


async def test_a_guest_error_shows_the_guest_stack(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    with pytest.raises(client.GuestError) as info:
        await rt.eval("function explode() { throw new RangeError('too far'); }\nexplode();")
    exc = info.value
    assert exc.name == "RangeError" and exc.message == "too far" and exc.brief == "RangeError: too far"
    text = str(exc)
    assert text.startswith("RangeError: too far\n") and "at explode" in text, text


async def test_wrong_host_side_types_are_refused_at_the_call(conn: client.Connection) -> None:
    def sync_fetch(_req: client.Request) -> client.Response:
        return client.Response()

    for bad in (sync_fetch, lambda _req: None, "https://example.com/"):
        with pytest.raises(TypeError, match="fetch must be an async function"):
            await conn.create_runtime(fetch=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="console must be a function"):
        await conn.create_runtime(console="print")  # type: ignore[arg-type]
    assert not conn.runtimes  # refused before anything was created
    with pytest.raises(TypeError, match=r"body must be bytes.*not str \(encode it"):
        client.Request("POST", "http://x/", body="a str")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="body must be bytes"):
        client.Response(body={"a": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="status is an int"):
        client.Response(status="200")  # type: ignore[arg-type]

    # what is right still passes: an async def, and forward_fetch (an object with an async __call__)
    async def fetch(_req: client.Request) -> client.Response:
        return client.Response(body=b"ok")

    for good in (fetch, client.forward_fetch()):
        await (await conn.create_runtime(fetch=good)).dispose()


async def test_a_raising_host_callback_is_logged_with_its_traceback(
    conn: client.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandbox_mesh.client")

    async def fetch(_req: client.Request) -> client.Response:
        raise ValueError("upstream exploded")

    async def console(_entry: client.ConsoleEntry) -> None:
        raise KeyError("console broke")

    rt = await conn.create_runtime(fetch=fetch, console=console)
    seen = await rt.eval(
        "let m; try { await fetch('http://example.test/a'); } catch (e) { m = e.message; }\n"
        "console.log('hi'); export default m;"
    )
    assert seen == "fetch failed"  # the guest hears that it failed, not the host's text (issue 10)

    def logged(what: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("sandbox_mesh.client") and what in r.getMessage()
        ]

    (fetch_log,) = await await_until(lambda: logged("the fetch callback failed"), "the fetch failure is logged")
    assert rt.id in fetch_log and "GET http://example.test/a" in fetch_log
    assert "Traceback" in fetch_log and 'raise ValueError("upstream exploded")' in fetch_log
    (console_log,) = await await_until(lambda: logged("the console callback failed"), "the console failure is logged")
    assert 'raise KeyError("console broke")' in console_log

    # a guest can make a callback fail thousands of times a second: a few lines, and a count
    await rt.eval("for (let i = 0; i < 300; i++) console.log(i); await fetch('http://example.test/b').catch(() => {});")
    await rt.dispose()
    assert len(logged("the console callback failed")) <= 3
    await await_until(lambda: logged("console callback failures: "), "the failures not logged are counted")
    summaries = logged(f"runtime {rt.id}: console callback failures: ")
    assert sum(int(m.split(": ")[2].split()[0]) for m in summaries) >= 100, summaries


GUEST_APP = """serve(async (req) => {
  const path = new URL(req.url).pathname;
  if (path === '/throw') throw new Error('handler broke');
  if (path === '/ok') return new Response('fine');
  let n = 0;
  return new Response(new ReadableStream({ async pull(c) {
    if (n++ === 0) { c.enqueue(new TextEncoder().encode('first chunk')); return; }
    await new Promise((r) => setTimeout(r, 20));
    c.error(new Error('producer failed midway'));
  } }));
});"""


class Served:
    """A runtime served over HTTP by ``aiohttp_handler`` on a real aiohttp server, and a session to ask it."""

    def __init__(self, rt: client.Runtime) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", client.aiohttp_handler(rt))
        self.runner = web.AppRunner(app, handler_cancellation=True)
        self.port = free_port()
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Served:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.close()
        await self.runner.cleanup()

    async def get(self, path: str) -> tuple[int, str]:
        assert self.http is not None
        async with self.http.get(f"http://127.0.0.1:{self.port}{path}") as resp:
            return resp.status, await resp.text()


async def test_aiohttp_handler_logs_each_502_and_each_truncated_body_with_runtime_and_cause(
    conn: client.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sandbox_mesh.client")
    rt = await conn.create_runtime()
    await rt.eval(GUEST_APP)
    async with Served(rt) as served:
        status, text = await served.get("/throw")
        assert status == 502 and text == "GuestError: Error: handler broke\n"  # the stack stays in the log
        logged = [r.getMessage() for r in caplog.records if "502" in r.getMessage()]
        assert len(logged) == 1 and rt.id in logged[0] and "handler broke" in logged[0] and "/throw" in logged[0]
        with pytest.raises(aiohttp.ClientPayloadError):
            await served.get("/midway")
        truncated = await await_until(
            lambda: [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()],
            "the truncation is logged",
        )
        assert rt.id in truncated[0] and "producer failed midway" in truncated[0] and "/midway" in truncated[0]
        assert await served.get("/ok") == (200, "fine")
    assert len([r for r in caplog.records if "aiohttp_handler" in r.getMessage()]) == 2  # nothing else


# ---- connection loss -------------------------------------------------------------------------------


async def test_an_app_survives_a_broker_restart_and_hears_when_its_connection_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From the app's angle: an aiohttp app in front of a runtime answers 502 while its broker is
    away and 200 again once it is back (the session resumes by itself; the runtime lives on its
    daemon); when no broker comes back within ``reconnect``, ``on_lost`` is called and it is logged."""
    caplog.set_level(logging.WARNING, logger="sandbox_mesh.client")
    b = Broker(tmp_path, "--no-local-daemon", "--heartbeat", HB, "--liveness", "3", "--client-liveness", "5")
    d = Daemon(tmp_path, b, "d1", "--heartbeat", HB, "--liveness", "3", "--pool-size", "1")
    lost: list[client.ConnectionLost] = []
    try:
        async with client.connect(b.frontend, timeout=10, reconnect=4, on_lost=lost.append) as conn:
            rt = await create_when_ready(conn)
            await rt.eval(GUEST_APP)
            async with Served(rt) as served:
                assert await served.get("/ok") == (200, "fine")
                b.stop(signal.SIGKILL)

                async def status() -> int:
                    return (await served.get("/ok"))[0]

                async def failing() -> bool:
                    return await status() == 502

                async def served_again() -> bool:
                    return await status() == 200

                await await_until(failing, "requests fail while the broker is away", timeout=10)
                b.restart()

                await await_until(served_again, "the app serves again after the broker restarted", timeout=15)
                assert conn.reconnects == 1 and not lost and rt.lost is None
                assert "resuming the session" in caplog.text and "session resumed" in caplog.text

                b.stop(signal.SIGKILL)  # and now for good
                await await_until(lambda: lost, "on_lost is called", timeout=20)
                assert isinstance(lost[0], client.ConnectionLost) and b.frontend in lost[0].message
                assert any(r.levelno == logging.ERROR and "connection lost" in r.getMessage() for r in caplog.records)
                assert rt.lost is not None
                code, text = await served.get("/ok")
                assert code == 502 and "ConnectionLost" in text
        assert len(lost) == 1  # closing a lost connection is not another loss
    finally:
        d.stop()
        b.stop()


# ---- exit after a lost runtime ---------------------------------------------------------------------

LOST_AT_EXIT = """
import asyncio, os, signal, sys
import client

async def main(endpoint: str, close: bool) -> None:
    conn = await client.connect(endpoint, timeout=15)
    rt = await conn.create_runtime()
    await rt.eval('''serve(() => new Response(new ReadableStream({ async pull(c) {
        await new Promise((r) => setTimeout(r, 20)); c.enqueue(new Uint8Array(1000)); } })))''')
    resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
    abandoned = await rt.dispatch_request(client.Request("GET", "http://x/"))  # never read nor closed
    body = resp.body.__aiter__()
    await body.__anext__()
    os.kill(rt.pid, signal.SIGKILL)  # the runtime dies mid-body
    try:
        async for _ in body:
            pass
    except client.StreamError as exc:
        print("body failed:", exc)
    try:
        await rt.eval("export default 1")
    except client.RuntimeLost as exc:
        print("lost:", type(exc).__name__)
    del abandoned  # dropped after the loss: its stream's clean-up must not use the closed control link
    if close:
        await conn.close()

asyncio.run(main(sys.argv[1], sys.argv[2] == "close"))
"""


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_nothing_is_printed_at_exit_after_a_runtime_was_lost(broker: Broker, tmp_path: Path, ending: str) -> None:
    """Once reported as "Future exception was never retrieved ... Socket operation on non-socket"
    at exit after a RuntimeLost: the script's stderr must stay empty, whether it closes its
    connection or just ends."""
    script = tmp_path / "lost_at_exit.py"
    script.write_text(LOST_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), broker.frontend, ending]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "body failed:" in done.stdout and "lost: RuntimeLost" in done.stdout, done.stdout
    assert done.stderr == "", done.stderr
