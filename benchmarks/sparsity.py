"""The random-pruning side: what backbone sparsity costs and buys, on the default architecture.

    python -m benchmarks.sparsity                 # dense, uniform and ERK at 50/80/90% (trains 7 models)
    python -m benchmarks.sparsity --smoke

For each backbone (WRN-16-2, dense or randomly pruned at initialization): a SHORT training
(``edgetta_export.train.train``: ``--epochs`` on the first ``--train-images`` training images; the
built-in model had 5 full epochs), a short meta-network warm-up (``edgetta_export.warmup.warmup``),
then: clean test error (10,000 images), error on the corrupted continual stream (severity 5,
``--per-type`` per type) without adaptation (source backbone) and with edgetta, the bundle's
size (``export_bundle``, sparse storage where a layer is under 30% dense), and the time of
an adaptation step and of inference at batch ``--batch`` (fresh torch-free processes,
``benchmarks.run_method``, ``--threads`` threads). Trained checkpoints are cached.
Results go to the ``sparsity`` section of ``benchmarks/results/compare.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.common import (CACHE, RESULTS, HelpFormatter, continual_stream, export_cached_bundle, load_json,
                               merge_json, run_cli, run_job)
from benchmarks.tables import SPARSE_MAX_DENSITY

log = logging.getLogger(__name__)

CONFIGS = (("dense", "dense", 0.0), ("uniform 50%", "uniform", 0.5), ("uniform 80%", "uniform", 0.8),
           ("uniform 90%", "uniform", 0.9), ("ERK 50%", "erk", 0.5), ("ERK 80%", "erk", 0.8),
           ("ERK 90%", "erk", 0.9))


def train_and_warm(scheme: str, sparsity: float, epochs: float, train_images: int, warmup_epochs: float,
                   warmup_images: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """A trained, warmed-up checkpoint (cached)."""
    from edgetta_export import checkpoint, train, warmup

    tag = f"wrn16_2_{scheme}{int(round(sparsity * 100))}_e{epochs}_n{train_images}_w{warmup_epochs}_{warmup_images}_s{seed}"
    path = CACHE / "sparsity" / f"{tag}.pt"
    if path.exists():
        return path, checkpoint.load(path)
    t = time.time()
    ckpt = train.train("wrn16_2", "erk" if scheme == "dense" else scheme, sparsity, epochs=int(epochs), batch=128,
                       lr=0.1, weight_decay=5e-4, seed=seed, dataset="fashion-mnist", data_root=None,
                       limit=train_images)
    train_s = time.time() - t
    ckpt = warmup.warmup(ckpt, k=4, epochs=warmup_epochs, batch=128, lr=0.05, seed=seed,
                         data_root=None, limit=warmup_images)
    ckpt["benchmark"] = {"train_s": round(train_s, 1), "warmup_s": ckpt["warmup"]["time_s"]}
    checkpoint.save(path, ckpt)
    return path, ckpt


def run(smoke: bool = False, threads: int = 1, seed: int = 0, per_type: int = 200, batch: int = 64,
        epochs: int = 1, train_images: int = 12000, warmup_epochs: float = 1.0, warmup_images: int = 6000,
        configs: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    if smoke:
        per_type, train_images, warmup_images, batch = 2, 256, 256, 8
    chosen = [c for c in CONFIGS if configs is None or c[0] in configs]
    stream = continual_stream(per_type, 5, seed)
    results = []
    bar = tqdm(chosen, unit="backbone", file=sys.stderr, dynamic_ncols=True, disable=True if quiet else None)
    for name, scheme, sparsity in bar:
        bar.set_description(name)
        try:
            path, ckpt = train_and_warm(scheme, sparsity, epochs, train_images, warmup_epochs, warmup_images, seed)
            bundle = export_cached_bundle(ckpt, "sparsity_" + path.stem)
            manifest = json.loads((bundle / "manifest.json").read_text())
            common = ["--batch", str(batch), "--bundle", str(bundle), "--checkpoint", str(path)]
            source = run_job(["--method", "source", "--stream", str(stream), *common], threads, 3600)
            adapted = run_job(["--method", "edgetta", "--stream", str(stream), *common], threads, 3600)
            infer = run_job(["--method", "edgetta", "--no-adapt", "--random-steps", "3", *common], threads, 600)
            failed = [r["failed"] for r in (source, adapted, infer) if "failed" in r]
            if failed:
                raise RuntimeError(failed[0])
            results.append({
                "name": name, "scheme": scheme, "sparsity": sparsity,
                "density": manifest["backbone"]["density"],
                "clean_error": 1.0 - ckpt["test_accuracy"],
                "corrupted_error_source": source["error"], "corrupted_error_edgetta": adapted["error"],
                "bundle_bytes": manifest["bundle_bytes"],
                "inference_onnx_bytes": manifest["files"]["inference.onnx"]["bytes"],
                "sparse_initializers": manifest["backbone"]["sparse_initializers"],
                "step_ms": adapted["ms_per_batch"], "inference_ms": infer["ms_per_batch"],
                "source_torch_ms": source["ms_per_batch"],
                "peak_rss_adapt_mib": adapted["peak_rss_mib"],
                "train_s": ckpt["benchmark"]["train_s"], "warmup_s": ckpt["benchmark"]["warmup_s"],
                "checkpoint": str(path.name),
            })
        except Exception as e:  # one failed backbone must not lose the others
            results.append({"name": name, "failed": f"{type(e).__name__}: {e}"[-400:]})
        log.info("%s", json.dumps(results[-1]))
    return {"config": {"model": "wrn16_2", "epochs": epochs, "train_images": train_images,
                       "warmup_epochs": warmup_epochs, "warmup_images": warmup_images,
                       "frames_per_type": per_type, "batch": batch, "threads": threads, "seed": seed,
                       "smoke": smoke, "lr": 0.1, "train_batch": 128, "sparse_max_density": SPARSE_MAX_DENSITY},
            "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparsity", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="subset of " + ", ".join(repr(c[0]) for c in CONFIGS).replace("%", "%%") + " (default: all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--warmup-images", type=int, default=6000)
    p.add_argument("--per-type", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    section = run(a.smoke, a.threads, a.seed, a.per_type, a.batch, a.epochs, a.train_images, a.warmup_epochs,
                  a.warmup_images, a.configs, a.quiet)
    section["config"]["command"] = "python -m benchmarks.sparsity " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = load_json(out / "compare.json").get("sparsity")
    if a.configs and old:  # a run of some backbones replaces only those rows
        rows = {r["name"]: r for r in old["results"]}
        rows.update({r["name"]: r for r in section["results"]})
        order = [c[0] for c in CONFIGS]
        section["results"] = sorted(rows.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 99)
        section["config"]["command"] = old["config"].get("command", "") + "; then " + section["config"]["command"]
    data = merge_json(out / "compare.json", {"sparsity": section})
    for path in report.write_all(data, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
