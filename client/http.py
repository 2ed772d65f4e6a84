"""HTTP messages as the client API sees them.

A body is None, bytes, or an async iterable of bytes. Bodies that arrive from a runtime are
``client.Body`` objects (client.bodies): async iterables that pull one chunk from the pipe per
step (that is the backpressure), and that cancel the producer when closed early.

A Request's method, URL and headers and a Response's status text and headers are checked when it
is made (``wire.http``: tokens, no CR/LF/NUL), so an invalid head raises ``wire.http.HeadError``
(a ValueError) instead of reaching a socket; glue.py checks again right before sending.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from wire import http as H

BodyType = bytes | bytearray | memoryview | AsyncIterable[bytes] | None
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]] | None
#: A Request's redirect modes (the fetch standard's); the guest's Request.redirect says which.
REDIRECT_MODES = ("follow", "manual", "error")


def check_body(body: object, what: str) -> None:
    """Refuse a body that is not one (a str, a dict, a sync iterable) where it is made, with a
    TypeError that says what would do, instead of a failure deep in a stream later."""
    if body is None or isinstance(body, (bytes, bytearray, memoryview)) or hasattr(body, "__aiter__"):
        return
    hint = " (encode it: body=text.encode())" if isinstance(body, str) else ""
    raise TypeError(f"{what} body must be bytes, an async iterable of bytes or None, not {type(body).__name__}{hint}")


def make_headers(headers: HeadersLike) -> CIMultiDict[str]:
    if headers is None:
        return CIMultiDict()
    if isinstance(headers, CIMultiDict):
        return headers
    items = headers.items() if isinstance(headers, Mapping) else headers
    return CIMultiDict((str(k), str(v)) for k, v in items)


@dataclass(init=False)
class Request:
    """An HTTP request: ``headers`` may be given as a mapping or (name, value) pairs, and is a
    CIMultiDict from then on (hence an explicit ``__init__``: the types in and out differ)."""

    method: str
    url: str
    headers: CIMultiDict[str]
    body: BodyType
    redirect: str

    def __init__(
        self, method: str, url: str, headers: HeadersLike = None, body: BodyType = None, redirect: str = "follow"
    ) -> None:
        self.method, self.url, self.body, self.redirect = method, url, body, redirect
        self.headers = make_headers(headers)
        self._check()

    def _check(self) -> None:
        if not isinstance(self.method, str) or not isinstance(self.url, str):
            kinds = f"{type(self.method).__name__}, {type(self.url).__name__}"
            raise TypeError(f"a Request's method and url are str, not {kinds}")
        self.method = self.method.upper()
        if self.redirect not in REDIRECT_MODES:
            raise ValueError(f"a Request's redirect is one of {', '.join(REDIRECT_MODES)}, not {self.redirect!r}")
        check_body(self.body, "a Request's")
        H.check_request_head(self.method, self.url, self.headers.items())  # wire.http.HeadError

    async def read(self) -> bytes:
        return await read_body(self.body)


@dataclass(init=False)
class Response:
    """An HTTP response (``headers`` as for Request)."""

    status: int
    headers: CIMultiDict[str]
    body: BodyType
    status_text: str
    url: str
    redirected: bool

    def __init__(
        self,
        status: int = 200,
        headers: HeadersLike = None,
        body: BodyType = None,
        status_text: str = "",
        url: str = "",
        redirected: bool = False,
    ) -> None:
        self.status, self.body, self.status_text, self.url, self.redirected = status, body, status_text, url, redirected
        self.headers = make_headers(headers)
        self._check()

    def _check(self) -> None:
        if not isinstance(self.status, int) or isinstance(self.status, bool):
            raise TypeError(f"a Response's status is an int, not {type(self.status).__name__}")
        check_body(self.body, "a Response's")
        H.check_response_head(self.status_text, self.headers.items())  # wire.http.HeadError

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
