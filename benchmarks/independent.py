"""Independent validation: the methods on streams corrupted by a third-party generator that
nothing in the project was tuned on (the ``imagecorruptions`` package, ImageNet-C's code).

    python -m benchmarks.independent                  # build the streams, run, write JSON + docs
    python -m benchmarks.independent --report-only    # regenerate docs/validation.md from the JSON
    python -m benchmarks.independent --smoke          # a tiny run (what the test runs)

Protocol: Fashion-MNIST TEST images as 32x32x3 (``edgetta_export.datasets.fashion_mnist``: pad
2 px, repeat the channel), ``--frames-per-kind`` distinct images per kind, the kinds in the
standard continual order with no reset, one severity per stream. A seed fixes the image order
(a permutation of the test set) and the corruption randomness: numpy's global RNG, which the
package draws from, is seeded per frame with (seed, kind, frame) and restored afterwards.

Size: ImageNet-C's parameters are in pixels of a 224x224 image. At 32x32 they act far harder
than CIFAR-10-C's (gaussian noise sigma 0.38 vs 0.10, defocus radius 10 px vs 1.5). Each image
is upsampled to ``--work-size`` (bicubic), corrupted there, and area-resized back to 32x32;
``--work-size 32`` corrupts as is. docs/validation.md says what the default does to each kind.

Every method runs through ``benchmarks.run_method`` in a fresh process with one thread, as in
``benchmarks.compare``. Results: ``benchmarks/results/independent.json``, then
``docs/validation.md`` generated from it. Hyperparameters were not tuned on these streams.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import sys
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import (CACHE, RESULTS, ROOT, HelpFormatter, continual_stream, export_cached_bundle, load_json,
                               merge_json, positive_int, run_cli, run_job)
from benchmarks.methods import RUNNABLE, ordered, spec
from edgetta.system import atomic_write, write_text_atomic

# The package's 15 "common" kinds in the standard continual order, less the two that crash with
# today's libraries (see DROPPED).
KINDS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
DROPPED: dict[str, str] = {
    "glass_blur": "crashes: calls skimage.filters.gaussian(multichannel=True), removed in scikit-image 0.19",
    "fog": "crashes: plasma_fractal uses np.float_, removed in numpy 2.0",
    "gaussian_blur": "validation kind; crashes like glass_blur (multichannel)",
    "speckle_noise": "validation kind, not one of the 15 common ones",
    "spatter": "validation kind, not one of the 15 common ones",
    "saturate": "validation kind; a no-op on greyscale images (saturation is 0)",
}
DEFAULT_METHODS = ("source", "bn_adapt", "tent", "edgetta")
JSON_NAME = "independent.json"
PROJECT_SEEDS_JSON = "project_seeds.json"  # the same protocol on the project's generator
DOC = ROOT / "docs" / "validation.md"


GENERATORS = ("imagecorruptions", "project")


@dataclass(frozen=True)
class StreamSpec:
    """One cached stream: which kinds, how many frames each, severity, seed, working size, and
    the generator: ``imagecorruptions`` (independent) or ``project`` (edgetta_export.corruptions,
    the demo stream's recipe: 15 kinds, seed 0 is the demo stream)."""
    kinds: tuple[str, ...]
    per_kind: int
    severity: int
    seed: int
    work_size: int = 128
    generator: str = "imagecorruptions"

    @property
    def path(self) -> Path:
        tag = "all" if self.kinds == KINDS else "-".join(k[:4] for k in self.kinds)
        return CACHE / "independent" / f"ic_{tag}_{self.per_kind}_s{self.severity}_seed{self.seed}_w{self.work_size}.npz"


def imagecorruptions():
    """The ``imagecorruptions`` module. Its frost reads its image files through
    ``pkg_resources.resource_filename``; setuptools 81+ no longer ships ``pkg_resources``, so a
    stand-in with that one function is registered when it is missing (the package is not patched)."""
    if importlib.util.find_spec("imagecorruptions") is None:
        raise ModuleNotFoundError("imagecorruptions is not installed: pip install -e '.[bench]'")
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, name: str) -> str:
            return str(Path(importlib.util.find_spec(package).origin).parent / name)

        shim.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    import imagecorruptions as ic
    return ic


def corrupt_one(image: np.ndarray, kind: str, severity: int, seed: Sequence[int], work_size: int) -> np.ndarray:
    """One 32x32x3 uint8 image corrupted by the package at ``work_size`` (see the module text),
    numpy's global RNG seeded with ``seed`` for the call and restored afterwards."""
    import cv2
    ic = imagecorruptions()
    size = image.shape[0]
    x = image if work_size == size else cv2.resize(image, (work_size, work_size), interpolation=cv2.INTER_CUBIC)
    state = np.random.get_state()
    try:
        np.random.seed(list(seed))
        y = ic.corrupt(np.ascontiguousarray(x), severity=severity, corruption_name=kind)
    finally:
        np.random.set_state(state)
    if work_size != size:
        y = cv2.resize(y, (size, size), interpolation=cv2.INTER_AREA)
    return y.astype(np.uint8)


def build_stream(s: StreamSpec) -> Path:
    """Build and cache the stream (images, labels, domains, domain_names, severities: what
    ``benchmarks.run_method --stream`` reads); the cached file when it exists. The project
    generator's streams are ``benchmarks.common.continual_stream``'s."""
    if s.generator == "project":
        return continual_stream(s.per_kind, s.severity, s.seed)
    if s.path.exists():
        return s.path
    from edgetta_export import datasets
    images, labels = datasets.fashion_mnist("test")
    order = np.random.default_rng(s.seed).permutation(len(images))[:s.per_kind * len(s.kinds)]
    out = np.empty((len(order), *images.shape[1:]), np.uint8)
    for k, kind in enumerate(s.kinds):
        for j in range(s.per_kind):
            i = k * s.per_kind + j
            out[i] = corrupt_one(images[order[i]], kind, s.severity, (s.seed, k, j), s.work_size)
    s.path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(s.path) as f:
        np.savez(f, images=out, labels=labels[order].astype(np.int64),
                 domains=np.repeat(np.arange(len(s.kinds), dtype=np.int8), s.per_kind),
                 domain_names=np.array(s.kinds), severities=np.full(len(order), s.severity, np.int8),
                 source_index=order.astype(np.int32),
                 description=np.array(f"imagecorruptions {s.kinds} x {s.per_kind}, severity {s.severity}, "
                                      f"seed {s.seed}, corrupted at {s.work_size}x{s.work_size}"))
    return s.path


PROTOCOL = ("kinds", "frames_per_kind", "work_size", "threads", "smoke", "checkpoint", "versions")
# runs of these methods depend only on the backbone, not on the meta networks' variant: kept
# across a new warm-up of the default checkpoint; others are run again when backbone_norm changes
BACKBONE_ONLY = ("source", "bn_adapt", "tent", "cotta")


def earlier_runs(old: dict[str, Any], config: dict[str, Any], planned: set[tuple]) -> list[dict[str, Any]]:
    """Runs of an earlier report made with the same protocol that this run does not repeat (a run
    of other batches or seeds adds to the report); their commands go into ``config``."""
    oc = old.get("config", {})
    if not old or any(oc.get(k) != config[k] for k in PROTOCOL):
        return []
    same_variant = oc.get("backbone_norm", "source") == config.get("backbone_norm", "source")
    keep = [r for r in old.get("runs", []) if "error" in r
            and (r["method"], r["severity"], r["batch"], r["seed"]) not in planned
            and (same_variant or r["method"] in BACKBONE_ONLY)]
    if keep:
        config["earlier_commands"] = list(dict.fromkeys(oc.get("earlier_commands", []) + [oc["command"]]))
        config["machine"]["earlier"] = oc.get("machine")
    return keep


def spread(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "per_seed": [float(x) for x in v]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """method -> severity -> batch -> {mean error over seeds with spread, per kind the same}."""
    out: dict[str, Any] = {}
    keys = sorted({(r["method"], r["severity"], r["batch"]) for r in runs if "error" in r})
    for m, sev, b in keys:
        sel = sorted((r for r in runs if (r["method"], r["severity"], r["batch"]) == (m, sev, b) and "error" in r),
                     key=lambda r: r["seed"])
        kinds = list(sel[0]["error_per_domain"])
        out.setdefault(m, {}).setdefault(str(sev), {})[str(b)] = {
            "seeds": [r["seed"] for r in sel], **spread([r["error"] for r in sel]),
            "per_kind": {k: spread([r["error_per_domain"][k] for r in sel]) for k in kinds}}
    return out


def paired(summary: dict[str, Any], a: str, b: str) -> dict[str, dict[str, Any]]:
    """Per severity and batch: error of ``a`` minus error of ``b`` on the same stream (seed),
    over the seeds; negative means ``a`` is better."""
    out: dict[str, dict[str, Any]] = {}
    for sev, by_batch in summary.get(a, {}).items():
        for batch, ra in by_batch.items():
            rb = summary.get(b, {}).get(sev, {}).get(batch)
            if rb is None or ra["seeds"] != rb["seeds"]:
                continue
            d = spread([x - y for x, y in zip(ra["per_seed"], rb["per_seed"])])
            d["wider_spread"] = max(ra["std"], rb["std"])
            out.setdefault(sev, {})[batch] = d
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{_pct(r['mean'])} ± {_pct(r['std'])} ({_pct(r['min'])}-{_pct(r['max'])})"


def render(data: dict[str, Any], project: dict[str, Any] | None = None) -> str:
    """docs/validation.md from the JSON report of the independent generator and, when given,
    that of the same protocol on the project's generator (``--generator project``)."""
    cfg = data["config"]
    sevs = [str(s) for s in cfg["severities"]]
    batches = [str(b) for b in cfg["batches"]]
    seeds = cfg["seeds"]
    L = ["# Independent validation: a corruption generator nothing was tuned on", "",
         "Generated by `python -m benchmarks.independent` from `benchmarks/results/independent.json`; "
         "do not edit by hand (`--report-only` regenerates it).", "",
         "**No hyperparameter of any method was tuned on these streams.** edgetta's variant (the frozen "
         "backbone's BatchNorms on test-batch statistics, meta conv branches that train) was chosen on "
         "corrupted Fashion-MNIST *training* images of the project's generator ([variants.md](variants.md)); the "
         "other methods run with the settings the project ships.", "",
         "## Protocol", "",
         f"- Images: Fashion-MNIST **test** images presented as 32x32x3 (padded 2 px, channel repeated), "
         f"{cfg['frames_per_kind']} distinct images per kind, a seed-dependent order of the test set.",
         f"- Generator: the `imagecorruptions` package {cfg['versions'].get('imagecorruptions')} (ImageNet-C's "
         "code, packaged), not `edgetta_export.corruptions`. Kinds, in this continual order with no reset: "
         + ", ".join(f"`{k}`" for k in cfg["kinds"]) + ".",
         "- Dropped kinds: " + "; ".join(f"`{k}`: {why}" for k, why in cfg["dropped"].items()) + ".",
         f"- Size: ImageNet-C's parameters are in pixels of a 224x224 image and act much harder at 32x32 "
         f"(its severity-5 gaussian noise sigma is 0.38 where CIFAR-10-C's is 0.10; defocus radius 10 px "
         f"where CIFAR-10-C's is 1.5). Each image is upsampled to {cfg['work_size']}x{cfg['work_size']} "
         "(bicubic), corrupted there, and area-resized back to 32x32. Area-averaging 4x4 pixels divides "
         "independent pixel noise by 4 (0.38 -> about 0.095, CIFAR-10-C's severity 5) and blur radii by 4 "
         "(defocus 10 -> 2.5 px); brightness and contrast do not depend on size; pixelate's block size is a "
         "fraction of the image, so at this working size it nearly vanishes (its source error below shows "
         "it). `--work-size 32` corrupts at 32x32 as is.",
         f"- Severities {', '.join(sevs)}, one stream per severity and seed; seeds {seeds}. A seed fixes the "
         "image order and the corruption randomness (numpy's global RNG, which the package uses, is seeded "
         "per frame with (seed, kind, frame) and restored after the call).",
         "- Methods run through `python -m benchmarks.run_method` in a fresh process each, one thread, "
         "the built-in checkpoint and its bundle (edgetta on onnxruntime-training), batches "
         + ", ".join(batches) + ". `ecotta_torch` equals edgetta to the frame (issue 15), so it is not re-run.",
         "- Spread: ± is the standard deviation over the seeds, then (min-max) over the seeds.",
         "- Install: `pip install -e '.[bench]'` (imagecorruptions 1.1.2, which pulls scikit-image and "
         "opencv-python; the latter installs the same `cv2` module as the project's opencv-python-headless and "
         "needs the system's libGL: `pip install --no-deps imagecorruptions==1.1.2 scikit-image` avoids it). "
         "setuptools 81+ no longer ships `pkg_resources`, which the package's frost imports; the script "
         "registers a one-function stand-in (`resource_filename`) when it is missing.", "",
         *(f"Earlier command (its runs that the last one did not repeat are kept): `{c.strip()}`  "
           for c in cfg.get("earlier_commands", [])),
         f"Command: `{cfg['command']}`  ", f"Machine: {cfg['machine']['platform']}, {cfg['machine']['cpus']} CPUs, "
         f"load average at start {', '.join(f'{x:.1f}' for x in cfg['machine']['load_avg_at_start'])}"
         + (f", at end {', '.join(f'{x:.1f}' for x in cfg['machine']['load_avg_at_end'])}"
            if "load_avg_at_end" in cfg["machine"] else "") + f"; started {cfg['started']}.", ""]
    L += generator_sections(data, "the independent generator (imagecorruptions)")
    if project and project.get("summary"):
        pc = project["config"]
        L += ["# The same protocol on the project's generator", "",
              f"`edgetta_export.corruptions` (15 CIFAR-10-C-style kinds in the standard order), Fashion-MNIST "
              f"test images, {pc['frames_per_kind']} per kind, seeds {pc['seeds']} (seed 0 is the built-in demo "
              f"stream), the same runner. Command: `{pc['command']}`; started {pc['started']}, load average at "
              f"start {', '.join(f'{x:.1f}' for x in pc['machine']['load_avg_at_start'])}.", ""]
        L += generator_sections(project, "the project's generator")
    return "\n".join(L) + "\n"


def generator_sections(data: dict[str, Any], name: str) -> list[str]:
    """The tables of one generator's report: mean error with spread, per kind, worst kind against
    no adaptation, and the paired verdicts against BN-adapt and TENT."""
    cfg, summary = data["config"], data["summary"]
    methods = [m for m in cfg["methods"] if m in summary]
    sevs = [str(s) for s in cfg["severities"]]
    batches = [str(b) for b in cfg["batches"]]
    L: list[str] = []
    L += [f"## Mean error (%) over the kinds, {name}, mean ± std (min-max) over the seeds", "",
          "| method | severity | " + " | ".join(f"batch {b}" for b in batches) + " |",
          "|---|---|" + "---|" * len(batches)]
    for s in sevs:
        for m in methods:
            if s in summary[m]:
                L.append(f"| {spec(m).short} | {s} | " + " | ".join(_cell(summary[m][s].get(b)) for b in batches) + " |")
    L.append("")
    top_sev, top_b = sevs[-1], max(batches, key=int)
    kinds = cfg["kinds"]
    L += [f"## Per kind (%), severity {top_sev}, batch {top_b}, mean (min-max) over the seeds", "",
          "| method | " + " | ".join(k.replace("_", " ") for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m in methods:
        r = summary[m].get(top_sev, {}).get(top_b)
        if r is None:
            continue
        pk = r["per_kind"]
        L.append(f"| {spec(m).short} | " + " | ".join(
            f"{_pct(pk[k]['mean'])} ({_pct(pk[k]['min'])}-{_pct(pk[k]['max'])})" if k in pk else "-"
            for k in kinds) + " |")
    L.append("")
    if "source" in summary:
        L += [f"## Against no adaptation, per kind (issue 15, item 4), {name}", "",
              "The worst kind: the largest (method's error minus source's error) over the kinds and seeds, in "
              "points (per-kind error rates, not per-frame predictions: run_method reports no per-frame "
              "outcome). Positive: on some kind and seed the method is worse than not adapting.", "",
              "| method | severity | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
        for s in sevs:
            for m in [m for m in methods if m != "source" and s in summary[m]]:
                cells = []
                for b in batches:
                    r, src = summary[m].get(s, {}).get(b), summary["source"].get(s, {}).get(b)
                    if r is None or src is None or r["seeds"] != src["seeds"]:
                        cells.append("-")
                        continue
                    worst = max((r["per_kind"][k]["per_seed"][i] - src["per_kind"][k]["per_seed"][i], k)
                                for k in r["per_kind"] for i in range(len(r["seeds"])))
                    cells.append(f"{100 * worst[0]:+.1f} ({worst[1].replace('_', ' ')})")
                L.append(f"| {spec(m).short} | {s} | " + " | ".join(cells) + " |")
        L.append("")
    L += [f"## What it means for issue 15, {name}", "",
          "Paired differences: edgetta's error minus the other method's on the same stream, mean over the "
          "seeds (min-max); negative means edgetta is better. \"Beyond the spread\" asks whether every seed "
          "agrees on the sign and the mean difference exceeds the larger of the two methods' seed std.", ""]
    verdict_rows = []
    for other in ("bn_adapt", "tent"):
        d = paired(summary, "edgetta", other)
        for s in sevs:
            for b in batches:
                r = d.get(s, {}).get(b)
                if r is None:
                    continue
                same_sign = r["max"] < 0 or r["min"] > 0
                beyond = same_sign and abs(r["mean"]) > r["wider_spread"]
                word = ("better" if r["mean"] < 0 else "worse") if beyond else "within the spread"
                verdict_rows.append((other, s, b, r, word))
    if verdict_rows:
        L += ["| vs | severity | batch | edgetta minus it (points) | larger std | verdict |", "|---|---|---|---|---|---|"]
        for other, s, b, r, word in verdict_rows:
            L.append(f"| {spec(other).short} | {s} | {b} | {100 * r['mean']:+.1f} ({100 * r['min']:+.1f} to "
                     f"{100 * r['max']:+.1f}) | {_pct(r['wider_spread'])} | {word} |")
        wins = sum(w == "better" for *_, w in verdict_rows)
        L += ["", f"edgetta is better beyond the spread in {wins} of {len(verdict_rows)} comparisons against "
              f"BN-adapt and TENT on {name}. "
              + ("So edgetta does not beat both baselines by more than the seed spread everywhere here."
                 if wins < len(verdict_rows) else
                 "It beats both baselines by more than the seed spread in every setting measured here."), ""]
        for other in ("bn_adapt", "tent"):
            a, b = (summary.get(m, {}).get(top_sev, {}).get(top_b) for m in ("edgetta", other))
            if a is None or b is None:
                continue
            diff = sorted((a["per_kind"][k]["mean"] - b["per_kind"][k]["mean"], k) for k in a["per_kind"])
            gains = ", ".join(f"{k.replace('_', ' ')} {100 * d:+.1f}" for d, k in diff if d < 0)
            losses = ", ".join(f"{k.replace('_', ' ')} {100 * d:+.1f}" for d, k in reversed(diff) if d > 0)
            L.append(f"Per kind against {spec(other).short} (severity {top_sev}, batch {top_b}, mean over seeds, "
                     f"points): edgetta gains on {gains or 'none'}; loses on {losses or 'none'}.")
            L.append("")
    return L




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.independent", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--generator", choices=GENERATORS, default="imagecorruptions",
                   help="imagecorruptions (independent) or project (edgetta_export.corruptions, 15 kinds)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=RUNNABLE)
    p.add_argument("--kinds", nargs="+", default=None, help=f"(default: every kind; imagecorruptions: {', '.join(KINDS)})")
    p.add_argument("--frames-per-kind", type=positive_int, default=200)
    p.add_argument("--severities", type=int, nargs="+", default=[3, 5], choices=[1, 2, 3, 4, 5])
    p.add_argument("--batches", type=positive_int, nargs="+", default=[64, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-size", type=positive_int, default=128,
                   help="corrupt at this size (bicubic up, area down to 32); 32: as is")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--activation-bits", choices=["8", "none"], default=None,
                   help="export edgetta's bundle with the meta networks' kept inputs compressed to this many "
                        "bits, or float32 ('none') (docs/compressed_activations.md; default: the exporter's)")
    p.add_argument("--activation-rounding", choices=["nearest", "stochastic"], default=None,
                   help="how those bits are rounded (default: the exporter's)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--doc", default=str(DOC), help="where the generated Markdown goes")
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 kinds x 8 frames, one seed, severity 5, batch 4")
    p.add_argument("--report-only", action="store_true", help="regenerate the Markdown from the JSON, run nothing")
    a = p.parse_args(argv)
    out_dir = Path(a.out_dir)
    json_path = out_dir / (PROJECT_SEEDS_JSON if a.generator == "project" else JSON_NAME)
    if a.report_only:
        data = load_json(out_dir / JSON_NAME)
        if not data:
            p.error(f"{out_dir / JSON_NAME}: no report to render")
        write_text_atomic(a.doc, render(data, load_json(out_dir / PROJECT_SEEDS_JSON)))
        print(f"wrote {a.doc}")
        return 0
    if a.generator == "project":
        from edgetta_export.corruptions import CORRUPTIONS
        all_kinds = tuple(CORRUPTIONS)
    else:
        all_kinds = KINDS
    a.kinds = tuple(a.kinds or all_kinds)
    bad = [k for k in a.kinds if k not in all_kinds]
    if bad:
        p.error(f"unknown kind {bad[0]!r} for the {a.generator} generator (choose from {', '.join(all_kinds)})")
    if a.generator == "project" and a.kinds != all_kinds:
        p.error("the project generator's streams hold all 15 kinds (the demo stream's recipe)")
    if a.smoke:
        a.kinds, a.frames_per_kind, a.severities, a.batches, a.seeds = a.kinds[:2], 8, [5], [4], [0]
    if a.generator == "imagecorruptions":
        imagecorruptions()  # fail early, with the install command, when the package is missing
    out_dir.mkdir(parents=True, exist_ok=True)

    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT
    ckpt_path = str(Path(DEFAULT_CHECKPOINT).resolve())
    from edgetta_export.lean import LeanOptions
    chosen = {k: v for k, v in (("activation_bits", a.activation_bits), ("activation_rounding", a.activation_rounding))
              if v is not None}
    if "activation_bits" in chosen:
        chosen["activation_bits"] = None if a.activation_bits == "none" else int(a.activation_bits)
    bits = {"lean_options": LeanOptions(**chosen)} if chosen else {}
    name = "default" + "".join(f"-{k.split('_')[1]}-{v}" for k, v in sorted(chosen.items()))
    bundle = export_cached_bundle(checkpoint.load(ckpt_path), name, **bits) if "edgetta" in a.methods else None

    from importlib.metadata import version
    command = ("python -m benchmarks.independent " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    config = {"command": command, "generator": a.generator, "methods": a.methods, "kinds": list(a.kinds),
              "dropped": DROPPED if a.generator == "imagecorruptions" else {},
              "frames_per_kind": a.frames_per_kind, "severities": a.severities, "batches": a.batches,
              "seeds": a.seeds, "work_size": a.work_size, "threads": a.threads, "smoke": a.smoke,
              "checkpoint": os.path.relpath(ckpt_path, ROOT), "tuned_on_these_streams": False,
              "backbone_norm": checkpoint.load(ckpt_path).get("backbone_norm", "source"),
              "versions": {k: version(k) for k in ("imagecorruptions", "scikit-image", "numpy")},
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}}
    runs: list[dict[str, Any]] = []
    planned = {(m, sev, b, seed) for m in a.methods for sev in a.severities for b in a.batches for seed in a.seeds}
    earlier = earlier_runs(load_json(json_path), config, planned)
    for sev in a.severities:
        for seed in a.seeds:
            stream = build_stream(StreamSpec(tuple(a.kinds), a.frames_per_kind, sev, seed, a.work_size, a.generator))
            for batch in a.batches:
                for m in a.methods:
                    args = ["--method", m, "--stream", str(stream), "--batch", str(batch), "--seed", str(seed),
                            "--checkpoint", ckpt_path, *(["--bundle", str(bundle)] if bundle else [])]
                    r = run_job(args, a.threads, a.timeout)
                    r.update(method=m, severity=sev, batch=batch, seed=seed)
                    runs.append(r)
                    status = f"{100 * r['error']:.1f}%" if "error" in r else f"FAILED {r['failed']}"
                    print(f"severity {sev} seed {seed} batch {batch} {m}: {status}", file=sys.stderr, flush=True)
    config["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config["machine"]["load_avg_at_end"] = os.getloadavg()
    keep = ("method", "severity", "batch", "seed", "error", "error_per_domain", "ms_per_batch", "process_s",
            "peak_rss_mib", "adaptation_share_mib", "frames", "failed")
    runs = earlier + [{k: r[k] for k in keep if k in r} for r in runs]
    if earlier:
        for k, field in (("methods", "method"), ("severities", "severity"), ("batches", "batch"), ("seeds", "seed")):
            seen = list(dict.fromkeys(list(config[k]) + [r[field] for r in runs]))
            config[k] = ordered(seen) if k == "methods" else sorted(seen, reverse=(k == "batches"))
    data = {"config": config, "runs": runs, "summary": summarize(runs)}
    merge_json(json_path, data)
    data_ic = load_json(out_dir / JSON_NAME)
    if data_ic:
        write_text_atomic(a.doc, render(data_ic, load_json(out_dir / PROJECT_SEEDS_JSON)))
    print(f"wrote {json_path}\nwrote {a.doc}")
    return 0 if all("error" in r for r in runs) else 1


if __name__ == "__main__":
    run_cli(main)
