"""What a network expects as input: :class:`InputCfg`, the one type, and the ``pretrained_cfg`` dict (timm's keys)
derived from it, which adds what the network and the weights' location determine (``pool_size``, ``num_classes``,
``first_conv``, ``hf_hub_id``, ...): ``model.pretrained_cfg``, a ``config.json``'s, a manifest entry's
:meth:`~densenet_efficient.pretrained.PretrainedCfg.model_cfg`. :func:`check_pretrained_cfg` validates one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, TypeGuard

# timm's PretrainedCfg fields (timm/models/_pretrained.py); tests compare them with the installed timm.
WEIGHT_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
PRETRAINED_CFG_KEYS = (
    *WEIGHT_SOURCE_KEYS,
    *("architecture", "tag", "custom_load", "input_size", "test_input_size", "min_input_size", "fixed_input_size"),
    *("interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset"),
    *("label_names", "label_descriptions", "pool_size", "test_pool_size", "first_conv", "classifier", "license"),
    *("description", "origin_url", "paper_name", "paper_ids", "notes"),
)
INTERPOLATIONS = {1: ("nearest", "linear"), 2: ("nearest", "bilinear", "bicubic"), 3: ("nearest", "trilinear")}
CROP_MODES = ("center", "squash", "border")
MAX_CHANNELS, MAX_SIDE, MAX_CLASSES = 4096, 65536, 1_000_000  # MAX_SIDE: pixels, voxels or samples on one axis
VOLUME_SIZE = 96  # side of the volumes (e.g. CT/MRI patches) a 3D network is configured for, as in MONAI's examples
_SIZE_KEYS = ("input_size", "test_input_size", "min_input_size")
_TEXT_KEYS: tuple[str, ...] = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag")
_TEXT_KEYS += ("license", "description", "origin_url", "paper_name")


@dataclass(frozen=True)
class InputCfg:
    """What a network expects: ``input_size`` ``(C, *spatial)`` (1 to 3 spatial sizes), ``mean``/``std`` (C,);
    evaluation resizes to ``size / crop_pct`` with ``interpolation`` and centre-crops ``size``; ``label_names`` one
    per class; ``test_input_size``/``test_crop_pct``: where the weights' best result was measured."""

    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    label_names: tuple[str, ...] | None = None
    test_input_size: tuple[int, ...] | None = None
    test_crop_pct: float | None = None

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> InputCfg:
        """The input part of a ``pretrained_cfg`` dict (checked: :func:`check_pretrained_cfg`); ``ValueError`` if it
        has no ``input_size``, ``mean`` or ``std``. Missing ``crop_pct``/``interpolation``: 0.875, the rank's
        default (images: bilinear)."""
        if missing := [key for key in ("input_size", "mean", "std") if cfg.get(key) is None]:
            raise ValueError(f"the configuration has no {', '.join(missing)}: cannot build its preprocessing")
        checked = check_pretrained_cfg({f.name: cfg.get(f.name) for f in dataclasses.fields(cls)})
        rank = len(checked["input_size"]) - 1
        checked["interpolation"] = checked["interpolation"] or ("bilinear" if rank == 2 else INTERPOLATIONS[rank][-1])
        return cls(**{key: value for key, value in checked.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` keys (unset ones left out)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    def adapt(self, in_chans: int, num_classes: int) -> InputCfg:
        """For a model of ``in_chans`` channels (others: the channel average of mean and std) and ``num_classes``
        classes (other: no label names)."""
        mean, std = self.mean, self.std
        if in_chans != self.channels:
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        sizes: dict[str, Any] = {k: (in_chans, *s[1:]) for k in _SIZE_KEYS[:2] if (s := getattr(self, k)) is not None}
        names = self.label_names if self.label_names and len(self.label_names) == num_classes else None
        return dataclasses.replace(self, mean=mean, std=std, label_names=names, **sizes)

    def with_size(self, side: int | None) -> InputCfg:
        """The same at input side ``side`` on every spatial axis (``None``: unchanged)."""
        if side is None:
            return self
        if side < 1:
            raise ValueError(f"image size must be a positive number of pixels, got {side}")
        size = (self.channels,) + (side,) * (len(self.input_size) - 1)
        return dataclasses.replace(self, input_size=size, test_input_size=None, test_crop_pct=None)


IMAGENET = InputCfg((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = InputCfg((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 1.0)
CIFAR100 = InputCfg((3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 1.0)


def min_input_side(stem: str, num_blocks: int) -> int:
    """Smallest input side that leaves a final feature map of side 1 (see :func:`with_pool_sizes`)."""
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
    """``model.pretrained_cfg`` of a network without weights: the input its stem was designed for (CIFAR's 32 px or
    ImageNet's 224 px images, their statistics averaged for other channel counts; signals and volumes of mean 0, std 1
    as MONAI's transforms leave them) and what the network determines (``pool_size``, ``first_conv``...)."""
    inputs = CIFAR10 if stem == "cifar" else IMAGENET
    if spatial_dims != 2:
        side = VOLUME_SIZE if spatial_dims == 3 and stem == "imagenet" else inputs.input_size[-1]
        size, interpolation = (in_chans,) + (side,) * spatial_dims, INTERPOLATIONS[spatial_dims][-1]
        inputs = InputCfg(size, (0.0,) * in_chans, (1.0,) * in_chans, 1.0, interpolation)
    else:
        inputs = dataclasses.replace(inputs, interpolation="bicubic").adapt(in_chans, 0)
    cfg = inputs.to_dict() | {"min_input_size": (in_chans,) + (min_input_side(stem, num_blocks),) * spatial_dims}
    cfg |= dict(crop_mode="center", num_classes=num_classes, first_conv="features.conv0", classifier="classifier")
    return with_pool_sizes(cfg | ({"architecture": architecture} if architecture else {}), stem, num_blocks)


def with_pool_sizes(cfg: Mapping[str, Any], stem: str, num_blocks: int) -> dict[str, Any]:
    """``cfg`` with ``pool_size``/``test_pool_size`` those of its ``input_size``/``test_input_size``: the ImageNet
    stem halves a side twice (7x7/2 conv, 3x3/2 max-pool, both rounding up), each transition halves it (down)."""
    updated, first = dict(cfg), 4 if stem == "imagenet" else 1
    for size_key, pool_key in (("input_size", "pool_size"), ("test_input_size", "test_pool_size")):
        updated.pop(pool_key, None)
        if updated.get(size_key) is not None:
            sides = tuple(updated[size_key])[1:]
            updated[pool_key] = tuple(-(-side // first) // 2 ** (num_blocks - 1) for side in sides)
    return updated


def adapt_cfg(cfg: Mapping[str, Any], in_chans: int, num_classes: int) -> dict[str, Any]:
    """A ``pretrained_cfg`` for a model of ``in_chans`` channels and ``num_classes`` classes
    (:meth:`InputCfg.adapt`; label descriptions go with the names)."""
    inputs, adapted = InputCfg.from_dict(cfg).adapt(in_chans, num_classes), dict(cfg)
    if not inputs.label_names:
        adapted.pop("label_names", None), adapted.pop("label_descriptions", None)
    if adapted.get("min_input_size") is not None:
        adapted["min_input_size"] = (in_chans, *adapted["min_input_size"][1:])
    return adapted | inputs.to_dict() | {"num_classes": num_classes}


def check_pretrained_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with its lists as tuples, or ``ValueError`` naming the key, what it holds and what is valid: timm's
    keys only; sizes ``[channels, *spatial]`` of 1 to 3 spatial sizes, all of one rank; ``mean``/``std`` finite,
    one per channel, ``std > 0``; crop fractions in (0, 1]; an ``interpolation`` of that rank; bounded sizes."""
    if unknown := sorted(str(key) for key in cfg if key not in PRETRAINED_CFG_KEYS):
        raise ValueError(f"unknown pretrained_cfg keys {unknown}; valid (timm's): {', '.join(PRETRAINED_CFG_KEYS)}")
    value: Any
    checked: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value for key, value in cfg.items()}

    def check(key: str, valid: bool, expected: str) -> None:
        if checked.get(key) is not None and not valid:
            raise ValueError(f"pretrained_cfg.{key} must be {expected}, got {checked[key]!r}")

    rank = None
    for key in _SIZE_KEYS:
        value = checked.get(key)
        expected = f"[channels, *sizes] (1 to 3 sizes; at most {MAX_CHANNELS} channels, {MAX_SIDE} per side)"
        check(key, _sizes(value, 2, 4) and 0 < value[0] <= MAX_CHANNELS, expected)
        if value is not None and rank not in (None, len(value) - 1):
            raise ValueError(f"pretrained_cfg.{key} {value!r} has {len(value) - 1} spatial sizes, not {rank}")
        rank = len(value) - 1 if value is not None else rank
    for key in ("pool_size", "test_pool_size"):
        value = checked.get(key)
        check(key, _sizes(value, rank or 1, rank or 3), f"{rank or '1 to 3'} positive sizes")
    channels = checked["input_size"][0] if checked.get("input_size") is not None else None
    for key in ("mean", "std"):
        value = checked.get(key)
        check(key, isinstance(value, tuple) and bool(value) and all(map(_is_real, value)), "a list of finite numbers")
        check(key, channels is None or len(value or ()) == channels, f"one value per input channel ({channels})")
    check("std", all(v > 0 for v in checked.get("std") or ()), "positive")
    for key in ("crop_pct", "test_crop_pct"):
        check(key, _is_real(checked.get(key)) and 0 < checked[key] <= 1, "a number in (0, 1]")
    check("crop_mode", checked.get("crop_mode") in CROP_MODES, f"one of {CROP_MODES}")
    modes = INTERPOLATIONS[rank] if rank else sorted({mode for modes in INTERPOLATIONS.values() for mode in modes})
    check("interpolation", checked.get("interpolation") in modes, f"one of {tuple(modes)}")
    names, descriptions = checked.get("label_names"), checked.get("label_descriptions")
    check("label_names", _sizes(names, 0, MAX_CLASSES, str), "a list of strings")
    pairs = descriptions.items() if isinstance(descriptions, Mapping) else [(None, None)]
    check("label_descriptions", all(isinstance(k, str) and isinstance(v, str) for k, v in pairs), "names to strings")
    for key in ("num_classes", "label_offset"):
        check(key, is_int(checked.get(key)) and 0 <= checked[key] <= MAX_CLASSES, f"an integer up to {MAX_CLASSES}")
    for key in ("fixed_input_size", "custom_load"):
        check(key, isinstance(checked.get(key), bool), "true or false")
    for key in _TEXT_KEYS:
        check(key, isinstance(checked.get(key), str), "a string")
    for key in ("first_conv", "classifier", "paper_ids", "notes"):
        value = checked.get(key)
        check(key, isinstance(value, str) or _sizes(value, 0, MAX_CLASSES, str), "a string or a list of strings")
    return checked


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _sizes(value: Any, shortest: int, longest: int, kind: type = int) -> bool:
    """``value`` is a tuple of ``shortest`` to ``longest`` items: positive bounded ints, or strs."""
    if not isinstance(value, tuple) or not shortest <= len(value) <= longest:
        return False
    if kind is str:
        return all(isinstance(v, str) for v in value)
    return all(is_int(n) and 0 < n <= MAX_SIDE for n in value)
