"""timm's model interface on every architecture, the features_only backbone, register_with_timm against the
installed timm, and make_efficient on torchvision's and timm's DenseNets."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.tools.memory import saved_tensor_bytes

SMALL = dict(block_config=(2, 2, 2), growth_rate=4, num_init_features=8)


def small(name: str, **kwargs):
    return de.create_model(name, **{**SMALL, **kwargs})


def image(model, batch: int = 2):
    """A random input of the model's rank: images, or volumes/signals for 3D/1D networks."""
    size = 32 if model.config["stem"] == "cifar" or model.spatial_dims == 3 else 64
    return torch.randn(batch, model.in_chans, *(size,) * model.spatial_dims)


@pytest.mark.parametrize("name", de.list_models())
def test_interface_attributes_and_head(name):
    model = small(name).eval()
    x = image(model)
    assert model.num_classes == model.config["num_classes"] == model.pretrained_cfg["num_classes"]
    assert model.head_hidden_size == model.num_features == model.features.norm5.num_features
    assert model.default_cfg is model.pretrained_cfg and model.global_pool == "avg"
    state = model.state_dict()
    assert model.pretrained_cfg["first_conv"] + ".weight" in state
    assert model.pretrained_cfg["classifier"] + ".weight" in state
    features = model.forward_features(x)
    final = model.feature_info[-1]
    assert features.shape == (2, model.num_features, *(side // final["reduction"] for side in x.shape[2:]))
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    torch.testing.assert_close(model(x), features)
    model.reset_classifier(5, "max")
    assert model(x).shape == (2, 5) and model.config["global_pool"] == "max"


def test_global_pool_values_and_errors():
    x = torch.randn(2, 3, 32, 32)
    model = small("densenet_40_k12", num_classes=0, global_pool="avgmax").eval()
    features = model.forward_features(x)
    expected = 0.5 * (features.mean((2, 3)) + features.amax((2, 3)))
    torch.testing.assert_close(model(x), expected)
    assert small("densenet_40_k12", num_classes=0, global_pool="").eval()(x).shape == features.shape
    for bad in ("mean", None):  # None: the constructor's own check, not an AttributeError later
        with pytest.raises(ValueError, match=rf"global_pool.*one of.*'avgmax'.*{bad!r}"):
            small("densenet_40_k12", global_pool=bad)
    with pytest.raises(ValueError, match="global_pool=''.*num_classes=0.*num_classes=10"):
        small("densenet_40_k12", global_pool="")
    assert small("densenet_40_k12").config["global_pool"] == "avg"


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax", "catavgmax", "fast", "fastcatavgmax"])
def test_global_pool_matches_timms_densenet121_with_the_same_weights(global_pool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("densenet121", global_pool=global_pool, num_classes=7).eval()
    model = de.create_model("densenet121_efficient", global_pool=global_pool, num_classes=7).eval()
    model.load_state_dict(reference.state_dict())  # strict: the classifier reads the same pooled width
    assert model.head_hidden_size == reference.get_classifier().in_features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True).flatten(1),
            reference.forward_head(reference.forward_features(x), pre_logits=True).flatten(1),
        )
    model.reset_classifier(3, global_pool)
    assert model.classifier.in_features == model.head_hidden_size and model(x).shape == (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "reductions"), [("densenet121_efficient", [2, 4, 8, 16, 32]), ("densenet_bc_100_k12", [1, 1, 2, 4])]
)
def test_forward_intermediates_follow_feature_info(name, reductions):
    model = de.create_model(name, **{**SMALL, "block_config": (2,) * len(reductions[1:])}).eval()
    x = image(model)
    assert model.feature_info.reduction() == reductions
    final, levels = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    for info, level in zip(model.feature_info, levels, strict=True):
        assert level.shape == (
            2,
            info["num_chs"],
            64 // info["reduction"] if x.shape[2] == 64 else 32 // info["reduction"],
            x.shape[3] // info["reduction"],
        )
    only = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
    torch.testing.assert_close(only, [levels[0], levels[-2]])
    _, last_two = model.forward_intermediates(x, indices=2, stop_early=True)
    torch.testing.assert_close(last_two, levels[-2:])
    with pytest.raises(ValueError, match=f"feature index 9.*out of range.*0 to {len(reductions) - 1}"):
        model.forward_intermediates(x, indices=[9])
    with pytest.raises(ValueError, match="output_fmt.*'NCHW'.*'NHWC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers():
    model = small("densenet121_efficient", block_config=(2, 2, 2, 2)).eval()
    x = image(model)
    levels = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert model.num_features == model.head_hidden_size == model.feature_info[2]["num_chs"]
    assert model.num_classes == 0 and "features.norm5.weight" not in model.state_dict()
    torch.testing.assert_close(model.forward_intermediates(x, indices=[1, 2], intermediates_only=True), levels[1:3])
    with pytest.raises(ValueError, match="level 4.*pruned.*0 to 2"):
        model.forward_intermediates(x, indices=[4])


@pytest.mark.parametrize("name", ["densenet121_efficient", "densenet_bc_100_k12"])
def test_features_only_backbone(name):
    model = de.create_model(name, **SMALL)
    backbone = de.create_model(name, features_only=True, out_indices=(1, -1), **SMALL)
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("classifier")})
    model.eval(), backbone.eval()
    x = image(model)
    levels = model.forward_intermediates(x, intermediates_only=True)
    outputs = backbone(x)
    assert backbone.feature_info.channels() == [o.shape[1] for o in outputs]
    assert backbone.feature_info.reduction() == [
        model.feature_info[1]["reduction"],
        model.feature_info[-1]["reduction"],
    ]
    torch.testing.assert_close(outputs, [levels[1], levels[-1]])
    assert backbone.pretrained_cfg == model.pretrained_cfg
    with pytest.raises(ValueError, match="out_indices.*features_only=True"):
        de.create_model(name, out_indices=(1,))


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_features_only_backbone_keeps_memory_savings(stem):
    saved = {}
    for mode in de.MEMORY_MODES:
        torch.manual_seed(0)
        backbone = de.create_model(
            "densenet121_efficient",
            features_only=True,
            stem=stem,
            efficient=mode,
            block_config=(3, 3, 3),
            growth_rate=8,
            num_init_features=16,
        )
        x = torch.randn(2, 3, 32, 32)
        with saved_tensor_bytes(exclude=tuple(backbone.parameters())) as counter:
            outputs = backbone(x)
        sum(o.mean() for o in outputs).backward()
        saved[mode] = counter.bytes
    assert saved["max"] < saved[True] < 0.6 * saved[False]


@pytest.mark.parametrize("mode", de.MEMORY_MODES)
def test_grad_checkpointing_on_never_raises_memory(mode):
    """timm's --grad-checkpointing (set_grad_checkpointing(True)) keeps a recomputing mode; on plain autograd it
    turns the efficient mode on. Bytes saved for backward, one training forward."""
    from densenet_efficient.tools.memory import saved_tensor_bytes

    def saved(model):
        with saved_tensor_bytes(exclude=tuple(model.parameters())) as counter:
            model(torch.randn(2, 3, 64, 64))
        return counter.bytes

    model = small("densenet121_efficient", block_config=(2, 2, 2, 2)).train().set_efficient(mode)
    before = saved(model)
    model.set_grad_checkpointing(True)
    after = saved(model)
    assert model.efficient == (mode or True)
    assert after == before if mode else after < 0.7 * before


def test_grad_checkpointing_and_group_matcher():
    model = small("densenet121_efficient", block_config=(2, 2, 2, 2))
    model.set_grad_checkpointing(False)
    assert model.efficient is False and model.features.denseblock1.denselayer1.efficient is False
    model.set_grad_checkpointing()
    assert model.efficient is True and model.features.transition1.efficient is True
    matcher = model.group_matcher()
    names = [name for name, _ in model.named_parameters()]
    assert [n for n in names if re.match(matcher["stem"], n)] == [
        "features.conv0.weight",
        "features.norm0.weight",
        "features.norm0.bias",
    ]
    coarse = model.group_matcher(coarse=True)["blocks"]
    assert {re.match(coarse, n)[1] for n in names if re.match(coarse, n)} == {"1", "2", "3", "4"}


# ----------------------------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm():
    timm = pytest.importorskip("timm")
    assert "densenet121_efficient" in de.register_with_timm()
    return timm


def test_timm_create_model_and_data_config(timm):
    model = timm.create_model("densenet_bc_100_k12", num_classes=3, efficient="max", block_config=(1, 1, 1))
    assert isinstance(model, de.DenseNet) and model.efficient == "max" and model.num_classes == 3
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    transform = timm.data.create_transform(**config)
    from PIL import Image

    assert transform(Image.new("RGB", (40, 48))).shape == (3, 32, 32)
    imagenet = timm.create_model(
        "densenet121_efficient", pretrained_cfg_overlay={"crop_pct": 0.9}, block_config=(1, 1, 1, 1)
    )
    assert timm.data.resolve_data_config({}, model=imagenet)["input_size"] == (3, 224, 224)
    assert imagenet.pretrained_cfg["crop_pct"] == 0.9
    assert "densenet121_efficient" in timm.list_models("densenet*_efficient")


def test_timm_features_only_and_optimizer(timm):
    backbone = timm.create_model(
        "densenet121_efficient", features_only=True, out_indices=(2, 3), block_config=(1, 1, 1, 1)
    ).eval()
    outputs = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.feature_info.channels() == [o.shape[1] for o in outputs]
    assert [64 // o.shape[-1] for o in outputs] == backbone.feature_info.reduction() == [8, 16]
    with pytest.raises(ValueError, match="feature_cls='hook'.*not supported"):
        timm.create_model("densenet121_efficient", features_only=True, feature_cls="hook")
    model = timm.create_model("densenet121_efficient", block_config=(1, 1, 1, 1))
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) >= 4 and scales[-1] == 1.0


# ----------------------------------------------------------------------------------------------- make_efficient


def _train_step(model, x):
    out = model(x)
    (out * torch.arange(out.shape[1])).sum().backward()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", de.MEMORY_MODES)
@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_make_efficient_matches_the_original(library, mode):
    if library == "torchvision":
        import torchvision

        original = torchvision.models.DenseNet(
            growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=5
        )
    else:
        timm = pytest.importorskip("timm")
        original = timm.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_classes=5)
    converted = de.make_efficient(copy.deepcopy(original), efficient=mode)
    assert list(converted.state_dict()) == list(original.state_dict())
    layers = [m for m in converted.modules() if isinstance(m, de.core.model.DenseLayer)]
    assert len(layers) == 6 and all(layer.efficient == mode for layer in layers)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with saved_tensor_bytes(exclude=tuple(converted.parameters())) as counter:
        out = _train_step(converted, x2)
    torch.testing.assert_close(out, _train_step(original, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(original.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b), c in zip(original.named_buffers(), converted.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=name)
    if mode:
        with saved_tensor_bytes(exclude=tuple(original.parameters())) as plain:
            _train_step(original, x)
        assert counter.bytes < plain.bytes


def test_make_efficient_rejects_a_model_without_dense_layers():
    with pytest.raises(ValueError, match="Sequential.*no dense layer"):
        de.make_efficient(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="'yes'.*valid.*False.*True.*'max'"):
        de.make_efficient(torch.nn.Sequential(), efficient="yes")
