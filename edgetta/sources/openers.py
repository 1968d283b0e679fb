"""Frame sources named the way users name them, one small opener class each, tried in order.

    rtsp://...  http://...    network streams         (MJPEG over http parsed here; others OpenCV)
    0, 1 ... /dev/video0      camera                  (OpenCV)
    demo, stream.npz          labelled frame arrays   (the built-in demo stream, or yours)
    frames.npy                frame array
    frames/                   image folder            (Pillow: JPEG, PNG, ...; PGM/PPM; .npy)
    photo.jpg                 one image               (Pillow)
    clip.mp4                  video file              (OpenCV)

Iterating a ``Source`` gives uint8 HWC RGB frames, or a ``SkippedFrame`` for a frame that
cannot be used, so that the caller counts it and goes on. Network streams and cameras
reconnect with bounded exponential back-off.
"""
from __future__ import annotations

import http.client
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from ..errors import FrameError, SourceError
from ..preprocess import to_rgb_frame
from ..streams import load_npy_images, load_stream
from .decode import (Limits, decode_image, pillow, read_image_file, require_cv2,
                     require_pillow)
from .mjpeg import mjpeg_parts, multipart_boundary, open_http, printable

log = logging.getLogger("edgetta.sources")

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pbm",
              ".pgm", ".ppm", ".pnm", ".jp2", ".ico", ".tga"}
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class StreamError(SourceError):
    """A live stream misbehaved (stalled, too large, malformed): reconnect, do not give up."""


@dataclass(frozen=True)
class SkippedFrame:
    kind: str    # corrupt, empty, shape, nan, unsupported, too_large
    detail: str


Item = "np.ndarray | SkippedFrame"


def checked(make: Callable[[], np.ndarray]) -> np.ndarray | SkippedFrame:
    """A frame, or the ``SkippedFrame`` saying why it is not one."""
    try:
        return make()
    except FrameError as e:
        return SkippedFrame(e.kind, str(e))


@dataclass
class Backoff:
    """Reconnect delays: ``initial`` doubling up to ``maximum``; give up after ``attempts``
    failures in a row (0: never)."""
    initial: float = 0.5
    maximum: float = 30.0
    attempts: int = 10

    def delay(self, failure: int) -> float:
        return min(self.maximum, self.initial * 2 ** (failure - 1))


@dataclass
class OpenContext:
    """What every opener may need: replay, reconnect policy, the stop flag, limits."""
    loop: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    stop: threading.Event = field(default_factory=threading.Event)
    timeout: float = 10.0
    limits: Limits = field(default_factory=Limits)


class Source:
    """An iterable of frames (or ``SkippedFrame``) with what the caller needs to know.
    ``live``: a camera or network stream (it reconnects; a reader keeps only its newest frame)."""

    def __init__(self, name: str, frames: Callable[[], Iterator[Any]],
                 labels: np.ndarray | None = None, live: bool = False):
        self.name = name
        self.labels = labels
        self.live = live
        self.reconnects = 0
        self.frames = frames

    def __iter__(self) -> Iterator[Any]:
        return self.frames()


class Opener(Protocol):
    def matches(self, spec: str) -> bool: ...
    def open(self, spec: str, ctx: OpenContext) -> Source: ...


def reconnecting(src: Source, connect: Callable[[], Iterator[Any]], ctx: OpenContext) -> Iterator[Any]:
    """Frames from ``connect()``, reconnecting with back-off when it ends or fails."""
    failures = 0
    backoff = ctx.backoff
    while not ctx.stop.is_set():
        try:
            for item in connect():
                failures = 0
                yield item
            reason = "the stream ended"
        except (OSError, StreamError, http.client.HTTPException) as e:  # URLError, timeouts: OSError
            reason = printable(str(e) or type(e).__name__)
        failures += 1
        if backoff.attempts and failures > backoff.attempts:
            raise SourceError(f"{src.name}: gave up after {backoff.attempts} reconnect attempts: {reason}")
        delay = backoff.delay(failures)
        log.warning("%s: %s; reconnecting in %.2fs (attempt %d%s)", src.name, reason, delay, failures,
                    f"/{backoff.attempts}" if backoff.attempts else "")
        if ctx.stop.wait(delay):
            return
        src.reconnects += 1


def looping(frames: Callable[[], Iterator[Any]], ctx: OpenContext) -> Callable[[], Iterator[Any]]:
    """Replay a finite source from the start when ``ctx.loop``."""
    def gen() -> Iterator[Any]:
        while True:
            n = 0
            for item in frames():
                n += 1
                yield item
            if not ctx.loop or n == 0 or ctx.stop.is_set():
                return
    return gen


def capture_frames(cv2: Any, open_capture: Callable[[], Any], what: str, live: bool,
                   limits: Limits) -> Iterator[Any]:
    cap = open_capture()
    try:
        if not cap.isOpened():
            raise (StreamError if live else SourceError)(f"cannot open {what}")
        while True:
            ok, img = cap.read()
            if not ok:
                if live:
                    raise StreamError(f"{what}: no frame could be read")
                return
            if img is None or img.size == 0:
                yield SkippedFrame("empty", f"{what}: empty frame")
                continue
            if img.ndim == 3 and img.shape[-1] == 3:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            yield checked(lambda: to_rgb_frame(img))
    finally:
        cap.release()


class NetworkOpener:
    """http(s): MJPEG parsed here (no OpenCV needed), snapshot URLs polled; anything else
    (rtsp, HLS, an mp4 over http) through OpenCV's FFmpeg backend."""

    def matches(self, spec: str) -> bool:
        return spec.lower().startswith(NETWORK_SCHEMES)

    def open(self, spec: str, ctx: OpenContext) -> Source:
        is_http = spec.lower().startswith(("http://", "https://"))
        if is_http:
            require_pillow(f"the stream {spec}")
        else:
            require_cv2(f"the stream {spec}")
        src = Source(spec, lambda: iter(()), live=True)
        connect = (lambda: self._http(spec, ctx)) if is_http else (lambda: self._ffmpeg(spec, ctx))
        src.frames = lambda: reconnecting(src, connect, ctx)
        return src

    def _http(self, url: str, ctx: OpenContext) -> Iterator[Any]:
        lim = ctx.limits
        # a read may block this long; the frame deadline covers a stream that drips bytes
        resp = open_http(url, min(ctx.timeout, lim.frame_timeout))
        try:
            ctype = resp.headers.get("Content-Type", "")
            if ctype.lower().startswith("multipart/"):
                boundary = multipart_boundary(ctype)
                if boundary is None:
                    raise StreamError(f"multipart stream without a boundary ({printable(ctype)})")
                head = b""
            elif ctype.lower().startswith("image/"):  # a snapshot URL: poll it
                data = resp.read(lim.max_part_bytes + 1)
                yield checked(lambda: decode_image(data, "snapshot", lim))
                return
            else:
                # ffmpeg's mpjpeg muxer says application/octet-stream: the first line is the boundary
                head = resp.readline(256)
                if not (head.startswith(b"--") and len(head.strip()) > 2):
                    boundary = None
                else:
                    boundary = head.strip()[2:]
            if boundary is not None:
                for body in mjpeg_parts(resp, boundary, head=head, max_part_bytes=lim.max_part_bytes,
                                        max_header_bytes=lim.max_header_bytes,
                                        frame_timeout=lim.frame_timeout):
                    yield checked(lambda: decode_image(body, "stream part", lim))
                return
        except SourceError as e:
            raise StreamError(str(e)) from None
        finally:
            resp.close()
        yield from self._ffmpeg(url, ctx)

    @staticmethod
    def _ffmpeg(url: str, ctx: OpenContext) -> Iterator[Any]:
        cv2 = require_cv2(url)
        ms = int(min(ctx.timeout, ctx.limits.frame_timeout) * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        yield from capture_frames(cv2, lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params),
                                  url, live=True, limits=ctx.limits)


class CameraOpener:
    def matches(self, spec: str) -> bool:
        return bool(re.fullmatch(r"\d+", spec)) or spec.startswith("/dev/video")

    def open(self, spec: str, ctx: OpenContext) -> Source:
        what = f"camera {spec}"
        cv2 = require_cv2(what)
        if spec.startswith("/dev/video") and not Path(spec).exists():
            raise SourceError(f"{spec} does not exist (no such V4L2 device)")

        def open_capture() -> Any:
            return cv2.VideoCapture(int(spec)) if spec.isdigit() else cv2.VideoCapture(spec, cv2.CAP_V4L2)

        cap = open_capture()
        opened = cap.isOpened()
        cap.release()
        if not opened:
            raise SourceError(f"cannot open {what}")
        src = Source(what, lambda: iter(()), live=True)
        src.frames = lambda: reconnecting(
            src, lambda: capture_frames(cv2, open_capture, what, True, ctx.limits), ctx)
        return src


def array_frames(images: np.ndarray) -> Iterator[Any]:
    for img in images:
        yield checked(lambda: to_rgb_frame(np.asarray(img)))


class StreamFileOpener:
    """``demo`` and .npz: frames with labels (checked against the images before loading)."""

    def matches(self, spec: str) -> bool:
        return spec == "demo" or spec.lower().endswith(".npz")

    def open(self, spec: str, ctx: OpenContext) -> Source:
        s = load_stream(spec, max_pixels=ctx.limits.max_pixels)
        return Source(s.description or spec, looping(lambda: array_frames(s.images), ctx), labels=s.labels)


class NpyOpener:
    def matches(self, spec: str) -> bool:
        return spec.lower().endswith(".npy") and Path(spec).is_file()

    def open(self, spec: str, ctx: OpenContext) -> Source:
        images = load_npy_images(Path(spec), ctx.limits.max_pixels)
        return Source(spec, looping(lambda: array_frames(images), ctx))


class FolderOpener:
    """Image files and .npy frames in name order; other files ignored."""

    def matches(self, spec: str) -> bool:
        return Path(spec).is_dir()

    def open(self, spec: str, ctx: OpenContext) -> Source:
        folder = Path(spec)
        files = self.files(folder)
        if pillow() is None and any(p.suffix.lower() != ".npy" for p in files):
            require_pillow(f"the image folder {folder}")
        lim = ctx.limits

        def frames() -> Iterator[Any]:
            for path in self.files(folder):
                yield checked(lambda: read_image_file(path, lim))
        return Source(str(folder), looping(frames, ctx))

    @staticmethod
    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS | {".npy"})


class ImageFileOpener:
    def matches(self, spec: str) -> bool:
        return Path(spec).suffix.lower() in IMAGE_EXTS and Path(spec).is_file()

    def open(self, spec: str, ctx: OpenContext) -> Source:
        path = Path(spec)
        if path.suffix.lower() not in (".pgm", ".ppm", ".pnm"):
            require_pillow(f"the image {path}")
        return Source(spec, looping(lambda: iter([checked(lambda: read_image_file(path, ctx.limits))]), ctx))


class VideoFileOpener:
    def matches(self, spec: str) -> bool:
        return Path(spec).is_file()

    def open(self, spec: str, ctx: OpenContext) -> Source:
        cv2 = require_cv2(f"the video file {spec}")
        cap = cv2.VideoCapture(spec)
        opened = cap.isOpened()
        cap.release()
        if not opened:
            raise SourceError(f"cannot open the video file {spec} (not a video OpenCV can read)")
        return Source(spec, looping(lambda: capture_frames(
            cv2, lambda: cv2.VideoCapture(spec), spec, False, ctx.limits), ctx))


OPENERS: list[Opener] = [NetworkOpener(), CameraOpener(), StreamFileOpener(), NpyOpener(),
                         FolderOpener(), ImageFileOpener(), VideoFileOpener()]


def open_source(spec: str, ctx: OpenContext | None = None) -> Source:
    """Open ``spec`` with the first opener that takes it. Files and folders are checked now, so
    a wrong name fails before anything starts; network streams connect on iteration. Raises
    ``SourceError`` (one line)."""
    ctx = ctx or OpenContext()
    spec = str(spec)
    for opener in OPENERS:
        if opener.matches(spec):
            return opener.open(spec, ctx)
    if not Path(spec).exists():
        raise SourceError(f"source {spec} not found: give a camera index (0), /dev/videoN, a video "
                          "file, an image folder, a .npy/.npz file, 'demo', or an rtsp:// or "
                          "http:// URL")
    raise SourceError(f"{spec}: not a source edgetta can read")
