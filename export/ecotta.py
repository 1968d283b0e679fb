"""EcoTTA (Song et al., CVPR 2023): a frozen backbone split into K parts, a meta network after
each part, and the test-time loss (confidence-masked entropy + self-distilled regularizer).

    part k:        h_k = f_k(x_{k-1})                        (frozen)
    meta net k:    x_k = BN_meta(h_k) + ReLU(BN(Conv(x_{k-1})))   (trained at test time)
    loss:          1[H < E0] * H  +  lam * sum_k mean |x_k - h_k|

Each regularizer term updates only its own meta network: its inputs x_{k-1} and h_k are
stop-gradient copies, so no gradient of term k reaches an earlier meta network.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .models import Backbone, block_channels


def stop_gradient(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()`` that survives ONNX export.

    ONNX has no detach, so the exported graph routes the value through an int64 cast, which
    onnxruntime's gradient builder (and torch's autograd) treat as non-differentiable. Scaling
    by 2**40 first keeps the value exact for |t| >= 2**-17 and within 2**-40 below that, for
    |t| < 2**23 (activations are far inside that range).
    """
    if torch.onnx.is_in_onnx_export():
        return (t * 2.0 ** 40).to(torch.int64).to(t.dtype) * 2.0 ** -40
    return t.detach()


class MetaNet(nn.Module):
    """``BN_meta(h) + ReLU(BN(Conv(x_prev)))``; the conv's stride matches its part's."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int):
        super().__init__()
        self.bn_meta = nn.BatchNorm2d(cout)
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn.weight)  # the conv branch starts silent: x_k = BN_meta(h_k)

    def forward(self, x_prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.bn_meta(h) + F.relu(self.bn(self.conv(x_prev)))

    def batchnorms(self) -> dict[str, nn.BatchNorm2d]:
        return {"bn_meta": self.bn_meta, "bn": self.bn}


def default_split(num_blocks: int, k: int = 4) -> list[int]:
    """Blocks per part, shallow parts finer: weights 1,..,1,2,..,2 (WRN-28: 2,2,4,4)."""
    if not 1 <= k <= num_blocks:
        raise ValueError(f"K must be between 1 and the number of blocks ({num_blocks}), got {k}")
    weights = [1] * (k // 2) + [2] * (k - k // 2)
    sizes = [max(1, num_blocks * w // sum(weights)) for w in weights]
    i = k - 1
    while sum(sizes) < num_blocks:  # the remainder goes to the deepest parts
        sizes[i] += 1
        i = i - 1 if i > 0 else k - 1
    while sum(sizes) > num_blocks:
        sizes[sizes.index(max(sizes))] -= 1
    return sizes


class EcoTTAModel(nn.Module):
    """A backbone with K meta networks. ``backbone`` stays frozen; ``metas`` are trainable."""

    def __init__(self, backbone: Backbone, split: list[int]):
        super().__init__()
        if sum(split) != len(backbone.blocks):
            raise ValueError(f"split {split} does not cover {len(backbone.blocks)} blocks")
        self.backbone = backbone
        self.split = list(split)
        shapes = block_channels(backbone)
        metas, start = [], 0
        for i, n in enumerate(split):
            part = shapes[start:start + n]
            cin = 3 if i == 0 else part[0][0]
            stride = math.prod(s for _, _, s in part) * (backbone.stem_stride if i == 0 else 1)
            metas.append(MetaNet(cin, part[-1][1], stride, backbone.meta_kernel))
            start += n
        self.metas = nn.ModuleList(metas)
        for p in backbone.parameters():
            p.requires_grad_(False)

    @property
    def k(self) -> int:
        return len(self.split)

    def part_ranges(self) -> list[range]:
        out, start = [], 0
        for n in self.split:
            out.append(range(start, start + n))
            start += n
        return out

    def train(self, mode: bool = True) -> "EcoTTAModel":
        """Meta networks follow ``mode``; the frozen backbone always normalizes with its
        source statistics."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Last meta output and, per part, (part input x_{k-1}, frozen output h_k, meta output x_k)."""
        trace = []
        for i, blocks in enumerate(self.part_ranges()):
            x_prev = x
            h = self.backbone.stem(x) if i == 0 else x
            for b in blocks:
                h = self.backbone.blocks[b](h)
            x = self.metas[i](x_prev, h)
            trace.append((x_prev, h, x))
        return x, trace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.head(self.features(x)[0])

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.metas.parameters()]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def ecotta_loss(model: EcoTTAModel, x: torch.Tensor, lam: float = 0.5, e0: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits, masked entropy, regularizer) of one test batch.

    Entropy is averaged over the whole batch with unconfident samples (H >= E0) counting zero.
    Term k of the regularizer recomputes meta network k on stop-gradient copies of its inputs,
    so its gradient reaches meta network k only.
    """
    feats, trace = model.features(x)
    return loss_from_features(model, feats, trace, lam, e0)


def loss_from_features(model: EcoTTAModel, feats: torch.Tensor, trace: list, lam: float = 0.5,
                       e0: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ecotta_loss`` on the output of ``model.features`` (for callers that need the trace too)."""
    logits = model.backbone.head(feats)
    ent = entropy(logits)
    e0 = 0.4 * math.log(logits.shape[1]) if e0 is None else e0
    mask = (ent < e0).to(ent.dtype)
    ent_loss = (mask * ent).mean()
    reg = logits.new_zeros(())
    for meta, (x_prev, h, _) in zip(model.metas, trace):
        h_sg = stop_gradient(h)
        reg = reg + (meta(stop_gradient(x_prev), h_sg) - h_sg).abs().mean()
    return ent_loss + lam * reg, logits, ent_loss, reg
