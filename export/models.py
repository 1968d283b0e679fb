"""The model zoo: WideResNets, ResNets and MobileNets, each split into parts for EcoTTA.

Every model exposes the same three pieces so that the rest of the toolchain
never needs to know which architecture it holds:

- ``stem``: the layers before the first residual block,
- ``blocks``: the residual blocks, in order (an ``nn.ModuleList``),
- ``head``: everything after the last block (final norm, pooling, classifier).

Any other BatchNorm CNN is brought to the same form by ``edgetta_export.partition`` (torch.fx).

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
                 stem_channels: int, stem_stride: int, meta_kernel: int, input_size: int = 32,
                 in_channels: int = 3):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.stem_channels = stem_channels
        self.stem_stride = stem_stride
        self.meta_kernel = meta_kernel
        self.input_size = input_size
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@dataclass(frozen=True)
class ModelConfig:
    """A named architecture, as plain data."""

    family: str                 # "wrn" | "resnet" | "mobilenet_v2" | "mobilenet_v3"
    depth: int
    width: int                  # WRN widen factor, ResNet base width, MobileNet width x 100
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
    # MobileNets at 32x32 keep the first two stride-2 layers at stride 1 (as CIFAR ports do)
    "mobilenet_v2": ModelConfig("mobilenet_v2", 0, 100),
    "mobilenet_v2_224": ModelConfig("mobilenet_v2", 0, 100, input_size=224, imagenet_stem=True),
    "mobilenet_v3s": ModelConfig("mobilenet_v3", 0, 100),
    "mobilenet_v3s_224": ModelConfig("mobilenet_v3", 0, 100, input_size=224, imagenet_stem=True),
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


class HardSwish(nn.Module):
    """``x * relu6(x + 3) / 6``, written out: exported as Add, Clip, Mul, Div, each of which
    onnxruntime-training can differentiate (it has no gradient for ONNX's HardSwish)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expansion, depthwise kxk, linear 1x1 projection; identity
    shortcut where input and output shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3,
                 act: type[nn.Module] = nn.ReLU6):
        super().__init__()
        self.stride = stride
        hidden = expand if expand > 8 else cin * expand  # V3 configs give the width, V2 a ratio
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(conv_bn_act(cin, hidden, 1, act=act))
        layers += [conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=act),
                   conv_bn_act(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileHead(nn.Module):
    """Last 1x1 conv (BN, activation), global average pool, classifier (V3: a hidden layer)."""

    def __init__(self, cin: int, channels: int, num_classes: int, act: type[nn.Module],
                 hidden: int | None = None):
        super().__init__()
        self.conv = conv_bn_act(cin, channels, 1, act=act)
        fc: list[nn.Module] = [nn.Linear(channels, hidden), act()] if hidden else []
        self.fc = nn.Sequential(*fc, nn.Linear(hidden or channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


# (expansion ratio, channels, repeats, stride): MobileNetV2 (Sandler et al., 2018)
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
# (kernel, expansion width, channels, hard-swish, stride): MobileNetV3-Small's layout
# (Howard et al., 2019) without squeeze-and-excitation
MOBILENET_V3S = ((3, 16, 16, False, 2), (3, 72, 24, False, 2), (3, 88, 24, False, 1),
                 (5, 96, 40, True, 2), (5, 240, 40, True, 1), (5, 240, 40, True, 1),
                 (5, 120, 48, True, 1), (5, 144, 48, True, 1), (5, 288, 96, True, 2),
                 (5, 576, 96, True, 1), (5, 576, 96, True, 1))


def _width(c: int, mult: float) -> int:
    return max(8, int(c * mult + 4) // 8 * 8)


def mobilenet_v2(num_classes: int = 10, width: float = 1.0, imagenet_stem: bool = False) -> Backbone:
    """At 32x32 (``imagenet_stem`` off) the stem and the first stride-2 stage run at stride 1."""
    cin = _width(32, width)
    stem = conv_bn_act(3, cin, 3, 2 if imagenet_stem else 1)
    blocks: list[nn.Module] = []
    for stage, (t, c, n, s) in enumerate(MOBILENET_V2):
        cout = _width(c, width)
        for i in range(n):
            stride = s if i == 0 and (imagenet_stem or stage != 1) else 1
            blocks.append(InvertedResidual(cin, cout, stride, t))
            cin = cout
    head = MobileHead(cin, _width(1280, max(1.0, width)), num_classes, nn.ReLU6)
    return Backbone(stem, blocks, head, stem_channels=_width(32, width),
                    stem_stride=2 if imagenet_stem else 1, meta_kernel=1,
                    input_size=224 if imagenet_stem else 32)


def mobilenet_v3s(num_classes: int = 10, width: float = 1.0, imagenet_stem: bool = False) -> Backbone:
    """MobileNetV3-Small-style (hard-swish, 5x5 depthwise); at 32x32 the stem and the first
    block run at stride 1."""
    cin = _width(16, width)
    stem = conv_bn_act(3, cin, 3, 2 if imagenet_stem else 1, act=HardSwish)
    blocks: list[nn.Module] = []
    for i, (k, e, c, hs, s) in enumerate(MOBILENET_V3S):
        cout = _width(c, width)
        stride = s if imagenet_stem or i != 0 else 1
        blocks.append(InvertedResidual(cin, cout, stride, _width(e, width), k,
                                       HardSwish if hs else nn.ReLU))
        cin = cout
    head = MobileHead(cin, _width(576, width), num_classes, HardSwish, hidden=1024)
    return Backbone(stem, blocks, head, stem_channels=_width(16, width),
                    stem_stride=2 if imagenet_stem else 1, meta_kernel=1,
                    input_size=224 if imagenet_stem else 32)


def create_model(name: str, num_classes: int | None = None) -> Backbone:
    """Build a named architecture from ``CONFIGS`` with fresh weights."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    classes = num_classes or cfg.num_classes
    if cfg.family == "wrn":
        return wide_resnet(cfg.depth, cfg.width, classes)
    if cfg.family == "mobilenet_v2":
        return mobilenet_v2(classes, cfg.width / 100, cfg.imagenet_stem)
    if cfg.family == "mobilenet_v3":
        return mobilenet_v3s(classes, cfg.width / 100, cfg.imagenet_stem)
    model = resnet(cfg.stages, cfg.width, cfg.block, classes, cfg.imagenet_stem)
    model.input_size = cfg.input_size
    return model


def block_channels(model: Backbone) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of each block, found by a dry run at the model's
    input size."""
    shapes = []
    size = getattr(model, "input_size", 32)
    x = torch.zeros(1, getattr(model, "in_channels", 3), size, size)
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
