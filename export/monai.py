"""Convert a MONAI DenseNet (``monai.networks.nets.DenseNet121/169/201/264``, any ``spatial_dims``) into this
project's layout, checked against MONAI's own logits.

    python -m export.monai --checkpoint best_metric_model.pth --output out/densenet121_3d.mymodel

The architecture (spatial dimensions, input channels, classes, growth rate, blocks, bottleneck width) is read
from the state dict's shapes. MONAI names a dense layer's modules ``denselayerM.layers.norm1`` and the classifier
``class_layers.out``; this project ``denselayerM.norm1`` and ``classifier`` (torchvision's names); every other key
is the same. The converted model and MONAI's ``DenseNet`` with the same tensors must give the same logits on a
random input (max absolute difference printed, below 1e-5), otherwise nothing is written. The output folder gets
the files of ``save_pretrained`` and the manifest entry is printed as JSON.

MONAI's ``dropout_prob`` drops whole channels in 2D and 3D (``nn.Dropout2d/3d``), this project's ``drop_rate``
single activations: weights and inference are the same, training with dropout is not.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densenet_efficient import DenseNet, create_model, list_models
from densenet_efficient.core import MemoryMode
from densenet_efficient.core.registry import architecture
from densenet_efficient.pretrained import read_state_dict, save_pretrained
from densenet_efficient.tools.bench import monai_densenet
from export.convert import TOLERANCE

DENSENET_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(DenseNet).parameters.items()}
_LAYER_KEY = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.layers\.((?:norm|conv)[12]\..+)$")
_CLASSIFIER_KEY = re.compile(r"^class_layers\.out\.(weight|bias)$")
_DENSE_LAYER = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.layers\.conv2\.weight$")


def convert_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MONAI DenseNet keys -> this project's (``...denselayerM.layers.norm1`` -> ``...denselayerM.norm1``,
    ``class_layers.out`` -> ``classifier``); raises ``ValueError`` for a state dict that is not a MONAI DenseNet."""
    if "features.conv0.weight" not in state_dict or "class_layers.out.weight" not in state_dict:
        raise ValueError(
            "not a MONAI DenseNet state dict: expected keys features.conv0.weight and "
            "class_layers.out.weight (monai.networks.nets.DenseNet121/169/201/264)"
        )
    converted = {}
    for key, value in state_dict.items():
        key = _LAYER_KEY.sub(r"\1.\2", key)
        key = _CLASSIFIER_KEY.sub(r"classifier.\1", key)
        converted[key] = value
    return converted


def model_args(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``DenseNet`` constructor arguments of the MONAI DenseNet whose (MONAI-named) ``state_dict`` this is."""
    convert_state_dict(state_dict)  # checks that it is one
    layers: dict[int, int] = {}
    for key in state_dict:
        match = _DENSE_LAYER.match(key)
        if match:
            block, layer = int(match[1]), int(match[2])
            layers[block] = max(layers.get(block, 0), layer)
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
    """The registered 3D architecture with ``args``' layout (``densenet121_3d`` for MONAI's
    DenseNet121...); ``ValueError`` if none has it."""
    keys = ("growth_rate", "block_config", "num_init_features", "bn_size")
    names = list_models("densenet*_3d")
    for name in names:
        if all(architecture(name).get(key, DENSENET_DEFAULTS[key]) == args[key] for key in keys):
            return name
    layout = ", ".join(f"{key}={args[key]}" for key in keys)
    raise ValueError(
        f"no registered architecture has this layout ({layout}); registered 3D DenseNets: "
        f"{', '.join(names)} (MONAI's DenseNet121/169/201/264): pass the model name to use"
    )


def from_monai(
    source: nn.Module | Mapping[str, Tensor], name: str | None = None, efficient: MemoryMode = True
) -> DenseNet:
    """This project's DenseNet with the weights and buffers of a MONAI DenseNet (a module or its state dict).

    ``name``: the registered model to build (default: the 3D architecture with the same blocks, e.g.
    ``densenet121_3d``); its spatial dimensions, channels and classes are taken from the weights.
    """
    state_dict = source.state_dict() if isinstance(source, nn.Module) else source
    args = model_args(state_dict)
    model = create_model(name or registered_name(args), efficient=efficient, **args)
    model.load_state_dict(convert_state_dict(state_dict), strict=True)
    return model


def max_logit_difference(state_dict: Mapping[str, Tensor], model: DenseNet, size: int) -> float:
    """Largest absolute difference of logits between ``model`` and MONAI's DenseNet holding ``state_dict`` (MONAI
    names), on one random input of side ``size``, both in eval mode."""
    reference = monai_densenet(model.config)
    reference.load_state_dict(state_dict, strict=True)
    shape = (1, model.config["in_chans"]) + (size,) * model.config["spatial_dims"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.eval()(x) - reference.eval()(x)).abs().max().item()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.monai", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a MONAI DenseNet state dict: .pth/.pt (read with weights_only=True) or .safetensors",
    )
    parser.add_argument("--model", help="this project's model name (default: densenet<N>_3d with the same blocks)")
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for model.safetensors, config.json, README.md"
    )
    parser.add_argument("--tag", default="monai", help="weights tag recorded in config.json (default: monai)")
    parser.add_argument("--size", type=int, default=64, help="side of the random test input (default 64)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    state_dict = read_state_dict(args.checkpoint)
    try:
        model = from_monai(state_dict, args.model)
    except ValueError as error:
        print(f"error: {args.checkpoint}: {error}", file=sys.stderr)
        return 2
    difference = max_logit_difference(state_dict, model, args.size)
    print(f"max abs logit difference vs MONAI: {difference:.3e}")
    if not difference < TOLERANCE:
        print(f"error: difference {difference:.3e} is not below {TOLERANCE}; nothing written", file=sys.stderr)
        return 1
    entry = save_pretrained(model, args.output, tag=args.tag, source=f"converted from MONAI ({args.checkpoint.name})")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
