"""``densenet-efficient train``: train or fine-tune a DenseNet on one device or many (torchrun, DDP).

Python API: ``train(TrainConfig(...))`` returns the results that ``results.json`` holds. What a run writes in its
output folder (rank 0 only):

* ``checkpoints/epoch-NNNN.safetensors`` (model) and ``epoch-NNNN.pt`` (optimizer, scheduler, grad scaler,
  history, config and the model file's sha256; read back with ``torch.load(weights_only=True)``), each written to
  a temporary file and renamed, the last ``keep_checkpoints`` kept; ``--resume`` continues from the newest;
* ``best.safetensors``: the weights of the epoch with the best validation top-1, tied to the run: its metadata
  holds the run id and epoch, and the checkpoints record its sha256, which is checked on resume and at the end
  (written after the checkpoint that records it, so the best epoch's checkpoint can always restore it);
* ``config.json`` (beside ``best.safetensors`` and in ``checkpoints/``): the architecture, constructor arguments
  and preprocessing, so that ``eval MODEL --weights best.safetensors`` (or a checkpoint's ``.safetensors``) works;
* ``metrics.csv``: one row per epoch; ``curves.png``: the learning curves;
* ``results.json``: test loss/top-1/top-5 of the best weights; ``export/``: those weights as ``save_pretrained``
  writes them (model.safetensors, config.json, model card) and ``manifest_entry.json``.

A run refuses an ``output`` folder that holds files unless it resumes (``resume``) or ``overwrite`` deletes the
previous run's files first; every checkpoint carries the run's id. Rank 0 holds an advisory lock on the folder
(``.train.lock``, ``fcntl.flock``, released by the OS if the process dies) for the whole run: a second run into
the same folder is refused at once, naming the holder (pid, host, start time). A run's temporary files that a
killed write left behind are removed by the next run into the folder (only those no living process holds).

A resumed run must use the world size and ``sync_bn`` setting the checkpoint records (they change what is
computed: batch-norm statistics over another batch, another data order), else it is refused; another memory
mode (``efficient``) computes the same function and is accepted with a warning (it is not bit-identical).
``timeout`` bounds how long a process waits for the others in a collective (gloo's default is 30 minutes).

A NaN or infinite loss or metric stops the run with :class:`TrainingDivergedError` before anything of that epoch
is saved; nothing non-finite is exported.
Resuming with more ``epochs`` extends the run: the learning-rate milestones are recomputed for the new length.

The random state is reseeded from (seed, epoch, rank) at the start of every epoch and the data order comes from
``DistributedSampler(seed)``, so a resumed run repeats the uninterrupted one exactly on CPU.

``batch_size`` is the global batch of one optimizer step: each of ``world_size`` processes loads
``batch_size / world_size`` images per step and feeds them in ``accum_steps`` micro-batches (every
``accum_steps``-th image), so one process with ``accum_steps=N`` sees the same micro-batches as N processes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import hashlib
import io
import json
import math
import numbers
import os
import re
import socket
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import DenseNet, MemoryMode, check_memory_mode, convert_sync_batchnorm, optim_in_backward
from ..models import create_model
from ..pretrained.files import lock_file, remove_stale_temporaries, write_atomically
from ..pretrained.loading import CONFIG_FILENAME
from ..pretrained.saving import config_json, save_pretrained
from .common import AMP_DTYPES, UsageError, autocast, evaluate, model_name, parse_efficient, to_device
from .data import BAD_IMAGES, DATASETS, Splits, build_splits, weights_preprocessing

RECIPE_DEFAULTS: dict[str, Any] = dict(
    momentum=0.9, nesterov=True, weight_decay=1e-4, milestones=(0.5, 0.75), gamma=0.1, val_fraction=0.1
)
# Per dataset: the paper's CIFAR recipe; a small network for the digits; fine-tuning defaults for photos.
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10": dict(model="densenet_bc_100_k12", epochs=300, batch_size=64, lr=0.1),
    "cifar100": dict(model="densenet_bc_100_k12", epochs=300, batch_size=64, lr=0.1),
    "digits": dict(
        model="densenet_bc_100_k12", model_args={"block_config": (2, 2, 2)}, epochs=10, batch_size=32, lr=0.1
    ),
    "imagefolder": dict(model="densenet121_efficient", epochs=30, batch_size=64, lr=0.01),
}
# What a resumed run must share with the run it continues (``epochs`` may grow: the run is extended).
RECIPE_KEYS = (
    "dataset",
    "model",
    "model_args",
    "weights",
    "pretrained",
    "num_classes",
    "freeze_backbone",
    "epochs",
    "batch_size",
    "accum_steps",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "milestones",
    "gamma",
    "val_fraction",
    "image_size",
    "amp",
    "seed",
)
CHECKPOINT_DIR = "checkpoints"
BEST_FILENAME = "best.safetensors"
# What a run writes into its output folder; ``overwrite`` deletes these (and nothing else) before a new run.
RUN_FILES = (BEST_FILENAME, CONFIG_FILENAME, "metrics.csv", "curves.png", "results.json", "manifest_entry.json")
RUN_FOLDERS = (CHECKPOINT_DIR, "export")
_CHECKPOINT_NAME = re.compile(r"epoch-(\d{4,})\.pt")
LOCK_FILENAME = ".train.lock"  # rank 0's advisory lock on the output folder, held for the run
DEFAULT_TIMEOUT_S = 600.0  # how long a process waits for the others in a collective
# Execution settings recorded in each checkpoint: a resumed run with another world size or sync_bn is refused,
# another memory mode is accepted with a warning.
REFUSED_ON_RESUME = ("world_size", "sync_bn")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, truncated, inconsistent or from another recipe."""


class TrainingDivergedError(RuntimeError):
    """The loss or a metric became NaN or infinite; the run stops before anything of that epoch is saved."""


@dataclass
class TrainConfig:
    """Everything a run needs; ``None`` fields take the dataset's recipe (:data:`RECIPES`)."""

    dataset: str = "digits"
    data: str | None = None
    download: bool = False
    model: str | None = None
    model_args: dict[str, Any] | None = None
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    freeze_backbone: bool = False
    efficient: MemoryMode = True
    epochs: int | None = None
    batch_size: int | None = None
    accum_steps: int = 1
    optimizer_in_backward: bool = False
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    milestones: tuple[float, ...] | None = None
    gamma: float | None = None
    val_fraction: float | None = None
    image_size: int | None = None
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    seed: int = 0
    workers: int | None = None
    device: str | None = None
    output: str = "runs/train"
    resume: bool | str = False
    overwrite: bool = False
    bad_images: str = "error"
    keep_checkpoints: int = 2
    export: bool = True
    progress: bool = True

    def resolved(self) -> ResolvedTrainConfig:
        """A copy with every ``None`` recipe field filled in from the dataset's recipe, checked."""
        if self.dataset not in RECIPES:
            raise UsageError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(RECIPES)}")
        recipe = {
            **RECIPE_DEFAULTS,
            **RECIPES[self.dataset],
            "workers": 0 if self.dataset == "digits" else min(8, os.cpu_count() or 1),
        }
        if self.model is not None:  # the recipe's model arguments belong to the recipe's model
            recipe["model_args"] = {}
        recipe.setdefault("model_args", {})
        filled = {key: value for key, value in recipe.items() if getattr(self, key) is None}
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        config = ResolvedTrainConfig(**{**fields, **filled})
        config.efficient = check_memory_mode(config.efficient)
        config.milestones = tuple(config.milestones)
        config._check_numbers()
        if config.amp is not None and config.amp not in AMP_DTYPES:
            raise UsageError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {config.amp!r}")
        if config.resume and config.overwrite:
            raise UsageError("--resume continues the run in --output and --overwrite deletes it: pass one of them")
        if config.bad_images not in BAD_IMAGES:
            raise UsageError(f"bad_images must be one of {', '.join(BAD_IMAGES)}, got {config.bad_images!r}")
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if config.optimizer_in_backward and (config.accum_steps > 1 or config.amp == "fp16" or processes > 1):
            raise UsageError(
                "--optimizer-in-backward steps each parameter as soon as its gradient is accumulated: not with "
                "--accum-steps above 1 (each micro-batch would step), --amp fp16 (the GradScaler checks every "
                "gradient first) nor several processes (DistributedDataParallel averages the gradients after that)"
            )
        return config

    def recipe(self) -> dict[str, Any]:
        """The fields a resumed run must share, as JSON values."""
        return json.loads(json.dumps({key: getattr(self, key) for key in RECIPE_KEYS}))


@dataclass(kw_only=True)
class ResolvedTrainConfig(TrainConfig):
    """A :class:`TrainConfig` with its recipe filled in and checked (:meth:`TrainConfig.resolved` makes it): the
    recipe fields are set. ``num_classes`` and ``image_size`` may stay ``None``: the dataset's or the weights'."""

    model: str
    model_args: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    milestones: tuple[float, ...]
    gamma: float
    val_fraction: float
    workers: int

    def _check_numbers(self) -> None:
        """Every numeric option in its valid range (finite: ``nan`` and ``inf`` are refused), before anything is
        built, and numpy numbers turned into Python's. Raises :class:`UsageError` naming the option and its valid
        range."""
        integers = {
            "epochs": 1,
            "batch_size": 1,
            "accum_steps": 1,
            "keep_checkpoints": 1,
            "image_size": 1,
            "workers": 0,
            "seed": 0,
            "num_classes": 1,
        }
        for name, least in integers.items():
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least
            ):
                raise UsageError(f"{name} must be a whole number of at least {least}, got {value!r}")
            if value is not None:
                setattr(self, name, int(value))
        ranges: dict[str, tuple[Callable[[float], bool], str]] = {
            "lr": (lambda v: v > 0, "above 0"),
            "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "weight_decay": (lambda v: v >= 0, "of at least 0"),
            "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
        }
        ranges["timeout"] = (lambda v: v > 0, "of seconds above 0")
        for name, (valid, text) in ranges.items():
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and valid(value)):
                raise UsageError(f"{name} must be a finite number {text}, got {value!r}")
            setattr(self, name, float(value))
        if not all(_is_number(m) and 0 < m <= 1 for m in self.milestones):
            raise UsageError(f"milestones are fractions of the epochs in (0, 1], got {self.milestones}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if self.nesterov and self.momentum == 0:
            raise UsageError("Nesterov momentum needs a momentum above 0: pass --no-nesterov, or --momentum above 0")


def _is_number(value: Any) -> bool:
    """A real number (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class DistContext:
    """This process's place in the run: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> None:
        """Sum (or max) ``tensor`` in place over all processes."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextlib.contextmanager
def distributed(device: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): NCCL on CUDA, gloo
    on CPU. One process without those variables runs alone. A collective that waits more than ``timeout``
    seconds for another process (one that hangs or stopped answering) fails instead of blocking."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(
            "nccl" if target.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout)
        )
    try:
        yield DistContext(rank, world_size, target, owns)
    finally:
        if owns:
            # DistributedDataParallel sits in a reference cycle and holds the group: left to the interpreter's
            # exit, its gloo objects are destroyed in a half-finalized interpreter, which can abort the process
            # with SIGABRT. Collected here, the group is destroyed with nothing left using it.
            gc.collect()
            dist.destroy_process_group()


def _reseed(seed: int, epoch: int, rank: int) -> None:
    """Seed torch (CPU and CUDA) from (seed, epoch, rank): each epoch's randomness depends on nothing else."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]))


def build_model(config: ResolvedTrainConfig, num_classes: int, in_chans: int) -> DenseNet:
    """The configured model with ``num_classes`` outputs; pretrained weights loaded (another number of classes
    keeps a fresh classifier); the backbone frozen if asked."""

    torch.manual_seed(config.seed)
    model = create_model(
        config.model,
        pretrained=config.pretrained,
        weights=config.weights,
        **{**config.model_args, "num_classes": num_classes, "in_chans": in_chans, "efficient": config.efficient},
    )
    if config.freeze_backbone:
        model.features.requires_grad_(False)
    return model


def _data(config: ResolvedTrainConfig) -> Splits:
    """The dataset's splits, preprocessed as the pretrained weights were (if any)."""

    preprocessing = None
    if config.weights or config.pretrained:
        preprocessing = weights_preprocessing(config.model, config.weights)
    return build_splits(
        config.dataset,
        config.data,
        download=config.download,
        preprocessing=preprocessing,
        image_size=config.image_size,
        val_fraction=config.val_fraction,
        bad_images=config.bad_images,
    )


def _loaders(config: ResolvedTrainConfig, splits, ctx: DistContext):
    """Train loader (DistributedSampler, per-process batches) and per-process shards of the eval sets."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    per_process, remainder = divmod(config.batch_size, ctx.world_size * config.accum_steps)
    if remainder:
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by world size x accumulation steps "
            f"({ctx.world_size} x {config.accum_steps} = {ctx.world_size * config.accum_steps})"
        )
    if len(splits.train) < config.batch_size:
        raise ValueError(
            f"the training set has {len(splits.train)} images, fewer than one batch of {config.batch_size}"
        )
    options: dict[str, Any] = dict(num_workers=config.workers, pin_memory=ctx.device.type == "cuda")
    sampler: DistributedSampler[int] = DistributedSampler(
        splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    train = DataLoader(
        splits.train, batch_size=per_process * config.accum_steps, sampler=sampler, drop_last=True, **options
    )
    trained = len(train) * config.batch_size
    if trained < len(splits.train) and ctx.is_main:
        print(
            f"each epoch trains on {trained} of the {len(splits.train)} training images, in full batches of "
            f"{config.batch_size}: the other {len(splits.train) - trained}, drawn anew every epoch, are left out "
            "(a batch size that divides the training set uses them all)",
            flush=True,
        )

    def shard(dataset):
        return (
            None
            if dataset is None
            else DataLoader(
                Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)), batch_size=2 * per_process, **options
            )
        )

    return train, sampler, shard(splits.val), shard(splits.test)


class Trainer:
    """One training run: model, optimizer, schedule and data for this process (see the module docstring)."""

    def __init__(self, config: ResolvedTrainConfig, ctx: DistContext):
        self.config, self.ctx = config, ctx
        self.output = Path(config.output)
        download_first = config.download and ctx.world_size > 1  # rank 0 downloads, the others wait for it
        if download_first and not ctx.is_main:
            ctx.barrier()
        self.splits = _data(config)
        if download_first and ctx.is_main:
            ctx.barrier()
        if self.splits.num_classes < 2:
            raise UsageError(
                f"{config.dataset} has {self.splits.num_classes} class ({', '.join(self.splits.classes)}): a "
                "classifier needs at least 2 classes (one sub-folder per class)"
            )
        num_classes = config.num_classes or self.splits.num_classes
        if num_classes != self.splits.num_classes:
            raise ValueError(
                f"num_classes {num_classes} does not match the {self.splits.num_classes} classes of {config.dataset}"
            )
        with warnings.catch_warnings():
            if config.resume:  # the checkpoint replaces these weights: what loading them warns about does not apply
                warnings.simplefilter("ignore")
            self.model = build_model(config, num_classes, self.splits.preprocessing.channels).to(ctx.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            trainable,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, self._milestones(), gamma=config.gamma)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.amp == "fp16")
        # The same SGD step, taken inside backward: the optimizer keeps the state and the learning rate.
        self.in_backward = optim_in_backward(self.model, self.optimizer) if config.optimizer_in_backward else None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.start_epoch = 0
        self.run_id = self._new_run_id()
        if config.resume:
            self._restore(self._resume_path())
        self.train_loader, self.sampler, self.val_loader, self.test_loader = _loaders(config, self.splits, ctx)
        self.network = self._wrap()

    def _milestones(self) -> list[int]:
        """The epochs after which the learning rate is multiplied by ``gamma``."""
        return sorted({max(1, round(m * self.config.epochs)) for m in self.config.milestones})

    def _new_run_id(self) -> str:
        """A fresh id for this run (rank 0's, shared with the other processes)."""
        ids = [uuid.uuid4().hex]
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(ids, 0)
        return ids[0]

    def _write_config(self) -> None:
        """``config.json`` beside ``best.safetensors`` and the checkpoints, as save_pretrained writes it, so that
        ``eval`` and ``create_model(weights=...)`` can read those files directly."""
        config = config_json(self.model, self.config.model, self.splits.preprocessing.metadata())
        data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        for folder in (self.output, self.output / CHECKPOINT_DIR):
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(folder / CONFIG_FILENAME, data)

    def _wrap(self) -> nn.Module:
        """SyncBatchNorm, DistributedDataParallel and torch.compile around the model, as configured."""
        network: nn.Module = self.model
        config = self.config
        if config.sync_bn:  # in place: the DenseNet itself is no batch norm, so self.model is the converted model
            network = convert_sync_batchnorm(network)
        self.ddp = None
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            network = self.ddp = DistributedDataParallel(network, device_ids=device_ids)
        # torch.compile returns an OptimizedModule (an nn.Module) for a module; its annotation says only Callable
        return torch.compile(network) if config.compile else network  # type: ignore[return-value]

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _resume_path(self) -> Path:
        if isinstance(self.config.resume, (str, os.PathLike)):
            return Path(self.config.resume)
        found = checkpoints(self.output)
        if not found:
            raise CheckpointError(f"nothing to resume: no checkpoint in {self.output / CHECKPOINT_DIR}")
        return found[-1]

    def _restore(self, path: Path) -> None:
        """Load model, optimizer, scheduler, grad scaler and history from checkpoint ``path`` (``epoch-N.pt``)."""
        model_state, state = load_checkpoint(path)
        recipe = self.config.recipe()
        differing = {
            key: (value, recipe.get(key))
            for key, value in state["config"].items()
            if key != "epochs" and recipe.get(key) != value
        }
        if differing:
            listing = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in differing.items())
            raise CheckpointError(
                f"{path} was written by another recipe ({listing}); resume with the same settings "
                f"(other ones would no longer give the uninterrupted run's result), or start a new "
                f"run with --overwrite or another --output"
            )
        if state["epoch"] > self.config.epochs:
            raise UsageError(
                f"{path} is at epoch {state['epoch']}: resume it with --epochs {state['epoch']} or "
                f"more, not {self.config.epochs}"
            )
        self._check_execution(path, state.get("execution", {}))
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.best, self.start_epoch = state["history"], state["best"], state["epoch"]
        self.run_id = state.get("run_id", self.run_id)
        planned = state["config"].get("epochs", self.config.epochs)
        if planned != self.config.epochs:
            self._reschedule(planned)
        self._verified_best()

    def _execution(self) -> dict[str, Any]:
        """How this run executes: what a checkpoint records besides the recipe (see :data:`REFUSED_ON_RESUME`)."""
        return {"efficient": self.config.efficient, "world_size": self.ctx.world_size, "sync_bn": self.config.sync_bn}

    def _check_execution(self, path: Path, recorded: dict[str, Any]) -> None:
        """Refuse a resume with another world size, or another ``sync_bn`` with more than one process; warn for
        another memory mode. Checkpoints that record nothing (older ones) are not checked."""
        now = self._execution()
        changed = [key for key in REFUSED_ON_RESUME if key in recorded and recorded[key] != now[key]]
        if "sync_bn" in changed and max(recorded.get("world_size", 1), now["world_size"]) == 1:
            changed.remove("sync_bn")  # one process: synchronised batch norm is plain batch norm
        if changed:
            listing = "; ".join(f"{key}: checkpoint {recorded[key]!r}, now {now[key]!r}" for key in changed)
            raise CheckpointError(
                f"{path} was written by a run with another {' and '.join(changed)} ({listing}): that changes the "
                f"batch-norm statistics and the data order, so the resumed run would not continue this one. Resume "
                f"with the same number of processes and --sync-bn setting, or start a new run from its weights "
                f"(--weights {path.with_suffix('.safetensors')}) in another --output"
            )
        if "efficient" in recorded and recorded["efficient"] != now["efficient"] and self.ctx.is_main:
            warnings.warn(
                f"resuming {path} (efficient={recorded['efficient']!r}) with efficient={now['efficient']!r}: the "
                f"memory modes compute the same function, but not bit-identically, so the run will not repeat the "
                f"uninterrupted one exactly",
                stacklevel=2,
            )

    def _reschedule(self, planned: int) -> None:
        """A run planned for ``planned`` epochs goes on for ``config.epochs``: the milestones of the new length, and
        the learning rate they give after the epochs already trained (which keep the rates they had)."""
        self.scheduler.milestones = Counter(self._milestones())
        passed = sum(count for milestone, count in self.scheduler.milestones.items() if milestone <= self.start_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.config.gamma**passed
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if self.ctx.is_main:
            warnings.warn(
                f"extending the run from {planned} to {self.config.epochs} epochs: from epoch "
                f"{self.start_epoch + 1} on the learning rate follows the schedule of {self.config.epochs} "
                f"epochs (milestones {self._milestones()}, lr now {self.optimizer.param_groups[0]['lr']:g})",
                stacklevel=2,
            )

    def _verified_best(self) -> bytes | None:
        """The bytes of ``best.safetensors``, which must be the file this run's checkpoints recorded (by sha256), else
        the export would be another run's or another epoch's weights; ``None`` where nothing is recorded. The bytes
        hashed are the bytes returned: nothing reads the file again after the check. If it is missing or another
        file (a crash between a checkpoint and the best weights it records, or another run's file) and the best
        epoch's checkpoint is still kept (its model file has the same bytes), it is restored from there with a
        warning; otherwise :class:`CheckpointError` says what is missing and what to do."""
        recorded = self.best.get("sha256")
        if recorded is None:  # rank > 0 of a run not resumed, or checkpoints older than run ids
            return None
        path, epoch = self.output / BEST_FILENAME, self.best["epoch"]
        data = path.read_bytes() if path.is_file() else None
        if data is not None and hashlib.sha256(data).hexdigest() == recorded:
            return data
        found = (
            f"holds {_weights_origin(path)}, not epoch {epoch} of run {self.run_id}" if path.is_file() else "is missing"
        )
        kept = self.output / CHECKPOINT_DIR / f"epoch-{epoch:04d}.safetensors"
        data = kept.read_bytes() if kept.is_file() else None
        if data is not None and hashlib.sha256(data).hexdigest() == recorded:
            if self.ctx.is_main:
                write_atomically(path, data)
                warnings.warn(
                    f"{path} {found}; restored the best weights of this run (epoch {epoch}) from {kept}", stacklevel=2
                )
            return data
        raise CheckpointError(
            f"{path} {found}: it must hold the weights of epoch {epoch}, the best of this run so far, which are "
            f"exported at the end, and {kept} (the same weights) is no longer kept. Restore {path.name} from a backup "
            f"to go on, or start afresh with --overwrite"
        )

    def _save(self, epoch: int) -> None:
        """Rank 0: checkpoint after ``epoch`` (1-based), best weights, the metrics table."""

        self.output.mkdir(parents=True, exist_ok=True)
        if epoch == self.start_epoch + 1:  # with the run's first files: a run that fails before leaves none
            self._write_config()
        model_bytes = _model_bytes(self.model, {"run_id": self.run_id, "epoch": str(epoch)})
        is_best = self.best.get("epoch") == epoch
        if is_best:
            self.best["sha256"] = hashlib.sha256(model_bytes).hexdigest()
        state = dict(
            epoch=epoch,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            history=self.history,
            best=self.best,
            config=self.config.recipe(),
            execution=self._execution(),
            run_id=self.run_id,
        )
        save_checkpoint(self.output, model_bytes, state, self.config.keep_checkpoints)
        if is_best:  # after the checkpoint that records it: until then the previous best stays the recorded one
            write_atomically(self.output / BEST_FILENAME, model_bytes)
        write_atomically(self.output / "metrics.csv", _csv_bytes(self.history))

    # -- training -----------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then test the best weights and export them. Returns the results."""
        for epoch in range(self.start_epoch, self.config.epochs):
            _reseed(self.config.seed, epoch, self.ctx.rank)
            self.sampler.set_epoch(epoch)
            row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **self._train_epoch(epoch)}
            if self.val_loader is not None:
                row.update(_prefixed("val", self._evaluate(self.val_loader)))
                self._check_finite(epoch, "validation loss", row["val_loss"])
            self.scheduler.step()
            self.history.append(row)
            score = row.get("val_top1", row["train_top1"])
            if not self.best or score > self.best["score"]:
                self.best = {"epoch": epoch + 1, "score": score}
            if self.ctx.is_main:
                self._save(epoch + 1)
                print(_epoch_line(row), flush=True)
            self.ctx.barrier()
        return self._finish()

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; loss, top-1, images/s (and CUDA peak memory) over all processes."""
        from tqdm.auto import tqdm

        config, device = self.config, self.ctx.device
        self.network.train()
        if config.freeze_backbone:
            self.model.features.eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
        start = time.perf_counter()
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not (config.progress and self.ctx.is_main),
        )
        for step, (images, labels) in enumerate(bar):
            images, labels = to_device(images, labels, device, config.channels_last)
            totals += self._step(images, labels)
            if step % 10 == 0 or step == len(self.train_loader) - 1:
                loss, correct, count = totals.tolist()
                self._check_finite(epoch, "training loss", loss / count)
                rate = count * self.ctx.world_size / (time.perf_counter() - start)
                bar.set_postfix(_progress_fields(loss / count, 100 * correct / count, rate, device), refresh=False)
        bar.close()
        self.ctx.all_reduce(totals)
        loss, correct, count = totals.tolist()
        self._check_finite(epoch, "training loss", loss / count)
        row = {
            "train_loss": loss / count,
            "train_top1": 100 * correct / count,
            "images_per_s": count / (time.perf_counter() - start),
        }
        if device.type == "cuda":
            peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
            self.ctx.all_reduce(peak, op="max")
            row["peak_memory_mb"] = peak.item() / 2**20
        return row

    def _check_finite(self, epoch: int, what: str, value: float) -> None:
        """Stop the run if ``value`` (a loss) is NaN or infinite: nothing of ``epoch`` is saved or exported."""
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}: the {what} is {value} (lr "
                f"{self.optimizer.param_groups[0]['lr']:g}). The run stopped; nothing of epoch {epoch + 1} was saved "
                f"or exported. Lower --lr (now {self.config.lr:g}), or check the data and --amp"
            )

    def _step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One optimizer step over a per-process batch in ``accum_steps`` strided micro-batches; returns the
        (loss sum, correct, images) of the batch."""
        accum = self.config.accum_steps
        totals = torch.zeros(3, dtype=torch.float64, device=images.device)
        if self.in_backward is None:
            self.optimizer.zero_grad(set_to_none=True)
        for index in range(accum):
            inputs, targets = images[index::accum], labels[index::accum]
            with contextlib.nullcontext() if self.ddp is None or index == accum - 1 else self.ddp.no_sync():
                with autocast(images.device, self.config.amp):
                    logits = self.network(inputs)
                    loss = F.cross_entropy(logits, targets)
                self.scaler.scale(loss / accum).backward()
            totals += torch.stack(
                [
                    loss.detach().double() * len(targets),
                    (logits.argmax(1) == targets).sum().double(),
                    torch.tensor(float(len(targets)), dtype=torch.float64, device=images.device),
                ]
            )
        if self.in_backward is None:  # otherwise backward has taken the step
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return totals

    def _evaluate(self, loader) -> dict[str, float]:
        """Loss, top-1 and top-5 over all processes' shards of ``loader``'s dataset, with rank 0's BatchNorm
        buffers. The unwrapped model runs, so that shards of unequal length need no collective per batch."""
        if self.ctx.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        return evaluate(
            self.model,
            loader,
            self.ctx.device,
            amp=self.config.amp,
            channels_last=self.config.channels_last,
            all_reduce=self.ctx.all_reduce,
        )

    def _finish(self) -> dict[str, Any]:
        """Test the best weights; rank 0 writes results.json, curves.png and the export."""
        from safetensors.torch import load

        best_file = self.output / BEST_FILENAME
        verified = self._verified_best()
        self.ctx.barrier()  # rank 0 has checked (or restored) the file the other processes read
        self.model.load_state_dict(load(verified if verified is not None else best_file.read_bytes()))
        results = {
            "best_epoch": self.best["epoch"],
            "best_score": self.best["score"],
            "test": self._evaluate(self.test_loader),
            "epochs": len(self.history),
        }
        self._check_finite(self.best["epoch"] - 1, "test loss of its weights", results["test"]["loss"])
        if not all(
            torch.isfinite(value).all() for value in self.model.state_dict().values() if value.is_floating_point()
        ):
            raise TrainingDivergedError(f"{best_file} holds NaN or infinite values: nothing was exported")
        if self.ctx.is_main:
            write_atomically(self.output / "curves.png", _curves_png(self.history))
            if self.config.export:
                results["export"] = str(self._export(results))
            write_atomically(
                self.output / "results.json", (json.dumps(results, indent=2, allow_nan=False) + "\n").encode()
            )
            test = results["test"]
            print(
                f"test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}%  (best epoch {results['best_epoch']}); "
                f"written to {self.output}",
                flush=True,
            )
        return results

    def _export(self, results: dict[str, Any]) -> Path:
        """Write the best weights with save_pretrained (and their manifest entry) to ``output/export``."""

        config, test = self.config, results["test"]
        metrics = [
            {
                "dataset": config.dataset,
                "split": "test",
                "top1": round(test["top1"], 3),
                "top5": round(test["top5"], 3),
                "protocol": f"densenet-efficient eval --dataset "
                f"{config.dataset} (input {self.splits.preprocessing.input_size} px)",
            }
        ]
        entry = save_pretrained(
            self.model,
            self.output / "export",
            architecture=config.model,
            dataset=config.dataset,
            label_names=self.splits.classes,
            metrics=metrics,
            source="densenet-efficient train",
            recipe=config.recipe(),
            **self.splits.preprocessing.metadata(),
        )
        write_atomically(
            self.output / "manifest_entry.json", (json.dumps(entry, indent=2, allow_nan=False) + "\n").encode()
        )
        return self.output / "export"


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in metrics.items() if key != "images"}


def _progress_fields(loss: float, top1: float, rate: float, device: torch.device) -> dict[str, str]:
    fields = {"loss": f"{loss:.3f}", "acc": f"{top1:.1f}%", "img/s": _rate(rate)}
    if device.type == "cuda":
        fields["peak"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}MiB"
    return fields


def _rate(images_per_s: float) -> str:
    """Images per second to three significant digits below 100 (a slow CPU step is not "0 img/s")."""
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def _epoch_line(row: dict[str, Any]) -> str:
    """One line per epoch for the console."""
    text = (
        f"epoch {row['epoch']}: lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}%"
    )
    if "val_top1" in row:
        text += f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}%"
    text += f"  {_rate(row['images_per_s'])} img/s"
    if "peak_memory_mb" in row:
        text += f"  peak {row['peak_memory_mb']:.0f} MiB"
    return text


def _model_bytes(model: nn.Module, metadata: dict[str, str]) -> bytes:
    """The model's state dict as safetensors bytes (CPU, contiguous), with ``metadata`` (run id, epoch)."""
    from safetensors.torch import save

    return save(
        {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()},
        metadata={"format": "pt", **metadata},
    )


def _weights_origin(path: Path) -> str:
    """``epoch E of run R`` from a weights file's safetensors metadata, as far as it tells."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
    except Exception:  # unreadable: say so rather than fail while reporting another error
        return "unreadable data"
    if "run_id" not in metadata:
        return "weights of no recorded run"
    return f"epoch {metadata.get('epoch', '?')} of run {metadata['run_id']}"


def _csv_bytes(history: list[dict[str, Any]]) -> bytes:
    """The per-epoch history as CSV (columns: every key any epoch has, in first-seen order)."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue().encode()


def _curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss and top-1 per epoch (train and validation) as a PNG; matplotlib's Agg canvas, no display needed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    epochs = [row["epoch"] for row in history]
    panels = zip(figure.subplots(1, 2), ("loss", "top1"), ("cross-entropy", "top-1 (%)"), strict=True)
    for axes, metric, label in panels:
        for split in ("train", "val"):
            if f"{split}_{metric}" in history[0]:
                axes.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker=".", label=split)
        axes.set(xlabel="epoch", ylabel=label)
        axes.grid(alpha=0.3)
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def checkpoints(output: str | os.PathLike) -> list[Path]:
    """The ``epoch-N.pt`` files of ``output/checkpoints``, oldest first."""
    folder = Path(output) / CHECKPOINT_DIR
    found = [p for p in folder.glob("epoch-*.pt") if _CHECKPOINT_NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.fullmatch(p.name).group(1)))  # type: ignore[union-attr]


def save_checkpoint(output: Path, model_bytes: bytes, state: dict[str, Any], keep: int) -> Path:
    """Write ``epoch-N.safetensors`` (``model_bytes``) then ``epoch-N.pt`` (``state`` plus the model file's sha256),
    each atomically; then delete all but the newest ``keep`` checkpoints. Returns the ``.pt`` path."""
    folder = output / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / f"epoch-{state['epoch']:04d}.pt"
    write_atomically(state_path.with_suffix(".safetensors"), model_bytes)
    buffer = io.BytesIO()
    torch.save({**state, "model_sha256": hashlib.sha256(model_bytes).hexdigest()}, buffer)
    write_atomically(state_path, buffer.getvalue())
    for old in checkpoints(output)[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink()
    return state_path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read checkpoint ``epoch-N.pt`` and its ``epoch-N.safetensors``: (model state dict, training state).

    Raises :class:`CheckpointError` naming the file, and the previous checkpoint if there is one, when either file
    is missing, truncated or corrupt, or when the model file is not the one the state was saved with.
    """
    from safetensors.torch import load

    path = Path(path)
    model_path = path.with_suffix(".safetensors")
    older = [p for p in checkpoints(path.parent.parent) if p.name < path.name]
    hint = f"; the previous checkpoint {older[-1]} can be resumed with --resume {older[-1]}" if older else ""
    if not path.is_file() or not model_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {path.name} and {model_path.name} are both needed{hint}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file; all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}){hint}") from error
    if not isinstance(state, dict) or "model_sha256" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of densenet-efficient{hint}")
    model_bytes = model_path.read_bytes()  # hashed and deserialised: the file is not read again after the check
    if hashlib.sha256(model_bytes).hexdigest() != state["model_sha256"]:
        raise CheckpointError(
            f"{model_path} is truncated, corrupt or from another checkpoint: its sha256 differs "
            f"from the one {path.name} recorded{hint}"
        )
    return load(model_bytes), state


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` in this process (joining torchrun's process group if there is one); returns the results."""
    config = config.resolved()
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0:
            stack.enter_context(output_lock(Path(config.output)))
            prepare_output(config)
        with distributed(config.device, config.timeout) as ctx:
            return Trainer(config, ctx).fit()


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the run's lock on ``output`` (created if needed) for the block: :func:`.files.lock_file` on
    ``output/.train.lock``, which holds this process's pid, host and start time, and is removed at the end. The
    OS drops the lock if the process dies. Raises :class:`UsageError` naming the holder if another run holds it."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder: pass a folder for the run's files")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output {output} cannot be written to: {error.strerror or error}") from error
    path = output / LOCK_FILENAME
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock_file(handle, blocking=False)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "holder unknown"
            os.close(handle)
            raise UsageError(
                f"--output {output} is in use by another train run ({holder}): wait for it to end, or pass another "
                f"--output"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break  # the lock is on the file the path names, not on one a finishing run just removed
        os.close(handle)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(handle, 0)
    os.write(handle, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)


def prepare_output(config: TrainConfig) -> None:
    """Check ``config.output`` before anything is built: a folder (created if needed) that can be written to, and
    that holds no files unless the run resumes or ``overwrite`` is set (which deletes the files a run writes,
    :data:`RUN_FILES` and :data:`RUN_FOLDERS`, and nothing else). Raises :class:`UsageError`."""
    import shutil

    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder: pass a folder for the run's files")
    if not config.resume and output.is_dir() and any(p.name != LOCK_FILENAME for p in output.iterdir()):
        if not config.overwrite:
            raise UsageError(
                f"--output {output} is not empty: pass --resume to continue the run in it, --overwrite "
                f"to delete its run files and start afresh, or another --output folder"
            )
        for name in RUN_FOLDERS:
            folder = output / name
            if folder.is_symlink() or folder.is_file():  # the link itself goes, not what it points to
                folder.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
        for name in RUN_FILES:
            (output / name).unlink(missing_ok=True)
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        raise UsageError(f"--output {output} cannot be written to: {error.strerror or error}") from error
    remove_run_temporaries(output)


def remove_run_temporaries(output: Path) -> list[Path]:
    """Remove what killed writes of a run left in ``output``: ``write_atomically``'s temporary files of the run's
    files (``.metrics.csv.*.tmp``, ``.epoch-0003.pt.*.tmp``, ...), only those no living process holds. Other
    files, however named, stay. Returns what was removed."""
    removed = []
    for name in (*RUN_FILES, CONFIG_FILENAME):
        removed += remove_stale_temporaries(output, prefix=f".{name}.")
    for prefix in (".epoch-", f".{CONFIG_FILENAME}."):
        removed += remove_stale_temporaries(output / CHECKPOINT_DIR, prefix=prefix)
    return removed


def add_arguments(parser: argparse.ArgumentParser) -> None:

    recipe = "; ".join(
        f"{name}: {' '.join([r['model'], *(f'{k}={v}' for k, v in r.get('model_args', {}).items())])}, "
        f"{r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']}"
        for name, r in RECIPES.items()
    )
    parser.epilog = (
        f"Defaults per dataset ({recipe}). All: SGD with Nesterov momentum 0.9, weight decay 1e-4, "
        "lr x0.1 at 50% and 75% of the epochs, 10% of the training images held out for validation."
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits (no download)")
    data.add_argument("--data", help="dataset folder (CIFAR: where cifar-*-batches-py lives; imagefolder: the tree)")
    data.add_argument("--download", action="store_true", help="download CIFAR into --data if it is not there")
    data.add_argument("--val-fraction", type=float, help="training images held out for validation (0: none)")
    data.add_argument("--image-size", type=int, help="input size (default: the dataset's or the weights')")
    data.add_argument("--workers", type=int, help="data-loading processes per GPU/process")
    data.add_argument(
        "--bad-images",
        choices=BAD_IMAGES,
        default="error",
        help="imagefolder: every image is decoded once before training; 'error' (default) names the "
        "unreadable ones and stops, 'skip' leaves them out with a warning and a count",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", type=model_name, help="model name (see `densenet-efficient models`; any CIFAR depth as well)"
    )
    model.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_model_arg,
        help="DenseNet argument override, e.g. block_config=2,2,2 or growth_rate=12 (repeatable)",
    )
    model.add_argument(
        "--weights",
        help="fine-tune from: a weights tag, a .safetensors file, an exported folder or hf-hub:org/name[@revision]",
    )
    model.add_argument("--pretrained", action="store_true", help="fine-tune from the model's default weights")
    model.add_argument("--num-classes", type=int, help="classifier outputs (default: the dataset's classes)")
    model.add_argument("--freeze-backbone", action="store_true", help="train the classifier only")
    model.add_argument(
        "--efficient", type=parse_efficient, default=True, metavar="{False,True,max}", help="memory mode (default True)"
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch-size", type=int, help="global batch per optimizer step, over all processes")
    optim.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches per step")
    optim.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="step each parameter inside backward and free its gradient (less memory, the same weights)",
    )
    optim.add_argument("--lr", type=float)
    optim.add_argument("--momentum", type=float)
    optim.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=None)
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--milestones", type=float, nargs="+", help="lr x gamma at these fractions of the epochs")
    optim.add_argument("--gamma", type=float)
    optim.add_argument("--seed", type=int, default=0)
    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available; torchrun: LOCAL_RANK)")
    run_group.add_argument("--amp", choices=tuple(AMP_DTYPES), help="mixed precision (fp16 adds loss scaling)")
    run_group.add_argument("--channels-last", action="store_true")
    run_group.add_argument("--compile", action="store_true", help="torch.compile the model")
    run_group.add_argument(
        "--sync-bn", action="store_true", help="BatchNorm statistics of all processes (any memory mode)"
    )
    run_group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"torchrun: how long a process waits for the others before the run fails (default {DEFAULT_TIMEOUT_S:g})",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="runs/train", help="output folder (default runs/train)")
    out.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output, or from CHECKPOINT (epoch-N.pt); a "
        "larger --epochs extends the run",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a non-empty --output: delete the previous run's files first",
    )
    out.add_argument("--keep-checkpoints", type=int, default=2)
    out.add_argument("--no-export", dest="export", action="store_false")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _model_arg(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` (VALUE: a Python literal; ``2,2,2`` is a tuple)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. growth_rate=12), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError) as error:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a number, tuple or string literal") from error


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {key: value for key, value in vars(args).items() if key in fields}
    options["model_args"] = dict(args.model_arg) or None
    train(TrainConfig(**options))
    return 0
