"""``densenet-efficient bench``: peak memory, aten operators and step time of every memory mode and its peers
(:func:`make_peers`): memory in a pass of its own, then the timed steps interleaved (see :func:`measure`)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import convert_sync_batchnorm, optim_in_backward
from ..core.model import DenseBlock, DenseLayer, DenseNet, DenseNetFeatures
from ..models import create_model
from . import common
from .memory import allocator_peak, operator_count, peak_memory

BASELINE = "checkpoint"
PEER_KEYS = (*common.MODES, BASELINE)
MIB = 2**20
SPREAD_LIMIT = 0.1  # (max - min) / median of a peer's step times above which its time is not comparable
BUSY_LOAD = 0.5  # load average of other work (runnable threads) above which the machine counts as busy
RATIOS = dict(peak_bytes="memory_ratio", allocator_peak_bytes="allocator_memory_ratio", step_s="time_ratio")
RATIOS.update(operators="operator_ratio")  # each measured value's ratio to eager naive's


class _CheckpointedLayer(nn.Module):
    """A dense layer as gpleiss/efficient_densenet_pytorch runs it: checkpoint around cat, norm1, ReLU, conv1."""

    def __init__(self, layer: DenseLayer):
        super().__init__()
        self.layer = layer

    def _bottleneck(self, *features: Tensor) -> Tensor:
        return self.layer.conv1(self.layer.relu1(self.layer.norm1(torch.cat(features, 1))))

    def forward(self, features: list[Tensor]) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        layer, out = self.layer, checkpoint(self._bottleneck, *features, use_reentrant=False)
        if hasattr(layer, "conv2"):
            out = layer.conv2(layer.relu2(layer.norm2(out)))
        return F.dropout(out, p=layer.drop_rate, training=layer.training) if layer.drop_rate > 0 else out


def checkpointed_densenet(name: str, **layers: Any) -> DenseNet:
    """The naive model with every dense layer checkpointed as in gpleiss/efficient_densenet_pytorch."""
    model = create_model(name, efficient=False, **layers)
    for block in [module for module in model.modules() if isinstance(module, DenseBlock)]:
        for layer_name, layer in list(block.items()):
            block[layer_name] = _CheckpointedLayer(layer)  # type: ignore[arg-type]
    return model


def torchvision_densenet(config: dict[str, Any]) -> nn.Module:
    """torchvision's DenseNet with ``memory_efficient=True`` and the architecture of ``config``."""
    from torchvision.models import DenseNet as TorchvisionDenseNet

    keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "drop_rate", "num_classes")
    return TorchvisionDenseNet(**{key: config[key] for key in keys}, memory_efficient=True)


def monai_densenet(config: dict[str, Any]) -> nn.Module:
    """MONAI's ``DenseNet`` (plain autograd) with the architecture of ``config`` (MONAI's layout)."""
    from monai.networks.nets import DenseNet as MonaiDenseNet

    names = dict(spatial_dims="spatial_dims", in_channels="in_chans", out_channels="num_classes", bn_size="bn_size")
    names.update(init_features="num_init_features", growth_rate="growth_rate", dropout_prob="drop_rate")
    kwargs = {key: config[value] for key, value in {**names, "norm": "norm", "act": "act"}.items() if value in config}
    return MonaiDenseNet(**kwargs, block_config=tuple(config["block_config"]))


def baseline(name: str, **layers: Any) -> tuple[str, Callable[[], nn.Module]]:
    """Label and builder of the DenseNet people use today for model ``name`` (``layers``: MONAI's ``norm``, ``act``):
    MONAI's for 1D and 3D networks, torchvision's checkpointed one for the 2D networks it has (batch norm and ReLU
    only), else gpleiss/efficient_densenet_pytorch's."""
    with torch.device("meta"):
        config: dict[str, Any] = create_model(name, efficient=False, **layers).config
    monai_layout = config["stem"] == "imagenet" and config["compression"] == 0.5 and config["bn_size"] > 0
    if config["spatial_dims"] != 2 and monai_layout:
        return "MONAI DenseNet (plain autograd)", partial(monai_densenet, config)
    if monai_layout and config["in_chans"] == 3 and not layers:
        return "torchvision memory_efficient=True", partial(torchvision_densenet, config)
    return "torch.utils.checkpoint (gpleiss/efficient_densenet_pytorch)", partial(checkpointed_densenet, name, **layers)


class MultiScaleProbe(nn.Module):
    """``backbone``'s maps (a list or dict of (N, C_i, ...) with ``channels`` C_i), each averaged, concatenated
    and classified, (N, num_classes): a stand-in for a detection head, a gradient to every level. ``features`` is
    the module whose ``conv0`` reads the images (not a submodule: part of the backbone)."""

    def __init__(self, backbone: nn.Module, features: nn.Module, channels: list[int], num_classes: int):
        super().__init__()
        self.backbone, self.classifier = backbone, nn.Linear(sum(channels), num_classes)
        object.__setattr__(self, "features", features)  # not a submodule: no second copy in the state dict

    def forward(self, x: Tensor) -> Tensor:
        maps = self.backbone(x)
        maps = list(maps.values()) if isinstance(maps, dict) else maps
        return self.classifier(torch.cat([level.flatten(2).mean(2) for level in maps], 1))


def features_only_peer(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``'s network as a backbone of every ``feature_info`` level under a :class:`MultiScaleProbe`;
    torchvision's through ``IntermediateLayerGetter`` on the same levels (``norm5`` for the last)."""
    model: Any = build()
    if isinstance(model, DenseNet):
        backbone = DenseNetFeatures(model)
        return MultiScaleProbe(backbone, backbone.features, backbone.feature_info.channels(), model.num_classes or 10)
    from torchvision.models._utils import IntermediateLayerGetter

    features = model.features
    blocks = sum(name.startswith("denseblock") for name, _ in features.named_children())
    levels = {"relu0": features.norm0.num_features}
    levels |= {f"denseblock{i}": features.get_submodule(f"transition{i}.norm").num_features for i in range(1, blocks)}
    levels["norm5"] = features.norm5.num_features
    getter = IntermediateLayerGetter(features, {name: name for name in levels})
    return MultiScaleProbe(getter, getter, list(levels.values()), model.classifier.out_features)


@dataclass(frozen=True)
class Peer:
    """A contestant: ``key`` (a memory mode, checkpoint, ``<mode>+compile``, ``false+budget<B>``), label, builder,
    and the ``activation_memory_budget`` it is compiled with (``None``: eager)."""

    key: str
    label: str
    build: Callable[[], nn.Module]
    compile_budget: float | None = None


def make_peers(name: str, keys: Iterable[str] = PEER_KEYS, setting: Setting | None = None) -> list[Peer]:
    """The peers of ``keys`` (in :data:`PEER_KEYS` order) for model ``name`` and ``setting``'s options: ``compile``,
    ``compile_budget`` (naive compiled under each activation memory budget), ``features_only``, ``norm``, ``act``."""
    setting = setting or Setting(torch.device("cpu"))
    layers = {key: value for key in ("norm", "act") if (value := getattr(setting, key))}
    build = partial(create_model, name, **layers)
    modes = [Peer(key, f"efficient={mode!r}", partial(build, efficient=mode)) for key, mode in common.MODES.items()]
    modes = [peer for peer in modes if peer.key in keys]
    peers = [*modes, *[Peer(BASELINE, *baseline(name, **layers))] * (BASELINE in keys)]
    peers += [Peer(f"{p.key}+compile", f"torch.compile, {p.label}", p.build, 1.0) for p in modes if setting.compile]
    label, naive = "torch.compile, efficient=False, activation_memory_budget=", partial(build, efficient=False)
    peers += [Peer(f"false+budget{b:g}", f"{label}{b:g}", naive, b) for b in setting.compile_budget]
    if setting.features_only:
        builds = [partial(features_only_peer, p.build) for p in peers]
        peers = [replace(p, label=f"{p.label}, features_only", build=b) for p, b in zip(peers, builds, strict=True)]
    return peers


@dataclass(frozen=True)
class Setting:
    """Everything a measurement depends on besides the model (field names are bench's option names)."""

    device: torch.device
    dtype: str = "fp32"
    batch_size: int = 64
    input_size: int = 32
    channels_last: bool = False
    compile: bool = False  # also each memory mode compiled
    warmup: int = 1
    repeats: int = 3
    frozen_bn: bool = False  # batch norms in eval mode, gradients on: fine-tuning with frozen BatchNorm
    features_only: bool = False
    compile_budget: tuple[float, ...] = ()  # also the plain model compiled with these activation memory budgets
    compile_backend: str = "inductor"
    optimizer_in_backward: bool = False  # each parameter's SGD step inside backward (optim_in_backward)
    norm: str | None = None  # MONAI's norm and act spellings for every peer (None: batch norm, ReLU)
    act: str | None = None


class Runner:
    """A peer's model, optimizer (SGD with momentum) and random batch on the device, ready to step."""

    def __init__(self, peer: Peer, setting: Setting):
        torch.manual_seed(0)
        memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        model = peer.build().to(setting.device).to(memory_format=memory_format)
        for module in model.modules() if setting.frozen_bn else ():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # running statistics used, not updated; gradients kept
        images, self.labels = common.random_batch(
            setting.batch_size, setting.input_size, *common.model_io(model), setting.device
        )
        self.images = images.contiguous(memory_format=memory_format)
        sgd = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.optimizer = None if setting.optimizer_in_backward else sgd(model.parameters())
        if setting.optimizer_in_backward:  # a training step is then forward and backward alone
            optim_in_backward(model, sgd)
        self.compiled, self.model = peer.compile_budget is not None, model
        if self.compiled:  # under its activation_memory_budget, a backend each
            from torch._dynamo import lookup_backend
            from torch._functorch.config import patch

            backend = patch(activation_memory_budget=peer.compile_budget)(lookup_backend(setting.compile_backend))
            self.model = torch.compile(model, backend=backend)  # type: ignore[assignment]
        self.amp_dtype, self.device = common.PRECISIONS[setting.dtype], setting.device
        self.scaler = torch.amp.GradScaler(setting.device.type, enabled=setting.dtype == "fp16")

    def step(self) -> None:
        common.train_step(self.model, self.images, self.labels, self.amp_dtype, self.optimizer, self.scaler)

    def timed_step(self) -> float:
        """Seconds of one training step, the device synchronised before and after."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda device: None
        sync(self.device)
        start = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - start

    def peak_bytes(self) -> int:
        """Peak memory of one step above what was allocated before it (:func:`.memory.peak_memory`)."""
        self.model.zero_grad(set_to_none=True)  # freed in the step, old gradients would lower CUDA's count by theirs
        with peak_memory(self.device) as stats:
            self.step()
        return stats["peak"]


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def _advance(progress: common.Progress | None, steps: int = 1, note: str | None = None) -> None:
    if progress is not None:
        progress.update(steps)
        if note is not None:
            progress.note(note)


def interleaved(timers: dict[Any, Callable[[], float]], repeats: int, progress=None, what="") -> dict[Any, list]:
    """``repeats`` times of each timer, one per timer a round, the order reversed every round."""
    times: dict[Any, list[float]] = {key: [] for key in timers}
    order = list(timers)
    for round_ in range(repeats):
        for key in order:
            times[key].append(timers[key]())
            _advance(progress)
        _advance(progress, 0, f"{what}: timed round {round_ + 1}/{repeats}")
        order.reverse()
    return times


def measure(name: str, setting: Setting, keys=PEER_KEYS, progress: common.Progress | None = None) -> list[dict]:
    """Rows of memory (on CPU twice: live tensors, what ``plan`` models, and the allocator's peak, kernels'
    temporaries and compiled graphs included), operators and interleaved step times of each peer of model ``name``.
    A peer whose prediction exceeds the device's free memory is skipped (predicted until naive fits)."""
    rows: list[dict[str, Any]] = []
    runners: dict[str, Runner] = {}
    all_fit = False
    for peer in make_peers(name, keys, setting):
        row: dict[str, Any] = {"mode": peer.key, "label": peer.label, "predicted_bytes": None, "skipped": False}
        rows.append(row)
        if not all_fit:
            predicted = common.predict(peer.build, setting.batch_size, setting.input_size, setting.dtype)
            fits = predicted.total() <= 0.9 * available_bytes(setting.device)
            row.update(predicted_bytes=predicted.peak, skipped=not fits)
            all_fit = fits and peer.key == "false"
        if row["skipped"]:
            _advance(progress, setting.warmup + 1 + setting.repeats, f"{name}, {peer.label}: skipped, does not fit")
            continue
        runner = runners[peer.key] = Runner(peer, setting)
        for _ in range(max(setting.warmup, runner.compiled)):  # a compiled model compiles in its first step
            runner.step()
            _advance(progress)
        cpu = setting.device.type == "cpu"
        if not (cpu and runner.compiled):  # compiled graphs bypass the dispatch mode
            row["peak_bytes"] = runner.peak_bytes()
        if cpu:
            row["allocator_peak_bytes"] = allocator_peak(runner.step)
        if not runner.compiled:  # the aten operators of one step: on a launch-bound GPU, each is a kernel
            row["operators"] = operator_count(runner.step)
        _advance(progress, 1, f"{name}, {peer.label}: memory measured")
    gc.collect()  # the predictions' fake tensors, not a timed step, pay for their collection
    timers = {key: runner.timed_step for key, runner in runners.items()}
    for key, times in interleaved(timers, setting.repeats, progress, name).items():
        next(row for row in rows if row["mode"] == key)["step_times"] = times
    return _with_ratios(rows, setting.batch_size)


def _with_ratios(rows: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Add the median step time, its spread ((max - min) / median, from two steps), images/s and :data:`RATIOS`."""
    for row in rows:
        if times := row.get("step_times"):
            row["step_s"] = statistics.median(times)
            row["images_per_s"] = batch_size / row["step_s"]
            if len(times) > 1:
                row["step_spread"] = (max(times) - min(times)) / row["step_s"]
    naive = next((row for row in rows if row["mode"] == "false" and not row["skipped"]), {})
    for row in rows:
        for key, ratio in RATIOS.items():
            if row.get(key) is not None and naive.get(key):
                row[ratio] = row[key] / naive[key]
    return rows


def timing_warnings(rows: list[dict[str, Any]], others_load: float, cores: int) -> list[str]:
    """Why the step times of ``rows`` should not be compared (:data:`BUSY_LOAD`, :data:`SPREAD_LIMIT`)."""
    warnings = []
    if others_load > BUSY_LOAD:
        warnings.append(
            f"the machine is busy: other work kept a load average of {others_load:.1f} on its {cores} CPUs, so the "
            "steps are slower and the time ratios uncertain; measure on a quiet machine"
        )
    if wide := [row for row in rows if row.get("step_spread", 0.0) > SPREAD_LIMIT]:
        listing = ", ".join(f"{row['label']} {row['step_spread']:.0%}" for row in wide)
        warnings.append(
            f"step times spread more than {SPREAD_LIMIT:.0%} of their median ((max - min) / median: {listing}): "
            "too wide to compare the peers' times; rerun on a quiet machine or with more --repeats"
        )
    return warnings


def measure_sync_cost(name: str, setting: Setting, keys: tuple[str, ...], processes: int) -> list[dict[str, Any]]:
    """Step times of data-parallel training of ``name`` in ``processes`` processes (gloo on CPU, NCCL on CUDA) with
    and without SyncBatchNorm, per memory mode of ``keys``: a batch per process, the slowest process's time from a
    barrier, both variants interleaved."""
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    modes, queue = [key for key in keys if key in common.MODES], mp.get_context("spawn").SimpleQueue()
    mp.spawn(_sync_worker, (processes, get_free_port(), name, setting, modes, queue), nprocs=processes)
    rows = []
    for key, (plain, synced) in zip(modes, queue.get(), strict=True):
        step_s, sync_step_s = statistics.median(plain), statistics.median(synced)
        row = dict(mode=key, label=f"efficient={common.MODES[key]!r}", processes=processes, step_s=step_s)
        rows.append(row | dict(sync_step_s=sync_step_s, sync_time_ratio=sync_step_s / step_s, step_times=plain))
        rows[-1]["sync_step_times"] = synced
    return rows


def _sync_worker(rank: int, processes: int, port: int, name: str, setting: Setting, modes: list, queue) -> None:
    """One process of :func:`measure_sync_cost`; rank 0 puts each mode's [plain, synced] step times in ``queue``."""
    from torch.nn.parallel import DistributedDataParallel

    from .train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(processes)
    torch.set_num_threads(max(1, torch.get_num_threads() // processes))
    with distributed(setting.device.type) as ctx:
        setting = replace(setting, device=ctx.device)

        def slowest_step(runner: Runner) -> float:
            ctx.barrier()
            elapsed = torch.tensor(runner.timed_step(), device=ctx.device)
            ctx.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
            return float(elapsed)

        timers: dict[Any, Callable[[], float]] = {}
        for key, sync in [(key, sync) for key in modes for sync in (False, True)]:
            runner = Runner(Peer(key, key, partial(create_model, name, efficient=common.MODES[key])), setting)
            network = convert_sync_batchnorm(runner.model) if sync else runner.model  # the same parameters
            runner.model = DistributedDataParallel(network, device_ids=[rank] if ctx.device.type == "cuda" else None)
            for _ in range(setting.warmup):
                runner.step()
            timers[key, sync] = partial(slowest_step, runner)
        times = interleaved(timers, setting.repeats)
        if rank == 0:
            queue.put([[times[key, False], times[key, True]] for key in modes])
        ctx.barrier()  # one process destroying its gloo group while another's threads still run aborts that one
        del timers, runner


def markdown(header: list[str], rows: Iterable[Iterable[object]]) -> str:
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, ["---"] * len(header), *rows])


def format_table(rows: list[dict[str, Any]], first: str | None = None) -> str:
    """A Markdown table of ``rows``; ``first`` names an extra leading column (``depth``, ``batch_size``)."""
    columns = {"peak_bytes": ("peak, live tensors (MiB)", ".1f", MIB)}
    columns["memory_ratio"] = ("memory x naive, live tensors", ".3f", 1)
    if any("allocator_peak_bytes" in row for row in rows):
        columns["allocator_peak_bytes"] = ("peak, allocator (MiB)", ".1f", MIB)
        columns["allocator_memory_ratio"] = ("memory x naive, allocator", ".3f", 1)
    columns.update(step_s=("step (s)", ".3f", 1), time_ratio=("time x naive", ".2f", 1))
    columns.update(images_per_s=("images/s", ".1f", 1), step_spread=("step spread", ".0%", 1))
    lines, lead = [], [first] if first else []
    for row in rows:
        cells = [
            format(row[key] / unit, f) if row.get(key) is not None else "-" for key, (_, f, unit) in columns.items()
        ]
        if row["skipped"]:
            cells = [f"skipped: needs ~{row['predicted_bytes'] / MIB:.0f} (predicted), does not fit"] + cells[1:]
        lines.append([*(row[key] for key in lead), row["label"], *cells])
    return markdown([*lead, "mode", *(title for title, _, _ in columns.values())], lines)


def _axes(size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure on matplotlib's Agg canvas (no display, nothing for pyplot to close) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = FigureCanvasAgg(Figure(figsize=size)).figure
    return figure, figure.subplots()


def plot(path: str, rows: list[dict[str, Any]], x_key: str, title: str) -> None:
    """PNG of peak memory against ``x_key`` per peer; predictions (for skipped peers) hollow and dashed."""
    figure, axes = _axes((7, 4.5))
    for key in dict.fromkeys(row["mode"] for row in rows):
        mine = [row for row in rows if row["mode"] == key]
        measured = [(row[x_key], row["peak_bytes"] / MIB) for row in mine if row.get("peak_bytes") is not None]
        line = axes.plot(*zip(*measured, strict=True), "o-", label=mine[0]["label"]) if measured else [None]
        if predicted := [(row[x_key], row["predicted_bytes"] / MIB) for row in mine if row["skipped"]]:
            xy, label = zip(*(measured[-1:] + predicted), strict=True), f"{mine[0]['label']} (predicted, does not fit)"
            axes.plot(*xy, "o--", mfc="none", color=line[0] and line[0].get_color(), label=label)
    axes.set(xlabel=x_key.replace("_", " "), ylabel="peak memory of a training step (MiB)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def pareto_front(rows: list[dict[str, Any]], memory_key: str) -> list[dict[str, Any]]:
    """The rows with ``memory_key`` and ``time_ratio`` that no other row beats in both."""
    points = [(row[memory_key], row["time_ratio"], row) for row in rows]
    points = [(m, t, row) for m, t, row in points if m is not None and t is not None]
    return [row for m, t, row in points if not any(a <= m and b <= t and (a, b) != (m, t) for a, b, _ in points)]


def pareto_figure(rows: list[dict[str, Any]], title: str, path: str | None = None) -> Any:
    """Each peer's memory x naive (on CPU the allocator's, the figure compiled models have) against its time x
    eager naive, the Pareto front joined; points numbered, named in a legend beside the axes. With ``path``, saved
    there as a PNG cropped to what it draws."""
    memory_key = "allocator_memory_ratio" if any("allocator_memory_ratio" in row for row in rows) else "memory_ratio"
    points = [row for row in rows if row.get(memory_key) is not None and row.get("time_ratio") is not None]
    figure, axes = _axes((7.5, 5))
    for number, row in enumerate(points, 1):
        xy = (row["time_ratio"], row[memory_key])
        axes.scatter(*xy, marker="s" if "compile" in row["label"] else "o", s=40, label=f"{number}: {row['label']}")
        axes.annotate(str(number), xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
    if front := sorted(pareto_front(points, memory_key), key=lambda row: row["time_ratio"]):
        line = [row["time_ratio"] for row in front], [row[memory_key] for row in front]
        axes.plot(*line, "k--", lw=0.8, label="Pareto front (no peer needs\nless memory for less time)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    kind = "allocator" if "allocator" in memory_key else "device"
    axes.set(xlabel="step time x eager efficient=False", ylabel=f"peak memory x eager efficient=False ({kind})")
    axes.set_title(textwrap.fill(title, 80), fontsize=8)
    axes.margins(0.1)
    axes.grid(alpha=0.3)
    if path:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    return figure


def _budgets(value: str) -> tuple[float, ...]:
    """argparse type: activation memory budgets such as ``0.5,0.1``, each in (0, 1]."""
    with contextlib.suppress(ValueError):  # float() of a part that is not a number
        if all(0 < budget <= 1 for budget in map(float, value.split(","))):
            return tuple(map(float, value.split(",")))
    message = f"invalid activation memory budgets {value!r}: give comma-separated numbers in (0, 1], e.g. 0.5,0.1"
    raise argparse.ArgumentTypeError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    add = parser.add_argument
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    add("--device", type=common.device_name, default=device, help="cpu, cuda or cuda:N (default: %(default)s)")
    add("--channels-last", action="store_true", help="channels_last memory format")
    add("--compile", action="store_true", help="also each memory mode of --modes torch.compiled (default settings)")
    budget = "also the plain model compiled under activation_memory_budget B (0 < B <= 1), e.g. 0.5,0.1"
    add("--compile-budget", type=_budgets, default=(), metavar="B[,B...]", help=budget)
    add("--compile-backend", default="inductor", help="torch.compile backend (default: %(default)s; aot_eager: faster)")
    add("--frozen-bn", action="store_true", help="fine-tuning with frozen BatchNorm: batch norms in eval mode")
    add("--features-only", action="store_true", help="multi-scale backbones (features_only=True) under a probe head")
    add("--norm", help="MONAI's norm spelling for every peer, e.g. instance (default: batch norm)")
    add("--act", help="MONAI's act spelling for every peer, e.g. prelu (default: ReLU)")
    add("--repeats", type=common.int_at_least(0), default=3, help="timed steps per mode; 0: memory only (default: 3)")
    add("--warmup", type=common.int_at_least(0), default=1, help="untimed steps per mode first (default: 1)")
    modes = partial(common.peer_keys, valid=PEER_KEYS)
    add("--modes", type=modes, default=PEER_KEYS, help=f"subset of {','.join(PEER_KEYS)} (default: all)")
    add("--csv", metavar="PATH", type=common.output_path, help="also write the results as CSV")
    add("--sweep", choices=("depth", "batch"), help="repeat over depths or batch sizes and plot memory")
    add("--family", type=common.family_name, default="densenet_bc_k12", help="of --sweep depth (%(default)s)")
    add("--depths", type=common.positive_ints, default=[40, 100, 160, 250, 400], help="of --sweep depth")
    add("--batch-sizes", type=common.positive_ints, default=[16, 32, 64, 128], help="of --sweep batch (16,32,64,128)")
    plot = "with --sweep memory against it (default: bench-<sweep>.png), else memory against time, Pareto front"
    add("--plot", metavar="PNG", type=common.output_path, help=plot)
    fused = "each parameter's SGD step inside backward, its gradient then freed (optim_in_backward)"
    add("--optimizer-in-backward", action="store_true", help=fused)
    sync = "instead: time a data-parallel step of N processes with and without SyncBatchNorm"
    add("--sync-bn-processes", type=common.int_at_least(2), metavar="N", help=sync)


def run(args: argparse.Namespace) -> int:
    start_load = os.getloadavg()[0]
    names: list[tuple[dict[str, int], str]] = [({}, args.model)]
    if args.sweep == "batch":
        names = [({"batch_size": batch}, args.model) for batch in args.batch_sizes]
    try:
        if args.sweep == "depth":
            names = [({"depth": d}, common.model_name(common.family_member(args.family, d))) for d in args.depths]
        configs = [(extra, name, common.input_size(name, args.input_size)) for extra, name in names]
        with torch.device("meta"):
            create_model(args.model, norm=args.norm or "batch", act=args.act or "relu")
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise common.UsageError(str(error)) from None
    processes, devices = args.sync_bn_processes, torch.cuda.device_count()
    if args.optimizer_in_backward and (args.dtype == "fp16" or processes):
        raise common.UsageError(
            "--optimizer-in-backward steps each parameter as its gradient is accumulated: not with --dtype fp16 (the "
            "GradScaler checks every gradient first) nor --sync-bn-processes (DDP averages gradients after that)"
        )
    if processes and (args.sweep or args.repeats < 1 or (args.device.type == "cuda" and processes > devices)):
        why = f"--sync-bn-processes needs --repeats >= 1, no --sweep, and a device per process ({devices} here)"
        raise common.UsageError(why)
    options = {field.name: getattr(args, field.name) for field in fields(Setting)}
    base = Setting(**{**options, "input_size": configs[0][2]})
    cuda = base.device.type == "cuda"
    where = torch.cuda.get_device_name(base.device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    budgets = f"compile budgets {','.join(f'{b:g}' for b in args.compile_budget)}"
    flags = [("channels_last", args.channels_last), ("compiled peers", args.compile), (budgets, args.compile_budget)]
    flags += [("frozen BatchNorm (eval mode)", args.frozen_bn), ("features_only", args.features_only)]
    flags += [("optimizer step in backward", args.optimizer_in_backward), (f"norm={args.norm}", args.norm)]
    flags += [(f"act={args.act}", args.act)]
    what = args.family if args.sweep == "depth" else args.model
    batch = "" if args.sweep == "batch" else f", batch {base.batch_size}"
    flagged = "".join(f", {flag}" for flag, on in flags if on)
    head = f"{what}{batch}, {common.input_label(configs[0][1], base.input_size)}, {base.dtype}{flagged} on {where}"
    memory = (
        "torch.cuda.max_memory_allocated during one training step"
        if cuda
        else "two peaks of a training step: 'live tensors', tensor storage allocated during the step and still "
        "alive, counted in-process by a TorchDispatchMode (deterministic, the planner's accounting; not for compiled "
        "models, whose graphs bypass the mode); 'allocator', the running sum of the CPU allocator's events during "
        "another step (torch.profiler profile_memory), kernels' temporaries and compiled graphs included"
    )
    timing = f"median of {base.repeats} training steps (forward, cross-entropy, backward, SGD momentum step) after "
    timing += f"{base.warmup} warm-up step(s) and the memory steps, peers interleaved, order reversed every round; "
    timing = f"{timing}step spread: (max - min) / median" if base.repeats else "not measured (--repeats 0)"
    before = "above what was allocated before it (parameters, optimizer state, input batch)"
    summary = f"{head}, torch {torch.__version__}\nmemory: {memory}, {before}.\ntime: {timing}."
    if processes:
        synced = measure_sync_cost(configs[0][1], base, args.modes, processes)
        threads = "" if cuda else f" of {max(1, torch.get_num_threads() // processes)} thread(s)"
        summary = (
            f"{summary.splitlines()[0]}; {processes} processes{threads}, batch {base.batch_size} per process\ntime: "
            f"median of {base.repeats} DistributedDataParallel steps after {base.warmup} warm-up step(s), the slowest "
            "process's from a barrier; BatchNorm and SyncBatchNorm interleaved, order reversed each round."
        )
        header = ["mode", "step (s), BatchNorm", "step (s), SyncBatchNorm", "time x BatchNorm"]
        table = (
            [r["label"], f"{r['step_s']:.4f}", f"{r['sync_step_s']:.4f}", f"{r['sync_time_ratio']:.2f}"] for r in synced
        )
        print(f"{summary}\n\n{markdown(header, table)}")
        rows, warnings = synced, []
    else:
        peers = len(make_peers(args.model, args.modes, base))
        progress = common.Progress("bench", steps := len(configs) * peers * (args.warmup + 1 + args.repeats))
        what = f"{len(configs)} configuration(s) x {peers} peers, {steps} training steps"
        progress.note(f"{what}; the time left is estimated from the first ones")
        rows = []
        with contextlib.closing(progress):
            for extra, name, size in configs:
                setting = replace(base, input_size=size, batch_size=extra.get("batch_size", base.batch_size))
                fixed = dict(model=name, depth=None, batch_size=setting.batch_size, input_size=size)
                fixed.update(device=str(args.device), dtype=args.dtype, **extra)
                rows += [{**fixed, **row} for row in measure(name, setting, args.modes, progress)]
        others_load = max(start_load, os.getloadavg()[0] - torch.get_num_threads())  # beyond this run's threads
        warnings = timing_warnings(rows, others_load, os.cpu_count() or 1) if args.repeats else []
        for warning in warnings:
            print(f"densenet-efficient bench: warning: {warning}", file=sys.stderr)
        print(f"{summary}\n\n{format_table(rows, {'depth': 'depth', 'batch': 'batch_size'}.get(args.sweep))}")
        if counted := [row for row in rows if row.get("operator_ratio") is not None]:
            counts = ", ".join(f"{row['label']} {row['operators']} ({row['operator_ratio']:.2f})" for row in counted)
            print(f"\naten operators per training step (x naive): {counts}")
        if args.csv:
            with open(args.csv, "w", newline="") as file:
                fieldnames = dict.fromkeys(key for row in rows for key in row if key != "step_times")
                writer = csv.DictWriter(file, list(fieldnames), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        if path := args.plot or (args.sweep and f"bench-{args.sweep}.png"):
            if args.sweep:
                plot(path, rows, "depth" if args.sweep == "depth" else "batch_size", summary.splitlines()[0])
            else:
                pareto_figure(rows, summary.splitlines()[0], path)
            print(f"\nplot: {path}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"summary": summary, "warnings": warnings, "rows": rows}, file, indent=2)
    return 0
