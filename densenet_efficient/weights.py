"""Pretrained weights: the manifest, resolving a ``weights=`` reference, loading and saving.

A reference is one of

- a tag of the model in ``weights_manifest.json`` (``pretrained=True`` means the model's default tag);
- a path to a ``.safetensors`` file (or a torchvision-style ``.pth``, read with ``weights_only=True``), or to a
  folder written by :func:`save_pretrained`; a ``config.json`` beside the file gives the constructor arguments;
- ``"hf-hub:org/name[@revision]"``: a Hub repo with ``model.safetensors`` and ``config.json``.

Downloads and their sha256 checks live in :mod:`densenet_efficient.hub`; this module imports it (and
``safetensors``, ``huggingface_hub``) only when a file has to be read or fetched, so ``import densenet_efficient``
stays light. ``DENSENET_EFFICIENT_MANIFEST`` names another manifest file (a mirror, or tests).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MANIFEST_FILENAME = "weights_manifest.json"
MANIFEST_ENV = "DENSENET_EFFICIENT_MANIFEST"
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
CARD_FILENAME = "README.md"
HF_HUB_PREFIX = "hf-hub:"
# torchvision's legacy checkpoints name ``denselayer1.norm.1.weight`` what is now ``denselayer1.norm1.weight``.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
_ENTRY_KEYS_COMPUTED = ("model", "model_args", "num_classes", "hub", "url")


class UnknownWeightsError(ValueError):
    """The ``weights`` reference names no tag, file or Hub repo that fits the model."""


class IncompatibleWeightsError(ValueError):
    """The weights do not fit the model: missing, unexpected or differently shaped tensors."""


class InvalidWeightsFileError(ValueError):
    """A weights file that cannot be read (truncated, empty, not a checkpoint)."""


class ChecksumMismatchError(OSError):
    """A file's sha256 is not the one expected; the bad copy has been removed from the cache."""


class WeightsNotAvailableError(OSError):
    """The weights file is neither reachable nor cached; the message says where to get it."""


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def manifest_path() -> Path:
    """The manifest in use: ``$DENSENET_EFFICIENT_MANIFEST`` if set, else the one shipped in the package."""
    override = os.environ.get(MANIFEST_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files(__package__).joinpath(MANIFEST_FILENAME)))


def load_manifest() -> dict[str, Any]:
    """The manifest as a dict: ``{"default_tags": {model: tag}, "weights": {"model.tag": entry}}``."""
    return json.loads(manifest_path().read_text(encoding="utf-8"))


def list_pretrained(pattern: str = "*") -> list[str]:
    """Sorted ``model.tag`` keys of the manifest that match the shell-style ``pattern``."""
    return sorted(key for key in load_manifest()["weights"] if fnmatch.fnmatchcase(key, pattern))


def weights_entry(name: str, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(key, entry)`` of the manifest for model ``name`` and ``tag`` (``None``: the model's default tag)."""
    manifest = load_manifest()
    tags = sorted(key.split(".", 1)[1] for key in manifest["weights"] if key.split(".", 1)[0] == name)
    if not tags:
        with_weights = sorted({key.split(".", 1)[0] for key in manifest["weights"]})
        raise UnknownWeightsError(
            f"No pretrained weights are published for {name!r}. Models with weights: {', '.join(with_weights)}. "
            f"Pass weights='path/to/model.safetensors' or 'hf-hub:org/name' to load your own."
        )
    tag = tag or manifest["default_tags"].get(name)
    if tag is None:
        raise UnknownWeightsError(f"{name!r} has no default weights: pass weights=<tag>, one of {', '.join(tags)}.")
    if tag not in tags:
        raise UnknownWeightsError(f"Unknown weights tag {tag!r} for {name!r}. Valid tags: {', '.join(tags)}.")
    key = f"{name}.{tag}"
    return key, manifest["weights"][key]


# ---------------------------------------------------------------------------------------------------------------
# Resolving and loading


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights that a reference resolved to: where they come from, the constructor arguments they need, and a
    ``read`` callable that fetches, verifies and reads the tensors."""

    source: str
    model_args: dict[str, Any]
    read: Callable[[], dict[str, Tensor]]

    def load_into(self, model: nn.Module) -> nn.Module:
        """Read the tensors and load them into ``model`` (see :func:`load_state_dict_into`)."""
        return load_state_dict_into(model, self.read(), self.source)


def resolve_weights(name: str, weights: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                    endpoint: str | None = None) -> PretrainedWeights:
    """Resolve ``weights`` (a tag, a path, ``hf-hub:org/name[@revision]``, or ``None`` for the default tag) for
    model ``name``. Hub references fetch ``config.json`` now; the weights themselves are fetched by ``read()``.

    ``cache_dir`` and ``endpoint`` override the Hugging Face cache folder and Hub address (``HF_HUB_CACHE``,
    ``HF_ENDPOINT``) for this call.
    """
    reference = None if weights is None else os.fspath(weights)
    if reference is not None and reference.startswith(HF_HUB_PREFIX):
        return _hub_weights(name, reference, cache_dir, endpoint)
    if reference is None or _looks_like_tag(reference):
        return _manifest_weights(name, reference, cache_dir, endpoint)
    return _local_weights(name, Path(reference).expanduser())


def _looks_like_tag(reference: str) -> bool:
    return "/" not in reference and os.sep not in reference and not Path(reference).exists()


def load_pretrained(model: nn.Module, name: str, weights: str | os.PathLike | None = None, *,
                    cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> nn.Module:
    """Load the weights ``weights`` refers to (see :func:`resolve_weights`) into ``model`` and return it.

    The weights' constructor arguments are not applied: build the model with ``create_model(name, weights=...)``
    to get them. A different ``num_classes`` keeps the model's fresh classifier (with a warning).
    """
    return resolve_weights(name, weights, cache_dir=cache_dir, endpoint=endpoint).load_into(model)


def _manifest_weights(name: str, tag: str | None, cache_dir, endpoint) -> PretrainedWeights:
    key, entry = weights_entry(name, tag)

    def read() -> dict[str, Tensor]:
        from .hub import fetch_manifest_weights

        return read_state_dict(fetch_manifest_weights(key, entry, cache_dir=cache_dir, endpoint=endpoint))

    return PretrainedWeights(key, dict(entry["model_args"]), read)


def _hub_weights(name: str, reference: str, cache_dir, endpoint) -> PretrainedWeights:
    from .hub import fetch_hub_file

    repo_id, _, revision = reference[len(HF_HUB_PREFIX):].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UnknownWeightsError(f"Invalid Hub reference {reference!r}: expected 'hf-hub:org/name[@revision]'.")
    config_path = Path(fetch_hub_file(repo_id, CONFIG_FILENAME, revision=revision or None, cache_dir=cache_dir,
                                      endpoint=endpoint))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    commit = config_path.parent.name  # the cache's snapshots/<commit>/ folder: the weights of that same commit

    def read() -> dict[str, Tensor]:
        return read_state_dict(fetch_hub_file(repo_id, WEIGHTS_FILENAME, revision=commit, cache_dir=cache_dir,
                                              endpoint=endpoint))

    return PretrainedWeights(reference, _model_args_from_config(name, config, reference), read)


def _local_weights(name: str, path: Path) -> PretrainedWeights:
    file = path / WEIGHTS_FILENAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"No weights file at {file}. Pass a weights tag of {name!r}, a .safetensors file, a folder written by "
            f"save_pretrained, or 'hf-hub:org/name[@revision]'."
        )
    config_file = file.with_name(CONFIG_FILENAME)
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return PretrainedWeights(str(file), _model_args_from_config(name, config, str(config_file)),
                             lambda: read_state_dict(file))


def _model_args_from_config(name: str, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Constructor arguments from a ``config.json``; refuses one written for another registered model."""
    from .registry import list_models

    saved_for = config.get("architecture")
    if saved_for in list_models() and saved_for != name:
        raise UnknownWeightsError(
            f"{where} describes weights for {saved_for!r}, not {name!r}: use create_model({saved_for!r}, weights=...)."
        )
    return dict(config.get("model_args", {}))


def rename_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision's legacy names (``denselayer1.norm.1.weight``) to current ones (``denselayer1.norm1.weight``)."""
    return {_LEGACY_KEY.sub(r"\1\2", key): value for key, value in state_dict.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` file read with ``weights_only=True``, with
    legacy torchvision key names mapped to current ones."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(path)
        except SafetensorError as error:
            raise InvalidWeightsFileError(f"{path} is not a valid safetensors file: {error}") from error
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for a bad file; all mean "unreadable"
            raise InvalidWeightsFileError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise InvalidWeightsFileError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
    return rename_legacy_keys(state_dict)


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, except a classifier of another size, which is skipped with a
    warning (fine-tuning). Raises :class:`IncompatibleWeightsError` naming missing, unexpected and misshapen keys."""
    state_dict, classifier_skipped = _without_mismatched_classifier(model, rename_legacy_keys(state_dict), source)
    expected = model.state_dict()
    exempt = set(_CLASSIFIER_KEYS) if classifier_skipped else set()
    # BatchNorm fills in a missing num_batches_tracked itself (torchvision's files have none).
    missing = [k for k in expected if k not in state_dict and k not in exempt and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
                 if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshapen:
        raise IncompatibleWeightsError(
            f"The weights from {source} do not fit this {type(model).__name__} (another architecture?): "
            f"{_listing('missing', missing)}; {_listing('unexpected', unexpected)}; "
            f"{_listing('with another shape (weights vs model)', misshapen)}."
        )
    model.load_state_dict(state_dict, strict=not classifier_skipped)
    return model


def _listing(what: str, keys: list[str], shown: int = 5) -> str:
    keys = sorted(keys, key=lambda key: key.endswith("num_batches_tracked"))  # the telling keys first
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what}" + (f" ({', '.join(keys[:shown])}{more})" if keys else "")


def _without_mismatched_classifier(model: nn.Module, state_dict: dict[str, Tensor],
                                   source: str) -> tuple[dict[str, Tensor], bool]:
    """Drop the weights' classifier if the model has another number of classes (0: none), with a warning.
    Returns the state dict and whether the classifier was dropped."""
    model_classes = _num_classes(model.state_dict())
    weights_classes = _num_classes(state_dict)
    if model_classes == weights_classes:
        return state_dict, False
    warnings.warn(
        f"{source}: the weights have {weights_classes} classes, the model {model_classes}: loaded everything but "
        f"the classifier, which keeps its fresh initialisation (fine-tuning).", stacklevel=3,
    )
    return {k: v for k, v in state_dict.items() if k not in _CLASSIFIER_KEYS}, True


def _num_classes(state_dict: Mapping[str, Tensor]) -> int:
    classifier = state_dict.get("classifier.weight")
    return 0 if classifier is None else classifier.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, architecture: str | None = None,
                    **metadata: Any) -> dict[str, Any]:
    """Write ``model``'s weights to ``directory`` the way the Hub repos of this project hold them, and return the
    manifest entry for them.

    Files (each written to a temporary file, then renamed, so a failure leaves the old one in place):

    - ``model.safetensors``: ``model.state_dict()`` on the CPU with one metadata key (``format: pt``), so the
      same weights always give the same bytes;
    - ``config.json``: ``{"architecture": name, "model_args": constructor arguments, "num_classes": n,
      "pretrained_cfg": metadata}``, enough to rebuild the model with
      ``create_model(name, weights="<directory>")`` or ``weights="hf-hub:org/name"`` once published;
    - ``README.md``: a model card with the architecture, the metadata, the sha256 and how to load it.

    Args:
        model: a ``DenseNet`` (its ``config`` gives the constructor arguments).
        directory: created if needed; existing files of the same names are replaced.
        architecture: registered model name; defaults to ``model.arch_name`` (set by ``create_model``).
        **metadata: JSON-serialisable facts for the manifest entry and the card, e.g. ``tag="c10"``,
            ``dataset="cifar10"``, ``metrics=[{"dataset": ..., "top1": ..., "protocol": ...}]``, ``license=...``,
            ``source="trained here"``, ``mean=[...]``, ``std=[...]``, ``input_size=[3, 32, 32]``.

    Returns:
        ``{"model", "model_args", "num_classes", "hub": {"repo_id": None, "revision": None, "filename",
        "sha256", "size"}, **metadata}``: fill in ``repo_id`` and ``revision`` after publishing.
    """
    from safetensors.torch import save

    name = architecture or getattr(model, "arch_name", None)
    if not name:
        raise ValueError("save_pretrained needs the model's registered name: pass architecture='densenet...'")
    clashes = sorted(set(metadata) & set(_ENTRY_KEYS_COMPUTED))
    if clashes:
        raise ValueError(f"metadata keys {clashes} are computed by save_pretrained; rename them")
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from error

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    weights_bytes = save(tensors, metadata={"format": "pt"})
    model_args = json.loads(json.dumps(model.config))
    entry = {
        **metadata,
        "model": name,
        "model_args": model_args,
        "num_classes": model_args.get("num_classes"),
        "hub": {"repo_id": None, "revision": None, "filename": WEIGHTS_FILENAME,
                "sha256": hashlib.sha256(weights_bytes).hexdigest(), "size": len(weights_bytes)},
        "url": None,
    }
    config = {"architecture": name, "model_args": model_args, "num_classes": entry["num_classes"],
              "pretrained_cfg": metadata}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILENAME, weights_bytes)
    write_atomically(directory / CONFIG_FILENAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    write_atomically(directory / CARD_FILENAME, model_card(entry).encode())
    return entry


def model_card(entry: Mapping[str, Any]) -> str:
    """A Hub model card (``README.md``) for a manifest entry."""
    name, hub = entry["model"], entry["hub"]
    license_line = f"license: {entry['license']}\n" if entry.get("license") else ""
    details = "\n".join(
        f"| {key} | `{json.dumps(value)}` |" for key, value in sorted(entry.items()) if key not in ("hub", "model")
    )
    return (
        f"---\nlibrary_name: densenet_efficient\n{license_line}tags:\n- image-classification\n- densenet\n---\n\n"
        f"# {name}{'.' + entry['tag'] if entry.get('tag') else ''}\n\n"
        f"Weights for `{name}` of [densenet_efficient](https://github.com/densenet-efficient/densenet_efficient), "
        f"a memory-efficient DenseNet with torchvision's state-dict layout.\n\n"
        f"```python\nimport densenet_efficient as de\n\n"
        f"model = de.create_model(\"{name}\", weights=\"hf-hub:{hub.get('repo_id') or 'ORG/NAME'}\")\n"
        f"model = de.create_model(\"{name}\", weights=\"path/to/this/folder\")  # a local copy\n```\n\n"
        f"`{hub['filename']}`: {hub['size']} bytes, sha256 `{hub['sha256']}`.\n\n"
        f"| field | value |\n|---|---|\n{details}\n"
    )


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
