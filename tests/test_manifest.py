"""The weights manifest: schema, contents, tags."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

import densenet_efficient as de
from densenet_efficient import pretrained as W
from densenet_efficient.pretrained.manifest import MANIFEST_ENV, manifest_path
from export.manifest import validate_manifest
from tests.weights_helpers import (
    REPO_ROOT,
    manifest_schema,
)

# ---------------------------------------------------------------------------------------------------------------
# The manifest


def test_manifest_matches_schema_and_registry():
    jsonschema = pytest.importorskip("jsonschema")
    manifest = W.load_manifest()
    jsonschema.Draft202012Validator.check_schema(manifest_schema())
    jsonschema.Draft202012Validator(manifest_schema()).validate(manifest)
    validate_manifest(manifest, manifest_path())  # what the schema cannot say; load_manifest does not re-check it
    for key, entry in manifest["weights"].items():
        assert key == f"{entry['model']}.{entry['tag']}"
        reference = json.loads(json.dumps(de.create_model(entry["model"]).config))
        assert entry["model_args"] == reference, key
        assert entry["num_classes"] == entry["model_args"]["num_classes"]
        if entry["url"]:
            assert Path(entry["url"]["url"]).stem.endswith("-" + entry["url"]["sha256_prefix"])
    for model, tag in manifest["default_tags"].items():
        assert f"{model}.{tag}" in manifest["weights"]


def test_schema_rejects_an_invented_looking_entry():
    jsonschema = pytest.importorskip("jsonschema")
    manifest = W.load_manifest()
    entry = manifest["weights"]["densenet121_efficient.tv_in1k"]
    entry["hub"]["sha256"] = "c894c6d9"  # a prefix is not a sha256
    with pytest.raises(jsonschema.ValidationError, match="c894c6d9"):
        jsonschema.validate(manifest, manifest_schema())


def test_manifest_ships_in_the_package_and_at_the_root():
    from importlib import resources

    packaged = resources.files("densenet_efficient.pretrained").joinpath("weights_manifest.json").read_bytes()
    # Real files, no links: torch.hub's GitHub zips turn a link into a text file holding the link's target.
    root_copy = REPO_ROOT / "weights_manifest.json"
    assert not (REPO_ROOT / "densenet_efficient" / "pretrained" / "weights_manifest.json").is_symlink()
    assert not root_copy.is_symlink()
    assert packaged == root_copy.read_bytes()
    assert manifest_path().read_bytes() == packaged


def test_public_entries_pin_only_what_is_on_record():
    weights = W.load_manifest()["weights"]
    assert weights["densenet121_efficient.tv_in1k"]["hub"]["sha256"] == (
        "c894c6d9caa317a8ca1942986dee7a16a86c77734a4d691d2abe05389cfef358"
    )
    assert weights["densenet121_efficient.ra_in1k"]["hub"]["revision"] == "e65bed9f92a2e438879b179438d22ed719be26d6"
    assert {entry["url"]["sha256_prefix"] for entry in weights.values() if entry["url"]} == {
        "a639ec97",
        "b2777c0a",
        "c1103571",
        "8d451a50",
    }


def test_unknown_tag_lists_the_valid_ones():
    with pytest.raises(
        W.UnknownWeightsError, match=r"'nope' for 'densenet121_efficient'. Valid tags: ra_in1k, tv_in1k"
    ):
        de.densenet121_efficient(weights="nope")


def test_model_without_weights_says_which_models_have_some():
    with pytest.raises(
        W.UnknownWeightsError, match="No pretrained weights .* 'densenet_bc_100_k12'.*densenet121_efficient"
    ):
        de.densenet_bc_100_k12(pretrained=True)


# ---------------------------------------------------------------------------------------------------------------
# Validated when read, typed when handed out


def manifest_with(tmp_path, monkeypatch, change) -> None:
    manifest = W.load_manifest()
    change(manifest)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(path))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m["weights"]["densenet121_efficient.tv_in1k"]["url"].update(sha256_prefix=""),
            r"\['weights'\]\['densenet121_efficient.tv_in1k'\]\['url'\]\['sha256_prefix'\]: '' does not match",
        ),
        (
            lambda m: m["weights"]["densenet121_efficient.tv_in1k"]["hub"].update(sha256=""),
            r"\['hub'\]\['sha256'\]: '' does not match",
        ),
        (
            lambda m: m["weights"]["densenet121_efficient.tv_in1k"].pop("model_args"),
            "'model_args' is a required property",
        ),
        (
            lambda m: m["weights"]["densenet121_efficient.ra_in1k"]["metrics"][1].pop("crop_pct"),
            r"\['metrics'\]\[1\]: 'crop_pct' is a required property",
        ),
        (
            lambda m: m["weights"]["densenet121_efficient.tv_in1k"]["url"].update(
                url="http://download.pytorch.org/models/densenet121-a639ec97.pth"
            ),
            r"\['url'\]\['url'\]: 'http://download.pytorch.org/.*' does not match",
        ),
        (
            lambda m: m["weights"]["densenet121_efficient.tv_in1k"]["url"].update(sha256="b" * 64),
            "url.sha256 b{64} does not start with url.sha256_prefix",
        ),
        (lambda m: m.pop("default_tags"), r"\(top level\): 'default_tags' is a required property"),
        (
            lambda m: m["default_tags"].update(densenet169_efficient="ra_in1k"),
            "the default tag of 'densenet169_efficient' is 'ra_in1k', which has no entry",
        ),
    ],
)
def test_malformed_manifest_is_named_by_the_check(change, message):
    manifest = W.load_manifest()
    change(manifest)
    with pytest.raises(W.ManifestError, match=message):
        validate_manifest(manifest, "manifest.json")


def test_an_entry_missing_a_field_is_a_manifest_error_when_used(tmp_path, monkeypatch):
    manifest_with(tmp_path, monkeypatch, lambda m: m["weights"]["densenet121_efficient.tv_in1k"].pop("model_args"))
    with pytest.raises(W.ManifestError, match="densenet121_efficient.tv_in1k: 'model_args'"):
        de.create_model("densenet121_efficient", weights="tv_in1k")


def test_manifest_that_is_not_json(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("{")
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "manifest.json"))
    with pytest.raises(W.ManifestError, match="manifest.json is not valid JSON"):
        W.list_pretrained()


def test_entries_are_frozen_and_typed():
    cfg = W.get_pretrained_cfg("densenet121_efficient.ra_in1k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tag = "other"  # type: ignore[misc]
    assert cfg.input.input_size == (3, 224, 224) and cfg.model_args["block_config"] == (6, 12, 24, 16)
    assert cfg.hub.revision == "e65bed9f92a2e438879b179438d22ed719be26d6" and cfg.url is None
    entry = W.load_manifest()["weights"][cfg.key]
    assert (cfg.license, cfg.source, cfg.hub.sha256) == (entry["license"], entry["source"], entry["hub"]["sha256"])
    assert [dataclasses.asdict(metric) for metric in cfg.metrics] == entry["metrics"]


def test_published_results_are_on_record():
    """Against reference-facts.md: timm's results-imagenet.csv and torchvision's figures, top-1 and top-5."""
    results = {
        (key, m.reported_by, m.image_size): (m.top1, m.top5, m.crop_pct)
        for key in W.list_pretrained()
        for m in W.get_pretrained_cfg(key).metrics
    }
    assert results == {
        ("densenet121_efficient.ra_in1k", "timm", 224): (75.574, 92.648, 0.875),
        ("densenet121_efficient.ra_in1k", "timm", 288): (76.486, 93.378, 0.95),
        ("densenet121_efficient.tv_in1k", "timm", 224): (74.75, 92.158, 0.875),
        ("densenet121_efficient.tv_in1k", "torchvision", 224): (74.434, 91.972, 0.875),
        ("densenet169_efficient.tv_in1k", "timm", 224): (75.922, 92.976, 0.875),
        ("densenet169_efficient.tv_in1k", "torchvision", 224): (75.6, 92.806, 0.875),
        ("densenet201_efficient.tv_in1k", "timm", 224): (77.284, 93.48, 0.875),
        ("densenet201_efficient.tv_in1k", "torchvision", 224): (76.896, 93.37, 0.875),
        ("densenet161_efficient.tv_in1k", "timm", 224): (77.384, 93.656, 0.875),
        ("densenet161_efficient.tv_in1k", "torchvision", 224): (77.138, 93.56, 0.875),
    }
    ra = W.get_pretrained_cfg("densenet121_efficient.ra_in1k")
    assert (ra.input.test_input_size, ra.input.test_crop_pct) == ((3, 288, 288), 0.95)
    assert ra.input.label_names[281] == "tabby"
    for key in W.list_pretrained():
        cfg = W.get_pretrained_cfg(key)
        assert cfg.license == "apache-2.0" and "timm's models/densenet.py" in cfg.license_source
        assert cfg.labels == "imagenet-1k"
        if cfg.url:
            assert "BSD-3-Clause" in cfg.license_source and "states no separate license" in cfg.license_source


def test_entry_constructor_arguments_are_read_only():
    cfg = W.get_pretrained_cfg("densenet121_efficient.tv_in1k")
    with pytest.raises(TypeError):
        cfg.model_args["num_classes"] = 10  # type: ignore[index]
    assert W.get_pretrained_cfg("densenet121_efficient.tv_in1k").model_args["num_classes"] == 1000


def test_weights_table_says_which_fallbacks_are_pinned_only_by_their_name_prefix():
    from export.manifest import table

    manifest = W.load_manifest()
    rows = {row.split("`")[1]: row for row in table(manifest).splitlines() if row.startswith("| `")}
    for key, entry in manifest["weights"].items():
        if entry["url"] and not entry["url"]["sha256"]:
            assert rows[key].endswith("(only the 8-hex-digit sha256 prefix in its name) |")
    entry = manifest["weights"]["densenet121_efficient.tv_in1k"]
    entry["url"]["sha256"] = entry["url"]["sha256_prefix"] + "0" * 56
    assert table(manifest).splitlines()[3].endswith("densenet121-a639ec97.pth (sha256) |")


@pytest.mark.parametrize("kind", ["FIFO", "folder"])
def test_a_manifest_that_is_no_regular_file_is_refused_at_once(tmp_path, monkeypatch, kind):
    path = tmp_path / "manifest.json"
    if kind == "FIFO":
        os.mkfifo(path)  # opening it to read would wait for a writer forever
    else:
        path.mkdir()
    monkeypatch.setenv(MANIFEST_ENV, str(path))
    started = time.monotonic()
    with pytest.raises(W.ManifestError, match=f"manifest.json is a {kind}, not a regular file"):
        W.list_pretrained()
    assert time.monotonic() - started < 5
