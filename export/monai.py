"""Convert a MONAI DenseNet checkpoint into this project's layout and write it as published weights, checked
against MONAI's own logits (the conversion itself: :mod:`densenet_efficient.core.monai_layout`).

    python -m export.monai --checkpoint best_metric_model.pth --output out/densenet121_3d.mymodel

The converted model and MONAI's ``DenseNet`` with the same tensors must give the same logits on a random input
(max absolute difference printed, below 1e-5), otherwise nothing is written. The output folder gets the files of
``save_pretrained`` and the manifest entry is printed as JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from densenet_efficient import DenseNet
from densenet_efficient.core.monai_layout import convert_state_dict, from_monai, model_args, registered_name
from densenet_efficient.pretrained import read_state_dict
from densenet_efficient.tools.bench import monai_densenet
from export.convert import save_if_equal

__all__ = ["convert_state_dict", "from_monai", "main", "max_logit_difference", "model_args", "registered_name"]


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
    source = f"converted from MONAI ({args.checkpoint.name})"
    return save_if_equal(model, difference, "MONAI", args.output, tag=args.tag, source=source)


if __name__ == "__main__":
    sys.exit(main())
