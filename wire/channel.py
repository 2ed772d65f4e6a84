"""Reading the guest channel (the Deno process's stdout) with as few copies as possible.

Small frames (acks, credits, heads) are parsed out of one staging buffer. A body that is not
already in the staging buffer gets a buffer of its own, and the rest of it is read from the pipe
straight into that buffer: one kernel copy, no Python-level copy, which matters because every
streamed byte of a runtime crosses this pipe.

The reader is sans-asyncio: ``feed`` reads what the non-blocking fd has and returns whole frames.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from wire.guest import GUEST_TO_DAEMON

#: ops a guest may send (wire/guest.py).
GUEST_OPS = frozenset(GUEST_TO_DAEMON)
#: Largest frame a guest may send (a chunk is at most 256 KiB; headers are small).
MAX_GUEST_FRAME = 1024 * 1024
#: Largest JSON header in a guest frame.
#: (JSON escapes can make a header 6 bytes per character: the bootstrap's character limits, e.g.
#: 48 Ki characters of eval result, must always fit.)
MAX_GUEST_HEADER = 512 * 1024
#: Initial staging buffer; it grows only for a header that does not fit.
STAGE = 128 * 1024
#: Staging reads are small, so most of a large body is read straight into its own buffer.
READ_STEP = 16 * 1024

_U32x2 = struct.Struct(">II")


class GuestProtocolError(Exception):
    """The guest process broke the channel framing or sent an impossible message."""


def frame_head(header: bytes, body: Any = None) -> bytes:
    """Length prefix plus JSON ``header`` of one daemon->guest frame; the body is written after it
    as it is, never copied into the frame."""
    blen = 0 if body is None else memoryview(body).nbytes
    return _U32x2.pack(4 + len(header) + blen, len(header)) + header


def encode_frame(header: dict[str, Any], body: Any = None) -> tuple[bytes, Any]:
    """The two buffers of one daemon->guest frame (prefix+header, body) so the body is never copied."""
    return frame_head(json.dumps(header, separators=(",", ":")).encode(), body), body


def decode_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GuestProtocolError(f"frame header is not JSON: {exc}") from None
    op = header.get("op") if isinstance(header, dict) else header
    if not isinstance(header, dict) or op not in GUEST_OPS:
        raise GuestProtocolError(f"unknown guest op {str(op)[:40]!r}")
    return header


class FrameReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._stage = bytearray(STAGE)
        self._start = 0
        self._end = 0
        self._body: bytearray | None = None  # a body being read straight from the pipe
        self._body_pos = 0
        self._body_header: dict[str, Any] = {}

    def feed(self, max_frames: int = 256) -> tuple[list[tuple[dict[str, Any], Any]], bool]:
        """Read what the fd has now, up to ``max_frames`` whole frames: (frames, whether the pipe
        reached its end). The cap keeps one chatty guest from monopolising the event loop; the fd
        stays readable, so the caller is simply called again."""
        frames: list[tuple[dict[str, Any], Any]] = []
        while len(frames) < max_frames:
            if self._body is not None:
                n = self._read(memoryview(self._body)[self._body_pos :])
                if n is None or n == 0:
                    return frames, n == 0
                self._body_pos += n
                if self._body_pos == len(self._body):
                    frames.append((self._body_header, self._body))
                    self._body = None
                continue
            self._parse(frames, max_frames)
            if self._body is not None or len(frames) >= max_frames:
                continue
            if self._start == self._end:
                self._start = self._end = 0
            elif self._end == len(self._stage):  # keep the partial frame, make room after it
                rest = self._stage[self._start : self._end]
                self._stage[: len(rest)] = rest
                self._start, self._end = 0, len(rest)
                if self._end == len(self._stage):  # one header fills it: grow (bounded by _parse)
                    self._stage.extend(bytes(len(self._stage)))
            n = self._read(memoryview(self._stage)[self._end : self._end + READ_STEP])
            if n is None or n == 0:
                return frames, n == 0
            self._end += n
        return frames, False  # capped: frames may wait in the staging buffer, so call again soon

    def _read(self, into: memoryview) -> int | None:
        try:
            return os.readv(self.fd, [into])
        except BlockingIOError:
            return None

    def _parse(self, frames: list[tuple[dict[str, Any], Any]], max_frames: int) -> None:
        stage = self._stage
        while self._end - self._start >= 8 and len(frames) < max_frames:
            total, hlen = _U32x2.unpack_from(stage, self._start)
            if total > MAX_GUEST_FRAME or hlen > total - 4 or hlen > MAX_GUEST_HEADER:
                raise GuestProtocolError(f"frame length {total} (header {hlen}) out of bounds")
            head_end = self._start + 8 + hlen
            if self._end < head_end:
                return
            header = decode_header(bytes(stage[self._start + 8 : head_end]))
            blen = total - 4 - hlen
            have = self._end - head_end
            if have >= blen:
                frames.append((header, bytes(stage[head_end : head_end + blen])))
                self._start = head_end + blen
                continue
            body = bytearray(blen)
            body[:have] = stage[head_end : self._end]
            self._body, self._body_pos, self._body_header = body, have, header
            self._start = self._end = 0
            return
