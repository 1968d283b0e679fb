"""What the benchmark scripts share: paths, the cached corrupted streams, untrained checkpoints
for memory runs, the cached bundles, JSON reports, and running ``benchmarks.run_method`` in a
fresh process. Importing this module does not import torch.

Run the benchmarks as modules from the repository root (``python -m benchmarks.compare``)."""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetta.console import run_cli as run_cli  # the benchmark scripts end through it
from edgetta.system import atomic_write, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("EDGETTA_BENCH_CACHE", ROOT / ".cache" / "benchmarks"))
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def continual_stream(per_type: int, severity: int = 5, seed: int = 0, split: str = "test") -> Path:
    """Fashion-MNIST ``split`` images, the 15 corruption types in the standard order at one
    severity, ``per_type`` distinct images each, no reset between types (test images at 200 per
    type, severity 5, seed 0: the built-in demo stream; ``split="train"``: the selection streams
    that hyperparameters are chosen on). Cached."""
    tag = "" if split == "test" else f"_{split}"
    path = CACHE / f"stream_continual{tag}_{per_type}_s{severity}_seed{seed}.npz"
    if not path.exists():
        _save_stream(path, per_type, severity, seed, split)
    return path


def gradual_stream(per_segment: int, seed: int = 0) -> Path:
    """CoTTA's gradual setting: within each corruption type (standard order) the severity goes
    1, 2, 3, 4, 5, 4, 3, 2, 1 before the next type; ``per_segment`` distinct images per
    (type, severity) segment. Cached."""
    path = CACHE / f"stream_gradual_{per_segment}_seed{seed}.npz"
    if not path.exists():
        _save_stream(path, per_segment, GRADUAL_SEVERITIES, seed)
    return path


def _save_stream(path: Path, per_type: int, severity: int | tuple[int, ...], seed: int,
                 split: str = "test") -> None:
    from edgetta_export.demo_stream import build
    s = build(per_type, severity, seed, split=split)
    severities = s["severities"] if "severities" in s else np.full(len(s["images"]), severity, np.int8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, images=s["images"], labels=s["labels"].astype(np.int64), domains=s["domains"],
                 domain_names=s["domain_names"], severities=severities, source_index=s["source_index"],
                 description=np.array(str(s["description"]) + f" (seed {seed})"))


def untrained_checkpoint(model_name: str, sparsity: float = 0.8, seed: int = 0, *, cold: bool = False,
                         normalization: tuple[float, float] = (0.5, 0.25),
                         backbone_norm: str | None = None) -> dict[str, Any]:
    """An untrained checkpoint of any zoo model, ERK-pruned like the default model, with meta
    networks attached: the project's one recipe for runs where the weights' values do not matter
    (memory measurements here, the test suite's small models in tests/conftest.py).

    BatchNorms get non-trivial statistics and affines, as a trained net has; so do the meta
    networks' BatchNorms unless ``cold`` (freshly initialised). ``normalization``: the input's
    (mean, std), the same for every channel. ``backbone_norm``: the EcoTTA variant (None: edgetta's
    default)."""
    import torch
    from edgetta_export import checkpoint
    from edgetta_export.ecotta import DEFAULT_BACKBONE_NORM, EcoTTAModel, default_split
    from edgetta_export.models import CONFIGS, create_model
    from edgetta_export.pruning import apply_masks, layer_densities, random_masks

    torch.manual_seed(seed)
    backbone = create_model(model_name)
    masks = {}
    if sparsity > 0:
        masks = random_masks(backbone, layer_densities(backbone, 1 - sparsity, "erk"), seed)
        apply_masks(backbone, masks)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    model = EcoTTAModel(backbone, default_split(len(backbone.blocks)), backbone_norm or DEFAULT_BACKBONE_NORM)
    if not cold:
        for meta in model.metas:
            for bn in meta.batchnorms().values():
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.1, 0.1)
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    mean, std = normalization
    return {"model": model_name, "class_names": [f"c{i}" for i in range(CONFIGS[model_name].num_classes)],
            "state_dict": backbone.state_dict(), "masks": checkpoint.pack_masks(masks),
            "meta_state_dict": model.metas.state_dict(), "split": model.split,
            "backbone_norm": model.backbone_norm, "input_size": CONFIGS[model_name].input_size,
            "normalization": {"mean": [mean] * 3, "std": [std] * 3},
            "pruning": {"scheme": "erk" if sparsity else "dense", "sparsity": sparsity, "seed": seed}}


def export_cached_bundle(ckpt: dict[str, Any], name: str, **kwargs: Any) -> Path:
    """Export ``ckpt`` once to ``CACHE/bundles/name`` (kept while the checkpoint's key
    facts and the export options are the same)."""
    from edgetta_export.bundle import export_bundle

    out = CACHE / "bundles" / name
    exporter = hashlib.sha256(b"".join((ROOT / "export" / f).read_bytes()
                                       for f in ("bundle.py", "lean.py", "portable.py", "ecotta.py"))).hexdigest()
    key = json.dumps({"model": ckpt["model"], "pruning": ckpt.get("pruning"), "exporter": exporter,
                      "warmup": str(ckpt.get("warmup")), "opts": kwargs}, sort_keys=True, default=str)
    stamp = out / ".benchmark-key"
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    export_bundle(ckpt, out, **{"profile": False, "portable": False, **kwargs})
    stamp.write_text(key)
    return out


ANALYSIS_MARKER = "<!-- analysis -->"


def write_generated_doc(doc: Path, text: str) -> Path:
    """Write a generated report to ``doc``, keeping the hand-written part of the old file: from
    ANALYSIS_MARKER on."""
    doc = Path(doc)
    if doc.exists():
        old = doc.read_text()
        if ANALYSIS_MARKER in old:
            text += "\n" + old[old.index(ANALYSIS_MARKER):]
    write_text_atomic(doc, text)
    return doc


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def merge_json(path: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """Replace only ``sections`` of the JSON report at ``path`` (other runs may be writing other
    sections of it), atomically; returns the whole report."""
    path = Path(path)
    data = load_json(path)
    data.update(sections)
    write_text_atomic(path, json.dumps(data, indent=1))
    return data


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows the default of every option that
    has one (argparse's ArgumentDefaultsHelpFormatter skips options without a help text and
    repeats a default the text already names)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default_shown(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if "default" in text or not self._default_shown(action):
            return text
        return f"{text} (default: %(default)s)".strip()

    @staticmethod
    def _default_shown(action: argparse.Action) -> bool:
        d = action.default
        return bool(action.option_strings) and not (d is None or d is False or d is argparse.SUPPRESS or d == [])


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a batch, a count of frames)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_job(args: list[str], threads: int, timeout: float) -> dict[str, Any]:
    """``python -m benchmarks.run_method ARGS`` in a fresh interpreter started in the repository
    root; its JSON line, or ``{"failed": why, "args": args}``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "benchmarks.run_method", *args, "--threads", str(threads)]
    t = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f}s", "args": args}
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-6:])
        return {"failed": f"exit {r.returncode}: {tail}", "args": args}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.time() - t, 1)
    out["args"] = args
    return out


