"""The preprocessing that travels with the weights: transforms built from ``model.pretrained_cfg``.

Images (2 spatial dimensions): for evaluation the pipeline is timm's (``timm.data.create_transform`` for the same
configuration): resize the shorter side to ``floor(size / crop_pct)``, centre-crop ``size``, convert to a tensor
in [0, 1] and normalise. torchvision is imported only when a pipeline is built. Volumes and signals (3 and 1
spatial dimensions): :class:`ResizeNormalize` on tensors, for evaluation (training augmentation of volumes is
MONAI's job).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import INTERPOLATIONS, check_pretrained_cfg
from .manifest import PretrainedCfg


def transforms(
    model_or_cfg: nn.Module | Mapping[str, Any] | PretrainedCfg, training: bool = False, *, use_test_size: bool = False
) -> Any:
    """The torchvision transform pipeline (PIL image or uint8 tensor -> normalised float tensor) for a model's
    weights.

    Args:
        model_or_cfg: a model (its ``pretrained_cfg``), a ``pretrained_cfg`` dict in timm's keys, or a
            :class:`~.manifest.PretrainedCfg` from :func:`get_pretrained_cfg`.
        training: ``False``: resize to ``input_size / crop_pct``, centre crop (equal to timm's ``create_transform``
            for the same configuration). ``True``: random resized crop and horizontal flip, as in torchvision's
            and timm's ImageNet training.
        use_test_size: evaluate at ``test_input_size``/``test_crop_pct`` where the weights give them (the size
            their best published result was measured at).

    Output: (C, H, W) float32 with ``C = input_size[0]``; 1-channel configurations convert images to grayscale.
    For a volume or signal configuration (``input_size`` ``(C, D, H, W)`` or ``(C, L)``): a
    :class:`ResizeNormalize` (float tensor (C, D, H, W) -> (C, *input_size[1:])); ``training=True`` is refused.
    """
    cfg = _pretrained_cfg(model_or_cfg)
    size_key, crop_key = ("test_input_size", "test_crop_pct") if use_test_size else ("input_size", "crop_pct")
    channels, *sides = cfg.get(size_key) or cfg["input_size"]
    crop_pct = cfg.get(crop_key) or cfg.get("crop_pct") or 0.875
    if len(sides) != 2:
        if training:
            raise ValueError(
                f"transforms(training=True) builds image augmentation; for input_size {tuple(cfg['input_size'])} "
                f"({len(sides)} spatial dimensions) use MONAI's transforms, or training=False for ResizeNormalize"
            )
        interpolation = cfg.get("interpolation") or INTERPOLATIONS[len(sides)][-1]
        return ResizeNormalize(tuple(sides), crop_pct, interpolation, cfg["mean"], cfg["std"])
    from torchvision import transforms as T

    height, width = sides
    interpolation_name = cfg.get("interpolation") or "bilinear"
    if interpolation_name not in INTERPOLATIONS[2]:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS[2]}, got {interpolation_name!r}")
    interpolation = T.InterpolationMode(interpolation_name)
    if training:
        steps: list[Any] = [T.RandomResizedCrop((height, width), interpolation=interpolation), T.RandomHorizontalFlip()]
    else:
        scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        resize = T.Resize(scale[0] if scale[0] == scale[1] else scale, interpolation=interpolation)
        steps = [resize, T.CenterCrop((height, width))]
    if channels == 1:
        steps.append(T.Grayscale(num_output_channels=1))
    return T.Compose([*steps, ToFloatTensor(), T.Normalize(cfg["mean"], cfg["std"])])


class ToFloatTensor:
    """PIL image or uint8 (C, H, W) tensor (``torchvision.io.decode_image``) -> float32 in [0, 1]; float tensors
    pass unchanged."""

    def __call__(self, image: Any) -> Tensor:
        from torchvision.transforms import functional as F

        tensor = image if isinstance(image, Tensor) else F.pil_to_tensor(image)
        return F.convert_image_dtype(tensor, torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ResizeNormalize:
    """A volume (C, D, H, W) or signal (C, L) tensor -> float32 (C, *size): resized to ``size / crop_pct``
    (``torch.nn.functional.interpolate`` with ``interpolation``), centre-cropped to ``size`` and normalised with
    one ``mean``/``std`` per channel."""

    def __init__(
        self,
        size: tuple[int, ...],
        crop_pct: float,
        interpolation: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        if interpolation not in INTERPOLATIONS[len(size)]:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS[len(size)]} for {len(size)} spatial dimensions, "
                f"got {interpolation!r}"
            )
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation
        self.mean, self.std = mean, std

    def __call__(self, volume: Tensor) -> Tensor:
        rank = len(self.size) + 1
        if not isinstance(volume, Tensor) or volume.dim() != rank or volume.shape[0] != len(self.mean):
            shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
            raise ValueError(
                f"expected a ({len(self.mean)}, {', '.join('DHW'[-len(self.size) :] if rank == 4 else 'L')}) "
                f"tensor, got {shape}"
            )
        scaled = tuple(math.floor(side / self.crop_pct) for side in self.size)
        x = torch.nn.functional.interpolate(volume[None].float(), size=scaled, mode=self.interpolation)[0]
        for axis, (have, want) in enumerate(zip(scaled, self.size, strict=True), start=1):
            x = x.narrow(axis, (have - want) // 2, want)
        shape = (-1,) + (1,) * len(self.size)
        mean, std = torch.tensor(self.mean).view(shape), torch.tensor(self.std).view(shape)
        return (x - mean) / std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct}, "
            f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})"
        )


def _pretrained_cfg(model_or_cfg: nn.Module | Mapping[str, Any] | PretrainedCfg) -> Mapping[str, Any]:
    """The checked ``pretrained_cfg`` of a model, a dict or a manifest entry."""
    cfg: Any = model_or_cfg.model_cfg() if isinstance(model_or_cfg, PretrainedCfg) else model_or_cfg
    if isinstance(model_or_cfg, nn.Module):
        cfg = getattr(model_or_cfg, "pretrained_cfg", None)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{type(model_or_cfg).__name__} has no pretrained_cfg: build it with create_model")
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a model, a pretrained_cfg dict or a PretrainedCfg, got {type(cfg).__name__}")
    if missing := [key for key in ("input_size", "mean", "std") if key not in cfg]:
        raise ValueError(f"the configuration has no {', '.join(missing)}: cannot build its preprocessing")
    return check_pretrained_cfg(cfg)
