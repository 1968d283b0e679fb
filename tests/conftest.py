import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(model_name: str = "wrn16_1", sparsity: float = 0.8, seed: int = 0,
                    cold: bool = False) -> dict:
    """A small untrained checkpoint with ERK masks and (unless cold) non-trivial meta nets."""
    import torch
    from edgetta_export import checkpoint
    from edgetta_export.ecotta import EcoTTAModel, default_split
    from edgetta_export.pruning import apply_masks, layer_densities, random_masks

    torch.manual_seed(seed)
    from edgetta_export.models import create_model
    backbone = create_model(model_name)
    masks = random_masks(backbone, layer_densities(backbone, 1 - sparsity, "erk"), seed)
    apply_masks(backbone, masks)
    # non-trivial source statistics, as a trained net would have
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    model = EcoTTAModel(backbone, default_split(len(backbone.blocks)))
    if not cold:
        for meta in model.metas:
            for bn in meta.batchnorms().values():
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.1, 0.1)
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return {"model": model_name, "class_names": [f"c{i}" for i in range(10)],
            "state_dict": backbone.state_dict(), "masks": checkpoint.pack_masks(masks),
            "meta_state_dict": model.metas.state_dict(), "split": model.split,
            "normalization": {"mean": [0.25, 0.25, 0.25], "std": [0.35, 0.35, 0.35]},
            "pruning": {"scheme": "erk", "sparsity": sparsity, "seed": seed}}


@pytest.fixture(scope="session")
def tiny_ckpt():
    return make_checkpoint()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory):
    from edgetta_export.bundle import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_ckpt, out)
    return out


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory):
    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT, export_bundle
    out = tmp_path_factory.mktemp("bundles") / "default"
    export_bundle(checkpoint.load(DEFAULT_CHECKPOINT), out)
    return out


@pytest.fixture(scope="session")
def corrupted_frames():
    """Real corrupted images from the built-in demo stream (uint8 NHWC) and labels."""
    from edgetta.streams import load_stream
    s = load_stream("demo")
    return s.images, s.labels
