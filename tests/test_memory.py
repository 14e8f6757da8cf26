"""The CPU memory counter that bench and plan rest on: live tensor bytes, saved-for-backward bytes, fake-tensor
footprints."""

import subprocess
import sys

import torch

import densenet_efficient as de
from densenet_efficient.tools import common
from densenet_efficient.tools.memory import (
    AllocatorPeak,
    LiveTensorBytes,
    allocator_peak,
    fake_footprint,
    saved_tensor_bytes,
)

# ----------------------------------------------------------------------------------------------- the counter


def test_counter_counts_a_single_allocation_and_its_release():
    with LiveTensorBytes() as counter:
        tensor = torch.empty(1000, dtype=torch.float32)
        assert (counter.current, counter.peak) == (4000, 4000)
        del tensor
        assert (counter.current, counter.peak) == (0, 4000)


def test_allocator_peak_sees_a_known_allocation_above_what_existed_before():
    existing = torch.zeros(1000)
    with AllocatorPeak() as counter:
        existing.add_(1)
        tensor = torch.empty(2**20, dtype=torch.uint8)
        del tensor
        kept = torch.empty(1000, dtype=torch.float64)
    assert counter.peak == 2**20 and counter.events >= 3
    assert allocator_peak(lambda: torch.empty(12345, dtype=torch.uint8)) == 12345
    del kept


def test_allocator_peak_keeps_the_profilers_native_log_off_stderr():
    # kineto writes "profiler_start"/"profiler_stop" (and, without a GPU, a device-count error) to fd 2, and the
    # allocator a warning for each block freed inside that was allocated before; Python's stderr still shows.
    script = (
        "import sys, torch\n"
        "from densenet_efficient.tools.memory import AllocatorPeak\n"
        "x = torch.empty(10**6)\n"
        "with AllocatorPeak() as counter:\n"
        "    del x  # allocated before the profiler started: a native warning\n"
        "    print('inside', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "inside\nafter\n"


def test_allocator_peak_sees_kernel_temporaries_the_dispatch_counter_misses():
    # The CPU convolution backward copies its input inside the kernel: no operator returns that copy.
    x = torch.randn(8, 64, 32, 32, requires_grad=True)
    weight = torch.randn(32, 64, 1, 1, requires_grad=True)

    def step():
        torch.nn.functional.conv2d(x, weight).sum().backward()

    step()
    with LiveTensorBytes() as tensors:
        step()
    # At least one grad_output-sized buffer (8x32x32x32 fp32, 1 MiB) that no operator returns; with more threads,
    # the kernel also copies the input (2 MiB more).
    assert allocator_peak(step) - tensors.peak >= 2**20


def test_counter_ignores_tensors_allocated_before_it():
    existing = torch.zeros(1000)
    with LiveTensorBytes() as counter:
        existing.add_(1)
        view = existing[:10]
        view.mul_(2)
    assert counter.peak == 0


def test_counter_on_a_linear_layer_forward():
    layer = torch.nn.Linear(100, 50)
    x = torch.randn(32, 100)
    with LiveTensorBytes() as counter:
        out = torch.relu(layer(x))
    # linear's output and relu's output are alive together, then only relu's output
    assert (counter.peak, counter.current) == (2 * out.nbytes, out.nbytes)


def test_saved_activations_of_a_linear_layer():
    layer = torch.nn.Linear(100, 50)
    x = torch.randn(32, 100)
    with saved_tensor_bytes(exclude=tuple(layer.parameters())) as saved:
        out = torch.relu(layer(x))
    # addmm saves its input (the weight is excluded), relu saves its output
    assert saved.bytes == x.nbytes + out.nbytes


def test_fake_footprint_equals_the_real_count():
    def setup():
        model = de.create_model("densenet_bc_10_k12", efficient=True)
        return model, common.random_batch(4, 16, 3, 10)

    def step(model, batch):
        common.train_step(model, *batch, None)

    model, batch = setup()
    with LiveTensorBytes() as counter:
        step(model, batch)
    predicted = fake_footprint(setup, step)
    assert predicted.peak == counter.peak > 0
    assert predicted.parameters == sum(p.nbytes for p in model.parameters())
    assert predicted.buffers == sum(b.nbytes for b in model.buffers())
