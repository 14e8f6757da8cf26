"""Resolving a ``weights=`` reference and loading its tensors into a model (timm's ``load_pretrained``).

A reference is a manifest tag (``"DEFAULT"``/``pretrained=True``: the default one); a ``.safetensors`` (or
``.pth``/``.bin``, read with ``weights_only=True``) file or a folder of :func:`save_pretrained` or timm's
``save_for_hf``; or ``"hf-hub:org/name[@revision]"``. Each file is read once: the bytes hashed are the bytes
deserialised; a ``config.json`` is checked before anything is built (:func:`parse_config`).
"""

from __future__ import annotations

import functools
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

from ..core.config import MAX_CHANNELS, MAX_CLASSES, WEIGHT_SOURCE_KEYS, adapt_cfg, check_pretrained_cfg, is_int
from ..core.model import DenseNet
from ..core.registry import architecture, is_model, list_models, resolve_model
from .errors import IncompatibleWeightsError, InvalidConfigError, InvalidWeightsFileError, UnknownWeightsError
from .files import MAX_WEIGHTS_BYTES, read_regular_file
from .manifest import weights_entry

WEIGHTS_FILENAME, TORCH_WEIGHTS_FILENAME, CONFIG_FILENAME = "model.safetensors", "pytorch_model.bin", "config.json"
HF_HUB_PREFIX = "hf-hub:"
# config.json: save_pretrained's carries FORMAT_KEY: CONFIG_FORMAT and weights_sha256 beside timm's keys, so that timm
# and transformers read it too; one without the marker is timm's (save_for_hf).
FORMAT_KEY, CONFIG_FORMAT = "format", "densenet_efficient"
MODEL_ARGS = (
    *("growth_rate", "block_config", "num_init_features", "bn_size", "compression", "drop_rate"),
    *("num_classes", "in_chans", "stem", "global_pool", "spatial_dims"),
)
_TIMM_KEYS = {"architecture", "model_args", "num_classes", "num_features", "global_pool", "pretrained_cfg"}
_TIMM_KEYS |= {"label_names", "label_descriptions"}
_OWN_KEYS = {*_TIMM_KEYS, FORMAT_KEY, "weights_sha256"}
# timm's DenseNets of this layout; timm arguments accepted only at timm's default (memory_efficient at any value).
TIMM_DENSENETS = {f"densenet{n}": f"densenet{n}_efficient" for n in (121, 169, 201, 161)}
_TIMM_ARGS = {key: key for key in ("growth_rate", "block_config", "num_classes", "in_chans", "bn_size")}
_TIMM_ARGS["proj_drop_rate"] = "drop_rate"
_TIMM_DEFAULT_ONLY: dict[str, Any] = dict(global_pool="avg", stem_type="", act_layer="relu", norm_layer="batchnorm2d")
_TIMM_DEFAULT_ONLY |= {"aa_layer": None, "aa_stem_only": True, "drop_rate": 0.0}
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$", re.M
)
_PATH_LIKE = re.compile(rf"\A[~.]|[/{re.escape(os.sep)}]|\.(?:safetensors|pth|pt|bin)\Z")  # how a path looks
_CLASSIFIER_KEYS, _FIRST_CONV = ("classifier.weight", "classifier.bias"), "features.conv0.weight"
_MAX_CONFIG_BYTES, _MAX_CONFIG_DEPTH = 16 * 2**20, 8
_MAX_BLOCKS, _MAX_LAYERS, _MAX_WIDTH, _MAX_PARAMETERS = 16, 10_000, 4096, 2**32


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights a reference resolved to: source, constructor arguments, ``pretrained_cfg`` and ``read`` (fetches,
    verifies, reads the tensors). ``vouched``: a pin or a save's seal records the bytes: values not checked again."""

    source: str
    model_args: dict[str, Any]
    read: Callable[[], dict[str, Tensor]]
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    vouched: bool = False

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the tensors into ``model`` (:func:`load_state_dict_into`) and set its ``pretrained_cfg``."""
        load_state_dict_into(model, self.read(), self.source, check_values=not self.vouched)
        if isinstance(model, DenseNet):  # the weights' cfg over the architecture's, adapted to the model
            cfg = {**model.pretrained_cfg, **self.pretrained_cfg}
            model.pretrained_cfg = adapt_cfg(cfg, model.in_chans, model.num_classes)
        return model


def resolve_weights(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> PretrainedWeights:
    """Resolve ``weights`` (a tag, ``"DEFAULT"``, a path, ``hf-hub:org/name[@revision]``, or ``None``: the default
    tag) for model ``name``. ``cache_dir``/``endpoint`` override ``HF_HUB_CACHE``/``HF_ENDPOINT``."""
    reference = os.fspath(weights) if isinstance(weights, str | os.PathLike) else weights
    if reference is not None and not isinstance(reference, str):
        raise TypeError(
            f"weights must be a tag, a path or 'hf-hub:org/name' (str or os.PathLike), got {type(weights).__name__}"
        )
    if reference is not None and not reference.strip():
        raise UnknownWeightsError(f"weights={reference!r} is empty: pass a tag, a path or 'hf-hub:org/name'")
    if reference is not None and reference.startswith(HF_HUB_PREFIX):
        return _hub_weights(name, reference, cache_dir, endpoint)
    if reference is None or not (_PATH_LIKE.search(reference) or Path(reference).exists()):
        return _manifest_weights(name, reference, cache_dir, endpoint)
    return _local_weights(name, Path(reference).expanduser())


def _manifest_weights(name: str, tag: str | None, cache_dir: Any, endpoint: str | None) -> PretrainedWeights:
    try:
        cfg = weights_entry(name, tag)
    except UnknownWeightsError as error:
        if tag is None:
            raise
        raise UnknownWeightsError(f"{error} (weights={tag!r} is no file or folder either.)") from None

    def read() -> dict[str, Tensor]:
        from .download import fetch_manifest_weights

        return read_state_dict(*fetch_manifest_weights(cfg, cache_dir=cache_dir, endpoint=endpoint))

    return PretrainedWeights(cfg.key, dict(cfg.model_args), read, cfg.model_cfg(), vouched=True)


def _hub_weights(name: str, reference: str, cache_dir: Any, endpoint: str | None) -> PretrainedWeights:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .download import fetch_hub_bytes

    repo_id, _, revision = reference[len(HF_HUB_PREFIX) :].partition("@")
    try:
        validate_repo_id(repo_id if repo_id.count("/") == 1 else "")
    except HFValidationError:
        raise UnknownWeightsError(
            f"Invalid Hub repo id {repo_id!r} (not 'org/name'): expected 'hf-hub:org/name[@revision]'"
        ) from None
    fetch = functools.partial(fetch_hub_bytes, repo_id, cache_dir=cache_dir, endpoint=endpoint)
    config_path, config = fetch(CONFIG_FILENAME, revision=revision or None, size=_MAX_CONFIG_BYTES)
    where = f"{reference} ({CONFIG_FILENAME})"
    model_args, input_cfg = parse_config(name, _config_of(config, where), where)
    commit = Path(config_path).parent.name  # snapshots/<commit>/: the weights of that same commit
    state_dict = read_state_dict(*fetch(WEIGHTS_FILENAME, revision=commit))
    check_shapes(name, model_args, state_dict, where)
    input_cfg.update(hf_hub_id=reference[len(HF_HUB_PREFIX) :], source="hf-hub")
    return PretrainedWeights(reference, model_args, lambda: state_dict, input_cfg)


def _local_weights(name: str, path: Path) -> PretrainedWeights:
    """A file, or a folder's ``model.safetensors``/``pytorch_model.bin``, and the ``config.json`` beside it, each
    read once. A ``weights_sha256`` in the config seals the set: another file (a save running or cut) is refused."""
    folder, file = (path, None) if path.is_dir() else (path.parent, path)
    file = file or next((f for f in (folder / WEIGHTS_FILENAME, folder / TORCH_WEIGHTS_FILENAME) if f.exists()), None)
    if file is None or not file.exists():
        raise FileNotFoundError(
            f"file not found: {file or folder / WEIGHTS_FILENAME}; pass a tag of {name!r}, a file, a saved folder or "
            "'hf-hub:org/name'"
        )
    config_file, config = folder / CONFIG_FILENAME, {}
    if os.path.lexists(config_file):
        config = _config_of(read_regular_file(config_file, _MAX_CONFIG_BYTES, InvalidConfigError), str(config_file))
    data = read_regular_file(file, MAX_WEIGHTS_BYTES, InvalidWeightsFileError)
    recorded = config.get("weights_sha256") if file.name == WEIGHTS_FILENAME else None
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise InvalidWeightsFileError(
            f"{file} is not the file {config_file} records: a save is running or was cut; save again"
        )
    model_args, input_cfg = parse_config(name, config, str(config_file))
    state_dict = read_state_dict(file, data)
    if config:  # a bare file: the caller's arguments describe the model; loading names any mismatch
        check_shapes(name, model_args, state_dict, str(config_file))
    input_cfg["file"] = str(file)
    return PretrainedWeights(str(file), model_args, lambda: state_dict, input_cfg, vouched=recorded is not None)


def _config_of(data: bytes, where: str) -> dict[str, Any]:
    """A ``config.json``'s object (at most 8 deep), or :class:`InvalidConfigError` naming ``where``."""
    deep = InvalidConfigError(f"{where} is nested too deeply: a config.json nests at most {_MAX_CONFIG_DEPTH} deep")
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidConfigError(f"{where} is not valid JSON: {error}") from error
    except RecursionError:
        raise deep from None
    if not isinstance(config, dict):
        raise InvalidConfigError(f"{where} must hold a JSON object, got {type(config).__name__}")

    def depth(value: Any, limit: int) -> int:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return 0 if not children or limit == 0 else 1 + max(depth(child, limit - 1) for child in children)

    if depth(config, _MAX_CONFIG_DEPTH + 1) > _MAX_CONFIG_DEPTH:
        raise deep
    return config


def parse_config(name: str, config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(constructor arguments, pretrained_cfg)`` of a ``config.json``: this package's (with the format marker)
    or timm's (for this package's architectures and :data:`TIMM_DENSENETS`). Refuses another model, unknown keys,
    timm arguments off their default, sizes beyond the bounds and values the constructor refuses."""
    if not config:
        return {}, {}
    marker = config.get(FORMAT_KEY)
    if marker not in (None, CONFIG_FORMAT):
        raise InvalidConfigError(f"{where}: unknown format {marker!r}: {CONFIG_FORMAT!r} or absent (timm's)")
    known = _TIMM_KEYS if marker is None else _OWN_KEYS
    if unknown := sorted(set(config) - known):
        kind = "timm's (no 'format' marker)" if marker is None else f"format {CONFIG_FORMAT!r}"
        raise InvalidConfigError(f"{where}: unknown keys {unknown}; a config.json of {kind} holds {sorted(known)}")
    saved_for = config.get("architecture", name)
    ours = isinstance(saved_for, str) and is_model(saved_for)
    if not ours and (marker is not None or saved_for not in TIMM_DENSENETS):
        valid = [*list_models(), *(TIMM_DENSENETS if marker is None else ())]
        raise InvalidConfigError(f"{where} describes a {saved_for!r}, not an architecture; valid: {', '.join(valid)}")
    wanted = resolve_model(saved_for) if ours else TIMM_DENSENETS[saved_for]
    if wanted != name:
        described = f"weights for {saved_for!r}" if ours else f"timm's {saved_for!r}"
        raise UnknownWeightsError(f"{where} describes {described}, not {name!r}: use create_model({wanted!r}, ...)")
    if bad := [key for key in ("model_args", "pretrained_cfg") if not isinstance(config.get(key, {}), dict)]:
        raise InvalidConfigError(f"{where}: {bad[0]!r} must be an object, got {json.dumps(config[bad[0]])}")
    args = dict(raw := config.get("model_args", {}))
    if not ours:  # timm's: shared names kept, others only at timm's default, a stem of 2 * growth_rate (stem_type='')
        settings = ({"global_pool": config["global_pool"]} if "global_pool" in config else {}) | raw
        args = {_TIMM_ARGS[key]: value for key, value in settings.items() if key in _TIMM_ARGS}
        for key, value in settings.items():
            if key in _TIMM_ARGS or (key == "memory_efficient" and isinstance(value, bool)):
                continue
            if key not in _TIMM_DEFAULT_ONLY or value != _TIMM_DEFAULT_ONLY[key]:
                why = "is not supported by" if key in _TIMM_DEFAULT_ONLY else "has no counterpart in"
                raise InvalidConfigError(f"{where}: timm argument {key}={value!r} {why} {name}")
        if is_int(growth_rate := args.get("growth_rate", architecture(name).get("growth_rate", 32))):
            args["num_init_features"] = 2 * growth_rate
    if marker is None:
        args.pop("efficient", None)  # timm records every create_model argument; the memory mode is no weight
    if "num_classes" in config and config["num_classes"] != args.setdefault("num_classes", config["num_classes"]):
        raise InvalidConfigError(
            f"{where}: num_classes {config['num_classes']} and model_args.num_classes {args['num_classes']} differ"
        )
    cfg = config.get("pretrained_cfg", {})  # with timm's top-level label names; without where it was exported from
    labels = {key: config.get(key) for key in ("label_names", "label_descriptions")}
    try:
        cfg = check_pretrained_cfg({key: value for key, value in (labels | cfg).items() if value is not None})
    except ValueError as error:
        raise InvalidConfigError(f"{where}: {error}") from None
    cfg = {key: value for key, value in cfg.items() if key not in WEIGHT_SOURCE_KEYS} | {"architecture": name}
    return check_model_args(name, args, where), cfg


def check_model_args(name: str, model_args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``model_args`` as constructor arguments of ``name`` (lists as tuples), or :class:`InvalidConfigError` naming
    ``where``: known names, within the bounds, accepted by the constructor, at most 2**32 parameters."""
    if unknown := sorted(set(model_args) - set(MODEL_ARGS)):
        raise InvalidConfigError(f"{where}: model_args {unknown} are not arguments of {name}; valid: {MODEL_ARGS}")
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in model_args.items()}
    arch = architecture(name)
    full = {**arch, **args}
    try:
        blocks = full.get("block_config")  # bounds: a network too big to be a DenseNet anyone trains
        if isinstance(blocks, tuple) and len(blocks) > _MAX_BLOCKS:
            raise ValueError(f"block_config has {len(blocks)} dense blocks (at most {_MAX_BLOCKS})")
        layers = sum(blocks) if isinstance(blocks, tuple) and all(is_int(n) for n in blocks) else 0
        if layers > _MAX_LAYERS:
            raise ValueError(f"block_config {blocks} asks for {layers} layers (at most {_MAX_LAYERS})")
        bounds = {"growth_rate": _MAX_WIDTH, "num_init_features": _MAX_WIDTH, "in_chans": MAX_CHANNELS}
        for key, bound in (bounds | {"num_classes": MAX_CLASSES}).items():
            if is_int(full.get(key)) and full[key] > bound:
                raise ValueError(f"{key}={full[key]} is beyond the bound of {bound}")
        growth, bn_size = full.get("growth_rate"), full.get("bn_size")
        if is_int(growth) and is_int(bn_size) and bn_size * growth > _MAX_WIDTH:
            raise ValueError(f"bn_size * growth_rate = {bn_size * growth} is beyond the bound of {_MAX_WIDTH}")
        if full != arch:  # the constructor's own checks, on one layer on the meta device: nothing is allocated
            bad = tuple(n for n in blocks if not is_int(n) or n < 1) if isinstance(blocks, tuple) else blocks
            with torch.device("meta"):
                DenseNet(**{**full, "block_config": bad or (1,)}, efficient=False)
        if (parameters := state_size(full)[0]) > _MAX_PARAMETERS:
            raise ValueError(f"{parameters:,} parameters (at most {_MAX_PARAMETERS:,})")
    except (TypeError, ValueError) as error:
        raise InvalidConfigError(f"{where}: invalid model_args: {error}") from error
    return args


def state_size(args: Mapping[str, Any]) -> tuple[int, int]:
    """``(parameters, values)`` of ``DenseNet(**args)``'s state (values: parameters and BatchNorm statistics, not
    ``num_batches_tracked``), in closed form: nothing is built. ``args`` must be valid."""
    growth, bn_size, dims = args["growth_rate"], args.get("bn_size", 4), args.get("spatial_dims", 2)
    channels, imagenet, kernel = args["num_init_features"], args.get("stem", "imagenet") == "imagenet", 3**dims
    convs = channels * args.get("in_chans", 3) * (7**dims if imagenet else kernel)
    norms = channels if imagenet else 0  # channels of every BatchNorm: 2 parameters and 2 statistics each
    for index, layers in enumerate(args["block_config"]):
        for layer in range(layers):
            width = channels + layer * growth
            norms += width + bn_size * growth
            convs += growth * (width * bn_size + bn_size * growth * kernel if bn_size else width * kernel)
        channels += layers * growth
        if index < len(args["block_config"]) - 1:
            out = math.floor(channels * args.get("compression", 0.5))
            norms, convs, channels = norms + channels, convs + channels * out, out
    parameters = convs + 2 * (norms + channels) + args.get("num_classes", 1000) * (channels + 1)
    return parameters, parameters + 2 * (norms + channels)


def check_shapes(name: str, model_args: Mapping[str, Any], state_dict: Mapping[str, Tensor], where: str) -> None:
    """Refuse arguments whose network does not hold as many values as the weights, before it is built."""
    parameters, values = state_size({**architecture(name), **model_args})
    stored = sum(value.numel() for key, value in state_dict.items() if not key.endswith("num_batches_tracked"))
    if values != stored:
        raise InvalidConfigError(
            f"{where} describes a {name} with {parameters:,} parameters whose tensors are not the weights': "
            f"{values:,} values, the weights {stored:,}"
        )


def read_state_dict(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, else a ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``, with
    torchvision's legacy names (``denselayer1.norm.1.weight``) mapped to current ones: from ``data``, the bytes
    already read and hashed, else read from ``path`` (a regular file of at most 4 GiB)."""
    path = Path(path)
    data = read_regular_file(path, MAX_WEIGHTS_BYTES, InvalidWeightsFileError) if data is None else data
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state_dict = dict(sorted(load(data).items()))  # the file's (sorted) order
        else:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # each reader raises many types for a bad file; all mean "unreadable"
        raise InvalidWeightsFileError(f"{path} is not a readable weights file: {error}") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise InvalidWeightsFileError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
    return rename_legacy_keys(state_dict)


def rename_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's legacy names (``denselayer1.norm.1.weight``) -> current ones (``denselayer1.norm1.weight``)."""
    if not _LEGACY_KEY.search("\n".join(state_dict)):  # one search, not one a key
        return dict(state_dict)
    return {_LEGACY_KEY.sub(r"\1\2", key): value for key, value in state_dict.items()}


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """First-convolution weights (O, 3, *k) for ``in_chans`` channels, as timm adapts them: summed for 1 (a gray
    image gives the logits of that image on 3 channels), else repeated and scaled by ``3 / in_chans``."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise IncompatibleWeightsError(
            f"cannot adapt a first convolution of {weight.shape[1]} input channels to {in_chans}: only 3"
        )
    if in_chans == 1:
        return weight.float().sum(dim=1, keepdim=True).to(weight.dtype)
    repeats = (1, math.ceil(in_chans / 3), *(1,) * (weight.dim() - 2))
    return (weight.float().repeat(repeats)[:, :in_chans] * (3 / in_chans)).to(weight.dtype)


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str, *, check_values: bool = True
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, except a classifier for another number of classes (skipped,
    with a warning: fine-tuning) and a first convolution for other input channels (:func:`adapt_input_conv`).
    :class:`IncompatibleWeightsError` names missing, unexpected, misshapen and mistyped keys; with
    ``check_values``, :class:`InvalidWeightsFileError` names non-finite values and negative variances."""
    state_dict, expected = rename_legacy_keys(state_dict), model.state_dict()
    conv, target = state_dict.get(_FIRST_CONV), expected.get(_FIRST_CONV)
    if conv is not None and target is not None and conv.dim() == target.dim() and conv.shape[0] == target.shape[0]:
        state_dict[_FIRST_CONV] = adapt_input_conv(target.shape[1], conv)
    ours, theirs = expected.get("classifier.weight"), state_dict.get("classifier.weight")
    classes = [0 if w is None else w.shape[0] for w in (ours, theirs)]
    skipped = _CLASSIFIER_KEYS if classes[0] != classes[1] else ()
    if skipped and ours is not None and theirs is not None:  # a classifier for other features is no fine-tuning head
        bias_shape = getattr(state_dict.get("classifier.bias"), "shape", theirs.shape[:1])
        if theirs.dim() != 2 or theirs.shape[1] != ours.shape[1] or bias_shape != theirs.shape[:1]:
            raise IncompatibleWeightsError(
                f"{source}: classifier.weight {tuple(theirs.shape)} (model: {tuple(ours.shape)}) is transposed or "
                "for other features: only a (classes, features) classifier is replaced"
            )
    if skipped:
        warnings.warn(
            f"{source}: the weights have {classes[1]} classes, the model {classes[0]}: loaded everything but the "
            "classifier (fine-tuning)",
            stacklevel=3,
        )
        state_dict = {key: value for key, value in state_dict.items() if key not in _CLASSIFIER_KEYS}
    present = {*state_dict, *skipped}
    missing = [k for k in expected if k not in present and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items() if k in expected]
    misshapen = [f"{k} {theirs} vs {ours}" for k, theirs, ours in shapes if theirs != ours]
    if missing or unexpected or misshapen:
        raise IncompatibleWeightsError(
            f"The weights from {source} do not fit this {type(model).__name__} (another architecture?): "
            f"{_listing('missing', missing)}; {_listing('unexpected', unexpected)}; "
            f"{_listing('with another shape (weights vs model)', misshapen)}."
        )
    for key, value in state_dict.items():
        if expected[key].is_floating_point() != value.is_floating_point():
            raise IncompatibleWeightsError(
                f"{source}: {key} holds {value.dtype} values where the model has {expected[key].dtype}: only "
                f"{'floating-point' if expected[key].is_floating_point() else 'integer'} tensors load there (no cast)"
            )
    if check_values:
        check_state_values(state_dict, source)
    model.load_state_dict(state_dict, strict=not skipped)
    return model


def check_state_values(state_dict: Mapping[str, Tensor], source: str) -> None:
    """:class:`InvalidWeightsFileError` naming the key of NaN or infinite values or a negative running variance
    (a diverged training or a damaged file). One ``aminmax`` a tensor."""
    floats = [(key, value) for key, value in state_dict.items() if value.is_floating_point() and value.numel()]
    if not floats:
        return
    low, high = (torch.stack(b).float() for b in zip(*(torch.aminmax(v) for _, v in floats), strict=True))
    finite = (torch.isfinite(low) & torch.isfinite(high)).tolist()
    for (key, value), is_finite, smallest in zip(floats, finite, low.tolist(), strict=True):
        if not is_finite:
            bad = int((~torch.isfinite(value)).sum())
            raise InvalidWeightsFileError(f"{source}: {key} holds {bad} NaN or infinite values of {value.numel()}")
        if smallest < 0 and key.endswith("running_var"):
            raise InvalidWeightsFileError(f"{source}: {key} holds negative variances (smallest {smallest:g})")


def _listing(what: str, keys: list[str], shown: int = 5) -> str:
    keys = sorted(keys, key=lambda key: key.endswith("num_batches_tracked"))  # the telling keys first
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what}" + (f" ({', '.join(keys[:shown])}{more})" if keys else "")
