"""Frames in, network input out, as the bundle's manifest says (size, colour order,
normalization). Bad frames raise ``FrameError`` with what is wrong."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np


class FrameError(ValueError):
    """A frame that cannot be fed to the model (wrong shape, dtype, empty, NaN)."""


@functools.lru_cache(maxsize=1)
def _cv2() -> Any:
    try:
        import cv2
        return cv2
    except ImportError:
        return None


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    cv2 = _cv2()
    if cv2 is not None:
        return cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    # nearest neighbour: good enough without OpenCV on a device
    h, w = frame.shape[:2]
    rows = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    cols = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return frame[rows][:, cols]


def as_batch(frames: Any) -> np.ndarray:
    """One HWC frame or a batch NHWC (or a list of frames) as a 4-D array."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise FrameError("empty list of frames")
        frames = [as_batch(f)[0] if np.ndim(f) == 3 else f for f in frames]
        shapes = {np.shape(f) for f in frames}
        if len(shapes) > 1:
            raise FrameError(f"frames of different shapes in one batch: {sorted(shapes)}")
        frames = np.stack(frames)
    arr = np.asarray(frames)
    if arr.ndim == 2:  # greyscale frame
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise FrameError(f"expected a frame HxWxC or a batch NxHxWxC, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise FrameError(f"empty frame(s): shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise FrameError(f"expected 3 colour channels (HWC), got shape {arr.shape}")
    return arr


def preprocess(frames: Any, spec: dict[str, Any], color_order: str = "RGB") -> np.ndarray:
    """uint8 (or float 0..255) frames, HWC, in ``color_order`` -> float32 NCHW normalized."""
    arr = as_batch(frames)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise FrameError(f"frames must be numeric, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise FrameError("frame contains NaN or infinite values")
    size = tuple(spec["resize"])
    if arr.shape[1:3] != size:
        arr = np.stack([_resize(f, size) for f in arr])
    if color_order.upper() != spec.get("color_order", "RGB").upper():
        arr = arr[..., ::-1]
    x = arr.astype(np.float32) * np.float32(spec.get("scale", 1.0 / 255.0))
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, 1, 1, 3)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
