"""``densenet-efficient eval``: top-1/top-5 accuracy of a model and its weights, with the weights' preprocessing."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from ..models import create_model
from .common import AMP_DTYPES, Progress, UsageError, device_name, evaluate, int_at_least, model_name
from .data import BAD_IMAGES, DATASETS, build_splits, pretrained_weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("model", type=model_name, help="model name (see `densenet-efficient models`)")
    add("--weights", help="tag, .safetensors file (a train run's best or checkpoint too), folder, hf-hub:org/name")
    add("--dataset", choices=DATASETS, default="digits")
    add("--data", help="dataset folder (CIFAR: where cifar-*-batches-py lives; imagefolder: the tree)")
    add("--download", action="store_true", help="download CIFAR if it is not in --data")
    add("--split", choices=("test", "val"), default="test")
    add("--val-fraction", type=float, default=0.1, help="training images held out for validation, as in train")
    add("--bad-images", choices=BAD_IMAGES, default="error", help="imagefolder: stop at unreadable images, or skip")
    add("--batch-size", type=int_at_least(1), default=256)
    add("--workers", type=int_at_least(0), default=0, help="data-loading processes (default 0)")
    add("--device", type=device_name, help="cuda, cuda:N or cpu (default: cuda if available)")
    add("--amp", choices=tuple(AMP_DTYPES), help="mixed precision")
    add("--channels-last", action="store_true")
    add("--json", type=Path, help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights, preprocessing = pretrained_weights(args.model, args.weights)  # read once
    options = dict(download=args.download, val_fraction=args.val_fraction, bad_images=args.bad_images)
    splits = build_splits(args.dataset, args.data, preprocessing=preprocessing, augment=False, **options)
    if (dataset := splits.test if args.split == "test" else splits.val) is None:
        raise UsageError("--split val needs a validation set: pass --val-fraction above 0")
    model = weights.load_into(create_model(args.model, **{**weights.model_args, "efficient": False}))
    if model.num_classes != len(splits.classes):
        raise ValueError(
            f"the weights have {model.num_classes} classes, {args.dataset} has {len(splits.classes)}: evaluate them on "
            "the dataset they were trained for"
        )
    model.to(device).to(memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    progress = Progress("eval", len(loader), unit="batch")
    progress.note(f"{args.dataset} ({args.split}): {len(loader)} batches of up to {args.batch_size} on {device}")
    with contextlib.closing(progress):
        scores = evaluate(model, progress.each(loader, "batch"), device, amp=args.amp, channels_last=args.channels_last)
    result = {"model": args.model, "weights": args.weights, "dataset": args.dataset, "split": args.split, **scores}
    print(text := json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0
