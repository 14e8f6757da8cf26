"""torch.hub: every entrypoint from a local checkout, and list/help/load through the GitHub code path."""

import inspect
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import densenet_efficient as de

# The GitHub-path tests load a copy of this checkout while this checkout is imported: hubconf.py warns (tested below).
pytestmark = pytest.mark.filterwarnings("ignore:densenet_efficient is already imported:UserWarning")
ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = de.list_models()
ALIASES = sorted(set(de.list_models(include_aliases=True)) - set(ENTRYPOINTS))
CIFAR = {"densenet_40_k12", "densenet_bc_100_k12", "densenet_bc_250_k24", "densenet_bc_190_k40"}


@pytest.fixture
def github_hub(tmp_path, monkeypatch):
    """A hub dir holding this checkout as if torch.hub had downloaded 'owner/repo:ref' from GitHub."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    shutil.copytree(
        ROOT,
        tmp_path / "densenet-efficient_densenet_efficient_main",
        ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    return "densenet-efficient/densenet_efficient:main"


def test_hubconf_exposes_exactly_the_models(github_hub):
    assert ALIASES == [f"densenet{depth}_3d_efficient" for depth in (121, 169, 201, 264)]
    assert sorted(torch.hub.list(github_hub, trust_repo=True)) == sorted([*ENTRYPOINTS, *ALIASES, "cifar_densenet"])


@pytest.mark.parametrize(
    ("kwargs", "name", "block_config"),
    [
        (dict(depth=190, growth_rate=12), "densenet_bc_190_k12", (31, 31, 31)),
        (dict(depth=16, growth_rate=8, bottleneck=False), "densenet_16_k8", (4, 4, 4)),
    ],
)
def test_local_load_builds_any_cifar_depth(kwargs, name, block_config):
    """README says any CIFAR depth builds by name; torch.hub users get it through cifar_densenet."""
    model = torch.hub.load(str(ROOT), "cifar_densenet", source="local", efficient="max", num_classes=100, **kwargs)
    assert model.arch_name == name and model.config["block_config"] == block_config
    assert model.efficient == "max" and model.classifier.out_features == 100
    assert model.config == de.create_model(name, num_classes=100).config


def test_local_load_refuses_a_depth_no_network_has():
    with pytest.raises(ValueError, match=r"depth must be 6n\+4"):
        torch.hub.load(str(ROOT), "cifar_densenet", source="local", depth=101)


def test_alias_entrypoint_builds_the_renamed_model():
    model = torch.hub.load(str(ROOT), "densenet121_3d_efficient", source="local", num_classes=3)
    assert model.arch_name == "densenet121_3d" and model.spatial_dims == 3


def test_same_copy_loads_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.hub.load(str(ROOT), "densenet_40_k12", source="local")


def test_another_imported_copy_is_named_in_a_warning(github_hub, tmp_path):
    """torch.hub reuses the densenet_efficient already imported (this checkout), not the copy in the hub
    folder: hubconf.py says so, naming both."""
    other = tmp_path / "densenet-efficient_densenet_efficient_main"
    with pytest.warns(UserWarning, match="already imported from") as record:
        model = torch.hub.load(str(other), "densenet_40_k12", source="local")
    message = str(record[0].message)
    assert str(ROOT / "densenet_efficient") in message and str(other / "densenet_efficient") in message
    assert isinstance(model, de.DenseNet)


@pytest.mark.parametrize("name", ENTRYPOINTS)
def test_local_load_every_entrypoint(name):
    mode = [False, True, "max"][ENTRYPOINTS.index(name) % 3]
    model = torch.hub.load(str(ROOT), name, source="local", efficient=mode, num_classes=3)
    assert isinstance(model, de.DenseNet)
    assert model.efficient == mode
    assert model.features.denseblock1.denselayer1.efficient == mode
    assert model.classifier.out_features == 3
    assert model.config["stem"] == ("cifar" if name in CIFAR else "imagenet")


def test_entrypoint_signatures_take_weights_arguments():
    for name in ENTRYPOINTS:
        parameters = inspect.signature(getattr(de, name)).parameters
        assert {"pretrained", "weights", "efficient"} <= parameters.keys()
        assert parameters["efficient"].default is True
        assert parameters["pretrained"].default is False


def test_help_shows_arguments_and_memory_modes(github_hub):
    text = torch.hub.help(github_hub, "densenet121_efficient", trust_repo=True)
    assert text.startswith("DenseNet-121 for ImageNet")
    for word in ["pretrained", "weights", "efficient", '"max"', "num_classes"]:
        assert word in text


def test_github_path_load_trains(github_hub):
    model = torch.hub.load(github_hub, "densenet_bc_100_k12", trust_repo=True, efficient="max")
    assert model.efficient == "max"
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert model.features.conv0.weight.grad is not None


def test_local_load_unknown_entrypoint():
    with pytest.raises(RuntimeError, match="Cannot find callable resnet50 in hubconf"):
        torch.hub.load(str(ROOT), "resnet50", source="local")
