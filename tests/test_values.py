"""The one marshalling of values (issue 10 section 1; protocol.md "Values"), on every hop.

Guest -> host through real runtimes (an eval's default export), host -> guest as pure tests of
daemon/values.py plus bootstrap.js's own packValue/unpackValue run by Deno on a tree the daemon's
to_guest made, and the msgpack hop (wire/values.py, the VALUE field kind) sans-I/O.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import client


def same(a: Any, b: Any) -> bool:
    """Equal, type for type (1 is not 1.0 is not True), NaN equal to NaN and -0.0 unlike 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# guest expression -> the Python value eval returns: one row per rule
GUEST_TO_HOST: list[tuple[str, Any]] = [
    ("null", None),
    ("undefined", None),
    ("true", True),
    ("false", False),
    ("42", 42),
    ("-(2 ** 53 - 1)", -(2**53 - 1)),
    ("2 ** 53", float(2**53)),  # not a safe integer: a float
    ("1e21", 1e21),
    ("1.5", 1.5),
    ("NaN", math.nan),
    ("Infinity", math.inf),
    ("-Infinity", -math.inf),
    ("-0", -0.0),
    ("5n", 5),
    ("2n ** 70n", 2**70),
    ("-(2n ** 200n) + 1n", -(2**200) + 1),
    ("'plain ü €'", "plain ü €"),
    ("'a\\ud800b'", "a\ufffdb"),  # a lone surrogate: U+FFFD
    ("'\\ud83d\\ude00'", "\U0001f600"),  # a pair is the character it encodes
    ("new Uint8Array([0, 1, 255])", b"\x00\x01\xff"),
    ("new Uint8Array(new ArrayBuffer(8), 2, 3).fill(7)", b"\x07\x07\x07"),  # a view: its bytes only
    ("new Date(Date.UTC(2024, 1, 29, 12, 30, 15, 250))", datetime(2024, 2, 29, 12, 30, 15, 250000, tzinfo=UTC)),
    ("new Date(-62135596800000)", datetime(1, 1, 1, tzinfo=UTC)),
    ("[1, 'two', [3n, null], undefined, , 6]", [1, "two", [3, None], None, None, 6]),
    ("{ b: 1, a: { c: [] }, 'odd key': undefined }", {"b": 1, "a": {"c": []}, "odd key": None}),
    ("{ $: 'not a tag', v: 1 }", {"$": "not a tag", "v": 1}),
    ("Object.assign(Object.create(null), { x: 1 })", {"x": 1}),
    ("{ ['__proto__']: 1 }", {"__proto__": 1}),
    ("{ k: new Uint8Array(3), j: [new Uint8Array([9]), new Uint8Array(0)] }", {"k": b"\0\0\0", "j": [b"\t", b""]}),
]


async def test_every_guest_value_reaches_the_host_by_the_rules(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    try:
        for expr, expected in GUEST_TO_HOST:
            got = await rt.eval(f"export default ({expr});")
            assert same(got, expected), f"{expr}: {got!r} is not {expected!r}"
        assert await rt.eval("const x = 1;") is None  # no default export
    finally:
        await rt.dispose()
