"""Guest imports: the bootstrap's loader asks for a module, the client's resolver answers.

The guest caches every module it loaded for the runtime's life and asks only for specifiers it has
not seen (protocol.md 7.3, Modules); the daemon only relays, so that the loader never reaches the
network or the daemon host's disk: what the guest can import is exactly what the resolver hands
out. A query waits in the pending table under the guest's module id, and in the daemon's callback
registry under its callback id, until the client answers (``module_ok`` or an ``error``), the wait
times out, or the runtime goes away; each of those answers the guest, with a text of the daemon's
(never the host's exception).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import values
from daemon.pending import GuestCalls
from daemon.ports import GuestPort, RuntimeHost
from wire import guest as G
from wire import messages as M

#: How long the daemon waits for a client's resolver (the client's own bound is shorter).
MODULE_REPLY_TIMEOUT = 60.0
#: The import lexer the guest's loader uses, vendored unchanged: es-module-lexer 3.0.5 (MIT,
#: Guy Bedford; daemon/es-module-lexer.LICENSE), its asm.js build ``dist/lexer.asm.js`` from the npm
#: package https://registry.npmjs.org/es-module-lexer/-/es-module-lexer-3.0.5.tgz (source:
#: https://github.com/guybedford/es-module-lexer). Pure JavaScript (no WebAssembly), and it lexes
#: TypeScript too: ``typeOnly`` marks the `import type` statements Deno erases.
LEXER = Path(__file__).with_name("es-module-lexer.js")
LEXER_SHA256 = "3028feb37fc835599b73461c3bbfc31b4217066e482e5e0eb9862c1a2da3bdb9"


@functools.cache
def lexer_source() -> str:
    """The lexer's source, sent in `init` to a runtime that loads modules (read once per daemon)."""
    return LEXER.read_text()


#: What a module's kind may be (the guest picks the Blob type from it).
KINDS = frozenset({"javascript", "typescript", "json"})


@dataclass(slots=True, eq=False)
class GuestModule:
    """A guest import waiting for the client's answer to callback ``mid`` (a CallbackWaiter)."""

    gid: int
    specifier: str
    modules: Modules
    mid: int = field(default=0)

    def answer(self, reply: Any) -> None:
        self.modules.answered(self, reply)

    def refuse(self, message: str, error: M.ErrorReply | None = None) -> None:
        self.modules.refused(self, message)  # the client's error text is the reason (never the resolver's)


class Modules(GuestCalls[GuestModule]):
    def __init__(self, host: RuntimeHost, port: GuestPort, rt: str) -> None:
        super().__init__("module", G.MAX_PENDING_MODULES)  # the bootstrap queues the rest
        self.host = host
        self.port = port
        self.rt = rt

    def on_query(self, msg: G.ModuleQuery) -> None:
        self.admit(msg.id)
        if len(msg.specifier) + len(msg.referrer) > G.MAX_SPECIFIER:  # the bootstrap refuses first
            self.port.send(G.ModuleError(id=msg.id, message=f"the specifier is longer than {G.MAX_SPECIFIER}"))
            return
        m = GuestModule(msg.id, values.clean(msg.specifier), self)
        m.mid = self.host.add_callback(m)
        self.pending.add(msg.id, m, MODULE_REPLY_TIMEOUT, self._timed_out)
        referrer = values.clean(msg.referrer) or None
        self.host.to_broker(M.Module(id=m.mid, rt=self.rt, specifier=m.specifier, referrer=referrer))

    def answered(self, m: GuestModule, reply: Any) -> None:
        if self.pending.take(m.gid) is None:
            return
        if not isinstance(reply, M.ModuleOk):  # e.g. a fetch's answer under this id: a broken client
            self._failed(m, "the host answered the import with something else than a module")
            return
        if reply.kind not in KINDS:
            self._failed(m, f"the resolver gave a module of unknown kind {values.clean(reply.kind)[:40]!r}")
            return
        try:
            bytes(reply.source).decode()
        except UnicodeDecodeError:
            self._failed(m, "the resolver's module source is not UTF-8")
            return
        self.port.send(G.ModuleSource(id=m.gid, url=reply.url, kind=reply.kind, source=reply.source))

    def refused(self, m: GuestModule, message: str) -> None:
        if self.pending.take(m.gid) is not None:
            self._failed(m, message)

    def _failed(self, m: GuestModule, message: str) -> None:
        self.port.send(G.ModuleError(id=m.gid, message=values.cut_utf8(values.clean(message), 1024)))

    def _timed_out(self, m: GuestModule) -> None:
        self.host.drop_callback(m.mid)
        self._failed(m, f"the host's resolver did not answer within {MODULE_REPLY_TIMEOUT:g}s")

    def fail_all(self) -> None:
        """The runtime is gone: forget every query (nobody is left to answer)."""
        self.pending.fail_all(lambda m: self.host.drop_callback(m.mid))
