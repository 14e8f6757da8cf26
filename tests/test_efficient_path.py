"""Which stages the memory-efficient function computes, and the plain-module fallback for the others.

Every case is checked against ``efficient=False`` (plain modules, the reference): outputs, gradients, batch-norm
buffers and hook calls, and, where the function must still run, the bytes saved for backward.
"""

import copy
import functools
import types
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize, prune

import densenet_efficient as de
from densenet_efficient.tools.memory import saved_tensor_bytes
from tests.model_helpers import assert_same_training

LAYER = "features.denseblock2.denselayer1"  # the layer each case modifies
MODES = [True, pytest.param("max", marks=pytest.mark.slow)]


def tiny(mode=False):
    """DenseNet-BC depth 16, growth 4: three blocks of two bottleneck layers."""
    torch.manual_seed(0)
    return de.cifar_densenet(16, growth_rate=4, efficient=mode)


def batch():
    return torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))


def fallback_warnings(caught):
    return [str(w.message) for w in caught if "memory saving is lost" in str(w.message)]


def saved_bytes(model, x):
    with saved_tensor_bytes(exclude=tuple(model.parameters()) + tuple(model.buffers())) as counter:
        model(x).sum().backward()
    return counter.bytes


class StandardisedConv2d(nn.Conv2d):
    """Weight standardisation: a convolution with its own forward."""

    def forward(self, x):
        weight = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight / (weight.std((1, 2, 3), keepdim=True) + 1e-5), self.bias)


def _bias_conv(layer):
    layer.conv1 = nn.Conv2d(layer.conv1.in_channels, layer.conv1.out_channels, 1, bias=True)
    nn.init.uniform_(layer.conv1.bias, -1, 1)


def _reflect_conv(layer):
    conv = layer.conv2
    layer.conv2 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False, padding_mode="reflect")


def _same_padding_conv(layer):
    conv = layer.conv2
    layer.conv2 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding="same", bias=False)


def _standardised_conv(layer):
    conv = layer.conv2
    layer.conv2 = StandardisedConv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False)


def _response_norm(layer):  # GroupNorm and InstanceNorm are computed (tests/test_norms_acts.py)
    layer.norm1 = nn.LocalResponseNorm(2)


def _gelu(layer):
    layer.relu2 = nn.GELU()


def _non_affine_norm(layer):
    layer.norm2 = nn.BatchNorm2d(layer.norm2.num_features, affine=False)


def _spectral_norm(layer):
    nn.utils.spectral_norm(layer.conv1)


def _weight_norm(layer):
    nn.utils.weight_norm(layer.conv2)


def _prune(layer):
    prune.l1_unstructured(layer.conv1, "weight", amount=0.5)


def _output_hook(layer):
    layer.conv1.register_forward_hook(lambda module, inputs, output: output * 2)


def _pre_hook(layer):
    layer.norm1.register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,))


def _instance_forward(layer):
    conv = layer.conv1
    conv.forward = types.MethodType(lambda self, x: nn.Conv2d.forward(self, x) * 2, conv)


def _instance_partial_forward(layer):  # accelerate's hooks replace forward with a functools.partial
    norm = layer.norm2
    norm.forward = functools.partial(lambda module, x: nn.BatchNorm2d.forward(module, x + 1), norm)


FALLBACKS = {
    "bias": (_bias_conv, "has a bias"),
    "reflect padding": (_reflect_conv, "padding_mode='reflect'"),
    "same padding": (_same_padding_conv, "padding='same'"),
    "own forward": (_standardised_conv, "StandardisedConv2d, not a Conv1d/2d/3d"),
    "LocalResponseNorm": (_response_norm, "LocalResponseNorm, not a batch norm"),
    "GELU": (_gelu, "GELU, not a supported activation"),
    "affine=False": (_non_affine_norm, "without affine weight"),
    "spectral_norm": (_spectral_norm, "has hooks"),
    "weight_norm": (_weight_norm, "has hooks"),
    "prune": (_prune, "has hooks"),
    "forward hook": (_output_hook, "has hooks"),
    "forward pre-hook": (_pre_hook, "has hooks"),
    "forward set on the instance": (_instance_forward, "own forward set on the instance"),
    "partial forward on the instance": (_instance_partial_forward, "own forward set on the instance"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(FALLBACKS))
def test_a_stage_the_function_would_get_wrong_runs_the_plain_modules(case, mode):
    modify, reason = FALLBACKS[case]

    def make():  # built anew: weight_norm's modules cannot be deep-copied
        model = tiny()
        modify(model.get_submodule(LAYER))
        return model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_training(make, *batch(), mode)  # three steps: spectral_norm's second one included
    messages = fallback_warnings(caught)
    assert len(messages) == 1, messages  # once, not per step
    assert messages[0].startswith(LAYER) and reason in messages[0]
    assert f"so {LAYER} runs its plain modules" in messages[0]


@pytest.mark.parametrize("mode", MODES)
def test_hooks_on_norm_and_conv_fire_as_in_plain_autograd(mode):
    def counted(efficient):
        model = tiny(efficient)
        layer = model.get_submodule(LAYER)
        calls = {"forward": 0, "pre": 0, "backward": 0}

        def count(kind):
            def hook(*args):
                calls[kind] += 1

            return hook

        for module in (layer.norm1, layer.conv1):
            module.register_forward_hook(count("forward"))
            module.register_forward_pre_hook(count("pre"))
            module.register_full_backward_hook(count("backward"))
        x, _ = batch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                model(x.requires_grad_()).sum().backward()
        return calls

    expected = counted(False)
    assert expected == {"forward": 4, "pre": 4, "backward": 4}
    assert counted(mode) == expected


@pytest.mark.parametrize("mode", MODES)
def test_global_module_hooks_see_every_module(mode):
    def count_calls(efficient):
        model = tiny(efficient)
        seen = []
        handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: seen.append(module))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(batch()[0]).sum().backward()
        finally:
            handle.remove()
        return len(seen), fallback_warnings(caught)

    expected, none = count_calls(False)
    calls, messages = count_calls(mode)
    assert calls == expected and not none
    assert messages and all("global module hooks" in message for message in messages)
    # Without the global hook, the efficient path runs again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny(mode)(batch()[0]).sum().backward()


def _tracked_step(model, x, tracker):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker:
            model(x).sum().backward()
    return fallback_warnings(caught)


@pytest.mark.parametrize("mode", MODES)
def test_torch_memory_tracker_sees_the_saving(mode):
    """torch's MemTracker registers global module hooks that only observe: the efficient path runs under it,
    and the peak it reports is the efficient one (bytes it tracks are deterministic)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def peak(efficient):
        model, tracker = tiny(efficient), MemTracker()
        tracker.track_external(model)
        assert not _tracked_step(model, torch.randn(8, 3, 16, 16), tracker)
        (per_device,) = tracker.get_tracker_snapshot("peak").values()
        return per_device["Total"]

    ratio = peak(mode) / peak(False)
    assert ratio < {True: 0.6, "max": 0.45}[mode], ratio


@pytest.mark.parametrize("mode", MODES)
def test_module_trackers_see_the_layers_and_the_efficient_path(mode):
    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.utils.flop_counter import FlopCounterMode

    model, x = tiny(mode), batch()[0]
    with saved_tensor_bytes(exclude=tuple(model.parameters()) + tuple(model.buffers())) as untracked:
        model(x).sum().backward()
    tracker = ModTracker()
    parents = set()
    tracker.register_user_hooks(pre_fw_hook=lambda module, inputs: parents.update(tracker.parents))
    with saved_tensor_bytes(exclude=tuple(model.parameters()) + tuple(model.buffers())) as tracked:
        assert not _tracked_step(model, x, tracker)
    assert tracked.bytes == untracked.bytes  # the same bytes saved for backward: the efficient path ran
    assert any(name.endswith(LAYER) for name in parents)  # the dense layers are still seen
    counter = FlopCounterMode(display=False)
    assert not _tracked_step(model, x, counter)
    naive = _flops(tiny(False), x)
    # FlopCounterMode counts what ran: True recomputes no convolution, "max" the bottleneck's in backward.
    assert counter.get_total_flops() == naive if mode is True else counter.get_total_flops() > naive


def _flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", MODES)
def test_quantization_aware_training_runs_its_observers(mode):
    from torch.ao import quantization

    base = tiny()
    base.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    quantization.prepare_qat(base, inplace=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_training(base, *batch(), mode)  # observers' buffers included
    assert fallback_warnings(caught)


@pytest.mark.parametrize("mode", MODES)
def test_parametrize_stays_on_the_efficient_path(mode):
    class Scale(nn.Module):
        def forward(self, weight):
            return 0.5 * weight

    base = tiny()
    for layer in base.modules():
        if isinstance(layer, de.core.model.DenseLayer):
            parametrize.register_parametrization(layer.conv1, "weight", Scale())
    x = batch()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_training(base, *batch(), mode)
        efficient_bytes = saved_bytes(copy.deepcopy(base).set_efficient(mode), x)
    assert efficient_bytes < 0.6 * saved_bytes(copy.deepcopy(base), x)


def _frozen(norm):
    frozen = torchvision.ops.FrozenBatchNorm2d(norm.num_features, eps=norm.eps)
    frozen.weight.uniform_(0.5, 1.5)
    frozen.bias.uniform_(-0.2, 0.2)
    frozen.running_mean.uniform_(-0.5, 0.5)
    frozen.running_var.uniform_(0.5, 1.5)
    return frozen


def _freeze_dense_norms(model):
    """Every norm of the dense layers and transitions a torchvision FrozenBatchNorm2d, as detection models do."""
    for module in model.modules():
        if isinstance(module, (de.core.model.DenseLayer, de.core.model.Transition)):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, name, _frozen(child))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_frozen_batch_norm_in_a_training_model_keeps_the_savings(mode):
    base = _freeze_dense_norms(tiny()).train()
    x = batch()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_training(base, *batch(), mode, rtol=1e-4)
        efficient_bytes = saved_bytes(copy.deepcopy(base).set_efficient(mode), x)
    # Plain autograd stores less with frozen norms (not their inputs); the function stores what it stores with
    # training batch norms, or less.
    assert efficient_bytes < {True: 0.8, "max": 0.4}[mode] * saved_bytes(copy.deepcopy(base), x)
    assert efficient_bytes <= saved_bytes(tiny(mode).train(), x)


@pytest.mark.parametrize("mode", MODES)
def test_eval_mode_batch_norms_in_a_training_model_keep_the_savings(mode):
    base = tiny().train()
    for module in base.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    x = batch()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_training(base, *batch(), mode)
        efficient_bytes = saved_bytes(copy.deepcopy(base).set_efficient(mode), x)
    assert efficient_bytes < 0.6 * saved_bytes(copy.deepcopy(base), x)


def _imagenet_stem(mode=False, spatial_dims=2):
    torch.manual_seed(0)
    sizes = {"growth_rate": 4, "block_config": (2, 2), "num_init_features": 8, "num_classes": 5}
    return de.DenseNet(**sizes, efficient=mode, spatial_dims=spatial_dims)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("module", ["relu0", "pool0", "relu5"])
def test_a_forward_set_on_a_fused_module_runs_it(module, mode):
    """The stem (conv0, norm0, relu0, pool0) and the final norm and ReLU run as one function only when each module
    computes what its class does: a forward replaced on the instance is called, as in efficient=False."""

    def make():
        model = _imagenet_stem()
        target = model.features.get_submodule(module)
        target.forward = types.MethodType(lambda self, x: type(self).forward(self, x) * 0.5, target)
        return model

    x, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    assert not torch.allclose(make()(x), _imagenet_stem()(x))  # the replaced forward changes the output
    assert_same_training(make, x, targets, mode)


SMALL_BATCHES = {  # spatial dims -> an input whose last block sees one value per channel
    1: torch.randn(1, 3, 8),
    2: torch.randn(1, 3, 8, 8),
    3: torch.randn(1, 3, 8, 8, 8),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_one_value_per_channel_raises_as_plain_autograd_and_keeps_the_buffers(spatial_dims, mode):
    """Batch 1 with a 1-pixel map in the last block: efficient=False raises batch norm's ValueError; the efficient
    modes raise it too, and write no NaN into running_var (every buffer as plain autograd leaves it)."""
    x = SMALL_BATCHES[spatial_dims]

    def step(efficient):
        model = _imagenet_stem(efficient, spatial_dims)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            model(x).sum().backward()
        return dict(model.named_buffers())

    expected = step(False)
    for name, buffer in step(mode).items():
        assert not buffer.isnan().any(), name
        torch.testing.assert_close(buffer, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_an_empty_batch_trains_as_in_plain_autograd(spatial_dims, mode):
    x = SMALL_BATCHES[spatial_dims].new_empty((0, *SMALL_BATCHES[spatial_dims].shape[1:]))

    def step(efficient):
        model = _imagenet_stem(efficient, spatial_dims)
        output = model(x)
        output.sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        return output, grads, dict(model.named_buffers())

    expected, actual = step(False), step(mode)
    assert actual[0].shape == expected[0].shape == (0, 5)
    torch.testing.assert_close(actual[1:], expected[1:], rtol=0, atol=0)


def test_the_stems_normalisation_of_one_value_raises_inside_the_function():
    """The stem's batch norm sees the convolution's output, not the input the path was chosen on: a 2x2 image
    at batch 1 is one value per channel after the stride-2 convolution, and the function raises as the module."""
    from densenet_efficient.core.efficient import conv_bn_relu_max_pool

    for mode in (False, True):
        torch.manual_seed(0)
        conv, norm = nn.Conv2d(3, 4, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(4)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            conv_bn_relu_max_pool(torch.randn(1, 3, 2, 2), conv, norm, nn.MaxPool2d(3, 2, 1), mode)
        assert torch.equal(norm.running_var, torch.ones(4)) and int(norm.num_batches_tracked) == 1


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_ad_runs_the_plain_modules(mode):
    from torch.autograd import forward_ad

    x, tangent = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def jvp(efficient):
        model = tiny(efficient)
        with forward_ad.dual_level():
            output = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent)))
        return output.primal, output.tangent, dict(model.named_buffers())

    expected, actual = jvp(False), jvp(mode)
    torch.testing.assert_close(actual[:2], expected[:2], rtol=0, atol=0)
    torch.testing.assert_close(actual[2], expected[2], rtol=0, atol=0)
