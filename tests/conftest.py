"""Fixtures that start the real thing: `python -m broker` / `python -m daemon` processes with real
Deno runtimes, and real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import client

ROOT = Path(__file__).resolve().parent.parent


def _die_with_us() -> None:
    """Product processes die with the test run, even if pytest is killed (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    os.setsid()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A product process whose stderr is kept in a file for post-mortems."""

    def __init__(self, argv: list[str], name: str, tmp: Path, ready: str | None) -> None:
        self.log = tmp / f"{name}.log"
        self.logf = self.log.open("wb")
        self.p = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=self.logf, preexec_fn=_die_with_us
        )
        self.ready_line = ""
        if ready is not None:
            self.ready_line = self._wait_line(ready, 60)

    def _wait_line(self, prefix: str, timeout: float) -> str:
        out: list[str] = []

        def read() -> None:
            assert self.p.stdout is not None
            for raw in self.p.stdout:
                line = raw.decode()
                out.append(line)
                if line.startswith(prefix):
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        lines = [x for x in out if x.startswith(prefix)]
        if not lines:
            self.stop()
            raise RuntimeError(f"process did not print {prefix!r}: {self.log.read_text()[-3000:]}")
        return lines[0].strip()

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.logf.close()
        return self.p.returncode


class Broker(Proc):
    def __init__(self, tmp: Path, *extra: str, name: str = "broker") -> None:
        self.tmp, self.name, self.extra, self.starts = tmp, name, extra, 1
        for attempt in range(3):
            # free_port() closes the port it found before the broker binds it: another process may
            # take it in between (ephemeral pipe ports); then start again on new ports
            self.frontend = f"tcp://127.0.0.1:{free_port()}"
            self.backend = f"tcp://127.0.0.1:{free_port()}"
            try:
                super().__init__(self._argv(), name, tmp, "ready ")
                return
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise

    def _argv(self) -> list[str]:
        return ["-m", "broker", "--frontend", self.frontend, "--backend", self.backend, *self.extra]

    def restart(self) -> None:
        """Start it again on the same endpoints (after ``stop``): a restarted broker, as peers see it."""
        assert self.p.poll() is not None, "stop the broker first"
        self.starts += 1
        super().__init__(self._argv(), f"{self.name}-{self.starts}", self.tmp, "ready ")


class Daemon(Proc):
    def __init__(self, tmp: Path, broker: Broker | list[Broker], name: str, *extra: str) -> None:
        brokers = ",".join(b.backend for b in (broker if isinstance(broker, list) else [broker]))
        super().__init__(["-m", "daemon", "--broker", brokers, "--name", name, *extra], name, tmp, None)


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


async def await_until(
    pred: Callable[[], Any | Awaitable[Any]], what: str, timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll ``pred`` (a function or a coroutine function) until it returns something truthy, and
    return that; after ``timeout`` seconds fail with an AssertionError saying what never happened.

    The async counterpart of ``wait_until``, for tests that must wait for a condition instead of
    sleeping a fixed time. Deadlines are generous: the machine may be busy with other test runs."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what} (last: {value!r})")
        await asyncio.sleep(interval)


async def create_when_ready(conn: client.Connection, timeout: float = 60.0, **kw: Any) -> client.Runtime:
    """Create a runtime once a daemon has registered (daemons register shortly after they start):
    retries on NoCapacity until ``timeout``, then fails saying no daemon ever took a runtime."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await conn.create_runtime(**kw)
        except client.NoCapacity as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"no daemon took a runtime within {timeout:g}s: {exc}") from None
            await asyncio.sleep(0.05)


def joined(broker: Broker, *names: str) -> bool:
    """Whether the broker has logged every one of the daemons ``names`` as joined."""
    text = broker.log.read_text(errors="replace")
    return all(f"daemon {name} joined" in text for name in names)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker with its embedded local daemon, shared by the tests that need no special set-up."""
    b = Broker(tmp_path_factory.mktemp("broker"), "--heartbeat", "1.0", "--max-runtimes", "200")
    yield b
    b.stop()


@pytest.fixture
async def conn(broker: Broker) -> AsyncIterator[client.Connection]:
    c = await client.connect(broker.frontend, timeout=15)
    try:
        yield c
    finally:
        await c.close()


def make_keys(tmp: Path, names: tuple[str, ...], authorized: tuple[str, ...]) -> Path:
    """CURVE key pairs for ``names`` in ``tmp/secrets`` (``python -m wire.auth``'s own code), and
    the public keys of ``authorized`` in ``tmp/authorized``; returns ``tmp``."""
    from wire.auth import main as keygen

    secrets, public = tmp / "secrets", tmp / "authorized"
    for name in names:
        assert keygen([str(secrets), name]) == 0
    public.mkdir()
    for name in authorized:
        (public / f"{name}.key").write_bytes((secrets / f"{name}.key").read_bytes())
    return tmp
