"""Starting the product's processes (broker, daemons, the upstream) as children of a harness: the
benchmark and the soak start them the same way. Nothing here imports the product.

A ``Proc`` runs in its own session with stderr in a log file and stdout read only for its ready line;
``stop`` leaves nothing behind, not even the Deno processes it started."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from scripts.kit.procs import descendants, start_time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that forked it dies (PR_SET_PDEATHSIG), so a
    harness killed with SIGKILL leaves no broker or daemon behind. Only for children started from a
    thread that lives as long as the harness (its main thread)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def terminate(p: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the process is reaped either way."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)


class Proc:
    """A child process in its own session, with stderr in a log file; ``stop`` leaves nothing behind."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, cwd: Path, die_with_parent: bool = False) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._logf = self.log.open("ab")  # "a": a process restarted under the same name adds to the log
        # the child imports from cwd first (python -m puts it on sys.path[0]); PYTHONPATH says the same
        # so a venv's editable install of another checkout cannot win
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
        self.p = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        self.ready_line = ""

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_ready(self, prefix: str, timeout: float) -> str:
        """Wait for a stdout line starting with ``prefix``; raise (with the log tail) if none comes."""
        found: list[str] = []

        def read() -> None:
            assert self.p.stdout is not None
            for raw in self.p.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith(prefix):
                    found.append(line)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            raise RuntimeError(f"{self.name} did not print {prefix!r} within {timeout:g}s: {self.tail()}")
        self.ready_line = found[0]
        return self.ready_line

    def field(self, key: str) -> str:
        for part in self.ready_line.split():
            if part.startswith(key + "="):
                return part.split("=", 1)[1]
        raise RuntimeError(f"{self.name} ready line has no {key}=: {self.ready_line!r}")

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, SIGKILL; then SIGKILL whatever it started that outlived it.

        The daemon puts each Deno process in a process group of its own, so the descendants are
        collected before the signal rather than found through the group afterwards.
        """
        children = [(pid, start_time(pid)) for pid in descendants(self.p.pid)] if self.p.poll() is None else []
        terminate(self.p, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.p.pid, signal.SIGKILL)  # the group it led
        for pid, started in children:
            if started is not None and start_time(pid) == started:  # still that process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._logf.close()
