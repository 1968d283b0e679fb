"""Loaders for the real image sets a user can have: Fashion-MNIST (Debian's package),
CIFAR-10 / CIFAR-10-C in their official layouts, and a folder of one's own images (one
subfolder per class, JPEG/PNG).

Every loader returns ``(images, labels)``: uint8 ``(N, H, W, 3)`` RGB (32x32 but for image
folders, which are resized to the size asked for) and int64 ``(N,)``.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
DATASETS = ("fashion-mnist", "cifar10")


class DatasetMissing(FileNotFoundError):
    """A data set's files are not where the loader looked."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {arr.size} bytes")
    return arr.reshape(dims)


def to_cifar_shape(gray: np.ndarray) -> np.ndarray:
    """28x28 greyscale -> 32x32x3: pad 2 pixels each side, repeat the channel."""
    padded = np.pad(gray, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST presented as 32x32x3 (padded, channel repeated)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("EDGETTA_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p.name for p in (img_path, lbl_path) if not p.exists()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST files {missing} not found in {root}. Install them with "
            "'sudo apt-get install dataset-fashion-mnist', or point EDGETTA_FASHION_MNIST "
            "(or --data-root) at a folder holding the four original .gz files.")
    images, labels = _read_idx(img_path), _read_idx(lbl_path)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return to_cifar_shape(images), labels.astype(np.int64)


def cifar10(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's official python layout: data_batch_1..5 and test_batch (pickled dicts)."""
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = root / name
        if not path.exists():
            raise DatasetMissing(f"CIFAR-10 file {path} not found (expected the official "
                                 "'cifar-10-batches-py' folder)")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        lbl = batch.get(b"labels", batch.get("labels"))
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(lbl, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def cifar10c(root: str | os.PathLike, corruption: str, severity: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10-C layout: ``<corruption>.npy`` holding 5 severities x 10,000, and labels.npy."""
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    root = Path(root)
    path, lpath = root / f"{corruption}.npy", root / "labels.npy"
    for p in (path, lpath):
        if not p.exists():
            raise DatasetMissing(f"CIFAR-10-C file {p} not found")
    data = np.load(path, mmap_mode="r")
    labels = np.load(lpath)
    n = len(data) // 5
    sl = slice((severity - 1) * n, severity * n)
    return np.ascontiguousarray(data[sl], dtype=np.uint8), labels[sl].astype(np.int64)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_folder(root: str | os.PathLike, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, class names) of a folder with one subfolder per class (sorted by name)
    holding JPEG/PNG files, each converted to RGB and resized to ``size`` x ``size``."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DatasetMissing(f"image folder {root} not found")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(classes) < 2 or not files:
        raise DatasetMissing(f"{root} needs one subfolder per class (at least 2) holding .jpg/.jpeg/.png "
                             f"files; found {len(classes)} subfolders and {len(files)} images")
    images = np.empty((len(files), size, size, 3), np.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                images[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except OSError as e:
            raise ValueError(f"{f} is not a readable image ({e})") from None
    return images, np.array([c for _, c in files], np.int64), classes


def holdout(labels: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-back) indices: ``fraction`` of each class held back (at least one image of a
    class with two or more), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:n])
        train.append(idx[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load(name: str, split: str = "train", root: str | os.PathLike | None = None
         ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, class_names) of a named data set."""
    if name == "fashion-mnist":
        return (*fashion_mnist(split, root), FASHION_MNIST_CLASSES)
    if name == "cifar10":
        if root is None:
            raise DatasetMissing("CIFAR-10 cannot be downloaded here; pass --data-root pointing "
                                 "at the official 'cifar-10-batches-py' folder")
        return (*cifar10(root, split), CIFAR10_CLASSES)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
