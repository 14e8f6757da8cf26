"""save_pretrained: the files it writes and the manifest entry it returns."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import densenet_efficient as de
from densenet_efficient import pretrained as W
from densenet_efficient.pretrained.saving import model_card
from tests.weights_helpers import (
    REPO_ROOT,
    SMALL,
    FullDiskFile,
    logits,
    manifest_schema,
    randomise_batch_norm,
    saved_files,
    small_model,
    write_manifest,
)

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
    assert entry["hub"] == {
        "repo_id": None,
        "revision": None,
        "filename": "model.safetensors",
        "sha256": hashlib.sha256(weights).hexdigest(),
        "size": len(weights),
    }
    assert entry["model"] == "densenet_40_k12" and entry["tag"] == "test" and entry["num_classes"] == 10
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as file:
        assert file.metadata() == {"format": "pt"}
    config = json.loads(first["config.json"])
    assert config["architecture"] == "densenet_40_k12"
    assert config["model_args"]["block_config"] == [2, 2, 2]
    assert config["format"] == "densenet_efficient" and config["num_features"] == model.num_features
    cfg = config["pretrained_cfg"]  # timm's keys: the model's configuration with the metadata of those keys
    assert cfg["tag"] == "test" and cfg["input_size"] == [3, 32, 32] and cfg["pool_size"] == [8, 8]
    assert cfg["mean"] == [0.4914, 0.4822, 0.4465] and "dataset" not in cfg
    assert config["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert entry["hub"]["sha256"] in first["README.md"].decode()


def test_save_pretrained_entry_becomes_a_manifest_entry_once_published(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    metadata = dict(
        tag="c10",
        label_source="CIFAR-10 class order of torchvision.datasets.CIFAR10",
        input_size=[3, 32, 32],
        mean=[0.4914, 0.4822, 0.4465],
        std=[0.2470, 0.2435, 0.2616],
        interpolation=None,
        crop_pct=None,
        license="MIT",
        source="trained here",
        metrics=[
            {
                "dataset": "cifar10-test",
                "top1": 50.0,
                "top5": 90.0,
                "image_size": 32,
                "crop_pct": 1.0,
                "protocol": "no augmentation",
                "reported_by": "this project",
            }
        ],
    )
    entry = W.save_pretrained(small_model(), tmp_path, **metadata)
    schema = manifest_schema()
    manifest = {"version": 1, "default_tags": {}, "weights": {"densenet_40_k12.c10": entry}}
    with pytest.raises(jsonschema.ValidationError, match="None is not of type 'string'"):
        jsonschema.validate(manifest, schema)  # not published yet: no repo_id
    entry["hub"].update(repo_id="org/densenet_40_k12.c10", revision="0" * 40)
    jsonschema.validate(manifest, schema)


def test_model_with_weights_but_no_default_tag(tmp_path, monkeypatch):
    write_manifest(
        tmp_path / "manifest.json",
        monkeypatch,
        hub={"repo_id": "org/small", "revision": None, "filename": "model.safetensors", "sha256": None, "size": None},
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["default_tags"] = {}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        W.UnknownWeightsError, match="'densenet_40_k12' has no default weights: pass weights=<tag>, one of test"
    ):
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


# ---------------------------------------------------------------------------------------------------------------
# The model card


def test_model_card_is_read_back_by_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard

    metrics = [
        {
            "dataset": "imagenet-1k-val",
            "top1": 74.75,
            "top5": 92.158,
            "image_size": 224,
            "crop_pct": 0.875,
            "protocol": "timm",
            "reported_by": "timm",
        }
    ]
    W.save_pretrained(
        small_model(),
        tmp_path,
        tag="ft",
        license="apache-2.0",
        metrics=metrics,
        dataset="cifar10",
        base_model="timm/densenet121.tv_in1k",
    )
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license, data.base_model) == (
        "densenet_efficient",
        "image-classification",
        "apache-2.0",
        "timm/densenet121.tv_in1k",
    )
    assert data.datasets == ["cifar10", "imagenet-1k-val"] and data.model_name == "densenet_40_k12.ft"
    results = {(r.metric_name, r.dataset_name): r.metric_value for r in data.eval_results}
    assert results == {("top-1 accuracy", "imagenet-1k-val"): 74.75, ("top-5 accuracy", "imagenet-1k-val"): 92.158}
    assert data.eval_results[0].task_type == "image-classification"
    assert data.eval_results[0].metric_args == {
        "image_size": 224,
        "crop_pct": 0.875,
        "protocol": "timm",
        "reported_by": "timm",
    }
    assert data.to_dict()["files"] == ["model.safetensors", "config.json", "README.md"]
    assert "de.transforms(model)" in card.text


def test_model_card_of_a_manifest_entry_is_byte_reproducible():
    entry = W.load_manifest()["weights"]["densenet121_efficient.ra_in1k"]
    entry["hub"]["size"], entry["hub"]["sha256"] = 1, "0" * 64
    assert model_card(entry) == model_card(json.loads(json.dumps(entry)))
    assert "76.486" in model_card(entry) and "license: apache-2.0" in model_card(entry)


# ---------------------------------------------------------------------------------------------------------------
# Writes that leave nothing half-done


def test_foreign_readme_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n")
    with pytest.raises(
        FileExistsError, match="README.md exists and was not written by save_pretrained: pass overwrite=True"
    ):
        W.save_pretrained(small_model(), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]  # nothing written
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    W.save_pretrained(small_model(), tmp_path, overwrite=True)
    assert "library_name: densenet_efficient" in (tmp_path / "README.md").read_text()
    W.save_pretrained(small_model(), tmp_path)  # its own card is replaced without asking


def test_a_save_interrupted_between_its_renames_is_refused_until_saved_again(tmp_path, monkeypatch):
    W.save_pretrained(randomise_batch_norm(small_model()), tmp_path)
    real_replace = os.replace

    def replace_then_die(source, target):
        real_replace(source, target)
        raise KeyboardInterrupt  # killed after the weights were renamed, before the card and config

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        W.save_pretrained(randomise_batch_norm(small_model()), tmp_path)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for reference in (tmp_path, tmp_path / "model.safetensors"):  # the weights are not those config.json seals
        with pytest.raises(W.InvalidWeightsFileError, match="save again"):
            de.create_model("densenet_40_k12", weights=str(reference))
    new = randomise_batch_norm(small_model())
    W.save_pretrained(new, tmp_path)
    torch.testing.assert_close(logits(de.create_model("densenet_40_k12", weights=str(tmp_path))), logits(new))


def test_a_first_save_is_renamed_into_place_whole(tmp_path, monkeypatch):
    def die(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        W.save_pretrained(small_model(), tmp_path / "new")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no folder, no staging left


def test_the_bytes_hashed_are_the_bytes_loaded(tmp_path):
    """The reference is resolved (config read, weights hashed) before the tensors are used: a save in between
    must not hand out the new file's tensors under the old file's checked sha256."""
    from densenet_efficient.pretrained.loading import resolve_weights

    old, new = randomise_batch_norm(small_model()), randomise_batch_norm(small_model())
    W.save_pretrained(old, tmp_path)
    weights = resolve_weights("densenet_40_k12", str(tmp_path))
    W.save_pretrained(new, tmp_path)
    state = weights.read()
    assert all(torch.equal(state[key], value) for key, value in old.state_dict().items())


_SAVE_LOOP = (
    "import densenet_efficient as de",
    "from densenet_efficient import pretrained as W",
    "models = [de.create_model('densenet_40_k12', weights=path) for path in sys.argv[2:]]",
    "print('saving', flush=True)",
    "for step in range(6):",
    "    W.save_pretrained(models[step % len(models)], sys.argv[1])",
)


@pytest.mark.slow  # a second Python process importing torch
def test_a_reader_during_saves_gets_one_whole_set_or_a_clear_error(tmp_path):
    models = {}
    for name in ("a", "b"):
        W.save_pretrained(randomise_batch_norm(small_model()), tmp_path / name)
        models[name] = logits(de.create_model("densenet_40_k12", weights=str(tmp_path / name)))
    target = tmp_path / "target"
    W.save_pretrained(de.create_model("densenet_40_k12", weights=str(tmp_path / "a")), target)
    code = "\n".join(("import sys", *_SAVE_LOOP))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(target), str(tmp_path / "a"), str(tmp_path / "b")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline() == "saving\n"  # read while it saves, not while it imports torch
    loads = 0
    while writer.poll() is None or loads == 0:
        try:
            result = logits(de.create_model("densenet_40_k12", weights=str(target)))
        except W.InvalidWeightsFileError as error:  # between two renames: the seal does not match
            assert "save again" in str(error)
            continue
        assert any(torch.equal(result, expected) for expected in models.values())
        loads += 1
    assert writer.wait(timeout=120) == 0


def test_a_full_disk_names_the_file_and_keeps_the_previous_set(tmp_path, monkeypatch):
    import builtins
    import errno

    old = randomise_batch_norm(small_model())
    W.save_pretrained(old, tmp_path)
    real_open = builtins.open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDiskFile(file) if "w" in mode and ".save-" in str(path) else file

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(OSError, match=r"cannot write .*model.safetensors: No space left on device") as error:
        W.save_pretrained(randomise_batch_norm(small_model()), tmp_path)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    torch.testing.assert_close(logits(de.create_model("densenet_40_k12", weights=str(tmp_path))), logits(old))
