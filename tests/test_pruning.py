import numpy as np
import pytest
import torch

from edgetta_export.models import create_model
from edgetta_export.pruning import (SCHEMES, apply_masks, layer_densities, prunable_layers, random_masks,
                            sparsity_report, total_density)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("density", [0.5, 0.2, 0.1])
def test_schemes_hit_the_requested_total_density(scheme, density):
    model = create_model("wrn16_2")
    d = layer_densities(model, density, scheme)
    assert all(0.0 <= v <= 1.0 for v in d.values())
    sizes = {n: m.weight.numel() for n, m in prunable_layers(model).items()}
    total = sum(d[n] * sizes[n] for n in d) / sum(sizes.values())
    assert total == pytest.approx(density, abs=0.01)


def test_erk_gives_small_layers_more_density_and_caps_at_one():
    model = create_model("wrn28_10")
    d = layer_densities(model, 0.05, "erk")
    assert d["stem.weight"] == 1.0                      # 3->16 conv would exceed 1: made dense
    assert d["blocks.0.conv1.weight"] > d["blocks.11.conv2.weight"]
    assert max(d.values()) == 1.0
    # epsilon re-solved after capping: total still matches
    sizes = {n: m.weight.numel() for n, m in prunable_layers(model).items()}
    assert sum(d[n] * sizes[n] for n in d) / sum(sizes.values()) == pytest.approx(0.05, rel=1e-6)


def test_uniform_plus_keeps_first_conv_dense_and_floors_the_classifier():
    model = create_model("resnet26")
    d = layer_densities(model, 0.1, "uniform+")
    assert d["stem.0.weight"] == 1.0
    assert d["head.fc.weight"] == pytest.approx(0.2)


def test_bad_arguments_raise():
    model = create_model("wrn16_1")
    with pytest.raises(ValueError, match="scheme"):
        layer_densities(model, 0.2, "magnitude")
    with pytest.raises(ValueError, match="density"):
        layer_densities(model, 0.0, "erk")


def test_masks_are_random_and_seeded():
    model = create_model("wrn16_1")
    d = layer_densities(model, 0.2, "erk")
    a, b, c = random_masks(model, d, 0), random_masks(model, d, 0), random_masks(model, d, 1)
    name = "blocks.5.conv2.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


@pytest.mark.parametrize("scheme", ["erk", "uniform"])
def test_sparse_training_keeps_each_layer_at_its_density(scheme):
    """Real SGD steps with momentum and weight decay; pruned weights stay exactly zero."""
    torch.manual_seed(0)
    model = create_model("wrn16_1")
    d = layer_densities(model, 0.2, scheme)
    masks = random_masks(model, d, 0)
    apply_masks(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply_masks(model, masks)
    rows = {r["layer"]: r for r in sparsity_report(model)}
    for name, want in d.items():
        assert rows[name]["density"] == pytest.approx(want, abs=0.01), name
        w = dict(model.named_parameters())[name].detach()
        assert torch.all(w[~masks[name]] == 0)
    assert total_density(list(rows.values())) == pytest.approx(0.2, abs=0.01)


def test_train_script_writes_a_sparse_checkpoint(tmp_path):
    """The real training entry point on a tiny synthetic data set written in Fashion-MNIST's
    own IDX format."""
    import gzip
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 255).astype(np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
    from edgetta_export import checkpoint, train
    out = tmp_path / "m.pt"
    assert train.main(["--model", "wrn16_1", "--epochs", "1", "--batch", "32", "--sparsity", "0.8",
                       "--data-root", str(root), "--out", str(out)]) == 0
    ckpt = checkpoint.load(out)
    assert ckpt["pruning"]["density"] == pytest.approx(0.2, abs=0.01)
    model = checkpoint.build_backbone(ckpt)
    masks = checkpoint.unpack_masks(ckpt["masks"])
    for name, mask in masks.items():
        assert torch.all(dict(model.named_parameters())[name][~mask] == 0)
