"""What a network expects as input, in timm's ``pretrained_cfg`` keys: the one description of a model's input.

A pretrained configuration is a dict with the keys of timm's ``PretrainedCfg`` (:data:`PRETRAINED_CFG_KEYS`):
``input_size`` is ``(channels, *spatial)`` with 1, 2 or 3 spatial sizes (signals, images, volumes), ``mean`` and
``std`` one value per channel, ``crop_pct``, ``interpolation``, ``num_classes``, ``label_names``, ``pool_size``
(the final feature map's spatial sizes at ``input_size``), ``first_conv``, ``classifier``, ``license``, ``tag``
and where the weights live (``hf_hub_id``, ``file``, ``url``, ``source``). The same dict is
``model.pretrained_cfg``, the ``pretrained_cfg`` of a ``config.json``, what a manifest entry gives
(:meth:`densenet_efficient.pretrained.PretrainedCfg.model_cfg`) and what
:func:`densenet_efficient.transforms` reads. :func:`check_pretrained_cfg` validates one from any source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
VOLUME_SIZE = 96  # side of the volumes (e.g. CT/MRI patches) a 3D network is configured for, as in MONAI's examples

# timm's PretrainedCfg fields (timm/models/_pretrained.py); tests compare them with the installed timm.
WEIGHT_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
PRETRAINED_CFG_KEYS = (
    *WEIGHT_SOURCE_KEYS,
    "architecture",
    "tag",
    "custom_load",
    "input_size",
    "test_input_size",
    "min_input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "test_crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "label_offset",
    "label_names",
    "label_descriptions",
    "pool_size",
    "test_pool_size",
    "first_conv",
    "classifier",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
)
INTERPOLATIONS = {1: ("nearest", "linear"), 2: ("nearest", "bilinear", "bicubic"), 3: ("nearest", "trilinear")}
CROP_MODES = ("center", "squash", "border")
MAX_CHANNELS = 4096
MAX_SIDE = 65536  # pixels, voxels or samples along one axis
MAX_CLASSES = 1_000_000
_SIZE_KEYS = ("input_size", "test_input_size", "min_input_size")
_POOL_KEYS = ("pool_size", "test_pool_size")
_TEXT_KEYS = (
    "url",
    "file",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "architecture",
    "tag",
    "license",
    "description",
    "origin_url",
    "paper_name",
)


def feature_side(side: int, stem: str, num_blocks: int) -> int:
    """Side of the final feature map for an input of side ``side``: the ImageNet stem halves it twice (7x7/2
    conv, 3x3/2 max-pool, both rounding up), each transition halves it (rounding down)."""
    if stem == "imagenet":
        side = -(-side // 4)
    return side // 2 ** (num_blocks - 1)


def min_input_side(stem: str, num_blocks: int) -> int:
    """Smallest input side that leaves a final feature map of side 1 (closed form of :func:`feature_side`)."""
    reduction = 2 ** (num_blocks - 1)
    return 4 * reduction - 3 if stem == "imagenet" else reduction


def architecture_cfg(
    stem: str,
    in_chans: int,
    num_classes: int,
    spatial_dims: int = 2,
    num_blocks: int = 4,
    architecture: str | None = None,
) -> dict[str, Any]:
    """The configuration a network of this stem was designed for (pretrained weights replace it with theirs).

    CIFAR networks take 32x32 images normalised with CIFAR-10's statistics; ImageNet networks 224x224 crops
    (crop fraction 0.875, bicubic resize) normalised with ImageNet's. For ``in_chans`` other than 3 the mean and
    std are the channel average, repeated. 1D and 3D networks take signals of length 224 or 32 and volumes of
    side 96 (:data:`VOLUME_SIZE`) or 32, already normalised (mean 0, std 1, as MONAI's intensity transforms leave
    them). ``pool_size`` follows from the input size and ``num_blocks``; ``architecture`` is the registered name.
    """
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size, mean, std = (32, CIFAR10_MEAN, CIFAR10_STD) if stem == "cifar" else (224, IMAGENET_MEAN, IMAGENET_STD)
    if in_chans != 3:
        mean, std = (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    if spatial_dims != 2:
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    if spatial_dims == 3 and stem == "imagenet":
        size = VOLUME_SIZE
    cfg = {
        "input_size": (in_chans,) + (size,) * spatial_dims,
        "min_input_size": (in_chans,) + (min_input_side(stem, num_blocks),) * spatial_dims,
        "interpolation": INTERPOLATIONS[spatial_dims][-1],
        "crop_pct": 1.0 if stem == "cifar" or spatial_dims != 2 else 0.875,
        "crop_mode": "center",
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": num_classes,
        "pool_size": (feature_side(size, stem, num_blocks),) * spatial_dims,
        "first_conv": "features.conv0",
        "classifier": "classifier",
    }
    if architecture is not None:
        cfg["architecture"] = architecture
    return cfg


def with_pool_sizes(cfg: Mapping[str, Any], stem: str, num_blocks: int) -> dict[str, Any]:
    """``cfg`` with ``pool_size``/``test_pool_size`` those of its ``input_size``/``test_input_size``."""
    updated = dict(cfg)
    for size_key, pool_key in (("input_size", "pool_size"), ("test_input_size", "test_pool_size")):
        if updated.get(size_key) is not None:
            updated[pool_key] = tuple(feature_side(side, stem, num_blocks) for side in tuple(updated[size_key])[1:])
        else:
            updated.pop(pool_key, None)
    return updated


def check_pretrained_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with its sequences as tuples, or ``ValueError`` naming the key, what it holds and what is valid.

    Checks: only timm's keys; ``input_size`` (and ``test_``/``min_input_size``) ``[channels, *spatial]`` with
    1 to 3 spatial sizes, all of one rank; ``pool_size`` of that rank; ``mean``/``std`` finite, one per channel,
    ``std > 0``; crop fractions in (0, 1]; an ``interpolation`` of that rank; labels as strings; bounded sizes.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"a pretrained_cfg must be an object of timm's keys, got {type(cfg).__name__}")
    unknown = sorted(str(key) for key in cfg if key not in PRETRAINED_CFG_KEYS)
    if unknown:
        raise ValueError(f"unknown pretrained_cfg keys {unknown}; valid (timm's): {', '.join(PRETRAINED_CFG_KEYS)}")
    if cfg.get("state_dict") is not None:
        raise ValueError("pretrained_cfg.state_dict: tensors do not belong in a configuration")
    checked = {key: _tuples(value) for key, value in cfg.items()}
    rank = None
    for key in _SIZE_KEYS:
        if checked.get(key) is not None:
            rank = _check_size(key, checked[key], rank)
    channels = checked["input_size"][0] if checked.get("input_size") is not None else None
    for key in _POOL_KEYS:
        value = checked.get(key)
        if value is not None and not (
            isinstance(value, tuple)
            and (rank is None or len(value) == rank)
            and all(_is_int(n) and 0 < n <= MAX_SIDE for n in value)
        ):
            raise ValueError(f"pretrained_cfg.{key} must be {rank or '1 to 3'} positive sizes, got {value!r}")
    for key in ("mean", "std"):
        if key in checked:
            _check_statistics(key, checked[key], channels)
    for key in ("crop_pct", "test_crop_pct"):
        value = checked.get(key)
        if value is not None and not (_is_real(value) and 0 < value <= 1):
            raise ValueError(f"pretrained_cfg.{key} must be a number in (0, 1], got {value!r}")
    if checked.get("crop_mode") is not None and checked["crop_mode"] not in CROP_MODES:
        raise ValueError(f"pretrained_cfg.crop_mode must be one of {CROP_MODES}, got {checked['crop_mode']!r}")
    interpolation = checked.get("interpolation")
    if interpolation is not None:
        valid = INTERPOLATIONS[rank] if rank else sorted({mode for modes in INTERPOLATIONS.values() for mode in modes})
        if interpolation not in valid:
            raise ValueError(
                f"pretrained_cfg.interpolation must be one of {tuple(valid)}"
                f"{f' for {rank} spatial dimensions' if rank else ''}, got {interpolation!r}"
            )
    _check_labels(checked)
    for key in ("num_classes", "label_offset"):
        value = checked.get(key)
        if value is not None and not (_is_int(value) and 0 <= value <= MAX_CLASSES):
            raise ValueError(f"pretrained_cfg.{key} must be an integer from 0 to {MAX_CLASSES}, got {value!r}")
    for key in ("fixed_input_size", "custom_load"):
        if checked.get(key) is not None and not isinstance(checked[key], bool):
            raise ValueError(f"pretrained_cfg.{key} must be true or false, got {checked[key]!r}")
    for key in _TEXT_KEYS:
        if checked.get(key) is not None and not isinstance(checked[key], str):
            raise ValueError(f"pretrained_cfg.{key} must be a string, got {checked[key]!r}")
    for key in ("first_conv", "classifier", "paper_ids", "notes"):
        value = checked.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, tuple) and all(isinstance(v, str) for v in value))
        ):
            raise ValueError(f"pretrained_cfg.{key} must be a string or a list of strings, got {value!r}")
    return checked


def adapt_cfg(cfg: Mapping[str, Any], in_chans: int, num_classes: int) -> dict[str, Any]:
    """``cfg`` for a model with ``in_chans`` input channels and ``num_classes`` classes: other channels get the
    channel average of mean and std; other classes drop the label names."""
    adapted = dict(cfg)
    weights_chans = len(adapted["mean"])
    if in_chans != weights_chans:
        mean, std = sum(adapted["mean"]) / weights_chans, sum(adapted["std"]) / weights_chans
        adapted["mean"], adapted["std"] = (mean,) * in_chans, (std,) * in_chans
    for key in _SIZE_KEYS:
        if adapted.get(key) is not None:
            adapted[key] = (in_chans, *tuple(adapted[key])[1:])
    names = adapted.get("label_names")
    if num_classes != adapted.get("num_classes", num_classes) or (names is not None and len(names) != num_classes):
        adapted.pop("label_names", None)
        adapted.pop("label_descriptions", None)
    adapted["num_classes"] = num_classes
    return adapted


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_size(key: str, value: Any, rank: int | None) -> int:
    if not (
        isinstance(value, tuple)
        and 2 <= len(value) <= 4
        and all(_is_int(n) for n in value)
        and 0 < value[0] <= MAX_CHANNELS
        and all(0 < n <= MAX_SIDE for n in value[1:])
    ):
        raise ValueError(
            f"pretrained_cfg.{key} must be [channels, *sizes] with 1 to 3 spatial sizes ([C, L], [C, H, W] or "
            f"[C, D, H, W]; at most {MAX_CHANNELS} channels and {MAX_SIDE} per side), got {value!r}"
        )
    if rank is not None and len(value) - 1 != rank:
        raise ValueError(f"pretrained_cfg.{key} {value!r} has {len(value) - 1} spatial sizes, input_size has {rank}")
    return len(value) - 1


def _check_statistics(key: str, value: Any, channels: int | None) -> None:
    if not (isinstance(value, tuple) and value and all(_is_real(v) for v in value)):
        raise ValueError(f"pretrained_cfg.{key} must be a list of finite numbers (no NaN or inf), got {value!r}")
    if channels is not None and len(value) != channels:
        raise ValueError(f"pretrained_cfg.{key} has {len(value)} values for {channels} input channels: one per channel")
    if key == "std" and not all(v > 0 for v in value):
        raise ValueError(f"pretrained_cfg.std must be positive, got {value!r}")


def _check_labels(cfg: Mapping[str, Any]) -> None:
    names = cfg.get("label_names")
    if names is not None and not (
        isinstance(names, tuple) and len(names) <= MAX_CLASSES and all(isinstance(v, str) for v in names)
    ):
        raise ValueError("pretrained_cfg.label_names must be a list of strings (one per class)")
    descriptions = cfg.get("label_descriptions")
    if descriptions is not None and not (
        isinstance(descriptions, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in descriptions.items())
    ):
        raise ValueError("pretrained_cfg.label_descriptions must map label names to strings")
