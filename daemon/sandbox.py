"""The OS-level confinement of a guest process, applied between fork and exec (Linux).

Deno's permission system is the first boundary (no flags are granted); this is the second, for
an API that reaches the OS despite it (WebGPU loaded native drivers and wrote a shader cache):

- ``no_new_privs``: no setuid gain through exec; required by landlock and seccomp.
- **network namespace** (``unshare(CLONE_NEWNET)``, inside a new user namespace when the daemon
  is not root): the guest has no interface but a down loopback. It talks to the daemon only over
  stdin/stdout, so it needs none.
- **landlock**: the whole filesystem is read-only (read and execute beneath ``/``; no write,
  create, remove, truncate, device ioctl anywhere), no TCP bind or connect (ABI 4), and no signal
  or abstract unix socket outside the process's own domain (ABI 6), so one guest cannot signal
  another.
- **seccomp**: a deny-list of system calls a guest never needs (ptrace, process_vm_*, bpf,
  perf_event_open, userfaultfd, io_uring, mount and namespace calls, keyrings, kernel modules):
  they fail with EPERM.

Each layer is probed once per daemon (``available()``); a layer found available must then apply
in every child, or the start fails (closed, not open). A layer the kernel lacks is skipped and
logged once. A private, empty HOME/TMPDIR/cache dir per process (``daemon.guest``) is the floor
under all of this.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import struct
import subprocess
from dataclasses import dataclass

log = logging.getLogger("sandbox_mesh.daemon.sandbox")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# x86_64 system call numbers (landlock and seccomp are applied only there; see available())
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
FS_ALL_V1 = (1 << 13) - 1  # execute .. make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2

#: System calls a guest never makes: each fails with EPERM. (x86_64 numbers.)
DENIED_SYSCALLS = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "add_key": 248, "request_key": 249, "keyctl": 250, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "open_by_handle_at": 304,
    "name_to_handle_at": 303, "fsopen": 430, "fsmount": 432, "move_mount": 429, "open_tree": 428,
    "mount_setattr": 442, "acct": 163, "swapon": 167, "swapoff": 168, "reboot": 169, "personality": 135,
    "syslog": 103, "quotactl": 179, "lookup_dcookie": 212, "vhangup": 153, "iopl": 172, "ioperm": 173,
}  # fmt: skip
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000


class SandboxError(OSError):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The kernel's landlock ABI version, 0 if it has none (or this is not x86_64 Linux)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return 0
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(abi), 0)


def _landlock(abi: int) -> None:
    fs = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", fs, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs, NET_BIND_TCP | NET_CONNECT_TCP)
    else:
        attr = struct.pack("=Q", fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), 0), "landlock")
    try:
        root = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            rule = struct.pack("=Qi", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR, root)
            rbuf = ctypes.create_string_buffer(rule, len(rule))
            _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rbuf, 0), "landlock rule")
        finally:
            os.close(root)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock restrict")
    finally:
        os.close(ruleset)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program() -> ctypes.Array[_SockFilter]:
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    nrs = sorted(set(DENIED_SYSCALLS.values()))
    prog = [(ld_abs, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, SECCOMP_RET_KILL_PROCESS), (ld_abs, 0, 0, 0)]
    # a call numbered with the x32 bit set is refused outright
    prog.append((0x35, 0, 1, 0x40000000))  # BPF_JMP|BPF_JGE|BPF_K
    prog.append((ret, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM))
    for i, nr in enumerate(nrs):
        prog.append((jeq, len(nrs) - i, 0, nr))  # to the EPERM return after the ALLOW
    prog.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((ret, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM))
    return (_SockFilter * len(prog))(*(_SockFilter(*ins) for ins in prog))


_PROGRAM = _seccomp_program()
_FPROG = _SockFprog(len(_PROGRAM), _PROGRAM)


def _seccomp() -> None:
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(_FPROG), 0, 0), "seccomp")


def _netns(as_user: bool) -> None:
    _check(_libc.unshare(CLONE_NEWNET | (CLONE_NEWUSER if as_user else 0)), "unshare")


@dataclass(frozen=True)
class Layers:
    """What the kernel lets this daemon apply to its guests."""

    netns: str  # "netns", "userns+netns" or "" (unavailable)
    landlock: int  # ABI version, 0 if unavailable
    seccomp: bool

    def describe(self) -> str:
        return (
            f"network namespace: {self.netns or 'unavailable'}; "
            f"landlock: {f'ABI {self.landlock}' if self.landlock else 'unavailable'}; "
            f"seccomp: {'on' if self.seccomp else 'unavailable'}"
        )


def _works(preexec: object) -> bool:
    try:
        subprocess.run(["/bin/true"], preexec_fn=preexec, check=True, timeout=10, close_fds=True)  # type: ignore[arg-type]
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _nnp() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


@functools.cache
def available() -> Layers:
    """Probe each layer once, in a throw-away child (a few ms, at the first guest start)."""
    netns = ""
    if platform.system() == "Linux":
        if _works(lambda: _netns(False)):
            netns = "netns"
        elif _works(lambda: _netns(True)):
            netns = "userns+netns"
    abi = landlock_abi()
    if abi and not _works(lambda: (_nnp(), _landlock(abi))):
        abi = 0
    x86_64 = platform.system() == "Linux" and platform.machine() == "x86_64"
    seccomp = x86_64 and _works(lambda: (_nnp(), _seccomp()))
    layers = Layers(netns, abi, seccomp)
    log.info("guest sandbox: %s", layers.describe())
    if not (netns and abi and seccomp):
        log.warning("guest sandbox incomplete (%s): guests rely on Deno's permissions and a private HOME",
                    layers.describe())  # fmt: skip
    return layers


def confine(layers: Layers, parent: int) -> None:
    """In the child, before exec: die with ``parent`` (the pid that forked us), then apply every
    available layer; raises if one fails."""
    die_with_parent(parent)
    _nnp()
    if layers.netns:
        _netns(layers.netns != "netns")
    if layers.landlock:
        _landlock(layers.landlock)
    if layers.seccomp:
        _seccomp()


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent (thread) exits, even by SIGKILL; exit now if that
    already happened. ``parent`` is the forking process's pid, read *before* the fork: a parent
    that died between fork and prctl has already made us an orphan, and only a pid taken before
    the fork can tell (getppid() read in the child would already name the reaper)."""
    _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(70)


def enter_cgroup(procs: str) -> None:
    """In the forked child before exec: move this process into the cgroup whose ``cgroup.procs``
    file is ``procs`` (only os calls)."""
    fd = os.open(procs, os.O_WRONLY)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
