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
from collections.abc import Sequence
from pathlib import Path

from densenet_efficient.core.monai_layout import convert_state_dict, from_monai, model_args, registered_name
from densenet_efficient.pretrained import read_state_dict
from densenet_efficient.tools.bench import monai_densenet
from export.convert import save_if_equal

__all__ = ["convert_state_dict", "from_monai", "main", "model_args", "registered_name"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.monai", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a MONAI state dict (.pth or .safetensors)")
    parser.add_argument("--model", help="this project's model name (default: densenet<N>_3d with the same blocks)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the saved set")
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
    metadata = dict(tag=args.tag, source=f"converted from MONAI ({args.checkpoint.name})")
    reference = ("MONAI", monai_densenet(model.config))
    return save_if_equal(model, reference, state_dict, args.size, args.output, **metadata)


if __name__ == "__main__":
    sys.exit(main())
