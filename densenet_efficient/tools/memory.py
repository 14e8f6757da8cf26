"""Measuring memory on any device: peak live tensor bytes, and bytes saved for backward.

On CUDA, ``torch.cuda.max_memory_allocated`` answers; on CPU there is no allocator statistic, so
:class:`LiveTensorBytes` counts, through a ``TorchDispatchMode``, the storage of every tensor an operator creates
while it is active, until that storage is freed. Tensors that existed before (parameters, inputs) are not
counted, so the peak is the extra memory the measured code needs. It does not see temporaries allocated inside
CPU kernels, nor what a compiled graph allocates (compiled code does not dispatch through the mode):
:class:`AllocatorPeak` does, from the profiler's allocator events, which is what a process needs.

:func:`fake_footprint` predicts the same count without allocating anything: it runs the code on fake tensors,
which carry shapes and dtypes but no data, so a step that needs more memory than any device has is measured on
any machine.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Context manager: ``current`` and ``peak`` bytes of tensor storage allocated inside it and still alive.

    Storage is counted once, when an operator first returns it; storages first seen as an operator's input
    were allocated before and are never counted. The count follows the storage's size when it is created.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._known: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs, _ = tree_flatten((args, kwargs or {}))
        for tensor in inputs:
            if isinstance(tensor, Tensor):
                self._track(tensor, allocated_here=False)
        out = func(*args, **(kwargs or {}))
        outputs, _ = tree_flatten(out)
        for tensor in outputs:
            if isinstance(tensor, Tensor):
                self._track(tensor, allocated_here=True)
        return out

    def _track(self, tensor: Tensor, allocated_here: bool) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._known:
            return
        nbytes = storage.nbytes() if allocated_here else 0
        self._known.add(key)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)


class OperatorCount(TorchDispatchMode):
    """Context manager: ``total`` aten operators dispatched inside it (views and in-place ones included), and
    ``by_name``, the count of each. Deterministic for a given model, input shape and dtype: it is the number of
    kernels a launch-bound device would run, whatever the machine."""

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
def _native_stderr_silenced() -> Iterator[None]:
    """Discard what native code writes to file descriptor 2 inside: the profiler's C++ libraries log there (its
    start and stop, "Memory block of unknown size was allocated before the profiling started" for every block
    freed inside that was allocated before, and, without a GPU, a failed device count). Python's own ``stderr``
    (warnings, tracebacks) still reaches the terminal; exceptions are raised as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        on_fd_2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a capture (pytest) or an in-memory stream
        on_fd_2 = False
    replacement = open(saved, "w", closefd=False, errors="backslashreplace") if on_fd_2 else None
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        if replacement is not None:
            sys.stderr = replacement
        yield
    finally:
        if replacement is not None:
            replacement.flush()
            sys.stderr = python_stderr
            replacement.close()
        os.dup2(saved, 2)
        os.close(saved)


class AllocatorPeak:
    """Context manager: ``peak`` bytes the CPU allocator holds inside it above what it held on entry.

    Every allocation and free of the block is an event of ``torch.profiler.profile(profile_memory=True)``; the
    peak is the largest running sum of them, in time order. Unlike :class:`LiveTensorBytes` it sees what a
    dispatch mode does not: temporaries allocated inside CPU kernels, and everything a compiled graph allocates.
    ``events`` is the number of allocator events seen.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.events = 0

    def __enter__(self) -> AllocatorPeak:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._silenced = _native_stderr_silenced()
        self._silenced.__enter__()
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._profile.__exit__(*exc)
        finally:
            self._silenced.__exit__(None, None, None)
        profiler = self._profile.profiler
        assert profiler is not None and profiler.kineto_results is not None
        # Allocations count positive bytes, frees negative. (torch's stubs lack _KinetoEvent.nbytes.)
        events: list[Any] = profiler.kineto_results.events()
        changes = sorted(
            (event.start_ns(), event.nbytes())
            for event in events
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        )
        current = 0
        for _, nbytes in changes:
            current += nbytes
            self.peak = max(self.peak, current)
        self.events = len(changes)


def saved_tensor_bytes(exclude: tuple[Tensor, ...] = ()) -> _SavedBytes:
    """Context manager counting the distinct storage bytes autograd saves for backward inside it.

    ``exclude``: tensors (e.g. parameters) whose storage is not counted.
    """
    return _SavedBytes(exclude)


class _SavedBytes:
    def __init__(self, exclude: tuple[Tensor, ...]):
        self.bytes = 0
        self._seen = {id(t.untyped_storage()) for t in exclude}
        self._keep: list[torch.UntypedStorage] = []

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in self._seen:
            self._seen.add(id(storage))
            self._keep.append(storage)  # keeps ids unique while counting
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> _SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._keep.clear()


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Measure the peak bytes allocated inside the block on ``device``; the result lands in ``stats["peak"]``.

    CUDA: ``max_memory_allocated`` above what was allocated on entry. Other devices: :class:`LiveTensorBytes`.
    """
    stats = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield stats
        torch.cuda.synchronize(device)
        stats["peak"] = torch.cuda.max_memory_allocated(device) - start
    else:
        with LiveTensorBytes() as counter:
            yield stats
        stats["peak"] = counter.peak


def allocator_peak(step: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator holds during ``step()`` above what it held before (:class:`AllocatorPeak`)."""
    with AllocatorPeak() as counter:
        step()
    return counter.peak


@dataclass(frozen=True)
class Footprint:
    """Bytes of a module's parameters and buffers, and the peak extra bytes of one call of a step on it."""

    parameters: int
    buffers: int
    peak: int


def _storage_bytes(tensors: Iterator[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def fake_footprint(setup: Callable[[], tuple[nn.Module, Any]], step: Callable[[nn.Module, Any], object]) -> Footprint:
    """Measure ``step(module, data)`` with :class:`LiveTensorBytes` on fake tensors: no memory is allocated.

    ``setup()`` returns ``(module, data)``; it runs on fake tensors too, and what it allocates (parameters,
    buffers, the input batch) is not counted in the peak, as with :class:`LiveTensorBytes` on real tensors.
    The module's tensors must be created inside ``setup`` (fake tensors cannot mix with real ones).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        module, data = setup()
        with LiveTensorBytes() as counter:
            step(module, data)
    return Footprint(_storage_bytes(module.parameters()), _storage_bytes(module.buffers()), counter.peak)
