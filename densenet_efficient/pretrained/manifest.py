"""The weights manifest (``weights_manifest.json``, the one table of weights: which weights exist, where they live,
how they were measured; ``DENSENET_EFFICIENT_MANIFEST`` names another). Its JSON Schema is checked by the tests and
``python -m export.manifest``, not on every read; each entry is handed out as a frozen :class:`PretrainedCfg`.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..core.config import InputCfg, architecture_cfg, with_pool_sizes
from .errors import ManifestError, UnknownWeightsError
from .files import read_regular_file

MANIFEST_FILENAME = "weights_manifest.json"
MANIFEST_ENV = "DENSENET_EFFICIENT_MANIFEST"
DEFAULT_TAG = "DEFAULT"  # torchvision's spelling of "the model's default weights"
_INPUT_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "test_input_size", "test_crop_pct")


@dataclass(frozen=True)
class Metric:
    """One published result: top-1/top-5 (%) on ``dataset`` at ``image_size`` px with ``crop_pct``."""

    dataset: str
    top1: float
    top5: float | None
    image_size: int
    crop_pct: float
    protocol: str
    reported_by: str


@dataclass(frozen=True)
class HubFile:
    """A file of a Hub repo; ``revision``/``sha256``/``size`` are ``None`` when not pinned."""

    repo_id: str
    revision: str | None
    filename: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class UrlFile:
    """A torchvision ``.pth`` URL whose name carries ``sha256_prefix``; ``sha256``, when recorded, is checked."""

    url: str
    sha256_prefix: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class PretrainedCfg:
    """One manifest entry (``model.tag``), frozen (sequences are tuples). ``input`` is what the weights expect
    (``labels``, a standard label list such as ``"imagenet-1k"``, gives its ``label_names``)."""

    model: str
    tag: str
    model_args: Mapping[str, Any]
    num_classes: int
    label_source: str | None
    input: InputCfg
    metrics: tuple[Metric, ...]
    license: str | None
    source: str
    hub: HubFile | None
    url: UrlFile | None
    license_source: str | None = None
    labels: str | None = None

    @property
    def key(self) -> str:
        return f"{self.model}.{self.tag}"

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> PretrainedCfg:
        """From a manifest entry; :class:`ManifestError` naming what is missing or wrong."""
        try:
            values: dict[str, Any] = {key: v for key, v in entry.items() if key not in _INPUT_KEYS}
            model_args = {key: tuple(v) if isinstance(v, list) else v for key, v in entry["model_args"].items()}
            inputs = {key: entry.get(key) for key in _INPUT_KEYS} | {"label_names": label_names(entry.get("labels"))}
            values.update(model_args=MappingProxyType(model_args), input=InputCfg.from_dict(inputs))
            values["metrics"] = tuple(Metric(**metric) for metric in entry["metrics"])
            values["hub"] = HubFile(**entry["hub"]) if entry.get("hub") else None
            values["url"] = UrlFile(**entry["url"]) if entry.get("url") else None
            return cls(**values)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ManifestError(f"{manifest_path()}: entry {entry.get('model')}.{entry.get('tag')}: {error}") from None

    def model_cfg(self) -> dict[str, Any]:
        """The weights' timm ``pretrained_cfg`` (``model.pretrained_cfg`` once they are loaded): the architecture's,
        with this entry's input, labels and location."""
        stem, blocks = self.model_args.get("stem", "imagenet"), len(self.model_args["block_config"])
        in_chans, dims = self.model_args.get("in_chans", 3), len(self.input.input_size) - 1
        cfg = architecture_cfg(stem, in_chans, self.num_classes, dims, blocks, self.model) | self.input.to_dict()
        cfg.update(tag=self.tag, license=self.license, description=self.source)
        if self.hub is not None:
            cfg.update(hf_hub_id=self.hub.repo_id, hf_hub_filename=self.hub.filename)
        if self.url is not None:
            cfg["url"] = self.url.url
        return with_pool_sizes(cfg, stem, blocks)  # of checked values: the entry's input, the architecture's


def label_names(labels: str | None) -> tuple[str, ...] | None:
    """The names of a standard label list (``"imagenet-1k"``: torchvision's); else, or without torchvision, None."""
    if labels != "imagenet-1k":
        return None
    try:
        from torchvision.models import DenseNet121_Weights
    except ImportError:
        return None
    return tuple(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])


def manifest_path() -> Path:
    """The manifest in use: ``$DENSENET_EFFICIENT_MANIFEST``, else the one shipped in the package."""
    return Path(os.environ.get(MANIFEST_ENV) or str(resources.files(__package__).joinpath(MANIFEST_FILENAME)))


def load_manifest() -> dict[str, Any]:
    """The manifest: ``{"version": 1, "default_tags": {model: tag}, "weights": {"model.tag": entry}}``."""
    path = manifest_path()
    try:  # read_regular_file raises ManifestError itself, but for a missing file
        manifest = json.loads(read_regular_file(path, 16 * 2**20, ManifestError))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or not {"default_tags", "weights"} <= set(manifest):
        raise ManifestError(f"{path}: a weights manifest is an object with 'default_tags' and 'weights'")
    return manifest


def list_pretrained(pattern: str = "*") -> list[str]:
    """Sorted ``model.tag`` keys of the manifest matching the shell-style ``pattern``."""
    return sorted(key for key in load_manifest()["weights"] if fnmatch.fnmatchcase(key, pattern))


def get_pretrained_cfg(key: str) -> PretrainedCfg:
    """The manifest entry ``"model.tag"`` (``"model"`` alone: its default tag)."""
    if not isinstance(key, str):
        raise TypeError(f"expected 'model.tag' as a str, got {type(key).__name__} {key!r}")
    name, _, tag = key.partition(".")
    return weights_entry(name, tag or None)


def weights_entry(name: str, tag: str | None = None) -> PretrainedCfg:
    """The entry of model ``name`` and ``tag`` (``None`` or ``"DEFAULT"``: the model's default tag)."""
    manifest = load_manifest()
    tags = sorted(key.split(".", 1)[1] for key in manifest["weights"] if key.split(".", 1)[0] == name)
    if not tags:
        with_weights = sorted({key.split(".", 1)[0] for key in manifest["weights"]})
        raise UnknownWeightsError(
            f"No pretrained weights are published for {name!r}; models with weights: {', '.join(with_weights)}; "
            "or pass weights='path/to/model.safetensors' or 'hf-hub:org/name'"
        )
    if tag is None or tag == DEFAULT_TAG:
        tag = manifest["default_tags"].get(name)
        if tag is None:
            raise UnknownWeightsError(f"{name!r} has no default weights: pass weights=<tag>, one of {', '.join(tags)}.")
    if tag not in tags:
        raise UnknownWeightsError(
            f"Unknown weights tag {tag!r} for {name!r}. Valid tags: {', '.join(tags)}, or 'DEFAULT'."
        )
    return PretrainedCfg.from_dict(manifest["weights"][f"{name}.{tag}"])
