"""The side-by-side comparison: source, BN-adapt, TENT, CoTTA, EcoTTA in PyTorch and edgetta
(EcoTTA on onnxruntime-training), same backbone, same corrupted stream, same batch size, each
method in a fresh process, in one run.

    python -m benchmarks.compare                      # every suite below except sparsity
    python -m benchmarks.compare --suites sparsity    # the pruning side (benchmarks/sparsity.py)
    python -m benchmarks.compare --smoke              # a tiny run of every suite (what the tests run)

Suites (``--suites``):
- ``main``: continual stream, 15 corruption types at severity 5 in the standard order, no reset,
  ``--frames-per-type`` Fashion-MNIST test images each, batch ``--batch``: error per type and
  mean, time per batch, peak RSS.
- ``small_batch``: the same protocol at batches ``--small-batches`` on a shorter stream
  (``--small-frames-per-type``).
- ``gradual``: severity 1-2-3-4-5-4-3-2-1 within each type (``--gradual-per-segment`` images per
  segment), continual.
- ``memory``: a few adaptation steps on random frames per method and model
  (``--memory-models``: ``default`` is the trained WRN-16-2; zoo names are untrained, ResNet-50
  at 224x224), peak RSS and activation share, under each allocator setting in
  ``--memory-malloc`` (default model) / ``--memory-zoo-malloc`` (zoo models). A run of some
  models replaces only those models in the report.
- ``sparsity``: ``benchmarks/sparsity.py`` (trains models: see there).

Results: ``benchmarks/results/compare.json`` (a suite run replaces only its own section), then
``docs/benchmarks.md`` and the PNG plots in ``benchmarks/results/``, all generated from the JSON
(``python -m benchmarks.report`` regenerates them without running anything).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import report, sparsity
from benchmarks.common import (RESULTS, ROOT, HelpFormatter, continual_stream, export_cached_bundle, gradual_stream,
                               load_json, merge_json, positive_int, run_cli, run_job, untrained_checkpoint)
from benchmarks.methods import METHODS, RUNNABLE, spec

SUITES = ("main", "small_batch", "gradual", "memory", "sparsity")
DEFAULT_SUITES = ("main", "small_batch", "gradual", "memory")
MEMORY_MODELS = ("default", "wrn28_10", "wrn40_2", "resnet50", "mobilenet_v2_224")


def _progress(total: int, quiet: bool):
    from tqdm import tqdm
    # a bar on a terminal only (disable=None): a log gets the FAILED lines, not redraws
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, disable=True if quiet else None)


def _memory_bundle(model: str, default_bundle: Path, lean: bool = True) -> Path:
    if model == "default" and lean:
        return default_bundle
    if model == "default":
        from edgetta_export import checkpoint
        from edgetta_export.bundle import DEFAULT_CHECKPOINT
        return export_cached_bundle(checkpoint.load(DEFAULT_CHECKPOINT), "default_generated", lean=False)
    return export_cached_bundle(untrained_checkpoint(model), f"{model}_untrained" + ("" if lean else "_generated"),
                                **({} if lean else {"lean": False}))


def plan(a: argparse.Namespace, ckpt_path: str, bundle: Path) -> list[tuple[tuple, list[str]]]:
    """(where the result goes, run_method arguments) for every run, in order."""
    jobs = []
    base = ["--checkpoint", ckpt_path, "--bundle", str(bundle)]
    if "main" in a.suites:
        stream = continual_stream(a.frames_per_type, 5, a.seed)
        for m in a.methods:
            jobs.append((("main", m), ["--method", m, "--stream", str(stream), "--batch", str(a.batch), *base]))
    if "small_batch" in a.suites:
        stream = continual_stream(a.small_frames_per_type, 5, a.seed)
        for b in a.small_batches:
            for m in a.methods:
                jobs.append((("small_batch", str(b), m),
                             ["--method", m, "--stream", str(stream), "--batch", str(b), *base]))
    if "gradual" in a.suites:
        stream = gradual_stream(a.gradual_per_segment, a.seed)
        for m in a.methods:
            jobs.append((("gradual", m), ["--method", m, "--stream", str(stream), "--batch", str(a.batch), *base]))
    if "memory" in a.suites:
        for model in a.memory_models:
            mcfg = memory_config(a, model)
            mbundle = _memory_bundle(model, bundle)
            src = base if model == "default" else ["--model", model, "--bundle", str(mbundle)]
            for malloc in mcfg["malloc"]:
                for m in a.methods:
                    if METHODS[m].device and malloc == "default":
                        continue  # the Adapter always pins glibc's mmap threshold
                    extra = []
                    if m == "cotta" and mcfg["cotta_augmentations"] != 32:
                        extra = ["--cotta-augmentations", str(mcfg["cotta_augmentations"])]
                    args = ["--method", m, "--random-steps", str(mcfg["steps"]), "--batch", str(mcfg["batch"]),
                            "--malloc", malloc, *src, *extra]
                    jobs.append((("memory", model, malloc, m), args))
                    if m == "edgetta":  # the same model with onnxruntime-training's graph as generated
                        gen = _memory_bundle(model, bundle, lean=False)
                        jobs.append((("memory", model, malloc, "edgetta_generated"),
                                     ["--method", m, "--random-steps", str(mcfg["steps"]),
                                      "--batch", str(mcfg["batch"]), "--malloc", malloc,
                                      *(base if model == "default" else ["--model", model]), "--bundle", str(gen)]))
                        # the same bundle with onnxruntime's arena: the trade of Adapter(memory_arena=True)
                        jobs.append((("memory", model, malloc, "edgetta_arena"), [*args, "--memory-arena"]))
                zoo_aug = a.memory_cotta_augmentations or 32
                if model == "default" and "cotta" in a.methods and zoo_aug != 32:
                    # evidence that CoTTA's peak does not depend on its number of augmentations
                    jobs.append((("memory", model, malloc, f"cotta_aug{zoo_aug}"),
                                 ["--method", "cotta", "--random-steps", str(mcfg["steps"]),
                                  "--batch", str(mcfg["batch"]), "--malloc", malloc, *src,
                                  "--cotta-augmentations", str(zoo_aug)]))
    return jobs


def memory_config(a: argparse.Namespace, model: str) -> dict[str, Any]:
    """Batch, steps, allocator settings and CoTTA augmentations of one model's memory runs."""
    overrides = dict(o.split("=") for o in a.memory_batch_override)
    zoo = model != "default"
    return {"batch": int(overrides.get(model, a.memory_batch)), "steps": a.memory_steps,
            "malloc": a.memory_zoo_malloc if zoo else a.memory_malloc,
            "cotta_augmentations": (a.memory_cotta_augmentations or 32) if zoo else 32}


def kept_results(results: dict, methods: set[str], same_warmup: bool) -> dict:
    """What a run of ``methods`` keeps of an earlier run's ``results`` (method -> result, perhaps
    below batch keys): every other method's, except, unless ``same_warmup`` (the checkpoint file
    is byte for byte the one the earlier run used), those that use the warmed-up meta networks."""
    out = {}
    for k, v in results.items():
        if k in methods or (k in METHODS and METHODS[k].meta and not same_warmup):
            continue
        out[k] = kept_results(v, methods, same_warmup) if isinstance(v, dict) and k.isdigit() else v
    return out


def _store(section: dict, key: tuple, value: dict) -> None:
    node = section.setdefault("results", {})
    for k in key[1:-1]:
        node = node.setdefault(k, {})
    node[key[-1]] = value


def _edgetta_profile(bundle: Path, batch: int, one_step: bool = False) -> dict[str, float]:
    """edgetta's own static breakdown of one step (what the paper's analytic MB counts) and, with
    ``one_step``, what one step adds in a fresh process (``edgetta.profile.measure_step``, the
    figure the profiler's estimate is checked against)."""
    from edgetta.bundle import Bundle
    from edgetta.profile import MIB, analyse, measure_step
    from edgetta.targets import get_target
    full = analyse(Bundle.open(bundle, verify=False), get_target("x86-64"), batch)
    measured = {"measured_step_mib": measure_step(bundle, batch)["step_peak"] / MIB} if one_step else {}
    r = full["adaptation"]
    by_consumer: dict[str, float] = {}
    for t in full["kept_tensors"]:  # what the kept tensors are kept for (gradient op reading them)
        op = "+".join(t["consumers"])
        by_consumer[op] = by_consumer.get(op, 0.0) + t["bytes"] / MIB
    return {"activations_kept_mib": r["activations_kept"] / MIB,
            "static_step_mib": (r["activations_kept"] + r["workspace"]) / MIB,
            "analytic_mib": (r["total"] - r["workspace"] - r["parameters_frozen_second_layout"]) / MIB,
            "kept_by_consumer_mib": dict(sorted(by_consumer.items(), key=lambda kv: -kv[1])), **measured}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--suites", nargs="+", default=list(DEFAULT_SUITES), choices=SUITES)
    p.add_argument("--methods", nargs="+", default=list(RUNNABLE), choices=RUNNABLE)
    p.add_argument("--checkpoint", default=None, help="host checkpoint (default: the built-in model)")
    p.add_argument("--frames-per-type", type=positive_int, default=200)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--small-batches", type=int, nargs="+", default=[16, 4, 1])
    p.add_argument("--small-frames-per-type", type=int, default=40)
    p.add_argument("--gradual-per-segment", type=int, default=20)
    p.add_argument("--memory-models", nargs="+", default=list(MEMORY_MODELS))
    p.add_argument("--memory-batch", type=positive_int, default=64)
    p.add_argument("--memory-batch-override", nargs="*", default=[], metavar="MODEL=BATCH",
                   help="another batch for some memory models, e.g. resnet50=16")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--memory-malloc", nargs="+", default=["default", "pinned"], choices=["default", "pinned", "auto"],
                   help="allocator settings for the default model's memory runs (edgetta runs pinned only)")
    p.add_argument("--memory-zoo-malloc", nargs="+", default=["pinned"], choices=["default", "pinned", "auto"],
                   help="allocator settings for the zoo models' memory runs")
    p.add_argument("--memory-cotta-augmentations", type=int, default=2,
                   help="CoTTA augmentations in the zoo models' memory runs (2, not 32: the "
                        "augmented teacher passes run without autograd, one at a time, so peak memory "
                        "does not depend on their number; time does, and the report estimates the "
                        "32-augmentation step time from the measured forward time)")
    p.add_argument("--threads", type=positive_int, default=1, help="threads of every method (torch and onnxruntime)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--smoke", action="store_true", help="tiny run of every selected suite (tests)")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.smoke:
        a.frames_per_type, a.batch, a.small_batches, a.small_frames_per_type = 2, 8, [4], 1
        a.gradual_per_segment, a.memory_batch, a.memory_steps = 1, 8, 1
        a.memory_models, a.memory_malloc, a.memory_zoo_malloc = ["default"], ["pinned"], ["pinned"]
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "compare.json"
    data: dict[str, Any] = {}
    command = "python -m benchmarks.compare " + shlex.join(argv if argv is not None else sys.argv[1:])

    if "sparsity" in a.suites:
        data["sparsity"] = sparsity.run(smoke=a.smoke, threads=a.threads, seed=a.seed,
                                        per_type=a.frames_per_type if not a.smoke else 2,
                                        quiet=a.quiet)
        data["sparsity"]["command"] = command
    jobs_suites = [s for s in a.suites if s != "sparsity"]
    if jobs_suites:
        from edgetta_export import checkpoint
        from edgetta_export.bundle import DEFAULT_CHECKPOINT
        ckpt_path = str(Path(a.checkpoint or DEFAULT_CHECKPOINT).resolve())
        bundle = export_cached_bundle(checkpoint.load(ckpt_path), "default" if a.checkpoint is None
                                      else Path(ckpt_path).stem)
        jobs = plan(a, ckpt_path, bundle)
        config = {"command": command, "methods": a.methods, "threads": a.threads, "seed": a.seed,
                  "checkpoint": os.path.relpath(ckpt_path, ROOT),
                  "checkpoint_sha256": hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest(), "smoke": a.smoke,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}}
        suite_cfg = {
            "main": {"frames_per_type": a.frames_per_type, "severity": 5, "batch": a.batch},
            "small_batch": {"frames_per_type": a.small_frames_per_type, "severity": 5, "batches": a.small_batches},
            "gradual": {"per_segment": a.gradual_per_segment, "severities": [1, 2, 3, 4, 5, 4, 3, 2, 1],
                        "batch": a.batch},
            "memory": {},
        }
        for s in jobs_suites:
            data[s] = {"config": {**config, **suite_cfg[s]}, "results": {}}
        full_run = set(a.methods) >= set(RUNNABLE)
        old_all = load_json(json_path)
        for s in (x for x in jobs_suites if x != "memory" and not full_run):
            # a run of some methods replaces only those methods, when the stream and the checkpoint
            # are the same; the report lists every command that contributed
            prev = old_all.get(s, {})
            pc = prev.get("config", {})
            same = all(pc.get(k) == data[s]["config"].get(k) for k in (*suite_cfg[s], "checkpoint", "threads", "seed", "smoke"))
            if same:
                same_warmup = pc.get("checkpoint_sha256") == config["checkpoint_sha256"]
                kept = kept_results(prev.get("results", {}), set(a.methods), same_warmup)
                data[s]["results"] = kept
                data[s]["config"]["partial_commands"] = list(dict.fromkeys(
                    pc.get("partial_commands", [pc.get("command")]) + [command]))
        if "memory" in jobs_suites:  # a memory run replaces only the (model, method) pairs it measures
            old = old_all.get("memory", {})
            results = old.get("results", {})
            for model in a.memory_models:
                for ml in list(results.get(model, {})):
                    results[model][ml] = {m: v for m, v in results[model][ml].items()
                                          if m not in a.methods and not m.startswith("cotta_aug")
                                          and not (m in ("edgetta_generated", "edgetta_arena") and "edgetta" in a.methods)}
            data["memory"]["results"] = results
            data["memory"]["models"] = old.get("models", {})
            for model in a.memory_models:
                prev = data["memory"]["models"].get(model, {})
                data["memory"]["models"][model] = {
                    **memory_config(a, model), "command": command if full_run else prev.get("command", command),
                    "started": config["started"], "machine": config["machine"],
                    "partial_commands": ([] if full_run else list(dict.fromkeys(prev.get("partial_commands", []) + [command])))}
        bar = _progress(len(jobs), a.quiet)
        for key, args in jobs:
            bar.set_description(" ".join(key))
            result = run_job(args, a.threads, a.timeout)
            if "failed" in result and key[0] == "memory":
                # a crash (seen: PyTorch 2.13's CPU backward segfaults for EcoTTA on ResNet-50 with
                # channels-last input, which edgetta_export.train.to_tensor gives): run it again with a
                # contiguous input, say so
                retry = run_job(args + ["--contiguous-input"], a.threads, a.timeout)
                if "failed" not in retry:
                    retry["fallback"] = {"contiguous_input": True, "failed": result["failed"]}
                    result = retry
            if spec(key[-1]).device and "failed" not in result and key[0] in ("main", "memory"):
                try:
                    b = Path(args[max(i for i, x in enumerate(args) if x == "--bundle") + 1])  # the last one counts
                    result.update(_edgetta_profile(b, int(args[args.index("--batch") + 1]),
                                                   one_step=key[0] == "memory"))
                except Exception as e:  # the static figure is extra; never lose the run for it
                    result["static_error"] = str(e)
            _store(data[key[0]], key, result)
            if "failed" in result:
                bar.write(f"{' '.join(key)}: FAILED {result['failed']}")
            bar.update(1)
            merge_json(json_path, {s: data[s] for s in jobs_suites})
        bar.close()
        for s in jobs_suites:
            data[s]["config"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            data[s]["config"]["machine"]["load_avg_at_end"] = os.getloadavg()
    data = merge_json(json_path, {s: data[s] for s in a.suites})
    print(f"wrote {json_path}")
    if not a.no_report:
        for path in report.write_all(data, out_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
