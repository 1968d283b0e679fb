"""Reference test-time adaptation methods in PyTorch, written for this benchmark from the papers.

Every method has one interface, tent-style: ``logits = method.step(x)`` predicts the batch ``x``
(normalized NCHW float) and then adapts on it; the logits are the prediction the method makes
for that batch (from before its update, as in the papers).

- ``source``       the trained backbone, source BatchNorm statistics, no adaptation.
- ``source_meta``  EcoTTA's warmed-up model (backbone + meta networks), no adaptation.
- ``bn_adapt``     BatchNorm with test-batch statistics, nothing trained (Schneider et al. 2020;
                   Nado et al. 2020).
- ``tent``         BN with batch statistics, BN affine trained on the mean prediction entropy,
                   Adam lr 1e-3 (Wang et al., ICLR 2021).
- ``cotta``        student + EMA teacher (0.999) + frozen source anchor; when the anchor's mean
                   confidence is below 0.92 the teacher's pseudo-label is the average of its
                   predictions on 32 augmented copies; cross-entropy of the student against the
                   teacher's soft pseudo-label; Adam lr 1e-3 on all weights; after every step
                   each weight element is restored to its source value with probability 0.01
                   (Wang et al., CVPR 2022, CIFAR settings).
- ``ecotta_torch`` EcoTTA (Song et al., CVPR 2023) with ``edgetta_export.ecotta``: only meta networks
                   train, SGD momentum 0.9, the bundle's learning rate.

Which methods exist, their labels and how each is built: the registry in ``benchmarks.methods``
(``methods.create(name, ckpt)``). The device path (``edgetta``, onnxruntime-training) is not
here: ``run_method`` runs it in a process without torch.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetta_export.bundle import build_model
from edgetta_export.ecotta import ecotta_loss, entropy


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Every BatchNorm normalizes with the statistics of the current batch and keeps none."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


class Method:
    """Predict-and-adapt on a stream of batches."""

    name = "method"

    def step(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        """Every network the method keeps in memory (for the parameter count)."""
        return []

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters and buffers held, of gradients (one per trainable parameter) and
        of optimizer state."""
        seen, weights, grads = set(), 0, 0
        for mod in self.modules():
            for t in list(mod.parameters()) + list(mod.buffers()):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    weights += t.numel() * t.element_size()
                    if t.requires_grad:
                        grads += t.numel() * t.element_size()
        for t in getattr(self, "_extra_tensors", []):
            weights += t.numel() * t.element_size()
        opt = getattr(self, "optimizer", None)
        opt_bytes = 0
        if opt is not None:
            for st in opt.state.values():
                opt_bytes += sum(v.numel() * v.element_size() for v in st.values()
                                 if torch.is_tensor(v) and v.dim() > 0)
        return {"weights": weights, "gradients": grads, "optimizer": opt_bytes}


class Source(Method):
    name = "source"

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def modules(self) -> list[nn.Module]:
        return [self.model]


class GradientMethod(Method):
    """One optimizer step per batch on ``self.loss``; logits from before the step (tent-style)."""

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, x: torch.Tensor) -> torch.Tensor:
        loss, logits = self.loss(x)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    def modules(self) -> list[nn.Module]:
        return [self.model]


class BNAdapt(Source):
    name = "bn_adapt"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        use_batch_statistics(self.model)


class Tent(GradientMethod):
    name = "tent"

    def __init__(self, model: nn.Module, lr: float = 1e-3):
        self.model = use_batch_statistics(model.eval())
        params = []
        for m in self.model.modules():
            for p in m.parameters(recurse=False):
                train = isinstance(m, nn.BatchNorm2d)
                p.requires_grad_(train)
                if train:
                    params.append(p)
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return entropy(logits).mean(), logits


def cotta_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random augmentation per image of ``x`` (pixels in [0, 1], NCHW): colour jitter
    (brightness, contrast, saturation, gamma), an affine map (rotation, translation, scale) whose
    out-of-image area is filled from the border ("affine with padding"), horizontal flip, and
    gaussian noise. CIFAR-scale parameters of the CoTTA paper's augmentation."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=gen)

    grey = x.mean(1, keepdim=True)
    x = x * u(0.6, 1.4)                                              # brightness
    x = (x - grey.mean((2, 3), keepdim=True)) * u(0.7, 1.3) + grey.mean((2, 3), keepdim=True)
    x = (x - grey) * u(0.5, 1.5) + grey                              # saturation
    x = x.clamp(0, 1).pow(u(0.7, 1.3))                               # gamma
    angle = torch.empty(n).uniform_(-15, 15, generator=gen) * math.pi / 180
    scale = torch.empty(n).uniform_(0.9, 1.1, generator=gen)
    shift = torch.empty(n, 2).uniform_(-1 / 8, 1 / 8, generator=gen)  # 1/16 of the width
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    x = x + 0.005 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


class CoTTA(Method):
    name = "cotta"

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], lr: float = 1e-3,
                 ema: float = 0.999, gate: float = 0.92, augmentations: int = 32,
                 restore: float = 0.01, seed: int = 0):
        self.student = use_batch_statistics(model.eval())
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.teacher = copy.deepcopy(self.student)
        self.anchor = copy.deepcopy(self.student)
        for p in list(self.teacher.parameters()) + list(self.anchor.parameters()):
            p.requires_grad_(False)
        self.source = [p.detach().clone() for p in self.student.parameters()]
        self._extra_tensors = self.source
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=lr, betas=(0.9, 0.999))
        self.ema, self.gate, self.n_aug, self.restore = ema, gate, augmentations, restore
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.gen = torch.Generator().manual_seed(seed)
        self.augmented_steps = 0
        self.steps = 0

    @torch.no_grad()
    def pseudo_label(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's soft prediction: plain, or averaged over augmentations when the
        source anchor is not confident on this batch."""
        prob = F.softmax(self.teacher(x), 1)
        confidence = F.softmax(self.anchor(x), 1).max(1).values.mean()
        if confidence < self.gate:
            self.augmented_steps += 1
            pixels = x * self.std + self.mean
            prob = torch.zeros_like(prob)
            for _ in range(self.n_aug):
                aug = (cotta_augment(pixels, self.gen) - self.mean) / self.std
                prob += F.softmax(self.teacher(aug), 1)
            prob /= self.n_aug
        return prob

    def step(self, x: torch.Tensor) -> torch.Tensor:
        target = self.pseudo_label(x)
        logits = self.student(x)
        loss = -(target * F.log_softmax(logits, 1)).sum(1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(self.ema).add_(s, alpha=1 - self.ema)
            for s, src in zip(self.student.parameters(), self.source):
                keep = torch.rand(s.shape, generator=self.gen) >= self.restore
                s.copy_(torch.where(keep, s, src))
        self.steps += 1
        return target.clamp_min(1e-12).log()  # CoTTA predicts with the teacher

    def modules(self) -> list[nn.Module]:
        return [self.student, self.teacher, self.anchor]


class EcoTTATorch(GradientMethod):
    """EcoTTA as the device runs it. The meta BatchNorms' running statistics move once per step,
    as the device loop moves them: the regularizer recomputes every meta network in train mode
    on the same inputs, and without a guard that second forward would move them again (an
    effective momentum of 1 - (1 - m)^2). ``anchor`` (rho, 0: off) is the device's
    ``Adapter(anchor=rho)``: after every step theta <- theta0 + (1 - rho) (theta - theta0)."""
    name = "ecotta_torch"

    def __init__(self, ckpt: dict[str, Any], lr: float = 0.005, momentum: float = 0.9,
                 lam: float = 0.5, e0: float | None = None, anchor: float = 0.0,
                 model: nn.Module | None = None, bn_momentum: float = 0.1):
        self.model = (model if model is not None else build_model(ckpt)).train()
        for norm in self.model.batch_stat_norms().values():  # the device keeps these running statistics too
            norm.momentum = bn_momentum
        for bn in self.model.metas.modules():  # the device moves the meta BatchNorms' by the same momentum
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = bn_momentum
        self.lam, self.e0, self.anchor = lam, e0, float(anchor)
        self.optimizer = torch.optim.SGD(self.model.meta_parameters(), lr=lr, momentum=momentum)
        self.start = [p.detach().clone() for p in self.model.meta_parameters()]
        self._bn_momentum = {bn: bn.momentum for bn in self.model.metas.modules() if isinstance(bn, nn.BatchNorm2d)}
        self._moved: set[nn.Module] = set()
        for bn in self._bn_momentum:
            bn.register_forward_pre_hook(self._one_update_per_step)

    def _one_update_per_step(self, bn: nn.Module, args: Any) -> None:
        """The first forward of a meta BatchNorm in a step moves its running statistics; later
        ones (the regularizer's recomputation) run with momentum 0, which leaves them as they are."""
        bn.momentum = 0.0 if bn in self._moved else self._bn_momentum[bn]
        self._moved.add(bn)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._moved = set()
        loss, logits, _, _ = ecotta_loss(self.model, x, self.lam, self.e0)
        return loss, logits

    def step(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().step(x)
        if self.anchor:
            with torch.no_grad():
                for p, p0 in zip(self.model.meta_parameters(), self.start):
                    p.copy_(p0 + (1.0 - self.anchor) * (p - p0))
        return logits


class SourceMeta(Source):
    """EcoTTA's warmed-up model without adaptation (meta BatchNorms on running statistics)."""
    name = "source_meta"

    def __init__(self, ckpt: dict[str, Any]):
        super().__init__(build_model(ckpt))
