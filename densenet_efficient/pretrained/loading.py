"""Resolving a ``weights=`` reference and loading the tensors it names into a model.

A reference is one of

- a tag of the model in ``weights_manifest.json`` (``"DEFAULT"`` or ``pretrained=True``: the model's default tag);
- a path to a ``.safetensors`` file (or a ``.pth``/``.bin`` file, read with ``weights_only=True``), or to a folder
  written by :func:`save_pretrained` or by timm's ``save_for_hf``; a ``config.json`` beside the file gives the
  constructor arguments;
- ``"hf-hub:org/name[@revision]"``: a Hub repo with ``model.safetensors`` and ``config.json`` (this project's or
  timm's).

Every reference and config is checked before anything is built: a ``config.json`` must name known constructor
arguments with sane values (the constructor's own checks, on a one-layer network on the ``meta`` device), and the
number of values its network holds (:func:`state_size`, in closed form) must be the weights file's, so that a
config asking for a huge network is refused before any memory is allocated. The network is built once, on the
CPU, and the weights loaded into it.

Downloads and their sha256 checks live in :mod:`.download`; this module imports it (and ``safetensors``,
``huggingface_hub``) only when a file has to be read or fetched, so ``import densenet_efficient`` stays light.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import MAX_CHANNELS, MAX_CLASSES, WEIGHT_SOURCE_KEYS, adapt_cfg, check_pretrained_cfg
from ..core.model import DenseNet
from ..core.registry import architecture, is_model, list_models, resolve_model
from .errors import (
    IncompatibleWeightsError,
    InvalidConfigError,
    InvalidWeightsFileError,
    UnknownWeightsError,
)
from .files import MAX_WEIGHTS_BYTES, read_regular_file
from .manifest import weights_entry

WEIGHTS_FILENAME = "model.safetensors"
TORCH_WEIGHTS_FILENAME = "pytorch_model.bin"  # what timm's save_for_hf writes without safe_serialization
CONFIG_FILENAME = "config.json"
HF_HUB_PREFIX = "hf-hub:"
_PATH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# torchvision's legacy checkpoints name ``denselayer1.norm.1.weight`` what is now ``denselayer1.norm1.weight``.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$", re.MULTILINE
)
_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
_FIRST_CONV = "features.conv0.weight"
_MAX_BLOCKS = 16  # more dense blocks need inputs of 2**16 px per side or more: such a config is refused unbuilt
PREVIOUS_SET_DIRNAME = ".previous-save"  # save_pretrained keeps the set it replaces here until the new one is sealed

# config.json. This project's (save_pretrained) carries the marker FORMAT_KEY: CONFIG_FORMAT beside timm's keys, so
# that timm ("local-dir:", "hf-hub:") and transformers read it too; a config.json without the marker is timm's
# (save_for_hf, push_to_hub), read only for this package's architectures and timm's DenseNets of the same layout.
FORMAT_KEY, CONFIG_FORMAT = "format", "densenet_efficient"
MODEL_ARGS = (
    "growth_rate",
    "block_config",
    "num_init_features",
    "bn_size",
    "compression",
    "drop_rate",
    "num_classes",
    "in_chans",
    "stem",
    "global_pool",
    "spatial_dims",
)
_TIMM_KEYS = {
    "architecture",
    "model_args",
    "num_classes",
    "num_features",
    "global_pool",
    "pretrained_cfg",
    "label_names",
    "label_descriptions",
}
_OWN_KEYS = {*_TIMM_KEYS, FORMAT_KEY, "weights_sha256"}
# timm's DenseNets whose weights have this package's layout (timm's densenet264d has a deep stem: not listed).
TIMM_DENSENETS = {
    "densenet121": "densenet121_efficient",
    "densenet169": "densenet169_efficient",
    "densenet201": "densenet201_efficient",
    "densenet161": "densenet161_efficient",
}
_TIMM_SHARED_ARGS = ("growth_rate", "block_config", "num_classes", "in_chans", "bn_size")
# timm DenseNet arguments this architecture does not have: accepted only at timm's default value. timm's
# ``memory_efficient`` is its memory mode (this model's ``efficient=``), which does not change the weights.
_TIMM_DEFAULT_ONLY = {
    "global_pool": "avg",
    "stem_type": "",
    "act_layer": "relu",
    "norm_layer": "batchnorm2d",
    "aa_layer": None,
    "aa_stem_only": True,
    "drop_rate": 0.0,
}
_TIMM_ANY_BOOL = ("memory_efficient",)
# What a config may ask for, checked before anything is built (the weights' header then checks every shape).
_MAX_CONFIG_BYTES = 16 * 2**20
_MAX_CONFIG_DEPTH = 8  # this package's and timm's configs nest 3 deep
_MAX_LAYERS = 10_000
_MAX_WIDTH = 4096  # growth rate, stem channels, bottleneck width
_MAX_PARAMETERS = 2**32


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights that a reference resolved to: where they come from, the constructor arguments they need, their
    input configuration (timm's ``pretrained_cfg`` keys), and a ``read`` callable that fetches, verifies and
    reads the tensors. ``vouched``: the bytes are those a seal or pin records (a ``config.json``'s
    ``weights_sha256``, written by :func:`.saving.save_pretrained` after checking the values; the manifest's
    sha256), so their values are not checked again."""

    source: str
    model_args: dict[str, Any]
    read: Callable[[], dict[str, Tensor]]
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    vouched: bool = False

    def load_into(self, model: nn.Module) -> nn.Module:
        """Read the tensors, load them into ``model`` (see :func:`load_state_dict_into`) and set
        ``model.pretrained_cfg`` from the weights."""
        load_state_dict_into(model, self.read(), self.source, check_values=not self.vouched)
        if isinstance(model, DenseNet):
            model.pretrained_cfg = model_pretrained_cfg(model, self.pretrained_cfg)
        return model


def resolve_weights(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> PretrainedWeights:
    """Resolve ``weights`` (a tag or ``"DEFAULT"``, a path, ``hf-hub:org/name[@revision]``, or ``None`` for the
    default tag) for model ``name``. Hub references fetch ``config.json`` and the weights now and check them
    against each other; manifest weights are fetched by ``read()``.

    ``cache_dir`` and ``endpoint`` override the Hugging Face cache folder and Hub address (``HF_HUB_CACHE``,
    ``HF_ENDPOINT``) for this call.
    """
    reference = check_reference(weights)
    if reference is not None and reference.startswith(HF_HUB_PREFIX):
        return _hub_weights(name, reference, cache_dir, endpoint)
    if reference is None or not _looks_like_path(reference):
        return _manifest_weights(name, reference, cache_dir, endpoint)
    return _local_weights(name, Path(reference).expanduser())


def check_reference(weights: object) -> str | None:
    """``weights`` as a string (``None`` stays ``None``); a clear ``TypeError``/``ValueError`` for anything that
    cannot be a reference: not a string or path, or empty."""
    if weights is None:
        return None
    if isinstance(weights, bool) or not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights must be a tag, a path or 'hf-hub:org/name' (str or os.PathLike), got "
            f"{type(weights).__name__} {weights!r}; use pretrained=True for the default weights"
        )
    reference = os.fspath(weights)
    if not isinstance(reference, str):
        raise TypeError(f"weights must be a str path, got {type(reference).__name__} {reference!r}")
    if not reference.strip():
        raise UnknownWeightsError(
            f"weights={reference!r} is empty: pass a tag (e.g. 'DEFAULT'), a path or "
            f"'hf-hub:org/name', or leave it out for random initialisation"
        )
    return reference


def _looks_like_path(reference: str) -> bool:
    return (
        "/" in reference
        or os.sep in reference
        or reference.startswith(("~", "."))
        or reference.endswith(_PATH_SUFFIXES)
        or Path(reference).exists()
    )


def load_pretrained(
    model: nn.Module,
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> nn.Module:
    """Load the weights ``weights`` refers to (see :func:`resolve_weights`) into ``model`` and return it.

    The weights' constructor arguments are not applied: build the model with ``create_model(name, weights=...)``
    to get them. A different ``num_classes`` keeps the model's fresh classifier (with a warning).
    """
    return resolve_weights(name, weights, cache_dir=cache_dir, endpoint=endpoint).load_into(model)


def _manifest_weights(name: str, tag: str | None, cache_dir, endpoint) -> PretrainedWeights:
    try:
        cfg = weights_entry(name, tag)
    except UnknownWeightsError as error:
        if tag is None:
            raise
        raise UnknownWeightsError(f"{error} (weights={tag!r} is no file or folder either.)") from None

    def read() -> dict[str, Tensor]:
        from .download import fetch_manifest_weights

        file, data = fetch_manifest_weights(cfg.key, cfg.to_dict(), cache_dir=cache_dir, endpoint=endpoint)
        return read_state_dict(file, data)

    return PretrainedWeights(cfg.key, dict(cfg.to_dict()["model_args"]), read, cfg.model_cfg(), vouched=True)


def _hub_weights(name: str, reference: str, cache_dir, endpoint) -> PretrainedWeights:
    from .download import fetch_hub_bytes

    repo_id, _, revision = reference[len(HF_HUB_PREFIX) :].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UnknownWeightsError(f"Invalid Hub reference {reference!r}: expected 'hf-hub:org/name[@revision]'.")
    options = dict(cache_dir=cache_dir, endpoint=endpoint)
    config_path, config_bytes = fetch_hub_bytes(
        repo_id, CONFIG_FILENAME, revision=revision or None, size=_MAX_CONFIG_BYTES, **options
    )
    where = f"{reference} ({CONFIG_FILENAME})"
    model_args, input_cfg = parse_config(name, _config_of(config_bytes, where), where)
    commit = Path(config_path).parent.name  # the cache's snapshots/<commit>/: the weights of that same commit
    path, data = fetch_hub_bytes(repo_id, WEIGHTS_FILENAME, revision=commit, **options)
    state_dict = read_state_dict(path, data)
    check_shapes(name, model_args, state_dict, where)
    input_cfg.update(hf_hub_id=reference[len(HF_HUB_PREFIX) :], source="hf-hub")
    return PretrainedWeights(reference, model_args, lambda: state_dict, input_cfg)


def _local_weights(name: str, path: Path) -> PretrainedWeights:
    saved = _read_local(path, name)
    config_file, config = saved.config_file, saved.config
    model_args, input_cfg = parse_config(name, config, str(config_file))
    state_dict = read_state_dict(saved.file, saved.data)
    if config:  # a bare file: the caller's arguments describe the model; loading names any mismatch
        check_shapes(name, model_args, state_dict, str(config_file))
    input_cfg["file"] = str(saved.file)
    return PretrainedWeights(str(saved.file), model_args, lambda: state_dict, input_cfg, vouched=bool(saved.sealed))


@dataclass(frozen=True)
class _SavedSet:
    """A weights file read once (``data``: the bytes that were hashed are the bytes that are loaded) and the
    ``config.json`` beside it (``{}`` when there is none). ``sealed``: whether the file is the one the config
    records (``None``: the config records no sha256, as timm's do)."""

    file: Path
    data: bytes
    config_file: Path
    config: dict[str, Any]
    sealed: bool | None


def _read_local(path: Path, name: str) -> _SavedSet:
    """The set a local reference names: a file and the config beside it, or a folder's set (see
    :func:`_read_folder`). A save running into the folder at the same time may remove what was just found: then
    the folder is read again (twice at most)."""
    for _ in range(2):
        try:
            return _read_local_once(path, name)
        except FileNotFoundError:
            continue
    return _read_local_once(path, name)


def _read_local_once(path: Path, name: str) -> _SavedSet:
    if path.is_dir():
        return _read_folder(path, name)
    saved = _read_set(path.parent, path) if path.is_file() else None
    if saved is None:
        raise FileNotFoundError(_not_found(path, name))
    if saved.sealed is False:
        raise _mixed_set(saved)
    return saved


def _read_folder(folder: Path, name: str) -> _SavedSet:
    """A folder's set: ``model.safetensors`` (or ``pytorch_model.bin``) and ``config.json`` at its top, as this
    project's and timm's saves write them. While :func:`.saving.save_pretrained` replaces a set
    it keeps the one it replaces in :data:`PREVIOUS_SET_DIRNAME`: if the top is not the sealed new set (a save
    in progress, or killed between its renames), that previous set is loaded, with a warning; a first save that
    was interrupted is named as such."""
    previous = folder / PREVIOUS_SET_DIRNAME
    top = _read_set(folder)
    if not previous.is_dir():
        if top is None:
            raise FileNotFoundError(_not_found(folder / WEIGHTS_FILENAME, name))
        if top.sealed is False:
            raise _mixed_set(top)
        return top
    if top is not None and top.sealed:
        return top
    old = _read_set(previous)
    if old is not None and old.sealed is not False:
        warnings.warn(
            f"{folder}: a save_pretrained into it is in progress or was interrupted before it completed; loaded the "
            f"set it replaces ({previous}). Save again to complete the folder.",
            stacklevel=2,
        )
        return old
    raise InvalidWeightsFileError(
        f"{folder} holds an incomplete save_pretrained: it was interrupted (or is still running) before "
        f"{CONFIG_FILENAME} sealed the set, and there is no earlier set to fall back on. Save the weights again."
    )


def _read_set(folder: Path, file: Path | None = None) -> _SavedSet | None:
    """Read ``file`` (default: the folder's weights file) and the ``config.json`` beside it; ``None`` if there
    is no such file."""
    if file is None:
        candidates = [folder / WEIGHTS_FILENAME, folder / TORCH_WEIGHTS_FILENAME]
        file = next((candidate for candidate in candidates if candidate.is_file()), None)
        if file is None:
            return None
    config_file = folder / CONFIG_FILENAME
    config = read_config(config_file, str(config_file)) if os.path.lexists(config_file) else {}
    data = read_regular_file(file, MAX_WEIGHTS_BYTES, InvalidWeightsFileError)
    expected = config.get("weights_sha256") if file.name == WEIGHTS_FILENAME else None
    sealed = None if expected is None else hashlib.sha256(data).hexdigest() == expected
    return _SavedSet(file, data, config_file, config, sealed)


def _not_found(file: Path, name: str) -> str:
    return (
        f"file not found: {file}. Pass a weights tag of {name!r} (or 'DEFAULT'), a .safetensors file, a "
        f"folder written by save_pretrained, or 'hf-hub:org/name[@revision]'."
    )


def _mixed_set(saved: _SavedSet) -> InvalidWeightsFileError:
    return InvalidWeightsFileError(
        f"{saved.file} is not the file {saved.config_file} was written for (sha256 "
        f"{saved.config['weights_sha256']}): an interrupted or mixed save. Save the weights again."
    )


def read_config(path: Path, where: str) -> dict[str, Any]:
    """A ``config.json`` as a dict; :class:`InvalidConfigError` naming ``where`` if it is not a regular file (a
    folder, a FIFO) holding a JSON object of at most 16 MiB nested at most 8 deep."""
    return _config_of(read_regular_file(path, _MAX_CONFIG_BYTES, InvalidConfigError), where)


def _config_of(data: bytes, where: str) -> dict[str, Any]:
    """:func:`read_config` of a ``config.json``'s bytes, already read (and checked)."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidConfigError(f"{where} is not valid JSON: {error}") from error
    except RecursionError:
        raise InvalidConfigError(f"{where} is nested too deeply: a config.json nests at most 8 deep") from None
    if not isinstance(config, dict):
        raise InvalidConfigError(f"{where} must hold a JSON object, got {type(config).__name__}: {config!r:.80}")
    if _depth(config) > _MAX_CONFIG_DEPTH:
        raise InvalidConfigError(f"{where} is nested too deeply: a config.json nests at most 8 deep")
    return config


def _depth(value: Any, limit: int = _MAX_CONFIG_DEPTH + 1) -> int:
    """How deep ``value`` nests (a scalar: 0), counted no further than ``limit``."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not children or limit == 0:
        return 0
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def parse_config(name: str, config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(constructor arguments, pretrained_cfg)`` from a ``config.json``, read by its format marker: this
    package's (``"format": "densenet_efficient"``, written by ``save_pretrained``) or, without it, timm's
    (``save_for_hf``; for this package's architectures and timm's DenseNets in :data:`TIMM_DENSENETS`).
    Refuses a config for another model or a foreign architecture, unknown keys, timm arguments this architecture
    does not have unless they hold timm's default, sizes beyond the bounds, and values the model would refuse."""
    if not config:
        return {}, {}
    config_format = config.get(FORMAT_KEY)
    if config_format not in (None, CONFIG_FORMAT):
        raise InvalidConfigError(
            f"{where}: unknown format {config_format!r}: {FORMAT_KEY!r} is {CONFIG_FORMAT!r} in a config.json written "
            f"by save_pretrained and absent in one written by timm"
        )
    known = _TIMM_KEYS if config_format is None else _OWN_KEYS
    unknown = sorted(set(config) - known)
    if unknown:
        written_by = "timm's (no 'format' marker)" if config_format is None else f"format {CONFIG_FORMAT!r}"
        raise InvalidConfigError(
            f"{where}: unknown keys {unknown}; a config.json of {written_by} holds {sorted(known)}"
        )
    saved_for = config.get("architecture", name)
    if not isinstance(saved_for, str):
        raise InvalidConfigError(f"{where}: 'architecture' must be a model name, got {saved_for!r}")
    ours = is_model(saved_for)
    if not ours and (config_format is not None or saved_for not in TIMM_DENSENETS):
        valid = list_models() if config_format is not None else [*list_models(), *TIMM_DENSENETS]
        raise InvalidConfigError(
            f"{where} describes a {saved_for!r}, which is not an architecture of this package"
            f"{'' if config_format is not None else ' nor one of timm DenseNets it reads'}; valid: {', '.join(valid)}"
        )
    wanted = resolve_model(saved_for) if ours else TIMM_DENSENETS[saved_for]
    if wanted != name:
        described = f"weights for {saved_for!r}" if ours else f"timm's {saved_for!r}"
        raise UnknownWeightsError(
            f"{where} describes {described}, not {name!r}: use create_model({wanted!r}, weights=...)."
        )
    raw_args = config.get("model_args", {})
    if not isinstance(raw_args, dict):
        raise InvalidConfigError(
            f"{where}: 'model_args' must be an object of constructor arguments, got {json.dumps(raw_args)}"
        )
    model_args = dict(raw_args) if ours else _timm_model_args(name, config, raw_args, where)
    if config_format is None and ours:
        model_args.pop("efficient", None)  # timm records every create_model argument; the memory mode is no weight
    if "num_classes" in config and config["num_classes"] != model_args.setdefault("num_classes", config["num_classes"]):
        raise InvalidConfigError(
            f"{where}: num_classes {config['num_classes']} and model_args.num_classes "
            f"{model_args['num_classes']} differ"
        )
    return check_model_args(name, model_args, where), config_pretrained_cfg(config, name, where)


def _timm_model_args(name: str, config: Mapping[str, Any], raw_args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """timm DenseNet arguments -> this model's: shared names as they are, ``proj_drop_rate`` -> ``drop_rate``,
    a stem of ``2 * growth_rate`` channels (timm's ``stem_type=''``); the others only at timm's default."""
    settings = {**{key: config[key] for key in ("global_pool",) if key in config}, **raw_args}
    model_args: dict[str, Any] = {key: settings[key] for key in _TIMM_SHARED_ARGS if key in settings}
    if "proj_drop_rate" in settings:
        model_args["drop_rate"] = settings["proj_drop_rate"]
    for key, value in settings.items():
        if key in _TIMM_SHARED_ARGS or key == "proj_drop_rate":
            continue
        if key in _TIMM_ANY_BOOL and isinstance(value, bool):
            continue
        if key not in _TIMM_DEFAULT_ONLY:
            raise InvalidConfigError(f"{where}: timm argument {key}={value!r} has no counterpart in {name}")
        if value != _TIMM_DEFAULT_ONLY[key]:
            raise InvalidConfigError(
                f"{where}: timm argument {key}={value!r} is not supported by {name}, which is built as timm's "
                f"{key}={_TIMM_DEFAULT_ONLY[key]!r}; only that value can be ignored"
            )
    growth_rate = model_args.get("growth_rate", architecture(name).get("growth_rate", 32))
    if isinstance(growth_rate, int) and not isinstance(growth_rate, bool):
        model_args["num_init_features"] = 2 * growth_rate
    return model_args


def check_model_args(name: str, model_args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``model_args`` as constructor arguments of ``name`` (sequences as tuples), or :class:`InvalidConfigError`
    naming ``where``: only ``DenseNet`` arguments, within the bounds, accepted by the constructor."""
    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if unknown:
        raise InvalidConfigError(
            f"{where}: model_args {unknown} are not arguments of {name}; valid: {', '.join(MODEL_ARGS)}"
        )
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in model_args.items()}
    _check_model_args(name, args, where)
    return args


def _check_model_args(name: str, model_args: Mapping[str, Any], where: str) -> None:
    """Bounds, then types and ranges, checked by the model's own constructor on a one-layer network on the
    ``meta`` device (nothing is allocated; not needed when every argument is the architecture's own), then the
    parameter count (:func:`state_size`)."""
    arch = architecture(name)
    args = {**arch, **model_args}
    try:
        _check_bounds(args)
        if args != arch:
            with torch.device("meta"):
                DenseNet(**{**args, "block_config": _skeleton(args["block_config"])}, efficient=False)
        parameters, _ = state_size(args)
    except (TypeError, ValueError) as error:
        raise InvalidConfigError(f"{where}: invalid model_args: {error}") from error
    if parameters > _MAX_PARAMETERS:
        raise InvalidConfigError(
            f"{where}: invalid model_args: they ask for {parameters:,} parameters (at most {_MAX_PARAMETERS:,})"
        )


def _skeleton(block_config: Any) -> Any:
    """One block of one layer, for the constructor's checks of everything else; the entries it refuses as they
    are (and anything that is no sequence of entries), so that its error names them."""
    if isinstance(block_config, (str, bytes)) or not isinstance(block_config, (list, tuple)):
        return block_config
    invalid = tuple(n for n in block_config if isinstance(n, bool) or not isinstance(n, int) or n < 1)
    return invalid or (1,)


def state_size(args: Mapping[str, Any]) -> tuple[int, int]:
    """``(parameters, values)`` of ``DenseNet(**args)``'s state dict (values: parameters and BatchNorm running
    statistics, ``num_batches_tracked`` aside), in closed form: nothing is built. ``args`` must be valid."""
    growth, bn_size, spatial_dims = args["growth_rate"], args.get("bn_size", 4), args.get("spatial_dims", 2)
    channels, stem = args["num_init_features"], args.get("stem", "imagenet")
    kernel = 3**spatial_dims
    convs = channels * args.get("in_chans", 3) * (7**spatial_dims if stem == "imagenet" else kernel)
    norms = channels if stem == "imagenet" else 0  # channels of all BatchNorms: 2 parameters, 2 statistics each
    for index, layers in enumerate(args["block_config"]):
        for layer in range(layers):
            width = channels + layer * growth
            norms += width + (bn_size * growth if bn_size else 0)
            convs += (
                width * bn_size * growth + bn_size * growth * growth * kernel if bn_size else width * growth * kernel
            )
        channels += layers * growth
        if index < len(args["block_config"]) - 1:
            out = math.floor(channels * args.get("compression", 0.5))
            norms, convs, channels = norms + channels, convs + channels * out, out
    classes = args.get("num_classes", 1000)
    parameters = convs + 2 * (norms + channels) + classes * (channels + 1)
    return parameters, parameters + 2 * (norms + channels)


def _check_bounds(args: Mapping[str, Any]) -> None:
    """``ValueError`` for a network too big to be a DenseNet anyone trains (before anything is built)."""
    block_config = args.get("block_config")
    if isinstance(block_config, (list, tuple)) and len(block_config) > _MAX_BLOCKS:
        raise ValueError(
            f"block_config has {len(block_config)} dense blocks (at most {_MAX_BLOCKS}): each transition halves the "
            f"input, so its inputs would need at least 2**{len(block_config) - 1} pixels per side"
        )
    if _layer_count(args) > _MAX_LAYERS:
        raise ValueError(f"block_config {args['block_config']} asks for {_layer_count(args)} layers (at most 10000)")
    bounds = {
        "growth_rate": _MAX_WIDTH,
        "num_init_features": _MAX_WIDTH,
        "in_chans": MAX_CHANNELS,
        "num_classes": MAX_CLASSES,
    }
    for key, bound in bounds.items():
        value = args.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise ValueError(f"{key}={value} is beyond the bound of {bound}")
    growth_rate, bn_size = args.get("growth_rate"), args.get("bn_size")
    if isinstance(growth_rate, int) and isinstance(bn_size, int) and bn_size * growth_rate > _MAX_WIDTH:
        raise ValueError(f"bn_size * growth_rate = {bn_size * growth_rate} is beyond the bound of {_MAX_WIDTH}")


def _layer_count(args: Mapping[str, Any]) -> int:
    block_config = args.get("block_config")
    if isinstance(block_config, (list, tuple)) and all(isinstance(n, int) for n in block_config):
        return sum(block_config)
    return 0


def config_pretrained_cfg(config: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a ``config.json`` (with timm's top-level ``label_names`` and
    ``label_descriptions``), checked (:func:`~densenet_efficient.core.config.check_pretrained_cfg`), without the
    weight locations it was exported from, for model ``name``."""
    pretrained_cfg = config.get("pretrained_cfg", {})
    if not isinstance(pretrained_cfg, dict):
        raise InvalidConfigError(f"{where}: 'pretrained_cfg' must be an object, got {json.dumps(pretrained_cfg)}")
    cfg = {key: value for key, value in pretrained_cfg.items() if value is not None}
    for key in ("label_names", "label_descriptions"):
        if config.get(key) is not None:
            cfg.setdefault(key, config[key])
    try:
        cfg = check_pretrained_cfg(cfg)
    except ValueError as error:
        raise InvalidConfigError(f"{where}: {error}") from None
    for key in WEIGHT_SOURCE_KEYS:
        cfg.pop(key, None)
    cfg["architecture"] = name
    return cfg


def check_shapes(name: str, model_args: Mapping[str, Any], state_dict: Mapping[str, Tensor], where: str) -> None:
    """Refuse (:class:`InvalidConfigError`) constructor arguments whose network does not hold as many values as
    the weights, before the model is built: first by counting layers, then by :func:`state_size`. (Loading then
    names any tensor of another shape.)"""
    args = {**architecture(name), **model_args}
    per_layer = 10 if args.get("bn_size", 4) else 5  # per stage a BatchNorm (4 tensors at least) and a conv
    if _layer_count(args) * per_layer > len(state_dict):
        raise InvalidConfigError(
            f"{where} asks for {_layer_count(args)} dense layers, but the weights hold only {len(state_dict)} "
            f"tensors: the config does not describe these weights"
        )
    parameters, values = state_size(args)
    stored = sum(value.numel() for key, value in state_dict.items() if not key.endswith("num_batches_tracked"))
    if values != stored:
        raise InvalidConfigError(
            f"{where} describes a {name} with {parameters:,} parameters whose tensors are not the weights': its "
            f"state holds {values:,} values, the weights {stored:,}."
        )


def model_pretrained_cfg(model: DenseNet, weights_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``model.pretrained_cfg`` once weights of configuration ``weights_cfg`` are loaded into ``model``: the
    weights' configuration over the architecture's, adapted to the model's input channels and classes
    (:func:`~densenet_efficient.core.config.adapt_cfg`)."""
    return adapt_cfg({**model.pretrained_cfg, **weights_cfg}, model.in_chans, model.num_classes)


def rename_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision's legacy names (``denselayer1.norm.1.weight``) to current ones (``denselayer1.norm1.weight``)."""
    if not _LEGACY_KEY.search("\n".join(state_dict)):  # nothing legacy: one search, not one a key
        return dict(state_dict)
    return {_LEGACY_KEY.sub(r"\1\2", key): value for key, value in state_dict.items()}


def _torch_load(path: Path, data: bytes) -> Mapping[str, Tensor]:
    """A ``.pth``/``.bin`` state dict read from its bytes ``data`` with ``weights_only=True``."""
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file; all mean "unreadable"
        raise InvalidWeightsFileError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise InvalidWeightsFileError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
    return state_dict


def read_state_dict(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt``/``.bin`` file read with ``weights_only=True``,
    with legacy torchvision key names mapped to current ones: from ``data``, the file's bytes already read (and
    hashed: the bytes checked are the bytes deserialised), else read from ``path`` (a regular file of at most
    :data:`.files.MAX_WEIGHTS_BYTES`)."""
    path = Path(path)
    if data is None:
        data = read_regular_file(path, MAX_WEIGHTS_BYTES, InvalidWeightsFileError)
    if path.suffix != ".safetensors":
        return rename_legacy_keys(_torch_load(path, data))
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state_dict = load(data)
    except SafetensorError as error:
        raise InvalidWeightsFileError(f"{path} is not a valid safetensors file: {error}") from error
    return rename_legacy_keys(dict(sorted(state_dict.items())))  # in the file's (sorted) order


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """First-convolution weights (O, 3, kH, kW) for ``in_chans`` input channels, as timm adapts them: summed
    over the channels for 1 (a gray image gives the logits of that image repeated on 3 channels), else
    repeated and scaled by ``3 / in_chans``."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise IncompatibleWeightsError(
            f"cannot adapt a first convolution of {weight.shape[1]} input channels "
            f"to {in_chans}: only 3-channel weights are adapted"
        )
    adapted = weight.float()
    if in_chans == 1:
        adapted = adapted.sum(dim=1, keepdim=True)
    else:
        adapted = adapted.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    return adapted.to(weight.dtype)


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str, *, check_values: bool = True
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, except a classifier of another size, which is skipped with a
    warning (fine-tuning), and a first convolution for another number of input channels, which is adapted
    (:func:`adapt_input_conv`). Raises :class:`IncompatibleWeightsError` naming missing, unexpected and
    misshapen keys, and, with ``check_values``, :class:`InvalidWeightsFileError` for values no weights hold
    (:func:`check_state_values`)."""
    state_dict = rename_legacy_keys(state_dict)
    expected = model.state_dict()
    first_conv = state_dict.get(_FIRST_CONV)
    if (
        first_conv is not None
        and _FIRST_CONV in expected
        and first_conv.dim() == 4
        and first_conv.shape[1] != expected[_FIRST_CONV].shape[1]
        and first_conv.shape[0] == expected[_FIRST_CONV].shape[0]
    ):
        state_dict = {**state_dict, _FIRST_CONV: adapt_input_conv(expected[_FIRST_CONV].shape[1], first_conv)}
    state_dict, classifier_skipped = _without_mismatched_classifier(expected, state_dict, source)
    exempt = set(_CLASSIFIER_KEYS) if classifier_skipped else set()
    # BatchNorm fills in a missing num_batches_tracked itself (torchvision's files have none).
    missing = [k for k in expected if k not in state_dict and k not in exempt and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or misshapen:
        raise IncompatibleWeightsError(
            f"The weights from {source} do not fit this {type(model).__name__} (another architecture?): "
            f"{_listing('missing', missing)}; {_listing('unexpected', unexpected)}; "
            f"{_listing('with another shape (weights vs model)', misshapen)}."
        )
    _check_dtypes(expected, state_dict, source)
    if check_values:
        check_state_values(state_dict, source)
    model.load_state_dict(state_dict, strict=not classifier_skipped)
    return model


def _check_dtypes(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], source: str) -> None:
    """Refuse, rather than cast: integer or bool tensors where the model has floating-point weights (and the
    reverse). The error names the key and what is valid."""
    for key, value in state_dict.items():
        target = expected[key]
        if target.is_floating_point() != value.is_floating_point():
            valid = "floating-point" if target.is_floating_point() else "integer"
            raise IncompatibleWeightsError(
                f"{source}: {key} holds {value.dtype} values where the model has {target.dtype}: only {valid} "
                f"tensors load there (they are not cast)"
            )


def check_state_values(state_dict: Mapping[str, Tensor], source: str) -> None:
    """Refuse (:class:`InvalidWeightsFileError`) NaN or infinite values and negative running variances, naming
    the key: a diverged training or a damaged file. One pass a tensor (:func:`torch.aminmax`, NaN propagates)."""
    floats = [(key, value) for key, value in state_dict.items() if value.is_floating_point() and value.numel()]
    if not floats:
        return
    smallest, largest = (torch.stack(b).float() for b in zip(*(torch.aminmax(v) for _, v in floats), strict=True))
    finite = (torch.isfinite(smallest) & torch.isfinite(largest)).tolist()
    for (key, value), is_finite, low in zip(floats, finite, smallest.tolist(), strict=True):
        if not is_finite:
            bad = int((~torch.isfinite(value)).sum())
            raise InvalidWeightsFileError(
                f"{source}: {key} holds {bad} NaN or infinite values of {value.numel()}: weights must be finite "
                f"(diverged training or a damaged file)"
            )
        if low < 0 and key.endswith("running_var"):
            raise InvalidWeightsFileError(
                f"{source}: {key} holds negative variances (smallest {low:g}): a BatchNorm's running_var is at least 0"
            )


def _listing(what: str, keys: list[str], shown: int = 5) -> str:
    keys = sorted(keys, key=lambda key: key.endswith("num_batches_tracked"))  # the telling keys first
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what}" + (f" ({', '.join(keys[:shown])}{more})" if keys else "")


def _without_mismatched_classifier(
    expected: Mapping[str, Tensor], state_dict: dict[str, Tensor], source: str
) -> tuple[dict[str, Tensor], bool]:
    """Drop the weights' classifier if the model has another number of classes (0: none), with a warning.
    Returns the state dict and whether the classifier was dropped. A classifier for the same features in
    another layout (transposed, another input width) is refused, not dropped: it is no fine-tuning head."""
    model_classes = _num_classes(expected)
    weights_classes = _num_classes(state_dict)
    if model_classes == weights_classes:
        return state_dict, False
    ours, theirs = expected.get("classifier.weight"), state_dict.get("classifier.weight")
    if ours is not None and theirs is not None:
        bias = state_dict.get("classifier.bias")
        if (
            theirs.dim() != 2
            or theirs.shape[1] != ours.shape[1]
            or (bias is not None and bias.shape != theirs.shape[:1])
        ):
            raise IncompatibleWeightsError(
                f"{source}: classifier.weight is {tuple(theirs.shape)}"
                + ("" if bias is None else f" with classifier.bias {tuple(bias.shape)}")
                + f", the model's {tuple(ours.shape)}: only a classifier of (classes, {ours.shape[1]}) with a bias of "
                f"(classes,) is replaced for another number of classes; this one is transposed or for other features"
            )
    warnings.warn(
        f"{source}: the weights have {weights_classes} classes, the model {model_classes}: loaded everything but "
        f"the classifier, which keeps its fresh initialisation (fine-tuning).",
        stacklevel=3,
    )
    return {k: v for k, v in state_dict.items() if k not in _CLASSIFIER_KEYS}, True


def _num_classes(state_dict: Mapping[str, Tensor]) -> int:
    classifier = state_dict.get("classifier.weight")
    return 0 if classifier is None else classifier.shape[0]
