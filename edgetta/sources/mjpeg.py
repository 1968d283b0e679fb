"""MJPEG over HTTP, parsed here with bounds on everything the server sends.

A part larger than ``Limits.max_part_bytes`` (by its Content-Length or by the bytes before the
next boundary), part headers longer than ``Limits.max_header_bytes``, or no complete frame for
``Limits.frame_timeout`` seconds (a stalled stream, one that drips a byte at a time, garbage
without a boundary) raise ``SourceError``: the caller reconnects with a warning.
"""
from __future__ import annotations

import re
import time
import urllib.request
from typing import Any, Callable, Iterator

from ..errors import SourceError

_CONTENT_LENGTH = re.compile(r"content-length:\s*(\d{1,15})")


def printable(data: str | bytes, limit: int = 160) -> str:
    """Remote text made safe for a log line: control and non-ASCII characters escaped, cut to
    ``limit`` characters."""
    if isinstance(data, bytes):
        data = data.decode("latin-1")
    out = data.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if 32 <= ord(c) < 127 else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[:limit] + "..."


class _Buffer:
    """Bytes read from the stream so far, refilled under the frame deadline."""

    def __init__(self, stream: Any, chunk: int, frame_timeout: float | None,
                 clock: Callable[[], float]):
        self.stream, self.chunk, self.clock = stream, chunk, clock
        self.frame_timeout = frame_timeout
        self.deadline = None if frame_timeout is None else clock() + frame_timeout
        self.data = b""

    def fill(self) -> bool:
        if self.deadline is not None and self.clock() > self.deadline:
            raise SourceError(f"no complete frame in {self.frame_timeout:g} s")
        read = getattr(self.stream, "read1", None) or self.stream.read
        data = read(self.chunk)
        self.data += data
        return bool(data)

    def frame_done(self) -> None:
        if self.frame_timeout is not None:
            self.deadline = self.clock() + self.frame_timeout


def mjpeg_parts(stream: Any, boundary: bytes, chunk: int = 1 << 16, head: bytes = b"",
                max_part_bytes: int = 16 << 20, max_header_bytes: int = 8192,
                frame_timeout: float | None = None,
                clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """The bodies of a multipart/x-mixed-replace response: Content-Length when a part gives
    one, else everything up to the next boundary. ``head``: bytes already read from it. Ends
    when the stream ends; raises ``SourceError`` when a bound is crossed."""
    delim = b"--" + boundary.lstrip(b"-")
    buf = _Buffer(stream, chunk, frame_timeout, clock)
    buf.data = head

    def until(token: bytes, start: int, cap: int, what: str) -> int | None:
        """Index of ``token`` at or after ``start``, reading more as needed (None at the end)."""
        while True:
            i = buf.data.find(token, start)
            if i >= 0:
                return i
            if len(buf.data) - start > cap:
                raise SourceError(f"{what} exceeds {cap:,} bytes")
            if not buf.fill():
                return None

    while True:
        start = until(delim, 0, max_part_bytes, "data without a boundary")
        if start is None:
            return
        head_end = until(b"\r\n\r\n", start, max_header_bytes, "part headers")
        if head_end is None:
            return
        headers = buf.data[start + len(delim):head_end].decode("latin-1").lower()
        buf.data = buf.data[head_end + 4:]
        m = _CONTENT_LENGTH.search(headers)
        if m:
            n = int(m.group(1))
            if n > max_part_bytes:
                raise SourceError(f"a part of {n:,} bytes exceeds the {max_part_bytes:,}-byte limit")
            while len(buf.data) < n:
                if not buf.fill():
                    return
            body, buf.data = buf.data[:n], buf.data[n:]
        else:
            end = until(delim, 0, max_part_bytes, "a part")
            if end is None:
                return
            body, buf.data = buf.data[:end].rstrip(b"\r\n"), buf.data[end:]
        buf.frame_done()
        yield body


def open_http(url: str, timeout: float) -> Any:
    """The response to a GET of ``url`` (socket timeout on connect and on every read)."""
    return urllib.request.urlopen(url, timeout=timeout)


def multipart_boundary(content_type: str) -> bytes | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    return m.group(1).strip().encode("latin-1") if m else None
