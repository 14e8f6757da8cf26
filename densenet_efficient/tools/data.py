"""Datasets for training and evaluation, each split into train, validation and test sets.

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn, no download),
  upsampled to the input size. A fixed 20% is the test set; the validation set is taken from the rest.
* ``cifar10`` / ``cifar100``: torchvision's CIFAR datasets in ``--data DIR`` (downloaded only with ``download``);
  the official test set, and a validation set held out of the 50,000 training images.
* ``imagefolder``: any ``torchvision.datasets.ImageFolder`` tree (one folder per class), either ``DIR/train`` with
  ``DIR/val`` and/or ``DIR/test``, or a flat ``DIR`` that is split into train/validation/test. Every image is
  decoded once before training (JPEGs at reduced scale, on several threads), so that an unreadable file is named
  at the start rather than crashing an epoch: ``bad_images="error"`` (the default: a dataset is never silently
  smaller than its folder) raises :class:`UnreadableImagesError` listing them, ``"skip"`` leaves them out with a
  warning and a count (the held-out splits are then drawn from the readable images).

Images are normalised with a :class:`Preprocessing` (mean, std, input size): the dataset's own by default, the
pretrained weights' own when fine-tuning (:func:`weights_preprocessing`, which reads them as
``model.pretrained_cfg`` gets them). Evaluation images go through :func:`densenet_efficient.transforms`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from ..core.config import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD
from ..pretrained.loading import resolve_weights
from ..pretrained.preprocessing import transforms

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
SPLIT_SEED = 0  # the held-out splits never depend on the training seed
DIGITS_TEST_FRACTION = 0.2
IMAGEFOLDER_TEST_FRACTION = 0.2
BAD_IMAGES = ("error", "skip")  # what to do with images that cannot be decoded


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for."""


class UnreadableImagesError(ValueError):
    """Images of an ImageFolder tree that cannot be decoded (truncated, corrupt, not an image)."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into network inputs: per-channel ``mean``/``std`` (the number of channels), square
    ``input_size``, and for photos the evaluation resize (``input_size / crop_pct``, then a centre crop)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    @property
    def channels(self) -> int:
        return len(self.mean)

    def with_size(self, input_size: int | None) -> Preprocessing:
        """The same preprocessing at another input size (``None``: unchanged)."""
        if input_size is None:
            return self
        if input_size < 1:
            raise ValueError(f"image size must be a positive number of pixels, got {input_size}")
        return Preprocessing(self.mean, self.std, input_size, self.crop_pct, self.interpolation)

    def metadata(self) -> dict[str, Any]:
        """The keys :func:`weights_preprocessing` reads back from exported weights."""
        return dict(
            mean=list(self.mean),
            std=list(self.std),
            input_size=[self.channels, self.input_size, self.input_size],
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )

    def pretrained_cfg(self, photos: bool = True) -> dict[str, Any]:
        """This preprocessing in timm's ``pretrained_cfg`` keys, for :func:`~densenet_efficient.transforms`
        (non-photos, e.g. CIFAR: no crop)."""
        return {
            "input_size": (self.channels, self.input_size, self.input_size),
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct if photos else 1.0,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], where: str) -> Preprocessing:
        """Read ``mean``, ``std``, ``input_size`` (and optional ``crop_pct``, ``interpolation``) from weights
        metadata; raise ``ValueError`` naming ``where`` if they are missing or inconsistent."""
        missing = [key for key in ("mean", "std", "input_size") if key not in metadata]
        if missing:
            raise ValueError(f"{where} gives no {', '.join(missing)}: cannot tell how its images were normalised")
        mean, std, input_size = tuple(metadata["mean"]), tuple(metadata["std"]), metadata["input_size"]
        size = input_size[-1] if isinstance(input_size, Sequence) else input_size
        if len(mean) != len(std) or not isinstance(size, int):
            raise ValueError(f"{where}: mean {mean}, std {std} and input_size {input_size} do not fit together")
        return cls(
            tuple(map(float, mean)),
            tuple(map(float, std)),
            size,
            float(metadata.get("crop_pct", 0.875)),
            str(metadata.get("interpolation", "bilinear")),
        )


DEFAULT_PREPROCESSING = {
    "cifar10": Preprocessing(CIFAR10_MEAN, CIFAR10_STD, 32),
    "cifar100": Preprocessing(CIFAR100_MEAN, CIFAR100_STD, 32),
    "imagefolder": Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 224),
}


@dataclass
class Splits:
    """A dataset's train, validation (``None`` when ``val_fraction`` is 0) and test sets of (image, label)."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    classes: list[str]
    preprocessing: Preprocessing

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def weights_preprocessing(
    model: str,
    weights: str | os.PathLike | None,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> Preprocessing:
    """The preprocessing pretrained ``weights`` of ``model`` were trained with (a tag, a folder or file written
    by ``save_pretrained``, or ``hf-hub:org/name``; ``None``: the default tag): the input configuration that
    :func:`~densenet_efficient.pretrained.resolve_weights` reads for ``model.pretrained_cfg``."""
    resolved = resolve_weights(model, weights, cache_dir=cache_dir, endpoint=endpoint)
    return Preprocessing.from_metadata(resolved.pretrained_cfg, f"weights {resolved.source}")


def build_splits(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    augment: bool = True,
    bad_images: str = "error",
) -> Splits:
    """Load ``dataset`` (one of :data:`DATASETS`) and split it.

    ``preprocessing`` defaults to the dataset's own; ``image_size`` overrides its input size. ``val_fraction`` of
    the training images (chosen with a fixed seed) form the validation set. ``augment`` adds the training
    augmentation (CIFAR: random crop with padding and horizontal flip; photos: random resized crop and flip).
    ``bad_images`` (``imagefolder``): ``"error"`` or ``"skip"`` for images that cannot be decoded.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if dataset == "digits":
        return _digits_splits(preprocessing, image_size, val_fraction)
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs a data folder (--data DIR)")
    preprocessing = (preprocessing or DEFAULT_PREPROCESSING[dataset]).with_size(image_size)
    if dataset == "imagefolder":
        if bad_images not in BAD_IMAGES:
            raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGES)}, got {bad_images!r}")
        return _imagefolder_splits(Path(root), preprocessing, val_fraction, augment, bad_images)
    return _cifar_splits(dataset, Path(root), download, preprocessing, val_fraction, augment)


def _split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Indices ``0..n-1`` shuffled with :data:`SPLIT_SEED`: (the rest, the held-out ``fraction``)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held_out = round(n * fraction)
    return sorted(order[held_out:]), sorted(order[:held_out])


def _digits_splits(preprocessing: Preprocessing | None, image_size: int | None, val_fraction: float) -> Splits:
    """scikit-learn's digits as tensors: values 0..16 scaled to [0, 1], resized bilinearly, normalised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits dataset comes with scikit-learn: pip install 'densenet-efficient[train]'"
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target, dtype=torch.long)
    rest, test = _split(len(labels), DIGITS_TEST_FRACTION)
    train, val = _split_subset(rest, val_fraction)
    if preprocessing is None:
        preprocessing = Preprocessing((images[train].mean().item(),), (images[train].std().item(),), 32)
    preprocessing = preprocessing.with_size(image_size)
    size = preprocessing.input_size
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    images = images.expand(-1, preprocessing.channels, -1, -1)
    mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)
    images = ((images - mean) / std).contiguous()

    def subset(indices: Tensor | list[int]) -> TensorDataset:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return TensorDataset(images[indices], labels[indices])

    return Splits(
        subset(train),
        subset(val) if len(val) else None,
        subset(test),
        [str(label) for label in digits.target_names],
        preprocessing,
    )


def _split_subset(indices: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Split a list of indices like :func:`_split` splits ``range(n)``."""
    keep, held_out = _split(len(indices), fraction)
    return [indices[i] for i in keep], [indices[i] for i in held_out]


def _transforms(preprocessing: Preprocessing, train: bool, photos: bool):
    """torchvision transforms: :func:`~densenet_efficient.transforms` for evaluation and for training on photos
    (random resized crop and flip); CIFAR-style training augmentation (random crop with padding, flip)."""
    if photos or not train:
        return transforms(preprocessing.pretrained_cfg(photos), training=train)
    from torchvision import transforms as T

    size = preprocessing.input_size
    steps = [T.Resize(size, interpolation=T.InterpolationMode(preprocessing.interpolation))] if size != 32 else []
    steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    if preprocessing.channels == 1:
        steps.append(T.Grayscale())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)])


def _cifar_splits(
    dataset: str, root: Path, download: bool, preprocessing: Preprocessing, val_fraction: float, augment: bool
) -> Splits:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    train_tf, eval_tf = _transforms(preprocessing, augment, photos=False), _transforms(preprocessing, False, False)
    try:
        train_full = cls(root, train=True, transform=train_tf, download=download)
    except RuntimeError as error:
        folder = root / cls.base_folder
        raise DatasetNotFoundError(
            f"{dataset} not found in {root} (looked for {folder}: {error}). Pass --download (download=True) to "
            f"fetch it, or point --data at the folder that contains {cls.base_folder}."
        ) from error
    eval_full = cls(root, train=True, transform=eval_tf)
    train, val = _split(len(train_full), val_fraction)
    test = cls(root, train=False, transform=eval_tf)
    return Splits(
        Subset(train_full, train),
        Subset(eval_full, val) if val else None,
        test,
        list(train_full.classes),
        preprocessing,
    )


def _imagefolder_splits(
    root: Path, preprocessing: Preprocessing, val_fraction: float, augment: bool, bad_images: str
) -> Splits:
    """``root/train`` (+ ``root/test`` and/or ``root/val``), or a flat ``root`` of class folders."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    if not root.is_dir():
        raise DatasetNotFoundError(f"no folder {root}: expected an ImageFolder tree (one sub-folder per class)")
    train_tf, eval_tf = _transforms(preprocessing, augment, photos=True), _transforms(preprocessing, False, True)
    has_train = (root / "train").is_dir()
    train_root = root / "train" if has_train else root
    named = [root / name for name in ("test", "val") if has_train and (root / name).is_dir()]
    folders = [ImageFolder(folder) for folder in (train_root, *named)]
    unreadable = _unreadable_images([path for folder in folders for path, _ in folder.samples])
    if unreadable:
        _report_unreadable(unreadable, sum(len(folder) for folder in folders), bad_images)

    def image_folder(folder: Path, transform) -> ImageFolder:
        def readable(path: str) -> bool:
            return has_file_allowed_extension(path, IMG_EXTENSIONS) and path not in unreadable

        return ImageFolder(folder, transform, is_valid_file=readable)

    train_full, eval_full = image_folder(train_root, train_tf), image_folder(train_root, eval_tf)
    indices = list(range(len(train_full)))
    if named:
        test: Dataset = image_folder(named[0], eval_tf)
        _check_same_classes(train_full.classes, test.classes, train_root, named[0])  # type: ignore[attr-defined]
    else:
        indices, held_out = _split(len(indices), IMAGEFOLDER_TEST_FRACTION)
        test = Subset(eval_full, held_out)
    if len(named) == 2:
        val: Dataset | None = image_folder(named[1], eval_tf)
        _check_same_classes(train_full.classes, val.classes, train_root, named[1])  # type: ignore[union-attr]
    else:
        indices, held_out = _split_subset(indices, val_fraction)
        val = Subset(eval_full, held_out) if held_out else None
    return Splits(Subset(train_full, indices), val, test, list(train_full.classes), preprocessing)


def _check_same_classes(expected: list[str], found: list[str], expected_root: Path, found_root: Path) -> None:
    if expected != found:
        raise ValueError(f"class folders differ: {expected_root} has {expected}, {found_root} has {found}")


def _unreadable_images(paths: list[str]) -> dict[str, str]:
    """``{path: reason}`` for the images that PIL cannot decode, as torchvision's loader decodes them (JPEGs at
    reduced scale: the whole file is still read), on up to 8 threads."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))
                image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for a damaged file
            return f"{type(error).__name__}: {error}"
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = pool.map(problem, paths, chunksize=64)
        return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason is not None}


def _report_unreadable(unreadable: dict[str, str], total: int, bad_images: str, shown: int = 5) -> None:
    """Raise (``"error"``) or warn (``"skip"``) about ``unreadable`` images, naming the first ``shown``."""
    listing = "; ".join(f"{path} ({reason})" for path, reason in list(unreadable.items())[:shown])
    more = f"; and {len(unreadable) - shown} more" if len(unreadable) > shown else ""
    if bad_images == "error":
        raise UnreadableImagesError(
            f"{len(unreadable)} of {total} images cannot be read: {listing}{more}. Replace or remove them, or pass "
            f"--bad-images skip (bad_images='skip') to leave them out"
        )
    warnings.warn(f"skipped {len(unreadable)} unreadable images of {total}: {listing}{more}", stacklevel=3)
