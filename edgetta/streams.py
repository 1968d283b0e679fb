"""Labelled frame streams on disk: the built-in corrupted demo stream and user .npz/.npy files.

Nothing is loaded before its header is checked: an array's shape and dtype are read from its
.npy header first and refused (``SourceError``, one line) when they cannot be frames, when the
file holds fewer bytes than the header claims, or when labels do not match the images.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from .errors import SourceError

DEMO_STREAM = Path(__file__).parent / "data" / "demo_stream.npz"
MAX_NPY_HEADER = 10_000   # bytes; numpy's own default bound, stated here so every reader uses it


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


@dataclass
class Stream:
    images: np.ndarray                    # uint8 (N, H, W, 3) RGB
    labels: np.ndarray | None = None      # int64 (N,) when known
    domains: np.ndarray | None = None     # int (N,) index into domain_names
    domain_names: list[str] = field(default_factory=list)
    description: str = ""

    def __len__(self) -> int:
        return len(self.images)


def read_npy_header(fp: IO[bytes], available: int, what: str) -> ArrayHeader:
    """Shape and dtype from an .npy header, checked against the ``available`` bytes of the file
    (or zip member) before anything is loaded. Raises ``SourceError``."""
    try:
        version = np.lib.format.read_magic(fp)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = read(fp, max_header_size=MAX_NPY_HEADER)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise SourceError(f"{what}: not a readable .npy array ({str(e).splitlines()[0][:120]})") from None
    header = ArrayHeader(tuple(int(n) for n in shape), np.dtype(dtype))
    if header.dtype.hasobject:
        raise SourceError(f"{what}: holds Python objects (pickles are never loaded)")
    if header.nbytes > available:
        raise SourceError(f"{what}: the header claims {header.nbytes:,} bytes of data "
                          f"({header.shape} {header.dtype}), the file holds {available:,}")
    return header


def check_images(header: ArrayHeader, what: str, max_pixels: int) -> None:
    """Frames N x H x W (x C) or one frame H x W (x C), numeric, non-empty, within the pixel cap."""
    s, dt = header.shape, header.dtype
    if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise SourceError(f"{what}: images must be integer or float, got {dt}")
    if len(s) not in (2, 3, 4) or (len(s) == 4 and s[-1] not in (1, 3, 4)):
        raise SourceError(f"{what}: expected images N x H x W (x C), got shape {s}")
    hw = s[1:3] if len(s) == 4 or (len(s) == 3 and s[-1] not in (1, 3, 4)) else s[:2]
    if 0 in s:
        raise SourceError(f"{what}: no images (shape {s})")
    if hw[0] * hw[1] > max_pixels:
        raise SourceError(f"{what}: {hw[1]}x{hw[0]} images exceed the {max_pixels:,}-pixel limit")


def check_labels(labels: np.ndarray, n_images: int, what: str, n_classes: int | None = None) -> np.ndarray:
    """Labels as int64, one per image, each a class index. Raises ``SourceError``."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{what}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != n_images:
        raise SourceError(f"{what}: {len(labels)} labels for {n_images} images")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= n_classes if n_classes is not None else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        bound = f" (the model has {n_classes} classes)" if n_classes is not None else ""
        raise SourceError(f"{what}: label {labels[i]} of image {i} is out of range{bound}")
    return labels


def _npz_member(zf: zipfile.ZipFile, name: str, path: Path) -> ArrayHeader:
    info = zf.getinfo(f"{name}.npy")
    with zf.open(info) as f:
        return read_npy_header(f, info.file_size, f"{path}: '{name}'")


def _load_npz(path: Path, max_pixels: int) -> Stream:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(f"{path}: not a readable .npz file ({e})") from None
    with zf:
        names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        if "images" not in names:
            raise SourceError(f"{path} holds no 'images' array (found {sorted(names)})")
        try:
            headers = {n: _npz_member(zf, n, path) for n in names}
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise SourceError(f"{path}: not a readable .npz file ({e})") from None
    check_images(headers["images"], f"{path}: 'images'", max_pixels)
    try:
        with np.load(path, allow_pickle=False) as d:
            images = d["images"]
            if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)):
                images = images[None]
            labels = d["labels"] if "labels" in names else None
            domains = d["domains"] if "domains" in names else None
            domain_names = [str(s) for s in d["domain_names"]] if "domain_names" in names else []
            description = str(d["description"]) if "description" in names else str(path)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise SourceError(f"{path}: not a readable .npz file ({str(e).splitlines()[0][:120]})") from None
    if labels is not None:
        labels = check_labels(labels, len(images), str(path))
    return Stream(images=images, labels=labels, domains=domains, domain_names=domain_names,
                  description=description)


def load_npy_images(path: Path, max_pixels: int) -> np.ndarray:
    """An .npy of frames (or one frame), memory-mapped after its header is checked."""
    with open(path, "rb") as f:
        header = read_npy_header(f, path.stat().st_size, str(path))
    check_images(header, str(path), max_pixels)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SourceError(f"{path}: not a readable .npy file ({str(e).splitlines()[0][:120]})") from None
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        return arr[None]  # a single frame
    return arr


def load_stream(source: str | os.PathLike = "demo", max_pixels: int = 4096 * 4096) -> Stream:
    """``demo`` (the built-in corrupted Fashion-MNIST stream), an ``.npz`` holding ``images``
    (and optionally ``labels``, ``domains``, ``domain_names``), or an ``.npy`` of images.
    Raises ``SourceError`` (one line) for anything that is not such a file."""
    if str(source) == "demo":
        path = DEMO_STREAM
        if not path.exists():
            raise SourceError(f"the built-in demo stream {path} is missing from this install")
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"stream file {path} not found")
    if path.suffix == ".npy":
        return Stream(load_npy_images(path, max_pixels), description=str(path))
    return _load_npz(path, max_pixels)
