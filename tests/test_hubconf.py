"""torch.hub: every entrypoint from a local checkout, and list/help/load through the GitHub code path."""

import inspect
import shutil
from pathlib import Path

import pytest
import torch

import densenet_efficient as de

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = de.list_models()
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
    assert sorted(torch.hub.list(github_hub, trust_repo=True)) == ENTRYPOINTS


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
