"""The model zoo: WideResNets and ResNets, each split into parts for EcoTTA.

Every model exposes the same three pieces so that the rest of the toolchain
never needs to know which architecture it holds:

- ``stem``: the layers before the first residual block,
- ``blocks``: the residual blocks, in order (an ``nn.ModuleList``),
- ``head``: everything after the last block (final norm, pooling, classifier).

``CONFIGS`` holds the named architectures as plain data; ``create_model(name)``
builds one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)


class WideBasicBlock(nn.Module):
    """Pre-activation residual block of a WideResNet (BN-ReLU-Conv twice)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.shortcut = conv1x1(cin, cout, stride) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (Conv-BN-ReLU, Conv-BN, add, ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            if (cin != cout or stride != 1) else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class Bottleneck(nn.Module):
    """Post-activation ResNet bottleneck (1x1, 3x3, 1x1 with 4x expansion)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.stride = stride
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            if (cin != cout or stride != 1) else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class Head(nn.Module):
    """Optional final BN-ReLU (pre-activation nets), global average pool, linear."""

    def __init__(self, channels: int, num_classes: int, pre_activation: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if pre_activation else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Backbone(nn.Module):
    """stem -> blocks -> head. ``meta_kernel`` is the kernel of EcoTTA's meta conv."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module,
                 stem_channels: int, stem_stride: int, meta_kernel: int):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.stem_channels = stem_channels
        self.stem_stride = stem_stride
        self.meta_kernel = meta_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@dataclass(frozen=True)
class ModelConfig:
    """A named architecture, as plain data."""

    family: str                 # "wrn" | "resnet"
    depth: int
    width: int                  # WRN widen factor, or ResNet base width
    num_classes: int = 10
    input_size: int = 32
    block: str = "basic"        # resnet only: "basic" | "bottleneck"
    stages: tuple[int, ...] = field(default_factory=tuple)  # resnet only
    imagenet_stem: bool = False


CONFIGS: dict[str, ModelConfig] = {
    "wrn16_1": ModelConfig("wrn", 16, 1),
    "wrn16_2": ModelConfig("wrn", 16, 2),
    "wrn28_10": ModelConfig("wrn", 28, 10),
    "wrn40_2": ModelConfig("wrn", 40, 2),
    "resnet26": ModelConfig("resnet", 26, 16, stages=(3, 3, 3, 3)),
    "resnet50": ModelConfig("resnet", 50, 64, block="bottleneck", stages=(3, 4, 6, 3),
                            input_size=224, imagenet_stem=True),
}


def wide_resnet(depth: int, widen: int, num_classes: int = 10) -> Backbone:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    blocks: list[nn.Module] = []
    cin = widths[0]
    for stage, cout in enumerate(widths[1:]):
        for i in range(n):
            blocks.append(WideBasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
            cin = cout
    return Backbone(conv3x3(3, widths[0]), blocks, Head(cin, num_classes, pre_activation=True),
                    stem_channels=widths[0], stem_stride=1, meta_kernel=3)


def resnet(stages: tuple[int, ...], width: int, block: str = "basic", num_classes: int = 10,
           imagenet_stem: bool = False) -> Backbone:
    if imagenet_stem:
        stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stem_stride = 4
    else:
        stem = nn.Sequential(conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stem_stride = 1
    blocks: list[nn.Module] = []
    cin = width
    for stage, count in enumerate(stages):
        w = width * 2 ** stage
        for i in range(count):
            stride = 2 if (i == 0 and stage > 0) else 1
            if block == "bottleneck":
                blocks.append(Bottleneck(cin, w, stride))
                cin = w * Bottleneck.expansion
            else:
                blocks.append(BasicBlock(cin, w, stride))
                cin = w
    return Backbone(stem, blocks, Head(cin, num_classes, pre_activation=False),
                    stem_channels=width, stem_stride=stem_stride, meta_kernel=1)


def create_model(name: str, num_classes: int | None = None) -> Backbone:
    """Build a named architecture from ``CONFIGS`` with fresh weights."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    classes = num_classes or cfg.num_classes
    if cfg.family == "wrn":
        return wide_resnet(cfg.depth, cfg.width, classes)
    return resnet(cfg.stages, cfg.width, cfg.block, classes, cfg.imagenet_stem)


def block_channels(model: Backbone) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of each residual block, found by a dry run."""
    shapes = []
    cfg_size = 32
    x = torch.zeros(1, 3, cfg_size, cfg_size)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        x = model.stem(x)
        for block in model.blocks:
            y = block(x)
            shapes.append((x.shape[1], y.shape[1], x.shape[-1] // y.shape[-1]))
            x = y
        model.train(was_training)
    return shapes
