"""The daemon: runs sandboxed Deno runtimes for a broker (``python -m daemon --broker ...``)."""

from daemon.daemon import Daemon

__all__ = ["Daemon"]
