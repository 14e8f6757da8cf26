"""What the ``densenet-efficient`` tools share: argument types, progress, a training step, its memory, evaluation."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import MemoryMode
from ..core.registry import cifar_name, resolve_model
from ..models import create_model
from .memory import Footprint, fake_footprint

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_DTYPES: dict[str, torch.dtype] = {key: dtype for key, dtype in PRECISIONS.items() if dtype is not None}
MODES: dict[str, MemoryMode] = {"false": False, "true": True, "max": "max"}
_ITEM = TypeVar("_ITEM")
_FAMILY = re.compile(r"densenet(_bc)?_k(\d+)")


class UsageError(ValueError):
    """The arguments cannot work as given: the CLI prints the message and exits with status 2, as argparse does."""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """Signs of life of a long command on stderr, terminal or not (CI, ``nohup``, ``| tee``): :meth:`note` prints
    the command, what happened, the time so far and, with a ``total`` of steps, the time left at the rate so far.
    On a terminal a tqdm bar of the ``total`` steps runs below the notes."""

    def __init__(self, command: str, total: int = 0, unit: str = "step"):
        self.command, self.total, self.done, self.start = command, total, 0, time.perf_counter()
        self.bar = None
        if total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=command, unit=unit, file=sys.stderr)

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)

    def note(self, message: str) -> None:
        elapsed, left = time.perf_counter() - self.start, self.total - self.done
        expected = f", about {_duration(elapsed * left / self.done)} left" if self.done and left > 0 else ""
        line = f"{self.command}: {message} [{_duration(elapsed)}{expected}]"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def each(self, items: Iterable[_ITEM], what: str, lines: int = 10) -> Iterator[_ITEM]:
        """``items``, one step each, with a note about ``lines`` times over the ``total`` (and at the end)."""
        every = max(1, self.total // lines)
        for item in items:
            yield item
            self.update()
            if self.done % every == 0 or self.done == self.total:
                self.note(f"{what} {self.done}/{self.total}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def model_name(value: str) -> str:
    """argparse type: a name ``create_model`` resolves (registered, an alias, or any CIFAR depth)."""
    try:
        resolve_model(value)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def family_name(value: str) -> str:
    """argparse type: a CIFAR family, ``densenet_bc_k<growth>`` (DenseNet-BC) or ``densenet_k<growth>``."""
    if not _FAMILY.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"invalid family {value!r}: use densenet_bc_k<growth> (e.g. densenet_bc_k12) or densenet_k<growth>"
        )
    return value


def family_member(family: str, depth: int) -> str:
    """Model name of the member of CIFAR ``family`` with ``depth`` (checked by :func:`model_name`)."""
    match = _FAMILY.fullmatch(family)
    assert match, family
    return cifar_name(depth, int(match[2]), bottleneck=bool(match[1]))


def peer_keys(value: str, valid: tuple[str, ...]) -> tuple[str, ...]:
    """argparse type: a comma-separated subset of ``valid`` (for example false, true, max, checkpoint)."""
    keys = tuple(item.strip().lower() for item in value.split(","))
    if unknown := [key for key in keys if key not in valid]:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(valid)}")
    return keys


def device_name(value: str) -> torch.device:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, available on this machine."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    valid = ", ".join(["cpu"] + ["cuda"] * bool(count) + [f"cuda:{i}" for i in range(count)])
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid device {value!r}; valid here: {valid}") from None
    if device.type != "cpu" and not (device.type == "cuda" and (device.index or 0) < count):
        raise argparse.ArgumentTypeError(f"device {value!r} is not available on this machine; valid here: {valid}")
    return device


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer not below ``minimum``."""

    def parse(value: str) -> int:
        if not re.fullmatch(r"\s*[-+]?\d+\s*", value) or int(value) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return int(value)

    return parse


def positive_ints(value: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", value) or 0 in (numbers := [int(item) for item in value.split(",")]):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return numbers


def output_path(value: str) -> str:
    """argparse type: a file to write, in a folder that exists (checked before any work starts)."""
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder) or os.path.isdir(value):
        why = "it is a folder" if os.path.isdir(value) else f"no folder {folder!r}"
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: {why}; give a file path in an existing folder")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments ``bench`` and ``plan`` share."""
    add = parser.add_argument
    add("--model", type=model_name, default="densenet_bc_100_k12", help="`densenet-efficient models`, any CIFAR depth")
    add("--batch-size", type=int_at_least(1), default=64, help="default: %(default)s")
    add("--input-size", type=int_at_least(1), help="the side of an image or volume (default: the model's)")
    add("--dtype", choices=tuple(PRECISIONS), default="fp32", help="fp32, or bf16/fp16 autocast")
    add("--json", metavar="PATH", type=output_path, help="also write the results as JSON")


def input_size(name: str, requested: int | None) -> int:
    """``requested`` or model ``name``'s input side (32 CIFAR, 224 ImageNet, 96 3D); :class:`UsageError` below its
    minimum."""
    with torch.device("meta"):
        model = create_model(name, efficient=False)
    if (size := requested or model.pretrained_cfg["input_size"][-1]) < model.min_input_size:
        raise UsageError(f"--input-size {size} is too small for {name}: it needs at least {model.min_input_size}")
    return size


def input_label(name: str, size: int) -> str:
    """``size`` as the input shape of model ``name``: ``224x224``, ``96x96x96`` or ``4096``."""
    with torch.device("meta"):
        return "x".join([str(size)] * create_model(name, efficient=False).spatial_dims)


def model_io(model: nn.Module) -> tuple[int, int, int]:
    """Input channels, number of classes and spatial dimensions of a DenseNet (ours, torchvision's or MONAI's)."""
    classifier = model.get_submodule("classifier" if hasattr(model, "classifier") else "class_layers.out")
    conv0 = model.get_submodule("features.conv0")
    assert isinstance(conv0, nn.modules.conv._ConvNd), conv0
    classes = classifier.out_features if isinstance(classifier, nn.Linear) else 1
    return conv0.in_channels, classes, conv0.weight.dim() - 2


def random_batch(
    batch_size: int, side: int, chans: int, num_classes: int, spatial_dims: int = 2, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Random inputs (N, chans) + (side,) * spatial_dims and class labels (N,)."""
    images = torch.randn((batch_size, chans) + (side,) * spatial_dims, device=device)
    return images, torch.randint(0, max(num_classes, 1), (batch_size,), device=device)


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    amp_dtype: torch.dtype | None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Forward, cross-entropy, backward and (with ``optimizer``) an optimizer step, under autocast if asked."""
    scaler = scaler or torch.amp.GradScaler(images.device.type, enabled=False)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(images), labels)
    scaler.scale(loss).backward()
    if optimizer is not None:
        scaler.step(optimizer)
        scaler.update()


def predict(build: Callable[[], nn.Module], batch_size: int, input_size: int, dtype: str = "fp32") -> Footprint:
    """Footprint of one training step of ``build()`` on a random batch, measured on fake tensors."""
    return fake_footprint(
        lambda: (model := build(), random_batch(batch_size, input_size, *model_io(model))),
        lambda model, batch: train_step(model, batch[0], batch[1], PRECISIONS[dtype]),
    )


def autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """``torch.autocast`` for ``amp`` (``"bf16"``, ``"fp16"`` or ``None`` for full precision) on ``device``."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp or "bf16"), enabled=amp is not None)


def to_device(images: Tensor, labels: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device`` (images in channels-last layout if asked)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    amp: str | None = None,
    channels_last: bool = False,
    all_reduce: Callable[[Tensor], None] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy ``loss``, ``top1`` and ``top5`` (of at most ``num_classes``) accuracy (%) and ``images``;
    ``all_reduce`` sums the per-process totals in place (distributed evaluation on disjoint shards)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in batches:
        images, labels = to_device(images, labels, device, channels_last)
        with autocast(device, amp):
            logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        loss = F.cross_entropy(logits, labels, reduction="sum").double()
        totals += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)])
    if all_reduce is not None:
        all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    if count == 0:
        raise ValueError("nothing to evaluate: the dataset split is empty")
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "images": int(count)}
