"""Warm up EcoTTA's meta networks on source data, with the backbone frozen.

    python -m edgetta_export.warmup runs/wrn16_2_erk80.pt --out export/weights/wrn16_2_erk80_k4.pt

Cross-entropy, SGD with momentum, light colour / blur / greyscale augmentation. The result is
the host checkpoint that ``edgetta export`` turns into a device bundle.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, datasets
from .ecotta import (BACKBONE_NORMS, DEFAULT_BACKBONE_NORM, DEFAULT_BRANCH_INIT, EcoTTAModel,
                     default_split)
from .train import augment, evaluate, to_tensor


def colour_blur_grey(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light photometric augmentation: brightness/contrast jitter, a mild blur, greyscale."""
    out = batch.astype(np.float32)
    n = len(out)
    brightness = rng.uniform(0.8, 1.2, (n, 1, 1, 1))
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1))
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out = (out - mean) * contrast + mean * brightness
    for i in np.flatnonzero(rng.random(n) < 0.3):
        out[i] = cv2.GaussianBlur(out[i], (3, 3), float(rng.uniform(0.1, 1.0)))
    grey = rng.random(n) < 0.2
    out[grey] = out[grey].mean(axis=3, keepdims=True)
    return np.clip(out, 0, 255).astype(np.uint8)


@torch.no_grad()
def init_meta_from_source(model: EcoTTAModel, x: torch.Tensor) -> None:
    """Start each BN_meta as the identity on source features (its affine undoes its own
    normalization), so warm-up begins from the source model's accuracy."""
    _, trace = model.features(x)
    for meta, (_, h, _) in zip(model.metas, trace):
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3))
        bn = meta.bn_meta
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mean)


def warm_up_meta(model: EcoTTAModel, x_train: np.ndarray, y_train: np.ndarray, mean: list[float],
                 std: list[float], *, epochs: float, batch: int, lr: float, seed: int) -> int:
    """Cross-entropy warm-up of ``model``'s meta networks on uint8 NHWC images (backbone frozen);
    returns the number of steps. Progress bar on a terminal only."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    init_meta_from_source(model, to_tensor(x_train[rng.permutation(len(x_train))[:512]], mean, std))
    opt = torch.optim.SGD(model.meta_parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = max(1, int(math.ceil(epochs * len(x_train) / batch)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(int(math.ceil(epochs)) + 1)])
    bar = tqdm(range(steps), desc="meta warm-up", unit="batch", file=sys.stderr, dynamic_ncols=True,
               disable=None)
    for step in bar:
        idx = order[step * batch:(step + 1) * batch]
        x = to_tensor(colour_blur_grey(augment(x_train[idx], rng), rng), mean, std)
        loss = F.cross_entropy(model(x), torch.from_numpy(y_train[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return steps


@torch.no_grad()
def calibrate_batch_stat_norms(model: EcoTTAModel, images: np.ndarray, mean: list[float], std: list[float],
                               *, batches: int = 50, batch: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Running statistics of the batch-statistics backbone BatchNorms on clean source images
    passed through the warmed-up model, written into the model; returns them by state-dict name.

    Warm-up trains the meta networks under batch statistics, which make every backbone BatchNorm
    blind to the scale of what reaches it; so the meta outputs need not keep the scale the
    source statistics expect, and single frames (running statistics) would be predicted on the
    wrong ones. The pooled statistics over ``batches`` clean batches are the ones this model's
    features have on source data."""
    norms = model.batch_stat_norms()
    if not norms:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(images))[:batches * batch]
    sums = {n: [0.0, 0.0] for n in norms}
    count = 0
    model.train()
    metas = [m for m in model.metas.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in metas]
    for m in metas:  # the meta networks' running statistics stay those of the warm-up
        m.momentum = 0.0
    try:
        for i in range(0, len(idx), batch):
            model(to_tensor(images[idx[i:i + batch]], mean, std))
            for n, norm in norms.items():
                m, v = norm.batch_stats
                sums[n][0] = sums[n][0] + m.double()
                sums[n][1] = sums[n][1] + (v + m * m).double()
            count += 1
    finally:
        for m, mo in zip(metas, momenta):
            m.momentum = mo
    out = {}
    for n, norm in norms.items():
        mu = sums[n][0] / count
        var = (sums[n][1] / count - mu * mu).clamp_min(0)
        norm.running_mean.copy_(mu.float())
        norm.running_var.copy_(var.float())
        out[f"{n}.running_mean"], out[f"{n}.running_var"] = norm.running_mean.clone(), norm.running_var.clone()
    return out


def warmup(ckpt: dict, k: int, epochs: float, batch: int, lr: float, seed: int,
           data_root: str | None, limit: int | None = None, backbone_norm: str = DEFAULT_BACKBONE_NORM,
           branch_init: float = DEFAULT_BRANCH_INIT) -> dict:
    torch.manual_seed(seed)
    backbone = checkpoint.build_backbone(ckpt)
    model = EcoTTAModel(backbone, default_split(len(backbone.blocks), k), backbone_norm, branch_init)
    x_train, y_train, _ = datasets.load(ckpt.get("dataset", "fashion-mnist"), "train", data_root)
    x_test, y_test, _ = datasets.load(ckpt.get("dataset", "fashion-mnist"), "test", data_root)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    start = time.time()
    steps = warm_up_meta(model, x_train, y_train, mean, std, epochs=epochs, batch=batch, lr=lr, seed=seed)
    calibrated = calibrate_batch_stat_norms(model, x_train, mean, std, seed=seed)
    source_acc = evaluate(backbone, x_test, y_test, mean, std)  # the model converts a copy of it
    meta_acc = evaluate(model, x_test, y_test, mean, std)
    out = dict(ckpt)
    out.update({
        "split": model.split, "meta_state_dict": model.metas.state_dict(), "backbone_norm": backbone_norm,
        "backbone_running_stats": calibrated,
        "warmup": {"epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "steps": steps,
                   "backbone_norm": backbone_norm, "branch_init": branch_init,
                   "time_s": round(time.time() - start, 1), "k": k, "split": model.split,
                   "test_accuracy_backbone": source_acc, "test_accuracy_with_meta": meta_acc},
    })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetta_export.warmup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a trained source checkpoint (python -m edgetta_export.train)")
    p.add_argument("--k", type=int, default=4, help="number of parts / meta networks (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine schedule (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--backbone-norm", choices=BACKBONE_NORMS, default=DEFAULT_BACKBONE_NORM,
                   help="the frozen backbone's BatchNorms: test-batch statistics (edgetta's default) or "
                        "source statistics (the paper's EcoTTA) (default: %(default)s)")
    p.add_argument("--branch-init", type=float, default=DEFAULT_BRANCH_INIT,
                   help="initial weight of the meta conv branch's BatchNorm (default: %(default)s)")
    p.add_argument("--paper-variant", action="store_true",
                   help="also warm up the paper's variant (source statistics) and keep its meta networks "
                        "in the checkpoint under variants.paper, for the benchmarks")
    p.add_argument("--data-root", default=None, help="folder holding the dataset's files (default: the system's)")
    p.add_argument("--limit", type=int, default=None, help="warm up on the first N images only (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    source = checkpoint.load(a.checkpoint)
    source.pop("variants", None)
    result = warmup(source, a.k, a.epochs, a.batch, a.lr, a.seed, a.data_root, a.limit,
                    a.backbone_norm, a.branch_init)
    if a.paper_variant:
        paper = warmup(source, a.k, a.epochs, a.batch, a.lr, a.seed, a.data_root, a.limit,
                       "source", a.branch_init)
        result["variants"] = {"paper": {k: paper[k] for k in ("meta_state_dict", "backbone_norm", "warmup")}}
    result["warmup"]["command"] = "python -m edgetta_export.warmup " + " ".join(
        argv if argv is not None else sys.argv[1:])
    checkpoint.save(a.out, result)
    print(json.dumps({"out": a.out, **{k: v for k, v in result["warmup"].items() if k != "command"}}))
    return 0


if __name__ == "__main__":
    from edgetta.console import run_cli
    run_cli(main)
