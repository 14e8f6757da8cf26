"""MONAI's DenseNet (``monai.networks.nets.DenseNet121/169/201/264``, any ``spatial_dims``) in this project's
layout: its state dict converted, or a model built with its weights (:func:`from_monai`).

MONAI's keys ``denselayerM.layers.norm1``, ``class_layers.relu`` and ``class_layers.out`` are this project's (and
torchvision's) ``denselayerM.norm1``, ``features.relu5`` and ``classifier``; the architecture is read from the
shapes. :func:`~densenet_efficient.make_efficient` keeps MONAI's own model instead. MONAI's ``dropout_prob`` drops
whole channels, this project's ``drop_rate`` single values: the same weights and inference, not the same training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .functional import MemoryMode
from .model import DenseNet
from .registry import architecture, list_models, resolve_model

_LAYER_KEY = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.layers\.((?:norm|relu|conv)[12]\..+)$")
_CLASSIFIER_KEY = re.compile(r"^class_layers\.out\.(weight|bias)$")
_FINAL_ACT_KEY = re.compile(r"^class_layers\.relu\.")  # a PReLU's weight
_DENSE_LAYER = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.layers\.conv2\.weight$")


def convert_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MONAI DenseNet keys -> this project's; ``ValueError`` for a state dict that is not a MONAI DenseNet."""
    if "features.conv0.weight" not in state_dict or "class_layers.out.weight" not in state_dict:
        raise ValueError(
            "not a MONAI DenseNet state dict: expected keys features.conv0.weight and "
            "class_layers.out.weight (monai.networks.nets.DenseNet121/169/201/264)"
        )
    converted = {}
    for key, value in state_dict.items():
        key = _LAYER_KEY.sub(r"\1.\2", key)
        key = _FINAL_ACT_KEY.sub("features.relu5.", _CLASSIFIER_KEY.sub(r"classifier.\1", key))
        converted[key] = value
    return converted


def model_args(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``DenseNet`` constructor arguments of the MONAI DenseNet whose (MONAI-named) ``state_dict`` this is."""
    convert_state_dict(state_dict)  # checks that it is one
    layers: dict[int, int] = {}
    for match in filter(None, map(_DENSE_LAYER.match, state_dict)):
        layers[int(match[1])] = max(layers.get(int(match[1]), 0), int(match[2]))
    if not layers or sorted(layers) != list(range(1, len(layers) + 1)):
        raise ValueError("not a MONAI DenseNet state dict: its dense blocks are not numbered 1, 2, ...")
    conv0 = state_dict["features.conv0.weight"]
    conv1 = state_dict["features.denseblock1.denselayer1.layers.conv1.weight"]
    growth_rate = state_dict["features.denseblock1.denselayer1.layers.conv2.weight"].shape[0]
    return {
        "growth_rate": growth_rate,
        "block_config": tuple(layers[block] for block in sorted(layers)),
        "num_init_features": conv0.shape[0],
        "bn_size": conv1.shape[0] // growth_rate,
        "compression": 0.5,
        "num_classes": state_dict["class_layers.out.weight"].shape[0],
        "in_chans": conv0.shape[1],
        "stem": "imagenet",
        "spatial_dims": conv0.dim() - 2,
    }


def registered_name(args: Mapping[str, Any]) -> str:
    """The registered 3D architecture with ``args``' layout (MONAI's DenseNet121: ``densenet121_3d``)."""
    keys = ("growth_rate", "block_config", "num_init_features", "bn_size")
    names = list_models("densenet*_3d")
    if found := [name for name in names if all(architecture(name)[key] == args[key] for key in keys)]:
        return found[0]
    layout = ", ".join(f"{key}={args[key]}" for key in keys)
    raise ValueError(
        f"no registered architecture has this layout ({layout}); registered 3D DenseNets: "
        f"{', '.join(names)} (MONAI's DenseNet121/169/201/264): pass the model name to use"
    )


def from_monai(
    source: nn.Module | Mapping[str, Tensor], name: str | None = None, efficient: MemoryMode = True
) -> DenseNet:
    """This project's DenseNet with the weights and buffers of a MONAI DenseNet (a module or its state dict), as
    registered model ``name`` (default: the 3D one with the same blocks) with the weights' dimensions and sizes."""
    state_dict = source.state_dict() if isinstance(source, nn.Module) else source
    args = model_args(state_dict)
    if isinstance(source, nn.Module):  # its norm and activation (a state dict holds batch norm and ReLU)
        args.update(norm=_norm_spec(source.get_submodule("features.norm0")), act=source.get_submodule("features.relu0"))
    name = resolve_model(name or registered_name(args))
    model = DenseNet(**{**architecture(name), **args}, efficient=efficient, arch_name=name)
    model.load_state_dict(convert_state_dict(state_dict), strict=True)
    return model


def _norm_spec(norm: nn.Module) -> Any:
    """``DenseNet``'s ``norm`` for modules like ``norm``: its class and settings, or MONAI's group spelling."""
    if isinstance(norm, nn.GroupNorm):
        return "group", {"num_groups": norm.num_groups, "eps": norm.eps, "affine": norm.affine}
    settings = ("eps", "momentum", "affine", "track_running_stats")
    return type(norm), {key: getattr(norm, key) for key in settings if hasattr(norm, key)}


_MONAI_ARGS = dict(init_features="num_init_features", dropout_prob="drop_rate")  # MONAI's name -> DenseNet's


def monai_densenet(
    spatial_dims: int, in_channels: int, out_channels: int, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """This project's DenseNet from ``monai.networks.nets.DenseNet``'s arguments: ``init_features``,
    ``growth_rate``, ``block_config``, ``bn_size``, ``act``, ``norm`` and ``dropout_prob`` in MONAI's spellings
    (and ``efficient``); MONAI's state dicts load into it after :func:`convert_state_dict`. ``pretrained=True`` is
    refused: MONAI's pretrained 2D weights are torchvision's (``create_model("densenet121", pretrained=True)``)."""
    if pretrained:
        raise ValueError(
            "pretrained=True: load torchvision's weights by name (create_model), or MONAI's with from_monai"
        )
    args = {_MONAI_ARGS.get(key, key): value for key, value in kwargs.items()}
    return DenseNet(spatial_dims=spatial_dims, in_chans=in_channels, num_classes=out_channels, **args)
