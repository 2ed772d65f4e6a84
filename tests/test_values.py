"""The one marshalling of values (issue 10 section 1; protocol.md "Values"), on every hop.

Guest -> host through real runtimes (an eval's default export), host -> guest as pure tests of
daemon/values.py plus bootstrap.js's own packValue/unpackValue run by Deno on a tree the daemon's
to_guest made, and the msgpack hop (wire/values.py, the VALUE field kind) sans-I/O.
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import deno
import msgpack
import pytest

import client
from daemon import values as DV
from wire import messages as M
from wire import protocol as P
from wire import schema
from wire import values as V

ROOT = Path(__file__).resolve().parent.parent


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


# guest expression -> (error name, text the message holds): refused by the guest, naming the path
REFUSED: list[tuple[str, str, str]] = [
    ("{ a: [1, () => 1] }", "TypeError", "the default export.a[1] is a function"),
    ("[Symbol('s')]", "TypeError", "the default export[0] is a symbol"),
    ("new Map([['a', 1]])", "TypeError", "the default export is a Map"),
    ("{ s: new Set() }", "TypeError", "the default export.s is a Set"),
    ("{ 'odd key': new (class Point {})() }", "TypeError", 'the default export["odd key"] is a Point'),
    ("(() => { const o = { x: {} }; o.x.back = o; return o; })()", "TypeError", "the default export.x.back is a cycle"),
    # a long path keeps its end
    (
        "(() => { let v = [() => 1]; for (let i = 0; i < 99; i++) v = { k: v }; return v; })()",
        "TypeError",
        "the default export…" + ".k" * 58 + "[0] is a function",
    ),
    ("new Float32Array(2)", "TypeError", "is a Float32Array (send a Uint8Array of its bytes)"),
    ("new ArrayBuffer(2)", "TypeError", "is an ArrayBuffer (send a Uint8Array of its bytes)"),
    ("new DataView(new ArrayBuffer(2))", "TypeError", "is a DataView (send a Uint8Array of its bytes)"),
    ("new Uint8ClampedArray(1)", "TypeError", "is a Uint8ClampedArray"),
    ("new Date(NaN)", "TypeError", "the default export is an invalid Date"),
    ("new Date(Date.UTC(10000, 0, 1))", "TypeError", "is a Date outside years 1..9999"),
    ("new URL('http://x/')", "TypeError", "the default export is an URL"),
    ("new Error('e')", "TypeError", "the default export is an Error"),
    ("[Promise.resolve(1)]", "TypeError", "the default export[0] is a Promise"),
    ("'x'.repeat(50000)", "RangeError", "too large to send"),
    ("new Uint8Array(50000)", "RangeError", "too large to send"),
    (
        "(() => { let v = []; for (let i = 0; i < 129; i++) v = [v]; return v; })()",
        "RangeError",
        "the default export is nested more than 128 levels deep",
    ),
    # shared references are copied (as JSON would): a DAG that doubles at every level stops at the bound
    ("(() => { let v = [1]; for (let i = 0; i < 60; i++) v = [v, v]; return v; })()", "RangeError", "too large"),
    ("new Array(1e9)", "RangeError", "too large"),
    # small as JSON but large as msgpack (a float is 9 bytes there): the daemon refuses it, clearly
    ("new Array(10000).fill(0.5)", "RangeError", "takes 90003 bytes marshalled; the limit is 49152"),
]


async def test_what_breaks_the_rules_is_a_clear_error_and_the_runtime_lives(conn: client.Connection) -> None:
    rt = await conn.create_runtime()
    try:
        for expr, name, text in REFUSED:
            with pytest.raises(client.GuestError) as info:
                await rt.eval(f"export default ({expr});")
            assert (info.value.name, text in info.value.message) == (name, True), f"{expr}: {info.value}"
        # the bounds themselves still pass: 128 levels, and bytes up to the limit as one raw blob
        deep = await rt.eval("let v = []; for (let i = 0; i < 127; i++) v = [v]; export default v;")
        for _ in range(127):
            (deep,) = deep
        assert deep == []
        big = await rt.eval("export default { data: new Uint8Array(48000).fill(1) };")
        assert big == {"data": b"\x01" * 48000}
    finally:
        await rt.dispose()


async def test_bytes_are_taken_when_met_though_a_getter_resizes_or_detaches_them(conn: client.Connection) -> None:
    """packValue copies a Uint8Array when the walk meets it: a getter met later that grows, shrinks
    or detaches its buffer cannot shift the bytes of the blobs after it (which then arrived as
    another array's bytes), and a detached one is empty bytes, not a failure after the tool call
    was counted (that call then stayed pending in the guest for the runtime's life)."""

    async def echo(value: Any) -> Any:
        return value

    async with await conn.create_runtime(tools={"echo": echo}) as rt:
        source = """
            const detach = (bytes) => structuredClone(bytes.buffer, { transfer: [bytes.buffer] });
            const value = () => {
              const ab = new ArrayBuffer(2, { maxByteLength: 16 });
              const grown = new Uint8Array(ab); grown.set([1, 2]);
              const gone = new Uint8Array([5, 6, 7]);
              const dead = new Uint8Array(4); detach(dead);
              return { grown, get x() { ab.resize(6); return 0; }, nine: new Uint8Array([9, 9]),
                gone, get y() { detach(gone); return 0; }, eight: new Uint8Array([8]), dead };
            };
            export default [value(), await tools.echo(value())];
        """
        want = {
            "grown": b"\x01\x02",
            "x": 0,
            "nine": b"\t\t",
            "gone": b"\x05\x06\x07",
            "y": 0,
            "eight": b"\x08",
            "dead": b"",
        }
        as_result, through_tool = await rt.eval(source)
        assert as_result == want and through_tool == want
        assert (await rt.stats())["guest"]["tools"] == 0


async def test_a_guest_that_patches_intrinsics_cannot_change_what_its_value_says(conn: client.Connection) -> None:
    """packValue reads values only through intrinsics it captured before guest code ran."""
    rt = await conn.create_runtime()
    try:
        value = await rt.eval("""
            Object.defineProperty(Array.prototype, "0", { set() { throw new Error("array setter ran"); } });
            Object.defineProperty(Object.prototype, "$", { set() { throw new Error("object setter ran"); } });
            Array.prototype[Symbol.iterator] = function* () { yield "forged"; };
            Object.keys = () => ["forged"];
            Date.prototype.getTime = () => 0;
            BigInt.prototype.toString = () => "forged";
            String.prototype.toWellFormed = () => "forged";
            Object.defineProperty(Uint8Array, Symbol.hasInstance, { value: () => false });
            JSON.stringify = () => "forged";
            export default [{ $: 1, ["__proto__"]: [2] }, 2n ** 64n, new Date(86400000), "\\ud800", Uint8Array.of(5)];
        """)
        assert value == [{"$": 1, "__proto__": [2]}, 2**64, datetime(1970, 1, 2, tzinfo=UTC), "\ufffd", b"\x05"]
    finally:
        await rt.dispose()


# ---- host -> guest: daemon/values.py's tree, read by bootstrap.js's own unpackValue ----------------
# No guest op takes a value from the host yet (host tools will: i10-tools tests that round trip in
# real runtimes). Until then bootstrap.js's values section runs in Deno directly: the whole
# bootstrap, without its last two lines (ready + read loop), plus a harness that unpacks each tree,
# describes what the guest sees, and packs it back for daemon/values.py's from_guest.

# Python value -> (what the guest sees, what comes back to Python)
HOST_TO_GUEST: list[tuple[Any, Any, Any]] = [
    (None, "null", None),
    (True, "boolean:true", True),
    (42, "number:42", 42),
    (2**53 - 1, "number:9007199254740991", 2**53 - 1),
    (2**53, "bigint:9007199254740992", 2**53),  # beyond 2^53: a BigInt
    (-(2**70), "bigint:-1180591620717411303424", -(2**70)),
    (1.5, "number:1.5", 1.5),
    (2.0, "number:2", 2),  # an integral float is a JS number like any other: it comes back an int
    (math.nan, "number:NaN", math.nan),
    (math.inf, "number:Infinity", math.inf),
    (-math.inf, "number:-Infinity", -math.inf),
    (-0.0, "number:-0", -0.0),
    ("ü € \U0001f600", "string:ü € \U0001f600", "ü € \U0001f600"),
    ("a\ud800b", "string:a\ufffdb", "a\ufffdb"),  # a lone surrogate in a Python str: U+FFFD
    (b"\x00\xff", "Uint8Array:0,255", b"\x00\xff"),
    (bytearray(b"ab"), "Uint8Array:97,98", b"ab"),
    (b"", "Uint8Array:", b""),
    (
        datetime(2024, 2, 29, 12, 30, 15, 250999, tzinfo=timezone(timedelta(hours=2))),
        "Date:2024-02-29T10:30:15.250Z",  # milliseconds, UTC
        datetime(2024, 2, 29, 10, 30, 15, 250000, tzinfo=UTC),
    ),
    ((1, [2, b"x"]), ["number:1", ["number:2", "Uint8Array:120"]], [1, [2, b"x"]]),
    (
        {"$": "n", "v": "ff", "__proto__": {"z": b"yz"}},  # looks like a tag, is a dict; a key named __proto__
        {"$": "string:n", "v": "string:ff", "__proto__": {"z": "Uint8Array:121,122"}},
        {"$": "n", "v": "ff", "__proto__": {"z": b"yz"}},
    ),
]

HARNESS = """
MAX_VALUE = %d; MAX_VALUE_DEPTH = %d;
const shape = (x) => {
  if (x === null) return "null";
  if (typeof x !== "object") return `${typeof x}:${Object.is(x, -0) ? "-0" : String(x)}`;
  if (x instanceof Uint8Array) return `Uint8Array:${Array.from(x).join(",")}`;
  if (x instanceof Date) return `Date:${x.toISOString()}`;
  if (Array.isArray(x)) return x.map(shape);
  if (Object.getPrototypeOf(x) !== Object.prototype) return "not a plain object";
  return Object.fromEntries(Object.keys(x).map((k) => [k, shape(x[k])]));
};
const out = [];
// a caller that must not fail (console) gets stand-ins for what cannot be sent, and still the bounds
const replaced = packValue({ f() {}, m: new Map(), ok: [1n] }, "arg 0", (v, what) => `<${typeof v}> ${what}`);
const big = (() => { try { packValue([() => 1, "x".repeat(%d)], "x", () => "f"); return "sent"; } catch (e) { return e.name; } })();
out.push({ shape: replaced.v, v: big, body: [] });
for (const [tree, body] of JSON.parse(%s)) { // as the read loop does: JSON, not a JS literal
  const x = unpackValue(tree, new Uint8Array(body));
  const { v, blobs } = packValue(x, "back");
  out.push({ shape: shape(x), v, body: Array.from(blobsBody(blobs) ?? []) });
}
const bytes = enc.encode(JSON.stringify(out));
writeAll(bytes, 0, bytes.length);
exit(0);
"""


def run_values_in_deno(tmp_path: Path, cases: list[tuple[Any, bytes]]) -> list[dict[str, Any]]:
    source = (ROOT / "daemon" / "bootstrap.js").read_text()
    tail = 'send({ op: "ready" });\nreadLoop();\n'
    assert source.endswith(tail), "bootstrap.js no longer ends by starting its read loop"
    payload = json.dumps([[tree, list(body)] for tree, body in cases])
    script = tmp_path / "values_harness.js"
    script.write_text(
        source[: -len(tail)] + HARNESS % (V.MAX_VALUE, V.MAX_VALUE_DEPTH, V.MAX_VALUE, json.dumps(payload))
    )
    argv = [deno.find_deno_bin(), "run", "--no-remote", "--no-npm", "--no-config", "--no-lock", "--quiet", str(script)]
    env = {"DENO_DIR": str(tmp_path / "deno"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(argv, capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_host_value_reaches_the_guest_by_the_rules_and_comes_back(tmp_path: Path) -> None:
    # the last tree did not come from to_guest: the guest's packValue makes its lone surrogate U+FFFD
    cases = [DV.to_guest(value) for value, _, _ in HOST_TO_GUEST] + [(["a\ud800b"], b"")]
    replaced, *results, raw = run_values_in_deno(tmp_path, cases)
    assert replaced["shape"] == {
        "f": "<function> arg 0.f is a function",
        "m": "<object> arg 0.m is a Map",
        "ok": [{"$": "n", "v": "1"}],
    }
    assert replaced["v"] == "RangeError"
    assert raw["v"] == ["a\ufffdb"]
    for (value, seen, back), result in zip(HOST_TO_GUEST, results, strict=True):
        assert result["shape"] == seen, f"{value!r}: the guest sees {result['shape']!r}"
        got = DV.from_guest(result["v"], bytes(result["body"]))
        assert same(got, back), f"{value!r} came back as {got!r}"


# ---- sans-I/O: wire/values.py (the msgpack hop) and daemon/values.py (the guest channel) ----------


class Thing:
    pass


def wrap(inner: Any, levels: int) -> Any:
    """``inner`` inside ``levels`` lists."""
    for _ in range(levels):
        inner = [inner]
    return inner


def nest(levels: int) -> list[Any]:
    """Lists nested ``levels`` deep."""
    return wrap([], levels - 1)  # type: ignore[no-any-return]


PYTHON_VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,  # the ends of msgpack's own ints
    2**64,
    -(2**63) - 1,
    10**400,  # beyond both ends: ext type 1, any size (past Python's 4300-digit str limit too)
    -(10**400),
    0.1,
    math.nan,
    -0.0,
    math.inf,
    "text ü",
    b"\x00raw",
    [],
    {},
    {"k": [1, {"n": None}], "$": "not a tag"},
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1969, 7, 20, 20, 17, 40, 123456, tzinfo=UTC),
]


@pytest.mark.parametrize("value", PYTHON_VALUES, ids=repr)
def test_values_cross_msgpack_records_unchanged(value: Any) -> None:
    frames = M.EvalOk(id=1, value=value).frames()
    got = schema.from_header(M.EvalOk, schema.header_of(frames), frames[1:]).value
    assert same(got, value), f"{value!r} came back as {got!r}"
    # the ext types with a plain msgpack unpacker too: ext_hook for big ints, timestamp=3 for datetimes
    plain = msgpack.unpackb(frames[0], ext_hook=V.ext_hook, timestamp=3).get("value")
    assert same(plain, value)


def test_what_the_ext_types_look_like() -> None:
    assert msgpack.packb(2**64, default=V.default) == msgpack.packb(msgpack.ExtType(1, b"\x01" + bytes(8)))
    assert msgpack.packb(-(2**63) - 1, default=V.default) == msgpack.packb(
        msgpack.ExtType(1, b"\xff\x7f" + b"\xff" * 7)
    )
    assert V.ext_hook(1, b"\xff") == -1 and V.ext_hook(1, b"\x00\x80") == 128
    dt = datetime(2020, 1, 1, tzinfo=UTC)
    assert msgpack.packb(dt, default=V.default) == msgpack.packb(dt, datetime=True)  # msgpack's timestamp
    with pytest.raises(ValueError, match="unknown msgpack ext type 5"):
        V.ext_hook(5, b"")
    with pytest.raises(TypeError):
        msgpack.packb(object(), default=V.default)


def test_host_values_are_taken_as_their_base_type() -> None:
    class Key(str):
        pass

    class Mapping(dict):  # type: ignore[type-arg]
        pass

    value = Mapping({Key("k"): (1, bytearray(b"a"), memoryview(b"b")), "s": "\ud83d\ude00\udfff"})
    assert same(V.decode(V.encode(value)), {"k": [1, b"a", b"b"], "s": "\U0001f600\ufffd"})


# Python value -> the error the host gets trying to send it: path, and what it is
HOST_REFUSALS: list[tuple[Any, type[Exception], str]] = [
    ({"a": [1, Thing()]}, TypeError, "argument 0.a[1] is a Thing: only None, bool, int"),
    ([{1, 2}], TypeError, "argument 0[0] is a set"),
    ({"x": {1: "a"}}, TypeError, "argument 0.x has a key that is an int: dict keys must be str"),
    ({"odd key": datetime(2020, 1, 1)}, TypeError, 'argument 0["odd key"] is a naive datetime (give it a tzinfo'),
    ([print], TypeError, "argument 0[0] is a builtin_function_or_method"),
    (complex(1, 2), TypeError, "argument 0 is a complex"),
    (wrap({"k": {1}}, 99), TypeError, "argument 0…" + "[0]" * 39 + ".k is a set"),  # a long path: its last steps
]


def test_what_the_host_cannot_send_is_a_type_error_naming_the_path() -> None:
    for value, exc, text in HOST_REFUSALS:
        for send in (V.check, V.encode, DV.to_guest):
            with pytest.raises(exc) as info:
                send(value, "argument 0")
            assert text in str(info.value), f"{send.__qualname__}({value!r}): {info.value}"
    with pytest.raises(TypeError, match="is a Thing"):
        M.EvalOk(id=1, value=Thing()).frames()  # a record never carries an unmarshallable value


def test_the_bounds_hold_on_the_host_side_both_ways() -> None:
    assert V.check(nest(V.MAX_VALUE_DEPTH)) > 0
    for send in (V.check, V.encode, lambda v: DV.to_guest(v)):
        with pytest.raises(V.TooDeep, match="the value is nested more than 128 levels deep"):
            send(nest(V.MAX_VALUE_DEPTH + 1))
    assert V.check(b"x" * (V.MAX_VALUE - 3)) == V.MAX_VALUE  # bin 16: 3 bytes of header
    with pytest.raises(V.TooLarge, match="the value takes 49153 bytes marshalled; the limit is 49152"):
        V.check(b"x" * (V.MAX_VALUE - 2))
    with pytest.raises(V.TooLarge, match="the limit is 49152"):
        DV.to_guest(["x" * 30000, b"y" * 20000])  # the tree's JSON plus its blobs
    tree, body = DV.to_guest(["x" * 30000, b"y" * 18000])
    assert body == b"y" * 18000 and tree == ["x" * 30000, {"$": "b", "o": 0, "n": 18000}]
    # what a peer sends is checked as it is read: too deep, or an ext type nobody defined
    for header in ({"v": 1, "t": "ok", "id": 1, "value": nest(V.MAX_VALUE_DEPTH + 1)},
                   {"v": 1, "t": "ok", "id": 1, "value": [msgpack.ExtType(9, b"")]},
                   {"v": 1, "t": "ok", "id": 1, "value": {"a": {b"bytes key": 1}}}):  # fmt: skip
        frames = [msgpack.packb(header, use_bin_type=True)]
        with pytest.raises(P.ProtocolError) as info:
            schema.from_header(M.EvalOk, schema.header_of(frames), [])
        assert info.value.code == P.E_BAD_MESSAGE and "'value'" in info.value.message


# (tree, body) from the guest -> the Python value: the daemon reads it by the rules
FROM_GUEST: list[tuple[Any, bytes, Any]] = [
    (2**53 - 1, b"", 2**53 - 1),
    (2**60, b"", float(2**60)),  # a JS number past 2^53 written as digits is a float
    ({"$": "n", "v": "-" + "f" * 5000}, b"", -(16**5000 - 1)),
    ({"$": "f", "v": "-0"}, b"", -0.0),
    ({"$": "d", "v": 1.5}, b"", datetime(1970, 1, 1, 0, 0, 0, 1500, tzinfo=UTC)),
    ([{"$": "b", "o": 2, "n": 1}, {"$": "b", "o": 0, "n": 2}], b"abc", [b"c", b"ab"]),  # by offset
    ({"$": "o", "v": {"$": {"$": "f", "v": "NaN"}}}, b"", {"$": math.nan}),
    ({"k\ud800": "v\udfff"}, b"", {"k\ufffd": "v\ufffd"}),
]

# (tree, body) no bootstrap sends: refused, naming where
FROM_GUEST_REFUSED: list[tuple[Any, bytes, str]] = [
    ({"$": "b", "o": 1, "n": 3}, b"abc", 'the value is not a value: {"$": "b"'),
    ({"a": [{"$": "b", "o": -1, "n": 1}]}, b"abc", "the value.a[0] is not a value"),
    ({"$": "x", "v": 1}, b"", "is not a value"),
    ({"$": "n", "v": "0xzz"}, b"", "is not a value"),
    ({"$": "f", "v": "nan"}, b"", "is not a value"),
    ({"$": "d", "v": 8.64e15}, b"", "the value is a date outside years 1..9999"),
    ({"$": "d", "v": "2020-01-01"}, b"", "is not a value"),
    ({"$": "o", "v": [1]}, b"", "is not a value"),
    (nest(V.MAX_VALUE_DEPTH + 1), b"", "the value is nested more than 128 levels deep"),
    ([], bytes(V.MAX_VALUE + 1), "49153 bytes of blobs; the limit is 49152"),
]


def test_the_daemon_reads_guest_trees_by_the_rules_and_refuses_malformed_ones() -> None:
    for tree, body, expected in FROM_GUEST:
        got = DV.from_guest(tree, body)
        assert same(got, expected), f"{tree!r}: {got!r}"
    for tree, body, text in FROM_GUEST_REFUSED:
        with pytest.raises(ValueError) as info:
            DV.from_guest(tree, body)
        assert text in str(info.value), f"{str(tree)[:80]}: {info.value}"
    with pytest.raises(V.TooDeep):
        DV.from_guest({"$": "o", "v": {"a": nest(V.MAX_VALUE_DEPTH)}}, b"")  # the wrapper is a level too


@pytest.mark.parametrize("value", PYTHON_VALUES, ids=repr)
def test_to_guest_and_from_guest_are_inverse(value: Any) -> None:
    tree, body = DV.to_guest(value)
    json.dumps(tree, allow_nan=False)  # plain JSON: what JSON cannot say is tagged
    back = DV.from_guest(json.loads(json.dumps(tree)), body)
    if isinstance(value, datetime):  # a JS Date holds milliseconds
        value = value.replace(microsecond=value.microsecond // 1000 * 1000)
    assert same(back, value), f"{value!r} came back as {back!r}"


def test_a_marshalled_value_packs_as_the_value_itself() -> None:
    """A checked value (wire.values.marshalled) is packed as it is: the same frames as the value,
    the same bounds and messages as ``check``."""
    value = {"a": [1, 2**70, -0.0, b"\x00", datetime(2020, 1, 1, tzinfo=UTC)], "s": "x"}
    done = V.marshalled(value, "the result")
    assert done.size == V.check(value, "the result")
    plain = M.ToolResult(id=1, rt="r", value=value).frames()
    assert M.ToolResult(id=1, rt="r", value=done).frames() == plain
    assert M.ToolResult(id=1, rt="r", value=V.Marshalled(V.encode(value))).frames() == plain
    with pytest.raises(TypeError, match=r"the result\.a\[1\] is a set"):
        V.marshalled({"a": [1, {2}]}, "the result")
    with pytest.raises(V.TooLarge, match="the result takes"):
        V.marshalled("x" * V.MAX_VALUE, "the result")
