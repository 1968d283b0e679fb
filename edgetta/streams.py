"""Labelled frame streams on disk: the built-in corrupted demo stream and user .npz/.npy files."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEMO_STREAM = Path(__file__).parent / "data" / "demo_stream.npz"


@dataclass
class Stream:
    images: np.ndarray                    # uint8 (N, H, W, 3) RGB
    labels: np.ndarray | None = None      # int64 (N,) when known
    domains: np.ndarray | None = None     # int (N,) index into domain_names
    domain_names: list[str] = field(default_factory=list)
    description: str = ""

    def __len__(self) -> int:
        return len(self.images)


def load_stream(source: str | os.PathLike = "demo") -> Stream:
    """``demo`` (the built-in corrupted Fashion-MNIST stream), an ``.npz`` holding ``images``
    (and optionally ``labels``, ``domains``, ``domain_names``), or an ``.npy`` of images."""
    if str(source) == "demo":
        path = DEMO_STREAM
        if not path.exists():
            raise FileNotFoundError(f"the built-in demo stream {path} is missing from this install")
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"stream file {path} not found")
    if path.suffix == ".npy":
        return Stream(np.load(path, allow_pickle=False), description=str(path))
    with np.load(path, allow_pickle=False) as d:
        if "images" not in d.files:
            raise ValueError(f"{path} holds no 'images' array (found {d.files})")
        return Stream(
            images=d["images"],
            labels=d["labels"].astype(np.int64) if "labels" in d.files else None,
            domains=d["domains"] if "domains" in d.files else None,
            domain_names=[str(s) for s in d["domain_names"]] if "domain_names" in d.files else [],
            description=str(d["description"]) if "description" in d.files else str(path),
        )
