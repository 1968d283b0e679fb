"""Frame sources named the way users name them.

    0, 1 ...                  camera index            (OpenCV)
    /dev/video0               V4L2 device             (OpenCV)
    clip.mp4                  video file              (OpenCV)
    frames/                   image folder            (.npy, .ppm/.pgm without OpenCV; any image with it)
    stream.npz, frames.npy    frame arrays            (labels too, in an .npz)
    demo                      the built-in corrupted demo stream (labelled)
    rtsp://...  http://...    network streams         (OpenCV; MJPEG over http is parsed here)

Iterating a ``Source`` gives uint8 HWC RGB frames, or a ``SkippedFrame`` for a frame that
cannot be used (corrupt, empty, wrong shape, NaN), so that the caller counts it and goes on.
Network streams and cameras reconnect with bounded exponential back-off.
"""
from __future__ import annotations

import http.client
import re
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

CAPTURE_HINT = "pip install 'edgetta[capture]'"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm",
              ".pgm", ".ppm", ".pnm", ".pxm", ".sr", ".ras", ".exr", ".hdr", ".pic", ".avif"}
NETPBM_EXTS = {".ppm", ".pgm", ".pnm"}
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
              ".ts", ".mjpeg", ".mjpg", ".gif", ".3gp", ".ogv", ".y4m"}
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class SourceError(Exception):
    """A source that cannot be opened (or that stayed unreachable); one-line message."""


@dataclass(frozen=True)
class SkippedFrame:
    kind: str    # corrupt, empty, shape, nan, unsupported
    detail: str


def require_cv2(what: str) -> Any:
    try:
        import cv2
    except ImportError:
        raise SourceError(f"{what} needs OpenCV, which is not installed: {CAPTURE_HINT}") from None
    return cv2


def to_rgb_frame(arr: Any) -> np.ndarray | SkippedFrame:
    """A uint8 HWC RGB frame from an array, or why it cannot be one. Greyscale is expanded,
    an alpha channel dropped; floats are taken as 0..255."""
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.integer)
                                                or np.issubdtype(arr.dtype, np.floating)):
        what = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        return SkippedFrame("shape", f"not an integer or float image ({what})")
    if arr.size == 0:
        return SkippedFrame("empty", f"empty frame, shape {arr.shape}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        return SkippedFrame("shape", f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            return SkippedFrame("nan", "frame contains NaN or infinite values")
        if arr.dtype == np.uint16:
            arr = arr >> 8
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def read_netpbm(data: bytes) -> np.ndarray:
    """PGM/PPM (P2, P3, P5, P6) without OpenCV. Raises ValueError when malformed."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        m = re.compile(rb"\s*(#[^\n]*\n\s*)*(\S+)").match(data, pos)
        if m is None:
            raise ValueError("truncated header")
        tokens.append(m.group(2))
        pos = m.end()
    magic = tokens[0]
    if magic not in (b"P2", b"P3", b"P5", b"P6"):
        raise ValueError(f"not a PGM/PPM file (magic {magic[:2]!r})")
    w, h, maxval = (int(t) for t in tokens[1:4])
    if w <= 0 or h <= 0 or not 0 < maxval < 65536:
        raise ValueError(f"bad size {w}x{h} or maxval {maxval}")
    c = 3 if magic in (b"P3", b"P6") else 1
    n = w * h * c
    if magic in (b"P5", b"P6"):
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        body = data[pos + 1:pos + 1 + n * dtype.itemsize]
        if len(body) < n * dtype.itemsize:
            raise ValueError("truncated pixel data")
        px = np.frombuffer(body, dtype).astype(np.float64)
    else:
        px = np.array(data[pos:].split()[:n], dtype=np.float64)
        if px.size < n:
            raise ValueError("truncated pixel data")
    return np.round(px * (255.0 / maxval)).astype(np.uint8).reshape(h, w, c)


def read_image_file(path: Path) -> np.ndarray | SkippedFrame:
    """One frame from a file in an image folder: .npy, PGM/PPM, or (with OpenCV) any image."""
    try:
        if path.stat().st_size == 0:
            return SkippedFrame("empty", f"{path.name}: zero-size file")
        ext = path.suffix.lower()
        if ext == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except Exception as e:  # noqa: BLE001  (numpy raises many types for bad files)
                return SkippedFrame("corrupt", f"{path.name}: unreadable .npy ({e})")
            if arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            return to_rgb_frame(arr)
        data = path.read_bytes()
    except OSError as e:
        return SkippedFrame("corrupt", f"{path.name}: {e.strerror or e}")
    if ext in NETPBM_EXTS and data[:2] in (b"P2", b"P3", b"P5", b"P6"):
        try:
            return to_rgb_frame(read_netpbm(data))
        except ValueError as e:
            return SkippedFrame("corrupt", f"{path.name}: {e}")
    try:
        import cv2
    except ImportError:
        return SkippedFrame("unsupported", f"{path.name}: reading {ext} images needs OpenCV "
                                           f"({CAPTURE_HINT}); without it use .npy, .ppm or .pgm")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return SkippedFrame("corrupt", f"{path.name}: not a decodable image")
    return to_rgb_frame(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def decode_jpeg(data: bytes) -> np.ndarray | SkippedFrame:
    import cv2
    if not data:
        return SkippedFrame("empty", "empty image part")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return SkippedFrame("corrupt", f"undecodable image part ({len(data)} bytes)")
    return to_rgb_frame(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def mjpeg_parts(stream: Any, boundary: bytes, chunk: int = 1 << 16, head: bytes = b"") -> Iterator[bytes]:
    """The bodies of a multipart/x-mixed-replace response: Content-Length when a part gives
    one, else everything up to the next boundary. ``head``: bytes already read from it."""
    delim = b"--" + boundary.lstrip(b"-")
    buf = head

    def fill() -> bool:
        nonlocal buf
        data = stream.read1(chunk) if hasattr(stream, "read1") else stream.read(chunk)
        buf += data
        return bool(data)

    while True:
        start = buf.find(delim)
        while start < 0:
            buf = buf[-len(delim):]
            if not fill():
                return
            start = buf.find(delim)
        head_end = buf.find(b"\r\n\r\n", start)
        while head_end < 0:
            if not fill():
                return
            head_end = buf.find(b"\r\n\r\n", start)
        headers = buf[start + len(delim):head_end].decode("latin-1").lower()
        buf = buf[head_end + 4:]
        m = re.search(r"content-length:\s*(\d+)", headers)
        if m:
            n = int(m.group(1))
            while len(buf) < n:
                if not fill():
                    return
            body, buf = buf[:n], buf[n:]
        else:
            end = buf.find(delim)
            while end < 0:
                if not fill():
                    return
                end = buf.find(delim)
            body, buf = buf[:end].rstrip(b"\r\n"), buf[end:]
        yield body


class Source:
    """An iterable of frames (or ``SkippedFrame``) with what the caller needs to know."""

    def __init__(self, name: str, frames: Callable[[], Iterator[Any]], labels: np.ndarray | None = None,
                 live: bool = False):
        self.name = name
        self.labels = labels
        self.live = live          # a camera or network stream: reconnects, never "ends"
        self.reconnects = 0
        self._frames = frames

    def __iter__(self) -> Iterator[np.ndarray | SkippedFrame]:
        return self._frames()


@dataclass
class Backoff:
    """Reconnect delays: ``initial`` doubling up to ``maximum``; give up after ``attempts``
    failures in a row (0: never)."""
    initial: float = 0.5
    maximum: float = 30.0
    attempts: int = 10

    def delay(self, failure: int) -> float:
        return min(self.maximum, self.initial * 2 ** (failure - 1))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _reconnecting(src: Source, connect: Callable[[], Iterator[Any]], backoff: Backoff,
                  stop: threading.Event) -> Iterator[Any]:
    failures = 0
    while not stop.is_set():
        try:
            for item in connect():
                failures = 0
                yield item
            reason = "the stream ended"
        except (OSError, SourceError, http.client.HTTPException) as e:  # URLError, timeouts: OSError
            reason = str(e) or type(e).__name__
        failures += 1
        if backoff.attempts and failures > backoff.attempts:
            raise SourceError(f"{src.name}: gave up after {backoff.attempts} reconnect attempts: {reason}")
        delay = backoff.delay(failures)
        _log(f"warning: {src.name}: {reason}; reconnecting in {delay:.2f}s "
             f"(attempt {failures}{'/' + str(backoff.attempts) if backoff.attempts else ''})")
        if stop.wait(delay):
            return
        src.reconnects += 1


def _capture_frames(cv2: Any, open_capture: Callable[[], Any], what: str, live: bool) -> Iterator[Any]:
    cap = open_capture()
    try:
        if not cap.isOpened():
            raise SourceError(f"cannot open {what}")
        while True:
            ok, img = cap.read()
            if not ok:
                if live:
                    raise SourceError(f"{what}: no frame could be read")
                return
            if img is None or img.size == 0:
                yield SkippedFrame("empty", f"{what}: empty frame")
                continue
            yield to_rgb_frame(cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if img.ndim == 3 and img.shape[-1] == 3
                               else img)
    finally:
        cap.release()


def _http_frames(url: str, timeout: float) -> Iterator[Any]:
    """MJPEG over http(s) parsed here (a corrupt part is skipped, the stream goes on); any
    other content (an HLS playlist, an mp4) goes to OpenCV's FFmpeg backend."""
    resp = urllib.request.urlopen(url, timeout=timeout)
    try:
        ctype = resp.headers.get("Content-Type", "")
        if ctype.lower().startswith("multipart/"):
            m = re.search(r'boundary="?([^";]+)"?', ctype)
            if not m:
                raise SourceError(f"{url}: multipart stream without a boundary")
            for body in mjpeg_parts(resp, m.group(1).strip().encode("latin-1")):
                yield decode_jpeg(body)
            return
        if ctype.lower().startswith("image/"):  # a snapshot URL: poll it
            yield decode_jpeg(resp.read())
            return
        # ffmpeg's mpjpeg muxer serves application/octet-stream: recognise the first boundary
        first = resp.readline(256)
        if first.startswith(b"--") and len(first.strip()) > 2:
            for body in mjpeg_parts(resp, first.strip()[2:], head=first):
                yield decode_jpeg(body)
            return
    finally:
        resp.close()
    yield from _ffmpeg_url_frames(url, timeout)


def _ffmpeg_url_frames(url: str, timeout: float) -> Iterator[Any]:
    cv2 = require_cv2(url)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(timeout * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(timeout * 1000)]
    yield from _capture_frames(cv2, lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params), url, live=True)


def _array_frames(images: np.ndarray) -> Iterator[Any]:
    for img in images:
        yield to_rgb_frame(np.asarray(img))


def _folder_frames(folder: Path) -> Iterator[Any]:
    files = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS | {".npy"})
    for path in files:
        yield read_image_file(path)


def _npy_images(path: Path) -> np.ndarray:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        return arr[None]  # a single frame
    if arr.ndim in (3, 4):
        return arr       # N greyscale frames, or N HWC frames
    raise SourceError(f"{path}: expected frames N x H x W (x C), got an array of shape {arr.shape}")


def open_source(spec: str, loop: bool = False, backoff: Backoff | None = None,
                stop: threading.Event | None = None, timeout: float = 10.0) -> Source:
    """Open ``spec`` (see the module docstring). Files and folders are checked now, so a wrong
    name fails before anything starts; network streams connect on iteration. ``loop`` replays
    a finite source (file, folder, array) from the start when it ends."""
    backoff = backoff or Backoff()
    stop = stop or threading.Event()
    spec = str(spec)

    def looping(frames: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
        def gen() -> Iterator[Any]:
            while True:
                n = 0
                for item in frames():
                    n += 1
                    yield item
                if not loop or n == 0 or stop.is_set():
                    return
        return gen

    if spec.lower().startswith(NETWORK_SCHEMES):
        require_cv2(f"the stream {spec}")
        src = Source(spec, lambda: iter(()), live=True)
        if spec.lower().startswith(("http://", "https://")):
            def connect() -> Iterator[Any]:
                return _http_frames(spec, timeout)
        else:
            def connect() -> Iterator[Any]:
                return _ffmpeg_url_frames(spec, timeout)
        src._frames = lambda: _reconnecting(src, connect, backoff, stop)
        return src

    if re.fullmatch(r"\d+", spec) or spec.startswith("/dev/video"):
        what = f"camera {spec}"
        cv2 = require_cv2(what)
        if spec.startswith("/dev/video") and not Path(spec).exists():
            raise SourceError(f"{spec} does not exist (no such V4L2 device)")
        if spec.isdigit():
            def open_capture() -> Any:
                return cv2.VideoCapture(int(spec))
        else:
            def open_capture() -> Any:
                return cv2.VideoCapture(spec, cv2.CAP_V4L2)
        cap = open_capture()
        opened = cap.isOpened()
        cap.release()
        if not opened:
            raise SourceError(f"cannot open {what}")
        src = Source(what, lambda: iter(()), live=True)
        src._frames = lambda: _reconnecting(
            src, lambda: _capture_frames(cv2, open_capture, what, live=True), backoff, stop)
        return src

    if spec == "demo" or spec.lower().endswith(".npz"):
        from .streams import load_stream
        try:
            s = load_stream(spec)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise SourceError(str(e)) from None
        return Source(s.description or spec, looping(lambda: _array_frames(s.images)), labels=s.labels)

    path = Path(spec)
    if not path.exists():
        raise SourceError(f"source {spec} not found: give a camera index (0), /dev/videoN, a video "
                          "file, an image folder, a .npy/.npz file, 'demo', or an rtsp:// or "
                          "http:// URL")
    if path.is_dir():
        return Source(str(path), looping(lambda: _folder_frames(path)))
    if path.suffix.lower() == ".npy":
        try:
            images = _npy_images(path)
        except ValueError as e:
            raise SourceError(f"{path}: not a readable .npy file ({e})") from None
        return Source(str(path), looping(lambda: _array_frames(images)))
    if path.suffix.lower() in IMAGE_EXTS:
        return Source(str(path), looping(lambda: iter([read_image_file(path)])))
    cv2 = require_cv2(f"the video file {path}")
    cap = cv2.VideoCapture(str(path))
    opened = cap.isOpened()
    cap.release()
    if not opened:
        raise SourceError(f"cannot open the video file {path} (not a video OpenCV can read)")
    return Source(str(path), looping(lambda: _capture_frames(
        cv2, lambda: cv2.VideoCapture(str(path)), str(path), live=False)))
