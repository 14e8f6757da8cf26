"""The registry: names, factories, create_model, CIFAR depths."""

import re

import pytest
import torch
from test_model import PARAMETER_COUNTS, count_parameters

import densenet_efficient as de


def test_list_models_and_factories():
    names = de.list_models()
    assert names == sorted(names)
    for name in [
        "densenet_40_k12",
        "densenet_bc_100_k12",
        "densenet_bc_250_k24",
        "densenet_bc_190_k40",
        "densenet121_efficient",
        "densenet169_efficient",
        "densenet201_efficient",
        "densenet161_efficient",
        "densenet264_efficient",
    ]:
        assert name in names
        assert getattr(de, name).__name__ == name
    assert de.list_models("densenet_bc*") == ["densenet_bc_100_k12", "densenet_bc_190_k40", "densenet_bc_250_k24"]


def test_factory_and_create_model_build_the_same_network():
    torch.manual_seed(0)
    a = de.densenet_bc_100_k12(efficient="max", num_classes=100)
    torch.manual_seed(0)
    b = de.create_model("densenet_bc_100_k12", efficient="max", num_classes=100)
    assert a.efficient == b.efficient == "max"
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_cifar_densenet_depths():
    bc = de.cifar_densenet(100, growth_rate=12)
    assert count_parameters(bc) == PARAMETER_COUNTS["densenet_bc_100_k12", 10]
    plain = de.cifar_densenet(40, growth_rate=12, bottleneck=False)
    assert count_parameters(plain) == PARAMETER_COUNTS["densenet_40_k12", 10]
    assert [len(m) for n, m in de.cifar_densenet(250, 24).features.named_children() if "block" in n] == [41] * 3


@pytest.mark.parametrize(
    ("depth", "bottleneck", "message"),
    [
        (101, True, "DenseNet-BC depth must be 6n+4"),
        (4, True, "DenseNet-BC depth must be 6n+4"),
        (41, False, "DenseNet depth must be 3n+4"),
    ],
)
def test_invalid_depth(depth, bottleneck, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        de.cifar_densenet(depth, bottleneck=bottleneck)
    assert f"got {depth}" in str(error.value)


def test_depth_must_be_int():
    with pytest.raises(TypeError, match="depth must be an int"):
        de.cifar_densenet(100.0)


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"Unknown model 'densenet_bc_100_k13'\. Did you mean densenet_bc_100_k12"):
        de.create_model("densenet_bc_100_k13")
    with pytest.raises(ValueError, match="Available models: densenet121_3d_efficient, densenet121_efficient"):
        de.create_model("resnet50")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(growth_rate=0), ValueError, "growth_rate must be >= 1, got 0"),
        (dict(growth_rate=12.5), TypeError, "growth_rate must be an int"),
        (dict(block_config=()), TypeError, "block_config must be a non-empty sequence"),
        (dict(block_config=(6, 0)), ValueError, "block_config entries must be >= 1, got 0"),
        (dict(block_config="6,12"), TypeError, "block_config must be a non-empty sequence"),
        (dict(compression=0), ValueError, r"compression must be in \(0, 1\]"),
        (dict(compression=1.5), ValueError, r"compression must be in \[0.0, 1.0\]"),
        (dict(drop_rate=1.0), ValueError, r"drop_rate must be in \[0.0, 1.0\)"),
        (dict(bn_size=-1), ValueError, "bn_size must be >= 0"),
        (dict(num_classes=-1), ValueError, "num_classes must be >= 0"),
        (dict(in_chans=0), ValueError, "in_chans must be >= 1"),
        (dict(stem="tiny"), ValueError, "stem must be one of"),
        (dict(efficient="fast"), ValueError, "efficient='fast' is not a memory mode; valid values are False"),
        (dict(efficient=1), ValueError, "not a memory mode"),
    ],
)
def test_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        de.DenseNet(**kwargs)
