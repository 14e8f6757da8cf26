"""The weights manifest: schema, contents, tags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from weights_helpers import (
    REPO_ROOT,
    manifest_schema,
)

import densenet_efficient as de
from densenet_efficient import pretrained as W
from densenet_efficient.pretrained.manifest import manifest_path

# ---------------------------------------------------------------------------------------------------------------
# The manifest



def test_manifest_matches_schema_and_registry():
    jsonschema = pytest.importorskip("jsonschema")
    manifest = W.load_manifest()
    jsonschema.Draft202012Validator.check_schema(manifest_schema())
    jsonschema.Draft202012Validator(manifest_schema()).validate(manifest)
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
    # A real file in the package (wheels and torch.hub's GitHub zips keep it); the root one links to it.
    assert not (REPO_ROOT / "densenet_efficient" / "pretrained" / "weights_manifest.json").is_symlink()
    assert packaged == (REPO_ROOT / "weights_manifest.json").read_bytes()
    assert manifest_path().read_bytes() == packaged


def test_public_entries_pin_only_what_is_on_record():
    weights = W.load_manifest()["weights"]
    assert weights["densenet121_efficient.tv_in1k"]["hub"]["sha256"] == (
        "c894c6d9caa317a8ca1942986dee7a16a86c77734a4d691d2abe05389cfef358")
    assert weights["densenet121_efficient.ra_in1k"]["hub"]["revision"] == "e65bed9f92a2e438879b179438d22ed719be26d6"
    assert {entry["url"]["sha256_prefix"] for entry in weights.values() if entry["url"]} == {
        "a639ec97", "b2777c0a", "c1103571", "8d451a50"}


def test_unknown_tag_lists_the_valid_ones():
    with pytest.raises(W.UnknownWeightsError, match=r"'nope' for 'densenet121_efficient'. Valid tags: ra_in1k, tv_in1k"):
        de.densenet121_efficient(weights="nope")


def test_model_without_weights_says_which_models_have_some():
    with pytest.raises(W.UnknownWeightsError, match="No pretrained weights .* 'densenet_bc_100_k12'.*densenet121_efficient"):
        de.densenet_bc_100_k12(pretrained=True)


def test_import_stays_light():
    code = ("import sys, densenet_efficient; "
            "print(sorted(m for m in ('huggingface_hub', 'safetensors', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
