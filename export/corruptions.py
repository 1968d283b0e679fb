"""Seeded, deterministic reimplementation of the CIFAR-10-C corruptions (Hendrycks & Dietterich,
ICLR 2019) with numpy, scipy and OpenCV only: no ImageMagick/Wand, scikit-image or asset files.

The per-severity parameters are those of the original CIFAR-10 generator (``make_cifar_c.py``).
Where the original needs something unavailable here, a stand-in is used:

* motion blur (``motion_blur`` and the snow streaks): ImageMagick's one-sided Gaussian line
  kernel, rebuilt as a ``cv2.filter2D`` kernel (same tap offsets and weights, edge replication);
* frost: procedural frost textures instead of the original's frost photographs;
* glass blur: the original's sequential pixel swaps, scheduled as anti-diagonal wavefronts so
  that a whole batch is done in ~90 vectorised steps (same result distribution, see the docstring
  of :func:`_glass_blur`).

Random draws come from ``np.random.default_rng([seed, corruption index, severity])`` and are made
for the whole batch at once, so an image corrupted inside a batch gets different noise than the
same image corrupted alone; for fixed (images, name, severity, seed) the output is bit-identical.

CLI: ``python -m edgetta_export.corruptions grid --out PATH [--npy IMAGES.npy]``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage

from edgetta.system import atomic_write

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)

SIZE = 32
_S = SIZE  # CIFAR-10's elastic parameters are fractions of the image side

# CIFAR-10 parameters of make_cifar_c.py, severity 1..5.
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    # (disk radius, anti-alias blur sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (sigma, max_delta, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (radius, sigma) of ImageMagick's motion blur; angle ~ U(-45, 45)
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # zoom factors; np.arange's float end point makes e.g. the first one 1.00..1.06 (7 factors),
    # exactly as in the original
    "zoom_blur": (np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)),
    # (loc, scale, zoom, threshold, blur radius, blur sigma, image weight)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # (image weight, frost weight)
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (fog strength, plasma wibble decay)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine jitter) in pixels
    "elastic_transform": ((_S * 0, _S * 0, _S * 0.08), (_S * 0.05, _S * 0.2, _S * 0.07),
                          (_S * 0.08, _S * 0.06, _S * 0.06), (_S * 0.1, _S * 0.04, _S * 0.05),
                          (_S * 0.1, _S * 0.03, _S * 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}

_CV_MAX_CHANNELS = 128  # cv2.filter2D accepts at most this many channels here


# ----------------------------------------------------------------------------- helpers

def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 by truncation, as the original's ``np.uint8(clip(x) * 255)``.

    The small epsilon keeps float round-off (e.g. 255 * (k / 255) = k - 1e-6) from dropping a
    level that the exact arithmetic would keep.
    """
    return np.floor(np.clip(x, 0, 1) * 255 + 1e-3).astype(np.uint8)


def _stacked_filter2d(x: np.ndarray, kernel: np.ndarray, border: int) -> np.ndarray:
    """cv2.filter2D on every channel of every image of an (N, H, W, C) float32 batch."""
    n, h, w, c = x.shape
    flat = np.ascontiguousarray(x.transpose(1, 2, 0, 3).reshape(h, w, n * c))
    out = np.empty_like(flat)
    for s in range(0, n * c, _CV_MAX_CHANNELS):
        out[..., s:s + _CV_MAX_CHANNELS] = cv2.filter2D(
            np.ascontiguousarray(flat[..., s:s + _CV_MAX_CHANNELS]), -1, kernel,
            borderType=border).reshape(h, w, -1)
    return out.reshape(h, w, n, c).transpose(2, 0, 1, 3)


@functools.lru_cache(maxsize=64)
def _zoom_matrix(n: int, factor: float) -> np.ndarray:
    """(n, n) matrix M with ``M @ row`` = the original's ``clipped_zoom`` along one axis.

    clipped_zoom crops the centre ceil(n / factor) pixels, zooms them with
    ``scipy.ndimage.zoom(order=1)`` (corner-aligned: out o samples o * (ch - 1) / (out - 1))
    and trims the centre n pixels.
    """
    ch = int(math.ceil(n / factor))
    top = (n - ch) // 2
    out = int(round(ch * factor))
    trim = (out - n) // 2
    ratio = (ch - 1) / (out - 1) if out > 1 else 0.0
    m = np.zeros((n, n), dtype=np.float64)
    for o in range(n):
        src = (o + trim) * ratio
        i0 = min(int(math.floor(src)), ch - 1)
        f = src - i0
        m[o, top + i0] += 1 - f
        if f > 1e-12:
            m[o, top + i0 + 1] += f
    return m


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """clipped_zoom of every image of an (N, H, W[, C]) batch (H == W)."""
    m = _zoom_matrix(x.shape[1], float(factor)).astype(np.float32)
    y = np.einsum("ih,nhw...->niw...", m, x, optimize=True)
    return np.einsum("jw,niw...->nij...", m, y, optimize=True)


def _motion_kernel(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, tuple[int, int]]:
    """ImageMagick's MotionBlurImage as a correlation kernel and its anchor (x, y).

    ImageMagick averages ``width = 2 * ceil(radius) + 1`` samples at offsets
    ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))``, i = 0..width-1, weighted by a normalised
    one-sided Gaussian exp(-i^2 / 2 sigma^2): a trailing streak, not a symmetric one.
    """
    width = 2 * int(math.ceil(radius)) + 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-i * i / (2.0 * sigma * sigma))
    weights /= weights.sum()
    a = math.radians(angle)
    ox = np.ceil(i * math.cos(a) - 0.5).astype(int)
    oy = np.ceil(i * math.sin(a) - 0.5).astype(int)
    keep = weights > 1e-9  # taps far below float32 resolution only cost time
    ox, oy, weights = ox[keep], oy[keep], weights[keep]
    kernel = np.zeros((oy.max() - oy.min() + 1, ox.max() - ox.min() + 1), dtype=np.float32)
    np.add.at(kernel, (oy - oy.min(), ox - ox.min()), weights.astype(np.float32))
    return kernel, (int(-ox.min()), int(-oy.min()))


def _motion_blur_batch(x: np.ndarray, radius: float, sigma: float,
                       angles: np.ndarray) -> np.ndarray:
    """Motion blur of each image of an (N, H, W, C) float batch at its own angle (degrees).

    Images whose rounded tap offsets coincide share one filter2D call (channels stacked).
    """
    n, h, w, c = x.shape
    out = np.empty_like(x)
    groups: dict[tuple, tuple[np.ndarray, tuple[int, int], list[int]]] = {}
    for k, ang in enumerate(angles):
        kern, anchor = _motion_kernel(radius, sigma, float(ang))
        groups.setdefault((kern.shape, anchor, kern.tobytes()), (kern, anchor, []))[2].append(k)
    per_call = max(1, _CV_MAX_CHANNELS // c)
    for kern, anchor, idx in groups.values():
        for s in range(0, len(idx), per_call):
            sel = idx[s:s + per_call]
            stack = np.ascontiguousarray(x[sel].transpose(1, 2, 0, 3).reshape(h, w, -1))
            res = cv2.filter2D(stack, -1, kern, anchor=anchor, borderType=cv2.BORDER_REPLICATE)
            out[sel] = res.reshape(h, w, len(sel), c).transpose(2, 0, 1, 3)
    return out


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int,
                    decay: float) -> np.ndarray:
    """N diamond-square height maps (N, mapsize, mapsize) in [0, 1], as the original's
    ``plasma_fractal`` (toroidal, wibble starting at 100, noise ``wibble * U(-wibble, wibble)``)."""
    assert mapsize & (mapsize - 1) == 0
    m = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, half::step, half::step] = wibbled_mean(sq)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(dr + np.roll(dr, 1, axis=1)
                                                 + ul + np.roll(ul, -1, axis=2))
        m[:, half::step, 0::step] = wibbled_mean(dr + np.roll(dr, 1, axis=2)
                                                 + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


# ----------------------------------------------------------------------------- corruptions
# Each takes a uint8 (N, 32, 32, 3) batch, the severity's parameters and a Generator.

def _gaussian_noise(x, c, rng):
    f = _to_float(x)
    return _to_uint8(f + rng.standard_normal(f.shape, dtype=np.float32) * np.float32(c))


def _shot_noise(x, c, rng):
    return _to_uint8(rng.poisson(_to_float(x) * c) / c)


def _impulse_noise(x, amount, rng):
    # scikit-image's 's&p': every value (channels independently) is replaced with probability
    # `amount`, half of them by 1 (salt) and half by 0 (pepper).
    out = x.copy()
    flip = rng.random(x.shape, dtype=np.float32) < amount
    salt = rng.random(x.shape, dtype=np.float32) < 0.5
    out[flip & salt] = 255
    out[flip & ~salt] = 0
    return out


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    grid = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = (3, 3) if radius <= 8 else (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    kernel = cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)
    # the 17x17 grid is mostly zeros; trimming them changes nothing but the speed
    rows, cols = np.nonzero(kernel.any(axis=1))[0], np.nonzero(kernel.any(axis=0))[0]
    r = max(8 - rows.min(), rows.max() - 8, 8 - cols.min(), cols.max() - 8)
    return np.ascontiguousarray(kernel[8 - r:9 + r, 8 - r:9 + r])


def _defocus_blur(x, c, rng):
    kernel = _disk_kernel(*c)
    return _to_uint8(_stacked_filter2d(_to_float(x), kernel, cv2.BORDER_REFLECT_101))


@functools.lru_cache(maxsize=4)
def _wavefronts(na: int, nb: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(a, b) index pairs of each wavefront t = 2a + b, for t = 0, 1, ..."""
    a, b = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
    t = 2 * a + b
    return tuple((a[t == k], b[t == k]) for k in range(t.max() + 1))


def _glass_swaps(img: np.ndarray, width: int, rows: np.ndarray, cols: np.ndarray,
                 delta: np.ndarray) -> None:
    """The original's swap loop, in place on img (N, H*W, C), pixels row-major `width` wide.

    Visits (h, w) = (rows[a], cols[b]) with a, b ascending (rows and cols descending) and swaps
    pixel (h, w) with (h + dy, w + dx), (dy, dx) = delta[:, a, b] in {-1, 0}^2; done wavefront
    by wavefront, see :func:`_glass_blur`.
    """
    batch = np.arange(img.shape[0])[:, None]
    for a, b in _wavefronts(len(rows), len(cols)):
        hh, ww = rows[a], cols[b]
        p = hh * width + ww
        q = (hh + delta[:, a, b, 0]) * width + (ww + delta[:, a, b, 1])
        vp = img[batch, p]
        img[batch, p] = img[batch, q]
        img[batch, q] = vp


def _glass_blur(x, c, rng):
    """Gaussian blur, local pixel swaps, Gaussian blur again.

    The original visits (h, w) for h, w = 31..2 (row-major, descending) and swaps pixel (h, w)
    with (h + dy, w + dx), where ``np.random.randint(-1, 1)`` makes dy, dx in {-1, 0} only.
    Swaps touching disjoint 2x2 blocks commute, and with t = 2 (31 - h) + (31 - w) every swap
    that overlaps an earlier one in the original order has a larger t, so doing all swaps of one
    t at once (88 wavefronts, vectorised over positions and images) yields exactly the original's
    result for the same displacements. Only the random stream differs (all displacements are
    drawn up front), so the output matches the original in distribution, not bit for bit.
    """
    sigma, max_delta, iterations = c
    assert max_delta == 1, "the wavefront schedule assumes displacements in {-1, 0}"
    n, h, w, ch = x.shape
    blur = functools.partial(ndimage.gaussian_filter, sigma=(0, sigma, sigma, 0), mode="nearest",
                             truncate=4.0)
    img = _to_uint8(blur(_to_float(x))).reshape(n, h * w, ch)
    rows = np.arange(h - max_delta, max_delta, -1)  # 31..2, as range(32 - 1, 1, -1)
    cols = np.arange(w - max_delta, max_delta, -1)
    for _ in range(iterations):
        delta = rng.integers(-max_delta, max_delta, size=(n, len(rows), len(cols), 2))
        _glass_swaps(img, w, rows, cols, delta)
    return _to_uint8(blur(_to_float(img.reshape(n, h, w, ch))))


def _motion_blur(x, c, rng):
    radius, sigma = c
    angles = rng.uniform(-45, 45, size=len(x))
    out = _motion_blur_batch(x.astype(np.float32), radius, sigma, angles)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)  # ImageMagick rounds to the quantum


@functools.lru_cache(maxsize=8)
def _zoom_blur_operator(n: int, factors: tuple[float, ...]) -> np.ndarray:
    """(n*n, n*n) operator: mean of the image and its clipped zooms (pixels row-major)."""
    op = np.eye(n * n)
    for z in factors:
        m = _zoom_matrix(n, z)
        op += np.kron(m, m)
    return (op / (len(factors) + 1)).astype(np.float32)


def _zoom_blur(x, factors, rng):
    # every zoom is linear and the same for all images: one (hw, hw) matrix for the whole batch
    n, h, w, c = x.shape
    op = _zoom_blur_operator(h, tuple(float(z) for z in factors))
    out = np.matmul(op, _to_float(x).reshape(n, h * w, c))
    return _to_uint8(out.reshape(n, h, w, c))


def _snow(x, c, rng):
    loc, scale, zoom, threshold, radius, sigma, weight = c
    n, h, w, _ = x.shape
    f = _to_float(x)
    layer = rng.normal(loc, scale, size=(n, h, w)).astype(np.float32)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = _to_uint8(layer).astype(np.float32)  # the original hands ImageMagick an 8-bit PNG
    angles = rng.uniform(-135, -45, size=n)
    layer = _motion_blur_batch(layer[..., None], radius, sigma, angles)
    layer = np.clip(np.rint(layer), 0, 255) / np.float32(255)
    gray = (f @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    f = weight * f + (1 - weight) * np.maximum(f, gray * 1.5 + 0.5)
    return _to_uint8(f + layer + layer[:, ::-1, ::-1])


def _frost_texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A procedural frost picture (size, size, 3), float32 in [0, 255], RGB.

    Cloudy multi-scale value noise (the icy film) plus thin bright dendrites (needle-like
    crystals with side branches at about +-60 degrees), drawn at twice the size and area-
    downsampled so they come out thin and anti-aliased, with a soft glow and a pale blue tint.
    """
    hi = 2 * size
    base = np.zeros((hi, hi), dtype=np.float32)
    for cell, weight in ((64, 1.0), (32, 0.8), (16, 0.6), (8, 0.45), (4, 0.35), (2, 0.25)):
        small = rng.random((hi // cell + 1, hi // cell + 1), dtype=np.float32)
        base += weight * cv2.resize(small, (hi, hi), interpolation=cv2.INTER_CUBIC)
    base = (base - base.min()) / (base.max() - base.min())

    crystals = np.zeros((hi, hi), dtype=np.uint8)
    for _ in range(int(rng.integers(100, 150))):
        stack = [(rng.uniform(0, hi), rng.uniform(0, hi), rng.uniform(0, 2 * np.pi),
                  rng.uniform(hi * 0.04, hi * 0.2), 2, rng.uniform(0.5, 1.0))]
        while stack:
            x0, y0, ang, length, depth, level = stack.pop()
            x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
            cv2.line(crystals, (int(x0 * 16), int(y0 * 16)), (int(x1 * 16), int(y1 * 16)),
                     int(255 * level), thickness=1, lineType=cv2.LINE_AA, shift=4)
            if depth:
                for _b in range(int(rng.integers(2, 7))):
                    t = rng.uniform(0.1, 0.95)
                    side = 1 if rng.random() < 0.5 else -1
                    stack.append((x0 + t * (x1 - x0), y0 + t * (y1 - y0),
                                  ang + side * (np.pi / 3 + rng.normal(0, 0.15)),
                                  length * rng.uniform(0.15, 0.45) * (1.2 - t * 0.5),
                                  depth - 1, level * rng.uniform(0.7, 0.95)))
    lines = crystals.astype(np.float32) / 255
    lines = np.maximum(lines, 1.5 * cv2.GaussianBlur(lines, (0, 0), 2.5))  # glow
    v = np.clip(0.15 + 0.6 * base ** 1.2 + 0.8 * lines, 0, 1)
    v = cv2.resize(v, (size, size), interpolation=cv2.INTER_AREA)
    tint = np.array([0.84, 0.92, 1.0], dtype=np.float32)
    return np.clip(v[..., None] * tint * 255 + np.float32(12), 0, 255)


def _frost(x, c, rng):
    """Blend with a crop of a frost picture: ``clip(a * x + b * frost)``.

    Procedural stand-in: the original crops one of five frost *photographs*; here five
    procedural frost textures (:func:`_frost_texture`) are made from the seed instead, and each
    image gets a random crop of a random one of them.
    """
    a, b = c
    n, h, w, _ = x.shape
    bank = np.stack([_frost_texture(rng) for _ in range(5)])
    pick = rng.integers(0, len(bank), size=n)
    top = rng.integers(0, bank.shape[1] - h, size=n)
    left = rng.integers(0, bank.shape[2] - w, size=n)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    frost = bank[pick[:, None, None], rows, cols]
    return _to_uint8((a * x.astype(np.float32) + b * frost) / 255)


def _fog(x, c, rng):
    strength, decay = c
    n, h, w, _ = x.shape
    mapsize = SIZE if max(h, w) <= SIZE else 1 << (max(h, w) - 1).bit_length()
    f = _to_float(x)
    max_val = f.max(axis=(1, 2, 3), keepdims=True)
    plasma = _plasma_fractal(rng, n, mapsize, decay)[:, :h, :w, None].astype(np.float32)
    f = f + strength * plasma
    return _to_uint8(f * max_val / (max_val + strength))


def _brightness(x, c, rng):
    # Raising HSV value V = max(R, G, B) with H and S fixed scales RGB by V' / V (black, whose
    # saturation is 0, becomes grey V'): the original's rgb2hsv -> V + c -> hsv2rgb, exactly.
    f = _to_float(x)
    v = f.max(axis=-1, keepdims=True)
    v_new = np.minimum(v + np.float32(c), 1)
    out = np.where(v > 0, f * (v_new / np.maximum(v, 1e-12)), v_new)
    return _to_uint8(out)


def _contrast(x, c, rng):
    f = _to_float(x)
    means = f.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((f - means) * np.float32(c) + means)


def _elastic_transform(x, c, rng):
    alpha, sigma, jitter = c
    n, h, w, ch = x.shape
    f = _to_float(x)
    centre = np.float32([w, h]) // 2
    half = min(h, w) // 3
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=(n, 3, 2)).astype(np.float32)
    warped = np.empty_like(f)
    for k in range(n):  # one affine map per image
        m = cv2.getAffineTransform(pts1, pts2[k])
        warped[k] = cv2.warpAffine(f[k], m, (w, h), borderMode=cv2.BORDER_REFLECT_101)

    smooth = functools.partial(ndimage.gaussian_filter, sigma=(0, sigma, sigma), mode="reflect",
                               truncate=3)
    dx = (smooth(rng.uniform(-1, 1, size=(n, h, w))) * alpha).astype(np.float32)
    dy = (smooth(rng.uniform(-1, 1, size=(n, h, w))) * alpha).astype(np.float32)
    if alpha == 0:
        return _to_uint8(warped)
    # channels-first so the batch and channel coordinates are exact integers; order=1 then
    # interpolates only in y and x (8 taps), as the per-image call does
    planes = warped.transpose(0, 3, 1, 2).reshape(n * ch, h, w)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    out = np.empty_like(planes)
    chunk = 256
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k = e - s
        plane_idx = np.broadcast_to(np.arange(s * ch, e * ch, dtype=np.float32)[:, None, None],
                                    (k * ch, h, w))
        cy = np.repeat(yy + dy[s:e], ch, axis=0)
        cx = np.repeat(xx + dx[s:e], ch, axis=0)
        out[s * ch:e * ch] = ndimage.map_coordinates(planes, (plane_idx, cy, cx), order=1,
                                                     mode="reflect")
    return _to_uint8(out.reshape(n, ch, h, w).transpose(0, 2, 3, 1))


def _pixelate(x, c, rng):
    n, h, w, _ = x.shape
    small = (int(w * c), int(h * c))
    out = np.empty_like(x)
    for k in range(n):  # cv2.resize takes at most 4 channels
        down = cv2.resize(x[k], small, interpolation=cv2.INTER_AREA)
        out[k] = cv2.resize(down, (w, h), interpolation=cv2.INTER_AREA)
    return out


def _jpeg_compression(x, quality, rng):
    out = np.empty_like(x)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    for k in range(len(x)):
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(x[k, :, :, ::-1]), params)
        if not ok:
            raise RuntimeError("cv2.imencode failed to write a JPEG")
        out[k] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return out


_FUNCS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "defocus_blur": _defocus_blur, "glass_blur": _glass_blur,
    "motion_blur": _motion_blur, "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost,
    "fog": _fog, "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


# ----------------------------------------------------------------------------- public API

def _check_args(images: np.ndarray, name: str, severity: int, seed: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
            or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    if images.shape[-3:] != (SIZE, SIZE, 3) or images.ndim not in (3, 4):
        raise ValueError(f"images must have shape (N, {SIZE}, {SIZE}, 3) or ({SIZE}, {SIZE}, 3) "
                         f"(HWC, RGB), got {images.shape}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply CIFAR-10-C corruption `name` at `severity` (1..5) to uint8 RGB images.

    `images` is (N, 32, 32, 3) or a single (32, 32, 3) image; the result has the same shape and
    dtype. The output is a pure function of (images, name, severity, seed).
    """
    _check_args(images, name, severity, seed)
    batch = np.ascontiguousarray(images[None] if images.ndim == 3 else images)
    if len(batch) == 0:
        return images.copy()
    index = CORRUPTIONS.index(name)
    rng = np.random.default_rng([int(seed), index, int(severity)])
    out = _FUNCS[name](batch, PARAMS[name][severity - 1], rng)
    assert out.dtype == np.uint8 and out.shape == batch.shape
    return out[0] if images.ndim == 3 else out


def cache_path(images: np.ndarray, name: str, severity: int, seed: int,
               cache_dir: str | os.PathLike) -> Path:
    """Where :func:`corrupt_dataset` caches this result."""
    digest = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}_s{severity}_seed{seed}_{digest}.npy"


def corrupt_dataset(images: np.ndarray, name: str, severity: int, seed: int = 0,
                    cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """:func:`corrupt`, cached as an .npy file under `cache_dir` when one is given.

    The file is written to a temporary name in the same folder and renamed into place, so an
    interrupted run never leaves a torn cache file; an unreadable or mismatched one is redone.
    """
    _check_args(images, name, severity, seed)
    if cache_dir is None:
        return corrupt(images, name, severity, seed)
    path = cache_path(images, name, severity, seed, cache_dir)
    if path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.dtype == np.uint8 and cached.size == images.size:
            return cached.reshape(images.shape)
    out = corrupt(images, name, severity, seed)
    with atomic_write(path) as f:
        np.save(f, out)
    return out


def synthetic_pattern(n: int = 1) -> np.ndarray:
    """(n, 32, 32, 3) uint8 test images: smooth colour gradients, a bright box, a dark disc, a
    thin line and a checkerboard, so that noise, blurs and colour changes are all visible.
    Image k is the base pattern rotated/flipped and with its channels rotated."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    img = np.stack([0.15 + 0.7 * xx, 0.2 + 0.6 * yy, 0.85 - 0.35 * (xx + yy)], axis=-1)
    img[5:13, 17:28] = (0.95, 0.93, 0.85)
    disc = (xx * (SIZE - 1) - 9) ** 2 + (yy * (SIZE - 1) - 20) ** 2 <= 30
    img[disc] = (0.12, 0.1, 0.25)
    for i in range(3, 29):
        img[i, min(SIZE - 1, i // 2 + 2)] = (0.9, 0.15, 0.1)
    checker = (np.add.outer(np.arange(8) // 2, np.arange(8) // 2) % 2).astype(np.float32)
    img[21:29, 19:27] = checker[..., None] * 0.9 + 0.05
    base = np.round(img * 255).astype(np.uint8)
    out = []
    for k in range(n):  # the 8 rotations/flips, with the colour channels rotated
        v = np.rot90(base, k % 4)
        v = v[:, ::-1] if (k // 4) % 2 else v
        out.append(np.roll(v, k % 3, axis=-1))
    return np.ascontiguousarray(np.stack(out))


def save_grid(images: np.ndarray, path: str | os.PathLike,
              severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0,
              scale: int = 3) -> None:
    """Write a PNG grid: one row per corruption, columns 'clean' + each severity, for the first
    image of `images` (uint8, (N, 32, 32, 3) or (32, 32, 3)), upscaled `scale`x nearest."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_args(images, CORRUPTIONS[0], 1, seed)
    img = images if images.ndim == 3 else images[0]
    scale = max(1, int(scale))
    big = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)  # noqa: E731
    cols = 1 + len(severities)
    cell = SIZE * scale / 100 + 0.25  # inches at 100 dpi, plus room for titles
    fig = Figure(figsize=(1.9 + cols * cell, 0.4 + len(CORRUPTIONS) * cell), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(CORRUPTIONS), cols, squeeze=False)
    for r, name in enumerate(CORRUPTIONS):
        row = [img] + [corrupt(img, name, int(s), seed) for s in severities]
        for col, (ax, pic) in enumerate(zip(axes[r], row)):
            ax.imshow(big(pic), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if col == 0 else f"severity {severities[col - 1]}",
                             fontsize=9)
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=1.8 / fig.get_figwidth(), right=0.99,
                        top=1 - 0.35 / fig.get_figheight(), bottom=0.01, wspace=0.05, hspace=0.08)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=100, format="png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgetta_export.corruptions",
                                     description="CIFAR-10-C corruptions (numpy/scipy/OpenCV)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="write a PNG grid of every corruption at every severity")
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--npy", help="uint8 (N, 32, 32, 3) .npy; the first image is shown "
                                 "(default: a synthetic test pattern)")
    g.add_argument("--index", type=int, default=0, help="which image of --npy to show (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling factor (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.npy:
        images = np.load(args.npy, mmap_mode="r")
        if images.ndim == 4:
            images = images[args.index]
        images = np.ascontiguousarray(images)
    else:
        images = synthetic_pattern(1)
    save_grid(images, args.out, seed=args.seed, scale=args.scale)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from edgetta.console import run_cli
    run_cli(main)
