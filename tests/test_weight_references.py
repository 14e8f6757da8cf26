"""How users ask for weights: ``NAME.TAG``, ``weights="TAG"``, ``"DEFAULT"``, torch.hub, and references that are
refused at the door (empty, not a string, a path that does not exist, no model name)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import densenet_efficient as de
from tests.weights_helpers import (
    REPO_ROOT,
    hub_entry,
    logits,
    randomise_batch_norm,
    saved_files,
    small_model,
    write_manifest,
)


@pytest.fixture
def served(loopback_hub, tmp_path, monkeypatch):
    """A small model published on the loopback hub as the manifest's densenet_40_k12.test (the default tag,
    ImageNet-style preprocessing of its own); returns (model, options for create_model)."""
    model = randomise_batch_norm(small_model())
    files = saved_files(model, tmp_path / "export")
    commit = loopback_hub.commit("org/small", files)
    write_manifest(
        tmp_path / "manifest.json",
        monkeypatch,
        hub_entry(commit, files),
        input_size=[3, 40, 40],
        mean=[0.1, 0.2, 0.3],
        std=[0.4, 0.5, 0.6],
        interpolation="bicubic",
        crop_pct=0.9,
        test_input_size=[3, 48, 48],
        test_crop_pct=1.0,
    )
    return model, {"cache_dir": tmp_path / "cache", "endpoint": loopback_hub.endpoint}


@pytest.mark.parametrize(
    "spelling",
    [
        lambda options: de.create_model("densenet_40_k12.test", pretrained=True, **options),
        lambda options: de.create_model("densenet_40_k12", weights="test", **options),
        lambda options: de.create_model("densenet_40_k12", weights="DEFAULT", **options),
        lambda options: de.densenet_40_k12(weights="DEFAULT", **options),
        lambda options: torch.hub.load(
            str(REPO_ROOT),
            "densenet_40_k12",
            source="local",
            weights="test",
            cache_dir=str(options["cache_dir"]),
            endpoint=options["endpoint"],
        ),
    ],
    ids=["name.tag", "weights=tag", "DEFAULT", "factory DEFAULT", "torch.hub weights=tag"],
)
def test_every_spelling_loads_the_weights_and_their_configuration(served, spelling):
    model, options = served
    loaded = spelling(options)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    cfg = loaded.pretrained_cfg
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["interpolation"], cfg["crop_pct"]) == (
        (3, 40, 40),
        (0.1, 0.2, 0.3),
        (0.4, 0.5, 0.6),
        "bicubic",
        0.9,
    )
    assert (cfg["test_input_size"], cfg["test_crop_pct"], cfg["license"], cfg["description"], cfg["tag"]) == (
        (3, 48, 48),
        1.0,
        "mit",
        "these tests",
        "test",
    )
    assert cfg["hf_hub_id"] == "org/small" and cfg["num_classes"] == 10


def test_name_tag_without_pretrained_builds_random_weights_as_timm_does(served):
    model, options = served
    fresh = de.create_model("densenet_40_k12.test", **options)
    assert not torch.equal(fresh.features.conv0.weight, model.features.conv0.weight)


def test_name_tag_and_another_weights_argument_conflict():
    with pytest.raises(
        ValueError,
        match=r"create_model\('densenet121_efficient.tv_in1k', weights='ra_in1k'\) names "
        "two different weights",
    ):
        de.create_model("densenet121_efficient.tv_in1k", weights="ra_in1k")


def test_unknown_tag_mentions_default():
    with pytest.raises(de.UnknownWeightsError, match="Valid tags: ra_in1k, tv_in1k, or 'DEFAULT'"):
        de.create_model("densenet121_efficient.nope", pretrained=True)


def test_public_api_exports():
    assert de.list_pretrained("densenet121*") == ["densenet121_efficient.ra_in1k", "densenet121_efficient.tv_in1k"]
    cfg = de.get_pretrained_cfg("densenet121_efficient.ra_in1k")
    assert isinstance(cfg, de.PretrainedCfg) and cfg.key == "densenet121_efficient.ra_in1k"
    assert de.get_pretrained_cfg("densenet121_efficient").tag == "tv_in1k"  # no tag: the default
    for error in (
        "UnknownWeightsError",
        "IncompatibleWeightsError",
        "InvalidWeightsFileError",
        "InvalidConfigError",
        "ChecksumMismatchError",
        "WeightsNotAvailableError",
        "ManifestError",
    ):
        assert issubclass(getattr(de, error), Exception) and error in de.__all__


@pytest.mark.parametrize("reference", ["", "   ", "\t\n"])
def test_empty_reference_is_an_error_not_random_weights(reference):
    with pytest.raises(de.UnknownWeightsError, match=re.escape(f"weights={reference!r} is empty: pass a tag")):
        de.create_model("densenet_40_k12", weights=reference)


@pytest.mark.parametrize("reference", [123, True, 1.5, b"model.safetensors", ["tv_in1k"]])
def test_reference_of_another_type_is_a_clear_type_error(reference):
    with pytest.raises(
        TypeError,
        match=rf"weights must be a tag, a path or 'hf-hub:org/name' .*got "
        rf"{type(reference).__name__}",
    ):
        de.create_model("densenet_40_k12", weights=reference)


@pytest.mark.parametrize(
    "reference",
    ["missing.safetensors", "weights.pth", "runs/c10/export", "./model", "~/nothing-here/model.safetensors"],
)
def test_path_that_does_not_exist_says_file_not_found(reference):
    with pytest.raises(FileNotFoundError, match="file not found: .*" + reference.split("/")[-1]):
        de.create_model("densenet_40_k12", weights=reference)


def test_model_name_must_be_a_string():
    with pytest.raises(TypeError, match="model name must be a str such as 'densenet121_efficient', got NoneType"):
        de.create_model(None)


def test_numpy_integers_are_accepted_as_arguments():
    model = de.create_model(
        "densenet_40_k12", block_config=[np.int64(2)] * 3, num_classes=np.int32(5), growth_rate=np.int16(4)
    )
    assert model.config["num_classes"] == 5 and type(model.config["num_classes"]) is int
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert json.loads(json.dumps(model.config))["block_config"] == [2, 2, 2]  # saved configs stay JSON


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_inputs_name_the_expected_dtypes(dtype):
    model = small_model()
    with pytest.raises(
        TypeError,
        match=rf"expected a floating-point input \(float32, float16, bfloat16 or float64\),"
        rf" got {dtype}",
    ):
        model(torch.zeros(1, 3, 32, 32, dtype=dtype))


def test_unknown_bare_word_says_it_is_no_file_either():
    with pytest.raises(
        de.UnknownWeightsError,
        match=r"Unknown weights tag 'mymodel' .*\(weights='mymodel' is no "
        r"file or folder either.\)",
    ):
        de.create_model("densenet121_efficient", weights="mymodel")
