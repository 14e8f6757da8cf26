"""``densenet-efficient plan``: the largest batch, largest input and deepest network that train within a budget.

One training step runs on fake tensors (no device needed), its live tensor bytes counted as ``bench`` counts them on
CPU; the total is parameters, ``--optimizer-copies`` of them, buffers and the step's peak (on CUDA, cuDNN workspaces
and the caching allocator come on top). Fake steps settle every answer at its boundary (docs/memory.md)."""

from __future__ import annotations

import argparse
import bisect
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import MemoryMode
from ..models import create_model
from . import common
from .bench import Setting, markdown, measure
from .memory import Footprint

_UNITS = {"b": 1, **{u + s: base ** (i + 1) for i, u in enumerate("kmgt") for s, base in (("b", 1000), ("ib", 1024))}}
FIT_LAYERS = (16, 20, 24)
CHECK_LAYERS = 28
MAX_LAYERS = 2**20  # the search for the deepest network stops here
MAX_SIDE = 2**16  # and the search for the largest input here
Build = Callable[[], nn.Module]  # a model's constructor, e.g. partial(create_model, name, efficient=mode)


def parse_memory(value: str) -> int:
    """Bytes in a memory size such as ``16GiB``, ``24GB`` or ``512 MiB`` (GB = 10^9 bytes, GiB = 2^30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]+)\s*", value)
    if not match or match[2].lower() not in _UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid memory size {value!r}: give a positive number and a unit, e.g. 16GiB, 24GB or 512MiB "
            "(units: B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024)"
        )
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


@dataclass(frozen=True)
class Question:
    """What the totals depend on besides the model; ``progress`` gets a line per fake step."""

    batch_size: int
    input_size: int
    dtype: str = "fp32"
    optimizer_copies: int = 1
    progress: common.Progress | None = field(default=None, compare=False, repr=False)

    def footprint(self, build: Build, batch_size: int | None = None, what: str = "") -> Footprint:
        batch_size = batch_size or self.batch_size
        footprint = common.predict(build, batch_size, self.input_size, self.dtype)
        if self.progress is not None:
            self.progress.update()
            self.progress.note(
                f"fake step {self.progress.done}: {what}batch {batch_size}, side {self.input_size}: total "
                f"{_gib(footprint.total(self.optimizer_copies))}"
            )
        return footprint

    def total(self, build: Build, batch_size: int | None = None) -> int:
        return self.footprint(build, batch_size).total(self.optimizer_copies)


def largest_batch(build: Build, budget: int, question: Question) -> int:
    """The largest batch whose training total fits in ``budget`` bytes (0: none), from the line through 8 and 16."""
    at_8, at_16 = question.total(build, 8), question.total(build, 16)
    per_image = max((at_16 - at_8) / 8, 1.0)
    batch = int((budget - (at_8 - 8 * per_image)) // per_image)
    while batch >= 1 and (total := question.total(build, batch)) > budget:
        batch -= max(1, int((total - budget) // per_image))
    return max(batch, 0)


def largest_input(build: Build, budget: int, question: Question, smallest: int) -> tuple[int, int | None]:
    """The largest input side (at least ``smallest``) whose training total at the question's batch size fits in
    ``budget`` bytes, and that total (``(0, None)``: none), bracketed by doubling, then bisected."""
    total = cache(lambda side: replace(question, input_size=side).total(build))
    high = max(smallest, question.input_size)
    while high < MAX_SIDE and total(high) <= budget:
        high *= 2
    side = _last_true(lambda n: total(n) <= budget, smallest - 1, min(high, MAX_SIDE))
    return (side, total(side)) if side >= smallest else (0, None)


@dataclass(frozen=True)
class Deepest:
    """The deepest member of a family that fits: its depth, layers per block, predicted total and parameter
    bytes, and the relative error of the quadratic fit at ``CHECK_LAYERS`` (``None``: found by direct search)."""

    depth: int
    layers_per_block: int
    total_bytes: int
    parameter_bytes: int
    fit_error: float | None


def _last_true(predicate: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in [low, high] with ``predicate(n)``, for a predicate true up to some n then false."""
    return low + bisect.bisect_left(range(low + 1, high + 1), True, key=lambda n: not predicate(n))


def deepest(family: str, mode: MemoryMode, budget: int, question: Question) -> Deepest | None:
    """The deepest member of CIFAR ``family`` whose training total at ``question`` fits in ``budget`` bytes: the
    quadratic in layers per block through :data:`FIT_LAYERS`, checked at :data:`CHECK_LAYERS` (below it, searched)."""
    footprints: dict[int, Footprint] = {}
    per_layer = 6 if family.startswith("densenet_bc_") else 3  # depth = 3 dense blocks of layers (BC: 2 convs) + 4

    def total(layers: int) -> int:
        if layers not in footprints:
            depth = per_layer * layers + 4
            build = partial(create_model, common.family_member(family, depth), efficient=mode)
            footprints[layers] = question.footprint(build, what=f"depth {depth}, ")
        return footprints[layers].total(question.optimizer_copies)

    def found(layers: int, fit_error: float | None) -> Deepest:
        return Deepest(per_layer * layers + 4, layers, total(layers), footprints[layers].parameters, fit_error)

    check = total(CHECK_LAYERS)
    if check > budget:
        layers = _last_true(lambda n: total(n) <= budget, 0, CHECK_LAYERS - 1)
        return found(layers, None) if layers else None
    curve = np.poly1d(np.polyfit(FIT_LAYERS, [total(n) for n in FIT_LAYERS], 2))  # through the three points
    high = CHECK_LAYERS
    while curve(high) <= budget and high < MAX_LAYERS:
        high *= 2
    layers = _last_true(lambda n: curve(n) <= budget, CHECK_LAYERS, high)
    # The fit is within about 1 % (where the step's peak lies can move with depth): fake steps settle it.
    while layers > CHECK_LAYERS and total(layers) > budget:
        layers -= 1
    while layers < MAX_LAYERS and total(layers + 1) <= budget:
        layers += 1
    return found(layers, abs(curve(CHECK_LAYERS) - check) / check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add, modes = parser.add_argument, tuple(common.MODES)
    add("--memory", type=parse_memory, required=True, help="budget, e.g. 16GiB or 24GB (GB = 10^9 bytes, GiB = 2^30)")
    common.add_common_arguments(parser)
    add("--family", type=common.family_name, help="also the deepest network of this CIFAR family at --batch-size")
    add("--largest-input", action="store_true", help="also the largest input side that trains at --batch-size")
    copies = "parameter-sized buffers the optimizer keeps: 0 SGD, 1 SGD momentum, 2 Adam (default: 1)"
    add("--optimizer-copies", type=common.int_at_least(0), default=1, help=copies)
    add("--measure", action="store_true", help="also a real step per mode on this CPU (bench's memory pass)")
    add("--modes", type=partial(common.peer_keys, valid=modes), default=modes, help=f"subset of {','.join(modes)}")


def run(args: argparse.Namespace) -> int:
    modes = {key: common.MODES[key] for key in args.modes}
    builds = {key: partial(create_model, args.model, efficient=mode) for key, mode in modes.items()}
    size = common.input_size(args.model, args.input_size)
    family_size = common.input_size(common.family_member(args.family or "densenet_bc_k12", 10), args.input_size)
    steps = len(modes) * (4 + 8 * args.largest_input + 8 * bool(args.family))  # about that many fake steps
    progress = common.Progress("plan", steps, unit="fake step")
    question = Question(args.batch_size, size, args.dtype, args.optimizer_copies, progress)
    print(
        f"{args.model}, {common.input_label(args.model, size)}, {args.dtype}: training within {_gib(args.memory)} "
        f"({args.memory / 1e9:.2f} GB)\nmodelled on fake tensors, no device needed: parameters "
        f"x{1 + args.optimizer_copies} (weights and optimizer state), buffers, and the peak of one training step "
        "as bench counts it on CPU; on CUDA, cuDNN workspaces and the caching allocator add to it.\n"
    )
    progress.note(f"about {steps} fake training steps (one per line here); the time left is estimated from the first")
    record = {key: value for key, value in vars(question).items() if key != "progress"}
    result: dict[str, Any] = {"memory_bytes": args.memory, **record, "model": args.model, "modes": []}
    table: list[list[object]] = []
    for key, mode in modes.items():
        at_batch, batch = question.total(builds[key]), largest_batch(builds[key], args.memory, question)
        result["modes"].append({"mode": key, "total_bytes": at_batch, "largest_batch": batch})
        table.append([f"efficient={mode!r}", _gib(at_batch), batch])
    print(markdown(["mode", f"memory at batch {args.batch_size}", "largest batch"], table))
    if args.measure:  # the predicted step peak and a real step's peaks on this CPU (bench's memory pass)
        setting = Setting(torch.device("cpu"), args.dtype, args.batch_size, size, repeats=0)
        result["measured"], table = measure(args.model, setting, tuple(modes)), []
        for row in result["measured"]:  # bench predicts until naive fits
            predicted = row["predicted_bytes"] = row["predicted_bytes"] or question.footprint(builds[row["mode"]]).peak
            mib = [f"{row[key] / 2**20:.1f} MiB" for key in ("predicted_bytes", "peak_bytes", "allocator_peak_bytes")]
            table.append([row["label"], *mib, f"{row['allocator_peak_bytes'] / predicted:.3f}"])
        print(f"\nChecked on this CPU, one training step at batch {args.batch_size} (peak above parameters and input):")
        header = ["mode", "predicted, live tensors", "measured, live tensors", "measured, allocator"]
        print(markdown([*header, "allocator x predicted"], table))
    if args.largest_input:
        with torch.device("meta"):
            smallest = create_model(args.model, efficient=False).min_input_size
        result["largest_input"], table = [], []
        for key, mode in modes.items():
            side, total = largest_input(builds[key], args.memory, question, smallest)
            result["largest_input"].append({"mode": key, "side": side, "total_bytes": total})
            naive = result["largest_input"][0]["side"] if next(iter(modes)) == "false" else None
            shape, memory = (common.input_label(args.model, side), _gib(total)) if total else ("none fits", "-")
            table.append([f"efficient={mode!r}", side, shape, memory, f"{side / naive:.2f}" if naive and side else "-"])
        print(f"\nLargest input of {args.model} at batch {args.batch_size}:")
        print(markdown(["mode", "side", "input", "memory", "side x naive"], table))
    if args.family:
        result["family"], result["deepest"], table = args.family, [], []
        family_question = replace(question, input_size=family_size)
        for key, mode in modes.items():
            found = deepest(args.family, mode, args.memory, family_question)
            result["deepest"].append({"mode": key, **(asdict(found) if found else {"depth": 0})})
            naive_depth = result["deepest"][0]["depth"] if next(iter(modes)) == "false" else 0
            if found is None:
                table.append([f"efficient={mode!r}", "none fits", *["-"] * 5])
                continue
            weights = _gib(found.parameter_bytes * (1 + args.optimizer_copies))
            table.append([f"efficient={mode!r}", found.depth, found.layers_per_block, _gib(found.total_bytes)])
            table[-1] += [f"{weights} weights+optimizer ({found.parameter_bytes / 4e6:.0f}M parameters)"]
            table[-1] += [f"{found.depth / naive_depth:.1f}" if naive_depth else "-"]
            table[-1] += [f"{found.fit_error:.2e}" if found.fit_error is not None else "exact (searched)"]
        print(f"\nDeepest {args.family} at batch {args.batch_size}, {family_size}x{family_size}:")
        header = ["mode", "depth", "layers per block", "memory", "of which parameters", "depth x naive"]
        print(markdown([*header, f"quadratic fit error at n={CHECK_LAYERS}"], table))
    progress.close()
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return 0
