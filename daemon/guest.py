"""One Deno process running bootstrap.js, and the framed channel over its stdin/stdout.

Everything the process writes is hostile input: frames are length-checked, headers must be
JSON objects with a known ``op``, and any violation ends the process (it can only hurt itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("daemon.guest")

BOOTSTRAP = Path(__file__).with_name("bootstrap.js")
#: Largest frame a guest may send (a chunk is at most 256 KiB; headers are small).
MAX_GUEST_FRAME = 1024 * 1024
#: ops a guest may send (protocol.md, "Guest channel").
GUEST_OPS = frozenset(
    {
        "ready", "init_ok", "fatal", "eval_ok", "eval_error", "response", "response_error", "fetch",
        "fetch_abort", "read", "cancel", "chunk", "end", "error", "console", "stats",
    }
)  # fmt: skip
STDERR_TAIL = 8192
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
F_SETPIPE_SZ = 1031  # linux/fcntl.h
PIPE_SIZE = 1024 * 1024
START_TIMEOUT = 20.0

_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")


class GuestProtocolError(Exception):
    """The guest process broke the channel framing or sent an impossible message."""


def encode_frame(header: dict[str, Any], body: Any = None) -> tuple[bytes, Any]:
    """The two buffers of one daemon->guest frame (prefix+header, body) so the body is never copied."""
    h = json.dumps(header, separators=(",", ":")).encode()
    blen = 0 if body is None else memoryview(body).nbytes
    return _U32x2.pack(4 + len(h) + blen, len(h)) + h, body


def decode_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GuestProtocolError(f"frame header is not JSON: {exc}") from None
    op = header.get("op") if isinstance(header, dict) else header
    if not isinstance(header, dict) or op not in GUEST_OPS:
        raise GuestProtocolError(f"unknown guest op {str(op)[:40]!r}")
    return header


def _widen_pipe(stream: Any) -> None:
    """Give the stdio pipe 1 MiB of kernel buffer (default 64 KiB): a 256 KiB chunk then crosses in
    one write instead of several wake-ups on each side."""
    transport = getattr(stream, "transport", None) or getattr(stream, "_transport", None)
    fileobj = transport.get_extra_info("pipe") if transport is not None else None
    if fileobj is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fileobj.fileno(), F_SETPIPE_SZ, PIPE_SIZE)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel kills the guest if the daemon dies, even by SIGKILL
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    os.setpgid(0, 0)


class GuestProcess:
    """A started Deno process; ``on_frame`` receives every validated frame from it."""

    def __init__(self, proc: asyncio.subprocess.Process, memory_limit_mb: int) -> None:
        self.proc = proc
        self.memory_limit_mb = memory_limit_mb
        self.on_frame: Callable[[dict[str, Any], bytes], None] | None = None
        self.on_exit: Callable[[str], None] | None = None
        self._stderr: deque[bytes] = deque()
        self._stderr_len = 0
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if unawaited
        self._reader = asyncio.create_task(self._read_frames(), name=f"guest-{proc.pid}-stdout")
        self._err_reader = asyncio.create_task(self._read_stderr(), name=f"guest-{proc.pid}-stderr")
        self.exit_reason: str | None = None

    @classmethod
    async def start(cls, deno: str, import_map: Path, deno_dir: Path, memory_limit_mb: int) -> GuestProcess:
        argv = [
            deno, "run", "--no-remote", "--no-npm", "--no-config", "--no-lock", "--no-prompt", "--quiet",
            f"--import-map={import_map}", f"--v8-flags=--max-old-space-size={memory_limit_mb}",
            str(BOOTSTRAP),
        ]  # fmt: skip
        env = {"DENO_DIR": str(deno_dir), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "PATH": "/usr/bin:/bin"}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(deno_dir),
            preexec_fn=_die_with_parent,
            limit=2 * MAX_GUEST_FRAME,
        )
        for pipe in (proc.stdin, proc.stdout):
            _widen_pipe(pipe)
        guest = cls(proc, memory_limit_mb)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.shield(guest._ready)
        except BaseException:
            await guest.kill("start failed")
            raise
        return guest

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and self.exit_reason is None

    def send(self, header: dict[str, Any], body: Any = None) -> None:
        """Queue one frame to the guest (never blocks; callers that stream use ``drain``)."""
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        head, body = encode_frame(header, body)
        if body is None:
            stdin.write(head)
        else:
            stdin.writelines((head, body))

    async def drain(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                await stdin.drain()

    async def _read_frames(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        reason = "the runtime process exited"
        count = 0
        try:
            while True:
                count += 1
                if count % 32 == 0:
                    await asyncio.sleep(0)  # buffered frames never suspend: let others run
                prefix = await stdout.readexactly(8)
                total, hlen = _U32x2.unpack(prefix)
                if total > MAX_GUEST_FRAME or hlen > total - 4:
                    raise GuestProtocolError(f"frame length {total} (header {hlen}) out of bounds")
                header = decode_header(await stdout.readexactly(hlen))
                body = await stdout.readexactly(total - 4 - hlen) if total - 4 - hlen else b""
                if header["op"] == "ready":
                    if not self._ready.done():
                        self._ready.set_result(None)
                    continue
                if header["op"] == "fatal":
                    raise GuestProtocolError(f"bootstrap failed: {str(header.get('message'))[:500]}")
                if self.on_frame is None:
                    raise GuestProtocolError(f"unexpected {header['op']!r} before the runtime was claimed")
                self.on_frame(header, body)
        except asyncio.IncompleteReadError:
            pass
        except GuestProtocolError as exc:
            reason = f"the runtime broke the guest channel: {exc}"
            log.warning("guest %s: %s", self.pid, reason)
        except Exception as exc:
            reason = f"the runtime was stopped after an internal error: {exc!r}"
            log.exception("guest %s: frame handler failed", self.pid)
        await self.kill(reason)

    async def _read_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        with contextlib.suppress(Exception):
            while chunk := await stderr.read(4096):
                self._stderr.append(chunk)
                self._stderr_len += len(chunk)
                while self._stderr_len > STDERR_TAIL and len(self._stderr) > 1:
                    self._stderr_len -= len(self._stderr.popleft())

    def rss_mb(self) -> float:
        """Resident memory of the process (V8 heap plus everything outside it, e.g. ArrayBuffers)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * PAGE_SIZE / (1 << 20)
        except (OSError, ValueError, IndexError):
            return 0.0

    @property
    def rss_limit_mb(self) -> int:
        """The V8 flag bounds only the JS heap; ArrayBuffers live outside it. The daemon stops a
        runtime whose whole process outgrows this (protocol.md, "Limits")."""
        return 2 * self.memory_limit_mb + 128

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    def ran_out_of_memory(self) -> bool:
        tail = self.stderr_tail()
        return "out of memory" in tail or "heap limit" in tail

    async def kill(self, reason: str) -> None:
        """Stop the process (idempotent) and report why, once, through ``on_exit``."""
        first = self.exit_reason is None
        if first:
            self.exit_reason = reason
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.proc.wait()
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(f"runtime process did not start: {reason}: {self.stderr_tail()}"))
        current = asyncio.current_task()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await asyncio.gather(*(t for t in (self._err_reader,) if t is not current), return_exceptions=True)
        if self._reader is not current:
            self._reader.cancel()
        if first and self.on_exit is not None:
            self.on_exit(reason)
