"""Resolving a ``weights=`` reference and loading the tensors it names into a model.

A reference is one of

- a tag of the model in ``weights_manifest.json`` (``pretrained=True`` means the model's default tag);
- a path to a ``.safetensors`` file (or a torchvision-style ``.pth``, read with ``weights_only=True``), or to a
  folder written by :func:`save_pretrained`; a ``config.json`` beside the file gives the constructor arguments;
- ``"hf-hub:org/name[@revision]"``: a Hub repo with ``model.safetensors`` and ``config.json``.

Downloads and their sha256 checks live in :mod:`.download`; this module imports it (and
``safetensors``, ``huggingface_hub``) only when a file has to be read or fetched, so ``import densenet_efficient``
stays light.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import list_models
from .errors import (
    IncompatibleWeightsError,
    InvalidWeightsFileError,
    UnknownWeightsError,
)
from .manifest import weights_entry

WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
HF_HUB_PREFIX = "hf-hub:"
# torchvision's legacy checkpoints name ``denselayer1.norm.1.weight`` what is now ``denselayer1.norm1.weight``.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


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
        from .download import fetch_manifest_weights

        return read_state_dict(fetch_manifest_weights(key, entry, cache_dir=cache_dir, endpoint=endpoint))

    return PretrainedWeights(key, dict(entry["model_args"]), read)


def _hub_weights(name: str, reference: str, cache_dir, endpoint) -> PretrainedWeights:
    from .download import fetch_hub_file

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
