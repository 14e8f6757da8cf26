"""``densenet-efficient train``: train or fine-tune a DenseNet on one device or many (torchrun, DDP); what a run
writes is in docs/training.md. A resumed run repeats the uninterrupted one exactly on CPU: every epoch reseeds from
(seed, epoch, rank) and ``DistributedSampler(seed)`` orders the data. ``batch_size`` is the global batch of a step:
each of ``world_size`` processes feeds ``accum_steps`` strided micro-batches."""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
import numbers
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import MemoryMode, check_memory_mode, convert_sync_batchnorm, optim_in_backward
from ..models import create_model
from ..pretrained.files import MAX_WEIGHTS_BYTES, read_regular_file, remove_stale_temporaries, write_atomically
from ..pretrained.loading import CONFIG_FILENAME
from ..pretrained.saving import config_json, save_pretrained
from .common import AMP_DTYPES, MODES, UsageError, autocast, device_name, evaluate, model_name, to_device
from .data import BAD_IMAGES, DATASETS, build_splits, pretrained_weights

_SGD = dict(momentum=0.9, nesterov=True, weight_decay=1e-4, milestones=(0.5, 0.75), gamma=0.1, val_fraction=0.1)
# Per dataset: the paper's CIFAR recipe; a small network for the digits; fine-tuning defaults for photos.
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10": dict(_SGD, model="densenet_bc_100_k12", epochs=300, batch_size=64, lr=0.1, workers=8),
    "cifar100": dict(_SGD, model="densenet_bc_100_k12", epochs=300, batch_size=64, lr=0.1, workers=8),
    "digits": dict(_SGD, model="densenet_bc_100_k12", epochs=10, batch_size=32, lr=0.1, workers=0)
    | {"model_args": {"block_config": (2, 2, 2)}},  # used with the recipe's model only
    "imagefolder": dict(_SGD, model="densenet121_efficient", epochs=30, batch_size=64, lr=0.01, workers=8),
}
# What a resumed run must share with the run it continues (``epochs`` may grow: the run is extended).
RECIPE_KEYS = (
    "dataset model model_args weights pretrained num_classes freeze_backbone epochs batch_size accum_steps lr "
    "momentum nesterov weight_decay milestones gamma val_fraction image_size amp seed"
).split()
CHECKPOINT_DIR, BEST_FILENAME, LOCK_FILENAME = "checkpoints", "best.safetensors", ".train.lock"
# What a run writes into its output folder; ``overwrite`` deletes these (a linked folder: the link) and nothing else.
RUN_FILES = (BEST_FILENAME, CONFIG_FILENAME, "metrics.csv", "curves.png", "results.json", "manifest_entry.json")
RUN_FOLDERS = (CHECKPOINT_DIR, "export")
# Checked before anything is built: whole numbers (least value) and finite reals (valid range).
_WHOLE = dict(epochs=1, batch_size=1, accum_steps=1, keep_checkpoints=1, image_size=1, workers=0, seed=0, num_classes=1)
_REAL = {
    "lr": (lambda v: v > 0, "above 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "of at least 0"),
    "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "timeout": (lambda v: v > 0, "of seconds above 0"),
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, truncated, inconsistent or from another recipe."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stops before anything of that epoch is saved."""


def _model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE: a Python literal; ``2,2,2`` is a tuple)."""
    key, _, value = text.partition("=")
    with contextlib.suppress(ValueError, SyntaxError):
        if key.isidentifier():
            return key, ast.literal_eval(value)
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, VALUE a literal (growth_rate=12), got {text!r}")


def _arg(default: Any = None, help: str | None = None, **options: Any) -> Any:
    """A :class:`TrainConfig` field and its command-line option (``options``: ``add_argument``'s, and ``flag``)."""
    return dataclasses.field(default=default, metadata={"help": help, **options})


@dataclass
class TrainConfig:
    """Everything a run needs, and its command-line options. The recipe's fields left ``None`` take the dataset's
    :data:`RECIPES` in :meth:`resolved`, and are typed as it sets them."""

    dataset: str = _arg("digits", "default: digits (scikit-learn's, no download)", choices=DATASETS)
    data: str | None = _arg(help="dataset folder (CIFAR: where cifar-*-batches-py lives; imagefolder: the tree)")
    download: bool = _arg(False, "download CIFAR into --data if it is not there")
    model: str = _arg(help="model name (see `densenet-efficient models`; any CIFAR depth too)", type=model_name)
    model_args: dict[str, Any] = _arg(
        help="e.g. block_config=2,2,2 (repeatable)", flag="--model-arg", action="append", type=_model_arg, metavar="K=V"
    )
    weights: str | None = _arg(help="fine-tune from: a tag, a .safetensors file, a folder or hf-hub:org/name[@rev]")
    pretrained: bool = _arg(False, "fine-tune from the model's default weights")
    num_classes: int | None = _arg(help="classifier outputs (default: the dataset's classes)", type=int)
    freeze_backbone: bool = _arg(False, "train the classifier only")
    efficient: MemoryMode = _arg(
        True, "memory mode (default True)", type=lambda v: MODES.get(v.lower(), v), choices=list(MODES.values())
    )
    epochs: int = _arg(type=int)
    batch_size: int = _arg(help="global batch per optimizer step, over all processes", type=int)
    accum_steps: int = _arg(1, "micro-batches per step (gradient accumulation)", type=int)
    optimizer_in_backward: bool = _arg(False, "step each parameter inside backward (less memory, the same weights)")
    lr: float = _arg(type=float)
    momentum: float = _arg(type=float)
    nesterov: bool = _arg(flag="--no-nesterov", action="store_false")
    weight_decay: float = _arg(type=float)
    milestones: tuple[float, ...] = _arg(help="lr x gamma at these fractions of the epochs", type=float, nargs="+")
    gamma: float = _arg(type=float)
    val_fraction: float = _arg(help="training images held out for validation (0: none)", type=float)
    image_size: int | None = _arg(help="input size (default: the dataset's or the weights')", type=int)
    amp: str | None = _arg(help="mixed precision (fp16 adds loss scaling)", choices=tuple(AMP_DTYPES))
    channels_last: bool = _arg(False)
    compile: bool = _arg(False, "torch.compile the model")
    sync_bn: bool = _arg(False, "BatchNorm statistics of all processes (any memory mode)")
    timeout: float = _arg(600.0, "torchrun: seconds to wait for the others (gloo's default: 30 min)", type=float)
    seed: int = _arg(0, type=int)
    workers: int = _arg(help="data-loading processes per process", type=int)
    device: str | torch.device | None = _arg(help="cuda, cuda:N or cpu (default: cuda if available)", type=device_name)
    output: str = _arg("runs/train", "output folder (default runs/train)")
    resume: bool | str = _arg(
        False, "from the newest checkpoint, or this epoch-N.pt", nargs="?", const=True, metavar="PT"
    )
    overwrite: bool = _arg(False, "start afresh in a non-empty --output: delete the run's files")
    bad_images: str = _arg("error", "imagefolder: unreadable images stop the run, or are skipped", choices=BAD_IMAGES)
    keep_checkpoints: int = _arg(2, "newest checkpoints kept (and the best epoch's)", type=int)
    export: bool = _arg(True, flag="--no-export", action="store_false")
    progress: bool = _arg(True, "no progress bars", flag="--no-progress", action="store_false")

    def resolved(self) -> TrainConfig:
        """A copy with the recipe filled in, every option checked (:class:`UsageError` naming it and what is valid)
        and numpy numbers turned into Python's."""
        for name, choices in (("dataset", tuple(RECIPES)), ("amp", (None, *AMP_DTYPES)), ("bad_images", BAD_IMAGES)):
            if getattr(self, name) not in choices:
                raise UsageError(f"{name} must be one of {', '.join(map(str, choices))}, got {getattr(self, name)!r}")
        recipe = dict(RECIPES[self.dataset], workers=min(RECIPES[self.dataset]["workers"], os.cpu_count() or 1))
        recipe["model_args"] = recipe.get("model_args", {}) if self.model is None else {}
        config = TrainConfig(**{**vars(self), **{k: v for k, v in recipe.items() if getattr(self, k) is None}})
        config.efficient = check_memory_mode(config.efficient)
        for name, least in _WHOLE.items():
            if (value := getattr(config, name)) is not None:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                    raise UsageError(f"{name} must be a whole number of at least {least}, got {value!r}")
                setattr(config, name, int(value))
        for name, (valid, text) in _REAL.items():
            if not (_is_real(value := getattr(config, name)) and math.isfinite(value) and valid(value)):
                raise UsageError(f"{name} must be a finite number {text}, got {value!r}")
            setattr(config, name, float(value))
        if not all(_is_real(m) and 0 < m <= 1 for m in config.milestones):
            raise UsageError(f"milestones are fractions of the epochs in (0, 1], got {tuple(config.milestones)}")
        config.milestones = tuple(float(m) for m in config.milestones)
        if config.nesterov and config.momentum == 0:
            raise UsageError("Nesterov momentum needs a momentum above 0: pass --no-nesterov, or --momentum above 0")
        if config.resume and config.overwrite:
            raise UsageError("--resume continues the run in --output and --overwrite deletes it: pass one of them")
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if config.optimizer_in_backward and (config.accum_steps > 1 or config.amp == "fp16" or processes > 1):
            raise UsageError(
                "--optimizer-in-backward steps each parameter once its gradient is accumulated: not with --accum-steps "
                "above 1, --amp fp16 (GradScaler) nor several processes (DDP averages the gradients after that)"
            )
        return config

    def recipe(self) -> dict[str, Any]:
        """The fields a resumed run must share, as JSON values."""
        return json.loads(json.dumps({key: getattr(self, key) for key in RECIPE_KEYS}))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class DistContext:
    """This process's place in the run (rank 0 writes the files); the collectives do nothing when it runs alone."""

    rank: int
    world_size: int
    device: torch.device

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextlib.contextmanager
def distributed(device: str | torch.device | None, timeout: float = 600.0) -> Iterator[DistContext]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): NCCL on CUDA, gloo on
    CPU; a collective waiting more than ``timeout`` seconds fails. Without those variables the process runs alone.
    On CUDA, ``device`` without an index is ``LOCAL_RANK``'s GPU."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda":
        if target.index is None:
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    try:
        yield DistContext(rank, world_size, target)
    finally:
        if owns:
            gc.collect()  # DDP sits in a reference cycle: left to the interpreter's exit, gloo can abort (SIGABRT)
            dist.destroy_process_group()


class Trainer:
    """One training run: model, optimizer, schedule and data for this process (see the module docstring)."""

    def __init__(self, config: TrainConfig, ctx: DistContext):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        self.config, self.ctx, self.output = config, ctx, Path(config.output)
        weights, preprocessing = (
            pretrained_weights(config.model, config.weights) if config.weights or config.pretrained else (None, None)
        )  # read once: preprocessing and weights
        if config.download and ctx.rank != 0:  # rank 0 downloads, the others wait for it
            ctx.barrier()
        options = {key: getattr(config, key) for key in ("download", "image_size", "val_fraction", "bad_images")}
        self.splits = build_splits(config.dataset, config.data, preprocessing=preprocessing, **options)
        if config.download and ctx.rank == 0:
            ctx.barrier()
        classes = len(self.splits.classes)
        if classes < 2:
            raise UsageError(f"{config.dataset} has {classes} class: a classifier needs at least 2 (a folder each)")
        if config.num_classes not in (None, classes):
            raise UsageError(f"num_classes {config.num_classes} does not match the {classes} classes of the data")
        torch.manual_seed(config.seed)
        args = {**(weights.model_args if weights else {}), **config.model_args, "efficient": config.efficient}
        args.update(num_classes=classes, in_chans=self.splits.preprocessing.channels)
        self.model = create_model(config.model, **args).to(ctx.device)
        if weights is not None:  # another number of classes keeps a fresh classifier, with a warning
            with warnings.catch_warnings():
                if config.resume:  # the checkpoint replaces these weights: what loading them warns about is moot
                    warnings.simplefilter("ignore")
                weights.load_into(self.model)
        if config.freeze_backbone:
            self.model.features.requires_grad_(False)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        momentum, nesterov, weight_decay = config.momentum, config.nesterov, config.weight_decay
        self.optimizer = torch.optim.SGD(trainable, config.lr, momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, self._milestones(), config.gamma)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.amp == "fp16")
        # The same SGD step taken inside backward: the optimizer keeps the state and the learning rate.
        self.in_backward = optim_in_backward(self.model, self.optimizer) if config.optimizer_in_backward else None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.start_epoch = 0
        if config.resume:
            self._restore()
        # The train loader (DistributedSampler, per-process batches), its sampler and per-process shards of val/test.
        per_process, remainder = divmod(config.batch_size, parts := ctx.world_size * config.accum_steps)
        if remainder:
            what = f"world size x accumulation steps ({ctx.world_size} x {config.accum_steps} = {parts})"
            raise ValueError(f"batch_size {config.batch_size} must be divisible by {what}")
        if (images := len(cast(Sized, self.splits.train))) < config.batch_size:
            raise ValueError(f"the training set has {images} images, fewer than one batch of {config.batch_size}")
        loading: dict[str, Any] = dict(num_workers=config.workers, pin_memory=ctx.device.type == "cuda")
        self.sampler: DistributedSampler[int] = DistributedSampler(
            self.splits.train, num_replicas=ctx.world_size, rank=ctx.rank, seed=config.seed, drop_last=True
        )
        self.train_loader = DataLoader(
            self.splits.train, per_process * config.accum_steps, sampler=self.sampler, drop_last=True, **loading
        )
        if (trained := len(self.train_loader) * config.batch_size) < images and ctx.rank == 0:
            left = f"the other {images - trained}, drawn anew every epoch, are left out: a batch size dividing {images}"
            print(f"each epoch trains on {trained} of the {images} training images in full batches; {left} uses all")

        def shard(data: Any) -> DataLoader:  # this process's part of val or test
            return DataLoader(Subset(data, range(ctx.rank, len(data), ctx.world_size)), 2 * per_process, **loading)

        self.val_loader, self.test_loader = (
            None if d is None else shard(d) for d in (self.splits.val, self.splits.test)
        )
        network: nn.Module = convert_sync_batchnorm(self.model) if config.sync_bn else self.model  # in place
        self.ddp = None
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            network = self.ddp = nn.parallel.DistributedDataParallel(network, device_ids=device_ids)
        self.network: nn.Module = torch.compile(network) if config.compile else network  # type: ignore[assignment]

    def _milestones(self) -> list[int]:
        """The epochs after which the learning rate is multiplied by ``gamma``."""
        return sorted({max(1, round(m * self.config.epochs)) for m in self.config.milestones})

    def _recipe(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: the recipe, the world size and ``sync_bn`` (with
        several processes: it changes the batch-norm statistics; alone, it is plain batch norm)."""
        world_size = self.ctx.world_size
        return {**self.config.recipe(), "world_size": world_size, "sync_bn": self.config.sync_bn and world_size > 1}

    def _restore(self) -> None:
        """Continue from the newest checkpoint (or ``config.resume``): refuse another :meth:`_recipe` (``epochs`` may
        grow: the run is extended with the new length's schedule); warn for another memory mode."""
        found = checkpoints(self.output)
        if self.config.resume is True and not found:
            raise CheckpointError(f"nothing to resume: no checkpoint in {self.output / CHECKPOINT_DIR}")
        path = found[-1] if self.config.resume is True else Path(str(self.config.resume))
        model_state, state = load_checkpoint(path)
        recipe, config = self._recipe(), state["config"]
        differing = [f"{k}: checkpoint {v!r}, now {recipe[k]!r}" for k, v in config.items() if v != recipe[k]]
        if differing := [text for text in differing if not text.startswith("epochs:")]:
            raise CheckpointError(
                f"{path} was written by another recipe ({'; '.join(differing)}): resume it as it ran, or start a new "
                f"run from its weights (--weights {path.with_suffix('.safetensors')}) in another --output"
            )
        if state["epoch"] > self.config.epochs:
            raise UsageError(f"{path} is at epoch {state['epoch']}: resume it with --epochs {state['epoch']} or more")
        if state["efficient"] != self.config.efficient and self.ctx.rank == 0:
            modes = f"(efficient={state['efficient']!r}) with efficient={self.config.efficient!r}"
            warnings.warn(f"resuming {path} {modes}: the same function, but not bit-identically", stacklevel=2)
        self.model.load_state_dict(model_state)
        for key in ("optimizer", "scheduler", "scaler"):
            getattr(self, key).load_state_dict(state[key])
        self.history, self.best, self.start_epoch = state["history"], state["best"], state["epoch"]
        if config["epochs"] != self.config.epochs:  # extended: the new length's milestones from the next epoch on
            milestones = self._milestones()
            self.scheduler.milestones = Counter(milestones)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * self.config.gamma ** sum(m <= self.start_epoch for m in milestones)
            if self.ctx.rank == 0:
                warnings.warn(
                    f"extending the run from {config['epochs']} to {self.config.epochs} epochs: from epoch "
                    f"{self.start_epoch + 1} on the learning rate follows the schedule of {self.config.epochs} epochs "
                    f"(milestones {milestones}, lr now {self.optimizer.param_groups[0]['lr']:g})",
                    stacklevel=2,
                )

    def _model_bytes(self) -> bytes:
        """The weights as safetensors bytes: one metadata key, so the same weights give the same bytes."""
        from safetensors.torch import save

        state_dict = {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}
        return save(state_dict, metadata={"format": "pt"})

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then test the best weights and export them. Returns the results."""
        for epoch in range(self.start_epoch, self.config.epochs):
            seed = np.random.SeedSequence([self.config.seed, epoch, self.ctx.rank]).generate_state(1, np.uint64)[0]
            torch.manual_seed(int(seed))
            self.sampler.set_epoch(epoch)
            row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **self._train_epoch(epoch)}
            if self.val_loader is not None:
                metrics = self._evaluate(self.val_loader)
                row.update({f"val_{key}": value for key, value in metrics.items() if key != "images"})
                self._check_finite(epoch, "validation loss", row["val_loss"])
            self.scheduler.step()
            self.history.append(row)
            score = row.get("val_top1", row["train_top1"])
            if not self.best or score > self.best["score"]:
                self.best = {"epoch": epoch + 1, "score": score}
            if self.ctx.rank == 0:  # the checkpoint, then the best weights and the metrics
                if epoch == self.start_epoch:  # with the run's first files: a run that fails before leaves none
                    cfg = config_json(self.model, self.config.model, self.splits.preprocessing.to_dict())
                    for folder in (self.output, self.output / CHECKPOINT_DIR):
                        folder.mkdir(parents=True, exist_ok=True)
                        write_atomically(folder / CONFIG_FILENAME, _json_bytes(cfg))
                model_bytes = self._model_bytes()
                state = {key: getattr(self, key).state_dict() for key in ("optimizer", "scheduler", "scaler")}
                state.update(epoch=epoch + 1, history=self.history, best=self.best, efficient=self.config.efficient)
                state["config"] = self._recipe()
                save_checkpoint(self.output, model_bytes, state, self.config.keep_checkpoints)
                if self.best["epoch"] == epoch + 1:
                    write_atomically(self.output / BEST_FILENAME, model_bytes)
                text = io.StringIO()
                writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for r in self.history for key in r)))
                writer.writeheader()
                writer.writerows(self.history)
                write_atomically(self.output / "metrics.csv", text.getvalue().encode())
                print(_epoch_line(row), flush=True)
            self.ctx.barrier()
        # Test the best epoch's weights, read from its checkpoint (kept for this: the run's own best whatever
        # best.safetensors holds); rank 0 writes them as best.safetensors, the export and results.json.
        epoch = self.best["epoch"]
        self.model.load_state_dict(load_checkpoint(self.output / CHECKPOINT_DIR / f"epoch-{epoch:04d}.pt")[0])
        test = self._evaluate(self.test_loader)
        self._check_finite(epoch - 1, "test loss of its weights", test["loss"])
        results = {"best_epoch": epoch, "best_score": self.best["score"], "test": test, "epochs": len(self.history)}
        if self.ctx.rank == 0:
            write_atomically(self.output / BEST_FILENAME, self._model_bytes())
            write_atomically(self.output / "curves.png", _curves_png(self.history))
            if self.config.export:  # the best weights as save_pretrained writes them, and their manifest entry
                config, preprocessing = self.config, self.splits.preprocessing
                side = preprocessing.input_size[-1]
                protocol = f"densenet-efficient eval --dataset {config.dataset} (input {side} px)"
                top = {key: round(test[key], 3) for key in ("top1", "top5")}
                metric = dict(dataset=config.dataset, split="test", **top, protocol=protocol)
                metadata: dict[str, Any] = dict(
                    dataset=config.dataset, label_names=self.splits.classes, metrics=[metric]
                )
                metadata.update(source="densenet-efficient train", recipe=config.recipe(), **preprocessing.to_dict())
                entry = save_pretrained(self.model, self.output / "export", architecture=config.model, **metadata)
                write_atomically(self.output / "manifest_entry.json", _json_bytes(entry))
                results["export"] = str(self.output / "export")
            write_atomically(self.output / "results.json", _json_bytes(results))
            print(f"test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}% (best epoch {epoch}): {self.output}")
        return results

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set: loss, top-1, images/s (and CUDA peak memory) over all processes."""
        from tqdm.auto import tqdm

        config, device = self.config, self.ctx.device
        self.network.train()
        if config.freeze_backbone:
            self.model.features.eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
        start = time.perf_counter()
        show = config.progress and self.ctx.rank == 0
        bar = tqdm(self.train_loader, f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False, disable=not show)
        for step, (images, labels) in enumerate(bar):
            totals += self._step(*to_device(images, labels, device, config.channels_last))
            if step % 10 == 0 or step == len(self.train_loader) - 1:
                loss, correct, count = totals.tolist()
                self._check_finite(epoch, "training loss", loss / count)
                bar.set_postfix(loss=f"{loss / count:.3f}", top1=f"{100 * correct / count:.1f}%", refresh=False)
        bar.close()
        self.ctx.all_reduce(totals)
        loss, correct, count = totals.tolist()
        self._check_finite(epoch, "training loss", loss / count)
        row = {"train_loss": loss / count, "train_top1": 100 * correct / count}
        row["images_per_s"] = count / (time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
            self.ctx.all_reduce(peak, op=dist.ReduceOp.MAX)
            row["peak_memory_mb"] = peak.item() / 2**20
        return row

    def _check_finite(self, epoch: int, what: str, value: float) -> None:
        """Stop the run if ``value`` (a loss) is NaN or infinite: nothing of ``epoch`` is saved or exported."""
        if not math.isfinite(value):
            lr = self.optimizer.param_groups[0]["lr"]
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}: the {what} is {value} (lr {lr:g}); nothing of it was saved. "
                "Lower --lr, or check the data and --amp"
            )

    def _step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One optimizer step over a per-process batch in ``accum_steps`` strided micro-batches; returns its
        (loss sum, correct, images)."""
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
            correct = (logits.argmax(1) == targets).sum()
            totals += torch.stack([loss.detach() * len(targets), correct, totals.new_tensor(len(targets))]).double()
        if self.in_backward is None:  # otherwise backward has taken the step
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return totals

    def _evaluate(self, loader) -> dict[str, float]:
        """Loss, top-1 and top-5 over all processes' shards, with rank 0's BatchNorm buffers (the unwrapped model
        runs: shards of unequal length need no collective per batch)."""
        if self.ctx.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        options: dict[str, Any] = dict(amp=self.config.amp, channels_last=self.config.channels_last)
        return evaluate(self.model, loader, self.ctx.device, all_reduce=self.ctx.all_reduce, **options)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, allow_nan=False) + "\n").encode()


def _epoch_line(row: dict[str, Any]) -> str:
    """``epoch 3  lr 0.1  train_loss 0.4211  ...``: four significant digits (a slow step is not "0 img/s")."""
    return "  ".join(f"{key} {value:.4g}" for key, value in row.items())


def _curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss and top-1 per epoch (train and validation) as a PNG, on matplotlib's Agg canvas (no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "top1"), strict=True):
        for key in (f"train_{metric}", f"val_{metric}"):
            if key in history[0]:
                axes.plot([row["epoch"] for row in history], [row[key] for row in history], marker=".", label=key)
        axes.set(xlabel="epoch", ylabel=metric)
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def checkpoints(output: str | os.PathLike) -> list[Path]:
    """The ``epoch-N.pt`` files of ``output/checkpoints``, oldest first."""
    found = [p for p in (Path(output) / CHECKPOINT_DIR).glob("epoch-*.pt") if p.stem[6:].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[6:]))


def save_checkpoint(output: Path, model_bytes: bytes, state: dict[str, Any], keep: int) -> None:
    """Write ``epoch-N.safetensors`` (``model_bytes``) then ``epoch-N.pt`` (``state`` and the model file's
    sha256); then delete all but the newest ``keep`` checkpoints and the best epoch's."""
    folder = output / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{state['epoch']:04d}.pt"
    write_atomically(path.with_suffix(".safetensors"), model_bytes)
    buffer = io.BytesIO()
    torch.save({**state, "model_sha256": hashlib.sha256(model_bytes).hexdigest()}, buffer)
    write_atomically(path, buffer.getvalue())
    best = folder / f"epoch-{state.get('best', {}).get('epoch', 0):04d}.pt"
    for old in [path for path in checkpoints(output)[:-keep] if path != best]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Checkpoint ``epoch-N.pt`` and its ``epoch-N.safetensors``: (model state dict, training state). Each file is
    read once, so the model bytes hashed are the bytes loaded. :class:`CheckpointError` (naming the previous
    checkpoint, if any) when a file is missing, odd, truncated or corrupt, or the model file is not the one recorded."""
    from safetensors.torch import load

    path = Path(path)
    model_path = path.with_suffix(".safetensors")
    older = [p for p in checkpoints(path.parent.parent) if p.name < path.name]
    hint = f"; the previous checkpoint {older[-1]} can be resumed with --resume {older[-1]}" if older else ""
    try:
        data, model_bytes = (read_regular_file(p, MAX_WEIGHTS_BYTES, CheckpointError) for p in (path, model_path))
    except FileNotFoundError as error:
        needed = f"{path.name} and {model_path.name} are needed{hint}"
        raise CheckpointError(f"checkpoint {path} is incomplete: {needed}") from error
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file; all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}){hint}") from error
    if not isinstance(state, dict) or "model_sha256" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of densenet-efficient{hint}")
    if hashlib.sha256(model_bytes).hexdigest() != state["model_sha256"]:
        raise CheckpointError(f"{model_path} is corrupt or another file: its sha256 differs from the recorded{hint}")
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
    """Hold ``filelock`` on ``output/.train.lock`` (``output`` created, and checked writable) for the block; the file
    names the holder (pid, host, start time) in the :class:`UsageError` another run gets."""
    from filelock import FileLock, Timeout

    def name_the_holder(handle: int) -> None:
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder: pass a folder for the run's files")
    try:
        output.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output).close()
        held = FileLock(output / LOCK_FILENAME, blocking=False, on_acquired=name_the_holder).acquire()
    except Timeout:
        holder = (output / LOCK_FILENAME).read_text(errors="replace").strip() or "holder unknown"
        raise UsageError(
            f"--output {output} is in use by another train run ({holder}): wait for it to end, or pass another --output"
        ) from None
    except OSError as error:
        raise UsageError(f"--output {output} cannot be written to: {error.strerror or error}") from error
    with held:
        yield


def prepare_output(config: TrainConfig) -> None:
    """Before anything is built, in the folder :func:`output_lock` holds: refuse files unless the run resumes or
    ``overwrite`` deletes the run's own (:data:`RUN_FILES`, :data:`RUN_FOLDERS`); remove what killed writes left."""
    output = Path(config.output)
    if not config.resume and any(p.name != LOCK_FILENAME for p in output.iterdir()):
        if not config.overwrite:
            raise UsageError(
                f"--output {output} is not empty: pass --resume to continue the run in it, --overwrite to delete "
                "its run files and start afresh, or another --output folder"
            )
        for path in [output / name for name in (*RUN_FOLDERS, *RUN_FILES)]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:  # a file, or a link (the link goes, not what it points to)
                path.unlink(missing_ok=True)
    for name in RUN_FILES:
        remove_stale_temporaries(output, prefix=f".{name}.")
    for prefix in (".epoch-", f".{CONFIG_FILENAME}."):
        remove_stale_temporaries(output / CHECKPOINT_DIR, prefix=prefix)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipes = "; ".join(f"{k}: {r['model']} {r.get('model_args', '')} {r['epochs']} epochs" for k, r in RECIPES.items())
    parser.epilog = f"Defaults per dataset ({recipes}); see RECIPES in densenet_efficient/tools/train.py."
    for field in dataclasses.fields(TrainConfig):
        options = dict(field.metadata)
        flag = options.pop("flag", "--" + field.name.replace("_", "-"))
        if field.default is False and "nargs" not in options:
            options["action"] = "store_true"
        parser.add_argument(flag, dest=field.name, default=field.default, **options)


def run(args: argparse.Namespace) -> int:
    options = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    train(TrainConfig(**{**options, "model_args": dict(args.model_args or {}) or None}))
    return 0
