"""Image bytes to frames, with every size checked before anything is decoded.

Pillow decodes folders, single images and MJPEG parts (no OpenCV needed); its ``Image.open``
reads only the header, so the pixel cap is applied before a pixel is allocated. PGM/PPM are
parsed here (16-bit and ASCII variants included). ``.npy`` frames are checked by their header.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FrameError, SourceError
from ..preprocess import to_rgb_frame
from ..streams import ArrayHeader, read_npy_header

CAPTURE_HINT = "pip install 'edgetta[capture]'"
PILLOW_HINT = "pip install pillow"
NETPBM_MAGIC = (b"P2", b"P3", b"P5", b"P6")
_TOKEN = re.compile(rb"\s*(#[^\n]*\n\s*)*(\S+)")


@dataclass(frozen=True)
class Limits:
    """Bounds on everything that comes from outside."""
    max_pixels: int = 4096 * 4096          # per frame, checked from the header
    max_part_bytes: int = 16 * 1024 * 1024  # one MJPEG part, one image file
    max_header_bytes: int = 8192            # one MJPEG part's headers
    frame_timeout: float = 10.0             # seconds without a frame: reconnect

    def check_pixels(self, w: int, h: int, what: str) -> None:
        if w <= 0 or h <= 0:
            raise FrameError(f"{what}: empty image ({w}x{h})", kind="empty")
        if w * h > self.max_pixels:
            raise FrameError(f"{what}: {w}x{h} image exceeds the {self.max_pixels:,}-pixel limit; "
                             "not decoded", kind="too_large")


def pillow() -> Any:
    """PIL.Image, or None when Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def require_cv2(what: str) -> Any:
    try:
        import cv2
    except ImportError:
        raise SourceError(f"{what} needs OpenCV, which is not installed: {CAPTURE_HINT}") from None
    return cv2


def require_pillow(what: str) -> Any:
    image = pillow()
    if image is None:
        raise SourceError(f"{what} needs Pillow to decode images, which is not installed: {PILLOW_HINT}")
    return image


def read_netpbm(data: bytes, limits: Limits = Limits(), what: str = "PGM/PPM") -> np.ndarray:
    """PGM/PPM (P2, P3, P5, P6) as H x W x C. Raises ``FrameError`` when malformed or too large."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        m = _TOKEN.match(data, pos)
        if m is None:
            raise FrameError(f"{what}: truncated header", kind="corrupt")
        tokens.append(m.group(2))
        pos = m.end()
    magic = tokens[0]
    if magic not in NETPBM_MAGIC:
        raise FrameError(f"{what}: not a PGM/PPM file", kind="corrupt")
    try:
        w, h, maxval = (int(t) for t in tokens[1:4])
    except ValueError:
        raise FrameError(f"{what}: malformed header", kind="corrupt") from None
    if not 0 < maxval < 65536:
        raise FrameError(f"{what}: bad maxval {maxval}", kind="corrupt")
    limits.check_pixels(w, h, what)
    c = 3 if magic in (b"P3", b"P6") else 1
    n = w * h * c
    if magic in (b"P5", b"P6"):
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        body = data[pos + 1:pos + 1 + n * dtype.itemsize]
        if len(body) < n * dtype.itemsize:
            raise FrameError(f"{what}: truncated pixel data", kind="corrupt")
        px = np.frombuffer(body, dtype).astype(np.float64)
    else:
        try:
            px = np.array(data[pos:].split()[:n], dtype=np.float64)
        except ValueError:
            raise FrameError(f"{what}: malformed pixel data", kind="corrupt") from None
        if px.size < n:
            raise FrameError(f"{what}: truncated pixel data", kind="corrupt")
    return np.round(px * (255.0 / maxval)).astype(np.uint8).reshape(h, w, c)


def decode_image(data: bytes, what: str, limits: Limits = Limits()) -> np.ndarray:
    """A uint8 HWC RGB frame from encoded image bytes (JPEG, PNG, BMP, GIF, TIFF, WebP, PGM/PPM
    ...). The header is read first and the pixel cap applied; raises ``FrameError`` (kind
    empty, corrupt, too_large or unsupported)."""
    if not data:
        raise FrameError(f"{what}: no bytes", kind="empty")
    if len(data) > limits.max_part_bytes:
        raise FrameError(f"{what}: {len(data):,} bytes exceed the {limits.max_part_bytes:,}-byte limit",
                         kind="too_large")
    if data[:2] in NETPBM_MAGIC:
        return to_rgb_frame(read_netpbm(data, limits, what))
    image = pillow()
    if image is None:
        raise FrameError(f"{what}: decoding images needs Pillow ({PILLOW_HINT})", kind="unsupported")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the cap below decides
        try:
            img = image.open(io.BytesIO(data))  # reads the header only
        except image.DecompressionBombError:
            raise FrameError(f"{what}: image dimensions beyond Pillow's bomb limit; not decoded",
                             kind="too_large") from None
        except Exception:  # noqa: BLE001  (UnidentifiedImageError, SyntaxError, struct.error ...)
            raise FrameError(f"{what}: not a decodable image ({len(data)} bytes)", kind="corrupt") from None
        w, h = img.size
        limits.check_pixels(w, h, what)
        try:
            rgb = img.convert("RGB")  # decodes
        except Exception:  # noqa: BLE001  (truncated data: OSError; broken codecs: others)
            raise FrameError(f"{what}: truncated or corrupt image data", kind="corrupt") from None
    return np.asarray(rgb)


def read_npy_frame(path: Path, limits: Limits) -> np.ndarray:
    """One frame from an .npy file (H x W (x C), or 1 x H x W x C), header checked first."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header: ArrayHeader = read_npy_header(f, size, path.name)
    except SourceError as e:
        raise FrameError(str(e), kind="corrupt") from None
    except OSError as e:
        raise FrameError(f"{path.name}: {e.strerror or e}", kind="corrupt") from None
    shape = header.shape[1:] if len(header.shape) == 4 and header.shape[0] == 1 else header.shape
    if 0 in shape:
        raise FrameError(f"{path.name}: empty frame, shape {header.shape}", kind="empty")
    if len(shape) not in (2, 3):
        raise FrameError(f"{path.name}: expected HxW or HxWxC, got shape {header.shape}", kind="shape")
    limits.check_pixels(shape[1], shape[0], path.name)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise FrameError(f"{path.name}: unreadable .npy ({str(e).splitlines()[0][:120]})",
                         kind="corrupt") from None
    return to_rgb_frame(arr.reshape(shape))


def read_image_file(path: Path, limits: Limits = Limits()) -> np.ndarray:
    """One frame from a file: .npy, or an image Pillow reads. Raises ``FrameError``."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise FrameError(f"{path.name}: zero-size file", kind="empty")
        if path.suffix.lower() == ".npy":
            return read_npy_frame(path, limits)
        if size > limits.max_part_bytes:
            raise FrameError(f"{path.name}: {size:,} bytes exceed the {limits.max_part_bytes:,}-byte "
                             "limit", kind="too_large")
        data = path.read_bytes()
    except OSError as e:
        raise FrameError(f"{path.name}: {e.strerror or e}", kind="corrupt") from None
    return decode_image(data, path.name, limits)
