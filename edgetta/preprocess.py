"""Frames in, network input out, as the bundle's manifest says (size, colour order,
normalization).

``to_rgb_frame`` is the one frame normaliser: sources (folders, arrays, streams, cameras) and
``preprocess`` both go through it, so a frame is accepted or refused the same way wherever it
comes from. Bad frames raise ``FrameError`` whose ``kind`` says why (empty, shape, nan).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .errors import FrameError

__all__ = ["FrameError", "as_batch", "preprocess", "to_rgb_frame"]


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


def to_rgb_frame(arr: Any, keep_float: bool = False) -> np.ndarray:
    """A uint8 HWC RGB frame from an array: greyscale expanded, an alpha channel dropped,
    uint16 scaled, floats taken as 0..255 and clipped (kept as float with ``keep_float``, for
    the model's input). Raises ``FrameError`` (kind empty, shape or nan) for what cannot be a
    frame."""
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.integer)
                                                or np.issubdtype(arr.dtype, np.floating)):
        what = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise FrameError(f"not an integer or float image ({what})", kind="shape")
    if arr.size == 0:
        raise FrameError(f"empty frame, shape {arr.shape}", kind="empty")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise FrameError(f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}", kind="shape")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise FrameError("frame contains NaN or infinite values", kind="nan")
        if arr.dtype == np.uint16:
            arr = arr >> 8
        if not (keep_float and np.issubdtype(arr.dtype, np.floating)):
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def as_batch(frames: Any) -> np.ndarray:
    """One frame (HW or HWC) or a batch NHWC (or a list of frames) as an NHWC RGB array
    (uint8, or float 0..255), each frame through ``to_rgb_frame``."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise FrameError("empty list of frames", kind="empty")
        batch = [to_rgb_frame(np.asarray(f), keep_float=True) for f in frames]
        shapes = {f.shape for f in batch}
        if len(shapes) > 1:
            raise FrameError(f"frames of different shapes in one batch: {sorted(shapes)}")
        return np.stack(batch)
    arr = np.asarray(frames)
    if arr.ndim in (2, 3) and not (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        return to_rgb_frame(arr, keep_float=True)[None]
    if arr.ndim != 4:
        raise FrameError(f"expected a frame HxWxC or a batch NxHxWxC, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise FrameError(f"empty batch: shape {arr.shape}", kind="empty")
    if arr.dtype == np.uint8 and arr.shape[-1] == 3 and arr.shape[1] and arr.shape[2]:
        return arr  # the common case, without a copy
    return np.stack([to_rgb_frame(f, keep_float=True) for f in arr])


def preprocess(frames: Any, spec: dict[str, Any], color_order: str = "RGB") -> np.ndarray:
    """uint8 (or float 0..255) frames, HWC, in ``color_order`` -> float32 NCHW normalized."""
    arr = as_batch(frames)
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
