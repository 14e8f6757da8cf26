"""The registry: names, factories, create_model, CIFAR depths."""

import re

import pytest
import torch

import densenet_efficient as de
from densenet_efficient import core, models
from densenet_efficient.core import registry
from densenet_efficient.tools import cli
from tests.model_helpers import PARAMETER_COUNTS, count_parameters


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
    with pytest.raises(ValueError, match=r"Unknown model 'densenet121_efficent'\. Did you mean densenet121_efficient"):
        de.create_model("densenet121_efficent")
    with pytest.raises(ValueError, match="Available models: densenet121_3d, densenet121_efficient") as error:
        de.create_model("resnet50")
    assert "densenet_bc_<depth>_k<growth>" in str(error.value)


@pytest.mark.parametrize("typed", ["densenet121", "DenseNet161", "densenet201.tv_in1k"])
def test_torchvision_and_timm_names_suggest_ours_first(typed):
    """What torchvision and timm users type is suggested first, not built: registered with timm, this package's
    names must leave timm's own densenet121 alone."""
    ours = typed.split(".")[0].lower() + "_efficient"
    with pytest.raises(ValueError, match=rf"Unknown model '{typed.split('.')[0]}'\. Did you mean {ours}[,?]"):
        de.create_model(typed)
    assert not de.is_model(typed.split(".")[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(growth_rate=0), ValueError, "growth_rate must be >= 1, got 0"),
        (dict(growth_rate=12.5), TypeError, "growth_rate must be an int"),
        (dict(block_config=()), TypeError, "block_config must be a non-empty sequence"),
        (dict(block_config=(6, 0)), ValueError, "block_config entries must be >= 1, got 0"),
        (dict(block_config="6,12"), TypeError, "block_config must be a non-empty sequence"),
        (dict(compression=0), ValueError, r"compression must be in \(0, 1\]"),
        (dict(compression=1.5), ValueError, r"compression must be in \(0, 1\], got 1.5"),
        (dict(drop_rate=1.0), ValueError, r"drop_rate must be in \[0, 1\), got 1.0"),
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


def test_create_model_calls_the_registered_factory(monkeypatch):
    """create_model runs the factory's body (timm's shape), forwarding pretrained, weights and the rest."""
    calls = []
    original = registry._ENTRYPOINTS["densenet_40_k12"]

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setitem(registry._ENTRYPOINTS, "densenet_40_k12", spy)
    model = de.create_model("densenet_40_k12", num_classes=3, features_only=True, out_indices=(1,), cache_dir="c")
    assert isinstance(model, de.DenseNetFeatures) and model.out_indices == (1,)
    assert calls == [
        dict(
            pretrained=False,
            weights=None,
            cache_dir="c",
            features_only=True,
            out_indices=(1,),
            num_classes=3,
        )
    ]


def test_registering_a_name_twice_raises():
    def densenet_bc_100_k12(**kwargs):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="'densenet_bc_100_k12' is already registered"):
        de.register_model(densenet_bc_100_k12)
    assert de.create_model("densenet_bc_100_k12").arch_name == "densenet_bc_100_k12"

    def densenet121_3d_efficient(**kwargs):  # an alias's name is taken too
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        de.register_model(densenet121_3d_efficient)


def test_registered_model_and_factory_docstring():
    @de.register_model
    def densenet_test_tiny(pretrained=False, weights=None, **kwargs):
        """A tiny test network."""
        return models._create("densenet_test_tiny", dict(block_config=(1,)), pretrained, weights, **kwargs)

    try:
        assert "densenet_test_tiny" in de.list_models()
        model = de.create_model("densenet_test_tiny", num_classes=2)
        assert model.arch_name == "densenet_test_tiny" and model.config["block_config"] == (1,)
        assert "efficient: memory mode" in densenet_test_tiny.__doc__
    finally:
        del registry._ENTRYPOINTS["densenet_test_tiny"]


@pytest.mark.parametrize(
    ("name", "depth", "growth_rate", "bottleneck"),
    [("densenet_bc_1000_k12", 1000, 12, True), ("densenet_bc_28_k4", 28, 4, True), ("densenet_22_k6", 22, 6, False)],
)
def test_any_cifar_depth_by_name(name, depth, growth_rate, bottleneck):
    with torch.device("meta"):
        model = de.create_model(name, num_classes=3)
        expected = de.cifar_densenet(depth, growth_rate, bottleneck=bottleneck, num_classes=3)
    assert model.arch_name == expected.arch_name == name
    assert model.config == expected.config
    assert de.is_model(name) and name not in de.list_models()


@pytest.mark.parametrize(
    "name", ["densenet_bc_101_k12", "densenet_bc_0100_k12", "densenet_bc_100_k0", "densenet_41_k12"]
)
def test_invalid_cifar_names_are_refused(name):
    with pytest.raises(ValueError, match="depth must be|Unknown model"):
        de.create_model(name)
    assert not de.is_model(name)


def test_generated_name_is_the_registered_one_when_it_exists():
    assert de.cifar_densenet(100, 12).arch_name == "densenet_bc_100_k12"
    assert de.cifar_densenet(40, 12, bottleneck=False).config == de.densenet_40_k12().config


def test_3d_aliases_build_the_same_model():
    assert de.list_models("*_3d") == ["densenet121_3d", "densenet169_3d", "densenet201_3d", "densenet264_3d"]
    assert not de.list_models("*_3d_efficient")
    assert de.list_models("*_3d_efficient", include_aliases=True) == [
        f"densenet{n}_3d_efficient" for n in (121, 169, 201, 264)
    ]
    torch.manual_seed(0)
    old = de.create_model("densenet121_3d_efficient", num_classes=3)
    torch.manual_seed(0)
    new = de.densenet121_3d(num_classes=3)
    assert old.arch_name == new.arch_name == "densenet121_3d"
    assert old.config == new.config
    for (key, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert de.densenet121_3d_efficient is de.densenet121_3d


def test_exports_are_the_registry():
    """The package's model names are exactly the registry's, with the aliases: the factories of models.py, which
    the core does not export (it knows nothing of weights)."""
    names = set(de.list_models(include_aliases=True))
    assert {n for n in dir(de) if n.startswith("densenet")} == names
    assert {n for n in de.__all__ if n.startswith("densenet")} == names
    assert all(getattr(de, name) is getattr(models, name.replace("_3d_efficient", "_3d")) for name in names)
    assert not {n for n in core.__all__ if n.startswith("densenet")}


def test_architecture_of_every_name():
    assert registry.architecture("densenet121_3d_efficient") == registry.architecture("densenet121_3d")
    assert registry.architecture("densenet_bc_190_k12")["block_config"] == (31, 31, 31)
    assert registry.architecture("densenet121_efficient")["block_config"] == (6, 12, 24, 16)


def test_any_cifar_depth_saved_loads_again_by_its_name(tmp_path):
    """A network built by cifar_densenet is saved under its arch_name, and create_model loads it by that name."""
    model = de.cifar_densenet(190, 12, num_classes=3)
    assert model.arch_name == "densenet_bc_190_k12"
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    de.save_pretrained(model, tmp_path)
    loaded = de.create_model(model.arch_name, weights=tmp_path)
    assert loaded.arch_name == model.arch_name and loaded.config == model.config
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


COMMANDS_WITH_A_MODEL = [["bench", "--model"], ["plan", "--memory", "1GB", "--model"], ["train", "--model"], ["eval"]]


@pytest.mark.parametrize("command", COMMANDS_WITH_A_MODEL)
def test_every_command_accepts_any_cifar_depth(command):
    args = cli.build_parser().parse_args([*command, "densenet_bc_28_k4"])
    assert args.model == "densenet_bc_28_k4"


@pytest.mark.parametrize("name", ["densenet_bc_29_k4", "densenet_bc_100_k12x"])
def test_every_command_refuses_what_create_model_refuses(name, capsys):
    with pytest.raises(ValueError) as refused:
        de.create_model(name)
    for command in COMMANDS_WITH_A_MODEL:
        with pytest.raises(SystemExit) as exit_:
            cli.build_parser().parse_args([*command, name])
        assert exit_.value.code == 2
        assert str(refused.value) in capsys.readouterr().err


def test_factories_and_generated_names_take_any_densenet_argument():
    assert de.densenet_bc_100_k12(growth_rate=4, block_config=(1, 1, 1)).config["growth_rate"] == 4
    model = de.create_model("densenet_bc_28_k4", growth_rate=2, num_classes=3)
    assert model.arch_name == "densenet_bc_28_k4" and model.config["growth_rate"] == 2


def test_weights_saved_under_an_alias_load_by_the_new_name(tmp_path):
    small = dict(block_config=(1, 1), growth_rate=4, num_init_features=8)
    model = de.create_model("densenet121_3d_efficient", **small)
    de.save_pretrained(model, tmp_path, architecture="densenet121_3d_efficient")  # as saved before the rename
    loaded = de.create_model("densenet121_3d", weights=tmp_path)
    assert loaded.arch_name == "densenet121_3d" and loaded.config == model.config
