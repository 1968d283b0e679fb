"""Build the built-in demo stream: Fashion-MNIST test images (as 32x32x3), corrupted with the
15 CIFAR-10-C types at one severity, in the standard continual order.

    python -m edgetta_export.demo_stream --per-type 200 --severity 5 --out edgetta/data/demo_stream.npz
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from . import datasets
from .corruptions import CORRUPTIONS, corrupt

NOTICE = ("Derived from Fashion-MNIST (c) 2017 Zalando SE, MIT License: test images padded to "
          "32x32, channel repeated, corrupted with edgetta's CIFAR-10-C-style generator.")


def build(per_type: int, severity: int, seed: int, data_root: str | None = None) -> dict:
    images, labels = datasets.fashion_mnist("test", data_root)
    order = np.random.default_rng(seed).permutation(len(images))
    need = per_type * len(CORRUPTIONS)
    if need > len(images):
        raise ValueError(f"{need} frames requested, the test set has {len(images)}")
    chunks, domains = [], []
    for d, name in enumerate(CORRUPTIONS):
        idx = order[d * per_type:(d + 1) * per_type]
        chunks.append(corrupt(images[idx], name, severity, seed=seed))
        domains.append(np.full(per_type, d, dtype=np.int8))
    idx = order[:need]
    return {
        "images": np.concatenate(chunks), "labels": labels[idx].astype(np.int8),
        "domains": np.concatenate(domains), "domain_names": np.array(CORRUPTIONS),
        "class_names": np.array(datasets.FASHION_MNIST_CLASSES),
        "severity": np.int8(severity), "source_index": idx.astype(np.int32),
        "description": np.array(f"built-in demo: Fashion-MNIST test, 15 corruptions x {per_type}, "
                                f"severity {severity}, continual order"),
        "notice": np.array(NOTICE),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetta_export.demo_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-type", type=int, default=200)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="edgetta/data/demo_stream.npz")
    a = p.parse_args(argv)
    stream = build(a.per_type, a.severity, a.seed, a.data_root)
    np.savez_compressed(a.out, **stream)
    print(f"wrote {a.out}: {len(stream['images'])} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
