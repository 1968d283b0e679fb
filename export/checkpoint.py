"""Host-side checkpoints: a model's architecture name, weights, pruning masks and the
facts that travel into the device bundle (normalization, class names, history)."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetta.system import atomic_write

from .models import Backbone, create_model


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {n: {"shape": list(m.shape), "bits": np.packbits(m.numpy().ravel())}
            for n, m in masks.items()}


def unpack_masks(packed: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in packed.items():
        count = int(np.prod(p["shape"]))
        bits = np.unpackbits(np.asarray(p["bits"]), count=count).astype(bool)
        out[n] = torch.from_numpy(bits.reshape(p["shape"]))
    return out


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    with atomic_write(path) as f:
        torch.save(payload, f)


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location="cpu", weights_only=False)


def build_backbone(ckpt: dict[str, Any]) -> Backbone:
    """The frozen backbone of a checkpoint: a zoo model by name with its weights, or the
    partitioned module a checkpoint of one's own model carries (a copy: export edits it)."""
    if ckpt.get("backbone_module") is not None:
        return copy.deepcopy(ckpt["backbone_module"])
    model = create_model(ckpt["model"], num_classes=len(ckpt["class_names"]))
    model.load_state_dict(ckpt["state_dict"])
    return model
