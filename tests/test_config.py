"""The one N-dimensional description of a model's input (``densenet_efficient.core.config``): timm's keys, a
``pool_size`` that the network really gives, 3D models saved and loaded again, transforms for volumes, and the
configuration refusals (NaN statistics, deep nesting, foreign architectures, sizes beyond the bounds)."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.core.config import CIFAR10, PRETRAINED_CFG_KEYS, InputCfg, check_pretrained_cfg, min_input_side
from tests.weights_helpers import randomise_batch_norm, small_model

SMALL = dict(block_config=(1, 1, 1), growth_rate=4, num_init_features=8)


def edit_config(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_keys_are_timms():
    timm = pytest.importorskip("timm")
    assert set(PRETRAINED_CFG_KEYS) == {field.name for field in dataclasses.fields(timm.models.PretrainedCfg)}


def test_one_input_type_behind_the_model_the_manifest_and_config_json(tmp_path):
    """Issue 22: InputCfg is what a model expects; model.pretrained_cfg, manifest entries and config.json hold it."""
    model = small_model()
    inputs = InputCfg.from_dict(model.pretrained_cfg)
    assert inputs == dataclasses.replace(CIFAR10, interpolation="bicubic")
    assert model.pretrained_cfg.items() >= inputs.to_dict().items()
    names = tuple(f"c{i}" for i in range(10))
    de.save_pretrained(model, tmp_path, label_names=list(names), crop_pct=0.9)
    loaded = InputCfg.from_dict(de.create_model("densenet_40_k12", weights=str(tmp_path)).pretrained_cfg)
    assert loaded == dataclasses.replace(inputs, label_names=names, crop_pct=0.9)
    gray = loaded.adapt(1, 5)  # one channel (the channel average), other classes (no names)
    assert gray.input_size == (1, 32, 32) and gray.mean == (sum(CIFAR10.mean) / 3,) and gray.label_names is None
    entry = de.get_pretrained_cfg("densenet121_efficient.ra_in1k")
    assert InputCfg.from_dict(entry.model_cfg()) == entry.input and entry.input.test_input_size == (3, 288, 288)
    with pytest.raises(ValueError, match="no input_size"):
        InputCfg.from_dict({"mean": (0.5,)})


@pytest.mark.parametrize("name", ["densenet_40_k12", "densenet121_efficient", "densenet121_3d"])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_pool_size_and_min_input_size_are_what_the_network_gives(name, spatial_dims):
    model = de.create_model(name, spatial_dims=spatial_dims, in_chans=2, **SMALL).eval()
    cfg = model.pretrained_cfg
    assert len(cfg["input_size"]) == 1 + spatial_dims and cfg["input_size"][0] == 2 == len(cfg["mean"])
    side = cfg["input_size"][1] if spatial_dims != 3 else 40  # a smaller volume: same rule, less work
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 2, *(side,) * spatial_dims))
        expected = model.pretrained_cfg["pool_size"] if spatial_dims != 3 else None
        if expected is not None:
            assert features.shape[2:] == expected
        smallest = model.forward_features(torch.randn(1, 2, *cfg["min_input_size"][1:]))
    assert smallest.shape[2:] == (1,) * spatial_dims
    assert cfg["min_input_size"][1] == model.min_input_size


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
@pytest.mark.parametrize("num_blocks", [1, 2, 4, 6])
def test_min_input_side_closed_form(stem, num_blocks):
    model = de.DenseNet(growth_rate=2, block_config=(1,) * num_blocks, num_init_features=4, stem=stem)
    assert min_input_side(stem, num_blocks) == model.min_input_size


def test_a_3d_model_saved_with_its_volume_size_loads_again(tmp_path):
    """Issue 15: a 3D model saved with the documented input_size=[1, 96, 96, 96] raised InvalidConfigError."""
    model = randomise_batch_norm(de.create_model("densenet121_3d", **SMALL)).eval()
    de.save_pretrained(model, tmp_path, input_size=[1, 96, 96, 96], tag="ct")
    loaded = de.create_model("densenet121_3d", weights=str(tmp_path)).eval()
    assert loaded.pretrained_cfg["input_size"] == (1, 96, 96, 96) and loaded.pretrained_cfg["tag"] == "ct"
    assert loaded.pretrained_cfg["pool_size"] == (6, 6, 6)  # three blocks: 96 / 4 / 4
    volume = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(volume), model(volume), rtol=0, atol=0)


def test_transforms_of_a_3d_model_resize_and_normalise_volumes():
    """Issue 15: de.transforms of a 3D model raised 'too many values to unpack'."""
    model = de.create_model("densenet121_3d", **SMALL)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 16, 20, 24), "mean": (0.5,), "std": (2.0,)}
    preprocess = de.transforms(model)
    volume = torch.rand(1, 8, 10, 12)
    out = preprocess(volume)
    assert out.shape == (1, 16, 20, 24) and out.dtype == torch.float32
    resized = torch.nn.functional.interpolate(volume[None], size=(16, 20, 24), mode="trilinear")[0]
    torch.testing.assert_close(out, (resized - 0.5) / 2.0)
    assert model.eval()(out[None]).shape == (1, 2)
    with pytest.raises(ValueError, match=r"\(1, D, H, W\).*\(3, 8, 10, 12\)"):
        preprocess(torch.rand(3, 8, 10, 12))
    with pytest.raises(ValueError, match="training=True.*3 spatial.*MONAI"):
        de.transforms(model, training=True)


def test_transforms_of_a_signal_model_crop_the_centre():
    model = de.create_model("densenet_40_k12", spatial_dims=1, **SMALL)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 10), "crop_pct": 0.5, "interpolation": "nearest"}
    signal = torch.arange(60.0).reshape(3, 20)
    out = de.transforms(model)(signal)
    mean, std = torch.tensor(model.pretrained_cfg["mean"])[:, None], torch.tensor(model.pretrained_cfg["std"])[:, None]
    torch.testing.assert_close(out, (signal[:, 5:15] - mean) / std)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"mean": [float("nan"), 0.5, 0.5]}, "mean.*finite.*nan"),
        ({"std": [0.5, float("inf"), 0.5]}, "std.*finite.*inf"),
        ({"input_size": [3, 32, 32], "mean": [0.5, 0.5]}, r"mean.*one value per input channel \(3\).*\(0.5, 0.5\)"),
        ({"input_size": [3, 2, 2, 2, 2]}, r"input_size.*1 to 3 sizes.*\(3, 2, 2, 2, 2\)"),
        ({"input_size": [3, 10**6, 32]}, r"input_size.*65536 per side.*\(3, 1000000, 32\)"),
        ({"input_size": [1, 96, 96, 96], "test_input_size": [1, 96, 96]}, "test_input_size.*2 spatial sizes, not 3"),
        ({"input_size": [1, 96, 96, 96], "interpolation": "bicubic"}, "interpolation.*'trilinear'.*'bicubic'"),
        ({"input_size": [3, 32, 32], "pool_size": [8]}, r"pool_size.*2 positive.*\(8,\)"),
        ({"crop_pct": float("nan")}, r"crop_pct.*\(0, 1\].*nan"),
        ({"color": "red"}, r"unknown.*'color'.*valid.*\burl\b.*\bmean\b"),
        ({"label_names": ["cat", 3]}, "label_names.*list of strings"),
        ({"num_classes": -1}, "num_classes.*integer up to 1000000.*-1"),
    ],
)
def test_check_pretrained_cfg_refuses_with_the_key_and_what_is_valid(cfg, message):
    with pytest.raises(ValueError, match=message):
        check_pretrained_cfg(cfg)


# ---------------------------------------------------------------------------------------------------------------
# config.json refusals (issue 17, section 3)


@pytest.fixture
def saved(tmp_path):
    de.save_pretrained(small_model(), tmp_path)
    return tmp_path / "config.json"


def test_nan_mean_in_a_config_is_refused(saved):
    """json.loads reads NaN; it used to become model.pretrained_cfg['mean'] and NaN inputs."""
    edit_config(saved, lambda c: c["pretrained_cfg"].update(mean=[float("nan"), 0.5, 0.5]))
    with pytest.raises(de.InvalidConfigError, match=f"{saved}.*mean.*finite.*nan"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))


@pytest.mark.parametrize("depth", [9, 100_000])
def test_deeply_nested_config_is_refused(saved, depth):
    """100000 levels raised a raw RecursionError from json."""
    config = json.loads(saved.read_text())
    saved.write_text(json.dumps(config)[:-1] + ', "model_args_extra": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(de.InvalidConfigError, match="nested too deeply.*at most 8"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))


def test_config_naming_a_foreign_architecture_is_refused(saved):
    """A timm config.json for resnet50 beside DenseNet weights loaded as if it were this model's."""
    edit_config(saved, lambda c: (c.pop("format"), c.pop("weights_sha256"), c.update(architecture="resnet50")))
    with pytest.raises(
        de.InvalidConfigError,
        match=r"'resnet50'.*not an architecture.*valid: .*densenet_40_k12.*densenet121\b",
    ):
        de.create_model("densenet_40_k12", weights=str(saved.parent))
    edit_config(saved, lambda c: c.update(format="densenet_efficient", architecture="densenet121"))
    with pytest.raises(de.InvalidConfigError, match="'densenet121'.*not an architecture.*valid: (?!.*densenet121\\b)"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))


def test_a_config_without_the_marker_is_timms_even_with_weights_sha256(saved):
    """No format marker: timm's format, whatever else it holds (the never-released 0.1, which wrote none, is not
    read as this package's)."""
    edit_config(saved, lambda c: c.pop("format"))
    with pytest.raises(de.InvalidConfigError, match=r"unknown keys.*'weights_sha256'.*timm's"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))


def test_unknown_format_marker_is_refused(saved):
    edit_config(saved, lambda c: c.update(format="keras"))
    with pytest.raises(de.InvalidConfigError, match="unknown format 'keras'.*'densenet_efficient'"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))


def test_config_without_the_marker_is_read_as_timms(saved):
    """No marker: timm's format, whose keys are timm's."""
    edit_config(saved, lambda c: (c.pop("format"), c.pop("weights_sha256"), c.update(labels=["a"])))
    with pytest.raises(de.InvalidConfigError, match=r"unknown keys.*'labels'.*timm's"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))


@pytest.mark.parametrize(
    "args, message",
    [
        ({"block_config": [1] * 40}, "block_config.*40 dense blocks.*at most 16"),
        ({"num_classes": 10**9}, "num_classes=1000000000.*bound of 1000000"),
        ({"growth_rate": 5000}, "growth_rate=5000.*bound of 4096"),
        ({"in_chans": 10**6}, "in_chans=1000000.*bound of 4096"),
        ({"bn_size": 1000, "growth_rate": 12}, r"bn_size \* growth_rate = 12000.*bound"),
    ],
)
def test_sizes_beyond_the_bounds_are_refused_before_building(saved, args, message):
    """40 one-layer blocks hung the constructor (issue 17); the bounds refuse before anything is built."""
    edit_config(saved, lambda c: (c["model_args"].update(args), c.update(num_classes=c["model_args"]["num_classes"])))
    start = time.perf_counter()
    with pytest.raises(de.InvalidConfigError, match=f"invalid model_args.*{message}"):
        de.create_model("densenet_40_k12", weights=str(saved.parent))
    assert time.perf_counter() - start < 30  # not a timing assertion of speed: a hang would never get here


def test_save_pretrained_writes_the_full_configuration_of_a_cifar_model(tmp_path):
    """Issue 16: config.json held "pretrained_cfg": {} so a CIFAR model lost its 32 px and CIFAR statistics."""
    model = small_model()
    de.save_pretrained(model, tmp_path, label_names=[f"c{i}" for i in range(10)], license="mit")
    cfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0 and cfg["pool_size"] == [8, 8]
    assert all(math.isclose(a, b) for a, b in zip(cfg["mean"], (0.4914, 0.4822, 0.4465), strict=True))
    assert cfg["license"] == "mit" and cfg["architecture"] == "densenet_40_k12" and cfg["num_classes"] == 10
    loaded = de.create_model("densenet_40_k12", weights=str(tmp_path))
    assert loaded.pretrained_cfg["label_names"][9] == "c9" and loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="save_pretrained.*3 label_names.*10 classes"):
        de.save_pretrained(model, tmp_path / "bad", label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"save_pretrained.*mean.*one value per input channel \(3\).*\(0.5,\)"):
        de.save_pretrained(model, tmp_path / "bad", mean=[0.5])
