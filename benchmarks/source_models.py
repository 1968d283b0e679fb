"""What the source models' training runs measured, gathered from their checkpoints into one
JSON report (the weights stay out).

    python -m edgetta_export.train --model wrn16_2 --scheme erk --sparsity 0.8 --epochs 5 --threads 1 --out runs/wrn16_2_erk80.pt
    python -m edgetta_export.train --model wrn16_2 --sparsity 0 --epochs 5 --threads 1 --out runs/wrn16_2_dense.pt
    python -m benchmarks.source_models runs/wrn16_2_erk80.pt runs/wrn16_2_dense.pt

Each checkpoint becomes one entry, named by its file's stem: architecture, dataset, pruning
(scheme, sparsity, density), clean test accuracy, training time, hyperparameters, the training
command, the per-epoch history and the per-layer sparsity report. Entries of other checkpoints
already in the report are kept.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, HelpFormatter, merge_json, run_cli

FIELDS = ("model", "dataset", "pruning", "test_accuracy", "train_time_s", "hyper", "command", "history",
          "sparsity_report")


def summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The measured facts of a training checkpoint (``edgetta_export.train``), without weights."""
    return {k: ckpt[k] for k in FIELDS if k in ckpt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.source_models", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by python -m edgetta_export.train")
    p.add_argument("--out", default=str(RESULTS / "source_models.json"))
    a = p.parse_args(argv)
    from edgetta_export import checkpoint
    entries = {Path(c).stem: summary(checkpoint.load(c)) for c in a.checkpoints}
    merge_json(Path(a.out), entries)
    for name, e in entries.items():
        print(f"{name}: test accuracy {e.get('test_accuracy')}, density {e.get('pruning', {}).get('density')}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
