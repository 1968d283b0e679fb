import pytest
import torch

from edgetta_export.ecotta import EcoTTAModel, default_split
from edgetta_export.models import CONFIGS, create_model


@pytest.mark.parametrize("name", ["wrn16_1", "wrn16_2", "wrn40_2", "resnet26"])
def test_zoo_models_with_meta_networks_run(name):
    backbone = create_model(name)
    model = EcoTTAModel(backbone, default_split(len(backbone.blocks), 4)).eval()
    size = CONFIGS[name].input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        _, trace = model.features(x)
    assert len(trace) == 4
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.meta_parameters())


def test_split_is_finer_in_shallow_parts():
    assert default_split(12, 4) == [2, 2, 4, 4]   # WRN-28
    assert default_split(18, 4) == [3, 3, 6, 6]   # WRN-40
    assert default_split(6, 4) == [1, 1, 2, 2]    # WRN-16
    assert sum(default_split(16, 4)) == 16
    with pytest.raises(ValueError):
        default_split(3, 4)


def test_meta_conv_strides_match_their_parts():
    backbone = create_model("wrn16_2")
    model = EcoTTAModel(backbone, [1, 1, 2, 2])
    strides = [m.conv.stride[0] for m in model.metas]
    assert strides == [1, 1, 2, 2]
    assert [m.conv.kernel_size[0] for m in model.metas] == [3] * 4
    r = EcoTTAModel(create_model("resnet26"), default_split(12))
    assert all(m.conv.kernel_size[0] == 1 for m in r.metas)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_huge")


def test_batch_statistics_backbone_matches_batchnorm_and_treats_statistics_as_constants():
    import copy
    from torch import nn
    from edgetta_export.ecotta import BatchStatNorm
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    norm = BatchStatNorm(bn)
    x = torch.randn(4, 5, 6, 6) * 3 + 1
    # train mode: the batch's statistics, as a train-mode BatchNorm normalizes
    ref = copy.deepcopy(bn).train()
    assert torch.allclose(norm.train()(x), ref(x), atol=1e-5)
    mean, var = norm.batch_stats
    assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, x.var((0, 2, 3), unbiased=False), atol=1e-4)
    # the backward pass is the per-channel scale only (statistics are constants)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)
    norm(xg).backward(dy)
    scale = bn.weight.detach() / torch.sqrt(x.var((0, 2, 3), unbiased=False) + bn.eps)
    assert torch.allclose(xg.grad, dy * scale.view(1, -1, 1, 1), atol=1e-5)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(dy)
    assert not torch.allclose(xr.grad, xg.grad, atol=1e-3)  # full BatchNorm backward differs
    # eval mode: running statistics, as an eval-mode BatchNorm
    assert torch.allclose(norm.eval()(x[:1]), bn.eval()(x[:1]), atol=1e-5)


def test_backbone_norm_variants():
    backbone = create_model("wrn16_1")
    batch = EcoTTAModel(backbone, [1, 1, 2, 2], backbone_norm="batch")
    source = EcoTTAModel(backbone, [1, 1, 2, 2], backbone_norm="source")
    assert len(batch.batch_stat_norms()) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules()) > 0
    assert source.batch_stat_norms() == {}
    batch.train()
    assert all(m.training for m in batch.batch_stat_norms().values()) and not batch.backbone.training
    batch.eval()
    assert not any(m.training for m in batch.batch_stat_norms().values())
    # the caller's module is not converted, and the converted one's state loads into the original
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    create_model("wrn16_1").load_state_dict(batch.backbone.state_dict())
    # the conv branch starts quiet but alive (a zero BatchNorm weight never trains)
    assert all(float(m.bn.weight.detach().abs().min()) > 0 for m in batch.metas)
    with pytest.raises(ValueError, match="backbone_norm"):
        EcoTTAModel(backbone, [1, 1, 2, 2], backbone_norm="running")


def test_calibration_gives_single_frames_the_statistics_the_meta_networks_produce():
    """Under batch statistics the meta outputs may change scale freely (the next backbone
    BatchNorm undoes it); the source running statistics then mispredict single frames until
    calibrate_batch_stat_norms measures them on clean images through the model."""
    import numpy as np
    from edgetta_export.warmup import calibrate_batch_stat_norms
    from edgetta_export.train import to_tensor
    torch.manual_seed(0)
    model = EcoTTAModel(create_model("wrn16_1"), [1, 1, 2, 2], backbone_norm="batch")
    with torch.no_grad():
        for m in model.metas:
            m.bn_meta.weight.mul_(4.0)
            m.bn_meta.bias.add_(1.0)
    images = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    x = to_tensor(images[:128], [0.5] * 3, [0.25] * 3)

    def gap() -> float:
        with torch.no_grad():
            return float((model.eval()(x) - model.train()(x)).abs().max())
    before = gap()
    stats = calibrate_batch_stat_norms(model, images, [0.5] * 3, [0.25] * 3, batches=2, batch=128)
    assert len(stats) == 2 * len(model.batch_stat_norms())
    assert gap() < 0.1 * before
