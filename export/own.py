"""Bring your own model and images: a state dict plus an architecture (a zoo name, or
``package.module:factory`` returning an ``nn.Module``), warmed up on a folder of images (one
subfolder per class) and ready for ``bundle.export_bundle``.

    edgetta export --arch mobilenet_v2 --weights my.pt --data my_images/ --out bundles/mine

Clean accuracy is measured on images of the folder held back from the warm-up, before (the
frozen backbone alone) and after (with the warmed-up meta networks).
"""
from __future__ import annotations

import importlib
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import datasets
from .ecotta import EcoTTAModel, default_split
from .models import CONFIGS, Backbone, create_model
from .partition import ExportError, part_ends, partition
from .train import evaluate, normalization
from .warmup import warm_up_meta


@dataclass(frozen=True)
class WarmupOptions:
    k: int = 4
    epochs: float = 1.0
    batch: int = 64
    lr: float = 0.05
    seed: int = 0
    holdout: float = 0.2


@dataclass(frozen=True)
class OwnModelResult:
    """A warmed-up host checkpoint and the clean accuracies measured on held-back images."""

    checkpoint: dict[str, Any]
    accuracy_before: float
    accuracy_after: float
    train_images: int
    held_back_images: int
    part_ends: list[str]


def create_arch(arch: str, num_classes: int) -> nn.Module:
    """A zoo model by name, or ``package.module:callable`` called with ``num_classes`` where it
    takes that argument."""
    if arch in CONFIGS:
        return create_model(arch, num_classes=num_classes)
    if ":" not in arch:
        raise ExportError(f"unknown architecture {arch!r}: name one of {sorted(CONFIGS)} or "
                          "give package.module:callable returning an nn.Module")
    mod_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"cannot import {arch!r} ({type(e).__name__}: {e})") from None
    try:
        takes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes = False
    model = factory(num_classes=num_classes) if takes else factory()
    if not isinstance(model, nn.Module):
        raise ExportError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, list[float]] | None:
    """Load a state dict (or a checkpoint holding ``state_dict``) into ``model``; returns the
    checkpoint's normalization if it records one."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"weights file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ExportError(f"cannot read {path} ({type(e).__name__})") from None
    norm = obj.get("normalization") if isinstance(obj, dict) else None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ExportError(f"{path} holds no state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ (another class count, another width)
        detail = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e).splitlines()[0])
        raise ExportError(f"{path} does not fit the architecture: {detail[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{path} does not fit the architecture: {len(result.missing_keys)} missing "
                          f"keys (e.g. {result.missing_keys[:1]}), {len(result.unexpected_keys)} unexpected "
                          f"(e.g. {result.unexpected_keys[:1]})")
    return norm


def to_backbone(model: nn.Module, input_size: int, boundaries: list[str] | None = None,
                k: int = 4) -> tuple[Backbone, list[int]]:
    """A zoo Backbone keeps its own blocks; any other module (or named boundaries) goes
    through ``partition``."""
    if isinstance(model, Backbone) and not boundaries:
        return model, default_split(len(model.blocks), k)
    return partition(model, input_size, boundaries, k)


def from_image_folder(arch: str, data: str | os.PathLike, weights: str | os.PathLike | None = None,
                      *, input_size: int | None = None, boundaries: list[str] | None = None,
                      mean: list[float] | None = None, std: list[float] | None = None,
                      options: WarmupOptions = WarmupOptions()) -> OwnModelResult:
    """Build ``arch`` for the folder's classes, load ``weights``, split it into parts, warm the
    meta networks up on the folder and measure clean accuracy before and after."""
    size = input_size or (CONFIGS[arch].input_size if arch in CONFIGS else 32)
    try:
        images, labels, classes = datasets.image_folder(data, size)
    except (datasets.DatasetMissing, ValueError) as e:
        raise ExportError(str(e)) from None
    module = create_arch(arch, len(classes))
    saved_norm = load_weights(module, weights) if weights else None
    module.eval()
    train_idx, held_idx = datasets.holdout(labels, options.holdout, options.seed)
    if saved_norm and mean is None:
        mean, std = saved_norm["mean"], saved_norm["std"]
    if mean is None or std is None:
        mean, std = normalization(images[train_idx])
    backbone, split = to_backbone(module, size, boundaries, options.k)
    x_held, y_held = images[held_idx], labels[held_idx]
    before = evaluate(backbone, x_held, y_held, mean, std) if len(held_idx) else float("nan")
    torch.manual_seed(options.seed)
    model = EcoTTAModel(backbone, split)
    start = time.time()
    steps = warm_up_meta(model, images[train_idx], labels[train_idx], mean, std, epochs=options.epochs,
                         batch=options.batch, lr=options.lr, seed=options.seed)
    after = evaluate(model, x_held, y_held, mean, std) if len(held_idx) else float("nan")
    zoo = isinstance(module, Backbone) and not boundaries
    ends = part_ends(backbone, split)
    ckpt = {
        "model": arch, "dataset": f"image folder {Path(data).name}", "class_names": list(classes),
        "normalization": {"mean": list(mean), "std": list(std)}, "input_size": size,
        "state_dict": backbone.state_dict(), "backbone_module": None if zoo else backbone,
        "split": split, "part_ends": ends, "meta_state_dict": model.metas.state_dict(),
        "backbone_norm": model.backbone_norm, "pruning": {"scheme": "dense", "sparsity": 0.0},
        "test_accuracy": before,
        "warmup": {"epochs": options.epochs, "batch": options.batch, "lr": options.lr,
                   "seed": options.seed, "steps": steps, "k": len(split), "split": split,
                   "time_s": round(time.time() - start, 1), "held_back_images": int(len(held_idx)),
                   "test_accuracy_backbone": before, "test_accuracy_with_meta": after},
    }
    return OwnModelResult(ckpt, before, after, int(len(train_idx)), int(len(held_idx)), ends)


def module_checkpoint(module: nn.Module, class_names: list[str], input_size: int, *,
                      images: np.ndarray | None = None, boundaries: list[str] | None = None,
                      k: int = 4, mean: list[float] | None = None, std: list[float] | None = None
                      ) -> dict[str, Any]:
    """A host checkpoint of any module (meta networks fresh, set up as identity on ``images``
    if given): the Python route to ``export_bundle`` without a warm-up."""
    from .warmup import init_meta_from_source
    from .train import to_tensor

    backbone, split = to_backbone(module.eval(), input_size, boundaries, k)
    model = EcoTTAModel(backbone, split)
    mean, std = mean or [0.5, 0.5, 0.5], std or [0.25, 0.25, 0.25]
    if images is not None:
        model.train()
        init_meta_from_source(model, to_tensor(images, mean, std))
    return {"model": type(module).__name__, "class_names": list(class_names), "input_size": input_size,
            "normalization": {"mean": mean, "std": std}, "state_dict": backbone.state_dict(),
            "backbone_module": None if isinstance(module, Backbone) and not boundaries else backbone,
            "split": split, "part_ends": part_ends(backbone, split),
            "meta_state_dict": model.metas.state_dict(), "backbone_norm": model.backbone_norm,
            "pruning": {"scheme": "dense", "sparsity": 0.0}}
