"""One adaptation step as each runner ships, in fresh processes: edgetta's Adapter with its
defaults (no onnxruntime arena, glibc's mmap threshold pinned, so that a step's memory goes back
to the OS), the Adapter with ``memory_arena=True``, on both engines, and EcoTTA in PyTorch with
glibc's defaults, same model, batch 64, one thread each (issue 16).

    python -m benchmarks.shipped_step                                  # WRN-16-2 and WRN-40-2
    python -m benchmarks.shipped_step --models wrn28_10 --steps 3 --rounds 1 --add

benchmarks.step_profile compares the engines with PyTorch inside one process, stepped in turn,
where every runner has the same allocator settings; this benchmark measures what a user gets,
allocator settings included: without an arena every tensor of a step is a fresh allocation
that the kernel page-faults in, which costs time that an in-process comparison with glibc's
defaults does not show.

Each run is ``benchmarks.run_method`` (``--random-steps``: random frames; time does not depend on
pixel values) in a fresh interpreter; its ms per step is the median over the steps after the
first. The runners of a round run one after the other, and rounds repeat the order, so that a
change in the machine's load falls on all of them; the figure kept is the median over rounds.
Peak RSS is the whole process's. Models: the built-in checkpoint for wrn16_2, else the untrained
checkpoint (benchmarks.common) that benchmarks.step_profile uses.

Writes benchmarks/results/shipped_step.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from benchmarks.common import RESULTS, HelpFormatter, load_json, positive_int, run_cli, run_job
from edgetta.system import write_text_atomic

OUT = RESULTS / "shipped_step.json"


@dataclass(frozen=True)
class Runner:
    key: str
    label: str
    args: tuple[str, ...]


RUNNERS = (
    Runner("ecotta_torch", "EcoTTA in PyTorch (glibc defaults)", ("--method", "ecotta_torch")),
    Runner("edgetta", "edgetta, training engine (Adapter defaults)", ("--method", "edgetta")),
    Runner("edgetta_arena", "edgetta, training engine, memory_arena=True",
           ("--method", "edgetta", "--memory-arena")),
    Runner("edgetta_onnx", "edgetta, portable engine (Adapter defaults)", ("--method", "edgetta", "--engine", "onnx")),
    Runner("edgetta_onnx_arena", "edgetta, portable engine, memory_arena=True",
           ("--method", "edgetta", "--engine", "onnx", "--memory-arena")),
)


@dataclass(frozen=True)
class Measured:
    runner: str
    ms_per_step: float          # median over rounds of each process's median step
    ms_rounds: list[float]
    peak_rss_mib: float         # largest over rounds
    ratio_to_torch: float | None


def _sources(model: str) -> list[str]:
    """run_method's model arguments: the checkpoint and the bundle step_profile measures."""
    from benchmarks.step_profile import model_bundle
    from edgetta_export.bundle import DEFAULT_CHECKPOINT
    _, bundles = model_bundle(model)
    model_args = ["--checkpoint", str(DEFAULT_CHECKPOINT)] if model == "wrn16_2" else ["--model", model]
    return [*model_args, "--bundle", str(bundles["after"])]


def measure(model: str, batch: int, steps: int, rounds: int, timeout: float,
            runners: Sequence[Runner] = RUNNERS) -> list[Measured]:
    src = _sources(model)
    runs: dict[str, list[dict[str, Any]]] = {r.key: [] for r in runners}
    for _ in range(rounds):
        for r in runners:
            out = run_job([*r.args, "--random-steps", str(steps), "--batch", str(batch), *src], 1, timeout)
            if "failed" in out:
                raise RuntimeError(f"{model} {r.key}: {out['failed']}")
            runs[r.key].append(out)
    torch_ms = (float(np.median([round(o["ms_per_batch"], 1) for o in runs["ecotta_torch"]]))
                if "ecotta_torch" in runs else None)
    result = []
    for r in runners:
        ms = [round(o["ms_per_batch"], 1) for o in runs[r.key]]
        med = float(np.median(ms))
        result.append(Measured(r.key, round(med, 1), ms, round(max(o["peak_rss_mib"] for o in runs[r.key]), 1),
                               round(med / torch_ms, 3) if torch_ms else None))
    return result


def table(models: dict[str, Any]) -> str:
    labels = {r.key: r.label for r in RUNNERS}
    rows = ["| model | runner | ms per step (median of rounds) | / PyTorch | peak RSS MiB |", "|---|---|---|---|---|"]
    for model, m in models.items():
        for x in m["measured"]:
            ratio = "" if x["ratio_to_torch"] is None else f"{x['ratio_to_torch']:.2f}"
            rows.append(f"| {model} | {labels.get(x['runner'], x['runner'])} | {x['ms_per_step']:.0f} "
                        f"({', '.join(f'{v:.0f}' for v in x['ms_rounds'])}) | {ratio} | {x['peak_rss_mib']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shipped_step", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["wrn16_2", "wrn40_2"])
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=6, help="random batches per process (the first is not timed)")
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--add", action="store_true", help="keep the other models of the JSON file")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be at least 2: the first step is not timed")
    command = ("python -m benchmarks.shipped_step " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    data = load_json(a.out) if a.add else {}
    models = data.get("models", {})
    for model in a.models:
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        measured = measure(model, a.batch, a.steps, a.rounds, a.timeout)
        models[model] = {"command": command, "started": started, "batch": a.batch, "steps": a.steps,
                         "rounds": a.rounds, "threads": 1, "machine": platform.platform(),
                         "measured": [asdict(m) for m in measured]}
    data["models"] = models
    write_text_atomic(a.out, json.dumps(data, indent=1) + "\n")
    print(table(models))
    return 0


if __name__ == "__main__":
    run_cli(main)
