"""Convert a torchvision DenseNet checkpoint into this project's safetensors layout, checked against torchvision.

    python -m export.convert --torchvision densenet121 --output out/densenet121_efficient.tv_in1k
    python path/to/export/convert.py --checkpoint mine.pth --model densenet121_efficient --tag pets --output out/x

Only ``--torchvision`` records torchvision's ImageNet weights (tag ``tv_in1k``, ImageNet labels); a
``--checkpoint`` (legacy ``norm.1`` key names or current ones) is recorded with your tag, and labels only with
``--labels``. The converted model must give torchvision's ``DenseNet``'s logits on a random image (max difference
printed, below 1e-5), else nothing is written; the folder gets ``save_pretrained``'s files, the entry is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densenet_efficient import DenseNet, create_model
from densenet_efficient.core.config import IMAGENET
from densenet_efficient.pretrained import read_state_dict, save_pretrained
from densenet_efficient.pretrained.download import fetch_url_bytes
from densenet_efficient.tools.bench import torchvision_densenet

TORCHVISION_URL_BASE = "https://download.pytorch.org"
TOLERANCE = 1e-5  # largest absolute logit difference a converted model may have (also export.monai's)
TORCHVISION_LABELS = "imagenet-1k"
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.pth$")


def torchvision_url(name: str, endpoint: str | None = None) -> str:
    """URL of torchvision's ImageNet weights for ``name`` (``densenet121``...), optionally on a mirror."""
    import torchvision

    if not name.startswith("densenet") or name not in torchvision.models.list_models():
        raise SystemExit(
            f"--torchvision must name a torchvision DenseNet: densenet121, densenet161, densenet169, "
            f"densenet201; got {name!r}"
        )
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return url.replace(TORCHVISION_URL_BASE, endpoint.rstrip("/"), 1) if endpoint else url


def save_if_equal(
    model: DenseNet, reference: tuple[str, nn.Module], state: dict, size: int, out: Path, **meta: Any
) -> int:
    """Print the largest logit difference of ``model`` and the ``(name, reference)`` holding ``state`` on one random
    input of side ``size``; below :data:`TOLERANCE`, ``save_pretrained`` into ``out`` and print the entry (0), else
    write nothing (1)."""
    name, network = reference
    network.load_state_dict(state, strict=True)
    shape = (1, model.in_chans) + (size,) * model.config["spatial_dims"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model.eval()(x) - network.eval()(x)).abs().max().item()
    print(f"max abs logit difference vs {name}: {difference:.3e}")
    if not difference < TOLERANCE:
        print(f"error: difference {difference:.3e} is not below {TOLERANCE}; nothing written", file=sys.stderr)
        return 1
    print(json.dumps(save_pretrained(model, out, **meta), indent=2))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.convert", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torchvision", metavar="NAME", help="a torchvision model name, e.g. densenet121 (online)")
    source.add_argument("--checkpoint", metavar="PATH_OR_URL", help="a .pth file or URL (legacy or new key names)")
    parser.add_argument("--model", help="this project's model name (default for --torchvision: NAME_efficient)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the saved set")
    parser.add_argument("--tag", help="weights tag (--torchvision: tv_in1k; --checkpoint needs one)")
    parser.add_argument("--labels", help=f"the classifier's label list (--torchvision: {TORCHVISION_LABELS})")
    parser.add_argument("--image-size", type=int, default=224, help="side of the random test image (default 224)")
    parser.add_argument("--endpoint", help=f"a mirror of {TORCHVISION_URL_BASE} for --torchvision")
    args = parser.parse_args(argv)
    if args.checkpoint and (args.model is None or args.tag is None):
        parser.error("--checkpoint needs --model and --tag (what the weights were trained on, e.g. pets or c10)")
    if args.torchvision:
        args.tag, args.labels = args.tag or "tv_in1k", args.labels or TORCHVISION_LABELS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    location = torchvision_url(args.torchvision, args.endpoint) if args.torchvision else args.checkpoint
    name = args.model or f"{args.torchvision}_efficient"
    is_url, prefix = location.startswith(("http://", "https://")), _HASH_PREFIX.search(location)
    if is_url and prefix is None:
        raise SystemExit(f"{location}: a checkpoint URL must end in -<sha256 prefix>.pth, as torchvision's do")
    # a URL: downloaded to torch.hub's cache, its sha256 checked against the name's prefix on the bytes read
    state_dict = read_state_dict(*fetch_url_bytes(location, prefix.group(1)) if is_url and prefix else (location,))
    classifier = state_dict.get("classifier.weight")
    model = create_model(name, **({} if classifier is None else {"num_classes": classifier.shape[0]}))
    model.load_state_dict(state_dict, strict=True)
    if model.config["stem"] != "imagenet" or model.config["compression"] != 0.5 or model.in_chans != 3:
        raise SystemExit("torchvision's DenseNet has an ImageNet stem, compression 0.5 and 3 channels: not this model")
    source = "torchvision's ImageNet weights" if args.torchvision else "a checkpoint in torchvision's layout"
    metadata = dict(tag=args.tag, source=f"converted from {source} ({location})", **IMAGENET.to_dict())  # torchvision's
    metadata |= {"labels": args.labels} if args.labels else {}
    reference = ("torchvision", torchvision_densenet(model.config))
    return save_if_equal(model, reference, state_dict, args.image_size, args.output, **metadata)


if __name__ == "__main__":
    sys.exit(main())
