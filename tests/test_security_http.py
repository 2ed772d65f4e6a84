"""Issue 8, finding 8 and the safe defaults of forward_fetch: forged HTTP heads never reach a socket,
and a guest's fetch reaches only public addresses unless the application allows more.

The attacks run as a guest would run them (patching ``Headers.prototype`` after Deno validated a
Request or Response) against real aiohttp servers on 127.0.0.1 that record what they received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import client
from tests.conftest import Broker
from tests.test_daemon_units import FakeGuest, FakeHost
from wire import auth
from wire import http as H

# ---- real servers that record what reaches them -----------------------------------------------------


@contextlib.asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[int]:
    """An aiohttp server on 127.0.0.1 answering every path with ``handler``; yields its port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def raw_get(port: int) -> bytes:
    """What an end client reads for ``GET /``, as raw bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


class Recorder:
    """An aiohttp server on 127.0.0.1: every request it gets is recorded (method, path, headers, body).
    ``/redirect?to=URL`` answers 302 to URL; ``/hang`` never answers; anything else answers ``reply``."""

    def __init__(self, reply: str = "ok") -> None:
        self.reply = reply
        self.seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.url = ""
        self.port = 0
        self._hang = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path, list(request.headers.items()), body))
        if request.path == "/redirect":
            raise web.HTTPFound(request.query["to"])
        if request.path == "/hang":
            await asyncio.wait_for(self._hang.wait(), 60)
        return web.Response(text=self.reply)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Recorder]:
        async with serving(self.handle) as port:
            self.port, self.url = port, f"http://127.0.0.1:{port}"
            try:
                yield self
            finally:
                self._hang.set()

    def smuggled(self) -> list[str]:
        """What reached this server that a valid head could not have carried."""
        bad = []
        for method, path, headers, _body in self.seen:
            if "smuggled" in path:
                bad.append(f"{method} {path}")
            for k, v in headers:
                if not H.valid_header(k, v) or "smuggled" in k.lower() or "smuggled" in v.lower():
                    bad.append(f"header {k!r}: {v!r}")
        return bad


@pytest.fixture
async def upstream() -> AsyncIterator[Recorder]:
    async with Recorder().running() as r:
        yield r


@pytest.fixture
async def secret() -> AsyncIterator[Recorder]:
    """A service on 127.0.0.1 that must stay out of a guest's reach."""
    async with Recorder("the-secret").running() as r:
        yield r


# ---- forged request heads (guest fetch -> daemon -> client -> upstream) ------------------------------

#: Replaces what the bootstrap reads of every Headers object with FORGED (after Deno validated it).
PATCH_HEADERS = """
function* forgedHeaders() { yield ["accept", "*/*"]; for (const p of FORGED) yield p; }
Headers.prototype[Symbol.iterator] = forgedHeaders;
Headers.prototype.entries = forgedHeaders;
Headers.prototype.forEach = function (cb, self) { for (const [k, v] of forgedHeaders()) cb.call(self, v, k, this); };
"""

SMUGGLE = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
FORGERIES = {
    "te-with-space": [["Transfer-Encoding ", "chunked"], ["Content-Length", "5"]],
    "crlf-in-value": [["x-a", f"1\r\nTransfer-Encoding: chunked\r\n\r\n{SMUGGLE}"]],
    "crlf-in-name": [["x-b: 1\r\nx-smuggled", "2"]],
    "nul-in-value": [["x-c", "a\x00smuggled"]],
    "space-led-name": [[" x-smuggled", "1"]],
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_forged_fetch_heads_never_reach_the_upstream(
    conn: client.Connection, upstream: Recorder, forgery: str
) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=[f"127.0.0.1:{upstream.port}"]))
    try:
        out = await rt.eval(
            f"const FORGED = {json.dumps(FORGERIES[forgery])};\n{PATCH_HEADERS}\n"
            f"""let out;
            try {{
              const r = await fetch({json.dumps(upstream.url + "/x")}, {{ method: "POST", body: {json.dumps(SMUGGLE)} }});
              out = "status " + r.status + " " + await r.text();
            }} catch (e) {{ out = e.name + ": " + e.message; }}
            export default out;"""
        )
    finally:
        await rt.dispose()
    assert upstream.smuggled() == [], upstream.seen
    # refused with a clear error by the daemon; or, where the bootstrap reads heads through captured
    # intrinsics, the forgery had no effect and the real head went out
    if out.startswith("TypeError"):
        assert "fetch() refused: invalid header" in out, out
        assert upstream.seen == []
    else:
        assert out == "status 200 ok", out


async def test_forged_method_never_reaches_the_upstream(conn: client.Connection, upstream: Recorder) -> None:
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=[f"127.0.0.1:{upstream.port}"]))
    try:
        out = await rt.eval(
            """Object.defineProperty(Request.prototype, "method", { get() { return "GET /smuggled HTTP/1.1\\r\\nX:"; } });
            let out;
            try { const r = await fetch("""
            + json.dumps(upstream.url + "/x")
            + """); out = "status " + r.status; }
            catch (e) { out = e.name + ": " + e.message; }
            export default out;"""
        )
    finally:
        await rt.dispose()
    assert upstream.smuggled() == [], upstream.seen
    assert out == "status 200" or ("TypeError" in out and "invalid method" in out), out


# ---- forged response heads (serve() -> daemon -> client -> end client) -------------------------------


@pytest.mark.parametrize("forgery", ["content-length-with-space", "crlf-in-value"])
async def test_forged_response_heads_never_reach_the_end_client(conn: client.Connection, forgery: str) -> None:
    forged = {
        "content-length-with-space": [["Content-Length ", "0"], ["Transfer-Encoding", "chunked"]],
        "crlf-in-value": [["x-a", "1\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nx-smuggled: 1"]],
    }[forgery]
    rt = await conn.create_runtime()
    await rt.eval(
        f"const FORGED = {json.dumps(forged)};\n{PATCH_HEADERS}\n"
        'serve(() => new Response("the body", { headers: { "x-real": "1" } }));'
    )
    try:
        # straight through the client API: the dispatch fails with the guest's error
        try:
            resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
            direct = f"{resp.status} {dict(resp.headers)} {await resp.text()}"
        except client.GuestError as exc:
            direct = f"{exc.code} {exc.name}: {exc.message}"
        # and through aiohttp_handler, read as raw bytes by an end client
        async with serving(client.aiohttp_handler(rt)) as port:
            raw = await raw_get(port)
    finally:
        await rt.dispose()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert "Content-Length :" not in head and "smuggled" not in head, raw
    assert head.count("\r\n") == len(head.split("\r\n")) - 1  # one head, nothing spliced in
    if direct.startswith("guest_error"):
        assert "TypeError: invalid response from the serve() handler: invalid header" in direct, direct
        assert head.startswith("HTTP/1.1 502"), raw
    else:  # the bootstrap read the real head
        assert "'x-real': '1'" in direct and head.startswith("HTTP/1.1 200"), (direct, raw)


# ---- the daemon refuses forged heads whatever the bootstrap sends (a fake guest) --------------------


async def test_daemon_refuses_forged_heads_from_the_guest_channel() -> None:
    from daemon.runtime import Runtime
    from wire import messages as M

    guest, host = FakeGuest(), FakeHost()
    rt = Runtime(host, "r1", guest, 30.0, fetch=True, console=False)  # type: ignore[arg-type]
    life = asyncio.get_running_loop().create_task(rt.run())  # owner: this test (awaited below)
    # a fetch with a forged header: refused to the guest, nothing reaches the client; its upload stops
    guest.frame(op="fetch", id=1, method="POST", url="http://x/", headers=[["Transfer-Encoding ", "chunked"]],
                body={"sid": 5})  # fmt: skip
    assert guest.sent[-2] == {"op": "cancel", "sid": 5}
    assert guest.sent[-1]["op"] == "fetch_error" and guest.sent[-1]["id"] == 1
    assert "invalid header name 'Transfer-Encoding '" in guest.sent[-1]["message"]
    guest.frame(op="fetch", id=2, method="GET\r\nX: y", url="http://x/", headers=[])
    assert guest.sent[-1]["op"] == "fetch_error" and "invalid method" in guest.sent[-1]["message"]
    guest.frame(op="fetch", id=3, method="GET", url="http://x/ HTTP/1.1\r\nX:", headers=[])
    assert guest.sent[-1]["op"] == "fetch_error" and "invalid URL" in guest.sent[-1]["message"]
    assert host.out == []
    # a response head with CR/LF in a value: the dispatch fails with guest_error, the body is stopped
    rt.dispatch(M.Dispatch(id=8, rt="r1", method="GET", url="http://x/", resp_sid=b"s" * 16, c=b"c"), b"c")
    gid = guest.sent[-1]["id"]
    guest.frame(op="response", id=gid, status=200, headers=[["x", "1\r\nContent-Length: 0"]], body={"sid": 9})
    assert guest.sent[-1] == {"op": "cancel", "sid": 9}
    err = host.out[-1]
    assert isinstance(err, M.ErrorReply) and err.code == "guest_error" and err.name == "TypeError"
    assert "invalid header value for x" in err.message
    assert not host.streams
    rt.dispatch(M.Dispatch(id=9, rt="r1", method="GET", url="http://x/", resp_sid=b"t" * 16, c=b"c"), b"c")
    guest.frame(op="response", id=guest.sent[-1]["id"], status=200, statusText="OK\r\nX: 1", headers=[], body=None)
    assert host.out[-1].code == "guest_error" and "invalid status text" in host.out[-1].message  # type: ignore[attr-defined]
    rt.stop("done")
    await life


# ---- the client checks every head itself ----------------------------------------------------------


def test_heads_are_checked_by_the_rules_of_rfc_9110_and_fetch() -> None:
    assert H.is_token("Content-Type") and H.is_token("x!#$%&'*+-.^_`|~9")
    for name in ("", "Transfer-Encoding ", " x", "a b", "a:b", "a\r\nb", "é", "a\x00"):
        assert not H.is_token(name), name
    H.check_header("x", "a value with inner  spaces\tand tabs; ünïcode")
    for value in ("a\rb", "a\nb", "a\x00b", " lead", "trail ", "\ttab"):
        with pytest.raises(H.HeadError):
            H.check_header("x", value)
    with pytest.raises(H.HeadError, match="invalid method"):
        H.check_method("GET /x HTTP/1.1")
    for url in ("", "http://x/ y", "http://x/\r\n", "http://x/\x7f"):
        with pytest.raises(H.HeadError, match="invalid URL"):
            H.check_url(url)
    H.check_status_text("Not Found\tatall")
    with pytest.raises(H.HeadError):
        H.check_status_text("OK\r\nX: 1")
    # the client API: a Request or Response with a bad head cannot be made
    with pytest.raises(ValueError, match="invalid header name"):
        client.Request("GET", "http://x/", {"Transfer-Encoding ": "chunked"})
    with pytest.raises(ValueError, match="invalid header value"):
        client.Response(200, [("x", "1\r\nContent-Length: 0")])
    with pytest.raises(ValueError, match="invalid status text"):
        client.Response(200, status_text="OK\r\nX: 1")


async def test_forward_fetch_refuses_a_head_changed_after_the_request_was_made(upstream: Recorder) -> None:
    fetch = client.forward_fetch(allow_private=True)
    try:
        req = client.Request("POST", upstream.url + "/x", body=SMUGGLE.encode())
        req.headers.add("Transfer-Encoding ", "chunked")
        with pytest.raises(H.HeadError, match="invalid header name"):
            await fetch(req)
        req = client.Request("POST", upstream.url + "/x", {"Content-Length": "5"}, body=SMUGGLE.encode())
        resp = await fetch(req)  # a Content-Length of the caller's is not sent: aiohttp frames the body
        assert await resp.text() == "ok"
        with pytest.raises(H.FetchDenied, match="method TRACE is forbidden"):
            await fetch(client.Request("TRACE", upstream.url + "/x"))
    finally:
        await fetch.aclose()
    assert upstream.smuggled() == [] and len(upstream.seen) == 1
    assert upstream.seen[0][3] == SMUGGLE.encode()


async def test_aiohttp_handler_never_emits_a_head_changed_after_the_response_was_made() -> None:
    class Forged:
        async def dispatch_request(self, request: client.Request) -> client.Response:
            resp = client.Response(200, [("x-real", "1")], body=b"body")
            resp.headers.add("Content-Length ", "0")
            return resp

    async with serving(client.aiohttp_handler(Forged())) as port:  # type: ignore[arg-type]
        raw = await raw_get(port)
    assert raw.startswith(b"HTTP/1.1 502") and b"Content-Length :" not in raw, raw


# ---- forward_fetch's safe defaults (a real guest, real servers on 127.0.0.1) ------------------------


async def _guest_fetch(rt: client.Runtime, url: str) -> str:
    return await rt.eval(
        f"""let out;
        try {{ const r = await fetch({json.dumps(url)}); out = "status " + r.status + " " + await r.text(); }}
        catch (e) {{ out = e.name + ": " + e.message; }}
        export default out;"""
    )


async def test_forward_fetch_denies_private_addresses_by_default(
    conn: client.Connection, broker: Broker, upstream: Recorder, secret: Recorder
) -> None:
    broker_port = broker.frontend.rsplit(":", 1)[1]
    to_secret = f"{upstream.url}/redirect?to=http://127.0.0.1:{secret.port}/"
    to_secret_by_name = f"{upstream.url}/redirect?to=http://localhost:{secret.port}/"
    # the upstream is allowed explicitly; nothing else on loopback is
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=[f"127.0.0.1:{upstream.port}"]))
    try:
        assert await _guest_fetch(rt, upstream.url + "/x") == "status 200 ok"
        denied = {
            "secret": await _guest_fetch(rt, f"http://127.0.0.1:{secret.port}/"),
            "broker": await _guest_fetch(rt, f"http://127.0.0.1:{broker_port}/"),
            "by name": await _guest_fetch(rt, f"http://localhost:{secret.port}/"),
            "v6": await _guest_fetch(rt, f"http://[::ffff:127.0.0.1]:{secret.port}/"),
            "redirect": await _guest_fetch(rt, to_secret),
            "redirect by name": await _guest_fetch(rt, to_secret_by_name),
            "metadata": await _guest_fetch(rt, "http://169.254.169.254/latest/meta-data/"),
        }
    finally:
        await rt.dispose()
    for what, out in denied.items():
        assert out.startswith("TypeError: FetchDenied: fetch denied: "), (what, out)
        assert "allow_private" in out, (what, out)  # names the rule and how to lift it
    assert "is a loopback address" in denied["secret"] and "is a loopback address" in denied["broker"]
    assert "(localhost resolves to it)" in denied["by name"]
    assert "cloud metadata" in denied["metadata"]
    assert secret.seen == []
    assert [p for _, p, _, _ in upstream.seen] == ["/x", "/redirect", "/redirect"]

    # the explicit opt-in reaches them
    rt = await conn.create_runtime(fetch=client.forward_fetch(allow_private=True))
    try:
        assert await _guest_fetch(rt, f"http://127.0.0.1:{secret.port}/") == "status 200 the-secret"
        assert await _guest_fetch(rt, f"http://localhost:{secret.port}/") == "status 200 the-secret"
        assert await _guest_fetch(rt, to_secret) == "status 200 the-secret"
        assert "cloud metadata" in await _guest_fetch(rt, "http://169.254.169.254/")  # never by allow_private=True
    finally:
        await rt.dispose()
    assert len(secret.seen) == 3


async def test_forward_fetch_allow_lists_and_timeout(conn: client.Connection, upstream: Recorder) -> None:
    ff = client.forward_fetch(allow_private=True, allow_hosts=["127.0.0.1"], allow_ports=[upstream.port], timeout=0.5)
    rt = await conn.create_runtime(fetch=ff)
    try:
        assert await _guest_fetch(rt, upstream.url + "/x") == "status 200 ok"
        assert "host 'localhost' is not in the allow-list" in await _guest_fetch(
            rt, f"http://localhost:{upstream.port}/"
        )
        assert "port 1 is not in the allow-list" in await _guest_fetch(rt, "http://127.0.0.1:1/")
        hang = await _guest_fetch(rt, upstream.url + "/hang")
        assert hang == "TypeError: fetch failed", hang  # the why stays on the host (its log), issue 10
    finally:
        await rt.dispose()


def test_fetch_policy_classifies_addresses() -> None:
    deny = H.FetchPolicy.make()
    for ip, why in [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
        ("172.16.0.1", "private"), ("fd12::1", "private"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
        ("100.64.0.1", "reserved"), ("240.0.0.1", "private"), ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"), ("2002:7f00:1::", "loopback"), ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"), ("168.63.129.16", "cloud metadata"),
    ]:  # fmt: skip
        assert H.address_class(H.parse_ip(ip)) == why, ip  # type: ignore[arg-type]
        assert deny.address_denied(H.parse_ip(ip), 80), ip  # type: ignore[arg-type]
    for ip in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert deny.address_denied(H.parse_ip(ip), 443) is None, ip  # type: ignore[arg-type]
    some = H.FetchPolicy.make(allow_private=["127.0.0.1:8080", "10.0.0.0/8", "169.254.169.254"])
    assert some.address_denied(H.parse_ip("127.0.0.1"), 8080) is None  # type: ignore[arg-type]
    assert some.address_denied(H.parse_ip("127.0.0.1"), 8081)  # type: ignore[arg-type]
    assert some.address_denied(H.parse_ip("10.9.9.9"), 1) is None  # type: ignore[arg-type]
    assert some.address_denied(H.parse_ip("169.254.169.254"), 80) is None  # type: ignore[arg-type]
    assert H.FetchPolicy.make(allow_private=True).address_denied(H.parse_ip("169.254.169.254"), 80)  # type: ignore[arg-type]
    hosts = H.FetchPolicy.make(allow_hosts=["api.example.com", "*.example.org", "93.184.0.0/16"], allow_ports=[443])
    hosts.check_url("https", "API.example.com.", 443)
    hosts.check_url("https", "a.b.example.org", 443)
    hosts.check_url("https", "93.184.216.34", 443)
    for scheme, host, port, rule in [
        ("https", "example.org", 443, "host"), ("https", "evil.com", 443, "host"), ("https", "api.example.com", 80, "port"),
        ("ftp", "api.example.com", 443, "scheme"), ("file", "", None, "scheme"),
    ]:  # fmt: skip
        with pytest.raises(H.FetchDenied, match=rule):
            hosts.check_url(scheme, host, port)
    with pytest.raises(TypeError):
        H.FetchPolicy.make(allow_hosts="example.com")


async def test_forward_fetch_checks_the_address_it_connects_to() -> None:
    """No DNS-rebinding gap: the resolver keeps only allowed addresses, and the socket factory (fed
    the exact address of each connection attempt) refuses any other."""
    from client.glue import _CheckedResolver

    ff = client.forward_fetch()
    with pytest.raises(H.FetchDenied, match=r"127\.0\.0\.1 is a loopback"):
        ff._socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)))
    with pytest.raises(H.FetchDenied, match="::1 is a loopback"):
        ff._socket((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0)))
    sock = ff._socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)))
    sock.close()

    class Resolves:
        def __init__(self, *addresses: str) -> None:
            self.addresses = addresses

        async def resolve(self, host: str, port: int, family: Any) -> list[dict[str, Any]]:
            return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                    for a in self.addresses]  # fmt: skip

        async def close(self) -> None:
            pass

    resolver = _CheckedResolver(H.FetchPolicy.make())
    resolver._inner = Resolves("93.184.216.34", "127.0.0.1")  # type: ignore[assignment]
    assert [r["host"] for r in await resolver.resolve("evil.test", 80)] == ["93.184.216.34"]
    resolver._inner = Resolves("127.0.0.1")  # type: ignore[assignment]
    with pytest.raises(H.FetchDenied, match=r"127.0.0.1 is a loopback address.*\(evil.test resolves to it\)"):
        await resolver.resolve("evil.test", 80)
    with pytest.raises(ValueError, match="allow_private=True"):
        client.forward_fetch(session=object())  # type: ignore[arg-type]


# ---- keys and exposure ------------------------------------------------------------------------------


def test_secret_key_files_are_written_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        (tmp_path / "k").mkdir()
        (tmp_path / "k" / "app.key_secret").write_text("old")  # an existing, world-readable file
        os.chmod(tmp_path / "k" / "app.key_secret", 0o644)
        assert auth.main([str(tmp_path / "k"), "app"]) == 0
        assert auth.main([str(tmp_path / "k"), "other"]) == 0
    finally:
        os.umask(old)
    for name in ("app", "other"):
        assert stat.S_IMODE((tmp_path / "k" / f"{name}.key_secret").stat().st_mode) == 0o600
        assert auth.load_keypair(tmp_path / "k" / f"{name}.key_secret").public == auth.load_public_key(
            tmp_path / "k" / f"{name}.key"
        )


def test_binding_beyond_loopback_without_curve_warns() -> None:
    assert auth.exposed(["tcp://127.0.0.1:5555", "tcp://[::1]:1", "tcp://localhost:2", "ipc:///tmp/x"]) == []
    wide = ["tcp://0.0.0.0:5555", "tcp://*:5556", "tcp://10.0.0.5:1", "tcp://eth0:2", "tcp://[::]:3"]
    assert auth.exposed(wide) == wide
    warning = auth.exposure_warning(["tcp://127.0.0.1:1", "tcp://0.0.0.0:5556"], curve=False)
    assert warning is not None and "tcp://0.0.0.0:5556" in warning and "--curve-keypair" in warning
    assert auth.exposure_warning(["tcp://0.0.0.0:5556"], curve=True) is None
    assert auth.exposure_warning(["tcp://127.0.0.1:5556"], curve=False) is None
