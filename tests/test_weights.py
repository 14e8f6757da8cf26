"""Pretrained weights: manifest, save_pretrained, loading from files, the (loopback) Hub and torchvision URLs."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import pytest
import torch

import densenet_efficient as de
from densenet_efficient import pretrained as W
from densenet_efficient.pretrained.download import fetch_hub_file, fetch_url_file
from densenet_efficient.pretrained.manifest import MANIFEST_ENV, manifest_path

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(block_config=[2, 2, 2])  # a 3-block CIFAR DenseNet small enough to save and load in milliseconds
X = torch.randn(2, 3, 32, 32)


def small_model(**kwargs) -> torch.nn.Module:
    return de.create_model("densenet_40_k12", **{**SMALL, **kwargs}).eval()


def randomise_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so that loading them is visible in the logits."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def saved_files(model: torch.nn.Module, directory: Path, **metadata) -> dict[str, bytes]:
    W.save_pretrained(model, directory, **metadata)
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def cache_files(cache: Path) -> set[str]:
    """Every weights file, blob and snapshot link in a Hugging Face cache (not locks or refs)."""
    return {str(path.relative_to(cache)) for path in cache.rglob("*")
            if ("blobs" in path.parts or "snapshots" in path.parts) and not path.is_dir()}


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def manifest_schema() -> dict:
    return json.loads((REPO_ROOT / "densenet_efficient" / "pretrained" / "weights_manifest.schema.json").read_text())


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
                    metrics=[{"dataset": "cifar10-test", "top1": 50.0, "protocol": "no augmentation",
                              "reported_by": "this project"}])
    entry = W.save_pretrained(small_model(), tmp_path, **metadata)
    schema = manifest_schema()
    manifest = {"version": 1, "default_tags": {}, "weights": {"densenet_40_k12.c10": entry}}
    with pytest.raises(jsonschema.ValidationError, match="None is not of type 'string'"):
        jsonschema.validate(manifest, schema)  # not published yet: no repo_id
    entry["hub"].update(repo_id="org/densenet_40_k12.c10", revision="0" * 40)
    jsonschema.validate(manifest, schema)


def test_model_with_weights_but_no_default_tag(tmp_path, monkeypatch):
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub=None)
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


@pytest.mark.parametrize("target", ["folder", "file"])
def test_local_weights_rebuild_the_model(tmp_path, target):
    model = randomise_batch_norm(small_model(num_classes=7))
    W.save_pretrained(model, tmp_path)
    reference = tmp_path if target == "folder" else tmp_path / "model.safetensors"
    loaded = de.create_model("densenet_40_k12", weights=str(reference))  # block_config and classes from config.json
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_num_classes_override_loads_all_but_the_classifier(tmp_path):
    model = randomise_batch_norm(small_model())
    W.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="weights have 10 classes, the model 3: loaded everything but the classifier"):
        tuned = de.create_model("densenet_40_k12", weights=str(tmp_path / "model.safetensors"), num_classes=3)
    tuned.eval()
    assert tuned.classifier.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_head(tuned.forward_features(X), pre_logits=True),
                                   model.forward_head(model.forward_features(X), pre_logits=True), rtol=0, atol=0)


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "bc.safetensors"  # a bare file: no config.json to rebuild from
    from safetensors.torch import save_file

    save_file(de.create_model("densenet_bc_100_k12", block_config=[2, 2, 2]).state_dict(), path)
    with pytest.raises(W.IncompatibleWeightsError) as error:
        de.create_model("densenet_40_k12", weights=str(path), **SMALL)
    message = str(error.value)
    assert "0 missing" in message
    assert "unexpected (features.denseblock1.denselayer1.conv2.weight" in message
    assert "features.conv0.weight (24, 3, 3, 3) vs (16, 3, 3, 3)" in message


def test_missing_keys_are_named(tmp_path):
    model = small_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("features.norm5")}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(W.IncompatibleWeightsError, match=r"4 missing \(features.norm5.weight, features.norm5.bias"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "partial.safetensors"), **SMALL)


def test_config_for_another_model_is_refused(tmp_path):
    W.save_pretrained(small_model(), tmp_path)
    with pytest.raises(W.UnknownWeightsError, match="weights for 'densenet_40_k12', not 'densenet_bc_100_k12'"):
        de.create_model("densenet_bc_100_k12", weights=str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_local_file_is_a_clear_error(tmp_path, damage):
    W.save_pretrained(small_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(W.InvalidWeightsFileError, match="model.safetensors is not a valid safetensors file"):
        de.create_model("densenet_40_k12", weights=str(path))


def test_missing_local_file_says_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="No weights file at .*nothing.safetensors.*hf-hub:org/name"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "nothing.safetensors"))


def legacy_torchvision_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as torchvision's old .pth files hold it: ``norm.1`` for ``norm1``, no num_batches_tracked."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for new, old in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"), ("conv2", "conv.2")):
            key = key.replace(f".{new}.", f".{old}.") if ".denselayer" in key else key
        state[key] = value
    return state


def test_legacy_pth_file_loads_with_weights_only(tmp_path):
    model = randomise_batch_norm(small_model())
    legacy = legacy_torchvision_state_dict(model)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "legacy.pth")
    loaded = de.create_model("densenet_40_k12", weights=str(tmp_path / "legacy.pth"), **SMALL)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_pickled_object_is_refused(tmp_path):
    torch.save({"model": small_model()}, tmp_path / "pickled.pth")
    with pytest.raises(W.InvalidWeightsFileError, match="not a readable PyTorch checkpoint"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "pickled.pth"), **SMALL)


# ---------------------------------------------------------------------------------------------------------------
# The Hub (loopback) and torchvision URLs


@pytest.fixture
def published(loopback_hub, tmp_path):
    """A small model published on the loopback hub as org/small; returns (model, files, commit)."""
    model = randomise_batch_norm(small_model())
    files = saved_files(model, tmp_path / "export")
    commit = loopback_hub.commit("org/small", files)
    return model, files, commit


def write_manifest(path: Path, monkeypatch, hub: dict | None, url: dict | None = None) -> None:
    """A manifest with one entry, densenet_40_k12.test (the default tag), and use it."""
    entry = {"model": "densenet_40_k12", "tag": "test", "model_args": small_model().config, "hub": hub, "url": url}
    manifest = {"version": 1, "default_tags": {"densenet_40_k12": "test"},
                "weights": {"densenet_40_k12.test": json.loads(json.dumps(entry))}}
    path.write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(path))


def hub_entry(commit: str | None, files: dict[str, bytes], repo_id: str = "org/small", pinned: bool = True) -> dict:
    data = files["model.safetensors"]
    return {"repo_id": repo_id, "revision": commit, "filename": "model.safetensors",
            "sha256": hashlib.sha256(data).hexdigest() if pinned else None, "size": len(data)}


def test_download_then_cache_hit_without_a_request(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    first = de.densenet_40_k12(pretrained=True, **options)
    assert first.config == model.config
    torch.testing.assert_close(logits(first), logits(model), rtol=0, atol=0)
    assert ("GET", f"/lfs/{hashlib.sha256(files['model.safetensors']).hexdigest()}") in loopback_hub.requests
    loopback_hub.requests.clear()
    second = de.create_model("densenet_40_k12", weights="test", **options)
    assert loopback_hub.requests == []
    torch.testing.assert_close(logits(second), logits(model), rtol=0, atol=0)


def test_pinned_revision_loads_that_commit(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    newer = saved_files(randomise_batch_norm(small_model()), tmp_path / "newer")
    loopback_hub.commit("org/small", newer)  # main moves on; the manifest still pins the first commit
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert all(f"/resolve/{commit}/" in path for _, path in loopback_hub.requests_for("/resolve/"))


def test_hub_reference_with_and_without_revision(loopback_hub, published, tmp_path):
    model, files, commit = published
    newer_model = randomise_batch_norm(small_model(num_classes=5))
    newer = loopback_hub.commit("org/small", saved_files(newer_model, tmp_path / "newer"))
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    pinned = de.create_model("densenet_40_k12", weights=f"hf-hub:org/small@{commit}", **options)
    latest = de.create_model("densenet_40_k12", weights="hf-hub:org/small", **options)
    torch.testing.assert_close(logits(pinned), logits(model), rtol=0, atol=0)
    assert latest.classifier.out_features == 5  # num_classes from the repo's config.json
    # the weights come from the commit that config.json came from, even if main moves in between
    assert ("HEAD", f"/org/small/resolve/{newer}/model.safetensors") in loopback_hub.requests
    torch.testing.assert_close(logits(latest), logits(newer_model), rtol=0, atol=0)


def test_invalid_hub_reference():
    with pytest.raises(W.UnknownWeightsError, match="expected 'hf-hub:org/name\\[@revision\\]'"):
        de.create_model("densenet_40_k12", weights="hf-hub:just-a-name")


@pytest.mark.filterwarnings("ignore:densenet_40_k12.test is not pinned")
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_tampered_download_is_refused_and_removed(loopback_hub, published, tmp_path, monkeypatch, pinned):
    model, files, commit = published
    cache = tmp_path / "cache"
    good = fetch_hub_file("org/small", "config.json", cache_dir=cache, endpoint=loopback_hub.endpoint)
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(None, files, pinned=pinned))
    loopback_hub.faults["model.safetensors"] = "tamper"
    expected = hashlib.sha256(files["model.safetensors"]).hexdigest()
    tampered = bytearray(files["model.safetensors"])
    tampered[0] ^= 0xFF
    actual = hashlib.sha256(tampered).hexdigest()
    with pytest.raises(W.ChecksumMismatchError, match=f"org/small/model.safetensors@main: the file's hash is "
                                                      f"{actual}, expected {expected}"):
        de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    remaining = cache_files(cache)
    assert not any(expected in name or name.endswith("model.safetensors") for name in remaining)
    assert Path(good).read_bytes() == files["config.json"]  # the good cached file is left alone
    loopback_hub.faults.clear()  # the next try downloads a good copy
    loaded = de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_unpinned_entry_warns_and_checks_the_hubs_sha256(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files, pinned=False))
    with pytest.warns(UserWarning, match="densenet_40_k12.test is not pinned: .*Hub's own LFS sha256"):
        loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_corrupted_cache_hit_is_caught(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    cache = tmp_path / "cache"
    path = Path(fetch_hub_file("org/small", "model.safetensors", revision=commit, cache_dir=cache,
                               endpoint=loopback_hub.endpoint))
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # a flipped data byte: safetensors would load it silently
    blob.write_bytes(bytes(data))
    loopback_hub.requests.clear()
    with pytest.raises(W.ChecksumMismatchError, match=hashlib.sha256(data).hexdigest()):
        de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert loopback_hub.requests == [] and not blob.exists() and not path.is_symlink()


@pytest.mark.parametrize("content", ["truncated", "empty"])
def test_truncated_or_empty_file_on_the_hub(loopback_hub, tmp_path, monkeypatch, content):
    files = saved_files(small_model(), tmp_path / "export")
    good = files["model.safetensors"]
    bad = good[: len(good) // 2] if content == "truncated" else b""
    loopback_hub.commit("org/small", {**files, "model.safetensors": bad})
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    # Pinned: the sha256 refuses it. Unpinned (hf-hub:): it matches the Hub's hash, and safetensors refuses it.
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(None, files))
    with pytest.raises(W.ChecksumMismatchError, match=f"expected {hashlib.sha256(good).hexdigest()}"):
        de.densenet_40_k12(pretrained=True, **options)
    with pytest.raises(W.InvalidWeightsFileError, match="not a valid safetensors file"):
        de.create_model("densenet_40_k12", weights="hf-hub:org/small", **options)


def test_transfer_cut_short_is_not_cached(loopback_hub, published, tmp_path):
    loopback_hub.faults["model.safetensors"] = "truncate"
    cache = tmp_path / "cache"
    with pytest.raises(W.WeightsNotAvailableError, match="RemoteProtocolError"):
        fetch_hub_file("org/small", "model.safetensors", cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert cache_files(cache) == set()


@pytest.mark.parametrize("reference, reason", [
    ("hf-hub:org/missing", "RepositoryNotFoundError: 404 Client Error (Repository org/missing not found)"),
    ("hf-hub:org/small@v9", "RevisionNotFoundError"),
])
def test_missing_repo_or_revision(loopback_hub, published, tmp_path, reference, reason):
    with pytest.raises(W.WeightsNotAvailableError, match=re.escape(reason)):
        de.create_model("densenet_40_k12", weights=reference, cache_dir=tmp_path, endpoint=loopback_hub.endpoint)


def test_missing_file_and_server_error(loopback_hub, published, tmp_path):
    options = dict(cache_dir=tmp_path, endpoint=loopback_hub.endpoint)
    with pytest.raises(W.WeightsNotAvailableError, match="Cannot get other.safetensors of Hub repo org/small .*"
                                                         "RemoteEntryNotFoundError"):
        fetch_hub_file("org/small", "other.safetensors", **options)
    loopback_hub.faults["model.safetensors"] = "error500"
    started = time.monotonic()
    with pytest.raises(W.WeightsNotAvailableError, match="500 Internal Server Error"):
        fetch_hub_file("org/small", "model.safetensors", **options)
    assert time.monotonic() - started < 3  # no retry loop


def test_offline_with_cache_makes_no_request(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(None, files))
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    de.densenet_40_k12(pretrained=True, **options)  # online once: cached under refs/main
    loopback_hub.requests.clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = de.densenet_40_k12(pretrained=True, **options)
    assert loopback_hub.requests == []
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_offline_without_cache_says_how_to_get_the_file(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(W.WeightsNotAvailableError) as error:
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    message = str(error.value)
    assert f"model.safetensors of Hub repo org/small (revision {commit})" in message
    assert "HF_HUB_OFFLINE is set" in message and str(tmp_path / "cache") in message
    assert "HF_HUB_CACHE" in message and "'path/to/model.safetensors'" in message
    assert loopback_hub.requests == []


def test_unreachable_hub_fails_at_once(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    loopback_hub.close()
    started = time.monotonic()
    with pytest.raises(W.WeightsNotAvailableError, match="ConnectError"):
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    assert time.monotonic() - started < 3  # the client alone would retry for about 20 s


@pytest.fixture
def torchvision_file(loopback_hub, tmp_path, monkeypatch):
    """A torchvision-style legacy .pth served by the loopback hub at /models/<name>-<sha256[:8]>.pth."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = randomise_batch_norm(small_model())
    buffer = io.BytesIO()
    torch.save(legacy_torchvision_state_dict(model), buffer)
    data = buffer.getvalue()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    path = f"/models/densenet-{prefix}.pth"
    loopback_hub.url_files[path] = data
    return model, f"{loopback_hub.endpoint}{path}", prefix


def test_torchvision_fallback_when_the_hub_copy_is_missing(loopback_hub, torchvision_file, tmp_path, monkeypatch):
    model, url, prefix = torchvision_file
    hub = {"repo_id": "org/gone", "revision": None, "filename": "model.safetensors", "sha256": "0" * 64, "size": None}
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub,
                   {"url": url, "sha256_prefix": prefix, "sha256": None, "size": None})
    with pytest.warns(UserWarning, match=f"the Hub copy is not available, loaded {url}"):
        loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    assert hashlib.sha256(cached.read_bytes()).hexdigest().startswith(prefix)


def test_torchvision_url_hash_prefix_is_checked(loopback_hub, torchvision_file, tmp_path):
    model, url, prefix = torchvision_file
    directory = tmp_path / "checkpoints"
    loopback_hub.faults[urlparse(url).path] = "tamper"
    with pytest.raises(W.ChecksumMismatchError, match=f'expected "{prefix}"'):
        fetch_url_file(url, prefix, directory)
    assert not directory.exists() or list(directory.iterdir()) == []
    loopback_hub.faults.clear()
    path = Path(fetch_url_file(url, prefix, directory))
    path.write_bytes(path.read_bytes()[:-1])  # a damaged cached copy is re-checked and removed
    with pytest.raises(W.ChecksumMismatchError, match=f"does not start with {prefix}"):
        fetch_url_file(url, prefix, directory)
    assert not path.exists()


def test_no_source_reachable_lists_every_source(loopback_hub, torchvision_file, tmp_path, monkeypatch):
    model, url, prefix = torchvision_file
    hub = {"repo_id": "org/gone", "revision": None, "filename": "model.safetensors", "sha256": "0" * 64, "size": None}
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub,
                   {"url": url, "sha256_prefix": prefix, "sha256": None, "size": None})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(W.WeightsNotAvailableError, match=r"No source of densenet_40_k12.test is available:\n"
                                                         r"- Cannot get model.safetensors of Hub repo org/gone.*\n"
                                                         rf"- Cannot download {url}"):
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    assert loopback_hub.requests == []


def test_torch_hub_entrypoint_with_pretrained(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    loaded = torch.hub.load(str(REPO_ROOT), "densenet_40_k12", source="local", pretrained=True,
                            cache_dir=str(tmp_path / "cache"), endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    by_reference = torch.hub.load(str(REPO_ROOT), "densenet_40_k12", source="local", weights=f"hf-hub:org/small@{commit}",
                                  cache_dir=str(tmp_path / "cache"), endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(by_reference), logits(model), rtol=0, atol=0)
