"""EcoTTA (Song et al., CVPR 2023): a frozen backbone split into K parts, a meta network after
each part, and the test-time loss (confidence-masked entropy + self-distilled regularizer).

    part k:        h_k = f_k(x_{k-1})                        (frozen)
    meta net k:    x_k = BN_meta(h_k) + ReLU(BN(Conv(x_{k-1})))   (trained at test time)
    loss:          1[H < E0] * H  +  lam * sum_k mean |x_k - h_k|

Each regularizer term updates only its own meta network: its inputs x_{k-1} and h_k are
stop-gradient copies, so no gradient of term k reaches an earlier meta network.

Two variants (``backbone_norm``), chosen at warm-up and recorded in the checkpoint:

- ``"batch"`` (edgetta's default): the frozen backbone's BatchNorms normalize with the test
  batch's statistics, which the backward pass treats as constants (a per-channel affine, so
  nothing more is kept than with source statistics). Selected on corrupted training images and
  validated on an independent generator (docs/validation.md).
- ``"source"``: the backbone keeps its source statistics, as in the paper.
"""
from __future__ import annotations

import copy
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


BACKBONE_NORMS = ("batch", "source")
DEFAULT_BACKBONE_NORM = "batch"
# The conv branch's BN weight at initialisation. At 0 with a zero bias the branch is dead for
# good: ReLU'(0) = 0 stops every gradient to the conv and to the BN itself.
DEFAULT_BRANCH_INIT = 0.1


class BatchStatNorm(nn.Module):
    """A frozen backbone BatchNorm that normalizes with the batch's statistics in train mode
    and with running statistics in eval mode (single frames). The batch statistics pass through
    ``stop_gradient``: the backward pass sees a per-channel affine and keeps only its factors.
    ``batch_stats`` holds the last train-mode batch's (mean, variance) for the device's running
    statistics. The variance is the biased one: an unbiased one needs the count of values per
    channel, which a traced graph would freeze at the export batch; the two differ by a factor
    n / (n - 1), n = batch x height x width (at least 196 here, so under 0.6%)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        c = bn.num_features
        w = bn.weight.detach().clone() if bn.affine else torch.ones(c)
        b = bn.bias.detach().clone() if bn.affine else torch.zeros(c)
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        # kept so that a converted backbone's state_dict still loads into its BatchNorm2d model
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        self.eps = bn.eps
        # None: train mode leaves the running statistics alone (warm-up, export); a float moves
        # them as the device does (the PyTorch reference of benchmarks.tta)
        self.momentum: float | None = None
        self.batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            var = (x - mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
            self.batch_stats = (mean, var)
            if self.momentum and not torch.onnx.is_in_onnx_export():
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(var.detach(), self.momentum)
            scale = stop_gradient(self.weight * torch.rsqrt(var + self.eps))
            shift = stop_gradient(self.bias - mean * scale)
        else:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def replace_batchnorms(module: nn.Module, make) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by ``make(bn)``, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            replace_batchnorms(child, make)
    return module


def use_test_batch_statistics(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by its BatchStatNorm, in place."""
    return replace_batchnorms(module, BatchStatNorm)


class MetaNet(nn.Module):
    """``BN_meta(h) + ReLU(BN(Conv(x_prev)))``; the conv's stride matches its part's."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, branch_init: float = DEFAULT_BRANCH_INIT):
        super().__init__()
        self.bn_meta = nn.BatchNorm2d(cout)
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, branch_init)  # the conv branch starts quiet, not silent

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

    def __init__(self, backbone: Backbone, split: list[int], backbone_norm: str = DEFAULT_BACKBONE_NORM,
                 branch_init: float = DEFAULT_BRANCH_INIT):
        super().__init__()
        if sum(split) != len(backbone.blocks):
            raise ValueError(f"split {split} does not cover {len(backbone.blocks)} blocks")
        if backbone_norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone_norm must be one of {BACKBONE_NORMS}, got {backbone_norm!r}")
        self.backbone_norm = backbone_norm
        if backbone_norm == "batch":  # on a copy: the caller's module (perhaps a user's) stays as it is
            backbone = use_test_batch_statistics(copy.deepcopy(backbone))
        self.backbone = backbone
        self.split = list(split)
        shapes = block_channels(backbone)
        metas, start = [], 0
        for i, n in enumerate(split):
            part = shapes[start:start + n]
            cin = 3 if i == 0 else part[0][0]
            stride = math.prod(s for _, _, s in part) * (backbone.stem_stride if i == 0 else 1)
            metas.append(MetaNet(cin, part[-1][1], stride, backbone.meta_kernel, branch_init))
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
        """Meta networks follow ``mode``. The frozen backbone's BatchNorms stay on their source
        statistics, or, with ``backbone_norm="batch"``, follow ``mode`` too (batch statistics
        in train mode, the running ones in eval mode)."""
        super().train(mode)
        self.backbone.eval()
        for m in self.batch_stat_norms().values():
            m.train(mode)
        return self

    def batch_stat_norms(self) -> dict[str, BatchStatNorm]:
        """The backbone's batch-statistics BatchNorms by module name (empty for "source")."""
        return {n: m for n, m in self.backbone.named_modules() if isinstance(m, BatchStatNorm)}

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
