"""The preprocessing that travels with the weights: torchvision transforms built from ``model.pretrained_cfg``.

For evaluation the pipeline is timm's (``timm.data.create_transform`` for the same configuration): resize the
shorter side to ``floor(size / crop_pct)``, centre-crop ``size``, convert to a tensor in [0, 1] and normalise.
torchvision is imported only when a pipeline is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .manifest import PretrainedCfg

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


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
    """
    cfg = _input_cfg(model_or_cfg)
    from torchvision import transforms as T

    size_key, crop_key = ("test_input_size", "test_crop_pct") if use_test_size else ("input_size", "crop_pct")
    channels, height, width = cfg.get(size_key) or cfg["input_size"]
    crop_pct = cfg.get(crop_key) or cfg.get("crop_pct") or 0.875
    interpolation_name = cfg.get("interpolation") or "bilinear"
    if interpolation_name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation_name!r}")
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


def _input_cfg(model_or_cfg: nn.Module | Mapping[str, Any] | PretrainedCfg) -> Mapping[str, Any]:
    if isinstance(model_or_cfg, PretrainedCfg):
        return model_or_cfg.model_cfg()
    if isinstance(model_or_cfg, nn.Module):
        cfg = getattr(model_or_cfg, "pretrained_cfg", None)
        if not isinstance(cfg, Mapping):
            raise TypeError(
                f"{type(model_or_cfg).__name__} has no pretrained_cfg: build it with create_model, or "
                "pass a pretrained_cfg dict"
            )
        return cfg
    if isinstance(model_or_cfg, Mapping):
        missing = [key for key in ("input_size", "mean", "std") if key not in model_or_cfg]
        if missing:
            raise ValueError(f"the configuration has no {', '.join(missing)}: cannot build its preprocessing")
        return model_or_cfg
    raise TypeError(f"expected a model, a pretrained_cfg dict or a PretrainedCfg, got {type(model_or_cfg).__name__}")
