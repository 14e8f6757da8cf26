"""Instance norm, group norm and MONAI's activations on the memory-efficient path: the same training as plain
autograd (logits, every gradient, PReLU and norm weights included, running buffers), the same saved bytes as batch
norm's accounting, MONAI's own spellings and models."""

import copy

import pytest
import torch
from torch import nn

import densenet_efficient as de
from densenet_efficient.core import functional
from densenet_efficient.core.efficient import bn_relu
from densenet_efficient.core.monai_layout import convert_state_dict, from_monai, monai_densenet
from tests.model_helpers import EFFICIENT_MODES, SMALL_MONAI, assert_same_training
from tests.test_memory_parts import FLOAT, model_tensors, saved_bytes

NORMS = {
    "instance": "instance",
    "instance affine tracking": ("instance", {"affine": True, "track_running_stats": True}),
    "group": ("group", {"num_groups": 2}),
    "batch": "batch",
}
ACTS = {"relu": "relu", "prelu": "prelu", "leakyrelu": ("leakyrelu", {"negative_slope": 0.1}), "elu": "elu"}
ACTS["swish"] = "swish"


def tiny(norm, act, spatial_dims=2, **kwargs):
    torch.manual_seed(0)
    model = de.DenseNet(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=8,
        bn_size=2,
        num_classes=3,
        in_chans=2,
        spatial_dims=spatial_dims,
        norm=norm,
        act=act,
        **kwargs,
    )
    for module in model.modules():  # non-trivial affine parameters
        if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)) and module.affine:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
        if isinstance(module, nn.PReLU):
            nn.init.uniform_(module.weight, 0.1, 0.4)
    return model


def batch(spatial_dims=2, n=2, side=16):
    torch.manual_seed(1)
    return torch.randn(n, 2, *(side,) * spatial_dims), torch.randint(0, 3, (n,))


def calls(monkeypatch):
    counted = []
    original = functional._BnReluConvChain.apply
    monkeypatch.setattr(functional._BnReluConvChain, "apply", lambda *a: counted.append(a[0]) or original(*a))
    return counted


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("norm", list(NORMS))
def test_norms_and_activations_train_as_plain_autograd(norm, act, mode, monkeypatch):
    counted = calls(monkeypatch)
    assert_same_training(tiny(NORMS[norm], ACTS[act]), *batch(), mode, rtol=2e-5)
    # every dense layer, transition and the final norm ran the function (3 steps x 6 calls; and the stem's norm
    # and activation where they are not batch norm and ReLU, which the stem's own function computes)
    assert len(counted) == (18 if norm == "batch" and act == "relu" else 21)
    assert all(
        stage.act[0] == ("leaky_relu" if act == "leakyrelu" else act.replace("swish", "silu"))
        for c in counted
        for stage in c
    )


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("spatial_dims", [1, 3])
@pytest.mark.parametrize("norm", ["instance affine tracking", "group"])
def test_signals_and_volumes(norm, spatial_dims, mode):
    base = tiny(NORMS[norm], "prelu", spatial_dims)
    assert_same_training(base, *batch(spatial_dims, side=32 if spatial_dims == 1 else 16), mode, rtol=2e-5)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_float64_per_tensor_gradients_and_eval_mode_instance_norm(mode):
    """Per tensor, in float64: every PReLU, GroupNorm and InstanceNorm weight; and a tracking instance norm in
    eval mode (running statistics read) with gradients on."""
    base = tiny(("group", {"num_groups": 4}), "prelu").double()
    inputs, targets = batch()
    assert_same_training(base, inputs.double(), targets, mode, rtol=1e-9, per_tensor_gradients=True)
    tracking = tiny(NORMS["instance affine tracking"], ("leakyrelu", {"negative_slope": 0.2})).double()
    with torch.no_grad():
        tracking(inputs.double() * 2 + 1)  # running statistics away from 0 and 1
    assert_same_training(tracking.eval(), inputs.double(), targets, mode, rtol=1e-9, per_tensor_gradients=True)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("norm", ["instance affine tracking", "batch"])
def test_per_channel_prelu_weights_over_runs_of_pieces(norm, mode):
    """A per-channel PReLU after norm1 of a layer whose input is several runs of pieces: each run's channels."""
    base = tiny(NORMS[norm], "relu").double()
    layer = base.features.denseblock1.denselayer2
    layer.relu1 = nn.PReLU(layer.conv1.in_channels).double()
    nn.init.uniform_(layer.relu1.weight, 0.1, 0.4)
    inputs, targets = batch()
    assert_same_training(base, inputs.double(), targets, mode, rtol=1e-9, per_tensor_gradients=True)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_double_backward_matches_plain(mode):
    base = tiny(("group", {"num_groups": 2}), "elu").double()
    x = batch()[0].double().requires_grad_()
    results = []
    for efficient in (False, mode):
        model = copy.deepcopy(base).set_efficient(efficient)
        (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        grad.square().sum().backward()
        results.append([p.grad for p in model.parameters()])
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize(("norm", "statistics"), [("instance", 2 * 2 * 16), ("group", 2 * 2 * 4), ("batch", 2 * 16)])
def test_final_norm_saves_only_its_statistics(norm, statistics, mode):
    """Per-sample norms save per-(sample, channel) or per-(sample, group) mean and rstd, batch norm per channel;
    plain autograd the concatenation and more. A PReLU adds nothing (its weight is the model's)."""
    spec = ("group", {"num_groups": 4}) if norm == "group" else norm
    model = tiny(spec, "prelu")
    norm5, act = model.features.norm5, model.features.relu5
    pieces = [torch.randn(2, channels, 4, 4, requires_grad=True) for channels in (8, 4, 4)]
    held = (*pieces, *model_tensors(model))
    assert saved_bytes(lambda: bn_relu(pieces, norm5, mode, act=act), *held) == statistics * FLOAT
    assert saved_bytes(lambda: bn_relu(pieces, norm5, False, act=act), *held) >= 2 * 2 * 16 * 4 * 4 * FLOAT


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_dense_layer_saves_what_batch_norm_saves_but_statistics(mode):
    """A dense layer with instance norm saves, besides the input maps, what the batch-norm layer saves, with
    per-(sample, channel) statistics instead of per-channel ones."""
    pieces = [torch.randn(2, 8, 8, 8, requires_grad=True)]  # the first layer reads the stem's 8 channels
    saved = {}
    for norm in ("batch", "instance"):
        model = tiny(norm, "relu").set_efficient(mode)
        layer = model.features.denseblock1.denselayer1
        saved[norm] = saved_bytes(lambda layer=layer: layer(pieces), *pieces, *model_tensors(model))
    bottleneck = 2 * 8 * 8 * 8 * FLOAT if mode is True else 0  # 2 samples, bn_size * k = 8 channels
    assert saved["batch"] == bottleneck + 2 * (8 + 8) * FLOAT
    assert saved["instance"] == bottleneck + 2 * 2 * (8 + 8) * FLOAT


def test_autocast_runs_the_plain_modules_for_other_norms(monkeypatch):
    """Autocast picks per-operator dtypes for group and instance norm that the function does not repeat: those
    stages run their plain modules, with efficient=False's results; batch norm with ReLU keeps the function."""
    counted = calls(monkeypatch)
    x, y = batch()
    results = []
    for mode in (False, True):
        model = tiny(("group", {"num_groups": 2}), "prelu").set_efficient(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    assert not counted
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny("batch", "relu")(x).sum().backward()
    assert counted


def test_spellings_classes_and_modules_build_the_same_network():
    x = batch()[0]
    reference = tiny(("group", {"num_groups": 2}), ("leakyrelu", {"negative_slope": 0.1})).eval()
    for norm, act in [
        (("GROUP", {"num_groups": 2}), ("LeakyReLU", {"negative_slope": 0.1})),
        (("group", {"num_groups": 2}), nn.LeakyReLU(0.1)),
    ]:
        torch.testing.assert_close(tiny(norm, act).eval()(x), reference(x), rtol=0, atol=0)
    assert isinstance(tiny(nn.BatchNorm2d, nn.SiLU).features.denseblock1.denselayer1.relu1, nn.SiLU)
    with pytest.raises(ValueError, match="layer.*batch, instance, group"):
        tiny("layer", "relu")
    with pytest.raises(ValueError, match="num_groups"):
        tiny("group", "relu")
    with pytest.raises(ValueError, match="act=.*relu, leakyrelu, prelu"):
        tiny("batch", "gelu")


def test_one_value_per_sample_runs_the_plain_modules():
    """Instance norm of a 1x1 map in training raises in plain autograd: the same error, no buffer touched."""
    model = tiny(NORMS["instance affine tracking"], "relu", spatial_dims=1)
    layer = model.features.denseblock2.denselayer1
    x = torch.randn(2, layer.conv1.in_channels, 1)
    buffers = [b.clone() for b in layer.buffers()]
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        layer(x)
    assert all(torch.equal(a, b) for a, b in zip(buffers, layer.buffers(), strict=True))


monai_nets = pytest.importorskip("monai.networks.nets")
MONAI_CASES = [
    ("instance", "prelu"),
    (("group", {"num_groups": 4}), ("leakyrelu", {"negative_slope": 0.1})),
    ("batch", "elu"),
    ("instance", "swish"),
]


def small_monai(norm, act, spatial_dims=3):
    torch.manual_seed(3)
    return monai_nets.DenseNet(spatial_dims=spatial_dims, norm=norm, act=act, **SMALL_MONAI)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize(("norm", "act"), MONAI_CASES)
def test_make_efficient_converts_monai_networks_with_their_norms_and_activations(norm, act, mode, monkeypatch):
    monai = small_monai(norm, act)
    x, y = batch(3)
    converted = de.make_efficient(copy.deepcopy(monai), mode)
    assert converted.state_dict().keys() == monai.state_dict().keys()
    counted = calls(monkeypatch)
    results = []
    for model in (monai, converted):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(counted) == 7  # 5 dense layers, the transition, the stem's norm and activation
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("norm", "act"), MONAI_CASES)
def test_monai_style_constructor_gives_monai_outputs_with_monai_weights(norm, act):
    monai = small_monai(norm, act, spatial_dims=2).eval()
    ours = monai_densenet(spatial_dims=2, norm=norm, act=act, **SMALL_MONAI)
    ours.load_state_dict(convert_state_dict(monai.state_dict()))
    x = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), monai(x), rtol=0, atol=1e-5)
        # from_monai reads the norm and activation from MONAI's modules
        converted = from_monai(monai, "densenet121_3d").eval()
        torch.testing.assert_close(converted(x), monai(x), rtol=0, atol=1e-5)


# MONAI's tests/test_densenet.py: densenet121/169/201/264 in 3D, 2D and 1D, shapes checked (batch 16 there).
MONAI_TEST_CASES = [
    ({"pretrained": False, "spatial_dims": 3, "in_channels": 2, "out_channels": 3}, (32, 64, 48)),
    ({"pretrained": False, "spatial_dims": 2, "in_channels": 2, "out_channels": 3}, (32, 64)),
    ({"pretrained": False, "spatial_dims": 1, "in_channels": 2, "out_channels": 3}, (32,)),
]


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [(6, 12, 24, 16), (6, 12, 32, 32), (6, 12, 48, 32), (6, 12, 64, 48)])
@pytest.mark.parametrize(("args", "size"), MONAI_TEST_CASES)
def test_monai_test_densenet_cases(args, size, blocks):
    net = monai_densenet(**args, block_config=blocks)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 2, *size)).shape == (2, 3)


@pytest.mark.parametrize("kwargs", [{"norm": "instance"}, {"act": nn.SiLU}])
def test_save_pretrained_refuses_norms_and_acts_it_cannot_reload(tmp_path, kwargs):
    from densenet_efficient import save_pretrained

    model = de.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3, stem="cifar", **kwargs)
    assert set(kwargs) <= set(model.config)
    with pytest.raises(ValueError, match="cannot be saved"):
        save_pretrained(model, tmp_path / "set", architecture="densenet_bc_100_k12")
    assert not (tmp_path / "set").exists()
