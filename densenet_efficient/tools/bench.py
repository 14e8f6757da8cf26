"""``densenet-efficient bench``: peak memory and training-step time of every memory mode, side by side.

One run trains the same model in each memory mode (``efficient=False``, ``True``, ``"max"``) and, as a peer, the
checkpointed DenseNet people use today: torchvision's ``memory_efficient=True`` for ImageNet architectures, and
for the others a ``torch.utils.checkpoint`` baseline built the way gpleiss/efficient_densenet_pytorch builds it.
Memory is measured in a pass of its own, then the peers' timed steps are interleaved, the order reversed every
round, so that no peer gets a quieter or warmer machine than another.

``--features-only`` measures the networks as multi-scale backbones (``create_model(..., features_only=True)``,
for torchvision ``IntermediateLayerGetter`` on the same levels), each followed by :class:`MultiScaleProbe`, a
head that pools and classifies every level so that each gets a gradient.

On CPU, memory is given twice: live tensor storage as a dispatch mode sees it (deterministic, what ``plan``
models), and the CPU allocator's peak from the profiler's memory events, which adds kernels' temporaries and is
the only figure for compiled models. ``--compile`` adds each memory mode compiled, ``--compile-budget`` the plain
model compiled under ``torch._functorch.config.activation_memory_budget`` (the compiler's own rematerialisation),
as peers; ``--plot`` then draws memory against time, the Pareto front joined.

``--sweep depth`` and ``--sweep batch`` repeat this over depths of a CIFAR family or over batch sizes and plot
memory against them. A peer whose predicted memory (:func:`densenet_efficient.tools.common.predict`) exceeds what the
device has free is skipped, and its prediction is shown instead.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import convert_sync_batchnorm, optim_in_backward
from ..core.model import DenseBlock, DenseLayer, DenseNet, DenseNetFeatures
from ..models import create_model
from .common import (
    MODES,
    PRECISIONS,
    Progress,
    add_common_arguments,
    device_name,
    family_member,
    family_name,
    input_label,
    input_size,
    int_at_least,
    model_io,
    model_name,
    output_path,
    peer_keys,
    positive_ints,
    predict,
    random_batch,
    total_bytes,
    train_step,
)
from .memory import allocator_peak, operator_count, peak_memory

BASELINE = "checkpoint"
PEER_KEYS = (*MODES, BASELINE)
MIB = 2**20
SPREAD_LIMIT = 0.1  # (max - min) / median of a peer's step times above which its time is not comparable
BUSY_LOAD = 0.5  # load average of other work (runnable threads) above which the machine counts as busy


# ----------------------------------------------------------------------------------------------- models


class _CheckpointedLayer(nn.Module):
    """A dense layer run as gpleiss/efficient_densenet_pytorch runs it: ``torch.utils.checkpoint`` around
    concatenation, norm1, ReLU and conv1."""

    def __init__(self, layer: DenseLayer):
        super().__init__()
        self.layer = layer

    def _bottleneck(self, *features: Tensor) -> Tensor:
        layer = self.layer
        return layer.conv1(F.relu(layer.norm1(torch.cat(features, 1))))

    def forward(self, features: list[Tensor]) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        layer = self.layer
        out = checkpoint(self._bottleneck, *features, use_reentrant=False)
        if hasattr(layer, "conv2"):
            out = layer.conv2(F.relu(layer.norm2(out)))
        if layer.drop_rate > 0:
            out = F.dropout(out, p=layer.drop_rate, training=layer.training)
        return out


def checkpointed_densenet(name: str) -> DenseNet:
    """The naive model with every dense layer checkpointed as in gpleiss/efficient_densenet_pytorch."""
    model = create_model(name, efficient=False)
    for block in [module for module in model.modules() if isinstance(module, DenseBlock)]:
        for layer_name, layer in list(block.items()):
            assert isinstance(layer, DenseLayer)
            block[layer_name] = _CheckpointedLayer(layer)
    return model


def torchvision_densenet(config: dict[str, Any]) -> nn.Module:
    """torchvision's DenseNet with ``memory_efficient=True`` and the architecture of ``config``."""
    from torchvision.models import DenseNet as TorchvisionDenseNet

    keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "drop_rate", "num_classes")
    return TorchvisionDenseNet(**{key: config[key] for key in keys}, memory_efficient=True)


class MultiScaleProbe(nn.Module):
    """A backbone's feature maps, each global-average-pooled, concatenated and classified: a stand-in for a
    detection or segmentation head that sends a gradient to every level.

    ``backbone`` returns a list (or dict) of (N, C_i, H_i, W_i) maps with ``channels`` C_i; ``stem`` is the module
    whose ``conv0`` reads the images. Output (N, num_classes).
    """

    def __init__(self, backbone: nn.Module, stem: nn.Module, channels: list[int], num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(sum(channels), num_classes)
        self._stem = [stem]  # not a submodule: it is part of the backbone

    @property
    def features(self) -> nn.Module:
        return self._stem[0]

    def forward(self, x: Tensor) -> Tensor:
        maps = self.backbone(x)
        maps = list(maps.values()) if isinstance(maps, dict) else maps
        return self.classifier(torch.cat([level.flatten(2).mean(2) for level in maps], 1))


def features_only_peer(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``'s network as a backbone of every ``feature_info`` level with a :class:`MultiScaleProbe` head;
    torchvision's DenseNet through ``IntermediateLayerGetter`` on the same levels (``norm5`` for the final one)."""
    model: Any = build()
    if isinstance(model, DenseNet):
        num_classes = model.num_classes or 10
        backbone = DenseNetFeatures(model)
        return MultiScaleProbe(backbone, backbone.features, backbone.feature_info.channels(), num_classes)
    from torchvision.models._utils import IntermediateLayerGetter

    with torch.device("meta"):
        reference = DenseNet(
            block_config=tuple(
                len(block) for name, block in model.features.named_children() if name.startswith("denseblock")
            ),
            growth_rate=model.features.denseblock1.denselayer1.conv2.out_channels,
            num_init_features=model.features.conv0.out_channels,
            num_classes=0,
        )
    layers = [name.split(".", 1)[1].replace("relu5", "norm5") for name in reference.feature_info.module_name()]
    getter = IntermediateLayerGetter(model.features, {name: name for name in layers})
    return MultiScaleProbe(getter, getter, reference.feature_info.channels(), model.classifier.out_features)


def monai_densenet(config: dict[str, Any]) -> nn.Module:
    """MONAI's ``DenseNet`` (plain autograd, the usual 3D DenseNet) with the architecture of ``config``."""
    from monai.networks.nets import DenseNet as MonaiDenseNet

    if config["stem"] != "imagenet" or config["compression"] != 0.5 or not config["bn_size"]:
        raise ValueError(
            "MONAI's DenseNet has an ImageNet stem, bottleneck layers and compression 0.5: "
            "this model cannot be compared with it"
        )
    return MonaiDenseNet(
        spatial_dims=config["spatial_dims"],
        in_channels=config["in_chans"],
        out_channels=config["num_classes"],
        init_features=config["num_init_features"],
        growth_rate=config["growth_rate"],
        block_config=tuple(config["block_config"]),
        bn_size=config["bn_size"],
        dropout_prob=config["drop_rate"],
    )


@dataclass(frozen=True)
class Peer:
    """One contestant: ``key`` (false, true, max, checkpoint; compiled peers ``<mode>+compile`` and
    ``false+budget<B>``), the label printed, how to build it, and the ``activation_memory_budget`` it is
    ``torch.compile``d with (``None``: run eagerly; 1.0: the compiler's default)."""

    key: str
    label: str
    build: Callable[[], nn.Module]
    compile_budget: float | None = None


def baseline_peer(name: str) -> Peer:
    """The DenseNet people use today for this architecture: for 1D and 3D networks MONAI's ``DenseNet`` (plain
    autograd); for 2D torchvision's checkpointed DenseNet where it has the architecture, else the checkpointed
    model of gpleiss/efficient_densenet_pytorch."""
    with torch.device("meta"):
        config: dict[str, Any] = create_model(name, efficient=False).config
    monai_layout = config["stem"] == "imagenet" and config["compression"] == 0.5 and config["bn_size"] > 0
    if config["spatial_dims"] != 2 and monai_layout:
        return Peer(BASELINE, "MONAI DenseNet (plain autograd)", partial(monai_densenet, config))
    torchvision_has_it = monai_layout and config["in_chans"] == 3 and config["spatial_dims"] == 2
    if torchvision_has_it:
        return Peer(BASELINE, "torchvision memory_efficient=True", partial(torchvision_densenet, config))
    return Peer(
        BASELINE, "torch.utils.checkpoint (gpleiss/efficient_densenet_pytorch)", partial(checkpointed_densenet, name)
    )


def make_peers(name: str, keys: tuple[str, ...] = PEER_KEYS, features_only: bool = False) -> list[Peer]:
    """The peers of ``keys`` for model ``name``, in the order of :data:`PEER_KEYS`; with ``features_only`` each
    built as a multi-scale backbone (:func:`features_only_peer`)."""
    peers = [
        Peer(key, f"efficient={mode!r}", partial(create_model, name, efficient=mode)) for key, mode in MODES.items()
    ]
    peers.append(baseline_peer(name))
    if features_only:
        peers = [
            replace(peer, label=f"{peer.label}, features_only", build=partial(features_only_peer, peer.build))
            for peer in peers
        ]
    return [peer for peer in peers if peer.key in keys]


def compiled_peers(name: str, keys: tuple[str, ...], budgets: tuple[float, ...], every_mode: bool) -> list[Peer]:
    """``torch.compile``d peers of model ``name``: with ``every_mode`` each memory mode of ``keys`` at the
    compiler's default settings, then the plain model (``efficient=False``) at each ``activation_memory_budget``
    of ``budgets``, the compiler's own rematerialisation as a peer of the memory-efficient modes."""
    peers = [
        Peer(f"{key}+compile", f"torch.compile, efficient={mode!r}", partial(create_model, name, efficient=mode), 1.0)
        for key, mode in MODES.items()
        if every_mode and key in keys
    ]
    peers += [
        Peer(
            f"false+budget{budget:g}",
            f"torch.compile, efficient=False, activation_memory_budget={budget:g}",
            partial(create_model, name, efficient=False),
            budget,
        )
        for budget in budgets
    ]
    return peers


def compile_model(model: nn.Module, budget: float, backend: str) -> nn.Module:
    """``torch.compile(model)`` with ``backend``, partitioned for backward under ``activation_memory_budget``
    ``budget`` (1.0: the default, everything the compiler would keep).

    The budget is set while the backend compiles, which is when the forward and backward graphs are split, and
    each budget gets a backend of its own, so that no compiled graph is reused under another budget.
    """
    from torch._dynamo import lookup_backend
    from torch._functorch import config as functorch_config

    compiler = lookup_backend(backend)

    def compile_with_budget(graph: Any, example_inputs: Any) -> Any:
        with functorch_config.patch(activation_memory_budget=budget):
            return compiler(graph, example_inputs)

    # torch.compile of a module returns a module (its annotation only says "a callable").
    return torch.compile(model, backend=compile_with_budget)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class Setting:
    """Everything a measurement depends on besides the model."""

    device: torch.device
    dtype: str = "fp32"
    batch_size: int = 64
    input_size: int = 32
    channels_last: bool = False
    compile: bool = False
    warmup: int = 1
    repeats: int = 3
    frozen_bn: bool = False  # batch norms in eval mode, gradients on: fine-tuning with frozen BatchNorm
    features_only: bool = False
    compile_budgets: tuple[float, ...] = ()  # peers: the plain model compiled with these activation memory budgets
    compile_backend: str = "inductor"
    optimizer_in_backward: bool = False  # each parameter's SGD step inside backward (optim_in_backward)


class Runner:
    """A peer's model, optimizer (SGD with momentum) and random batch on the device, ready to step."""

    def __init__(self, peer: Peer, setting: Setting):
        torch.manual_seed(0)
        model = peer.build().to(setting.device)
        if setting.frozen_bn:
            freeze_batch_norms(model)
        memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        images, self.labels = random_batch(
            setting.batch_size, setting.input_size, *model_io(model), device=setting.device
        )
        self.images = images.contiguous(memory_format=memory_format)
        sgd = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        # With the step inside backward, a training step is forward and backward alone.
        self.optimizer = None if setting.optimizer_in_backward else sgd(model.parameters())
        if setting.optimizer_in_backward:
            optim_in_backward(model, sgd)
        self.compiled = peer.compile_budget is not None
        self.model: nn.Module = (
            compile_model(model, peer.compile_budget, setting.compile_backend)
            if peer.compile_budget is not None
            else model
        )
        self.amp_dtype = PRECISIONS[setting.dtype]
        self.scaler = torch.amp.GradScaler(setting.device.type, enabled=setting.dtype == "fp16")
        self.device = setting.device

    def step(self) -> None:
        train_step(self.model, self.images, self.labels, self.amp_dtype, self.optimizer, self.scaler)

    def timed_step(self) -> float:
        """Seconds one training step takes, synchronising with the device before and after."""
        synchronize(self.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.device)
        return time.perf_counter() - start

    def peak_bytes(self) -> int:
        """Peak memory of one training step above what was allocated before it: on CPU, live tensor storage as a
        dispatch mode sees it (:func:`.memory.peak_memory`)."""
        with peak_memory(self.device) as stats:
            self.step()
        return stats["peak"]

    def allocator_peak_bytes(self) -> int:
        """Peak bytes the CPU allocator holds during one training step above what it held before it
        (:class:`.memory.AllocatorPeak`): kernels' temporaries and compiled graphs included."""
        return allocator_peak(self.step)


def freeze_batch_norms(model: nn.Module) -> None:
    """Put every batch norm of ``model`` in eval mode (running statistics used, not updated); parameters keep
    their gradients."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- measuring


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: CUDA's free memory, or the host's available memory for CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def measure(
    name: str,
    setting: Setting,
    keys: tuple[str, ...] = PEER_KEYS,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Rows of peak memory and step times of every peer of model ``name`` (see the module's docstring).

    Each peer's memory is predicted first and a peer that would not fit is skipped; once naive fits, every
    peer fits (they all need less), and the others are not predicted.
    """
    rows: list[dict[str, Any]] = []
    runners: dict[str, Runner] = {}
    all_fit = False
    peers = make_peers(name, keys, setting.features_only)
    if setting.compile or setting.compile_budgets:
        peers += compiled_peers(name, keys, setting.compile_budgets, setting.compile)
    for peer in peers:
        row: dict[str, Any] = {"mode": peer.key, "label": peer.label, "predicted_bytes": None, "skipped": False}
        rows.append(row)
        if not all_fit:
            row["predicted_bytes"], fits = _predict_fit(peer, setting)
            row["skipped"], all_fit = not fits, fits and peer.key == "false"
        if row["skipped"]:
            _advance(progress, setting.warmup + 1 + setting.repeats, f"{name}, {peer.label}: skipped, does not fit")
            continue
        runner = runners[peer.key] = Runner(peer, setting)
        # A compiled model compiles in its first step: never timed nor measured.
        for _ in range(max(setting.warmup, runner.compiled)):
            runner.step()
            _advance(progress)
        if setting.device.type != "cpu":
            row["peak_bytes"] = runner.peak_bytes()  # max_memory_allocated: the allocator's own figure
        else:
            if not runner.compiled:  # compiled graphs do not dispatch through the counter's mode
                row["peak_bytes"] = runner.peak_bytes()
            row["allocator_peak_bytes"] = runner.allocator_peak_bytes()
        if not runner.compiled:  # the aten operators of one step: on a launch-bound GPU, each is a kernel
            row["operators"] = operator_count(runner.step)
        _advance(progress, 1, f"{name}, {peer.label}: memory measured")
    gc.collect()  # the fake tensors of the predictions, not a peer's timed step, pay for their collection
    times = _interleaved_times(runners, setting.repeats, progress, name)
    for row in rows:
        if row["mode"] in times:
            row["step_times"] = times[row["mode"]]
    return _with_ratios(rows, setting.batch_size)


def timing_warnings(rows: list[dict[str, Any]], others_load: float, cores: int) -> list[str]:
    """Why the step times of ``rows`` should not be compared: other work's load average ``others_load`` on a
    machine of ``cores`` CPUs above :data:`BUSY_LOAD`, or peers' step times spread wider than :data:`SPREAD_LIMIT`
    of their median."""
    warnings = []
    if others_load > BUSY_LOAD:
        warnings.append(
            f"the machine is busy: other work kept a load average of {others_load:.1f} on its {cores} CPUs, so the "
            "steps are slower and the time ratios uncertain; measure on a quiet machine"
        )
    wide = [row for row in rows if row.get("step_spread", 0.0) > SPREAD_LIMIT]
    if wide:
        listing = ", ".join(f"{row['label']} {row['step_spread']:.0%}" for row in wide)
        warnings.append(
            f"step times spread more than {SPREAD_LIMIT:.0%} of their median ((max - min) / median: {listing}): "
            "too wide to compare the peers' times; rerun on a quiet machine or with more --repeats"
        )
    return warnings


def _others_load(start_load: float) -> float:
    """Load average of other work: the higher of the 1-minute load before the run and, after it, the load beyond
    this process's threads."""
    return max(start_load, os.getloadavg()[0] - torch.get_num_threads())


def _predict_fit(peer: Peer, setting: Setting) -> tuple[int, bool]:
    """The predicted peak of a training step of ``peer``, and whether training it fits in the free memory."""
    predicted = predict(peer.build, setting.batch_size, setting.input_size, setting.dtype)
    return predicted.peak, total_bytes(predicted) <= 0.9 * available_bytes(setting.device)


def _interleaved_times(
    runners: dict[str, Runner], repeats: int, progress: Progress | None, name: str
) -> dict[str, list[float]]:
    """Step times of each runner: one step per runner a round, the order reversed every round."""
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    for round_ in range(repeats):
        for key in order:
            times[key].append(runners[key].timed_step())
            _advance(progress)
        _advance(progress, 0, f"{name}: timed round {round_ + 1}/{repeats}")
        order.reverse()
    return times


def _advance(progress: Progress | None, steps: int = 1, note: str | None = None) -> None:
    if progress is not None:
        progress.update(steps)
        if note is not None:
            progress.note(note)


RATIOS = {  # measured value: its ratio to eager naive's
    "peak_bytes": "memory_ratio",
    "allocator_peak_bytes": "allocator_memory_ratio",
    "step_s": "time_ratio",
    "operators": "operator_ratio",
}


def _with_ratios(rows: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Add the median step time, its spread ((max - min) / median, from two steps on), images/s and both ratios
    to naive (where naive and the peer were measured)."""
    for row in rows:
        if row.get("step_times"):
            row["step_s"] = statistics.median(row["step_times"])
            row["images_per_s"] = batch_size / row["step_s"]
            if len(row["step_times"]) > 1:
                row["step_spread"] = (max(row["step_times"]) - min(row["step_times"])) / row["step_s"]
    naive = next((row for row in rows if row["mode"] == "false" and not row["skipped"]), {})
    for row in rows:
        for value, ratio in RATIOS.items():
            if row.get(value) is not None and naive.get(value):
                row[ratio] = row[value] / naive[value]
    return rows


# ----------------------------------------------------------------------------------------------- SyncBatchNorm


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_sync_cost(name: str, setting: Setting, keys: tuple[str, ...], processes: int) -> list[dict[str, Any]]:
    """Step time of data-parallel training of model ``name`` in ``processes`` processes (gloo on CPU, NCCL on
    CUDA, one device each) with and without SyncBatchNorm, for each memory mode of ``keys``.

    Every process trains on its own batch of ``setting.batch_size``. A step's time is the slowest process's,
    from a barrier to the end of the optimizer step; both variants are interleaved, the order reversed every round.
    """
    import tempfile

    import torch.multiprocessing as mp

    modes = tuple(key for key in keys if key in MODES)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rows.json")
        mp.spawn(
            _sync_cost_worker, args=(processes, _free_port(), name, setting, modes, path), nprocs=processes, join=True
        )
        with open(path) as file:
            rows: list[dict[str, Any]] = json.load(file)
    return rows


def _synchronized(build: Callable[[], nn.Module]) -> nn.Module:
    return convert_sync_batchnorm(build())


def _threads_per_process(processes: int) -> int:
    """CPU threads each of ``processes`` processes gets: this process's threads, shared."""
    return max(1, torch.get_num_threads() // processes)


def _sync_cost_worker(
    rank: int, processes: int, port: int, name: str, setting: Setting, modes: tuple[str, ...], path: str
) -> None:
    """One process of :func:`measure_sync_cost`, in train's process group (torchrun's variables set here); rank 0
    writes the rows to ``path``."""
    from .train import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes)
    )
    torch.set_num_threads(_threads_per_process(processes))
    with distributed(setting.device.type) as ctx:
        rows = _sync_cost_rows(name, replace(setting, device=ctx.device), modes, processes)
        if ctx.is_main:
            with open(path, "w") as file:
                json.dump(rows, file)
        # Every process reaches the teardown together: one destroying its gloo group while the other's
        # connection threads still run aborts that one ("terminate called without an active exception").
        ctx.barrier()


def _sync_cost_rows(name: str, setting: Setting, modes: tuple[str, ...], processes: int) -> list[dict[str, Any]]:
    """The rows of :func:`measure_sync_cost`, measured in this process's group (every process gets them)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = setting.device.type == "cuda"
    runners: dict[tuple[str, bool], Runner] = {}
    for key in modes:
        for sync in (False, True):
            build = partial(create_model, name, efficient=MODES[key])
            runner = Runner(Peer(key, key, partial(_synchronized, build) if sync else build), setting)
            runner.model = DistributedDataParallel(runner.model, device_ids=[setting.device.index] if cuda else None)
            for _ in range(setting.warmup):
                runner.step()
            runners[key, sync] = runner
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in runners}
    order = list(runners)
    for _ in range(setting.repeats):
        for variant in order:
            dist.barrier()
            elapsed = torch.tensor(runners[variant].timed_step(), device=setting.device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[variant].append(float(elapsed))
        order.reverse()
    rows = []
    for key in modes:
        plain, synced = statistics.median(times[key, False]), statistics.median(times[key, True])
        rows.append(
            {
                "mode": key,
                "label": f"efficient={MODES[key]!r}",
                "processes": processes,
                "step_times": times[key, False],
                "sync_step_times": times[key, True],
                "step_s": plain,
                "sync_step_s": synced,
                "sync_time_ratio": synced / plain,
            }
        )
    return rows


def format_sync_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`measure_sync_cost`'s rows."""
    header = ["mode", "step (s), BatchNorm", "step (s), SyncBatchNorm", "time x BatchNorm"]
    lines = [
        [row["label"], f"{row['step_s']:.4f}", f"{row['sync_step_s']:.4f}", f"{row['sync_time_ratio']:.2f}"]
        for row in rows
    ]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines])


# ----------------------------------------------------------------------------------------------- reporting


def method_note(setting: Setting) -> str:
    """How memory and time were measured, for the output."""
    if setting.device.type == "cuda":
        memory = (
            "torch.cuda.max_memory_allocated during one training step, minus what was allocated before it "
            "(parameters, optimizer state, input batch)"
        )
    else:
        memory = (
            "two figures per step, each above what was allocated before it (parameters, optimizer state, input "
            "batch): 'live tensors', the peak bytes of tensor storage allocated during one training step and "
            "still alive, counted in-process by a TorchDispatchMode (deterministic; the planner's accounting; "
            "not measured for compiled models, whose graphs bypass the mode); 'allocator', the peak of the "
            "running sum of the CPU allocator's allocation and free events during another step "
            "(torch.profiler profile_memory), which includes kernels' temporaries and compiled graphs: what "
            "the process needs"
        )
    timing = "not measured (--repeats 0)"
    if setting.repeats:
        timing = (
            f"median of {setting.repeats} training steps (forward, cross-entropy, backward, SGD momentum "
            f"step) after {setting.warmup} warm-up step(s) and the memory step; peers interleaved, order "
            "reversed every round; step spread: (max - min) / median of those steps"
        )
    return f"memory: {memory}.\ntime: {timing}."


def _cell(row: dict[str, Any], key: str, fmt: str, unit: int = 1) -> str:
    return format(row[key] / unit, fmt) if row.get(key) is not None else "-"


def format_table(rows: list[dict[str, Any]], first: str | None = None) -> str:
    """A Markdown table of ``rows``; ``first`` names an extra leading column (``depth``, ``batch_size``)."""
    allocator = any("allocator_peak_bytes" in row for row in rows)
    header = ["mode", "peak, live tensors (MiB)", "memory x naive, live tensors"]
    header += ["peak, allocator (MiB)", "memory x naive, allocator"] if allocator else []
    header += ["step (s)", "time x naive", "images/s", "step spread"]
    lines = []
    for row in rows:
        cells = [row["label"]]
        if row["skipped"]:
            cells += [f"skipped: needs ~{row['predicted_bytes'] / MIB:.0f} (predicted), does not fit"]
            cells += ["-"] * (len(header) - 2)
        else:
            cells += [_cell(row, "peak_bytes", ".1f", MIB), _cell(row, "memory_ratio", ".3f")]
            if allocator:
                cells += [_cell(row, "allocator_peak_bytes", ".1f", MIB), _cell(row, "allocator_memory_ratio", ".3f")]
            cells += [
                _cell(row, "step_s", ".3f"),
                _cell(row, "time_ratio", ".2f"),
                _cell(row, "images_per_s", ".1f"),
                _cell(row, "step_spread", ".0%"),
            ]
        lines.append(([str(row[first])] if first else []) + cells)
    header = ([first] if first else []) + header
    table = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in table)


CSV_FIELDS = (
    "model",
    "depth",
    "batch_size",
    "input_size",
    "device",
    "dtype",
    "mode",
    "label",
    "skipped",
    "peak_bytes",
    "predicted_bytes",
    "memory_ratio",
    "allocator_peak_bytes",
    "allocator_memory_ratio",
    "step_s",
    "time_ratio",
    "images_per_s",
    "step_spread",
    "operators",
    "operator_ratio",
)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: str, rows: list[dict[str, Any]], x_key: str, title: str) -> None:
    """PNG of peak memory against ``x_key`` per mode; predictions (for skipped peers) drawn hollow and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key in PEER_KEYS:
        mine = [row for row in rows if row["mode"] == key]
        if not mine:
            continue
        measured = [(row[x_key], row["peak_bytes"] / MIB) for row in mine if row.get("peak_bytes") is not None]
        line = axes.plot(*zip(*measured, strict=True), marker="o", label=mine[0]["label"])[0] if measured else None
        predicted = [(row[x_key], row["predicted_bytes"] / MIB) for row in mine if row["skipped"]]
        if predicted:
            color = line.get_color() if line else None
            axes.plot(
                *zip(*(measured[-1:] + predicted), strict=True),
                linestyle="--",
                marker="o",
                markerfacecolor="none",
                color=color,
                label=f"{mine[0]['label']} (predicted, does not fit)",
            )
    axes.set_xlabel(x_key.replace("_", " "))
    axes.set_ylabel("peak memory of a training step (MiB)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def pareto_front(rows: list[dict[str, Any]], memory_key: str) -> list[dict[str, Any]]:
    """The rows no other row beats: none needs no more memory (``memory_key``) for no more time, and less of
    one of them. Rows without both figures are left out."""
    points = [row for row in rows if row.get(memory_key) is not None and row.get("time_ratio") is not None]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        no_worse = a[memory_key] <= b[memory_key] and a["time_ratio"] <= b["time_ratio"]
        return no_worse and (a[memory_key] < b[memory_key] or a["time_ratio"] < b["time_ratio"])

    return [row for row in points if not any(dominates(other, row) for other in points)]


def pareto_plot(path: str, rows: list[dict[str, Any]], title: str) -> None:
    """PNG of :func:`pareto_figure`, cropped to what it draws (legend and title included)."""
    import matplotlib.pyplot as plt

    figure = pareto_figure(rows, title)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def pareto_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Every peer's memory x naive against its time x eager naive, the Pareto front joined: on CPU the
    allocator's figure (the one compiled models have), on CUDA ``max_memory_allocated``. Points are numbered and
    named in a legend beside the axes (labels next to them were clipped at the edge or overlapped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory_key = "allocator_memory_ratio" if any("allocator_memory_ratio" in row for row in rows) else "memory_ratio"
    points = [row for row in rows if row.get(memory_key) is not None and row.get("time_ratio") is not None]
    figure, axes = plt.subplots(figsize=(7.5, 5))
    for number, row in enumerate(points, 1):
        xy = (row["time_ratio"], row[memory_key])
        axes.scatter(*xy, marker="s" if "compile" in row["label"] else "o", s=40, label=f"{number}: {row['label']}")
        axes.annotate(str(number), xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted(pareto_front(points, memory_key), key=lambda row: row["time_ratio"])
    if front:
        axes.plot(
            [row["time_ratio"] for row in front],
            [row[memory_key] for row in front],
            "k--",
            lw=0.8,
            label="Pareto front (no peer needs\nless memory for less time)",
        )
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    axes.set_xlabel("step time x eager efficient=False")
    axes.set_ylabel(f"peak memory x eager efficient=False ({'allocator' if 'allocator' in memory_key else 'device'})")
    axes.set_title(textwrap.fill(title, 80), fontsize=8)
    axes.margins(0.1)
    axes.grid(alpha=0.3)
    return figure


# ----------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device",
        type=device_name,
        default=torch.device(default_device),
        help="cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure each memory mode of --modes torch.compiled (default settings), beside the eager ones",
    )
    parser.add_argument(
        "--compile-budget",
        type=_budgets,
        default=(),
        metavar="B[,B...]",
        help="also measure the plain model (efficient=False) compiled with torch._functorch.config."
        "activation_memory_budget B, the compiler's own rematerialisation (0 < B <= 1), e.g. 0.5,0.1",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile and --compile-budget (default: %(default)s; aot_eager "
        "compiles faster and partitions the same way)",
    )
    parser.add_argument(
        "--frozen-bn",
        action="store_true",
        help="fine-tuning with frozen BatchNorm: every batch norm in eval mode, gradients on",
    )
    parser.add_argument(
        "--features-only",
        action="store_true",
        help="measure the multi-scale backbones (features_only=True, every feature level) under a "
        "head that pools and classifies every level",
    )
    parser.add_argument(
        "--repeats", type=int_at_least(0), default=3, help="timed steps per mode; 0: memory only (default: 3)"
    )
    parser.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed steps per mode first (default: 1)")
    parser.add_argument(
        "--modes",
        type=partial(peer_keys, valid=PEER_KEYS),
        default=PEER_KEYS,
        help=f"comma-separated subset of {','.join(PEER_KEYS)} (default: all)",
    )
    parser.add_argument("--csv", metavar="PATH", type=output_path, help="also write the results as CSV")
    parser.add_argument("--sweep", choices=("depth", "batch"), help="repeat over depths or batch sizes and plot")
    parser.add_argument(
        "--family",
        type=family_name,
        default="densenet_bc_k12",
        help="CIFAR family for --sweep depth (default: %(default)s)",
    )
    parser.add_argument(
        "--depths",
        type=positive_ints,
        default=[40, 100, 160, 250, 400],
        help="depths for --sweep depth (default: 40,100,160,250,400)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=positive_ints,
        default=[16, 32, 64, 128],
        help="batch sizes for --sweep batch (default: 16,32,64,128)",
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        type=output_path,
        help="plot path: for --sweep memory against depth or batch (default: bench-<sweep>.png); otherwise "
        "memory x naive against time x naive of every peer, the Pareto front joined (needs --repeats >= 1)",
    )
    parser.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="step each parameter (SGD) inside backward, as soon as its gradient is accumulated, and free the "
        "gradient (densenet_efficient.optim_in_backward)",
    )
    parser.add_argument(
        "--sync-bn-processes",
        type=int_at_least(2),
        metavar="N",
        help="instead: time a data-parallel step of N processes (gloo on CPU, NCCL on CUDA) with and "
        "without SyncBatchNorm; --batch-size is per process, --modes its memory modes",
    )


def _budgets(value: str) -> tuple[float, ...]:
    """Activation memory budgets from ``0.5,0.1``: each in (0, 1]."""
    try:
        budgets = tuple(float(part) for part in value.split(","))
    except ValueError:
        budgets = ()
    if not budgets or not all(0 < budget <= 1 for budget in budgets):
        raise argparse.ArgumentTypeError(
            f"invalid activation memory budgets {value!r}: give comma-separated numbers in (0, 1], e.g. 0.5,0.1"
        )
    return budgets


def _configs(args: argparse.Namespace) -> list[tuple[dict[str, Any], str]]:
    """(row fields, model name) of each configuration to measure; ``ArgumentTypeError`` for a bad depth."""
    if args.sweep == "depth":
        return [({"depth": depth}, model_name(family_member(args.family, depth))) for depth in args.depths]
    if args.sweep == "batch":
        return [({"batch_size": batch_size}, args.model) for batch_size in args.batch_sizes]
    return [({}, args.model)]


def run(args: argparse.Namespace) -> int:
    start_load = os.getloadavg()[0]
    try:
        configs = [(fields, name, input_size(name, args.input_size)) for fields, name in _configs(args)]
    except argparse.ArgumentTypeError as error:
        print(f"densenet-efficient bench: error: {error}", file=sys.stderr)
        return 2
    base = Setting(
        args.device,
        args.dtype,
        args.batch_size,
        0,
        args.channels_last,
        args.compile,
        args.warmup,
        args.repeats,
        args.frozen_bn,
        args.features_only,
        args.compile_budget,
        args.compile_backend,
        args.optimizer_in_backward,
    )
    if args.optimizer_in_backward and (args.dtype == "fp16" or args.sync_bn_processes):
        print(
            "densenet-efficient bench: error: --optimizer-in-backward steps each parameter as its gradient is "
            "accumulated: not with --dtype fp16 (the GradScaler unscales and checks every gradient first) nor "
            "--sync-bn-processes (DistributedDataParallel averages gradients after that)",
            file=sys.stderr,
        )
        return 2
    if args.sync_bn_processes:
        return _run_sync_cost(args, base, configs)
    rows: list[dict[str, Any]] = []
    compiled = len(args.compile_budget) + (len(set(args.modes) & set(MODES)) if args.compile else 0)
    steps = len(configs) * (len(args.modes) + compiled) * (args.warmup + 1 + args.repeats)
    progress = Progress("bench", steps)
    progress.note(
        f"{len(configs)} configuration(s) x {len(args.modes) + compiled} peers, {steps} training steps; the time "
        "left is estimated from the first ones"
    )
    try:
        for fields, name, size in configs:
            setting = replace(base, input_size=size, batch_size=fields.get("batch_size", base.batch_size))
            common = {
                "model": name,
                "depth": None,
                "batch_size": setting.batch_size,
                "input_size": setting.input_size,
                "device": str(setting.device),
                "dtype": setting.dtype,
            }
            rows += [{**common, **fields, **row} for row in measure(name, setting, args.modes, progress)]
    finally:
        progress.close()
    warnings = timing_warnings(rows, _others_load(start_load), os.cpu_count() or 1) if args.repeats else []
    for warning in warnings:
        print(f"densenet-efficient bench: warning: {warning}", file=sys.stderr)
    summary = _summary(args, base, configs)
    print(summary + "\n")
    print(format_table(rows, {"depth": "depth", "batch": "batch_size"}.get(args.sweep)))
    counted = [row for row in rows if row.get("operator_ratio") is not None]
    if counted:
        print(
            "\naten operators per training step (x naive): "
            + ", ".join(f"{row['label']} {row['operators']} ({row['operator_ratio']:.2f})" for row in counted)
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"summary": summary, "warnings": warnings, "rows": rows}, file, indent=2)
    if args.csv:
        write_csv(args.csv, rows)
    if args.sweep:
        path = args.plot or f"bench-{args.sweep}.png"
        plot(path, rows, "depth" if args.sweep == "depth" else "batch_size", summary.splitlines()[0])
        print(f"\nplot: {path}")
    elif args.plot:
        pareto_plot(args.plot, rows, summary.splitlines()[0])
        print(f"\nplot: {args.plot}")
    return 0


def _run_sync_cost(args: argparse.Namespace, base: Setting, configs: list[tuple[dict[str, Any], str, int]]) -> int:
    """``bench --sync-bn-processes N``: the table of :func:`measure_sync_cost` for the model, printed and saved."""
    processes = args.sync_bn_processes
    if args.sweep or args.repeats < 1 or (args.device.type == "cuda" and processes > torch.cuda.device_count()):
        print(
            "densenet-efficient bench: error: --sync-bn-processes needs --repeats >= 1, no --sweep, and on CUDA "
            f"one device per process ({torch.cuda.device_count()} here)",
            file=sys.stderr,
        )
        return 2
    _, name, size = configs[0]
    rows = measure_sync_cost(name, replace(base, input_size=size), args.modes, processes)
    threads = "" if args.device.type == "cuda" else f" of {_threads_per_process(processes)} thread(s)"
    summary = (
        _summary(args, base, configs).splitlines()[0] + f"; {processes} processes{threads}, batch "
        f"{base.batch_size} per process\ntime: median of {base.repeats} data-parallel training steps "
        f"(DistributedDataParallel, SGD momentum) after {base.warmup} warm-up step(s), the slowest process's "
        "time from a barrier; BatchNorm and SyncBatchNorm interleaved, order reversed every round."
    )
    print(summary + "\n")
    print(format_sync_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"summary": summary, "rows": rows}, file, indent=2)
    return 0


def _summary(args: argparse.Namespace, setting: Setting, configs: list[tuple[dict[str, Any], str, int]]) -> str:
    """First lines of the output: what ran where, and how it was measured."""
    what = args.family if args.sweep == "depth" else args.model
    if setting.device.type == "cuda":
        where = torch.cuda.get_device_name(setting.device)
    else:
        where = f"cpu, {torch.get_num_threads()} threads"
    size = configs[0][2]
    batch = "" if args.sweep == "batch" else f", batch {setting.batch_size}"
    flags = "".join(
        f", {flag}"
        for flag, on in (
            ("channels_last", args.channels_last),
            ("compiled peers", args.compile),
            (f"compile budgets {','.join(f'{b:g}' for b in args.compile_budget)}", bool(args.compile_budget)),
            ("frozen BatchNorm (eval mode)", args.frozen_bn),
            ("features_only", args.features_only),
            ("optimizer step in backward", args.optimizer_in_backward),
        )
        if on
    )
    shape = input_label(configs[0][1], size)
    head = f"{what}{batch}, {shape}, {setting.dtype}{flags} on {where}, torch {torch.__version__}"
    return f"{head}\n{method_note(setting)}"
