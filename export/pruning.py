"""Random pruning at initialization with layer-wise density schemes (Liu et al., ICLR 2022).

``layer_densities`` decides how dense each prunable layer is (uniform, uniform+, ER, ERK) so
that the whole network reaches a target density; ``random_masks`` draws the masks;
``apply_masks`` keeps pruned weights at zero during sparse training.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCHEMES = ("uniform", "uniform+", "er", "erk")


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every convolution and linear layer, by the name of its weight parameter."""
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _raw_score(weight_shape: torch.Size, scheme: str) -> float:
    if scheme == "er":
        n_out, n_in = weight_shape[0], weight_shape[1]
        return (n_in + n_out) / (n_in * n_out)
    return sum(weight_shape) / math.prod(weight_shape)  # erk: kernel dims count too


def _solve_scaled(sizes: dict[str, int], scores: dict[str, float], budget: float,
                  dense: set[str]) -> dict[str, float]:
    """Scale ``scores`` by one epsilon so the kept weights match ``budget``; a layer the scale
    would push past density 1 is made dense and epsilon is solved again."""
    dense = set(dense)
    while True:
        free = [n for n in sizes if n not in dense]
        remaining = budget - sum(sizes[n] for n in dense)
        if not free:
            return {n: 1.0 for n in sizes}
        eps = remaining / sum(scores[n] * sizes[n] for n in free)
        over = [n for n in free if eps * scores[n] > 1.0]
        if not over:
            out = {n: 1.0 for n in dense}
            out.update({n: max(eps * scores[n], 0.0) for n in free})
            return out
        dense.update(over)


def layer_densities(model: nn.Module, density: float, scheme: str = "erk",
                    fc_floor: float = 0.2) -> dict[str, float]:
    """Density of each prunable layer so that the network as a whole keeps ``density``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    layers = prunable_layers(model)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    budget = density * sum(sizes.values())
    if scheme == "uniform":
        return {n: density for n in layers}
    if scheme == "uniform+":
        names = list(layers)
        first_conv = next(n for n in names if isinstance(layers[n], nn.Conv2d))
        fcs = [n for n in names if isinstance(layers[n], nn.Linear)]
        fixed = {first_conv: 1.0}
        fixed.update({n: max(density, fc_floor) for n in fcs})
        rest = [n for n in names if n not in fixed]
        left = budget - sum(sizes[n] * d for n, d in fixed.items())
        d_rest = min(max(left / max(sum(sizes[n] for n in rest), 1), 0.0), 1.0)
        return {n: fixed.get(n, d_rest) for n in names}
    scores = {n: _raw_score(m.weight.shape, scheme) for n, m in layers.items()}
    return _solve_scaled(sizes, scores, budget, dense=set())


def random_masks(model: nn.Module, densities: dict[str, float], seed: int = 0
                 ) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly round(density * n) weights per layer, drawn uniformly."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    masks = {}
    for name, d in densities.items():
        w = params[name]
        keep = int(round(d * w.numel()))
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[torch.randperm(w.numel(), generator=gen)[:keep]] = True
        masks[name] = flat.view_as(w)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight (call after init and after every optimizer step)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def sparsity_report(model: nn.Module) -> list[dict]:
    """Per prunable layer: shape, parameter count, non-zeros and density (measured)."""
    rows = []
    for name, m in prunable_layers(model).items():
        w = m.weight.detach()
        nnz = int(torch.count_nonzero(w))
        rows.append({"layer": name, "shape": list(w.shape), "params": w.numel(),
                     "nonzero": nnz, "density": nnz / w.numel()})
    return rows


def total_density(rows: list[dict]) -> float:
    return sum(r["nonzero"] for r in rows) / max(sum(r["params"] for r in rows), 1)


def format_report(rows: list[dict]) -> str:
    lines = [f"{'layer':40s} {'shape':>18s} {'params':>9s} {'density':>8s}"]
    for r in rows:
        lines.append(f"{r['layer']:40s} {str(tuple(r['shape'])):>18s} {r['params']:9d} "
                     f"{r['density']:8.3f}")
    lines.append(f"{'total':40s} {'':>18s} {sum(r['params'] for r in rows):9d} "
                 f"{total_density(rows):8.3f}")
    return "\n".join(lines)
