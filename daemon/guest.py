"""One Deno process running bootstrap.js, and the framed channel over its stdin/stdout.

Everything the process writes is hostile input: frames are length-checked, headers must be
JSON objects with a known ``op``, and any violation ends the process (it can only hurt itself).
The process owns no task but its stderr reader, which ``kill`` joins; its owner (the pool, then
a runtime) awaits ``kill``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import sandbox, spawner
from daemon.limits import MemoryCgroups, cpu_seconds
from wire import guest as G
from wire.channel import FrameReader, GuestProtocolError, frame_head
from wire.protocol import ProtocolError
from wire.schema import Record, from_header

log = logging.getLogger("sandbox_mesh.daemon.guest")

BOOTSTRAP = Path(__file__).with_name("bootstrap.js")
STDERR_TAIL = 8192
#: Frames handled per event-loop turn for one guest, so a chatty guest cannot starve the rest.
FRAMES_PER_TURN = 64
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
F_SETPIPE_SZ = 1031  # linux/fcntl.h
PIPE_SIZE = 1024 * 1024
START_TIMEOUT = 20.0
#: The descriptor the main module (bootstrap.js) is read from in the guest process.
BOOTSTRAP_FD = 3


def _widen_pipe(fd: int) -> None:
    """Give a stdio pipe 1 MiB of kernel buffer (default 64 KiB): a 256 KiB chunk then crosses in
    one write instead of several wake-ups on each side."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


def process_cap_mb(memory_limit_mb: int) -> int:
    """The whole process's memory cap: the V8 flag bounds only the JS heap, and ArrayBuffers live
    outside it (docs/design.md, 4.3)."""
    return 2 * memory_limit_mb + 128


class GuestProcess:
    """A started Deno process; ``on_frame`` receives every frame from it (header decoded, op known),
    ``on_stop`` hears once why it stopped (it exited, broke the channel, or was killed)."""

    def __init__(
        self,
        proc: spawner.Child,
        stdout_fd: int,
        memory_limit_mb: int,
        home: Path,
        cgroup: tuple[MemoryCgroups, Path] | None = None,
    ) -> None:
        self.proc = proc
        self.home = home  # HOME, TMPDIR and XDG dirs of this process only; gone after kill()
        self.memory_limit_mb = memory_limit_mb
        self.cgroup = cgroup  # the kernel caps its memory (daemon/limits.py), or None
        self._oom_killed = False
        self.on_pong: Callable[[int], None] | None = None
        self.on_frame: Callable[[dict[str, Any], Any], None] | None = None
        self.on_stop: Callable[[str], None] | None = None
        self._stderr: deque[bytes] = deque()
        self._stderr_len = 0
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if unawaited
        self._stdout_fd = stdout_fd
        self._frames = FrameReader(stdout_fd)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(stdout_fd, self._on_readable)
        # owner: this process; kill() joins it
        self._err_reader = asyncio.create_task(self._read_stderr(), name=f"guest-{proc.pid}-stderr")
        self.exit_reason: str | None = None

    @classmethod
    async def start(
        cls, deno: str, import_map: Path, deno_dir: Path, memory_limit_mb: int, cgroups: MemoryCgroups | None = None
    ) -> GuestProcess:
        layers = sandbox.available()
        home = Path(tempfile.mkdtemp(prefix="guest-", dir=deno_dir))  # private, empty, removed by kill()
        try:
            return await cls._start(deno, import_map, deno_dir, memory_limit_mb, cgroups, layers, home)
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise

    @classmethod
    async def _start(
        cls,
        deno: str,
        import_map: Path,
        deno_dir: Path,
        memory_limit_mb: int,
        cgroups: MemoryCgroups | None,
        layers: sandbox.Layers,
        home: Path,
    ) -> GuestProcess:
        # The main module is read through an inherited descriptor, so stack traces the guest sees
        # name file:///dev/fd/3, not the daemon's install path. The last argument only labels the
        # process for ps (it is Deno.args, which the guest cannot reach). --ext=js: the name has no
        # extension, and without it Deno would transpile the module and try to cache the output.
        argv = [
            deno, "run", "--no-remote", "--no-npm", "--no-config", "--no-lock", "--no-prompt", "--quiet",
            f"--import-map={import_map}", f"--v8-flags=--max-old-space-size={memory_limit_mb}",
            "--ext=js", f"/dev/fd/{BOOTSTRAP_FD}", BOOTSTRAP.name,
        ]  # fmt: skip
        private = str(home)
        env = {
            "DENO_DIR": str(deno_dir), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "PATH": "/usr/bin:/bin",
            "HOME": private, "TMPDIR": private, "XDG_CACHE_HOME": private, "XDG_CONFIG_HOME": private,
            "XDG_DATA_HOME": private, "XDG_STATE_HOME": private, "XDG_RUNTIME_DIR": private,
            "MESA_SHADER_CACHE_DISABLE": "true",
        }  # fmt: skip
        # stdout is a pipe of our own, read with FrameReader (see wire.channel), not a StreamReader
        cgroup = None
        if cgroups is not None:
            cgroup = (cgroups, await asyncio.to_thread(cgroups.create, process_cap_mb(memory_limit_mb) << 20))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        source_fd = os.open(BOOTSTRAP, os.O_RDONLY | os.O_CLOEXEC)

        cgroup_procs = str(cgroup[1] / "cgroup.procs") if cgroup is not None else None
        try:
            _widen_pipe(read_fd)
            # the spawner process forks it, confines it (cgroup, sandbox layers, its own process
            # group) and puts the bootstrap's source at BOOTSTRAP_FD (daemon/spawner.py: why)
            proc = await spawner.start_child(
                argv, env, private, write_fd, cgroup_procs, layers, source_fd, BOOTSTRAP_FD
            )
        except BaseException:
            os.close(read_fd)
            if cgroup is not None:
                cgroups.remove(cgroup[1])  # type: ignore[union-attr]
            raise
        finally:
            os.close(write_fd)
            os.close(source_fd)
        os.set_blocking(read_fd, False)
        transport = proc.stdin.transport if proc.stdin is not None else None  # type: ignore[attr-defined]
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        if pipe is not None:
            _widen_pipe(pipe.fileno())
        guest = cls(proc, read_fd, memory_limit_mb, home, cgroup)
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

    def send(self, msg: Record) -> None:
        """Queue one frame to the guest (never blocks; callers that stream use ``drain``)."""
        self.send_encoded(*G.encode(msg))

    def send_encoded(self, header: bytes, body: Any = None) -> None:
        """Queue one frame whose JSON header is already encoded (a stream's chunks and acks)."""
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(frame_head(header, body))
        if body is not None:
            stdin.write(memoryview(body))  # not writelines(): that joins, i.e. copies, the body

    def queued(self) -> int:
        """Bytes written to the guest's stdin that it has not read yet (beyond the kernel pipe)."""
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return 0
        return stdin.transport.get_write_buffer_size()

    async def drain(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                await stdin.drain()

    def _on_readable(self) -> None:
        """The stdout pipe has data: hand every whole frame on; any violation ends the process."""
        if self._stdout_fd < 0:
            return
        try:
            frames, eof = self._frames.feed(FRAMES_PER_TURN)
            if len(frames) == FRAMES_PER_TURN and self._stdout_fd >= 0:
                # more may be staged already, with nothing left in the pipe to wake the reader
                self._loop.call_soon(self._on_readable)
            for header, body in frames:
                op = G.op_of(header)
                if op == "ready":
                    if not self._ready.done():
                        self._ready.set_result(None)
                elif op == "pong":
                    if self.on_pong is not None:
                        self.on_pong(from_header(G.Pong, header, []).id)
                elif op == "fatal":
                    fatal = from_header(G.Fatal, header, [])
                    raise GuestProtocolError(f"bootstrap failed: {str(fatal.message)[:500]}")
                elif self.on_frame is None:
                    raise GuestProtocolError(f"unexpected {op!r} before the runtime was claimed")
                else:
                    self.on_frame(header, body)
            if eof:
                self._stop("the runtime process exited")
        except (GuestProtocolError, ProtocolError) as exc:
            log.warning("guest %s: the runtime broke the guest channel: %s", self.pid, exc)
            self._stop(f"the runtime broke the guest channel: {exc}")
        except Exception as exc:
            log.exception("guest %s: frame handler failed", self.pid)
            self._stop(f"the runtime was stopped after an internal error: {exc!r}")

    def _stop(self, reason: str) -> None:
        """The process exited or broke the channel: no more frames from it, and it dies now."""
        self._close_stdout()
        self._noted(reason)
        self._signal()

    def _noted(self, reason: str) -> bool:
        """Record why the process stopped; the first reason wins and is told to ``on_stop``."""
        if self.exit_reason is not None:
            return False
        self.exit_reason = reason
        if self.on_stop is not None:
            self.on_stop(reason)
        return True

    def _signal(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _close_stdout(self) -> None:
        if self._stdout_fd >= 0:
            self._loop.remove_reader(self._stdout_fd)
            os.close(self._stdout_fd)
            self._stdout_fd = -1

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
        """The cap of the whole process (its cgroup's limit; the daemon's watchdog stops a runtime
        whose process outgrows it where there is no cgroup; docs/design.md 4.3)."""
        return process_cap_mb(self.memory_limit_mb)

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.proc.pid)

    def ping(self, n: int) -> None:
        """Ask for ``pong n`` (answered from the bootstrap's read loop: its event loop turns)."""
        self.send(G.Ping(id=n))

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    def ran_out_of_memory(self) -> bool:
        tail = self.stderr_tail()
        return self._oom_killed or "out of memory" in tail or "heap limit" in tail

    async def kill(self, reason: str) -> None:
        """Stop the process and wait until it is gone, with its stderr read (idempotent)."""
        self._noted(reason)
        self._signal()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.proc.wait()
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(f"runtime process did not start: {reason}: {self.stderr_tail()}"))
        if self.cgroup is not None and self.proc.returncode is not None:
            cgroups, path = self.cgroup
            self.cgroup = None
            # in a thread: removing a memory cgroup makes the kernel give its charges back, which
            # took up to a second per cgroup under load, and the daemon's loop must not wait for it
            self._oom_killed = await asyncio.to_thread(cgroups.oom_killed, path)
            await asyncio.to_thread(cgroups.remove, path)
        await asyncio.wait([self._err_reader], timeout=1)
        if not self._err_reader.done():  # a grandchild may hold stderr open: stop reading it
            self._err_reader.cancel()
            await asyncio.gather(self._err_reader, return_exceptions=True)
        self._close_stdout()
        if self.proc.returncode is not None:  # (a process that outlived SIGKILL keeps its dir)
            await asyncio.to_thread(shutil.rmtree, self.home, True)
