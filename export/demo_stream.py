"""Build the built-in demo stream: Fashion-MNIST test images (as 32x32x3), corrupted with the
15 CIFAR-10-C types at one severity, in the standard continual order.

    python -m edgetta_export.demo_stream --per-type 200 --severity 5 --out edgetta/data/demo_stream.npz
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from edgetta.system import atomic_write

from . import datasets
from .corruptions import CORRUPTIONS, corrupt

NOTICE = ("Derived from Fashion-MNIST (c) 2017 Zalando SE, MIT License: test images padded to "
          "32x32, channel repeated, corrupted with edgetta's CIFAR-10-C-style generator.")


def build(per_type: int, severity: int | Sequence[int], seed: int, data_root: str | None = None,
          split: str = "test") -> dict:
    """The corrupted continual stream every benchmark and the built-in demo use: Fashion-MNIST
    ``split`` images in a ``seed``-shuffled order, the 15 types in the standard order, no reset.

    ``severity`` an int: ``per_type`` images per type, all corrupted with ``seed`` (the demo
    stream's recipe). A sequence (CoTTA's gradual setting, e.g. 1-2-3-4-5-4-3-2-1): within each
    type one segment of ``per_type`` images per entry, segment ``i`` of the stream corrupted with
    ``seed + i``; the result then also holds ``severities`` per frame."""
    images, labels = datasets.fashion_mnist(split, data_root)
    schedule = [severity] if isinstance(severity, int) else [int(s) for s in severity]
    segments = [(d, s) for d in range(len(CORRUPTIONS)) for s in schedule]
    order = np.random.default_rng(seed).permutation(len(images))
    need = per_type * len(segments)
    if need > len(images):
        raise ValueError(f"{need} frames requested, the {split} set has {len(images)}")
    chunks, domains, severities = [], [], []
    for i, (d, s) in enumerate(segments):
        idx = order[i * per_type:(i + 1) * per_type]
        chunks.append(corrupt(images[idx], CORRUPTIONS[d], s, seed=seed if isinstance(severity, int) else seed + i))
        domains.append(np.full(per_type, d, dtype=np.int8))
        severities.append(np.full(per_type, s, dtype=np.int8))
    idx = order[:need]
    what = f"15 corruptions x {per_type}, severity {severity}" if isinstance(severity, int) else \
        f"15 corruptions, severity {'-'.join(map(str, schedule))} within each type, {per_type} per segment"
    out = {
        "images": np.concatenate(chunks), "labels": labels[idx].astype(np.int8),
        "domains": np.concatenate(domains), "domain_names": np.array(CORRUPTIONS),
        "class_names": np.array(datasets.FASHION_MNIST_CLASSES),
        "severity": np.int8(max(schedule)), "source_index": idx.astype(np.int32),
        "description": np.array(f"built-in demo: Fashion-MNIST {split}, {what}, continual order"),
        "notice": np.array(NOTICE),
    }
    if not isinstance(severity, int):
        out["severities"] = np.concatenate(severities)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetta_export.demo_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-type", type=int, default=200, help="images per corruption type (default: %(default)s)")
    p.add_argument("--severity", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the system's)")
    p.add_argument("--out", default="edgetta/data/demo_stream.npz", help="(default: %(default)s)")
    a = p.parse_args(argv)
    stream = build(a.per_type, a.severity, a.seed, a.data_root)
    with atomic_write(a.out) as f:
        np.savez_compressed(f, **stream)
    print(f"wrote {a.out}: {len(stream['images'])} frames")
    return 0


if __name__ == "__main__":
    from edgetta.console import run_cli
    run_cli(main)
