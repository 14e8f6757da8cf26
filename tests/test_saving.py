"""save_pretrained: the files it writes and the manifest entry it returns."""

from __future__ import annotations

import hashlib
import json

import pytest
from weights_helpers import (
    SMALL,
    manifest_schema,
    randomise_batch_norm,
    saved_files,
    small_model,
    write_manifest,
)

import densenet_efficient as de
from densenet_efficient import pretrained as W

# ---------------------------------------------------------------------------------------------------------------
# save_pretrained and local files


def test_save_pretrained_is_byte_reproducible_and_self_describing(tmp_path):
    from safetensors import safe_open

    model = randomise_batch_norm(small_model())
    entry = W.save_pretrained(model, tmp_path / "a", tag="test", dataset="cifar10")
    first = {path.name: path.read_bytes() for path in (tmp_path / "a").iterdir()}
    second = saved_files(model, tmp_path / "b", tag="test", dataset="cifar10")
    assert first == second and sorted(first) == ["README.md", "config.json", "model.safetensors"]
    weights = first["model.safetensors"]
    assert entry["hub"] == {"repo_id": None, "revision": None, "filename": "model.safetensors",
                            "sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    assert entry["model"] == "densenet_40_k12" and entry["tag"] == "test" and entry["num_classes"] == 10
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as file:
        assert file.metadata() == {"format": "pt"}
    config = json.loads(first["config.json"])
    assert config["architecture"] == "densenet_40_k12"
    assert config["model_args"]["block_config"] == [2, 2, 2]
    assert config["pretrained_cfg"] == {"tag": "test", "dataset": "cifar10"}
    assert entry["hub"]["sha256"] in first["README.md"].decode()


def test_save_pretrained_entry_becomes_a_manifest_entry_once_published(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    metadata = dict(tag="c10", label_source="CIFAR-10 class order of torchvision.datasets.CIFAR10",
                    input_size=[3, 32, 32], mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616],
                    interpolation=None, crop_pct=None, license="MIT", source="trained here",
                    metrics=[{"dataset": "cifar10-test", "top1": 50.0, "top5": 90.0, "image_size": 32,
                              "crop_pct": 1.0, "protocol": "no augmentation", "reported_by": "this project"}])
    entry = W.save_pretrained(small_model(), tmp_path, **metadata)
    schema = manifest_schema()
    manifest = {"version": 1, "default_tags": {}, "weights": {"densenet_40_k12.c10": entry}}
    with pytest.raises(jsonschema.ValidationError, match="None is not of type 'string'"):
        jsonschema.validate(manifest, schema)  # not published yet: no repo_id
    entry["hub"].update(repo_id="org/densenet_40_k12.c10", revision="0" * 40)
    jsonschema.validate(manifest, schema)


def test_model_with_weights_but_no_default_tag(tmp_path, monkeypatch):
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub={"repo_id": "org/small", "revision": None,
                   "filename": "model.safetensors", "sha256": None, "size": None})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["default_tags"] = {}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(W.UnknownWeightsError, match="'densenet_40_k12' has no default weights: pass weights=<tag>, "
                                                    "one of test"):
        de.densenet_40_k12(pretrained=True)


def test_save_pretrained_refuses_bad_metadata_and_keeps_existing_files(tmp_path):
    model = small_model()
    before = saved_files(model, tmp_path)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        W.save_pretrained(randomise_batch_norm(model), tmp_path, when=object())
    with pytest.raises(ValueError, match=r"\['hub'\] are computed"):
        W.save_pretrained(model, tmp_path, hub="mine")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_save_pretrained_needs_a_registered_name(tmp_path):
    with pytest.raises(ValueError, match="architecture="):
        W.save_pretrained(de.DenseNet(**SMALL, stem="cifar"), tmp_path)
