"""The models driven by the peers' own code: torchvision's BackboneWithFPN on ``model.features``, and
make_efficient on MONAI's and torchxrayvision's DenseNets (outputs, gradients, buffers, state-dict keys, bytes
saved for backward), each against the installed package."""

import copy

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.tools.memory import saved_tensor_bytes


def _train_step(model, x):
    out = model(x)
    (out * torch.arange(out.shape[1])).sum().backward()
    return out


def assert_converts_exactly(original, shape, mode):
    """make_efficient on a copy of ``original``: same keys, outputs, gradients and buffers after a training step,
    fewer bytes saved for backward; returns the converted model."""
    converted = de.make_efficient(copy.deepcopy(original), efficient=mode)
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with saved_tensor_bytes(exclude=tuple(converted.parameters())) as counter:
        out = _train_step(converted, x2)
    with saved_tensor_bytes(exclude=tuple(original.parameters())) as plain:
        expected = _train_step(original, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(original.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(original.named_buffers(), converted.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=name)
    assert counter.bytes < 0.8 * plain.bytes
    return converted


@pytest.mark.parametrize("mode", [True, "max"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_make_efficient_converts_monai_densenet(spatial_dims, mode):
    nets = pytest.importorskip("monai.networks.nets")
    original = nets.DenseNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=3,
        init_features=8,
        growth_rate=4,
        block_config=(3, 3),
        bn_size=2,
    )
    converted = assert_converts_exactly(original, (2, 1) + (32 if spatial_dims == 2 else 16,) * spatial_dims, mode)
    layers = [m for m in converted.modules() if isinstance(m, de.core.model.DenseLayer)]
    assert len(layers) == 6 and all(layer.efficient == mode for layer in layers)


@pytest.mark.parametrize("mode", [True, "max"])
def test_make_efficient_converts_torchxrayvision_densenet(mode):
    xrv = pytest.importorskip("torchxrayvision")
    original = xrv.models.DenseNet(growth_rate=4, block_config=(3, 3), num_init_features=8, num_classes=3)
    assert_converts_exactly(original, (2, 1, 32, 32), mode)


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_make_efficient_converts_monai_densenet121(spatial_dims):
    nets = pytest.importorskip("monai.networks.nets")
    original = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    assert_converts_exactly(original, (2, 1) + (32,) * spatial_dims, True)


def test_make_efficient_leaves_what_it_cannot_compute():
    """MONAI's channel dropout and an activation the function does not compute (GELU; PReLU and the others of
    docs/efficient-path.md are converted: tests/test_norms_acts.py) are left as they are."""
    nets = pytest.importorskip("monai.networks.nets")
    args = dict(spatial_dims=2, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2,))
    with pytest.raises(ValueError, match="has no dense layer to convert"):
        de.make_efficient(nets.DenseNet(**args, dropout_prob=0.2))
    with pytest.raises(ValueError, match="has no dense layer to convert"):
        de.make_efficient(nets.DenseNet(**args, act="gelu"))


@pytest.mark.parametrize("mode", de.MEMORY_MODES)
def test_backbone_with_fpn_on_model_features(mode):
    """torchvision's BackboneWithFPN over model.features gives what it gives over torchvision's DenseNet."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    reference = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8)
    model = de.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, efficient=mode)
    model.load_state_dict(reference.state_dict())
    return_layers = {"denseblock1": "0", "denseblock2": "1", "denseblock3": "2"}
    channels = model.feature_info.channels()[1:-1] + [model.num_features]
    torch.manual_seed(1)
    ours = BackboneWithFPN(model.features, return_layers, channels, out_channels=8)
    torch.manual_seed(1)
    theirs = BackboneWithFPN(reference.features, return_layers, channels, out_channels=8)
    x = torch.randn(2, 3, 64, 64)
    out, expected = ours(x), theirs(x)
    assert list(out) == list(expected)
    for name in out:
        torch.testing.assert_close(out[name], expected[name], msg=name)
    sum(o.sum() for o in out.values()).backward()
    sum(o.sum() for o in expected.values()).backward()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_blocks_and_layers_take_what_torchvisions_take():
    """A tensor or a list into a layer (new features out) and into a block (the concatenation out)."""
    model = de.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8).eval()
    block, layer = model.features.denseblock1, model.features.denseblock1.denselayer1
    x = torch.randn(3, 8, 8, 8)
    assert layer(x).shape == layer([x[:, :3], x[:, 3:]]).shape == (3, 4, 8, 8)
    torch.testing.assert_close(layer(x), layer([x[:, :3], x[:, 3:]]))
    out = block(x)
    assert out.shape == (3, 16, 8, 8)
    torch.testing.assert_close(out[:, :8], x)
    torch.testing.assert_close(block([x]), out)


@pytest.mark.parametrize("mode", de.MEMORY_MODES)
def test_forward_hooks_on_a_block_see_its_concatenation(mode):
    """A forward hook on features.denseblockN fires once per forward with the block's concatenated output, as on
    torchvision's DenseNet, and changes nothing else."""
    model = de.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, efficient=mode).train()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    seen = []
    model.features.denseblock1.register_forward_hook(lambda module, inputs, output: seen.append(output))
    out = model(x)
    out.sum().backward()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    assert seen[0].shape == (2, model.feature_info.channels()[1], 16, 16)
    torch.testing.assert_close(out, expected)


@pytest.mark.slow
def test_make_efficient_monai_densenet121_channels_last_sums_in_plain_autograds_order():
    """Channels-last maps: a per-piece batch-norm gradient laid out otherwise than its input summed in another
    order than plain autograd (norm0's weight gradient, a sum that cancels to 2e-5, was 5 % off)."""
    nets = pytest.importorskip("monai.networks.nets")
    original = nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=2).to(memory_format=torch.channels_last)
    converted = de.make_efficient(copy.deepcopy(original), efficient=True)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for model in (original, converted):
        _train_step(model, x)
    for (name, p), q in zip(original.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)
