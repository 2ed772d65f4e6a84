"""Every exception the client raises derives from ``client.Error``; ``code`` is the wire error code."""

from __future__ import annotations

from wire import protocol as P
from wire.messages import ErrorReply


class Error(Exception):
    code = P.E_INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class GuestError(Error):
    """The guest's JavaScript threw; ``name``, ``message`` and ``stack`` are the JS error's.

    ``str()`` of it is the guest's stack (``Name: message`` and its ``at ...`` lines), so a
    traceback shows where in the guest it threw; ``brief`` is the first line alone."""

    code = P.E_GUEST

    def __init__(self, name: str, message: str, stack: str = "") -> None:
        brief = f"{name}: {message}"
        if stack and not stack.startswith(brief):
            stack = f"{brief}\n{stack}"  # a stack without its head line (a guest may rewrite it)
        super().__init__(stack or brief)
        self.name = name
        self.message = message
        self.stack = stack
        self.brief = brief


class NoHandler(Error):
    """dispatch_request on a runtime whose guest has not called serve()."""

    code = P.E_NO_HANDLER


class RuntimeLost(Error):
    """The runtime is gone: disposed, crashed, stopped after a timeout, or its daemon died."""

    code = P.E_RUNTIME_LOST


class MemoryLimitExceeded(RuntimeLost):
    code = P.E_MEMORY_LIMIT


class CpuLimitExceeded(RuntimeLost):
    """The runtime was stopped: its event loop was stuck past its CPU limit, or a request used
    up its CPU budget."""

    code = P.E_CPU_LIMIT


class Timeout(Error, TimeoutError):
    code = P.E_TIMEOUT


class UnknownRuntime(Error):
    """The runtime id is not one this client created."""

    code = P.E_UNKNOWN_RUNTIME


class NoCapacity(Error):
    code = P.E_NO_DAEMON


class ConnectionLost(RuntimeLost):
    """The broker stopped answering, or the connection was closed: every runtime of it is lost too."""

    code = "connection_lost"


class Unavailable(ConnectionLost):
    """The broker could not be reached, or restarted, while this call was on its way: the call did
    not complete and may be retried. The runtime itself is not lost: the connection reconnects
    (to the same broker or a standby) and resumes its session by itself; only if that fails for
    ``reconnect`` seconds is the connection lost (``ConnectionLost``)."""

    code = P.E_UNAVAILABLE


class StreamError(Error):
    """A body stream ended abnormally (producer error, cancel, lost peer)."""

    code = "stream_error"


class InvalidEndpoint(Error, ValueError):
    """``connect`` was given an endpoint ZeroMQ cannot dial (it must look like ``tcp://host:port``)."""

    code = "invalid_endpoint"


class Unreachable(Timeout):
    """``connect`` found no broker to talk to: nothing listening, not a broker, or no answer in
    time; the message names the endpoint and what was seen. (A Timeout, as it was before.)"""


class AuthenticationFailed(Unreachable):
    """The broker refused this client at the CURVE handshake: it requires keys and none were
    given, the client's public key is not authorized, or ``broker_key`` is not the broker's."""


class RequestRejected(Error):
    """The broker or daemon refused a request as malformed or too large."""


class Busy(RequestRejected):
    """Refused for now, nothing changed: a runtime with too many calls pending or input unread, or
    a daemon busy starting runtimes (``create_runtime``). Retrying later may succeed."""

    code = P.E_BUSY


_BY_CODE: dict[str, type[Error]] = {
    P.E_NO_HANDLER: NoHandler,
    P.E_RUNTIME_LOST: RuntimeLost,
    P.E_MEMORY_LIMIT: MemoryLimitExceeded,
    P.E_CPU_LIMIT: CpuLimitExceeded,
    P.E_TIMEOUT: Timeout,
    P.E_UNKNOWN_RUNTIME: UnknownRuntime,
    P.E_NO_DAEMON: NoCapacity,
    P.E_CAPACITY: NoCapacity,
    P.E_UNKNOWN_CLIENT: ConnectionLost,
    P.E_UNAVAILABLE: Unavailable,
    P.E_BUSY: Busy,
}


def from_reply(reply: ErrorReply) -> Error:
    """The exception an ``error`` reply stands for."""
    if reply.code == P.E_GUEST:
        return GuestError(reply.name or "Error", reply.message, reply.stack or "")
    cls = _BY_CODE.get(reply.code, RequestRejected)
    return cls(reply.message, reply.code)


def lost(code: str, message: str) -> RuntimeLost:
    if code == P.E_MEMORY_LIMIT:
        return MemoryLimitExceeded(message, code)
    if code == P.E_CPU_LIMIT:
        return CpuLimitExceeded(message, code)
    if code == ConnectionLost.code:
        return ConnectionLost(message, code)
    return RuntimeLost(message, code)
