"""Fixtures that start the real thing: `python -m broker` / `python -m daemon` processes with real
Deno runtimes, and real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        super().__init__(
            ["-m", "broker", "--frontend", self.frontend, "--backend", self.backend, *extra], name, tmp, "ready "
        )


class Daemon(Proc):
    def __init__(self, tmp: Path, broker: Broker, name: str, *extra: str) -> None:
        super().__init__(["-m", "daemon", "--broker", broker.backend, "--name", name, *extra], name, tmp, None)


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


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
