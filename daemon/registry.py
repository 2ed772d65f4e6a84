"""What the daemon holds for its runtimes, by the ids others name it with, and each runtime's seat.

Clients cancel streams on the control link by wire sid; the broker brings the client's answers to
guest fetches by callback id. Both registries map those ids to objects that act on themselves
(a stream, a pending dispatch, a guest fetch) and remember whose runtime they belong to, so only
the runtime's owner can cancel, and a runtime's leak checks count what it holds here.

A runtime reaches the daemon through its ``Seat`` (its RuntimeHost): the daemon's links, and these
registries, bound to that one runtime.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from daemon.ports import CallbackWaiter, ClientCancellable, DaemonLinks, OkReply
from wire.pipes import PipeReader, PipeWriter
from wire.schema import Record


class Held(NamedTuple):
    seat: Seat
    target: Any  # ClientCancellable in ``streams``, CallbackWaiter in ``callbacks``


class Registry:
    def __init__(self) -> None:
        #: wire sid -> what its runtime's owner may cancel on the control link
        self.streams: dict[bytes, Held] = {}
        #: fetch callback id -> the guest fetch waiting for the client's answer
        self.callbacks: dict[int, Held] = {}
        self._ids = 0
        self.cancels = 0  # streams cancelled by their clients (for the metrics)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def cancel(self, sid: bytes, token: bytes) -> None:
        """A client cancelled stream ``sid``; only the owner of its runtime may."""
        held = self.streams.get(sid)
        if held is not None and held.seat.owner == token:
            self.cancels += 1
            held.target.cancel_by_client()

    def refuse_callbacks(self, message: str) -> None:
        """Every fetch callback waiting for a client's answer fails: the link it went out on is gone."""
        held, self.callbacks = self.callbacks, {}
        for h in held.values():
            h.target.refuse(message)

    def take_callback(self, fid: int) -> CallbackWaiter | None:
        held = self.callbacks.pop(fid, None)
        return None if held is None else held.target

    def held_by(self, seat: Seat) -> dict[str, int]:
        return {
            "registered_streams": sum(h.seat is seat for h in self.streams.values()),
            "callbacks": sum(h.seat is seat for h in self.callbacks.values()),
        }


class Seat:
    """The daemon as one runtime sees it (its RuntimeHost): bound to that runtime and its owner."""

    def __init__(self, links: DaemonLinks, registry: Registry, rt: str, owner: bytes, owner_key: bytes | None) -> None:
        self.links = links
        self.registry = registry
        self.rt = rt
        self.owner = owner
        self.owner_key = owner_key  # the owner's CURVE key, admitted while the runtime lives; its pipes admit only it

    def to_broker(self, msg: Record) -> None:
        self.links.send(msg)

    def reply(self, msg: OkReply) -> None:
        self.links.reply(msg)

    def to_client(self, msg: Record) -> None:
        self.links.control_send(self.owner, msg)

    def bind_reader(self, sid: bytes) -> tuple[PipeReader, str]:
        return self.links.bind_reader(sid, self.owner_key)

    def bind_writer(self, sid: bytes) -> tuple[PipeWriter, str]:
        return self.links.bind_writer(sid, self.owner_key)

    def register_stream(self, sid: bytes, entry: ClientCancellable) -> None:
        self.registry.streams[sid] = Held(self, entry)

    def unregister_stream(self, sid: bytes) -> None:
        self.registry.streams.pop(sid, None)

    def add_callback(self, waiter: CallbackWaiter) -> int:
        fid = self.registry.next_id()
        self.registry.callbacks[fid] = Held(self, waiter)
        return fid

    def drop_callback(self, fid: int) -> None:
        self.registry.callbacks.pop(fid, None)

    def held(self) -> dict[str, int]:
        return self.registry.held_by(self)
