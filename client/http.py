"""HTTP messages as the client API sees them, and the body that streams from a pipe.

A body is None, bytes, or an async iterable of bytes. Bodies that arrive from a runtime are
``Body`` objects: async iterables that pull one chunk from the pipe per step (that is the
backpressure), and that cancel the producer when closed early.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from client.errors import StreamError
from wire.pipes import PipeReader
from wire.pipes import StreamError as PipeStreamError

BodyType = bytes | bytearray | memoryview | AsyncIterable[bytes] | None
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]] | None


def make_headers(headers: HeadersLike) -> CIMultiDict[str]:
    if headers is None:
        return CIMultiDict()
    if isinstance(headers, CIMultiDict):
        return headers
    items = headers.items() if hasattr(headers, "items") else headers
    return CIMultiDict((str(k), str(v)) for k, v in items)  # type: ignore[union-attr]


def header_pairs(headers: CIMultiDict[str]) -> list[list[str]]:
    return [[k, v] for k, v in headers.items()]


class Body:
    """A body arriving from a runtime: iterate it, ``read()`` it whole, or ``aclose()`` it early."""

    def __init__(
        self,
        reader: PipeReader | None = None,
        data: bytes | None = None,
        on_cancel: Callable[[], None] | None = None,
        on_done: Callable[[Body], None] | None = None,
    ) -> None:
        self._reader = reader
        self._data = data
        self._on_cancel = on_cancel
        self._on_done = on_done
        self.finished = reader is None and data is None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read_chunk(self) -> bytes | None:
        """The next chunk as it was produced, or None at the end."""
        if self.finished:
            return None
        if self._reader is None:
            data, self._data = self._data, None
            self._done()
            return data or None
        try:
            chunk = await self._reader.read()
        except PipeStreamError as exc:
            self._done()
            raise StreamError(str(exc)) from None
        if chunk is None:
            self._done()
        return chunk

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self.read_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _done(self) -> None:
        if not self.finished:
            self.finished = True
            if self._on_done is not None:
                self._on_done(self)

    async def aclose(self) -> None:
        """Stop reading: the producer is told to cancel (an upstream HTTP connection is closed)."""
        self.cancel()

    def cancel(self) -> None:
        if self.finished:
            return
        if self._reader is not None:
            self._reader.abort(PipeStreamError("the body was closed by its reader"))
            if self._on_cancel is not None:
                self._on_cancel()
        self._done()

    def __del__(self) -> None:
        # an abandoned, unfinished body must not keep its pipe (and the producer) open forever
        if not self.finished and self._reader is not None:
            with contextlib.suppress(Exception):
                self.cancel()

    def abort(self, reason: str) -> None:
        """The producer is gone (runtime or daemon lost): a pending read raises StreamError."""
        if not self.finished and self._reader is not None:
            self._reader.abort(PipeStreamError(reason))


@dataclass
class Request:
    method: str
    url: str
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: BodyType = None
    redirect: str = "follow"

    def __post_init__(self) -> None:
        self.method = self.method.upper()
        self.headers = make_headers(self.headers)

    async def read(self) -> bytes:
        return await read_body(self.body)


@dataclass
class Response:
    status: int = 200
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: BodyType = None
    status_text: str = ""
    url: str = ""
    redirected: bool = False

    def __post_init__(self) -> None:
        self.headers = make_headers(self.headers)

    async def read(self) -> bytes:
        return await read_body(self.body)

    async def text(self, encoding: str = "utf-8") -> str:
        return (await self.read()).decode(encoding)

    async def json(self) -> Any:
        return json.loads(await self.read())

    async def aclose(self) -> None:
        await close_body(self.body)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def read_body(body: BodyType) -> bytes:
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    return b"".join([bytes(c) async for c in body])


async def close_body(body: BodyType) -> None:
    aclose: Callable[[], Awaitable[None]] | None = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
