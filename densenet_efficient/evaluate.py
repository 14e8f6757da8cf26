"""``densenet-efficient eval``: top-1/top-5 accuracy of a model and its weights, with the weights' preprocessing.

Also home of :func:`evaluate`, which the trainer uses for its validation and test sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """``torch.autocast`` for ``amp`` (``"bf16"``, ``"fp16"`` or ``None`` for full precision) on ``device``."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}; valid modes: {', '.join(AMP_DTYPES)} (or none)")
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp or "bf16"), enabled=amp is not None)


def to_device(images: Tensor, labels: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device`` (images in channels-last layout if asked)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, *,
             amp: str | None = None, channels_last: bool = False,
             all_reduce: Callable[[Tensor], None] | None = None) -> dict[str, float]:
    """Mean cross-entropy ``loss``, ``top1`` and ``top5`` accuracy (%) and the number of ``images``.

    ``all_reduce`` sums the per-process totals in place (distributed evaluation on disjoint shards). With fewer
    than five classes, ``top5`` counts the top ``num_classes``.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in batches:
        images, labels = to_device(images, labels, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), hits[:, 0].sum(),
                               hits.any(1).sum(), torch.tensor(len(labels), device=device)]).double()
    if all_reduce is not None:
        all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    if count == 0:
        raise ValueError("nothing to evaluate: the dataset split is empty")
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "images": int(count)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    parser.add_argument("model", help="registered model name (see `densenet-efficient models`)")
    parser.add_argument("--weights", help="weights tag, .safetensors file, folder written by `train`/save_pretrained, "
                        "or hf-hub:org/name[@revision]; default: the model's default pretrained weights")
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data", help="dataset folder (CIFAR: where cifar-*-batches-py lives; imagefolder: the tree)")
    parser.add_argument("--download", action="store_true", help="download CIFAR if it is not in --data")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the training images held out for validation, as in `train` (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), help="mixed precision")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .data import build_splits, weights_preprocessing
    from .registry import create_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preprocessing = weights_preprocessing(args.model, args.weights)
    splits = build_splits(args.dataset, args.data, download=args.download, preprocessing=preprocessing,
                          val_fraction=args.val_fraction, augment=False)
    dataset = splits.test if args.split == "test" else splits.val
    if dataset is None:
        raise ValueError("--split val needs a validation set: pass --val-fraction above 0")
    model = create_model(args.model, pretrained=args.weights is None, weights=args.weights, efficient=False)
    classes = model.config["num_classes"]
    if classes != splits.num_classes:
        raise ValueError(f"the weights have {classes} classes, {args.dataset} has {splits.num_classes}: evaluate "
                         "them on the dataset they were trained for")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    metrics = evaluate(model, loader, device, amp=args.amp, channels_last=args.channels_last)
    result = {"model": args.model, "weights": args.weights, "dataset": args.dataset, "split": args.split, **metrics}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0
