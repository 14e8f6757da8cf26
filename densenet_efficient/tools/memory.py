"""Measuring memory on any device (CPU has no allocator statistic): peak live tensor bytes, the CPU allocator's
peak, bytes saved for backward, and the live tensor bytes of a step on fake tensors, larger than any device."""

from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from dataclasses import dataclass
from itertools import accumulate
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Context manager: ``current`` and ``peak`` bytes of tensor storage an operator returned inside it (counted
    once, at that size) and still alive; it misses temporaries inside CPU kernels and compiled graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._known: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.current -= nbytes

    def _track(self, tensors: Any, allocated_here: bool) -> None:
        for tensor in tree_leaves(tensors):
            if isinstance(tensor, Tensor) and id(storage := tensor.untyped_storage()) not in self._known:
                nbytes = storage.nbytes() if allocated_here else 0
                self._known.add(id(storage))
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._release, id(storage), nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._track((args, kwargs), allocated_here=False)
        out = func(*args, **(kwargs or {}))
        self._track(out, allocated_here=True)
        return out


class OperatorCount(TorchDispatchMode):
    """Context manager: ``by_name``, the count of each aten operator dispatched inside it (views and in-place ones
    included), and their ``total``: deterministic, the kernels a launch-bound device would run."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.by_name.total()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operator_count(step: Callable[[], object]) -> int:
    """Aten operators ``step()`` dispatches (:class:`OperatorCount`)."""
    with OperatorCount() as counter:
        step()
    return counter.total


@contextmanager
def AllocatorPeak() -> Iterator[Any]:
    """Context manager whose value's ``peak`` is the bytes the CPU allocator holds inside it above what it held on
    entry, the largest running sum of ``torch.profiler``'s memory events (``events`` of them): kernels' temporaries
    and compiled graphs included, which :class:`LiveTensorBytes` does not see. What native code writes to file
    descriptor 2 inside is discarded (the profiler logs its start, stop and every freed block allocated before);
    Python's ``sys.stderr`` still reaches the terminal."""
    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    counter, saved, on_fd_2 = SimpleNamespace(peak=0, events=0), os.dup(2), False
    with suppress(AttributeError, OSError, ValueError):  # replaced by a capture (pytest) or an in-memory stream
        on_fd_2 = sys.stderr.fileno() == 2
    try:
        with open(saved, "w", closefd=False, errors="backslashreplace") as python:
            with redirect_stderr(python if on_fd_2 else sys.stderr), open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
                    yield counter
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert profiled.profiler is not None and profiled.profiler.kineto_results is not None
    events: list[Any] = profiled.profiler.kineto_results.events()  # stubs lack _KinetoEvent.nbytes
    cpu = torch.autograd.DeviceType.CPU
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu)
    counter.peak, counter.events = max(accumulate([0] + [nbytes for _, nbytes in changes])), len(changes)


def allocator_peak(step: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator holds during ``step()`` above what it held before (:class:`AllocatorPeak`)."""
    with AllocatorPeak() as counter:
        step()
    return counter.peak


@contextmanager
def saved_tensor_bytes(exclude: tuple[Tensor, ...] = ()) -> Iterator[Any]:
    """Context manager whose value's ``bytes`` counts the distinct storage bytes autograd saves for backward
    inside it, not counting the storage of ``exclude`` (e.g. parameters)."""
    seen, kept, saved = {id(t.untyped_storage()) for t in exclude}, [], SimpleNamespace(bytes=0)

    def pack(tensor: Tensor) -> Tensor:
        if id(storage := tensor.untyped_storage()) not in seen:
            seen.add(id(storage))
            kept.append(storage)  # alive while counting, so that no id is reused
            saved.bytes += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
    kept.clear()


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """The peak bytes allocated inside the block on ``device``, in ``stats["peak"]``: on CUDA
    ``max_memory_allocated`` above what was allocated on entry, elsewhere :class:`LiveTensorBytes`."""
    stats = {"peak": 0}
    if device.type != "cuda":
        with LiveTensorBytes() as counter:
            yield stats
        stats["peak"] = counter.peak
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield stats
    torch.cuda.synchronize(device)
    stats["peak"] = torch.cuda.max_memory_allocated(device) - start


@dataclass(frozen=True)
class Footprint:
    """Bytes of a module's parameters and buffers, and the peak extra bytes of one call of a step on it."""

    parameters: int
    buffers: int
    peak: int

    def total(self, optimizer_copies: int = 1) -> int:
        """Bytes training needs: parameters, ``optimizer_copies`` of them, buffers and a step's peak."""
        return self.parameters * (1 + optimizer_copies) + self.buffers + self.peak


def fake_footprint(setup: Callable[[], tuple[nn.Module, Any]], step: Callable[[nn.Module, Any], object]) -> Footprint:
    """:class:`Footprint` of ``step(*setup())`` measured on fake tensors: nothing is allocated. What ``setup()``
    creates (the module, its input) is not counted in the peak; the module must be created inside it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def storage_bytes(tensors: Iterator[Tensor]) -> int:
        return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())

    with FakeTensorMode():
        module, data = setup()
        with LiveTensorBytes() as counter:
            step(module, data)
    return Footprint(storage_bytes(module.parameters()), storage_bytes(module.buffers()), counter.peak)
