"""What the parts outside the dense layers store for backward, and what a dense layer's backward holds at once:
deterministic bytes on CPU (saved tensors, live tensor storage)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.core.efficient import bn_relu
from densenet_efficient.core.model import DenseLayer
from densenet_efficient.tools.memory import LiveTensorBytes, saved_tensor_bytes
from tests.model_helpers import gradient_penalty_step, with_running_stats

EFFICIENT_MODES = [True, "max"]
FLOAT = 4  # bytes


def imagenet_stem_network(mode):
    return de.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5, efficient=mode)


def saved_bytes(run, *held):
    """Bytes autograd saves inside ``run()``, not counting the storage of ``held`` (inputs, parameters, buffers:
    tensors that exist anyway)."""
    with saved_tensor_bytes(exclude=held) as saved:
        run()
    return saved.bytes


def model_tensors(model):
    return (*model.parameters(), *model.buffers())


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_stem_saves_statistics_and_one_byte_per_pooled_value(mode):
    """conv0-norm0-relu0-pool0: plain autograd saves conv0's output, the ReLU output and int64 pooling indices; the
    efficient modes the per-channel statistics and a uint8 window position per pooled value, nothing else."""
    model = imagenet_stem_network(mode)
    x = torch.randn(2, 3, 64, 64)
    stem = model.features[:4]
    assert list(dict(stem.named_children())) == ["conv0", "norm0", "relu0", "pool0"]
    pooled_values = 2 * 8 * 16 * 16  # 64 px -> 32 (conv0, stride 2) -> 16 (pool0)
    statistics = 2 * 8 * FLOAT  # batch mean and inverse std of 8 channels
    assert saved_bytes(lambda: stem(x), x, *model_tensors(model)) == statistics + pooled_values
    full = 2 * 8 * 32 * 32 * FLOAT  # conv0's output
    stem.efficient = False
    naive = saved_bytes(lambda: stem(x), x, *model_tensors(model))
    assert naive == statistics + 2 * full + pooled_values * 8


def test_stem_window_positions_are_narrow_in_3d():
    """A 3x3x3 pooling window has 27 positions: still one byte per pooled value."""
    model = de.DenseNet(
        growth_rate=4, block_config=(2,), num_init_features=4, num_classes=3, in_chans=1, spatial_dims=3
    )
    x = torch.randn(1, 1, 16, 16, 16)
    stem = model.features[:4]
    assert saved_bytes(lambda: stem(x), x, *model_tensors(model)) == 2 * 4 * FLOAT + 4 * 4**3


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_transition_saves_only_statistics(mode):
    """Nothing full-size for the pooling's backward: the pooled BN-ReLU output is recomputed."""
    model = imagenet_stem_network(mode)
    transition = model.features.transition1
    pieces = [torch.randn(2, 8, 16, 16, requires_grad=True), torch.randn(2, 8, 16, 16, requires_grad=True)]
    held = (*pieces, *model_tensors(model))
    assert saved_bytes(lambda: transition(pieces), *held) == 2 * 16 * FLOAT
    plain = copy.deepcopy(transition)
    plain.efficient = False
    # Plain: the concatenation, the ReLU output and the convolution's output (the pooling's input).
    assert saved_bytes(lambda: plain(pieces), *held) >= (2 + 0.5) * 2 * 16 * 16 * 16 * FLOAT


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_final_norm_and_relu_save_only_statistics(mode):
    """norm5 and relu5 on the last block's feature maps: plain autograd saves their concatenation and the ReLU
    output, the efficient modes the statistics."""
    norm = imagenet_stem_network(mode).features.norm5
    pieces = [torch.randn(2, channels, 4, 4, requires_grad=True) for channels in (8, 4, 4)]
    held = (*pieces, *model_tensors(norm))
    assert saved_bytes(lambda: bn_relu(pieces, norm, mode), *held) == 2 * 16 * FLOAT
    assert saved_bytes(lambda: bn_relu(pieces, norm, False), *held) == 2 * 16 * FLOAT + 2 * 2 * 16 * 4 * 4 * FLOAT


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_dense_layer_backward_never_holds_a_concatenation_wide_transient(mode):
    """Backward of a layer on 8 feature maps of 16 channels: besides the gradients it returns (each feature map's
    its own tensor), it holds at most 0.75 of the concatenation at once (0.56 now; plain autograd: the concatenation and
    more; before per-piece gradients the efficient modes held 2.25 concatenations)."""
    pieces = [torch.randn(4, 16, 16, 16, requires_grad=True) for _ in range(8)]
    concat = 4 * 128 * 16 * 16 * FLOAT
    layer = DenseLayer(128, 8, 4, 0.0, mode)
    out = layer(pieces)
    with LiveTensorBytes() as counter:
        out.backward(torch.ones_like(out))
    grads = sum(p.grad.nbytes for p in pieces) + sum(p.grad.nbytes for p in layer.parameters())
    assert counter.peak - grads <= 0.75 * concat
    # Each feature map's gradient is a tensor of its own, not a view of a concatenation-wide one.
    assert all(p.grad.untyped_storage().nbytes() == p.nbytes for p in pieces)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_features_only_stem_tap_matches_naive(mode):
    """The stem level (relu0's output) returned as a feature map while training: gradients flow into it too."""
    base = imagenet_stem_network(False)
    x = torch.randn(2, 3, 64, 64)
    results = []
    for efficient in (False, mode):
        model = copy.deepcopy(base).set_efficient(efficient)
        levels = model.forward_intermediates(x, intermediates_only=True)
        loss = sum(
            (level * torch.linspace(-1, 1, level.shape[1]).view(1, -1, 1, 1)).square().mean() for level in levels
        )
        loss.backward()
        results.append(([level.detach() for level in levels], {n: p.grad for n, p in model.named_parameters()}))
    for actual, expected in zip(results[1][0], results[0][0], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_hooks_on_the_stem_see_every_module(mode):
    """A forward hook on a stem module: the stem then runs module by module, so the hook is called."""
    model = imagenet_stem_network(mode)
    seen = []
    model.features.norm0.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    assert seen == [(2, 8, 32, 32)]


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_feature_maps_of_the_wrong_width_are_refused(mode):
    """The batch-norm kernels do not check the parameters' length: the efficient functions do."""
    norm = imagenet_stem_network(mode).features.norm5
    pieces = [torch.randn(2, 6, 4, 4, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    with pytest.raises(ValueError, match="6\\+4 = 10 channels.*normalises 16"):
        bn_relu(pieces, norm, mode)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_through_the_stem_matches_naive(mode, training):
    """A gradient penalty (create_graph=True) through the fused stem, transitions and final norm."""
    base = with_running_stats(imagenet_stem_network(False).double()).train(training)
    real, fake = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference = gradient_penalty_step(copy.deepcopy(base), real, fake)
    result = gradient_penalty_step(copy.deepcopy(base).set_efficient(mode), real, fake)
    torch.testing.assert_close(result[0], reference[0], rtol=1e-9, atol=1e-12)
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, rtol=1e-7, atol=1e-10, msg=name)
    for name, buffer in reference[2].items():
        torch.testing.assert_close(result[2][name], buffer, rtol=1e-9, atol=1e-12, msg=name)
