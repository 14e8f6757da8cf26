"""Small models, files and manifests that the pretrained-weights tests share."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import torch

import densenet_efficient as de
from densenet_efficient import pretrained as W
from densenet_efficient.pretrained.manifest import MANIFEST_ENV

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
    return {
        str(path.relative_to(cache))
        for path in cache.rglob("*")
        if ("blobs" in path.parts or "snapshots" in path.parts) and not path.is_dir()
    }


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


def manifest_entry(hub: dict | None, url: dict | None = None, **fields) -> dict:
    """A complete manifest entry (one that satisfies the schema) for the small densenet_40_k12, tag ``test``."""
    entry = {
        "model": "densenet_40_k12",
        "tag": "test",
        "model_args": small_model().config,
        "num_classes": 10,
        "label_source": "CIFAR-10",
        "input_size": [3, 32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "metrics": [
            {
                "dataset": "cifar10-test",
                "top1": 50.0,
                "top5": 90.0,
                "image_size": 32,
                "crop_pct": 1.0,
                "protocol": "centre crop 32 px",
                "reported_by": "these tests",
            }
        ],
        "license": "mit",
        "source": "these tests",
        "hub": hub,
        "url": url,
        **fields,
    }
    return json.loads(json.dumps(entry))


def write_manifest(path: Path, monkeypatch, hub: dict | None, url: dict | None = None, **fields) -> None:
    """A manifest with one entry, densenet_40_k12.test (the default tag), and use it."""
    entry = manifest_entry(hub, url, **fields)
    manifest = {
        "version": 1,
        "default_tags": {"densenet_40_k12": "test"},
        "weights": {"densenet_40_k12.test": json.loads(json.dumps(entry))},
    }
    path.write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(path))


def hub_entry(commit: str | None, files: dict[str, bytes], repo_id: str = "org/small", pinned: bool = True) -> dict:
    data = files["model.safetensors"]
    return {
        "repo_id": repo_id,
        "revision": commit,
        "filename": "model.safetensors",
        "sha256": hashlib.sha256(data).hexdigest() if pinned else None,
        "size": len(data),
    }


def manifest_schema() -> dict:
    return json.loads((REPO_ROOT / "densenet_efficient" / "pretrained" / "weights_manifest.schema.json").read_text())


class FullDiskFile:
    """A file opened for writing on a full disk: every write raises ENOSPC; closing closes ``file``."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
