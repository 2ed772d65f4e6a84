"""The daemon's own memory: bounded while streams run, given back to the system after a load.

Body chunks (up to MAX_CHUNK bytes) are allocated and freed by libzmq's I/O thread, pyzmq's
garbage-collector thread and the event loop's thread. glibc's malloc gives each thread that
allocates concurrently an arena of its own (up to 8 per core, each reserving 64 MiB regions), and
a freed chunk goes back to its arena, not to the system: after 2,000 concurrent streams the daemon
kept 2.1 GiB of such regions with every stream ended. Two remedies, both through glibc's own
interface (a no-op elsewhere):

- ``limit_arenas`` caps the arenas (M_ARENA_MAX) before libzmq starts its threads: the threads
  share two arenas, so memory one thread freed serves the next allocation of another.
- ``trim`` (malloc_trim) returns the free pages of every arena; the daemon calls it in a worker
  thread when its open pipes have fallen well below their recent peak (``Trimmer``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("sandbox_mesh.daemon.memory")

#: glibc's mallopt parameter number for the arena cap (malloc.h: M_ARENA_MAX).
M_ARENA_MAX = -8
#: Arenas the daemon's threads share.
ARENAS = 2
#: Open pipes below which a trim is never due (little to give back).
TRIM_FLOOR = 32

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only: musl has neither
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (before threads start allocating); False if not glibc."""
    libc = _glibc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, arenas) == 1


def trim() -> bool:
    """Return every arena's free pages to the system; True if some memory was released."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


class Trimmer:
    """Decides when a trim is worth it: once the open pipes fell to a quarter of their peak since
    the last trim, and that peak was at least TRIM_FLOOR (a load happened and is over)."""

    def __init__(self) -> None:
        self.peak = 0

    def due(self, open_pipes: int) -> bool:
        self.peak = max(self.peak, open_pipes)
        if self.peak < TRIM_FLOOR or open_pipes > self.peak // 4:
            return False
        self.peak = open_pipes
        return True
