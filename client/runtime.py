"""A runtime as the client sees it: eval, dispatch_request, dispose, and the host callbacks.

Bodies never pass through the broker unless they are small and complete: anything else gets its
own pipe straight to the daemon (the daemon binds, the client connects), and the producing side
sends only as fast as the consuming side reads.

A Runtime knows its connection only as a ``Host`` (below) and its daemon only as a ``ControlLink``;
it owns a Scope (every callback and producer task) and the registry of its open streams, and
closes both when it is lost or disposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import zmq
import zmq.asyncio

from client.bodies import Body, Inbound, aclose_quietly, send_body
from client.control import ControlLink
from client.errors import Error, RequestRejected, RuntimeLost, lost
from client.http import BodyType, Request, Response
from client.modules import Module, Resolver
from client.tools import TOOL_TIMEOUT, Tool, ToolError
from wire import http as H
from wire import messages as M
from wire import protocol as P
from wire import streams
from wire import tools as T
from wire.pipes import PipeReader, PipeWriter
from wire.ratelog import RateLog
from wire.scope import Scope
from wire.values import marshalled

log = logging.getLogger("sandbox_mesh.client.runtime")

#: How long a dispatch waits for the guest's response head (the body may take longer).
DISPATCH_TIMEOUT = 60.0

R = TypeVar("R", bound=M.Record)

#: The fetch callback: ``async def fetch(request: client.Request) -> client.Response``. It performs
#: the guest's ``fetch()`` (``client.forward_fetch()`` does it for real with aiohttp); what it raises
#: is logged with its traceback and rejects the guest's fetch with ``TypeError: fetch failed`` (a
#: ``FetchDenied`` policy refusal with its own text): host exception texts never reach the guest.
FetchCallback: TypeAlias = Callable[[Request], Awaitable[Response]]
#: How long the client waits for the resolver's answer to one import, by default (seconds).
MODULE_TIMEOUT = 30.0

#: The console callback: called with each ``console.*`` call of the guest, as a ``ConsoleEntry``
#: whose str() is its text (so ``console=print`` works); a plain function or an ``async def``.
ConsoleCallback: TypeAlias = Callable[["ConsoleEntry"], object]


def check_callbacks(fetch: object, console: object, modules: object = None) -> None:
    """Refuse callbacks that cannot work at the call that passes them (TypeError), not at the guest's
    first fetch: ``fetch`` must be an ``async def`` (or an object whose ``__call__`` is one, like
    forward_fetch()), since the daemon's fetch waits for a Response that a plain function cannot stream."""
    if fetch is not None and not (
        inspect.iscoroutinefunction(fetch) or inspect.iscoroutinefunction(getattr(fetch, "__call__", None))  # noqa: B004
    ):
        raise TypeError(
            f"fetch must be an async function, async def fetch(request: client.Request) -> client.Response, "
            f"not {fetch!r} (use client.forward_fetch() to perform fetches for real)"
        )
    if console is not None and not callable(console):
        raise TypeError(f"console must be a function taking a client.ConsoleEntry, not {console!r}")
    if modules is not None and not (
        inspect.iscoroutinefunction(modules) or inspect.iscoroutinefunction(getattr(modules, "__call__", None))  # noqa: B004
    ):
        raise TypeError(
            f"modules must be an async function, async def resolver(specifier: str, referrer: str | None) -> "
            f"client.Module | None, not {modules!r} (client.modules.from_dict and .directory make one)"
        )


class Host(Protocol):
    """What a Runtime needs from the connection that created it (client.Connection is one)."""

    #: how long to wait for the broker's answers and for a pipe's peer (seconds)
    timeout: float

    async def call(self, make: Callable[[int], M.Record], reply: type[R], *, timeout: float | None = None) -> R:
        """Send the request ``make(id)`` and return its reply as ``reply``; an error reply raises."""
        ...

    def send(self, msg: M.Record) -> None:
        """Send a message that expects no reply; raises client.Error once the connection is gone."""
        ...

    def dial(self, kind: int, endpoint: str, sid: bytes, server_key: bytes | None) -> zmq.asyncio.Socket:
        """A pipe socket (PUSH or PULL) connected to the daemon's pipe of stream ``sid`` at ``endpoint``
        (proving the sid, or a CURVE client of ``server_key`` if the daemon has one)."""
        ...

    def forget(self, runtime_id: str) -> None:
        """The runtime is closed: route nothing more to it."""
        ...


@dataclass(frozen=True, slots=True)
class ConsoleEntry:
    """One console call of the guest that printed something (and every ``console.clear()``).

    ``str(entry)`` is ``text``, so ``console=print`` prints what Deno would have printed."""

    #: the console method the guest called: log, info, debug, warn, error, trace, assert, dir,
    #: dirxml, table, group, groupCollapsed, groupEnd, count, countReset, time, timeLog, timeEnd, clear
    method: str
    #: the level Deno printed it at: log, info, debug, warn, error or trace (a failed assert is an
    #: error; timeEnd/timeLog/countReset of an unknown label and time() of a running one, a warn)
    level: str
    #: the entry as Deno formats it: inspect, %s/%d/%o/%c, group indentation, table boxes; no final
    #: newline (empty for clear); at most wire.guest.MAX_CONSOLE characters, then "…[truncated]"
    text: str
    #: the call's arguments as marshalled values (client.Runtime.eval's rules); one that cannot be
    #: sent (a function, a Map, a class instance) or does not fit arrives as its formatted text
    args: list[Any]
    #: how many console.group()s enclose it
    group_depth: int = 0

    def __str__(self) -> str:
        return self.text


class Runtime:
    def __init__(
        self,
        host: Host,
        control: ControlLink,
        created: M.CreateOk,
        fetch: FetchCallback | None,
        console: ConsoleCallback | None,
        eval_timeout: float | None,
        tools: dict[str, Tool] | None = None,
        tool_timeout: float | None = None,
        modules: Resolver | None = None,
        module_timeout: float = MODULE_TIMEOUT,
    ) -> None:
        self._host = host
        self._control = control
        self.id = created.rt
        self.name: str | None = None  # set by the connection for a named runtime
        self.pid = created.pid  # its Deno process on the daemon's host (informational; 0 if not known)
        self.daemon = created.daemon or ""
        self.daemon_key: bytes | None = created.daemon_key.encode() if created.daemon_key else None
        self._fetch = fetch
        self._console = console
        self._modules = modules
        self.module_timeout = module_timeout
        self.eval_timeout = eval_timeout
        self._tools = tools or {}
        self.tool_timeout = TOOL_TIMEOUT if tool_timeout is None else tool_timeout
        self._tool_calls = 0  # tool calls being served (for stats)
        self.lost: RuntimeLost | None = None
        self._scope = Scope(f"runtime {self.id}")
        #: failures of the app's callbacks: a guest can make them fail thousands of times a second
        self._failures = RateLog(log)
        #: open streams the daemon produces for us (response bodies, fetch uploads)
        self._inbound: dict[bytes, Inbound] = {}
        #: stream id -> the task producing it for the daemon (upload, fetch answer)
        self._outbound: dict[bytes, asyncio.Task[Any]] = {}
        #: stream id -> an upload's wait for the daemon's pipe_ready
        self._ready: dict[bytes, asyncio.Future[str]] = {}

    def __repr__(self) -> str:
        return f"<Runtime {self.id} on {self.daemon}{' lost' if self.lost else ''}>"

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """``async with await conn.create_runtime() as rt:`` disposes of the runtime at the end."""
        await self.dispose()

    # ---- calls -----------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.lost is not None:
            raise self.lost

    async def eval(self, source: str, *, timeout: float | None = None, filename: str | None = None) -> Any:
        """Evaluate ``source`` as an ES module; returns its default export (marshalled), if any.

        ``filename`` names the source in stack traces and syntax errors (with the original line and
        column); one ending in .ts, .tsx or .mts is TypeScript, run with its types stripped (not
        checked). The eval's URL, which its relative imports resolve against, is ``file:///`` +
        ``filename`` (``file:///main.js`` without one).

        Cancelling the task awaiting it stops the guest's work at once: the runtime is stopped (as
        when the eval times out) and later calls raise RuntimeLost."""
        self._check()
        # printable: a lone surrogate cannot be encoded (UnicodeEncodeError deep in the send), and
        # a newline or other control character would break the stack lines that name the file
        if filename is not None and (
            not isinstance(filename, str) or not filename or len(filename) > 1024 or not filename.isprintable()
        ):
            raise TypeError("filename must be a non-empty str of at most 1024 printable characters")
        code = source.encode()
        if len(code) > P.MAX_SOURCE:
            raise RequestRejected(f"source of {len(code)} bytes exceeds {P.MAX_SOURCE}", P.E_TOO_LARGE)
        limit = timeout if timeout is not None else self.eval_timeout
        ms = None if limit is None else to_ms(limit)
        # the daemon enforces the limit; our wait only needs to outlast it
        wait = (limit or 30.0) + self._host.timeout
        try:
            reply = await self._host.call(
                lambda id_: M.Eval(id=id_, rt=self.id, source=code, timeout_ms=ms, filename=filename),
                M.EvalOk,
                timeout=wait,
            )
        except asyncio.CancelledError:
            self._stop_cancelled()
            raise
        return reply.value

    def _stop_cancelled(self) -> None:
        """An eval's caller gave up: a guest cannot be interrupted mid-turn (``while (true) {}`` never
        yields), so the runtime is disposed of, as the eval timeout stops it. The dispose goes the way
        the eval went (through the broker, in order), so it can never overtake the eval; nobody waits
        for its reply (id 0, which no call uses), and the runtime counts as lost from now on."""
        if self.lost is None:
            self._send(M.Dispose(id=0, rt=self.id))
            self.on_lost(P.E_CANCELLED, "an eval was cancelled by its caller; the runtime was stopped")

    async def dispatch_request(self, request: Request, *, timeout: float = DISPATCH_TIMEOUT) -> Response:
        """Hand ``request`` to the guest's serve() handler; the response body streams as produced."""
        self._check()
        resp_sid = P.new_id()
        body = request.body
        desc: M.Body = None
        upload: asyncio.Task[Error | None] | None = None
        if isinstance(body, (bytes, bytearray, memoryview)) and len(body) <= P.MAX_INLINE_BODY:
            desc = M.Inline(body) if len(body) else None
        elif body is not None:
            desc = M.StreamRef(P.new_id())
            upload = self._upload(desc.sid, body)

        def make(id_: int) -> M.Dispatch:
            headers = tuple(request.headers.items())
            return M.Dispatch(
                id=id_, rt=self.id, method=request.method, url=request.url, headers=headers, resp_sid=resp_sid,
                body=desc, redirect=request.redirect,
            )  # fmt: skip

        try:
            call = self._host.call(make, M.DispatchOk, timeout=timeout)
            reply = await (call if upload is None else _unless_refused(call, upload))
        except BaseException:
            self._cancel_remote(resp_sid)  # the guest's request.signal aborts
            if upload is not None:
                upload.cancel()
            raise
        return self._response(reply, resp_sid)

    def _response(self, reply: M.DispatchOk, resp_sid: bytes) -> Response:
        try:  # before the body is opened: Response() checks the head too, but would leave it open
            H.check_response_head(reply.status_text, reply.headers)
        except H.HeadError as exc:
            self._cancel_remote(resp_sid)
            raise RequestRejected(f"the daemon answered with an invalid head: {exc}", P.E_BAD_MESSAGE) from None
        body: BodyType = None
        if isinstance(reply.body, M.Inline):
            body = bytes(reply.body.data)
        elif isinstance(reply.body, M.StreamRef):
            if reply.body.ep is None or reply.body.sid != resp_sid:
                raise RequestRejected("the daemon answered with an unusable body stream", P.E_BAD_MESSAGE)
            body = self._open_body(reply.body.sid, reply.body.ep)
        return Response(status=reply.status, headers=list(reply.headers), body=body, status_text=reply.status_text)

    async def stats(self) -> dict[str, dict[str, int]]:
        """What this runtime has in flight on each hop: ``client``, ``daemon`` and ``guest`` counts.

        After every exchange has finished (completed, cancelled or failed) they are all zero.
        """
        self._check()
        reply = await self._host.call(lambda id_: M.Stats(id=id_, rt=self.id), M.StatsOk)
        return {
            "client": {
                "bodies": len(self._inbound),
                "tasks": len(self._scope),
                "producers": sum(not t.done() for t in self._outbound.values()),
                "pipe_waiters": len(self._ready),
                "tools": self._tool_calls,
            },
            "daemon": dict(reply.daemon or {}),
            "guest": dict(reply.guest or {}),
        }

    async def dispose(self) -> None:
        """Stop the runtime; its process ends and every stream of it is closed."""
        if self.lost is None:
            with contextlib.suppress(RuntimeLost):
                await self._host.call(lambda id_: M.Dispose(id=id_, rt=self.id), M.DisposeOk)
            self.on_lost(P.E_RUNTIME_LOST, "the runtime was disposed")
        await self.close()

    async def close(self) -> None:
        """Join every task of the runtime, forget it, and close what its fetch callback holds
        (an aiohttp session). The connection calls this for each runtime when it closes."""
        if self.lost is None:
            self.on_lost(P.E_RUNTIME_LOST, "the runtime was closed")
        await self._scope.aclose()
        self._host.forget(self.id)
        aclose = getattr(self._fetch, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    # ---- streams -------------------------------------------------------------------------------

    def _cancel_remote(self, sid: bytes) -> None:
        """Tell the daemon to stop stream ``sid``; pointless (and not sent) once the runtime is gone."""
        if self.lost is None:
            self._control.cancel(sid)

    def _open_body(self, sid: bytes, ep: str) -> Body:
        try:
            sock = self._host.dial(zmq.PULL, ep, sid, self.daemon_key)
        except Error:  # out of descriptors: this body fails, and its producer must hear of it
            self._cancel_remote(sid)
            raise
        reader = PipeReader(sock, sid)
        # the body ended by itself: the cancel acknowledges END/ERROR (the daemon closes its end) or
        # stops a producer whose stream broke
        consumer = streams.Consumer(reader, on_finished=lambda: self._cancel_remote(sid))
        stream = Inbound(consumer, self._cancel_remote, self._inbound_done)
        self._inbound[sid] = stream
        # the daemon's cancel of a body we consume: its producer failed and could not say so in-band
        self._control.watch(sid, lambda: stream.fail("the daemon could not send the body"))
        body = stream.body()
        if self.lost is not None:
            stream.fail(self.lost.message)
        return body

    def _inbound_done(self, stream: Inbound) -> None:
        if self._inbound.get(stream.sid) is stream:
            del self._inbound[stream.sid]
            self._control.unwatch(stream.sid)

    def _producer(self, sid: bytes, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as the producer of stream ``sid``: a cancel from the daemon cancels it."""
        task = self._scope.spawn(coro, name=f"client-produce-{sid.hex()}")
        self._outbound[sid] = task
        self._control.watch(sid, task.cancel)

        def done(_task: asyncio.Task[Any]) -> None:  # here, not in a finally: a task cancelled
            self._outbound.pop(sid, None)  # before its first step never runs its finally blocks
            self._control.unwatch(sid)
            self._ready.pop(sid, None)
            self._control.forget_pipe(sid)

        task.add_done_callback(done)
        return task

    def _upload(self, sid: bytes, body: BodyType) -> asyncio.Task[Error | None]:
        """Stream a request body once the daemon has bound its pipe (control: pipe_ready)."""
        self._ready[sid] = self._control.expect_pipe(sid)
        return self._producer(sid, self._produce_when_ready(sid, body))

    async def _produce_when_ready(self, sid: bytes, body: BodyType) -> Error | None:
        """Stream ``body`` once the daemon's pipe_ready for ``sid`` (expected in ``_ready``) came;
        returns why the pipe could not be opened, if it could not."""
        try:
            async with asyncio.timeout(self._host.timeout):
                ep = await self._ready[sid]
        except TimeoutError:
            log.warning("the daemon never opened the pipe for a body")
            await aclose_quietly(body)
            return None
        self._ready.pop(sid, None)
        return await self._produce(sid, ep, body)

    async def _produce(self, sid: bytes, ep: str, body: BodyType) -> Error | None:
        try:
            sock = self._host.dial(zmq.PUSH, ep, sid, self.daemon_key)
        except Error as exc:  # out of descriptors: the consumer must not wait for this body
            log.warning("a body was not sent: %s", exc)
            self._cancel_remote(sid)
            await aclose_quietly(body)
            return exc
        writer = PipeWriter(sock, sid, self._host.timeout)
        task = self._outbound[sid]  # the daemon's cancel: an acknowledged END, or stop producing
        self._control.watch(sid, lambda: streams.consumer_done(writer, task.cancel))
        failed = lambda exc: self._callback_failed("body", exc, " while it streamed to the guest")  # noqa: E731
        await send_body(writer, body, lambda: self._cancel_remote(sid), failed)
        return None

    # ---- callbacks from the guest (the connection routes them here) ------------------------------

    def on_console(self, msg: M.Console) -> None:
        if self._console is None or self.lost is not None:
            return
        try:
            entry = ConsoleEntry(msg.method, msg.level, msg.text, list(msg.args), msg.depth)
            result = self._console(entry)
        except Exception as exc:
            self._callback_failed("console", exc)
            return
        if inspect.isawaitable(result):
            self._scope.spawn(self._wait_console(result), name="client-console")

    async def _wait_console(self, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except Exception as exc:
            self._callback_failed("console", exc)

    def _callback_failed(self, which: str, exc: BaseException, on: str = "") -> None:
        """Log a failure of the app's ``which`` callback with its traceback (where the developer
        looks), at most once a second per runtime: the rest are counted in a summary line. A fetch
        refused by forward_fetch's policy is the policy working: one INFO line, no traceback."""
        if isinstance(exc, H.FetchDenied):
            kind = f"runtime {self.id}: fetches refused"
            self._failures.log(logging.INFO, kind, "runtime %s: fetch%s refused: %s", self.id, on, exc)
            return
        trace = _Traceback(exc)  # formatted only if this one is logged, not for each of a flood
        kind = f"runtime {self.id}: {which} callback failures"  # the summary line's head
        self._failures.log(logging.ERROR, kind, "runtime %s: the %s callback failed%s\n%s", self.id, which, on, trace)

    def on_fetch(self, msg: M.Fetch) -> None:
        if self.lost is not None:
            self._reply_fetch_error(msg.id, self.lost.message)
            return
        if self._control.cancelled(msg.resp_sid):  # the guest aborted before the callback got here
            self._reply_fetch_error(msg.id, "the fetch was cancelled")
            return
        self._producer(msg.resp_sid, self._serve_fetch(msg))

    async def _serve_fetch(self, msg: M.Fetch) -> None:
        request_body: Body | None = None
        try:
            body: BodyType = None
            if isinstance(msg.body, M.Inline):
                body = bytes(msg.body.data)
            elif isinstance(msg.body, M.StreamRef) and msg.body.ep is not None:
                body = request_body = self._open_body(msg.body.sid, msg.body.ep)
            request = Request(msg.method, msg.url, list(msg.headers), body, redirect=msg.redirect)
            assert self._fetch is not None, "the daemon sent fetch to a runtime without a fetch callback"
            try:
                response = await self._fetch(request)
            except asyncio.CancelledError:
                self._reply_fetch_error(msg.id, "the fetch was cancelled")  # the broker stops waiting
                raise
            if not isinstance(response, Response):
                raise TypeError(f"the fetch callback returned {type(response).__name__}, not client.Response")
            if not 200 <= response.status <= 599:
                raise ValueError(f"the fetch callback returned status {response.status} (must be 200-599)")
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                # the guest learns that it failed, not how: host exception texts stay on the host
                # (a policy refusal is the one text meant for it)
                denied = isinstance(exc, H.FetchDenied)
                self._reply_fetch_error(msg.id, f"FetchDenied: {exc}" if denied else "fetch failed")
                self._callback_failed("fetch", exc, f" on {msg.method} {msg.url}")
            if request_body is not None:
                request_body.cancel()  # the guest's upload stops too
            if isinstance(exc, Exception):
                return
            raise
        rbody = response.body
        try:
            desc: M.Body = None
            if isinstance(rbody, (bytes, bytearray, memoryview)) and len(rbody) <= P.MAX_INLINE_BODY:
                desc = M.Inline(rbody) if len(rbody) else None
            elif rbody is not None:
                desc = M.StreamRef(msg.resp_sid)
                # the daemon binds the body's pipe once it reads this answer: expect it before sending
                self._ready[msg.resp_sid] = self._control.expect_pipe(msg.resp_sid)
            self._send(
                M.FetchOk(
                    id=msg.id, rt=self.id, status=response.status, status_text=response.status_text,
                    headers=tuple(response.headers.items()), url=response.url or request.url,
                    redirected=response.redirected, body=desc,
                )
            )  # fmt: skip
            if isinstance(desc, M.StreamRef):
                await self._produce_when_ready(msg.resp_sid, rbody)
        finally:
            await aclose_quietly(rbody)
            if request_body is not None and not request_body.finished:
                request_body.cancel()

    def on_tool(self, msg: M.Tool) -> None:
        # the guest may have given up already: its cancel (control link) can overtake the call (broker)
        if self.lost is not None or self._control.cancelled(msg.resp_sid):
            self._reply_tool_error(msg.id, "Error", f"tools.{msg.name} failed")  # the broker stops waiting
            return
        self._producer(msg.resp_sid, self._serve_tool(msg))  # the daemon's cancel of resp_sid stops it

    async def _serve_tool(self, msg: M.Tool) -> None:
        """Run one tool call and answer it: ``tool_result`` with the value (or, for an async
        generator, its items on the ``resp_sid`` pipe), or ``tool_failed`` with what the guest may see."""
        self._tool_calls += 1
        upload: Body | None = None
        answered = False  # after the answer, the broker no longer waits for one
        try:
            args = list(msg.args) if isinstance(msg.args, (list, tuple)) else []
            if isinstance(msg.body, M.StreamRef) and msg.body.ep is not None:
                upload = self._open_body(msg.body.sid, msg.body.ep)
                args[min(msg.at, len(args)) : msg.at + 1] = [upload]
            t = self._tools.get(msg.name)
            if t is None:  # a named runtime resumed without this tool
                raise LookupError(f"this connection serves no tool {msg.name!r} for the runtime")
            limit = t.timeout or self.tool_timeout
            if t.stream:
                items = _items(msg.name, t.fn(*args), limit, self._tool_failed)
                self._ready[msg.resp_sid] = self._control.expect_pipe(msg.resp_sid)
                self._send(M.ToolResult(id=msg.id, rt=self.id, items=True))
                answered = True  # from now on the items (their pipe) say how it ends
                await self._produce_when_ready(msg.resp_sid, items)
                return
            clock = asyncio.timeout(limit)
            try:
                async with clock:
                    value = await t.fn(*args)
            except TimeoutError:
                if not clock.expired():
                    raise
                raise _TimedOut(msg.name, limit) from None
            result = marshalled(value, f"tools.{msg.name}: its result")  # within MAX_VALUE, so within a header
            self._send(M.ToolResult(id=msg.id, rt=self.id, value=result))  # packed as checked, not walked again
        except ToolError as exc:
            if not answered:
                self._reply_tool_error(msg.id, exc.name, exc.message)
        except asyncio.CancelledError:  # the guest gave up (or the runtime went): the broker stops waiting
            if not answered:
                self._reply_tool_error(msg.id, "Error", f"tools.{msg.name} was cancelled")
            raise
        except Exception as exc:
            name, message = self._tool_failed(msg.name, exc)
            if not answered:
                self._reply_tool_error(msg.id, name, message)
        finally:
            self._tool_calls -= 1
            if upload is not None and not upload.finished:
                upload.cancel()

    def _tool_failed(self, name: str, exc: BaseException) -> tuple[str, str]:
        """Log a tool's failure; what the guest may see of it (name, message)."""
        if isinstance(exc, _TimedOut):
            self._failures.log(logging.WARNING, f"runtime {self.id}: tool timeouts", "runtime %s: %s", self.id, exc)
            return "TimeoutError", str(exc)
        self._callback_failed("tool", exc, f" (tools.{name})")
        return "Error", f"tools.{name} failed"

    def _reply_tool_error(self, fid: int, name: str, message: str) -> None:
        self._send(M.error(P.E_TOOL_FAILED, message, fid, rt=self.id, name=name))

    def on_module(self, msg: M.Module) -> None:
        if self.lost is not None or self._modules is None:
            why = "this runtime has no module resolver" if self.lost is None else "the runtime is gone"
            self._send(M.error(P.E_MODULE_NOT_FOUND, why, msg.id, rt=self.id))
            return
        self._scope.spawn(self._resolve(msg), name="client-module")

    async def _resolve(self, msg: M.Module) -> None:
        """Answer one ``module`` callback. What the guest reads on failure is our text, never the
        resolver's exception (logged here with its traceback): untrusted code learns nothing of the host."""
        assert self._modules is not None
        what = f" on import {msg.specifier!r} from {msg.referrer or 'an eval'}"
        try:
            async with asyncio.timeout(self.module_timeout):
                module = await self._modules(msg.specifier, msg.referrer)
            if module is not None and not isinstance(module, Module):
                raise TypeError(f"the resolver returned {type(module).__name__}, not client.Module or None")
        except TimeoutError:
            log.warning(
                "runtime %s: the module resolver did not answer%s within %gs", self.id, what, self.module_timeout
            )
            why = f"the host's resolver did not answer within {self.module_timeout:g}s"
            self._send(M.error(P.E_MODULE_NOT_FOUND, why, msg.id, rt=self.id))
            return
        except Exception as exc:
            self._callback_failed("module resolver", exc, what)
            self._send(M.error(P.E_MODULE_NOT_FOUND, "the host's resolver failed", msg.id, rt=self.id))
            return
        except asyncio.CancelledError:
            self._send(M.error(P.E_MODULE_NOT_FOUND, "the import was cancelled", msg.id, rt=self.id))
            raise
        if module is None:
            self._send(M.error(P.E_MODULE_NOT_FOUND, "the host's resolver has no such module", msg.id, rt=self.id))
            return
        source = module.source.encode()
        assert module.kind is not None  # Module fills it in
        self._send(M.ModuleOk(id=msg.id, rt=self.id, url=module.url, kind=module.kind, source=source))

    def _reply_fetch_error(self, fid: int, message: str) -> None:
        self._send(M.error(P.E_FETCH_FAILED, message, fid, rt=self.id))

    def _send(self, msg: M.Record) -> None:
        with contextlib.suppress(Error):
            self._host.send(msg)

    # ---- loss --------------------------------------------------------------------------------------

    def on_lost(self, code: str, message: str) -> None:
        """The runtime is gone: every open body fails, every task stops, the control lease ends."""
        if self.lost is not None:
            return
        # the counts of failures not logged one by one, now (the summary may say up to a second more)
        self._failures.flush(time.monotonic() + self._failures.interval)
        self.lost = lost(code, message)
        # the runtime may live on without us (a named one kept for its session, when this
        # connection closes or is lost): the daemon must stop waiting for the bodies we produce and
        # stop sending those we read (the link delivers these cancels after it closes, see
        # ControlLink.close; a runtime really gone ignores them)
        for sid in [*self._outbound, *self._inbound]:
            self._control.cancel(sid)
        for stream in list(self._inbound.values()):
            stream.fail(message)
        self._scope.cancel()
        self._control.release()  # the daemon may be gone: the last lease closes the link


class _Traceback:
    """An exception's traceback as a log argument: formatted when (if) the line is written."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __str__(self) -> str:
        return "".join(traceback.format_exception(self.exc)).rstrip()


async def _unless_refused(call: Awaitable[R], upload: asyncio.Task[Error | None]) -> R:
    """The reply of ``call``, unless the request body's pipe could not be opened first: then that
    error (``call`` is cancelled; the caller tells the daemon to drop the dispatch)."""
    replied = asyncio.ensure_future(call)  # owner: this frame, which always joins it
    try:
        await asyncio.wait((replied, upload), return_when=asyncio.FIRST_COMPLETED)
        if not replied.done() and not upload.cancelled() and upload.exception() is None:
            refused = upload.result()
            if refused is not None:
                raise refused
        return await replied
    finally:
        if not replied.done():
            replied.cancel()
            await asyncio.gather(replied, return_exceptions=True)


class _TimedOut(Exception):
    def __init__(self, name: str, limit: float) -> None:
        super().__init__(f"tools.{name} timed out after {limit:g}s")


async def _items(
    name: str, gen: Any, limit: float, failed: Callable[[str, BaseException], tuple[str, str]]
) -> AsyncIterator[bytes]:
    """The pipe messages of an async generator tool's items (wire/tools.py), each awaited for at
    most ``limit`` seconds; its failure comes after the items before it. Closing this closes the
    tool's generator (its ``finally`` runs): the guest broke out of its loop, or the runtime went."""
    try:
        while True:
            clock = asyncio.timeout(limit)
            try:
                async with clock:
                    item = await anext(gen)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not clock.expired():
                    raise
                raise _TimedOut(name, limit) from None
            yield T.pack_item(item)
    except ToolError as exc:
        yield T.pack_failure(exc.name, exc.message)
    except Exception as exc:
        yield T.pack_failure(*failed(name, exc))
    finally:
        await gen.aclose()


def to_ms(seconds: float) -> int:
    """A time limit in whole milliseconds for the wire, rounded up: 0.4 ms is 1 ms, never 0 (which
    the daemon refuses); zero and negative limits stay as they are, to be refused as such."""
    return math.ceil(seconds * 1000) if seconds > 0 else int(seconds * 1000)
