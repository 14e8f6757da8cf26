"""``densenet-efficient eval``: top-1/top-5 accuracy of a model and its weights, with the weights' preprocessing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..models import create_model
from .common import AMP_DTYPES, Progress, UsageError, evaluate, model_name
from .data import BAD_IMAGES, DATASETS, build_splits, weights_preprocessing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=model_name, help="model name (see `densenet-efficient models`)")
    parser.add_argument(
        "--weights",
        help="weights tag, .safetensors file (a `train` run's best.safetensors or "
        "checkpoints/epoch-N.safetensors too), folder written by `train`/save_pretrained, or "
        "hf-hub:org/name[@revision]; default: the model's default pretrained weights",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data", help="dataset folder (CIFAR: where cifar-*-batches-py lives; imagefolder: the tree)")
    parser.add_argument("--download", action="store_true", help="download CIFAR if it is not in --data")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the training images held out for validation, as in `train` (default 0.1)",
    )
    parser.add_argument(
        "--bad-images",
        choices=BAD_IMAGES,
        default="error",
        help="imagefolder: stop at unreadable images (default, naming them) or skip them",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), help="mixed precision")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preprocessing = weights_preprocessing(args.model, args.weights)
    splits = build_splits(
        args.dataset,
        args.data,
        download=args.download,
        preprocessing=preprocessing,
        val_fraction=args.val_fraction,
        augment=False,
        bad_images=args.bad_images,
    )
    dataset = splits.test if args.split == "test" else splits.val
    if dataset is None:
        raise UsageError("--split val needs a validation set: pass --val-fraction above 0")
    model = create_model(args.model, pretrained=args.weights is None, weights=args.weights, efficient=False)
    classes = model.config["num_classes"]
    if classes != splits.num_classes:
        raise ValueError(
            f"the weights have {classes} classes, {args.dataset} has {splits.num_classes}: evaluate "
            "them on the dataset they were trained for"
        )
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    progress = Progress("eval", len(loader), unit="batch")
    progress.note(f"{args.dataset} ({args.split}): {len(loader)} batches of up to {args.batch_size} on {device}")
    try:
        batches = progress.each(loader, "batch")
        metrics = evaluate(model, batches, device, amp=args.amp, channels_last=args.channels_last)
    finally:
        progress.close()
    result = {"model": args.model, "weights": args.weights, "dataset": args.dataset, "split": args.split, **metrics}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0
