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
        # freshly initialised meta networks start as identity on source-like features
        _, trace = model.features(x)
    assert len(trace) == 4
    assert not any(p.requires_grad for p in backbone.parameters())
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
