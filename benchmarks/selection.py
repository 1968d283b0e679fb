"""Hyperparameter selection for long runs on corrupted TRAINING images (never on a test stream).

    python -m benchmarks.selection                          # the anchor grid, JSON + docs/selection.md
    python -m benchmarks.selection --anchors 0 0.01 --lrs 0.0025   # other grid points (added to the JSON)
    python -m benchmarks.selection --report                 # docs/selection.md from the JSON
    python -m benchmarks.selection --smoke --out-dir /tmp/sel   # a tiny run (tests)

The project's rule: a hyperparameter is chosen on corrupted training images, validated on the
test images of both generators (``python -m benchmarks.longterm --generator ...``), and never
tuned on a test stream. Here the question is the long-term one (issue 19): which anchor rho
(``Adapter(anchor=rho)``, and the learning rate where ``--lrs`` asks) keeps edgetta stable over
ten rounds without giving up accuracy.

Selection stream: Fashion-MNIST TRAIN images as 32x32x3, corrupted with the project's generator
(``edgetta_export.demo_stream.build(..., split="train")``), the 15 corruptions in the standard
order, ``--frames-per-type`` images each, severity 5, seed ``--seeds`` (11: the test streams use
0-2), repeated ``--rounds`` times with no reset, batch 64. Clean images: ``--clean-frames`` TRAIN
images from the tail of the same seeded permutation, so none of them is in the stream.

Every grid point runs the device path (``edgetta.Adapter`` with its public options, torch
blocked) in a fresh process with one thread, through the long-term suite's worker
(``benchmarks.longterm.run_jobs``); ``--method ecotta_torch`` runs EcoTTA in PyTorch instead,
which follows the device to the frame (tests/test_longterm.py).

The criterion (fixed before the first run; CRITERION below, copied into the JSON and the report):
among the grid points whose error in the last round is within 1 point of round 1's (either way)
and whose clean error after the last round (as the device predicts single frames: meta
BatchNorms on running statistics) is at most 2 points above the warmed-up model's, the lowest
mean stream error over all rounds; points within 0.1 point of that mean count as tied, and of
tied points the smallest rho (then the largest learning rate) wins: the least intervention. If no
point qualifies, nothing is chosen.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (CACHE, RESULTS, ROOT, HelpFormatter, continual_stream, load_json, merge_json, run_cli,
                               write_generated_doc)
from benchmarks.longterm import Job, bundles, checkpoint_label, clean_subset, default_checkpoint, run_jobs, summary

log = logging.getLogger("benchmarks.selection")

DOC = ROOT / "docs" / "selection.md"
JSON_NAME = "selection.json"
CRITERION = (
    "Among the grid points whose error in the last round is within 1 point of round 1's (either way) "
    "and whose clean error after the last round (as the device predicts single frames: meta BatchNorms "
    "on running statistics) is at most 2 points above the warmed-up model's, the lowest mean stream error "
    "over all rounds; points within 0.1 point of that mean count as tied, and of tied points the smallest "
    "rho (then the largest learning rate) wins. If no point qualifies, nothing is chosen.")
DRIFT_MAX, FORGET_MAX, TIE = 0.01, 0.02, 0.001


@dataclass(frozen=True)
class GridPoint:
    anchor: float
    lr: float | None    # None: the bundle's learning rate

    @property
    def tag(self) -> str:
        return "".join(f"+{k}{v:g}" for k, v in (("lr", self.lr), ("anchor", self.anchor)) if v)


@dataclass(frozen=True)
class Verdict:
    """One grid point's figures against the criterion."""
    name: str
    seed: int
    anchor: float
    lr: float           # the SGD learning rate it ran with (the bundle's unless overridden)
    rounds: int
    mean_error: float
    round1: float
    last: float
    drift: float
    forgetting: float | None
    forgetting_batch_stats: float | None
    stable: bool
    retains: bool

    @property
    def qualifies(self) -> bool:
        return self.stable and self.retains


def verdict(name: str, rec: dict[str, Any], seed: int, bundle_lr: float) -> Verdict | None:
    """The criterion's figures of one finished (or stopped) run; None before its first round."""
    s = summary(rec)
    if not s:
        return None
    forgetting = s["forgetting"]
    return Verdict(name=name, seed=seed, anchor=float(rec.get("anchor") or 0.0), lr=rec.get("lr") or bundle_lr,
                   rounds=int(s["last_round"]), mean_error=float(np.mean([r["error"] for r in rec["rounds"]])),
                   round1=s["round1"], last=s["last"], drift=s["drift"], forgetting=forgetting,
                   forgetting_batch_stats=s["forgetting_batch_stats"], stable=abs(s["drift"]) <= DRIFT_MAX,
                   retains=forgetting is not None and forgetting <= FORGET_MAX)


def choose(verdicts: list[Verdict]) -> Verdict | None:
    """The criterion (module text) over finished grid points of one seed."""
    ok = [v for v in verdicts if v.qualifies]
    if not ok:
        return None
    best = min(v.mean_error for v in ok)
    tied = [v for v in ok if v.mean_error <= best + TIE]
    return min(tied, key=lambda v: (v.anchor, -v.lr))


def verdicts_of(data: dict[str, Any], rounds: int) -> dict[int, list[Verdict]]:
    """Per seed, the verdicts of the runs that finished ``rounds`` rounds."""
    out: dict[int, list[Verdict]] = {}
    for name, run in data.get("runs", {}).items():
        v = verdict(name, run["record"], run["seed"], data["config"]["bundle_lr"])
        if v is not None and v.rounds == rounds:
            out.setdefault(run["seed"], []).append(v)
    return out


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = Path(a.out_dir) / JSON_NAME
    checkpoint_path = Path(a.checkpoint or default_checkpoint())
    bundle = bundles({(a.lam, None)}, checkpoint_path)[(a.lam, None)]
    grid = [GridPoint(rho, lr) for lr in a.lrs for rho in a.anchors]
    command = ("python -m benchmarks.selection " + shlex.join(a.argv)).strip()
    partial_dir = CACHE / "selection" / ("smoke" if a.smoke else "full")
    jobs, names = [], {}
    for seed in a.seeds:
        stream, clean = continual_stream(a.frames_per_type, 5, seed, split="train"), clean_subset(a.clean_frames, seed, "train")
        for g in grid:
            job = Job(a.method, stream, clean, bundle, checkpoint_path, partial_dir / f"{a.method}{g.tag}_seed{seed}.json",
                      g.tag, a.rounds, a.batch, 1, seed, tuple(a.clean_after), g.lr, g.anchor or None)
            jobs.append(job)
            names[job] = f"{a.method}{g.tag or '+anchor0'}, seed {seed}"
    config = {"command": command, "criterion": CRITERION, "method": a.method,
              "checkpoint": checkpoint_label(checkpoint_path), "lambda": a.lam,
              "bundle_lr": json.loads((bundle / "manifest.json").read_text())["adaptation"]["lr"], "frames_per_type": a.frames_per_type,
              "severity": 5, "rounds": a.rounds, "batch": a.batch, "clean_frames": a.clean_frames,
              "clean_after": a.clean_after, "threads": 1, "smoke": a.smoke,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}}
    old = load_json(out)
    differ = [k for k in ("method", "checkpoint", "lambda", "frames_per_type", "rounds", "batch", "clean_frames")
              if old.get("config", {}).get(k) != config[k]]
    if old.get("runs") and differ and not a.fresh:
        raise SystemExit(f"error: {out} holds runs with another {differ[0]} ({old['config'].get(differ[0])}); "
                         "pass --fresh to replace them, or --out-dir for a grid of its own")
    merge_json(out, {"config": config, "runs": {} if differ else old.get("runs", {})})

    def update(job: Job, record: dict[str, Any]) -> None:
        data = load_json(out)
        data["runs"][names[job]] = {"seed": job.seed, "anchor": job.anchor or 0.0, "lr": job.lr,
                                    "command": command, "record": record}
        merge_json(out, {"runs": data["runs"]})
    failed = run_jobs(jobs, a.jobs, update, a.poll)
    data = load_json(out)
    data["config"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    merge_json(out, {"config": data["config"]})
    write_report(out, DOC if Path(a.out_dir) == RESULTS else Path(a.out_dir) / "selection.md")
    return 1 if failed else 0


def _pct(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def render(data: dict[str, Any]) -> str:
    cfg = data["config"]
    per_seed = verdicts_of(data, cfg["rounds"])
    lines = [
        "# Selection on corrupted training images: the anchor for long runs",
        "",
        f"Generated by `python -m benchmarks.selection --report` from `benchmarks/results/{JSON_NAME}`; "
        "nothing here is typed in by hand.",
        "",
        "The project's rule: hyperparameters are chosen on corrupted TRAINING images, validated on the test "
        "images of both generators (docs/longterm.md), never tuned on a test stream.",
        "",
        f"- Command: `{cfg['command']}` (started {cfg['started']}, finished {cfg.get('finished', 'not yet')}; "
        f"machine {cfg['machine']['platform']}, {cfg['machine']['cpus']} CPUs shared with other jobs).",
        f"- Method: `{cfg['method']}` ({'the device path, edgetta.Adapter' if cfg['method'] == 'edgetta' else 'EcoTTA in PyTorch'}), "
        f"one process per grid point, 1 thread; checkpoint `{cfg['checkpoint']}`, lambda {cfg['lambda']:g}.",
        f"- Stream: Fashion-MNIST TRAIN images as 32x32x3 (padded 2 pixels, channel repeated), the project's "
        f"15 corruptions in the standard order at severity {cfg['severity']}, {cfg['frames_per_type']} images "
        f"each ({15 * cfg['frames_per_type']} frames per round), batch {cfg['batch']}, {cfg['rounds']} rounds, no reset.",
        f"- Clean error: {cfg['clean_frames']} clean TRAIN images not in the stream, before round 1 and after "
        f"rounds {', '.join(map(str, cfg['clean_after']))}, as the device predicts single frames (meta "
        "BatchNorms on running statistics); the batch-statistics figure beside it for reference.",
        "",
        "## Criterion (written down before the first run)",
        "",
        cfg["criterion"],
        "",
    ]
    for seed in sorted(per_seed):
        vs = sorted(per_seed[seed], key=lambda v: (v.lr or 0.0, v.anchor))
        chosen = choose(vs)
        lines += [f"## Seed {seed}", "",
                  "| rho | lr | mean error | round 1 | last round | last - r1 | clean: change (running stats) | "
                  "clean: change (batch stats) | distance from warmed-up (relative) | bundle | stable | retains | chosen |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|:---:|:---:|:---:|"]
        for v in vs:
            rec = data["runs"][v.name]["record"]
            rel = rec["rounds"][-1]["param_distance_rel"]
            lines.append(f"| {v.anchor:g} | {v.lr:g} | {_pct(v.mean_error)} | "
                         f"{_pct(v.round1)} | {_pct(v.last)} | {_pct(v.drift, True)} | {_pct(v.forgetting, True)} | "
                         f"{_pct(v.forgetting_batch_stats, True)} | {'-' if rel is None else f'{rel:.1%}'} | "
                         f"{rec.get('bundle_sha256', '')[:8] or '-'} | {'yes' if v.stable else 'no'} | "
                         f"{'yes' if v.retains else 'no'} | {'**chosen**' if v is chosen else ''} |")
        lines += ["", "Bundle: the start of the sha256 of the bundle's manifest.json, which lists every file's sha256.",
                  "", f"Chosen on seed {seed}: " + (f"rho = {chosen.anchor:g}"
                                                    + f", lr = {chosen.lr:g}"
                                                    if chosen else "none qualifies") + ".", ""]
        lines += ["Per round (error %):", "", "| rho | lr | " + " | ".join(f"r{i}" for i in range(1, cfg["rounds"] + 1)) + " |",
                  "|---:|---:|" + "---:|" * cfg["rounds"]]
        for v in vs:
            rec = data["runs"][v.name]["record"]
            lines.append(f"| {v.anchor:g} | {v.lr:g} | "
                         + " | ".join(_pct(r["error"]) for r in rec["rounds"]) + " |")
        lines.append("")
    unfinished = [n for n, r in data.get("runs", {}).items() if len(r["record"]["rounds"]) < cfg["rounds"]]
    if unfinished:
        lines += ["Runs not finished (left out of the tables): " + ", ".join(sorted(unfinished)) + ".", ""]
    return "\n".join(lines)


def write_report(json_path: Path, doc: Path) -> Path:
    """The generated report, with any hand-written part below ``<!-- analysis -->`` kept."""
    return write_generated_doc(doc, render(load_json(json_path)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.selection", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--anchors", type=float, nargs="+", default=[0.0, 0.001, 0.003, 0.01, 0.03])
    p.add_argument("--lrs", type=float, nargs="+", default=[None],
                   help="SGD learning rates (default: the bundle's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[11])
    p.add_argument("--method", choices=("edgetta", "ecotta_torch"), default="edgetta")
    p.add_argument("--checkpoint", default=None, help="the warmed-up checkpoint (default: the project's)")
    p.add_argument("--lam", type=float, default=0.5, help="EcoTTA's lambda of the bundle")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--frames-per-type", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--clean-frames", type=int, default=2000)
    p.add_argument("--clean-after", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--jobs", type=int, default=2, help="processes at once")
    p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true",
                   help="start a new grid when the JSON holds runs of another setting (they are dropped)")
    p.add_argument("--report", action="store_true", help="only regenerate the report from the JSON")
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 frames per type, batch 8, 2 rounds, 2 anchors")
    a = p.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    if a.report:
        out_dir = Path(a.out_dir)
        print(f"wrote {write_report(out_dir / JSON_NAME, DOC if out_dir == RESULTS else out_dir / 'selection.md')}")
        return 0
    if a.smoke:
        a.frames_per_type, a.batch, a.rounds, a.clean_frames, a.clean_after, a.poll = 2, 8, 2, 16, [1, 2], 0.5
        a.anchors = a.anchors if "--anchors" in a.argv else [0.0, 0.3]
    return run(a)


if __name__ == "__main__":
    run_cli(main)
