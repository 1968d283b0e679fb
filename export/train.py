"""Train a source model, sparse from the start (random pruning at initialization).

    python -m edgetta_export.train --model wrn16_2 --scheme erk --sparsity 0.8 --epochs 6 \
        --out runs/wrn16_2_erk80.pt
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, datasets
from .models import CONFIGS, create_model
from .pruning import (SCHEMES, apply_masks, format_report, layer_densities, random_masks,
                      sparsity_report, total_density)


def normalization(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).round(4).tolist(), x.std(0).round(4).tolist()


def to_tensor(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment(batch: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
    """Random crop (zero padding) and horizontal flip, per image."""
    n, h, w, _ = batch.shape
    padded = np.pad(batch, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
             mean: list[float], std: list[float], batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(to_tensor(images[i:i + batch], mean, std))
        correct += int((logits.argmax(1).numpy() == labels[i:i + batch]).sum())
    return correct / len(images)


def load_data(dataset: str, data_root: str | None, image_folder: str | None, size: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """(train images, labels, test images, labels, class names): a named data set, or an image
    folder (one subfolder per class) with 20% of each class held back as the test split."""
    if image_folder:
        images, labels, classes = datasets.image_folder(image_folder, size)
        tr, te = datasets.holdout(labels, 0.2, seed)
        return images[tr], labels[tr], images[te], labels[te], classes
    x_train, y_train, classes = datasets.load(dataset, "train", data_root)
    x_test, y_test, _ = datasets.load(dataset, "test", data_root)
    return x_train, y_train, x_test, y_test, classes


def train(model_name: str, scheme: str, sparsity: float, epochs: int, batch: int, lr: float,
          weight_decay: float, seed: int, dataset: str, data_root: str | None,
          limit: int | None = None, image_folder: str | None = None) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = CONFIGS[model_name].input_size
    x_train, y_train, x_test, y_test, classes = load_data(dataset, data_root, image_folder, size, seed)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    mean, std = normalization(x_train)
    model = create_model(model_name, num_classes=len(classes))
    masks = {}
    if sparsity > 0:
        masks = random_masks(model, layer_densities(model, 1.0 - sparsity, scheme), seed)
        apply_masks(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    history = []
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x_train))
        # a bar on a terminal only (disable=None); the epoch's JSON line below goes to logs
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   file=sys.stderr, dynamic_ncols=True, disable=None)
        loss_sum = 0.0
        for step in bar:
            idx = order[step * batch:(step + 1) * batch]
            x = to_tensor(augment(x_train[idx], rng), mean, std)
            y = torch.from_numpy(y_train[idx])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if masks:
                apply_masks(model, masks)
            loss_sum += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, x_test, y_test, mean, std)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch,
                        "test_accuracy": acc, "elapsed_s": round(time.time() - start, 1)})
        print(json.dumps(history[-1]), file=sys.stderr)
    report = sparsity_report(model)
    return {
        "model": model_name, "dataset": f"image folder {image_folder}" if image_folder else dataset,
        "class_names": list(classes), "input_size": size,
        "normalization": {"mean": mean, "std": std},
        "state_dict": model.state_dict(), "masks": checkpoint.pack_masks(masks),
        "pruning": {"scheme": scheme if sparsity > 0 else "dense", "sparsity": sparsity,
                    "seed": seed, "density": total_density(report)},
        "sparsity_report": report, "history": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "train_time_s": round(time.time() - start, 1),
        "hyper": {"epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetta_export.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wrn16_2", choices=sorted(CONFIGS), help="architecture (default: %(default)s)")
    p.add_argument("--scheme", default="erk", choices=SCHEMES, help="random pruning scheme (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.8, help="0 trains the dense twin (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1, help="OneCycle peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--dataset", default="fashion-mnist", choices=datasets.DATASETS, help="(default: %(default)s)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset's files (default: the system's)")
    p.add_argument("--data", default=None,
                   help="an image folder (one subfolder per class, JPEG/PNG) instead of --dataset; "
                        "20%% of each class is held back for the test accuracy")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = train(a.model, a.scheme, a.sparsity, a.epochs, a.batch, a.lr, a.weight_decay,
                   a.seed, a.dataset, a.data_root, a.limit, a.data)
    result["command"] = "python -m edgetta_export.train " + " ".join(argv if argv is not None else sys.argv[1:])
    checkpoint.save(a.out, result)
    print(format_report(result["sparsity_report"]))
    print(json.dumps({"out": a.out, "test_accuracy": result["test_accuracy"],
                      "density": result["pruning"]["density"], "train_time_s": result["train_time_s"]}))
    return 0


if __name__ == "__main__":
    from edgetta.console import run_cli
    run_cli(main)
