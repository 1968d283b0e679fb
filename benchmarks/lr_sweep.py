"""Choose the adaptation learning rate on a validation stream that is NOT the demo stream:
Fashion-MNIST *training* images, corrupted with the same 15 types at severity 5, continual.

    python -m benchmarks.lr_sweep BUNDLE --lrs 0.001 0.002 0.005 0.01 0.02

Prints accuracy without adaptation and with adaptation at each learning rate (same bundle,
same stream, one process) and writes a JSON report.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import RESULTS, HelpFormatter, positive_int, run_cli
from edgetta import Adapter
from edgetta.system import write_text_atomic
from edgetta_export.demo_stream import build


def validation_stream(per_type: int, severity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark stream's recipe on Fashion-MNIST *training* images (seed offset 1000)."""
    s = build(per_type, severity, seed + 1000, split="train")
    return s["images"], s["labels"].astype(np.int64)


def accuracy(adapter: Adapter, images: np.ndarray, labels: np.ndarray, batch: int, adapt: bool) -> float:
    pred = np.concatenate([adapter.step(images[i:i + batch], adapt=adapt).argmax(1)
                           for i in range(0, len(images), batch)])
    return float((pred == labels).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lr_sweep", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02])
    p.add_argument("--per-type", type=positive_int, default=200)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "lr_sweep.json"))
    a = p.parse_args(argv)
    images, labels = validation_stream(a.per_type, a.severity, a.seed)
    base = Adapter.load(a.bundle)
    report = {"bundle": a.bundle, "frames": len(images), "batch": a.batch, "severity": a.severity,
              "stream": "Fashion-MNIST train images, 15 corruptions, continual",
              "no_adaptation": accuracy(base, images, labels, a.batch, adapt=False), "adapted": {}}
    print(f"no adaptation: {100 * report['no_adaptation']:.1f}%")
    for lr in a.lrs:
        t = time.time()
        adapter = Adapter.load(a.bundle, lr=lr)
        acc = accuracy(adapter, images, labels, a.batch, adapt=True)
        report["adapted"][str(lr)] = acc
        print(f"lr {lr:<8g} adapted: {100 * acc:.1f}%  ({time.time() - t:.0f}s)")
    report["best_lr"] = float(max(report["adapted"], key=report["adapted"].get))
    write_text_atomic(a.out, json.dumps(report, indent=2))
    print(json.dumps({"best_lr": report["best_lr"], "out": a.out}))
    return 0


if __name__ == "__main__":
    run_cli(main)
