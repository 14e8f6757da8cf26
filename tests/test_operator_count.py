"""Aten operators per training step (a deterministic count, what a launch-bound GPU step pays per kernel)."""

from functools import partial

import pytest
import torch

from densenet_efficient import create_model
from densenet_efficient.tools.common import train_step
from densenet_efficient.tools.memory import OperatorCount, operator_count

# Achieved ratios to efficient=False's count; issue 25's targets (1.3 x for True, 1.5 x for "max") need fewer
# runs of pieces or a batch-norm backward per run, each of which holds more transients (docs/memory.md). Before
# issue 25: densenet121 3.06 / 3.65, DenseNet-BC-100 2.87 / 3.45.
RATIO_LIMITS = {
    ("densenet121_efficient", 64): {True: 1.76, "max": 1.92},
    ("densenet_bc_100_k12", 32): {True: 1.64, "max": 1.81},
}


def test_operator_count_counts_every_dispatched_operator_by_name():
    x = torch.ones(3)
    with OperatorCount() as counter:
        y = (x + 1).relu_()
        y.view(3, 1).sum()
    assert counter.total == 4
    assert counter.by_name == {"aten.add": 1, "aten.relu_": 1, "aten.view": 1, "aten.sum": 1}
    assert operator_count(lambda: x * 2) == 1


@pytest.mark.parametrize(("name", "size"), list(RATIO_LIMITS))
def test_efficient_modes_dispatch_at_most_the_pinned_multiple_of_naive(name, size):
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, size, size), torch.tensor([1, 3])
    counts = {}
    for mode in (False, True, "max"):
        step = partial(train_step, create_model(name, efficient=mode), images, labels, None)
        step()  # the first step may take one-time paths
        counts[mode] = operator_count(step)
    assert operator_count(step) == counts["max"]  # deterministic
    for mode, limit in RATIO_LIMITS[(name, size)].items():
        assert counts[mode] / counts[False] <= limit, (mode, counts)
