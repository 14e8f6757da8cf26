"""1D and 3D DenseNets: layers per dimension, exactness of the efficient modes, input checks, and the 3D
architectures against the installed MONAI's DenseNet121/169/201/264."""

import pytest
import torch
from torch import nn

import densenet_efficient as de
from densenet_efficient.tools.memory import saved_tensor_bytes
from tests.model_helpers import EFFICIENT_MODES, assert_same_training, count_parameters

LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d),
}
SIDE = {1: 32, 3: 8}  # small inputs that still reach the last block


def tiny(spatial_dims, stem="cifar", **kwargs):
    """Bottleneck layers, compression, two blocks; 1 input channel, 3 classes."""
    args = dict(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=8,
        bn_size=2,
        num_classes=3,
        in_chans=1,
        stem=stem,
        spatial_dims=spatial_dims,
    )
    return de.DenseNet(**{**args, **kwargs})


def batch(spatial_dims, side=None, dtype=torch.float32):
    torch.manual_seed(0)
    side = side or SIDE[spatial_dims]
    return torch.randn((4, 1) + (side,) * spatial_dims, dtype=dtype), torch.randint(0, 3, (4,))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_layers_config_and_shapes_follow_spatial_dims(spatial_dims):
    model = tiny(spatial_dims, stem="imagenet")
    conv, norm, pool = LAYERS[spatial_dims]
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert convs and all(type(m) is conv for m in convs)
    assert norms and all(type(m) is norm for m in norms)
    assert type(model.features.pool0) is pool
    assert model.config["spatial_dims"] == spatial_dims
    assert de.DenseNet(**model.config).config == model.config
    assert model.pretrained_cfg["input_size"] == (1,) + ({1: 224, 2: 224, 3: 96}[spatial_dims],) * spatial_dims
    x = torch.randn((2, 1) + (32,) * spatial_dims)
    features = model.forward_features(x)
    # stem /4, one transition /2: 32 -> 4 on every spatial axis
    assert features.shape == (2, model.num_features) + (4,) * spatial_dims
    assert model(x).shape == (2, 3)


def test_default_is_2d_and_spatial_dims_is_checked():
    assert de.DenseNet(block_config=(1,), num_init_features=4, growth_rate=2).config["spatial_dims"] == 2
    for bad in (0, 4, True, 2.0):
        with pytest.raises(
            ValueError,
            match=rf"spatial_dims must be 1, 2 or 3 \(signals, images, volumes\), "
            rf"got {bad!r}",
        ):
            tiny(bad)


@pytest.mark.parametrize(("spatial_dims", "axes"), [(1, "L"), (3, "D, H, W")])
def test_input_checks_name_the_axes(spatial_dims, axes):
    model = tiny(spatial_dims, stem="imagenet")
    assert model.min_input_size == 5
    with pytest.raises(ValueError, match=rf"expected input of shape \(N, 1, {axes}\), got \(2, 1, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match=rf"expected a Tensor of shape \(N, 1, {axes}\), got list"):
        model([1.0])
    small = (2, 1) + (8,) * (spatial_dims - 1) + (4,)
    with pytest.raises(ValueError, match=rf"too small: this network needs every side \({axes}\) of at least 5"):
        model(torch.randn(small))
    model(torch.randn((2, 1) + (5,) * spatial_dims))


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_outputs_gradients_and_buffers_match_naive(spatial_dims, stem, mode):
    side = SIDE[spatial_dims] * (2 if stem == "imagenet" else 1)
    assert_same_training(tiny(spatial_dims, stem, efficient=False), *batch(spatial_dims, side), mode)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_float64_every_gradient_matches_naive(spatial_dims, mode):
    base = tiny(spatial_dims, efficient=False, drop_rate=0.0).double()
    inputs, targets = batch(spatial_dims, dtype=torch.float64)
    assert_same_training(base, inputs, targets, mode, rtol=1e-9, per_tensor_gradients=True)


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_gradcheck_float64(spatial_dims):
    """Against finite differences, for the input and every parameter (gradcheck's fast mode: random projections
    of the full Jacobian, which the full mode would take minutes to build in 3D on CPU)."""
    model = de.DenseNet(
        growth_rate=2,
        block_config=(2, 1),
        num_init_features=2,
        bn_size=2,
        num_classes=3,
        in_chans=1,
        stem="cifar",
        spatial_dims=spatial_dims,
    ).double()
    names = [name for name, _ in model.named_parameters()]

    def logits(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))

    x = torch.randn((3, 1) + ({1: 4, 3: 2}[spatial_dims],) * spatial_dims, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    for mode in EFFICIENT_MODES:
        model.set_efficient(mode)
        assert torch.autograd.gradcheck(logits, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_efficient_modes_save_less_for_backward(spatial_dims):
    """Bytes autograd saves for backward (parameters excluded): naive > True > max, in 1D and 3D alike."""
    inputs, _ = batch(spatial_dims, side=16 if spatial_dims == 3 else 256)
    saved = {}
    for mode in (False, True, "max"):
        model = tiny(spatial_dims, efficient=mode, block_config=(6, 6))
        with saved_tensor_bytes(exclude=tuple(model.parameters())) as counter:
            model(inputs)
        saved[mode] = counter.bytes
    assert saved[False] > 2 * saved[True] > 2 * saved["max"]


# --------------------------------------------------------------------------------------------- MONAI's DenseNets

# Parameters of MONAI's DenseNet<N>(spatial_dims=3, in_channels=1, out_channels=2), MONAI 1.6.1.
MONAI_3D_PARAMETERS = {121: 11_244_674, 169: 18_546_050, 201: 25_334_658, 264: 40_251_266}


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(MONAI_3D_PARAMETERS))
def test_3d_architectures_have_the_parameters_of_monai(depth):
    nets = pytest.importorskip("monai.networks.nets")
    name = f"densenet{depth}_3d"
    with torch.device("meta"):
        model = de.create_model(name)
        assert count_parameters(model) == MONAI_3D_PARAMETERS[depth]
        assert model.config["spatial_dims"] == 3 and model.in_chans == 1 and model.config["num_classes"] == 2
        for spatial_dims, in_channels, out_channels in [(3, 1, 2), (3, 4, 7), (2, 3, 1000), (1, 2, 5)]:
            monai = getattr(nets, f"DenseNet{depth}")(
                spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels
            )
            ours = de.create_model(name, spatial_dims=spatial_dims, in_chans=in_channels, num_classes=out_channels)
            assert count_parameters(ours) == count_parameters(monai), (spatial_dims, in_channels, out_channels)
            # the same tensors under the same names, up to MONAI's "layers." and "class_layers.out"
            renamed = {
                key.replace(".layers.", ".").replace("class_layers.out", "classifier"): tuple(value.shape)
                for key, value in monai.state_dict().items()
            }
            assert renamed == {key: tuple(value.shape) for key, value in ours.state_dict().items()}


@pytest.mark.slow
def test_3d_densenet121_trains_like_monai_in_every_mode():
    """DenseNet-121 3D holding MONAI's DenseNet121 weights: in every mode a training step on 1x32^3 volumes gives
    MONAI's loss, gradients and BatchNorm running statistics."""
    nets = pytest.importorskip("monai.networks.nets")
    from densenet_efficient.core.monai_layout import convert_state_dict

    torch.manual_seed(0)
    monai = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    weights = {key: value.clone() for key, value in convert_state_dict(monai.state_dict()).items()}
    x, target = torch.randn(2, 1, 32, 32, 32), torch.tensor([0, 1])
    expected_loss = nn.functional.cross_entropy(monai(x), target)
    expected_loss.backward()
    expected = convert_state_dict({name: p.grad for name, p in monai.named_parameters()})
    expected_state = convert_state_dict(monai.state_dict())
    for mode in (False, True, "max"):
        model = de.densenet121_3d(efficient=mode)
        model.load_state_dict(weights)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-5, msg=f"{mode}: {name}")
        for name, b in model.named_buffers():
            torch.testing.assert_close(b, expected_state[name], rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
