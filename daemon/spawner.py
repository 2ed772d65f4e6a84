"""Guest processes are started by a small helper process, never by the daemon's own process.

Starting a process from Python with a ``preexec_fn`` (the daemon confines every guest between
fork and exec: cgroup, sandbox layers, its process group) makes subprocess ``fork()`` the whole
parent, page tables and all, with the event loop stopped until the child has exec'd. A daemon
that had moved 1,000 streams had grown past a GiB, each such fork took ~45 ms, and runtime
creation at 20/s fell seconds behind. So the daemon forks one helper while it is still small (at
its first guest start) and the helper forks the guests: it stays a few MiB, so its forks cost a
few ms, and the daemon's loop only waits in a worker thread for the helper's answer.

The helper speaks over a socketpair: a request is one JSON message with the descriptors the guest
gets (stdin, stdout, stderr, the bootstrap source) attached (SCM_RIGHTS); the answer is
``{"pid": N}`` once the guest has exec'd, or ``{"error": "..."}``. The helper dies with the daemon
(PR_SET_PDEATHSIG) and guests die with the helper, so none outlives the daemon. Its children are
reaped by the kernel (SIGCHLD ignored); the daemon watches each guest through a pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import os
import signal
import socket
import threading
from typing import Any

from daemon import sandbox

_MAX_REQUEST = 1 << 20
#: Guests run this much nicer than the daemon, so the daemon's loop (heartbeats, every runtime's
#: calls and pipes) wins the CPU over guests' JavaScript and boots: 150 unbounded concurrent boots
#: on 2 cores stalled the daemon's loop for 1.07 s at nice 0 (it was dropped), 0.16 s at nice 10.
GUEST_NICE = 10


class SpawnError(OSError):
    """The helper could not start the guest (the reason is the child's own error)."""


class Spawner:
    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._lock = threading.Lock()  # one request at a time on the socket (callers are threads)

    @classmethod
    def fork(cls) -> Spawner:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon = os.getpid()
        pid = os.fork()
        if pid == 0:  # the helper: never returns
            try:
                ours.close()
                _serve(theirs, daemon)
            finally:
                os._exit(0)
        theirs.close()
        return cls(ours, pid)

    def spawn(
        self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int], cgroup_procs: str | None,
        layers: sandbox.Layers, source_fd: int, target_fd: int,
    ) -> int:  # fmt: skip
        """Start ``argv`` with ``fds`` as its stdin, stdout, stderr (blocking: call from a thread)."""
        request = {
            "argv": argv, "env": env, "cwd": cwd, "cgroup": cgroup_procs, "target_fd": target_fd,
            "layers": [layers.netns, layers.landlock, layers.seccomp],
        }  # fmt: skip
        with self._lock:
            socket.send_fds(self.sock, [json.dumps(request).encode()], [*fds, source_fd])
            answer = self.sock.recv(_MAX_REQUEST)
        if not answer:
            raise SpawnError("the guest spawner is gone")
        reply = json.loads(answer)
        if "error" in reply:
            raise SpawnError(reply["error"])
        return int(reply["pid"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)


_spawner: Spawner | None = None
_spawner_lock = threading.Lock()


def get() -> Spawner:
    """This process's spawner, forked on first use (the daemon's first guest start)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = Spawner.fork()
        return _spawner


def _forget(dead: Spawner) -> None:
    global _spawner
    with _spawner_lock:
        if _spawner is dead:
            _spawner = None
    dead.close()


def shutdown() -> None:
    global _spawner
    with _spawner_lock:
        if _spawner is not None:
            _spawner.close()
            _spawner = None


def _serve(sock: socket.socket, daemon: int) -> None:
    """The helper's loop: one guest per request, until the daemon closes its end."""
    gc.disable()  # the daemon's objects it inherited are never collected here (no finalizers run)
    sandbox.die_with_parent(daemon)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # guests are reaped by the kernel
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    keep = sock.fileno()
    with contextlib.suppress(OSError):  # nothing of the daemon's (sockets, pipes) stays open here
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, _MAX_REQUEST, 8)
        except OSError:
            return
        if not message:
            return
        try:
            pid = _start(json.loads(message), fds)
            answer: dict[str, Any] = {"pid": pid}
        except Exception as exc:
            answer = {"error": str(exc) or repr(exc)}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        sock.send(json.dumps(answer).encode())


def _start(request: dict[str, Any], fds: list[int]) -> int:
    stdin, stdout, stderr, source = fds
    layers = sandbox.Layers(*request["layers"])
    target = int(request["target_fd"])
    errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
    helper = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_r)
            errors_w = fcntl.fcntl(errors_w, fcntl.F_DUPFD_CLOEXEC, 64)  # above every number used below
            for fd, std in ((stdin, 0), (stdout, 1), (stderr, 2)):
                os.dup2(fd, std)
            os.setpgid(0, 0)
            os.nice(GUEST_NICE)
            if request["cgroup"]:  # charged to its own cgroup from its first page on (before
                sandbox.enter_cgroup(request["cgroup"])  # landlock, which forbids that write)
            sandbox.confine(layers, helper)
            os.dup2(source, target)
            os.set_inheritable(target, True)
            os.chdir(request["cwd"])
            os.closerange(3, target)
            os.closerange(target + 1, errors_w)
            os.closerange(errors_w + 1, os.sysconf("SC_OPEN_MAX"))
            os.execve(request["argv"][0], request["argv"], request["env"])
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(errors_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(70)
    os.close(errors_w)
    with os.fdopen(errors_r, "rb") as errors:
        failure = errors.read()  # EOF once the child has exec'd (the pipe is close-on-exec)
    if failure:
        raise SpawnError(failure.decode("utf-8", "replace"))
    return pid


class Child:
    """A guest process the spawner started, as the daemon holds it: its pipes as asyncio streams
    and its exit, seen through a pidfd (the helper, not the daemon, is its parent)."""

    def __init__(self, pid: int, stdin: asyncio.StreamWriter, stderr: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stderr = stderr
        self.returncode: int | None = None  # -1 once it has exited (its status belongs to the helper)
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            self._exit()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._exit)

    def _exit(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self.returncode = -1
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        return -1

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


async def start_child(
    argv: list[str], env: dict[str, str], cwd: str, stdout_fd: int, cgroup_procs: str | None,
    layers: sandbox.Layers, source_fd: int, target_fd: int,
) -> Child:  # fmt: skip
    """Start a guest through this process's spawner, with pipes for its stdin and stderr."""
    loop = asyncio.get_running_loop()
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    try:
        spawner = get()
        try:
            pid = await asyncio.to_thread(
                spawner.spawn, argv, env, cwd, [stdin_r, stdout_fd, stderr_w], cgroup_procs, layers, source_fd,
                target_fd,
            )  # fmt: skip
        except OSError as exc:
            if not isinstance(exc, SpawnError) or "spawner is gone" in str(exc):
                _forget(spawner)  # the helper died: the next start forks a new one
            raise
    except BaseException:
        for fd in (stdin_w, stderr_r):
            os.close(fd)
        raise
    finally:
        os.close(stdin_r)
        os.close(stderr_w)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(stdin_w, "wb", buffering=0)
    )
    stdin = asyncio.StreamWriter(transport, protocol, None, loop)
    stderr = asyncio.StreamReader(loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stderr, loop=loop), os.fdopen(stderr_r, "rb", buffering=0)
    )
    return Child(pid, stdin, stderr)
