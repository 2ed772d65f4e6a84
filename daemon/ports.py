"""The narrow interfaces between the daemon's parts, so none of them imports the one that owns it.

    Daemon --creates--> Runtime --opens--> streams
       ^                  |  ^                |
   DaemonLinks            |  +-- StreamOwner -+--> GuestPort (the guest process)
       |                  |
     Seat <-- RuntimeHost-+

A Runtime reaches its daemon only through the ``RuntimeHost`` it is given (a Seat, one per runtime,
so it already knows whose runtime it is); a stream reaches the guest through a ``GuestPort`` and
its runtime through a ``StreamOwner``. Entries in the daemon's registries are objects that know
how to act on themselves (``ClientCancellable``, ``CallbackWaiter``).
"""

from __future__ import annotations

from typing import Any, Protocol

from wire.messages import CreateOk, DispatchOk, DisposeOk, ErrorReply, EvalOk, StatsOk
from wire.pipes import PipeReader, PipeWriter
from wire.schema import Record

#: The ``ok`` replies a daemon sends.
OkReply = CreateOk | EvalOk | DispatchOk | StatsOk | DisposeOk


class ClientCancellable(Protocol):
    """Something a client may cancel on the control link by the wire sid it is registered under."""

    def cancel_by_client(self) -> None: ...


class CallbackWaiter(Protocol):
    """A guest fetch or tool call waiting for the client's answer to its callback."""

    def answer(self, reply: Record) -> None:
        """The client answered (``ok`` FetchOk, ``tool_result``: each waiter checks it got its own)."""

    def refuse(self, message: str, error: ErrorReply | None = None) -> None:
        """The client refused (an ``error``), or its answer could not be read."""


class RuntimeHost(Protocol):
    """What one Runtime needs from the daemon that hosts it."""

    def to_broker(self, msg: Record) -> None:
        """Send a message to the broker (fetch callbacks, console entries, error replies...)."""

    def reply(self, msg: OkReply) -> None:
        """Send an ``ok`` reply; one whose header would exceed MAX_HEADER becomes ``too_large``."""

    def to_client(self, msg: Record) -> None:
        """Send to the runtime's owner on the control link (cancel, pipe_ready)."""

    def bind_reader(self, sid: bytes) -> tuple[PipeReader, str]:
        """A bound PULL for stream ``sid`` and the endpoint the client connects to (only the owner can)."""

    def bind_writer(self, sid: bytes) -> tuple[PipeWriter, str]:
        """A bound PUSH for stream ``sid`` and the endpoint the client connects to (only the owner can)."""

    def register_stream(self, sid: bytes, entry: ClientCancellable) -> None:
        """Let the runtime's owner cancel ``entry`` by ``sid`` (replaces an earlier entry)."""

    def unregister_stream(self, sid: bytes) -> None: ...

    def add_callback(self, waiter: CallbackWaiter) -> int:
        """A new callback id; the client's answer to it goes to ``waiter``."""

    def drop_callback(self, fid: int) -> None: ...

    def held(self) -> dict[str, int]:
        """What the daemon holds for this runtime (registered streams, callbacks): leak checks."""


class DaemonLinks(Protocol):
    """The daemon's sockets, as a runtime's seat (daemon/registry.py) uses them."""

    def send(self, msg: Record) -> None:
        """To the broker."""

    def reply(self, msg: OkReply) -> None: ...

    def control_send(self, token: bytes, msg: Record) -> None:
        """To the client whose control socket has identity ``token``."""

    def bind_reader(self, sid: bytes, owner_key: bytes | None) -> tuple[PipeReader, str]:
        """A bound PULL for stream ``sid`` that admits only the runtime's owner (wire.auth.Gate.serve_pipe)."""

    def bind_writer(self, sid: bytes, owner_key: bytes | None) -> tuple[PipeWriter, str]: ...


class GuestPort(Protocol):
    """The guest's end of the channel, as a stream sees it."""

    def send(self, msg: Record) -> None:
        """Queue one frame (never blocks)."""

    def send_encoded(self, header: bytes, body: Any = None) -> None:
        """Queue one frame whose JSON header is already encoded (a stream's per-chunk frames)."""

    async def drain(self) -> None:
        """Wait until the channel has room (backpressure towards the guest)."""


class StreamOwner(Protocol):
    """What a stream needs from the runtime whose stream it is."""

    def forget_inbound(self, stream: Any) -> None:
        """The stream is over: drop it from the runtime's and the daemon's tables."""

    def forget_outbound(self, stream: Any) -> None: ...

    def cancel_upstream(self, wire_sid: bytes) -> None:
        """Tell the client to stop producing (or consuming) ``wire_sid``."""
