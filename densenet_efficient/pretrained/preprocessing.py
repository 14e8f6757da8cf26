"""The preprocessing that travels with the weights: transforms built from a model's :class:`~.core.config.InputCfg`
(images: timm's ``create_transform``, torchvision imported only then; volumes and signals: :class:`ResizeNormalize`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import InputCfg
from .manifest import PretrainedCfg


def transforms(
    model_or_cfg: nn.Module | Mapping[str, Any] | PretrainedCfg | InputCfg,
    training: bool = False,
    *,
    use_test_size: bool = False,
) -> Any:
    """The transform (PIL image or uint8 (C, H, W) tensor -> normalised float32 (C, H, W)) for ``model_or_cfg``
    (a model: its ``pretrained_cfg``): for evaluation, resize to ``size / crop_pct`` and centre-crop (timm's
    ``create_transform``); ``training``: random resized crop and flip. ``use_test_size``: at ``test_input_size``/
    ``test_crop_pct`` where given. 1 channel: grayscale. Volumes and signals: a :class:`ResizeNormalize`."""
    found: Any = model_or_cfg.input if isinstance(model_or_cfg, PretrainedCfg) else model_or_cfg
    found = getattr(found, "pretrained_cfg", None) if isinstance(found, nn.Module) else found
    if not isinstance(found, InputCfg | Mapping):
        raise TypeError(f"expected a model, a pretrained_cfg dict or a PretrainedCfg, got {type(found).__name__}")
    cfg = found if isinstance(found, InputCfg) else InputCfg.from_dict(found)
    channels, *sides = (use_test_size and cfg.test_input_size) or cfg.input_size
    crop_pct = (use_test_size and cfg.test_crop_pct) or cfg.crop_pct
    if len(sides) != 2:
        if training:
            raise ValueError(
                f"transforms(training=True) builds image augmentation; for {len(sides)} spatial dimensions use "
                "MONAI's transforms, or training=False for ResizeNormalize"
            )
        return ResizeNormalize(tuple(sides), crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(cfg.interpolation)
    if training:
        steps: list[Any] = [T.RandomResizedCrop(tuple(sides), interpolation=interpolation), T.RandomHorizontalFlip()]
    else:
        scale = [math.floor(side / crop_pct) for side in sides]
        resize = T.Resize(scale[0] if scale[0] == scale[1] else scale, interpolation=interpolation)
        steps = [resize, T.CenterCrop(tuple(sides))]
    steps += [T.Grayscale(num_output_channels=1)] if channels == 1 else []
    return T.Compose([*steps, ToFloatTensor(), T.Normalize(cfg.mean, cfg.std)])


@dataclass(frozen=True)
class ToFloatTensor:
    """PIL image or uint8 (C, H, W) tensor -> float32 in [0, 1]; float tensors pass unchanged."""

    def __call__(self, image: Any) -> Tensor:
        from torchvision.transforms import functional as F

        tensor = image if isinstance(image, Tensor) else F.pil_to_tensor(image)
        return F.convert_image_dtype(tensor, torch.float32)


@dataclass(frozen=True)
class ResizeNormalize:
    """A volume (C, D, H, W) or signal (C, L) tensor -> float32 (C, *size): resized to ``size / crop_pct``
    (``F.interpolate`` with ``interpolation``), centre-cropped to ``size``, normalised per channel."""

    size: tuple[int, ...]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, volume: Tensor) -> Tensor:
        if not isinstance(volume, Tensor) or volume.dim() != len(self.size) + 1 or volume.shape[0] != len(self.mean):
            axes = "DHW"[-len(self.size) :] if len(self.size) == 3 else "L"
            shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
            raise ValueError(f"expected a ({len(self.mean)}, {', '.join(axes)}) tensor, got {shape}")
        scaled = tuple(math.floor(side / self.crop_pct) for side in self.size)
        x = torch.nn.functional.interpolate(volume[None].float(), size=scaled, mode=self.interpolation)[0]
        for axis, (have, want) in enumerate(zip(scaled, self.size, strict=True), start=1):
            x = x.narrow(axis, (have - want) // 2, want)
        shape = (-1,) + (1,) * len(self.size)
        return (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)
