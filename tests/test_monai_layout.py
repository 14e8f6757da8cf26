"""densenet_efficient.core.monai_layout: a MONAI DenseNet's state dict converted to this layout gives MONAI's
logits."""

import pytest
import torch

from densenet_efficient.core import monai_layout as convert_monai
from tests.model_helpers import monai_densenet

nets = pytest.importorskip("monai.networks.nets")


def test_keys_and_architecture_read_from_the_state_dict():
    state = monai_densenet().state_dict()
    assert "features.denseblock1.denselayer1.layers.norm1.weight" in state
    assert "class_layers.out.weight" in state
    converted = convert_monai.convert_state_dict(state)
    assert "features.denseblock1.denselayer1.norm1.weight" in converted and "classifier.bias" in converted
    assert convert_monai.model_args(state) == {
        "growth_rate": 4,
        "block_config": (2, 3),
        "num_init_features": 8,
        "bn_size": 2,
        "compression": 0.5,
        "num_classes": 3,
        "in_chans": 2,
        "stem": "imagenet",
        "spatial_dims": 3,
    }
    with torch.device("meta"):
        full = nets.DenseNet169(spatial_dims=3, in_channels=1, out_channels=2).state_dict()
    assert convert_monai.registered_name(convert_monai.model_args(full)) == "densenet169_3d"


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("mode", [False, True, "max"])
def test_converted_model_gives_monai_logits(spatial_dims, mode):
    monai = monai_densenet(spatial_dims)
    model = convert_monai.from_monai(monai, "densenet121_3d", efficient=mode)
    assert model.config["spatial_dims"] == spatial_dims and model.config["block_config"] == (2, 3)
    x = torch.randn((2, 2) + (16,) * spatial_dims)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), monai(x), rtol=0, atol=1e-6)
