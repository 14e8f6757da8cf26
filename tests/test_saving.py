"""save_pretrained: the files it writes and the manifest entry it returns."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

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
    entry = W.get_pretrained_cfg("densenet121_efficient.ra_in1k").to_dict()
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


def test_leftovers_of_an_interrupted_save_are_removed_by_the_next(tmp_path):
    (tmp_path / ".save-abc123.tmp").mkdir()
    (tmp_path / ".save-abc123.tmp" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".model.safetensors.k2j3.tmp").write_bytes(b"y" * 1000)  # write_atomically's, killed mid-write
    (tmp_path / "notes.txt").write_text("mine")
    W.save_pretrained(small_model(), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]


def test_interruption_between_renames_loads_the_previous_set(tmp_path, monkeypatch):
    old = randomise_batch_norm(small_model())
    W.save_pretrained(old, tmp_path)
    real_replace, renamed = os.replace, []

    def replace_then_die(source, target):
        if renamed:
            raise KeyboardInterrupt  # killed after the weights were renamed, before the card and config
        renamed.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        W.save_pretrained(randomise_batch_norm(small_model()), tmp_path)
    monkeypatch.undo()
    assert [path.name for path in renamed] == ["model.safetensors"]
    with pytest.warns(UserWarning, match="in progress or was interrupted .*loaded the set it replaces"):
        loaded = de.create_model("densenet_40_k12", weights=str(tmp_path))
    torch.testing.assert_close(logits(loaded), logits(old), rtol=0, atol=0)
    with pytest.raises(W.InvalidWeightsFileError, match="not the file .*config.json was written for"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "model.safetensors"))  # the file alone: mixed
    new = randomise_batch_norm(small_model())
    W.save_pretrained(new, tmp_path)  # completes the folder and removes what the interrupted save left
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    torch.testing.assert_close(logits(de.create_model("densenet_40_k12", weights=str(tmp_path))), logits(new))


# ---------------------------------------------------------------------------------------------------------------
# Killed saves, concurrent saves and readers (issue 17): real processes


def _python(*code_lines: str, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """A Python process running ``code_lines`` with this checkout on its path."""
    code = "\n".join(("import os, signal, sys", *code_lines))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)


_SAVE_KILLED_AFTER_THE_WEIGHTS = (
    "import torch",
    "from tests.weights_helpers import randomise_batch_norm, small_model",
    "from densenet_efficient import pretrained as W",
    "real_replace = os.replace",
    "def replace_then_die(source, target):",
    "    real_replace(source, target)",
    "    if os.path.basename(target) == 'model.safetensors':",
    "        os.kill(os.getpid(), signal.SIGKILL)",
    "os.replace = replace_then_die",
    "W.save_pretrained(randomise_batch_norm(small_model()), sys.argv[1])",
)


def _finished(process: subprocess.Popen) -> int:
    """Wait for ``process`` (2 minutes at most); its exit status, with its stderr shown if it is not 0."""
    _, stderr = process.communicate(timeout=120)
    if process.returncode != 0:
        print(stderr.decode(), file=sys.stderr)
    return process.returncode


def test_sigkill_between_the_renames_keeps_the_previous_set_loadable(tmp_path):
    old = randomise_batch_norm(small_model())
    old_bytes = saved_files(old, tmp_path)["model.safetensors"]
    assert _finished(_python(*_SAVE_KILLED_AFTER_THE_WEIGHTS, args=(str(tmp_path),))) == -signal.SIGKILL
    assert (tmp_path / "model.safetensors").read_bytes() != old_bytes  # the new weights are in place, not sealed
    with pytest.warns(UserWarning, match="loaded the set it replaces"):
        loaded = de.create_model("densenet_40_k12", weights=str(tmp_path))
    torch.testing.assert_close(logits(loaded), logits(old), rtol=0, atol=0)
    W.save_pretrained(old, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_first_save_killed_between_the_renames_is_named_incomplete(tmp_path):
    assert _finished(_python(*_SAVE_KILLED_AFTER_THE_WEIGHTS, args=(str(tmp_path),))) == -signal.SIGKILL
    assert (tmp_path / "model.safetensors").is_file()
    with pytest.raises(W.InvalidWeightsFileError, match="incomplete save_pretrained: it was interrupted"):
        de.create_model("densenet_40_k12", weights=str(tmp_path))


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
    "for step in range(6):",
    "    W.save_pretrained(models[step % len(models)], sys.argv[1])",
)


@pytest.mark.slow  # a second Python process importing torch
def test_a_concurrent_save_into_one_folder_waits_its_turn(tmp_path):
    """A save that starts while another one is between its staging and its renames: before, its cleanup deleted
    the other's staging folder (a raw FileNotFoundError there); now saves take turns and both succeed."""
    W.save_pretrained(randomise_batch_norm(small_model()), tmp_path / "a")
    target, ready = tmp_path / "target", tmp_path / "ready"
    first = _python(
        "import time",
        "import densenet_efficient as de",
        "from densenet_efficient import pretrained as W",
        "model = de.create_model('densenet_40_k12', weights=sys.argv[2])",
        "real_replace = os.replace",
        "def replace_slowly(source, target):",
        "    if not os.path.exists(sys.argv[3]):",
        "        open(sys.argv[3], 'w').close()",
        "        time.sleep(1.0)",
        "    real_replace(source, target)",
        "os.replace = replace_slowly",
        "W.save_pretrained(model, sys.argv[1])",
        args=(str(target), str(tmp_path / "a"), str(ready)),
    )
    while not ready.exists() and first.poll() is None:
        time.sleep(0.01)
    second = randomise_batch_norm(small_model())
    W.save_pretrained(second, target)
    assert _finished(first) == 0
    assert sorted(path.name for path in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    torch.testing.assert_close(logits(de.create_model("densenet_40_k12", weights=str(target))), logits(second))


@pytest.mark.slow  # two Python processes importing torch
def test_a_reader_during_saves_always_gets_one_whole_set(tmp_path):
    models = {}
    for name in ("a", "b"):
        W.save_pretrained(randomise_batch_norm(small_model()), tmp_path / name)
        models[name] = logits(de.create_model("densenet_40_k12", weights=str(tmp_path / name)))
    target = tmp_path / "target"
    W.save_pretrained(de.create_model("densenet_40_k12", weights=str(tmp_path / "a")), target)
    writer = _python(*_SAVE_LOOP, args=(str(target), str(tmp_path / "a"), str(tmp_path / "b")))
    loads = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "in progress ...: loaded the set it replaces"
        while writer.poll() is None or loads == 0:
            result = logits(de.create_model("densenet_40_k12", weights=str(target)))
            assert any(torch.equal(result, expected) for expected in models.values())
            loads += 1
    assert _finished(writer) == 0


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
