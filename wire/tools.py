"""Host tools: the names a runtime's ``tools`` object may hold, and the items of a streamed tool.

One place for the rules both the client (before it sends ``create_runtime``) and the daemon (on
receiving it) apply: a tool name is an ASCII JavaScript identifier that shadows nothing the guest
already has (a global of its global object, something the bootstrap hides, or a property every
object inherits, which would break ``tools`` itself). ``GUEST_GLOBALS`` is the guest's global
object as Deno and bootstrap.js make it; tests/test_tools.py checks it against a real runtime, so
a new global cannot be shadowed silently.

Items of an async generator tool travel on the call's pipe, one pipe message per item, each a
msgpack array: ``[0, value]`` an item, ``[1, name, message]`` the error the guest sees after the
items before it (then END). The daemon turns each into one guest-channel chunk (bootstrap.js,
section tools).
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

from wire import values as V

#: Characters of a tool name.
MAX_TOOL_NAME = 64
#: Tools one runtime may have.
MAX_TOOLS = 128
#: Seconds a tool call (or, for an async generator, the wait for each item) may take by default.
TOOL_TIMEOUT = 30.0

_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")

#: Own properties of the guest's global object (``Object.getOwnPropertyNames(globalThis)``).
GUEST_GLOBALS = frozenset(
    """AbortController AbortSignal AggregateError Array ArrayBuffer AsyncDisposableStack Atomics BigInt
    BigInt64Array BigUint64Array Blob Boolean BroadcastChannel ByteLengthQueuingStrategy Cache CacheStorage
    CloseEvent CompressionStream CountQueuingStrategy Crypto CryptoKey CustomEvent DOMException DOMMatrix
    DOMMatrixReadOnly DOMPoint DOMPointReadOnly DOMQuad DOMRect DOMRectReadOnly DataView Date
    DecompressionStream DisposableStack Error ErrorEvent EvalError Event EventSource EventTarget File
    FileReader FinalizationRegistry Float16Array Float32Array Float64Array FormData Function Headers
    ImageBitmap ImageBitmapRenderingContext ImageData Infinity Int16Array Int32Array Int8Array Intl Iterator
    JSON Location Lock LockManager Map Math MessageChannel MessageEvent MessagePort NaN Navigator
    NavigatorUAData Number Object OffscreenCanvas Performance PerformanceEntry PerformanceMark
    PerformanceMeasure PerformanceObserver PerformanceObserverEntryList ProgressEvent Promise
    PromiseRejectionEvent Proxy QuotaExceededError RangeError ReadableByteStreamController ReadableStream
    ReadableStreamBYOBReader ReadableStreamBYOBRequest ReadableStreamDefaultController
    ReadableStreamDefaultReader ReferenceError Reflect RegExp Request Response Set SharedArrayBuffer Storage
    String SubtleCrypto SuppressedError Symbol SyntaxError Temporal TextDecoder TextDecoderStream TextEncoder
    TextEncoderStream TransformStream TransformStreamDefaultController TypeError URIError URL URLPattern
    URLSearchParams Uint16Array Uint32Array Uint8Array Uint8ClampedArray WeakMap WeakRef WeakSet WebAssembly
    WebSocket Window WritableStream WritableStreamDefaultController WritableStreamDefaultWriter atob btoa
    clearInterval clearTimeout closed console createImageBitmap crypto decodeURI decodeURIComponent encodeURI
    encodeURIComponent escape eval fetch globalThis isFinite isNaN location name navigator onbeforeunload
    onerror onload onunhandledrejection onunload parseFloat parseInt performance queueMicrotask reportError
    self serve setInterval setTimeout structuredClone undefined unescape""".split()
)
#: What the bootstrap hides (a tool must not bring a name back), the tools object's own name, and
#: what every object inherits (``then`` would make ``tools`` a thenable).
RESERVED = frozenset(
    """process Deno Worker alert confirm prompt close localStorage sessionStorage caches Buffer global
    setImmediate clearImmediate require window tools constructor hasOwnProperty isPrototypeOf
    propertyIsEnumerable toLocaleString toString valueOf __proto__ __defineGetter__ __defineSetter__
    __lookupGetter__ __lookupSetter__ then""".split()
)


def name_error(name: object) -> str:
    """Why ``name`` cannot be a tool name ("" if it can)."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or len(name) > MAX_TOOL_NAME:
        return (
            f"tool name {name!r} is not a JavaScript identifier (ASCII letters, digits, _ and $, "
            f"not starting with a digit, at most {MAX_TOOL_NAME} characters)"
        )
    if name in GUEST_GLOBALS or name in RESERVED:
        return f"tool name {name!r} would shadow the guest's own {name!r}; choose another name"
    return ""


def check_names(names: list[str]) -> None:
    """Raise ValueError naming the first tool name that cannot be used, or too many tools."""
    if len(names) > MAX_TOOLS:
        raise ValueError(f"{len(names)} tools; a runtime may have at most {MAX_TOOLS}")
    if len(set(names)) != len(names):
        raise ValueError("a tool name is given twice")
    for name in names:
        why = name_error(name)
        if why:
            raise ValueError(why)


# ---- the items of a streamed tool, one pipe message each -------------------------------------------

ITEM = 0
FAILED = 1


def pack_item(value: Any) -> bytes:
    """One item as its pipe message; TypeError naming the path of what cannot be sent, ValueError
    (wire.values.TooLarge) past MAX_VALUE."""
    data: bytes = msgpack.packb([ITEM, V.encode(value, "the item")], use_bin_type=True)
    if len(data) > V.MAX_VALUE:
        raise V.TooLarge(f"an item takes {len(data)} bytes marshalled; the limit is {V.MAX_VALUE} (yield less at once)")
    return data


def pack_failure(name: str, message: str) -> bytes:
    """The error the guest's iteration throws after the items before it."""
    return msgpack.packb([FAILED, name, message], use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: Any) -> tuple[bool, Any]:
    """``(True, value)`` for an item, ``(False, (name, message))`` for the failure; ValueError if
    ``data`` is neither."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"unreadable tool item: {exc}") from None
    if isinstance(msg, list) and len(msg) == 2 and msg[0] == ITEM:
        return True, V.decode(msg[1], "the item")
    if isinstance(msg, list) and len(msg) == 3 and msg[0] == FAILED and all(isinstance(s, str) for s in msg[1:]):
        return False, (msg[1], msg[2])
    raise ValueError("a tool item is neither [0, value] nor [1, name, message]")
