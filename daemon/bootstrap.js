// The bridge between one Deno process and its daemon. It runs before any guest code, takes the
// only references to stdin/stdout (the daemon channel), hides every way back to them from the
// guest, and then offers the guest serve(), fetch() and console, all mediated by the daemon.
//
// Channel framing (both directions): u32 BE length of the rest, u32 BE length of the JSON header,
// the header (UTF-8 JSON, field "op"), then the raw body bytes. protocol.md 7.1.
//
// This module exports nothing: a guest that imports it again gets an empty namespace.

const D = globalThis.Deno;
const stdin = D.stdin;
const stdout = D.stdout;
const inspect = D.inspect;
const exit = D.exit;
const DenoConsole = D[D.internal].Console; // Deno's own console, made to print to us (console section)

// The guest may replace globals later; keep our own references.
const { Response, Request, ReadableStream, CountQueuingStrategy, Headers, Promise, JSON, Uint8Array, DataView, TextEncoder,
  TextDecoder, Blob, URL, Error, TypeError, Map, Object, String, setTimeout, DOMException, ArrayBuffer,
  Function } = globalThis;
const addEventListener = globalThis.addEventListener.bind(globalThis);
const { defineProperty, getOwnPropertyDescriptor, getOwnPropertyNames, getPrototypeOf } = Object;
const { apply } = Reflect;

const MAX_FRAME = 16 * 1024 * 1024; // largest frame this bootstrap reads from the daemon

// The limits it applies are the daemon's (wire/guest.py, each explained there). They arrive in
// `init`, the first frame after the daemon claims this process and before any guest code runs,
// and live in these module variables, which guest code cannot reach.
let WINDOW, MAX_CHUNK, INLINE_MAX, MAX_VALUE, MAX_CONSOLE, MAX_CONSOLE_ARGS, CONSOLE_RATE, MAX_ERROR_TEXT,
  MAX_ERROR_NAME, MAX_HEAD, MAX_STATUS_TEXT;
let MAX_PENDING_FETCHES, MAX_STREAMS; // what this runtime may have pending (checked in fetch())
let MAX_VALUE_DEPTH; // nesting of an eval's value (the daemon's JSON parser must never recurse deeper)
let MAX_CONSOLE_VALUE; // bytes of a console entry's marshalled arguments
let MAX_PENDING_MODULES, MAX_SPECIFIER; // the module loader's (section "modules")
let config = null; // { fetch, console, modules } once `init` has arrived

function init(h) {
  if (config !== null) fatal("a second init");
  ({ window: WINDOW, max_chunk: MAX_CHUNK, inline_max: INLINE_MAX, max_value: MAX_VALUE, max_console: MAX_CONSOLE,
    max_console_args: MAX_CONSOLE_ARGS, console_rate: CONSOLE_RATE, max_error_text: MAX_ERROR_TEXT,
    max_error_name: MAX_ERROR_NAME, max_head: MAX_HEAD, max_status_text: MAX_STATUS_TEXT } = h);
  ({ max_pending_fetches: MAX_PENDING_FETCHES, max_streams: MAX_STREAMS, max_value_depth: MAX_VALUE_DEPTH,
    max_pending_tools: MAX_PENDING_TOOLS, max_console_value: MAX_CONSOLE_VALUE } = h);
  for (const v of [WINDOW, MAX_CHUNK, INLINE_MAX, MAX_VALUE, MAX_CONSOLE, MAX_CONSOLE_ARGS, CONSOLE_RATE,
    MAX_ERROR_TEXT, MAX_ERROR_NAME, MAX_HEAD, MAX_STATUS_TEXT, MAX_PENDING_FETCHES, MAX_STREAMS, MAX_VALUE_DEPTH,
    MAX_PENDING_TOOLS, MAX_CONSOLE_VALUE]) {
    if (typeof v !== "number" || !(v > 0)) fatal(`init without its limits: ${stringify(h)}`);
  }
  ({ max_pending_modules: MAX_PENDING_MODULES, max_specifier: MAX_SPECIFIER } = h);
  if (!(MAX_PENDING_MODULES > 0) || !(MAX_SPECIFIER > 0)) fatal(`init without its limits: ${stringify(h)}`);
  config = { fetch: !!h.fetch, console: !!h.console, modules: !!h.modules };
  setupTools(h);
  if (config.modules) startLoader(h.lexer);
  send({ op: "init_ok" });
}

function checkHead(url, headers, method = "") {
  let size = url.length + method.length;
  for (let i = 0; i < headers.length; i++) size += headers[i][0].length + headers[i][1].length + 4;
  if (size > MAX_HEAD) throw new TypeError(`the URL and headers take ${size} characters; the limit is ${MAX_HEAD}`);
}

const enc = new TextEncoder();
const dec = new TextDecoder();

// ---- hide the channel -----------------------------------------------------------------------
// `process` must go before `Deno`: Deno's node layer reads Deno lazily when `process` is touched.
// Node's timers (the global setTimeout) emit a process warning for a negative or too large delay,
// and the warning's default listener reads the `Deno` global: with Deno hidden, setTimeout(fn, -1)
// threw "Deno is not defined". The warnings went to stderr, which nobody reads: no listener at all.
globalThis.process.removeAllListeners("warning");
const HIDDEN = ["process", "Deno", "Worker", "alert", "confirm", "prompt", "close", "localStorage",
  "sessionStorage", "caches", "Buffer", "global", "setImmediate", "clearImmediate", "require"];
for (const name of HIDDEN) {
  try { delete globalThis[name]; } catch { /* checked below */ }
}
for (const name of HIDDEN) {
  if (name in globalThis) {
    stdout.writeSync(enc.encode(`bootstrap: could not hide ${name}\n`));
    exit(70);
  }
}

// ---- no native graphics --------------------------------------------------------------------
// WebGPU loads the host's GPU drivers (LLVM, DRM: dozens of native libraries) into the process
// and writes a shader cache to disk. Nothing else in the global scope does (the sweep in
// tests/test_sandbox_security.py checks), so WebGPU goes entirely: navigator.gpu, every GPU*
// class, and the "webgpu" context of OffscreenCanvas.
try { delete globalThis.Navigator.prototype.gpu; } catch { /* checked below */ }
for (const name of getOwnPropertyNames(globalThis)) {
  if (name.startsWith("GPU")) { try { delete globalThis[name]; } catch { /* checked below */ } }
}
if (globalThis.OffscreenCanvas) {
  const proto = globalThis.OffscreenCanvas.prototype;
  const desc = getOwnPropertyDescriptor(proto, "getContext");
  const getContext = desc.value;
  desc.value = { getContext(contextId, ...rest) { // a method: no [[Construct]], like the original
    if (String(contextId) === "webgpu") return null; // as for any context id the canvas does not know
    return apply(getContext, this, [contextId, ...rest]);
  } }.getContext;
  defineProperty(proto, "getContext", desc);
}
if ("gpu" in globalThis.navigator || getOwnPropertyNames(globalThis).some((n) => n.startsWith("GPU"))) {
  stdout.writeSync(enc.encode("bootstrap: could not remove WebGPU\n"));
  exit(70);
}

// ---- channel --------------------------------------------------------------------------------
// The guest can replace any prototype method or accessor (Uint8Array.prototype.subarray, the
// typed-array `length`/`buffer` getters, Uint8Array.prototype.constructor[Symbol.species],
// TextEncoder.prototype.encode, JSON.stringify, a `toJSON` on Object.prototype...). send() only
// uses what it captured here, before any guest code ran, so the guest cannot choose the bytes
// written to stdout: every frame is well formed and its header is the JSON object built here.
const uncurry = (fn) => Function.prototype.call.bind(fn);
const TypedArrayPrototype = getPrototypeOf(Uint8Array.prototype);
const byteLengthOf = uncurry(getOwnPropertyDescriptor(TypedArrayPrototype, "byteLength").get);
const copyInto = uncurry(TypedArrayPrototype.set);
const bufferOf = uncurry(getOwnPropertyDescriptor(TypedArrayPrototype, "buffer").get);
const byteOffsetOf = uncurry(getOwnPropertyDescriptor(TypedArrayPrototype, "byteOffset").get);
// a view of part of a chunk built without subarray(), which the guest may have replaced
const sliceView = (chunk, off, n) => new Uint8Array(bufferOf(chunk), byteOffsetOf(chunk) + off, n);
const encodeText = uncurry(TextEncoder.prototype.encode);
const stringify = JSON.stringify;
const sliceString = uncurry(String.prototype.slice);
const charCodeAt = uncurry(String.prototype.charCodeAt);
// what the read loop uses: a guest that patches a typed-array getter, TextDecoder or JSON.parse
// while a frame from the daemon arrives must not make the loop misread the channel
const lengthOf = uncurry(getOwnPropertyDescriptor(TypedArrayPrototype, "length").get);
const copyWithin = uncurry(TypedArrayPrototype.copyWithin);
const decodeText = uncurry(TextDecoder.prototype.decode);
const parseJSON = JSON.parse;

// HTTP heads are read through the getters of the real classes, captured here: a guest that
// redefines `status` on its Response, patches Request.prototype.method or
// Headers.prototype[Symbol.iterator]/entries/forEach, or returns a look-alike object, cannot
// choose what the head says. Headers are what the (Deno-validated) header list holds.
const getterOf = (C, name) => uncurry(getOwnPropertyDescriptor(C.prototype, name).get);
const requestMethod = getterOf(Request, "method");
const requestUrl = getterOf(Request, "url");
const requestHeaders = getterOf(Request, "headers");
const requestRedirect = getterOf(Request, "redirect");
const requestSignal = getterOf(Request, "signal");
const requestBody = getterOf(Request, "body");
const responseStatus = getterOf(Response, "status");
const responseStatusText = getterOf(Response, "statusText");
const responseHeaders = getterOf(Response, "headers");
const responseBody = getterOf(Response, "body");
const forEachHeader = uncurry(Headers.prototype.forEach);

function headerPairs(headers) {
  // define, not assign: an assignment would run a setter the guest put on Array.prototype
  const out = [];
  let n = 0;
  forEachHeader(headers, (value, name) => {
    defineProperty(out, n++, { value: [name, value], writable: true, enumerable: true, configurable: true });
  });
  return out;
}
function asStored(key) { return this[key]; } // JSON.stringify replacer: ignores any guest toJSON

function putU32(frame, at, n) { // element writes on a typed array consult no prototype
  frame[at] = n >>> 24; frame[at + 1] = (n >>> 16) & 255; frame[at + 2] = (n >>> 8) & 255; frame[at + 3] = n & 255;
}

function send(header, body) {
  const h = encodeText(enc, stringify(header, asStored));
  const hlen = byteLengthOf(h);
  const blen = body ? byteLengthOf(body) : 0;
  const head = new Uint8Array(8 + hlen);
  putU32(head, 0, 4 + hlen + blen);
  putU32(head, 4, hlen);
  copyInto(head, h, 8);
  writeAll(head, 0, 8 + hlen);
  // the body goes out as it is, never copied into a frame buffer (writeSync is synchronous, so
  // nothing else can write in between)
  if (blen) writeAll(body, 0, blen);
}

function writeAll(bytes, off, size) {
  const buffer = bufferOf(bytes);
  const base = byteOffsetOf(bytes);
  // new views rather than subarray(), which would create its result through the guest's species
  while (off < size) off += stdout.writeSync(off === 0 && base === 0 && size === byteLengthOf(bytes)
    ? bytes : new Uint8Array(buffer, base + off, size - off));
}

async function readLoop() {
  let buf = new Uint8Array(1 << 20);
  let start = 0;
  let end = 0;
  // element reads of a typed array consult no prototype; everything else is a captured intrinsic
  const u32 = (at) => ((buf[at] << 24) | (buf[at + 1] << 16) | (buf[at + 2] << 8) | buf[at + 3]) >>> 0;
  const grow = (size) => { const grown = new Uint8Array(size); copyInto(grown, sliceView(buf, 0, end)); buf = grown; };
  for (;;) {
    let need = 4;
    while (end - start >= 4) {
      const len = u32(start);
      if (len > MAX_FRAME + 8) fatal(`frame of ${len} bytes from the daemon`);
      if (end - start - 4 < len) { need = len + 4; break; }
      const hlen = u32(start + 4);
      const header = parseJSON(decodeText(dec, sliceView(buf, start + 8, hlen)));
      const body = new Uint8Array(len - 4 - hlen);
      copyInto(body, sliceView(buf, start + 8 + hlen, len - 4 - hlen));
      start += 4 + len;
      try { handle(header, body); } catch (e) { fatal(`handling ${header.op}: ${e?.stack ?? e}`); }
    }
    if (start > 0) { copyWithin(buf, 0, start, end); end -= start; start = 0; }
    if (need > lengthOf(buf)) grow(need * 2);
    if (lengthOf(buf) - end < 65536) grow(lengthOf(buf) * 2);
    const n = await stdin.read(sliceView(buf, end, lengthOf(buf) - end));
    if (n === null) exit(0); // the daemon is gone: so are we
    end += n;
  }
}

function fatal(message) {
  try { send({ op: "fatal", message: String(message) }); } finally { exit(70); }
}

// ---- helpers ------------------------------------------------------------------------------------
// Never throws: what the guest threw may have getters, proxy traps or a toString that throw, and
// an error that cannot be described would leave its eval unanswered or its stream never ended.
function describe(e) {
  // bounded, so that an error with a huge message cannot make a frame the daemon must refuse
  const cut = (text) => (text.length > MAX_ERROR_TEXT ? text.slice(0, MAX_ERROR_TEXT) + "…[truncated]" : text);
  const read = (get, otherwise) => { try { return String(get() ?? otherwise); } catch { return otherwise; } };
  let errorLike = false;
  try { errorLike = e instanceof Error || (e !== null && typeof e === "object" && "message" in e); } catch { /* a proxy */ }
  if (errorLike) {
    return { name: cut(read(() => e.name, "Error")).slice(0, MAX_ERROR_NAME),
      message: cut(nameBlobs(read(() => e.message, ""))), stack: cut(nameBlobs(read(() => e.stack, ""))) };
  }
  let text;
  try { text = typeof e === "string" ? e : inspect(e); } catch { text = "<uninspectable value>"; }
  return { name: "Error", message: cut(`Uncaught ${text}`), stack: "" };
}

function bytesOf(value) {
  if (value instanceof Uint8Array) return value;
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw new TypeError("body chunks must be Uint8Array (or another ArrayBuffer view)");
}

function concat(chunks, size) {
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(size);
  let off = 0;
  for (const c of chunks) { out.set(c, off); off += c.byteLength; }
  return out;
}

const TICK = Symbol("tick");

// The next macrotask, via a MessageChannel: setTimeout(0) costs 1-4 ms in Deno, and every
// streamed response head waits for one (everything already enqueued resolves before it).
const tickChannel = new MessageChannel();
const tickWaiters = [];
const postTick = uncurry(MessagePort.prototype.postMessage);
tickChannel.port1.onmessage = () => { const r = tickWaiters.shift(); if (r) r(TICK); };
function macrotask() {
  return new Promise((r) => { tickWaiters.push(r); postTick(tickChannel.port2, null); });
}

// ---- values ----------------------------------------------------------------------------------------
// The one marshalling of values between guest and host (protocol.md 7.4; the Python side is
// wire/values.py and daemon/values.py). packValue(value, where) -> { v: tree, blobs }: the tree is
// JSON (it goes in a frame's header as `v`), the blobs are the bytes of its Uint8Arrays, sent
// concatenated as the frame's body. unpackValue(tree, body) is the reverse. Sendable: undefined and
// null (-> None), booleans, numbers (a safe integer -> int, any other number -> float; NaN,
// infinities and -0 kept), BigInts (-> int), strings (lone surrogates -> U+FFFD), Uint8Arrays (->
// bytes), Dates (-> aware datetime, UTC, ms), arrays and plain objects (own enumerable string keys).
// Anything else is a TypeError naming its path: functions, symbols, cycles, Maps, Sets, other
// typed arrays, ArrayBuffers, DataViews, class instances. Bounds: MAX_VALUE bytes (the tree's
// UTF-8 JSON plus the blobs), MAX_VALUE_DEPTH levels of arrays and objects (RangeError).
// Only intrinsics captured before guest code ran are used: a guest that patches prototypes cannot
// change how a value is read or what the tree says.
const isArray = Array.isArray;
const objectKeys = Object.keys;
const hasOwn = Object.hasOwn;
const isSafeInteger = Number.isSafeInteger;
const isFiniteNumber = Number.isFinite;
const sameValue = Object.is;
const objectPrototype = Object.prototype;
const bigintToString = uncurry(BigInt.prototype.toString);
const makeBigInt = BigInt;
const dateTime = uncurry(Date.prototype.getTime); // throws for anything but a Date
const NativeDate = Date;
const toWellFormed = uncurry(String.prototype.toWellFormed);
const typedArrayTag = uncurry(getOwnPropertyDescriptor(TypedArrayPrototype, Symbol.toStringTag).get);
const NativeSet = Set;
const setHas = uncurry(Set.prototype.has);
const setAdd = uncurry(Set.prototype.add);
const setDelete = uncurry(Set.prototype.delete);
const regexpTest = uncurry(RegExp.prototype.test);
const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const VOWEL = /^[AEIOU]/;
const NativeRangeError = RangeError;
const FIRST_DATE = -62135596800000; // 0001-01-01T00:00:00Z: Python's datetime holds years 1..9999
const LAST_DATE = 253402300799999; // 9999-12-31T23:59:59.999Z
const SENDABLE = "only null, undefined, booleans, numbers, BigInts, strings, Uint8Arrays, Dates, arrays and plain "
  + "objects can be sent";

// define, not assign: an assignment would run a setter the guest put on a prototype (or set
// __proto__ for a key "__proto__")
function put(target, key, value) {
  defineProperty(target, key, { value, writable: true, enumerable: true, configurable: true });
}

function isDate(value) {
  try { dateTime(value); return true; } catch { return false; }
}

function kindOf(value) {
  if (typeof value === "function") return "a function";
  if (typeof value === "symbol") return "a symbol";
  const tag = typedArrayTag(value);
  if (tag !== undefined) return `a ${tag} (send a Uint8Array of its bytes)`;
  let name = "";
  try { name = String(getPrototypeOf(value)?.constructor?.name ?? ""); } catch { /* a hostile proxy */ }
  if (!name) return "an object that is not a plain object";
  const what = `${regexpTest(VOWEL, name) ? "an" : "a"} ${name}`;
  const bytes = name === "ArrayBuffer" || name === "DataView" || name === "SharedArrayBuffer";
  return bytes ? `${what} (send a Uint8Array of its bytes)` : what;
}

// `where` and the path below it, for an error message; a long path keeps its last steps
function at(where, path) {
  if (path.length <= 120) return `${where}${path}`;
  let i = path.length - 120;
  while (i < path.length && charCodeAt(path, i) !== 46 && charCodeAt(path, i) !== 91) i++; // "." or "["
  return `${where}…${sliceString(path, i)}`;
}

// `replace(v, what)`, if given, is asked for a stand-in (a string, number, boolean or null, e.g. the
// value's inspect() text) instead of throwing for something that cannot be sent (`what` says what
// it is and where); bounds still throw. For callers that must not fail on any value (console).
function packValue(value, where = "the value", replace = undefined) {
  const refuse = (v, path, what) => {
    const text = `${at(where, path)} is ${what}`;
    if (replace === undefined) throw new TypeError(what === "a cycle: it contains itself" ? text : `${text}: ${SENDABLE}`);
    const stand = replace(v, text);
    const type = typeof stand;
    if (stand !== null && type !== "string" && type !== "number" && type !== "boolean") {
      throw new TypeError(`the stand-in for ${text} must be a string, number, boolean or null`);
    }
    return walk(stand, path, 0);
  };
  const blobs = [];
  let nblobs = 0;
  let offset = 0; // bytes of blobs so far
  let size = 0; // a lower bound of the marshalled size, to stop early (a DAG can be huge to walk)
  const ancestors = new NativeSet();
  const grow = (n) => {
    size += n;
    if (size > MAX_VALUE) {
      throw new NativeRangeError(`${where} is too large to send (more than ${MAX_VALUE} bytes marshalled)`);
    }
  };
  const walk = (v, path, depth) => {
    grow(1);
    switch (typeof v) {
      case "undefined": return null;
      case "boolean": return v;
      case "string": grow(v.length); return toWellFormed(v);
      case "number":
        if (isFiniteNumber(v) && !sameValue(v, -0)) return v;
        return { $: "f", v: v !== v ? "NaN" : v === 0 ? "-0" : v > 0 ? "Infinity" : "-Infinity" };
      case "bigint": {
        const hex = bigintToString(v, 16);
        grow(hex.length);
        return { $: "n", v: hex };
      }
      case "object": break;
      default: return refuse(v, path, kindOf(v));
    }
    if (v === null) return null;
    if (typedArrayTag(v) === "Uint8Array") {
      // its bytes now: a getter met later in the walk may resize or detach its buffer, and the
      // offsets in the tree must name the bytes the body carries (a detached one has none)
      const n = byteLengthOf(v);
      grow(n);
      const bytes = new Uint8Array(n);
      if (n > 0) copyInto(bytes, v);
      put(blobs, nblobs++, bytes);
      offset += n;
      return { $: "b", o: offset - n, n };
    }
    if (isDate(v)) {
      const t = dateTime(v);
      if (!(t >= FIRST_DATE && t <= LAST_DATE)) {
        return refuse(v, path, t !== t ? "an invalid Date" : "a Date outside years 1..9999");
      }
      return { $: "d", v: t };
    }
    const array = isArray(v);
    if (!array) {
      const proto = getPrototypeOf(v);
      if (proto !== objectPrototype && proto !== null) return refuse(v, path, kindOf(v));
    }
    if (setHas(ancestors, v)) return refuse(v, path, "a cycle: it contains itself");
    if (depth >= MAX_VALUE_DEPTH) {
      throw new NativeRangeError(`${where} is nested more than ${MAX_VALUE_DEPTH} levels deep (arrays and objects)`);
    }
    setAdd(ancestors, v);
    let out;
    if (array) {
      out = [];
      const n = v.length;
      for (let i = 0; i < n; i++) put(out, i, walk(v[i], `${path}[${i}]`, depth + 1));
    } else {
      out = {};
      let tagged = false;
      const keys = objectKeys(v);
      for (let i = 0; i < keys.length; i++) { // an index loop: the guest may patch array iterators
        const key = keys[i];
        const k = toWellFormed(key);
        grow(k.length + 1);
        if (k === "$") tagged = true;
        put(out, k, walk(v[key], regexpTest(IDENTIFIER, k) ? `${path}.${k}` : `${path}[${stringify(k)}]`, depth + 1));
      }
      if (tagged) out = { $: "o", v: out };
    }
    setDelete(ancestors, v);
    return out;
  };
  const tree = walk(value, "", 0);
  const total = byteLengthOf(encodeText(enc, stringify(tree, asStored))) + offset;
  if (total > MAX_VALUE) {
    throw new NativeRangeError(`${where} is too large to send (${total} bytes marshalled; the limit is ${MAX_VALUE})`);
  }
  return { v: tree, blobs };
}

// The body of a frame that carries a packed value: its blobs, concatenated (null when none).
function blobsBody(blobs) {
  if (blobs.length === 0) return null;
  let size = 0;
  for (let i = 0; i < blobs.length; i++) size += byteLengthOf(blobs[i]);
  const out = new Uint8Array(size);
  let off = 0;
  for (let i = 0; i < blobs.length; i++) { copyInto(out, blobs[i], off); off += byteLengthOf(blobs[i]); }
  return out;
}

const FLOATS = { __proto__: null, NaN: NaN, Infinity: Infinity, "-Infinity": -Infinity, "-0": -0 };

// The JavaScript value of a tree the daemon sent (daemon/values.py to_guest) and its frame's body.
// Every Uint8Array is a copy of its slice, so it owns its buffer.
function unpackValue(tree, body) {
  const walk = (t) => {
    if (t === null || typeof t !== "object") return t;
    if (isArray(t)) {
      const out = [];
      for (let i = 0; i < t.length; i++) put(out, i, walk(t[i]));
      return out;
    }
    if (hasOwn(t, "$")) {
      switch (t.$) {
        case "f": if (t.v in FLOATS) return FLOATS[t.v]; break;
        case "n": return t.v[0] === "-" ? -makeBigInt(`0x${sliceString(t.v, 1)}`) : makeBigInt(`0x${t.v}`);
        case "b": {
          const out = new Uint8Array(t.n);
          copyInto(out, sliceView(body, t.o, t.n));
          return out;
        }
        case "d": return new NativeDate(t.v);
        case "o": return plain(t.v);
      }
      throw new TypeError(`not a value tree: ${stringify(t)}`);
    }
    return plain(t);
  };
  const plain = (t) => {
    const out = {};
    const keys = objectKeys(t);
    for (let i = 0; i < keys.length; i++) put(out, keys[i], walk(t[keys[i]]));
    return out;
  };
  return walk(tree);
}

// ---- outbound streams: guest-produced bodies (serve responses, fetch uploads) ----------------
let nextOut = 1;
const outStreams = new Map(); // sid -> {credits, wake, cancelled, reader}

// Send `head` with the body. A body already complete and small travels inline; anything else
// gets a stream whose chunks go out as the guest produces them, `WINDOW` at a time.
// `blobs`: the frame's body for a head that carries a value (a tool call): the body then streams.
async function sendWithBody(head, stream, blobs = null) {
  if (stream === null) { send({ ...head, body: null }, blobs); return; }
  const reader = stream.getReader();
  const chunks = [];
  let size = 0;
  let pending = null;
  let done = false;
  let failure = null;
  const tick = macrotask();
  try {
    while (size <= INLINE_MAX) {
      const p = reader.read();
      const r = await Promise.race([p, tick]);
      if (r === TICK) { pending = p; break; }
      if (r.done) { done = true; break; }
      const chunk = bytesOf(r.value);
      chunks.push(chunk);
      size += chunk.byteLength;
    }
  } catch (e) {
    failure = e; // a body that fails early still fails as a stream: the consumer must see an error
  }
  if (blobs === null && failure === null && done && size <= INLINE_MAX) {
    send({ ...head, body: "inline" }, concat(chunks, size));
    return;
  }
  const sid = nextOut++;
  const out = { credits: WINDOW, wake: null, cancelled: false, reader };
  outStreams.set(sid, out);
  send({ ...head, body: { sid } }, blobs);
  try {
    // what was read before a failure goes out first: the consumer sees those chunks, then the error
    for (const c of chunks) await sendChunk(out, sid, c);
    if (failure !== null) throw failure;
    for (;;) {
      const r = await (pending ?? reader.read());
      pending = null;
      if (out.cancelled) return;
      if (r.done) break;
      await sendChunk(out, sid, bytesOf(r.value));
    }
    if (!out.cancelled) send({ op: "end", sid });
  } catch (e) {
    if (!out.cancelled) {
      send({ op: "error", sid, error: describe(e) });
      try { reader.cancel(e); } catch { /* already errored */ }
    }
  } finally {
    outStreams.delete(sid);
  }
}

async function sendChunk(out, sid, chunk) {
  for (let off = 0; off < byteLengthOf(chunk); off += MAX_CHUNK) {
    while (out.credits === 0 && !out.cancelled) await new Promise((r) => { out.wake = r; });
    if (out.cancelled) return;
    out.credits--;
    send({ op: "chunk", sid }, sliceView(chunk, off, Math.min(MAX_CHUNK, byteLengthOf(chunk) - off)));
  }
}

function onAck(h) {
  const out = outStreams.get(h.sid);
  if (!out) return;
  out.credits++;
  if (out.wake) { const w = out.wake; out.wake = null; w(); }
}

function onOutCancel(h) {
  const out = outStreams.get(h.sid);
  if (!out) return;
  out.cancelled = true;
  outStreams.delete(h.sid);
  out.reader.cancel(new DOMException("the consumer cancelled the stream", "AbortError")).catch(() => {});
  if (out.wake) { const w = out.wake; out.wake = null; w(); }
}

// ---- inbound streams: host-produced bodies (fetch responses, serve requests) ------------------
const inStreams = new Map(); // sid -> {controller, resolve, reject}

function inboundStream(sid, signal) {
  // Credit-based: the daemon sends a chunk only against credit, and credit is granted only while
  // the stream's queue (plus chunks in flight) is below WINDOW: a reader that stops reading stops
  // the flow, and one that reads gets the next chunks without a round trip each.
  const st = { controller: null, outstanding: 0, done: false };
  let onAbort = null;
  const finish = () => {
    st.done = true;
    inStreams.delete(sid);
    if (onAbort) signal.removeEventListener("abort", onAbort); // a reused signal must not collect these
  };
  const stream = new ReadableStream({
    start(controller) { st.controller = controller; inStreams.set(sid, st); },
    pull(controller) {
      const want = controller.desiredSize - st.outstanding;
      if (want > 0 && !st.done) { st.outstanding += want; send({ op: "read", sid, n: want }); }
    },
    cancel() {
      if (!st.done) { finish(); send({ op: "cancel", sid }); }
    },
  }, new CountQueuingStrategy({ highWaterMark: WINDOW }));
  if (signal) {
    onAbort = () => {
      if (st.done) return;
      finish();
      send({ op: "cancel", sid });
      try { st.controller.error(signal.reason); } catch { /* closed */ }
    };
    signal.addEventListener("abort", onAbort, { once: true });
  }
  st.finish = finish;
  return stream;
}

function onInbound(h, body) {
  const st = inStreams.get(h.sid);
  if (!st) return; // cancelled meanwhile: the daemon will drop the stream
  if (h.op === "chunk") {
    st.outstanding--;
    st.controller.enqueue(body);
  } else if (h.op === "end") {
    st.finish();
    st.controller.close();
  } else {
    st.finish();
    st.controller.error(new TypeError(h.message || "the body stream failed"));
  }
}

// ---- modules ----------------------------------------------------------------------------------
// Each eval, and with a resolver (`config.modules`) each module the host hands out, becomes a Blob
// URL module: Deno has no loader hook, so the loader rewrites every import specifier of a source
// to the Blob URL of the module it names, loaded first through the host's resolver (protocol.md
// 7.3, Modules). The vendored es-module-lexer (daemon/es-module-lexer.js, sent in `init`) finds
// the specifiers: static imports, re-exports and `import(...)` calls, which become calls of
// `__sandbox_import__(referrer, specifier, options)`. TypeScript becomes a Blob of type
// application/typescript, which Deno strips keeping every line and column; `import type` is
// erased by Deno and never asks the resolver. Stacks name each Blob by its filename or module URL
// (`nameBlobs`, used by Error.prepareStackTrace and for what the host reads).

const BLOB_TYPES = { javascript: "text/javascript", typescript: "application/typescript", tsx: "text/tsx",
  json: "application/json" };
const TS_NAME = /\.(ts|mts|cts)$/i;
const TSX_NAME = /\.tsx$/i; // JSX too (React.createElement, the classic runtime)
const BLOB_URL = /blob:null\/[0-9a-f-]{36}/g;
const MAY_IMPORT = /import|from/;
const NAMES_KEPT = 10000; // eval Blobs remembered by name (each eval is a module of its own)
const blobNames = new Map(); // Blob URL -> the filename or module URL stacks show
const replaceText = uncurry(String.prototype.replace);
const errorToString = uncurry(Error.prototype.toString);

function nameBlobs(text) {
  return blobNames.size === 0 ? text : replaceText(text, BLOB_URL, (u) => blobNames.get(u) ?? u);
}

function blobModule(source, kind, name) {
  const url = URL.createObjectURL(new Blob([source], { type: BLOB_TYPES[kind] ?? BLOB_TYPES.javascript }));
  if (name) {
    if (blobNames.size >= NAMES_KEPT) blobNames.delete(blobNames.keys().next().value);
    blobNames.set(url, name.length > 256 ? name.slice(0, 256) + "…" : name); // a data: URL can be long
  }
  return url;
}

// V8 asks this for `error.stack`: the default text, with each Blob named (a guest may replace it)
// The bootstrap's own frames are left out: the guest's stack shows the guest's code (an error
// thrown inside fetch() or tools.x() points at the guest's call). An index loop: a guest may
// have replaced Array.prototype[Symbol.iterator].
const SELF_FILES = new Set([import.meta.url, new URL(import.meta.url).pathname]);
Error.prepareStackTrace = function prepareStackTrace(error, sites) {
  let text;
  try { text = errorToString(error); } catch { text = "Error"; }
  for (let i = 0; i < sites.length; i++) {
    let file = null;
    try { file = sites[i].getFileName(); } catch { /* a patched CallSite: keep the frame */ }
    if (!SELF_FILES.has(file)) text += "\n    at " + nameBlobs(String(sites[i]));
  }
  return text;
};

// Deno reports a module that fails to parse as a TypeError wrapping the SyntaxError, with a code
// frame and the position last: the parts of a proper SyntaxError naming the line and column.
// V8's own early errors (a redeclared name) are SyntaxErrors whose message ends in " at <where>".
function syntaxError(name, message) {
  const early = name === "SyntaxError" ? /^([^\n]*) at (\S+:\d+:\d+)$/.exec(message) : null;
  if (early !== null) {
    const text = `${early[1]} (${early[2]})`;
    return { name, message: text, stack: `SyntaxError: ${text}\n    at ${early[2]}` };
  }
  if (name !== "TypeError" || !message.startsWith("SyntaxError: ")) return null;
  const lines = message.slice("SyntaxError: ".length).split("\n");
  const last = lines[lines.length - 1].trim();
  const where = lines.length > 1 && last.startsWith("at ") ? last.slice(3) : "";
  const text = where ? `${lines[0]} (${where})` : lines[0];
  return { name: "SyntaxError", message: text, stack: ["SyntaxError: " + text, ...lines.slice(1)].join("\n") };
}

function moduleKind(kind, url) {
  if (kind === "json") return "json";
  let path = url;
  try { path = new URL(url).pathname; } catch { /* not a URL: the name itself */ }
  if (TSX_NAME.test(path)) return "tsx";
  return kind === "typescript" || TS_NAME.test(path) ? "typescript" : "javascript";
}

// An eval's source as a Blob URL module, its imports loaded first when the host resolves them.
async function evalModule(code, filename) {
  const kind = moduleKind("javascript", filename || "");
  // a source that cannot import (no `import`, no `from`) needs no lexer: it need not wait for it
  if (!config.modules || !MAY_IMPORT.test(code)) return blobModule(code, kind, filename);
  await loadLexer();
  let base = "file:///main.js";
  if (filename) { try { base = new URL(filename, "file:///").href; } catch { /* stays main.js */ } }
  return await locked(() => rewrite(code, base, kind, filename || base, [base]).then((src) => blobModule(src, kind, filename)));
}

let parseImports = null; // the lexer's parse(), once loaded
let lexerSource = "";
let lexerLoad = null;

// The lexer is compiled when the first source that may import needs it (~40 ms of this process's
// only thread: an eval that imports nothing must not wait for it).
function loadLexer() {
  lexerLoad ??= (async () => {
    const url = URL.createObjectURL(new Blob([lexerSource], { type: "text/javascript" }));
    try {
      const lexer = await import(url);
      await lexer.init();
      parseImports = lexer.parse;
      lexerSource = "";
    } finally {
      URL.revokeObjectURL(url);
    }
  })();
  return lexerLoad;
}

function startLoader(source) {
  lexerSource = String(source ?? "");
  defineProperty(globalThis, "__sandbox_import__", { value: Object.freeze(guestImport), writable: false, enumerable: false,
    configurable: false });
}

const resolved = new Map(); // request key -> promise of its module record (failures are asked again)
const byUrl = new Map(); // canonical URL -> {url, kind, source, blob, building}
const referrers = []; // index -> a module's URL, for its rewritten import() calls
const referrerIndex = new Map();
let lockTail = Promise.resolve();

// One graph is built at a time: a module being built is then always an ancestor of the one that
// meets it again, which is an import cycle (not supported: Blob URLs need their imports' URLs).
function locked(fn) {
  const run = lockTail.then(fn);
  lockTail = run.then(() => {}, () => {});
  return run;
}

function keyOf(specifier, referrer) {
  if (specifier.startsWith("./") || specifier.startsWith("../") || specifier.startsWith("/")) {
    try { return new URL(specifier, referrer).href; } catch { /* a referrer that is no base (data:) */ }
  }
  return specifier;
}

const isBuiltin = (specifier) => specifier.startsWith("node:");

function notFound(specifier, referrer, why, at = "") {
  const e = new TypeError(`Module not found "${specifier}" imported from ${referrer}: ${why}`);
  if (at) e.stack = `TypeError: ${e.message}\n    at ${at}`;
  return e;
}

function request(key, referrer) {
  let p = resolved.get(key);
  if (p === undefined) {
    p = key.startsWith("data:") ? Promise.resolve(dataModule(key)) : askHost(key, referrer);
    p = p.then(({ url, kind, source }) => {
      let rec = byUrl.get(url);
      if (rec === undefined) byUrl.set(url, rec = { url, kind: moduleKind(kind, url), source, blob: null, building: false });
      return rec;
    });
    resolved.set(key, p);
    p.catch(() => { if (resolved.get(key) === p) resolved.delete(key); });
  }
  return p;
}

// A data: URL is its own source: its imports go through the resolver like any other module's.
function dataModule(url) {
  const comma = url.indexOf(",");
  if (comma < 0) throw new TypeError(`invalid data: URL module ${url.slice(0, 80)}`);
  const meta = url.slice(5, comma).toLowerCase();
  const data = url.slice(comma + 1);
  const source = meta.endsWith(";base64") ? dec.decode(Uint8Array.from(atob(data), (c) => c.charCodeAt(0)))
    : decodeURIComponent(data);
  const kind = meta.startsWith("application/json") ? "json"
    : meta.includes("typescript") ? "typescript" : "javascript";
  return { url, kind, source };
}

const moduleQueue = [];
const moduleWaiters = new Map(); // id -> {specifier, referrer, resolve, reject}
let nextModule = 1;

function askHost(specifier, referrer) {
  if (specifier.length + referrer.length > MAX_SPECIFIER) {
    return Promise.reject(new TypeError(`the specifier is longer than ${MAX_SPECIFIER} characters`));
  }
  return new Promise((resolve, reject) => {
    moduleQueue.push({ specifier, referrer, resolve, reject });
    pumpModules();
  });
}

function pumpModules() {
  while (moduleWaiters.size < MAX_PENDING_MODULES && moduleQueue.length > 0) {
    const q = moduleQueue.shift();
    const id = nextModule++;
    moduleWaiters.set(id, q);
    send({ op: "module", id, specifier: q.specifier, referrer: q.referrer });
  }
}

function onModuleAnswer(h, body) {
  const q = moduleWaiters.get(h.id);
  if (q === undefined) return;
  moduleWaiters.delete(h.id);
  if (h.op === "module_error") q.reject(new TypeError(String(h.message)));
  else q.resolve({ url: String(h.url), kind: String(h.kind), source: decodeText(dec, body) });
  pumpModules();
}

// The Blob URL of `rec`, built (its imports first) if it is not yet.
async function build(rec, chain) {
  if (rec.blob !== null) return rec.blob;
  if (rec.building) {
    const at = chain.indexOf(rec.url);
    const cycle = [...chain.slice(at < 0 ? 0 : at), rec.url].join(" -> ");
    throw new TypeError(`Import cycle: ${cycle}; this sandbox's loader does not support cycles of static imports `
      + `(import one side dynamically, with import())`);
  }
  rec.building = true;
  try {
    const source = rec.kind === "json" ? rec.source : await rewrite(rec.source, rec.url, rec.kind, rec.url, [...chain, rec.url]);
    rec.blob = blobModule(source, rec.kind, rec.url);
    rec.source = null;
    return rec.blob;
  } finally {
    rec.building = false;
  }
}

function position(source, at) {
  let line = 1, start = 0;
  for (let i = source.indexOf("\n"); i >= 0 && i < at; i = source.indexOf("\n", i + 1)) { line++; start = i + 1; }
  return `${line}:${at - start + 1}`;
}

// `source` (of the module at `url`) with every specifier replaced by the Blob URL of its module.
async function rewrite(source, url, kind, name, chain) {
  if (!MAY_IMPORT.test(source)) return source;
  await loadLexer();
  let imports;
  try { [imports] = parseImports(source, name); } catch { return source; } // Deno reports the syntax error
  const ts = kind === "typescript" || kind === "tsx";
  const statics = new Set(imports.filter((i) => (i.type === "static" || i.type === "reexport-star") && !i.typeOnly
    && typeof i.specifier === "string" && !isBuiltin(i.specifier)));
  // every module this one imports is asked for at once; each is then built in order
  const records = [...statics].map((i) => request(keyOf(i.specifier, url), url).catch((e) => {
    throw notFound(i.specifier, name, e.message, `${name}:${position(source, i.start)}`);
  }));
  records.forEach((p) => p.catch(() => {})); // the first failure is thrown below; the rest are settled
  let out = "";
  let at = 0;
  let n = 0;
  for (const i of imports) {
    if (statics.has(i)) {
      const blob = await build(await records[n++], chain);
      out += source.slice(at, i.start) + blob;
      at = i.end;
    } else if (i.type === "import-meta") { // its `url` is the module's own, not its Blob's
      out += source.slice(at, i.start) + `__sandbox_import__.meta(${referrerOf(url)})`;
      at = i.end;
    } else if (i.type === "dynamic" && !(ts && i.probablyTypeOnly)) {
      const paren = source.indexOf("(", i.importStart + 6);
      if (paren < 0) continue;
      out += source.slice(at, i.importStart) + `__sandbox_import__(${referrerOf(url)}, `;
      at = paren + 1;
    }
  }
  return out + source.slice(at);
}

function referrerOf(url) {
  let n = referrerIndex.get(url);
  if (n === undefined) { n = referrers.length; referrers.push(url); referrerIndex.set(url, n); }
  return n;
}

// What a rewritten `import.meta` is: the module's URL, and `resolve()` as the loader keys it.
const metas = new Map(); // referrer index -> its import.meta
guestImport.meta = function meta(n) {
  let m = metas.get(n);
  if (m === undefined) {
    const url = referrers[n] ?? "file:///main.js";
    m = Object.freeze({ __proto__: null, url, main: false, resolve: (specifier) => keyOf(String(specifier), url) });
    metas.set(n, m);
  }
  return m;
};

// What a rewritten `import(specifier, options)` calls.
async function guestImport(n, specifier, options = undefined) {
  const referrer = referrers[n] ?? "file:///main.js";
  specifier = String(specifier);
  if (isBuiltin(specifier)) return await import(specifier);
  let rec;
  try {
    rec = await request(keyOf(specifier, referrer), referrer);
  } catch (e) {
    throw notFound(specifier, referrer, e.message);
  }
  const blob = await locked(() => build(rec, []));
  try {
    return await (options === undefined ? import(blob) : import(blob, options));
  } catch (e) {
    const syntax = e instanceof Error ? syntaxError(e.name, nameBlobs(String(e.message))) : null;
    if (syntax === null) throw e;
    const err = new SyntaxError(syntax.message);
    err.stack = syntax.stack;
    throw err;
  }
}

// ---- eval ----------------------------------------------------------------------------------------
async function runEval(h) {
  let url = null;
  try {
    url = await evalModule(h.code, h.filename);
    const mod = await import(url);
    const { v, blobs } = packValue(mod.default, "the default export");
    send({ op: "eval_ok", id: h.id, v }, blobsBody(blobs));
  } catch (e) {
    const err = describe(e);
    const syntax = syntaxError(err.name, err.message);
    send({ op: "eval_error", id: h.id, error: syntax ? { ...err, ...syntax } : err });
  } finally {
    if (url !== null) URL.revokeObjectURL(url);
  }
}

// ---- serve() -------------------------------------------------------------------------------------
let handler = null;
const dispatches = new Map(); // id -> AbortController

globalThis.serve = function serve(arg) {
  if (typeof arg === "function") handler = arg;
  else if (arg && typeof arg.fetch === "function") handler = (req) => arg.fetch(req);
  else throw new TypeError("serve() takes a function or an object with a fetch(request) method");
  return { stop() { handler = null; } };
};

async function handleRequest(h, body) {
  const ac = new AbortController();
  dispatches.set(h.id, ac);
  try {
    if (handler === null) {
      send({ op: "response_error", id: h.id, code: "no_handler",
        error: { name: "Error", message: "the guest has not registered a serve() handler", stack: "" } });
      return;
    }
    let reqBody = null;
    if (h.body === "inline") reqBody = body;
    else if (h.body) reqBody = inboundStream(h.body.sid, ac.signal);
    const init = { method: h.method, headers: h.headers, signal: ac.signal, redirect: h.redirect };
    if (reqBody !== null) { init.body = reqBody; init.duplex = "half"; }
    const req = new Request(h.url, init);
    const resp = await handler(req);
    let status;
    try { status = responseStatus(resp); } catch { throw new TypeError("the serve() handler must return a Response"); }
    const head = { op: "response", id: h.id, status,
      statusText: sliceString(responseStatusText(resp), 0, MAX_STATUS_TEXT), headers: headerPairs(responseHeaders(resp)) };
    checkHead("", head.headers);
    await sendWithBody(head, responseBody(resp));
  } catch (e) {
    send({ op: "response_error", id: h.id, error: describe(e) });
  } finally {
    dispatches.delete(h.id);
  }
}

// ---- fetch() -------------------------------------------------------------------------------------
let nextFetch = 1;
const fetches = new Map(); // id -> {resolve, reject, signal}
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);

globalThis.fetch = async function fetch(input, init = undefined) {
  const req = new Request(input, init);
  const signal = requestSignal(req);
  signal.throwIfAborted(); // an aborted signal rejects with its reason (AbortError), as the platform does
  if (!config.fetch) {
    throw new TypeError("fetch() is unavailable: no fetch callback was given to this runtime by the host");
  }
  if (fetches.size >= MAX_PENDING_FETCHES) {
    throw new TypeError(`fetch() refused: ${MAX_PENDING_FETCHES} pending fetch() calls, the limit for this runtime`);
  }
  if (inStreams.size + outStreams.size >= MAX_STREAMS) {
    throw new TypeError(`fetch() refused: ${MAX_STREAMS} open bodies, the limit for this runtime; read or cancel some`);
  }
  const id = nextFetch++;
  const head = { op: "fetch", id, method: requestMethod(req), url: requestUrl(req),
    headers: headerPairs(requestHeaders(req)), redirect: requestRedirect(req) };
  checkHead(head.url, head.headers, head.method);
  return await new Promise((resolve, reject) => {
    const entry = { resolve, reject, signal };
    fetches.set(id, entry);
    entry.onAbort = () => {
      if (fetches.delete(id)) { send({ op: "fetch_abort", id }); reject(signal.reason); }
    };
    signal.addEventListener("abort", entry.onAbort, { once: true });
    sendWithBody(head, requestBody(req)).catch((e) => {
      if (fetches.delete(id)) { send({ op: "fetch_abort", id }); reject(e); }
    });
  });
};

function onFetchResponse(h, body) {
  const entry = fetches.get(h.id);
  if (!entry) { if (h.body && h.body.sid) send({ op: "cancel", sid: h.body.sid }); return; }
  fetches.delete(h.id);
  if (h.op === "fetch_error") {
    entry.signal.removeEventListener("abort", entry.onAbort);
    entry.reject(new TypeError(h.message));
    return;
  }
  let stream = null;
  if (h.body === "inline") stream = body;
  else if (h.body) stream = inboundStream(h.body.sid, entry.signal);
  if (NULL_BODY_STATUS.has(h.status)) {
    if (stream instanceof ReadableStream) stream.cancel();
    stream = null;
  }
  entry.signal.removeEventListener("abort", entry.onAbort);
  try {
    const resp = new Response(stream, { status: h.status, statusText: h.statusText ?? "", headers: h.headers });
    defineProperty(resp, "url", { value: h.url ?? "", enumerable: true });
    defineProperty(resp, "redirected", { value: !!h.redirected, enumerable: true });
    entry.resolve(resp);
  } catch (e) {
    if (stream instanceof ReadableStream) stream.cancel();
    entry.reject(new TypeError(`invalid response from the fetch callback: ${e.message}`));
  }
}

// ---- tools ---------------------------------------------------------------------------------------
// `tools.<name>(...args)` calls the host's tool (wire/tools.py, client/tools.py): the arguments are
// packed values (one ReadableStream argument streams as an outbound body), the answer a value
// (`tool_result` with `v`) or, for an async generator tool, an inbound stream with one chunk per
// item: u32 BE header length, a JSON header ({v} an item, {error} the failure after the items
// before it), the item's blobs. A generator tool returns its ReadableStream at once (async
// iterable; bytes items can be piped into a Response); its first read waits for the answer, and
// cancelling it (`break` in `for await`) stops the host's generator.
let MAX_PENDING_TOOLS;
let nextTool = 1;
const toolCalls = new Map(); // id -> {resolve, reject}

function setupTools(h) {
  const tools = {};
  const define = (name, fn) => defineProperty(tools, name, { value: fn, enumerable: true });
  // methods (named as the tool, no [[Construct]]), each bound to its name here
  for (const name of h.tools) define(name, { async [name](...args) { return await callTool(name, args).done; } }[name]);
  for (const name of h.stream_tools) define(name, { [name](...args) { return toolItems(name, args); } }[name]);
  Object.freeze(tools);
  defineProperty(globalThis, "tools", { value: tools, enumerable: false, writable: false, configurable: false });
}

function toolError(name, message) {
  const e = name === "TypeError" ? new TypeError(message) : new Error(message);
  if (e.name !== name) defineProperty(e, "name", { value: name, writable: true, configurable: true });
  return e;
}

// Send the call; {id, done}: `done` settles with the answer (a value, or the items' inbound stream).
function callTool(name, args) {
  if (toolCalls.size >= MAX_PENDING_TOOLS) {
    throw new TypeError(`tools.${name}() refused: ${MAX_PENDING_TOOLS} tool calls pending, the limit for this runtime`);
  }
  let stream = null;
  let at = 0;
  const plain = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] instanceof ReadableStream) {
      if (stream !== null) throw new TypeError(`tools.${name}: at most one ReadableStream argument per call`);
      if (inStreams.size + outStreams.size >= MAX_STREAMS) {
        throw new TypeError(`tools.${name}() refused: ${MAX_STREAMS} open bodies, the limit for this runtime`);
      }
      stream = args[i];
      at = i;
      defineProperty(plain, i, { value: null, writable: true, enumerable: true, configurable: true });
    } else {
      defineProperty(plain, i, { value: args[i], writable: true, enumerable: true, configurable: true });
    }
  }
  const { v, blobs } = packValue(plain, `tools.${name}: arguments`);
  const body = blobsBody(blobs) ?? new Uint8Array(0); // before the call is counted: nothing after may throw
  const id = nextTool++;
  const done = new Promise((resolve, reject) => {
    toolCalls.set(id, { resolve, reject });
    const head = { op: "tool", id, name, v, at };
    sendWithBody(head, stream, body).catch((e) => {
      if (toolCalls.delete(id)) { send({ op: "tool_abort", id }); reject(e); }
    });
  });
  return { id, done };
}

function onToolAnswer(h, body) {
  const call = toolCalls.get(h.id);
  if (!call) { if (h.items != null) send({ op: "cancel", sid: h.items }); return; }
  toolCalls.delete(h.id);
  if (h.op === "tool_error") call.reject(toolError(h.name, h.message));
  else if (h.items != null) call.resolve(inboundStream(h.items, null));
  else {
    try { call.resolve(unpackValue(h.v, body)); } catch (e) { call.reject(e); }
  }
}

// the items' own stream is read through methods captured here: a guest that patched
// ReadableStream.prototype.getReader (or the reader's read) would otherwise fail the stream it
// sees and leave the items' stream, unreachable, holding the host's generator for the runtime's life
const getReaderOf = uncurry(ReadableStream.prototype.getReader);
const readFrom = uncurry(ReadableStreamDefaultReader.prototype.read);
const cancelReader = uncurry(ReadableStreamDefaultReader.prototype.cancel);

function toolItems(name, args) {
  const { id, done } = callTool(name, args); // a TypeError for what cannot be sent: thrown here, at the call
  done.catch(() => {}); // a stream never read must not report its call's failure as unhandled
  let reader = null;
  return new ReadableStream({
    async pull(controller) {
      if (reader === null) reader = getReaderOf(await done);
      const r = await readFrom(reader);
      if (r.done) { controller.close(); return; }
      const chunk = r.value;
      const n = byteLengthOf(chunk);
      const hlen = ((chunk[0] << 24) | (chunk[1] << 16) | (chunk[2] << 8) | chunk[3]) >>> 0;
      const header = parseJSON(decodeText(dec, sliceView(chunk, 4, hlen)));
      if (header.error) {
        cancelReader(reader).catch(() => {});
        throw toolError(String(header.error.name), String(header.error.message));
      }
      controller.enqueue(unpackValue(header.v, sliceView(chunk, 4 + hlen, n - 4 - hlen)));
    },
    cancel(reason) {
      if (reader !== null) return cancelReader(reader, reason);
      if (toolCalls.delete(id)) send({ op: "tool_abort", id }); // no answer yet: the host stops the call
      done.catch(() => {});
    },
  }, new CountQueuingStrategy({ highWaterMark: 0 }));
}

// ---- console -------------------------------------------------------------------------------------
// Every console method of the guest is Deno's own, formatting as Deno prints (inspect, %s/%d/%o/%c,
// group indentation, table boxes, count/time/assert semantics and their warnings), but printing
// into `printed` here instead of to stdout: one call of a method is one entry for the host, with
// the method, the level Deno printed at, that text, the call's arguments as marshalled values and
// the group depth. A call that prints nothing (time(), groupEnd(), assert(true)) makes no entry,
// except clear(), whose entry has no text (no terminal escape sequences travel).
let printed = null; // the text Deno's console printed during the current call, or null outside one
let printedLevel = -1; // the highest level it printed at: 0 debug, 1 log, 2 warn, 3 error, 4 trace
const sink = new DenoConsole((text, level) => {
  if (printed === null) return;
  printed += text;
  if (level > printedLevel) printedLevel = level;
});
const LEVELS = { __proto__: null, 0: "debug", 1: "log", 2: "warn", 3: "error", 4: "trace" }; // no prototype to patch
// the level of an entry Deno did not print (a report whose formatting failed)
const METHOD_LEVELS = { __proto__: null, debug: "debug", info: "info", warn: "warn", error: "error", trace: "trace" };
const BOOTSTRAP_URL = import.meta.url;
// how a frame of this file reads: Deno's default stack text has the URL, a CallSite (what
// Error.prepareStackTrace, section modules, prints) has the path
const BOOTSTRAP_PATH = new URL(import.meta.url).pathname + ":";
const stringIncludes = uncurry(String.prototype.includes);
const stringIndexOf = uncurry(String.prototype.indexOf);
const stringEndsWith = uncurry(String.prototype.endsWith);
let groupDepth = 0;

// A guest that logs without end must not flood its daemon (and, through it, every other runtime
// there): at most CONSOLE_RATE entries per second reach the host; the rest are counted, and the
// count is reported with the next entry that gets through.
let consoleWindow = 0;
let consoleSent = 0;
let consoleDropped = 0;

// `report`: the bootstrap reporting an uncaught error, where a guest's throwing custom inspect
// must not throw again; a guest's own call throws what Deno's console throws, as in Deno.
function consoleCall(method, args, report = false) {
  if (!config?.console) return;
  const depth = groupDepth;
  const outer = printed, outerLevel = printedLevel; // a custom inspect may log while being formatted
  printed = "";
  printedLevel = -1;
  let text, level;
  try {
    apply(sink[method], sink, args);
  } catch (e) {
    if (!report) throw e;
    printed += `<console.${method} failed: ${describe(e).message}>`;
  } finally {
    text = printed;
    level = printedLevel;
    printed = outer;
    printedLevel = outerLevel;
  }
  if (method === "group" || method === "groupCollapsed") groupDepth++;
  else if (method === "groupEnd") groupDepth = groupDepth > 0 ? groupDepth - 1 : 0;
  else if (method === "clear") { groupDepth = 0; text = ""; }
  if (text === "" && method !== "clear") return;
  if (stringEndsWith(text, "\n")) text = sliceString(text, 0, text.length - 1); // Deno ends each line
  if (method === "trace") text = withoutBootstrapFrames(text);
  const name = method === "info" && level === 1 ? "info" : (LEVELS[level] ?? METHOD_LEVELS[method] ?? "log");
  emitEntry(method, name, text, depth, args);
}

// (no split(): it would look up a Symbol.split the guest may have put on String.prototype)
function withoutBootstrapFrames(text) {
  let out = "";
  for (let start = 0; start <= text.length;) {
    let end = stringIndexOf(text, "\n", start);
    if (end < 0) end = text.length;
    const line = sliceString(text, start, end);
    if (!stringIncludes(line, BOOTSTRAP_URL) && !stringIncludes(line, `(${BOOTSTRAP_PATH}`)) {
      out += (out === "" ? "" : "\n") + line;
    }
    start = end + 1;
  }
  return out;
}

function emitEntry(method, level, text, depth, args) {
  const now = Math.floor(performance.now() / 1000);
  if (now !== consoleWindow) { consoleWindow = now; consoleSent = 0; }
  if (consoleSent >= CONSOLE_RATE) { consoleDropped++; return; }
  consoleSent++;
  if (consoleDropped) {
    const notice = `…[${consoleDropped} console entries dropped: over ${CONSOLE_RATE}/s]`;
    send({ op: "console", method: "warn", level: "warn", text: notice, depth: 0, v: [notice] });
    consoleDropped = 0;
  }
  // entries are bounded so that legitimate logging can never exceed a frame limit downstream
  if (text.length > MAX_CONSOLE) text = sliceString(text, 0, MAX_CONSOLE) + "…[truncated]";
  const { v, blobs } = consoleArgs(method, args);
  send({ op: "console", method, level, text, depth, v }, blobsBody(blobs));
}

// The arguments as marshalled values, together within MAX_CONSOLE_VALUE bytes. What cannot be sent
// (a function, a Map, a class instance, a cycle), at any depth, is replaced by its formatted text;
// an argument too large or too deep, or not fitting beside the others, arrives as its formatted
// text cut to what is left: the entry is never dropped. Past MAX_CONSOLE_ARGS, one text says how
// many more there were.
function consoleArgs(method, args) {
  const where = `console.${method}: the arguments`;
  const some = [];
  for (let i = 0; i < args.length && i < MAX_CONSOLE_ARGS; i++) put(some, i, args[i]);
  if (args.length > MAX_CONSOLE_ARGS) put(some, MAX_CONSOLE_ARGS, `…[${args.length - MAX_CONSOLE_ARGS} more arguments]`);
  try {
    const packed = packValue(some, where, formatArg);
    if (packedSize(packed) <= MAX_CONSOLE_VALUE) return packed;
  } catch { /* one by one, below */ }
  let room = MAX_CONSOLE_VALUE - 8; // the array's brackets
  for (let i = 0; i < some.length; i++) {
    let size = -1;
    try { size = packedSize(packValue(some[i], where, formatArg)); } catch { /* its text, below */ }
    if (size < 0 || size > room) {
      const text = textWithin(formatArg(some[i]), room);
      put(some, i, text);
      size = packedSize({ v: text, blobs: [] });
    }
    room -= size + 1;
  }
  return packValue(some, where, formatArg);
}

// `text`, cut (and marked so) until its JSON takes at most `room` bytes with the mark
function textWithin(text, room) {
  const MARK = "…[truncated]";
  if (packedSize({ v: text, blobs: [] }) <= room) return text;
  let cut = room > 32 ? sliceString(text, 0, room - 32) : "";
  while (cut !== "" && packedSize({ v: cut, blobs: [] }) > room - 32) cut = sliceString(cut, 0, cut.length >> 1);
  return cut + MARK;
}

function packedSize(packed) {
  let size = byteLengthOf(encodeText(enc, stringify(packed.v, asStored)));
  for (let i = 0; i < packed.blobs.length; i++) size += byteLengthOf(packed.blobs[i]);
  return size;
}

function formatArg(arg) {
  if (typeof arg === "string") return arg;
  try { return inspect(arg, { depth: 4, colors: false }); } catch { return "<uninspectable value>"; }
}

const guestConsole = {};
for (const method of ["log", "info", "debug", "warn", "error", "trace", "assert", "dir", "dirxml", "table", "group",
  "groupCollapsed", "groupEnd", "count", "countReset", "time", "timeLog", "timeEnd", "clear"]) {
  defineProperty(guestConsole, method, {
    value: { [method](...args) { consoleCall(method, args); } }[method], // named, and no [[Construct]]
    writable: true, enumerable: true, configurable: true,
  });
}
for (const method of ["profile", "profileEnd", "timeStamp"]) { // Deno's print nothing: neither do ours
  defineProperty(guestConsole, method, { value: { [method]() {} }[method], writable: true, enumerable: true,
    configurable: true });
}
globalThis.console = guestConsole;

// Deno ends the process on an unhandled rejection or uncaught error; a sandbox reports it instead.
addEventListener("unhandledrejection", (e) => {
  e.preventDefault();
  consoleCall("error", ["Uncaught (in promise)", e.reason], true);
});
addEventListener("error", (e) => {
  e.preventDefault();
  consoleCall("error", ["Uncaught", e.error ?? e.message], true);
});

// ---- dispatch of daemon messages -------------------------------------------------------------
function handle(h, body) {
  if (config === null && h.op !== "init") fatal(`${h.op} before init`);
  switch (h.op) {
    case "init": init(h); break;
    case "eval": runEval(h); break;
    case "request": handleRequest(h, body); break;
    case "abort": // the client gave up: the daemon has answered for us, so forget the exchange
      dispatches.get(h.id)?.abort(new DOMException("the client went away", "AbortError"));
      dispatches.delete(h.id);
      break;
    case "fetch_response": case "fetch_error": onFetchResponse(h, body); break;
    case "tool_result": case "tool_error": onToolAnswer(h, body); break;
    case "chunk": case "end": case "error": onInbound(h, body); break;
    case "ack": onAck(h); break;
    case "module_source": case "module_error": onModuleAnswer(h, body); break;
    case "cancel": onOutCancel(h); break;
    case "stats":
      send({ op: "stats", id: h.id, inbound: inStreams.size, outbound: outStreams.size, fetches: fetches.size,
        dispatches: dispatches.size, tools: toolCalls.size });
      break;
    case "ping": send({ op: "pong", id: h.id }); break; // the event loop turns: CPU limit, daemon/limits.py
    default: fatal(`unknown op ${h.op}`);
  }
}

send({ op: "ready" });
readLoop();
