"""Datasets split into train, validation (``val_fraction`` of the training images, fixed seed) and test sets:
``digits`` (scikit-learn's 8x8 digits, upsampled; 20% test), ``cifar10``/``cifar100`` (torchvision's, in ``--data``)
and ``imagefolder`` (``DIR/train`` with ``DIR/val`` and/or ``DIR/test``, or a flat ``DIR``: 20% test), each image
decoded once first (``bad_images``: name the unreadable ones, or skip them). Images are prepared as an
:class:`~..core.config.InputCfg` says: the dataset's own, or the pretrained weights' when fine-tuning."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from ..core.config import CIFAR10, CIFAR100, IMAGENET, InputCfg
from ..pretrained.loading import PretrainedWeights, resolve_weights
from ..pretrained.preprocessing import transforms

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
BAD_IMAGES = ("error", "skip")  # what to do with images that cannot be decoded
TEST_FRACTION = 0.2  # digits and a flat imagefolder: the held-out test set


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for."""


class UnreadableImagesError(ValueError):
    """Images of an ImageFolder tree that cannot be decoded (truncated, corrupt, not an image)."""


DEFAULT_INPUT = {"cifar10": CIFAR10, "cifar100": CIFAR100, "imagefolder": IMAGENET}


@dataclass
class Splits:
    """A dataset's train, validation (``None`` when ``val_fraction`` is 0) and test sets of (image, label)."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    classes: list[str]
    preprocessing: InputCfg


def pretrained_weights(model: str, weights: str | os.PathLike | None) -> tuple[PretrainedWeights, InputCfg]:
    """``weights`` of ``model`` (a tag, ``None`` for the default one, a saved file or folder, ``hf-hub:org/name``)
    resolved, read and checked once, and the input they were trained with (without their label names)."""
    resolved = resolve_weights(model, weights)
    try:
        return resolved, replace(InputCfg.from_dict(resolved.pretrained_cfg), label_names=None)
    except ValueError as error:
        raise ValueError(f"weights {resolved.source}: {error}") from None


def build_splits(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    preprocessing: InputCfg | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    augment: bool = True,
    bad_images: str = "error",
) -> Splits:
    """Load ``dataset`` (one of :data:`DATASETS`) and split it. ``preprocessing`` defaults to the dataset's own,
    ``image_size`` overrides its input size; ``augment`` adds the training augmentation (CIFAR: padded random crop
    and flip; photos: random resized crop and flip); ``bad_images``: one of :data:`BAD_IMAGES`."""
    if dataset not in DATASETS or not 0 <= val_fraction < 1:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)} ({dataset!r}), val_fraction in [0, 1)")
    if dataset == "digits":  # values 0..16 scaled to [0, 1], resized bilinearly, normalised
        from sklearn.datasets import load_digits  # the CLI names the extra that brings it when it is missing

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        labels = torch.tensor(digits.target, dtype=torch.long)
        rest, test = _split(range(len(labels)), TEST_FRACTION)
        train, val = _split(rest, val_fraction)
        if preprocessing is None:
            preprocessing = InputCfg((1, 32, 32), (images[train].mean().item(),), (images[train].std().item(),), 1.0)
        preprocessing = preprocessing.with_size(image_size)
        images = F.interpolate(images, preprocessing.input_size[1:], mode="bilinear", align_corners=False).clamp_(0, 1)
        images = images.expand(-1, preprocessing.channels, -1, -1)
        mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (preprocessing.mean, preprocessing.std))
        images = ((images - mean) / std).contiguous()
        sets = [TensorDataset(images[indices], labels[indices]) for indices in (train, val, test)]
        return Splits(sets[0], sets[1] if val else None, sets[2], [str(n) for n in digits.target_names], preprocessing)
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs a data folder (--data DIR)")
    preprocessing = (preprocessing or DEFAULT_INPUT[dataset]).with_size(image_size)
    photos = dataset == "imagefolder"
    train_tf, eval_tf = _transforms(preprocessing, augment, photos), _transforms(preprocessing, False, photos)
    if photos:
        return _imagefolder_splits(Path(root), preprocessing, val_fraction, (train_tf, eval_tf), bad_images)
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        train = cls(root, train=True, transform=train_tf, download=download)
    except RuntimeError as error:
        raise DatasetNotFoundError(
            f"{dataset} not found in {root} ({error}): pass --download (download=True) to fetch it, or point --data "
            f"at the folder that contains {cls.base_folder}"
        ) from error
    rest, val = _split(range(len(train)), val_fraction)
    held_out = Subset(cls(root, train=True, transform=eval_tf), val) if val else None
    test = cls(root, train=False, transform=eval_tf)
    return Splits(Subset(train, rest), held_out, test, list(train.classes), preprocessing)


def _split(indices: Sequence[int], fraction: float) -> tuple[list[int], list[int]]:
    """``indices`` shuffled with a fixed seed (the held-out sets never depend on the training seed): (the rest,
    the held-out ``fraction``), each in the original order."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0)).tolist()
    held_out = round(len(indices) * fraction)
    return [indices[i] for i in sorted(order[held_out:])], [indices[i] for i in sorted(order[:held_out])]


def _transforms(preprocessing: InputCfg, train: bool, photos: bool):
    """:func:`~densenet_efficient.transforms` for evaluation (CIFAR: no crop) and for training on photos;
    CIFAR-style training augmentation (random crop with padding, flip) otherwise."""
    if photos or not train:
        return transforms(preprocessing if photos else replace(preprocessing, crop_pct=1.0), training=train)
    from torchvision import transforms as T

    size = preprocessing.input_size[-1]
    steps = [T.Resize(size, interpolation=T.InterpolationMode(preprocessing.interpolation))] if size != 32 else []
    steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    steps += [T.Grayscale()] if preprocessing.channels == 1 else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)])


def _imagefolder_splits(root: Path, preprocessing: InputCfg, val_fraction: float, tfs, bad_images: str) -> Splits:
    """``root/train`` (+ ``root/test`` and/or ``root/val``), or a flat ``root`` of class folders."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetNotFoundError(f"no folder {root}: expected an ImageFolder tree (one sub-folder per class)")
    train_root = root / "train" if (root / "train").is_dir() else root
    named = [root / name for name in ("test", "val") if train_root != root and (root / name).is_dir()]
    scans = [ImageFolder(folder) for folder in (train_root, *named)]
    for other, scan in zip(named, scans[1:], strict=True):
        if scan.classes != scans[0].classes:
            raise ValueError(f"class folders differ: {train_root} has {scans[0].classes}, {other} has {scan.classes}")
    samples = [path for scan in scans for path, _ in scan.samples]

    def problem(path: str) -> str | None:  # decoded as torchvision's loader does (JPEGs at reduced scale: all read)
        try:
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))
                image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for a damaged file
            return f"{type(error).__name__}: {error}"
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = pool.map(problem, samples, chunksize=64)
        unreadable = {path: reason for path, reason in zip(samples, reasons, strict=True) if reason is not None}
    if unreadable:
        listing = "; ".join(f"{path} ({reason})" for path, reason in list(unreadable.items())[:5])
        listing += f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        if bad_images == "error":
            raise UnreadableImagesError(
                f"{len(unreadable)} of {len(samples)} images cannot be read: {listing}. Replace or remove them, or "
                "pass --bad-images skip (bad_images='skip') to leave them out"
            )
        warnings.warn(f"skipped {len(unreadable)} unreadable images of {len(samples)}: {listing}", stacklevel=3)

    readable = set(samples) - unreadable.keys()

    def folder(path: Path, train: bool) -> ImageFolder:  # of the images found and decoded above, the readable ones
        return ImageFolder(path, tfs[0] if train else tfs[1], is_valid_file=readable.__contains__)

    train, held_out = folder(train_root, True), folder(train_root, False)
    rest, test_indices = _split(range(len(train)), 0 if named else TEST_FRACTION)
    test: Dataset = folder(named[0], False) if named else Subset(held_out, test_indices)
    rest, val = _split(rest, 0 if len(named) == 2 else val_fraction)
    held: Dataset | None = folder(named[1], False) if len(named) == 2 else Subset(held_out, val) if val else None
    return Splits(Subset(train, rest), held, test, train.classes, preprocessing)
