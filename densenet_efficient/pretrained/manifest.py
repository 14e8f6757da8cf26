"""The weights manifest (``weights_manifest.json``): which weights exist for which model, where they live, and
how they were measured. ``DENSENET_EFFICIENT_MANIFEST`` names another manifest file (a mirror, or tests).

The manifest is checked against its JSON Schema (``weights_manifest.schema.json``) every time it is read, and
each entry is handed out as a frozen :class:`PretrainedCfg`, never as a raw dict.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..core.config import architecture_cfg, check_pretrained_cfg, with_pool_sizes
from .errors import ManifestError, UnknownWeightsError
from .files import read_regular_file

MANIFEST_FILENAME = "weights_manifest.json"
SCHEMA_FILENAME = "weights_manifest.schema.json"
MANIFEST_ENV = "DENSENET_EFFICIENT_MANIFEST"
_MAX_MANIFEST_BYTES = 16 * 2**20  # a regular file: a FIFO or a folder named by the variable is refused, not read
DEFAULT_TAG = "DEFAULT"  # torchvision's spelling of "the model's default weights"
# Entry fields that are pretrained_cfg keys of the same meaning.
_INPUT_FIELDS = ("input_size", "test_input_size", "mean", "std", "interpolation", "crop_pct", "test_crop_pct")


@dataclass(frozen=True)
class Metric:
    """One published result: top-1/top-5 (%) on ``dataset``, measured at ``image_size`` px with ``crop_pct``."""

    dataset: str
    top1: float
    top5: float | None
    image_size: int
    crop_pct: float
    protocol: str
    reported_by: str


@dataclass(frozen=True)
class HubFile:
    """A weights file in a Hugging Face Hub repo; ``revision``/``sha256``/``size`` are ``None`` when not pinned."""

    repo_id: str
    revision: str | None
    filename: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class UrlFile:
    """A torchvision-style ``.pth`` URL (https) whose name carries ``sha256_prefix``; ``sha256``, when recorded,
    pins the whole file and is what is checked."""

    url: str
    sha256_prefix: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class PretrainedCfg:
    """One manifest entry (``model.tag``): constructor arguments, preprocessing, labels, results, license and
    where the file lives. Frozen; sequences are tuples. :meth:`to_dict` gives the manifest's JSON form back.

    ``input_size`` is ``(channels, *spatial)`` (1 to 3 spatial sizes); ``test_input_size``/``test_crop_pct``
    (when set) are the size and crop the best published result was measured at. ``labels`` names a standard label list
    (``"imagenet-1k"``: torchvision's ImageNet category names).
    """

    model: str
    tag: str
    model_args: Mapping[str, Any]
    num_classes: int
    label_source: str | None
    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str | None
    crop_pct: float | None
    metrics: tuple[Metric, ...]
    license: str | None
    source: str
    hub: HubFile | None
    url: UrlFile | None
    license_source: str | None = None
    labels: str | None = None
    test_input_size: tuple[int, ...] | None = None
    test_crop_pct: float | None = None

    @property
    def key(self) -> str:
        return f"{self.model}.{self.tag}"

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> PretrainedCfg:
        """From a manifest entry that satisfies the schema."""
        fields = dict(entry)
        fields["model_args"] = _frozen_args(entry["model_args"])
        for key in ("input_size", "test_input_size", "mean", "std"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        fields["metrics"] = tuple(Metric(**metric) for metric in entry["metrics"])
        fields["hub"] = HubFile(**entry["hub"]) if entry.get("hub") else None
        fields["url"] = UrlFile(**entry["url"]) if entry.get("url") else None
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry as JSON-ready dicts and lists (optional fields left out when unset)."""
        entry: dict[str, Any] = {field.name: getattr(self, field.name) for field in fields(self)}
        entry["model_args"] = dict(self.model_args)
        entry["metrics"] = [asdict(metric) for metric in self.metrics]
        entry["hub"] = asdict(self.hub) if self.hub else None
        entry["url"] = asdict(self.url) if self.url else None
        for key in ("license_source", "labels", "test_input_size", "test_crop_pct"):
            if entry[key] is None:
                del entry[key]
        return json.loads(json.dumps(entry))

    def model_cfg(self) -> dict[str, Any]:
        """The weights' configuration in timm's ``pretrained_cfg`` keys (what ``model.pretrained_cfg`` holds after
        loading them, and what timm's registry holds for ``model.tag``): the architecture's defaults
        (:func:`~densenet_efficient.core.config.architecture_cfg`) updated with this entry's input, labels and
        weights location. ``labels="imagenet-1k"`` gives torchvision's category names as ``label_names``."""
        args = self.model_args
        stem, num_blocks = args.get("stem", "imagenet"), len(args["block_config"])
        cfg = architecture_cfg(stem, args.get("in_chans", 3), self.num_classes, len(self.input_size) - 1, num_blocks)
        cfg.update(
            architecture=self.model,
            tag=self.tag,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            license=self.license,
            description=self.source,
        )
        if self.interpolation is not None:
            cfg["interpolation"] = self.interpolation
        if self.crop_pct is not None:
            cfg["crop_pct"] = self.crop_pct
        if self.test_input_size is not None:
            cfg["test_input_size"] = self.test_input_size
        if self.test_crop_pct is not None:
            cfg["test_crop_pct"] = self.test_crop_pct
        if self.hub is not None:
            cfg["hf_hub_id"] = self.hub.repo_id
            cfg["hf_hub_filename"] = self.hub.filename
        if self.url is not None:
            cfg["url"] = self.url.url
        names = label_names(self.labels)
        if names is not None:
            cfg["label_names"] = names
        return check_pretrained_cfg(with_pool_sizes(cfg, stem, num_blocks))


def label_names(labels: str | None) -> tuple[str, ...] | None:
    """The names of a standard label list (``"imagenet-1k"``: torchvision's ImageNet category names); ``None``
    for none, or without torchvision."""
    if labels != "imagenet-1k":
        return None
    try:
        from torchvision.models import DenseNet121_Weights
    except ImportError:
        return None
    return tuple(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])


def _frozen_args(model_args: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(
        {key: tuple(value) if isinstance(value, list) else value for key, value in model_args.items()}
    )


def manifest_path() -> Path:
    """The manifest in use: ``$DENSENET_EFFICIENT_MANIFEST`` if set, else the one shipped in the package."""
    override = os.environ.get(MANIFEST_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files(__package__).joinpath(MANIFEST_FILENAME)))


def manifest_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12), shipped beside it in the package."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILENAME).read_text(encoding="utf-8"))


def validate_manifest(manifest: Any, where: str | os.PathLike) -> None:
    """Raise :class:`ManifestError` naming ``where``, the offending field and the rule it breaks, unless
    ``manifest`` satisfies the schema and every entry's key is ``model.tag`` with its default tags present."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        field = "".join(f"[{part!r}]" for part in error.absolute_path) or "(top level)"
        raise ManifestError(f"{where} is not a valid weights manifest: {field}: {error.message}")
    for key, entry in manifest["weights"].items():
        if key != f"{entry['model']}.{entry['tag']}":
            raise ManifestError(f"{where}: entry {key!r} is for {entry['model']}.{entry['tag']}; keys are model.tag")
        try:  # what JSON Schema cannot say: NaN, one mean/std per channel, sizes of one rank
            check_pretrained_cfg({name: entry[name] for name in _INPUT_FIELDS if entry.get(name) is not None})
        except ValueError as error:
            raise ManifestError(f"{where}: entry {key!r}: {error}") from None
        url = entry["url"]
        if url and url["sha256"] and not url["sha256"].startswith(url["sha256_prefix"]):
            raise ManifestError(
                f"{where}: entry {key!r}: url.sha256 {url['sha256']} does not start with url.sha256_prefix "
                f"{url['sha256_prefix']} (the prefix in the file name); one of them is wrong"
            )
    for model, tag in manifest["default_tags"].items():
        if f"{model}.{tag}" not in manifest["weights"]:
            raise ManifestError(f"{where}: the default tag of {model!r} is {tag!r}, which has no entry")


def load_manifest() -> dict[str, Any]:
    """The manifest as JSON: ``{"version": 1, "default_tags": {model: tag}, "weights": {"model.tag": entry}}``.
    One that ``$DENSENET_EFFICIENT_MANIFEST`` names is validated (:func:`validate_manifest`, :class:`ManifestError`
    otherwise); the shipped one was validated once, by the tests and ``python -m export.manifest``."""
    path = manifest_path()
    try:
        data = read_regular_file(path, _MAX_MANIFEST_BYTES, ManifestError)
    except FileNotFoundError as error:
        raise ManifestError(f"cannot read the weights manifest {path}: {error}") from error
    try:
        manifest = json.loads(data)
    except ValueError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from error
    if os.environ.get(MANIFEST_ENV):
        validate_manifest(manifest, path)
    return manifest


def list_pretrained(pattern: str = "*") -> list[str]:
    """Sorted ``model.tag`` keys of the manifest that match the shell-style ``pattern``."""
    return sorted(key for key in load_manifest()["weights"] if fnmatch.fnmatchcase(key, pattern))


def get_pretrained_cfg(key: str) -> PretrainedCfg:
    """The manifest entry ``"model.tag"`` (``"model"`` alone: its default tag) as a :class:`PretrainedCfg`."""
    if not isinstance(key, str):
        raise TypeError(f"expected 'model.tag' as a str, got {type(key).__name__} {key!r}")
    name, _, tag = key.partition(".")
    return weights_entry(name, tag or None)


def weights_entry(name: str, tag: str | None = None) -> PretrainedCfg:
    """The manifest entry for model ``name`` and ``tag`` (``None`` or ``"DEFAULT"``: the model's default tag)."""
    manifest = load_manifest()
    tags = sorted(key.split(".", 1)[1] for key in manifest["weights"] if key.split(".", 1)[0] == name)
    if not tags:
        with_weights = sorted({key.split(".", 1)[0] for key in manifest["weights"]})
        raise UnknownWeightsError(
            f"No pretrained weights are published for {name!r}. Models with weights: {', '.join(with_weights)}. "
            f"Pass weights='path/to/model.safetensors' or 'hf-hub:org/name' to load your own."
        )
    if tag is None or tag == DEFAULT_TAG:
        tag = manifest["default_tags"].get(name)
        if tag is None:
            raise UnknownWeightsError(f"{name!r} has no default weights: pass weights=<tag>, one of {', '.join(tags)}.")
    if tag not in tags:
        raise UnknownWeightsError(
            f"Unknown weights tag {tag!r} for {name!r}. Valid tags: {', '.join(tags)}, "
            f"or {DEFAULT_TAG!r} for the default."
        )
    return PretrainedCfg.from_dict(manifest["weights"][f"{name}.{tag}"])
