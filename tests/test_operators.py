"""What an operator sees: `python -m broker status`, the Prometheus endpoints of broker and daemon
(scraped with real HTTP requests), JSON logs with the runtime lifecycle, the CLIs' --version and
--help, one-line failures (a port in use, a daemon that never reached its broker), and clean stops
(no asyncio "Unknown child process" warning: docs/design.md, Operating)."""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import client
from tests.conftest import ROOT, Broker, Daemon, Proc, create_when_ready, free_port, make_keys, wait_until

SPIN_HANDLER = "serve(() => { while (true) {} });"
BIG = 300_000  # bytes: past the inline limit, so the body streams on a pipe


def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels), fetched with a real HTTP GET; and
    each family's TYPE, as (family name, (("TYPE", type),)) -> 1.0."""
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        out[(family.name, (("TYPE", family.type),))] = 1.0
        out.update({(sample.name, tuple(sorted(sample.labels.items()))): sample.value for sample in family.samples})
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def clean_stop(proc: Broker | Daemon, sig: int = signal.SIGTERM) -> str:
    """Stop ``proc``; it must exit 0 without a traceback or asyncio's "Unknown child process"
    warning (an asyncio child watcher racing another reaper: docs/design.md, Operating)."""
    code = proc.stop(sig)
    text = proc.log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Unknown child process" not in text
    assert "Traceback" not in text, text[-3000:]
    return text


@pytest.fixture
def held_port() -> Iterator[int]:
    """A TCP port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def test_status_metrics_and_json_logs(tmp_path: Path) -> None:
    b = Broker(tmp_path, "--no-local-daemon", "--metrics-port", "0", "--log-format", "json", "--heartbeat", "0.5")
    d_port = free_port()
    d = Daemon(tmp_path, b, "d1", "--metrics-port", str(d_port), "--pool-size", "1", "--max-runtimes", "7",
               "--heartbeat", "0.5", "--log-format", "json")  # fmt: skip
    broker_url = re.search(r"metrics=(\S+)", b.ready_line).group(1)  # type: ignore[union-attr]
    daemon_url = f"http://127.0.0.1:{d_port}/metrics"
    try:
        fetched: list[str] = []

        async def on_fetch(req: client.Request) -> client.Response:
            fetched.append(req.url)
            return client.Response(200, [], b"pong")

        conn = await client.connect(b.frontend, timeout=15)
        try:
            rt = await create_when_ready(conn, fetch=on_fetch)
            assert await rt.eval("const r = await fetch('https://x.test/p'); export default await r.text()") == "pong"
            await rt.eval(
                f"""serve(async (req) => {{
                  if (req.method === "POST") {{ let n = 0; for await (const c of req.body) n += c.length;
                                                return Response.json({{ n }}); }}
                  return new Response(new ReadableStream({{ start(c) {{ c.enqueue(new Uint8Array({BIG})); c.close(); }} }}));
                }})"""
            )
            resp = await rt.dispatch_request(client.Request("GET", "http://x/"))
            assert len(await resp.read()) == BIG

            async def upload():  # type: ignore[no-untyped-def]
                for _ in range(3):
                    yield b"u" * 100_000

            resp = await rt.dispatch_request(client.Request("POST", "http://x/", body=upload()))
            assert await resp.json() == {"n": 300_000}
            spinner = await conn.create_runtime(cpu_limit=0.5)
            await spinner.eval(SPIN_HANDLER)
            with pytest.raises(client.CpuLimitExceeded):
                await spinner.dispatch_request(client.Request("GET", "http://x/"), timeout=30)

            # status, as the CLI prints it and as JSON
            out = run("-m", "broker", "status", "--frontend", b.frontend)
            assert out.returncode == 0, out.stderr
            assert re.search(r"^\s+d1\s+tcp://127\.0\.0\.1:\d+\s+7\s+1\s", out.stdout, re.M), out.stdout
            # one application session; the status command's own connection is not listed
            assert (
                "sessions (1 connected;" in out.stdout and len(re.findall(r"^  [0-9a-f]{12} ", out.stdout, re.M)) == 1
            ), out.stdout
            report = json.loads(run("-m", "broker", "status", "--frontend", b.frontend, "--json").stdout)
            assert [(x["name"], x["capacity"], x["runtimes"]) for x in report["daemons"]] == [("d1", 7, 1)]
            assert isinstance(report["daemons"][0]["warm"], int) and isinstance(report["daemons"][0]["pipes"], int)
            assert [s["runtimes"] for s in report["sessions"] if s["runtimes"]] == [1]
            assert conn.session.hex() not in out.stdout + json.dumps(report)  # a session's secret never shows

            # the broker's metrics
            m = await scrape(broker_url)
            assert value(m, "sandbox_mesh_broker_runtimes_created_total") == 2
            assert value(m, "sandbox_mesh_broker_placements_total", daemon="d1") == 2
            assert value(m, "sandbox_mesh_broker_runtimes_lost_total", code="cpu_limit") == 1
            assert value(m, "sandbox_mesh_broker_runtimes_live") == 1
            assert value(m, "sandbox_mesh_broker_daemon_capacity", daemon="d1") == 7
            assert value(m, "sandbox_mesh_broker_sessions") >= 1
            # the daemon's
            m = await scrape(daemon_url)
            assert value(m, "sandbox_mesh_daemon_request_seconds_count", kind="dispatch") == 3
            assert value(m, "sandbox_mesh_daemon_request_seconds_count", kind="create_runtime") == 2
            assert value(m, "sandbox_mesh_daemon_callback_seconds_count", kind="fetch") == 1
            assert value(m, "sandbox_mesh_daemon_runtimes_lost_total", cause="cpu_limit") == 1
            assert value(m, "sandbox_mesh_daemon_stream_bytes_total", direction="out") >= BIG
            assert value(m, "sandbox_mesh_daemon_stream_bytes_total", direction="in") >= 300_000
            assert value(m, "sandbox_mesh_daemon_runtimes_live") == 1
            assert value(m, "sandbox_mesh_daemon_capacity") == 7
            assert value(m, "sandbox_mesh_daemon_registered") == 1
            for counted in ("stream_bytes", "cancels", "runtimes_lost"):  # rate() must see a restart as a reset
                assert value(m, f"sandbox_mesh_daemon_{counted}", TYPE="counter") == 1, counted
            await rt.dispose()
            m = await scrape(broker_url)
            assert value(m, "sandbox_mesh_broker_runtimes_disposed_total") == 1
            assert value(m, "sandbox_mesh_broker_runtimes_live") == 0
        finally:
            await conn.close()
        assert fetched == ["https://x.test/p"]
    finally:
        d_log = clean_stop(d, signal.SIGINT)
        b_log = clean_stop(b)
    # JSON logs: one object a line, every product logger under one namespace, peers named
    entries = [json.loads(line) for line in b_log.splitlines() if line.strip()]
    assert entries and all(e["logger"].startswith("sandbox_mesh.") for e in entries), entries[:3]
    text = "\n".join(e["msg"] for e in entries)
    assert re.search(r"runtime [0-9a-f]{32} created on daemon d1 for client c=[0-9a-f]{12}", text), text
    assert re.search(r"runtime [0-9a-f]{32} disposed on daemon d1 by its owner client c=", text), text
    assert re.search(r"runtime [0-9a-f]{32} of client c=[0-9a-f]{12} lost on daemon d1: cpu_limit: ", text), text
    assert all(json.loads(line)["logger"].startswith("sandbox_mesh.") for line in d_log.splitlines() if line.strip())


async def test_the_embedded_daemon_takes_the_limits_of_python_m_broker(tmp_path: Path) -> None:
    """--max-runtimes, --memory-mb, --eval-timeout, ... reach the broker's own daemon; and stopping
    a broker whose runtimes are in use never logs asyncio's "Unknown child process" (it did on
    about 5 stops in 6 while guests were asyncio subprocesses of the daemon)."""
    for attempt, sig in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGINT)):
        b = Broker(tmp_path, "--max-runtimes", "3", "--eval-timeout", "1", "--memory-mb", "64",
                   "--pool-size", "1", "--metrics-port", "0", name=f"broker-{attempt}")  # fmt: skip
        try:
            conn = await client.connect(b.frontend, timeout=15)
            try:
                rts = [await create_when_ready(conn) for _ in range(3)]
                assert [await rt.eval("export default 1") for rt in rts] == [1, 1, 1]
                if attempt == 0:
                    with pytest.raises(client.NoCapacity):  # --max-runtimes 3
                        await conn.create_runtime()
                    t0 = time.monotonic()
                    with pytest.raises(client.Timeout):  # --eval-timeout 1
                        await rts[0].eval("await new Promise(() => {});")
                    assert time.monotonic() - t0 < 10
                    with pytest.raises(client.Error, match="64"):  # --memory-mb 64 (and --max-memory-mb)
                        await rts[1].eval("const a = []; for (;;) a.push(new Array(1e6).fill(1));", timeout=30)
                    url = re.search(r"metrics=(\S+)", b.ready_line).group(1)  # type: ignore[union-attr]
                    m = await scrape(url)  # the embedded daemon's series join the broker's
                    assert value(m, "sandbox_mesh_daemon_capacity") == 3
                    assert value(m, "sandbox_mesh_daemon_errors_total", code="timeout") == 1
            finally:
                await conn.close()
        finally:
            clean_stop(b, sig)


def test_version_and_every_default_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    import broker.__main__ as bm
    import daemon.__main__ as dm

    for main in (bm.main, dm.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--version"])
        assert exit_.value.code == 0
        assert re.fullmatch(r"python -m (broker|daemon) \(sandbox-mesh\) \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    for p in (bm.make_parser(), bm.make_status_parser(), dm.make_parser()):
        helps = {a.option_strings[-1]: _help_line(p, a) for a in p._actions if a.nargs != 0}
        assert len(helps) > 5
        for option, text in helps.items():
            assert option == "--broker" or "(default" in text, f"{p.prog} {option}: no default in {text!r}"


def _help_line(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help as --help prints it (with its default filled in)."""
    formatter = p._get_formatter()
    shown = copy.copy(action)
    shown.help = formatter._get_help_string(action)
    return formatter._expand_help(shown) if shown.help else ""


def test_a_port_in_use_is_one_line_and_exit_code_1(tmp_path: Path, held_port: int) -> None:
    for argv, says in [
        (["-m", "broker", "--frontend", f"tcp://127.0.0.1:{held_port}", "--backend", "tcp://127.0.0.1:0"],
         f"cannot bind --frontend tcp://127.0.0.1:{held_port}: Address already in use"),
        (["-m", "broker", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0", "--no-local-daemon",
          "--metrics-port", str(held_port)], f"cannot serve metrics on 127.0.0.1:{held_port}"),
        (["-m", "daemon", "--broker", "tcp://127.0.0.1:9", "--pool-size", "0", "--control-port", str(held_port)],
         "already in use"),
        (["-m", "daemon", "--broker", "tcp://127.0.0.1:9", "--pool-size", "0", "--metrics-port", str(held_port)],
         f"cannot serve metrics on 127.0.0.1:{held_port}"),
    ]:  # fmt: skip
        out = run(*argv)
        assert out.returncode == 1, (argv, out.stderr)
        lines = [line for line in out.stderr.splitlines() if "INFO" not in line and "WARNING" not in line]
        assert len(lines) == 1 and says in lines[0], (argv, out.stderr)
        assert "Traceback" not in out.stderr


def test_a_daemon_that_never_reached_its_broker_says_so(tmp_path: Path) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"
    argv = ["-m", "daemon", "--broker", nobody, "--heartbeat", "0.2", "--liveness", "2", "--pool-size", "0",
            "--log-level", "warning"]  # fmt: skip
    d = Proc(argv, "lonely", tmp_path, None)
    assert wait_until(lambda: "has not reached a broker" in d.log.read_text(), timeout=20), d.log.read_text()
    code = d.stop(signal.SIGTERM)
    text = d.log.read_text()
    assert code == 1, text
    assert f"stopped without ever reaching a broker (tried {nobody})" in text
    assert "is `python -m broker` running there" in text
    assert " WARNING " in text and " INFO " not in text  # --log-level


def test_status_of_a_broker_that_is_not_there_fails_fast() -> None:
    t0 = time.monotonic()
    out = run("-m", "broker", "status", "--frontend", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1")
    assert out.returncode == 1
    assert out.stderr.startswith("python -m broker status: tcp://127.0.0.1:") and len(out.stderr.splitlines()) == 1
    assert time.monotonic() - t0 < 15


def test_with_curve_only_an_authorized_key_gets_the_status(tmp_path: Path) -> None:
    from wire.auth import load_public_key

    keys = make_keys(tmp_path, ("broker", "ops", "eve"), ("ops",))
    s = keys / "secrets"
    b = Broker(keys, "--curve-keypair", str(s / "broker.key_secret"), "--authorized-keys", str(keys / "authorized"),
               "--pool-size", "0")  # fmt: skip
    try:
        ask = ["-m", "broker", "status", "--frontend", b.frontend, "--timeout", "2", "--json"]
        curve = ["--broker-key", str(s / "broker.key")]
        out = run(*ask, *curve, "--curve-keypair", str(s / "ops.key_secret"))
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert [d["name"] for d in report["daemons"]] == ["local"]
        assert [c["key"] for c in report["sessions"]] == [load_public_key(s / "ops.key").decode()]
        for refused in ([*curve, "--curve-keypair", str(s / "eve.key_secret")], []):  # a stranger, no keys
            out = run(*ask, *refused)
            assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
            assert out.stdout == ""
    finally:
        clean_stop(b)


def test_a_status_report_fits_one_header_and_is_built_at_most_every_half_second() -> None:
    """However many daemons and sessions, the busiest STATUS_ROWS of each are listed (with the
    totals) so the reply fits MAX_HEADER; a flood of `status` costs one report per STATUS_EVERY."""
    from broker.core import STATUS_EVERY, STATUS_ROWS
    from tests.test_broker_core import World
    from wire.messages import BROKER_TO_CLIENT, Status, StatusOk
    from wire.protocol import MAX_HEADER, MAX_NAME

    w = World()
    for i in range(STATUS_ROWS + 20):
        w.join(f"{'d' * (MAX_NAME + 50)}{i}".encode(), capacity=2)
        w.hello(f"client-{i}".encode())
    busy = b"client-7"
    w.create(busy)

    def ask(req_id: int) -> dict:
        (out,) = w.client(busy, Status(id=req_id))
        assert len(bytes(out.frames[0])) <= MAX_HEADER
        reply = BROKER_TO_CLIENT.parse(out.frames).parse(StatusOk)
        assert reply.id == req_id
        return reply.report

    report = ask(9)
    assert (report["daemons_total"], report["sessions_total"]) == (STATUS_ROWS + 20, STATUS_ROWS + 20)
    assert len(report["daemons"]) == len(report["sessions"]) == STATUS_ROWS
    assert report["sessions"][0]["runtimes"] == 1 and report["daemons"][0]["runtimes"] == 1  # the busiest first
    assert all(len(d["name"]) <= MAX_NAME for d in report["daemons"])
    assert w.tokens[busy].hex() not in json.dumps(report)
    w.create(b"client-8", req_id=2)
    assert ask(10)["runtimes"] == 1  # within STATUS_EVERY: the same report
    w.now += STATUS_EVERY
    assert ask(11)["runtimes"] == 2
