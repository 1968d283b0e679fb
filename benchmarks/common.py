"""What the benchmark scripts share: paths, the cached corrupted streams, untrained checkpoints
for memory runs, and the default bundle. Importing this module does not import torch."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("EDGETTA_BENCH_CACHE", ROOT / ".cache" / "benchmarks"))
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def continual_stream(per_type: int, severity: int = 5, seed: int = 0) -> Path:
    """Fashion-MNIST test images, the 15 corruption types in the standard order at one
    severity, ``per_type`` distinct images each, no reset between types (the built-in demo
    stream's recipe: at 200 per type, severity 5, seed 0 it is the demo stream). Cached."""
    path = CACHE / f"stream_continual_{per_type}_s{severity}_seed{seed}.npz"
    if not path.exists():
        from edgetta_export.demo_stream import build
        s = build(per_type, severity, seed)
        _save(path, images=s["images"], labels=s["labels"].astype(np.int64), domains=s["domains"],
              domain_names=s["domain_names"], severities=np.full(len(s["images"]), severity, np.int8),
              description=np.array(f"Fashion-MNIST test, 15 corruptions x {per_type}, severity "
                                   f"{severity}, continual (seed {seed})"))
    return path


def gradual_stream(per_segment: int, seed: int = 0) -> Path:
    """CoTTA's gradual setting: within each corruption type (standard order) the severity goes
    1, 2, 3, 4, 5, 4, 3, 2, 1 before the next type; ``per_segment`` distinct images per
    (type, severity) segment. Cached."""
    from edgetta_export import datasets
    from edgetta_export.corruptions import CORRUPTIONS, corrupt

    path = CACHE / f"stream_gradual_{per_segment}_seed{seed}.npz"
    if path.exists():
        return path
    images, labels = datasets.fashion_mnist("test")
    segments = [(d, s) for d in range(len(CORRUPTIONS)) for s in GRADUAL_SEVERITIES]
    need = per_segment * len(segments)
    if need > len(images):
        raise ValueError(f"{need} frames requested, the test set has {len(images)}")
    order = np.random.default_rng(seed).permutation(len(images))[:need]
    chunks, doms, sevs = [], [], []
    for i, (d, s) in enumerate(segments):
        idx = order[i * per_segment:(i + 1) * per_segment]
        chunks.append(corrupt(images[idx], CORRUPTIONS[d], s, seed=seed + i))
        doms.append(np.full(per_segment, d, np.int8))
        sevs.append(np.full(per_segment, s, np.int8))
    _save(path, images=np.concatenate(chunks), labels=labels[order].astype(np.int64),
          domains=np.concatenate(doms), domain_names=np.array(CORRUPTIONS),
          severities=np.concatenate(sevs),
          description=np.array(f"Fashion-MNIST test, 15 corruptions, severity 1-5-1 within each "
                               f"type, {per_segment} per segment, continual (seed {seed})"))
    return path


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def untrained_checkpoint(model_name: str, sparsity: float = 0.8, seed: int = 0) -> dict[str, Any]:
    """An untrained checkpoint of any zoo model (ERK-pruned like the default model, meta
    networks attached) for memory measurements, where the weights' values do not matter."""
    import torch
    from edgetta_export import checkpoint
    from edgetta_export.ecotta import EcoTTAModel, default_split
    from edgetta_export.models import CONFIGS, create_model
    from edgetta_export.pruning import apply_masks, layer_densities, random_masks

    torch.manual_seed(seed)
    backbone = create_model(model_name)
    masks = {}
    if sparsity > 0:
        masks = random_masks(backbone, layer_densities(backbone, 1 - sparsity, "erk"), seed)
        apply_masks(backbone, masks)
    for m in backbone.modules():  # non-trivial source statistics, as a trained net has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model = EcoTTAModel(backbone, default_split(len(backbone.blocks)))
    return {"model": model_name, "class_names": [f"c{i}" for i in range(CONFIGS[model_name].num_classes)],
            "state_dict": backbone.state_dict(), "masks": checkpoint.pack_masks(masks),
            "meta_state_dict": model.metas.state_dict(), "split": model.split,
            "input_size": CONFIGS[model_name].input_size,
            "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
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


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def merge_json(path: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """Replace only ``sections`` of the JSON report at ``path`` (other runs may be writing other
    sections of it), atomically; returns the whole report."""
    path = Path(path)
    data = load_json(path)
    data.update(sections)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data
