"""Bring your own model and images: a plain nn.Module exports with part boundaries found by
torch.fx, what cannot be handled is refused with one line, and `edgetta export` runs from a
folder of images the test writes."""
import json

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from edgetta_export.bundle import export_bundle
from edgetta_export.lean import LeanOptions
from edgetta_export.errors import ExportError
from edgetta_export.own import module_checkpoint
from edgetta_export.partition import cuts, partition, trace, units
from edgetta_export.models import create_model
from tests.test_mobilenet import check_against_torch


class Plain(nn.Module):
    """Not in the zoo: conv stacks, a residual block around a grouped conv, hard-swish, ReLU6,
    a functional mean for pooling."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.c, self.bn_c = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.d = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.e, self.bn_e = nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.b(self.a(x))
        x = F.relu(x + self.bn_c(self.c(x)))
        x = F.relu(self.bn_e(self.e(self.d(x))))
        return self.fc(x.mean((2, 3)))


class Branchy(Plain):
    def forward(self, x):  # data-dependent control flow: torch.fx cannot trace it
        return super().forward(x) if x.mean() > 0 else super().forward(-x)


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_plain_module_exports_with_automatic_boundaries(tmp_path):
    model = _randomize_batchnorms(Plain())
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    ckpt = module_checkpoint(model, [f"c{i}" for i in range(5)], 16, images=images)
    # units: stem a, then b, the residual block (ends at the top-level relu), d, e + its BN-ReLU
    assert ckpt["split"] == [1, 1, 1, 1]
    assert ckpt["part_ends"] == ["b.2", "relu", "d.2", "relu_1"]
    # float32 kept inputs: the gradients check_against_torch compares are then torch's to rounding
    manifest = export_bundle(ckpt, tmp_path / "plain", profile=False, lean_options=LeanOptions(activation_bits=None))
    assert manifest["ecotta"]["part_ends"] == ckpt["part_ends"]
    assert manifest["class_names"] == [f"c{i}" for i in range(5)]
    # edgetta's variant normalizes with batch statistics: the 5 BatchNorms' running statistics are kept
    assert manifest["frozen"]["batchnorms_folded_into_convs"] == 0
    assert len(manifest["frozen"]["backbone_running_stats"]) == 2 * 5
    source = export_bundle({**ckpt, "backbone_norm": "source"}, tmp_path / "plain_source", profile=False, portable=False)
    assert source["frozen"]["batchnorms_folded_into_convs"] == 5  # every conv-BN pair, through the fx parts
    # part 0 (stem a + block b, hard-swish) needs no gradient; ReLU6 in d does
    assert manifest["training_graph"]["rewrites"]["clip_grad_to_mask"] == 1
    # the partitioned backbone computes what the module computes
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ckpt["backbone_module"](x), model(x), atol=1e-5)
    check_against_torch(ckpt, tmp_path / "plain", batches=(2,))


def test_named_boundaries_override_and_are_checked():
    model = _randomize_batchnorms(Plain())
    backbone, split = partition(model, 16, boundaries=["b", "d", "bn_e"], k=3)
    assert split == [1, 1, 1] and backbone.block_ends == ["b.2", "d.2", "bn_e"]
    with pytest.raises(ExportError, match="another tensor crosses") as e:
        partition(model, 16, boundaries=["b", "bn_c"], k=2)  # inside the residual block
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="no module named"):
        partition(model, 16, boundaries=["nope"], k=1)


def test_automatic_boundaries_agree_with_the_zoo_blocks():
    """On a post-activation ResNet the cuts torch.fx finds are the zoo's block outputs."""
    model = create_model("resnet26").eval()
    ends = units(cuts(trace(model), 32))
    assert [c.module for c in ends[1:]] == [f"blocks.{i}" for i in range(len(model.blocks))]


@pytest.mark.parametrize("module,reason", [
    (Branchy(), "torch.fx cannot trace Branchy"),
    (NoBatchNorm(), "NoBatchNorm has no BatchNorm2d"),
])
def test_unhandleable_modules_are_refused_with_one_line(module, reason):
    with pytest.raises(ExportError, match=reason) as e:
        module_checkpoint(module, ["a", "b"], 16)
    assert "\n" not in str(e.value)


def test_too_few_places_to_split_is_refused():
    with pytest.raises(ExportError, match="K=8 parts need 9"):
        partition(_randomize_batchnorms(Plain()), 16, k=8)


def write_image_folder(root, classes=("circle", "square", "stripes"), per_class=12, size=40, seed=0):
    """A folder of PNG and JPEG images, one subfolder per class, drawn so classes differ
    (docs/own_model.md uses it too)."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 80, 3)))
            d = ImageDraw.Draw(im)
            o = int(rng.integers(2, 10))
            fill = tuple(int(v) for v in rng.integers(150, 256, 3))
            if c == 0:
                d.ellipse([o, o, size - o, size - o], fill=fill)
            elif c == 1:
                d.rectangle([o, o, size - o, size - o], fill=fill)
            else:
                for y in range(o, size, 8):
                    d.rectangle([0, y, size, y + 3], fill=fill)
            im.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_cli_export_from_an_image_folder(tmp_path, capsys):
    """The whole user path on a folder the test writes: a module of one's own by
    package.module:factory, its state dict, warm-up, clean accuracy, class names in the bundle."""
    from edgetta.cli import main
    data = write_image_folder(tmp_path / "images")
    weights = tmp_path / "mine.pt"
    torch.save(_randomize_batchnorms(Plain(num_classes=3)).state_dict(), weights)
    out = tmp_path / "bundle"
    rc = main(["export", "--arch", "tests.test_own_model:Plain", "--weights", str(weights),
               "--data", str(data), "--input-size", "16", "--out", str(out), "--warmup-epochs", "2",
               "--warmup-batch", "8", "--no-profile", "--save-checkpoint", str(tmp_path / "host.pt")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "held-back images" in printed and "before meta warm-up" in printed and "after" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_names"] == ["circle", "square", "stripes"]
    assert m["model"]["architecture"] == "tests.test_own_model:Plain"
    assert m["model"]["meta_warmup"]["held_back_images"] == 6  # round(0.2 x 12) per class
    assert m["input"]["shape"] == [3, 16, 16]
    from edgetta.adapter import Adapter
    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert Adapter.load(out).step(frames, adapt=True).shape == (4, 3)
    from edgetta_export import checkpoint
    from edgetta_export.bundle import build_model
    assert build_model(checkpoint.load(tmp_path / "host.pt")).k == 4  # the saved host checkpoint rebuilds


def test_cli_refuses_what_it_cannot_export_with_one_line(tmp_path, capsys):
    from edgetta.cli import main
    data = write_image_folder(tmp_path / "images", per_class=2)
    weights = tmp_path / "other.pt"
    torch.save(create_model("wrn16_1", num_classes=3).state_dict(), weights)
    torch.save(Plain(num_classes=5).state_dict(), tmp_path / "plain.pt")
    cases = [["--arch", "tests.test_own_model:Branchy"],
             ["--arch", "mobilenet_v2", "--weights", str(weights)],  # another architecture
             ["--arch", "tests.test_own_model:Plain", "--weights", str(tmp_path / "plain.pt")],  # 5 classes
             ["--arch", "no_such_net"]]
    for extra in cases:
        rc = main(["export", "--data", str(data), "--out", str(tmp_path / "b"), "--no-profile", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (extra, err)
