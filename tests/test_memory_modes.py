"""Memory of the three modes, where it is deterministic: bytes saved for backward and live bytes on CPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.tools.memory import peak_memory, saved_tensor_bytes


def saved_bytes(model, inputs):
    with saved_tensor_bytes(exclude=tuple(model.parameters())) as saved:
        model(inputs)
    return saved.bytes


def training_step_peak(model, inputs, targets):
    with peak_memory(torch.device("cpu")) as stats:
        F.cross_entropy(model(inputs), targets).backward()
    return stats["peak"]


@pytest.mark.parametrize("mode", [True, "max"])
def test_saved_memory_grows_linearly_with_depth(mode):
    """Equal depth steps add equal saved bytes in the efficient modes; plain autograd grows quadratically."""
    inputs = torch.randn(2, 3, 32, 32)
    depths = (28, 52, 76)  # 4, 8, 12 bottleneck layers per block

    def statistics_bytes(model):
        """The per-channel batch mean and inverse std (float32) of every batch norm."""
        return sum(8 * m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def increments(efficient, without_statistics=False):
        models = [de.cifar_densenet(d, growth_rate=12, efficient=efficient) for d in depths]
        sizes = [saved_bytes(m, inputs) - (statistics_bytes(m) if without_statistics else 0) for m in models]
        return sizes[1] - sizes[0], sizes[2] - sizes[1]

    # Only the per-channel batch statistics (a few bytes per channel) grow faster than linearly: without them,
    # equal steps to the byte.
    first, second = increments(mode, without_statistics=True)
    assert first == second > 0
    naive_first, naive_second = increments(False)
    assert naive_second - naive_first > 0.2 * naive_first
    assert second < naive_second / 3


@pytest.mark.slow
def test_bc100_training_step_peak_fractions():
    """The issue's targets, on CPU live bytes: True <= 0.30 x naive, "max" <= 0.16 x naive (batch 8)."""
    torch.manual_seed(0)
    base = de.densenet_bc_100_k12(efficient=False)
    inputs, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    peaks = {
        mode: training_step_peak(copy.deepcopy(base).set_efficient(mode), inputs, targets)
        for mode in (False, True, "max")
    }
    assert peaks[True] <= 0.30 * peaks[False]
    assert peaks["max"] <= 0.16 * peaks[False]
    assert peaks["max"] < peaks[True]


def test_inference_costs_the_same_in_every_mode():
    """Under no_grad, or in eval mode with nothing requiring gradients, every mode runs the plain modules."""
    inputs = torch.randn(2, 3, 32, 32)
    peaks = []
    for mode in (False, True, "max"):
        model = de.cifar_densenet(40, growth_rate=12, efficient=mode)
        with peak_memory(torch.device("cpu")) as no_grad_stats, torch.no_grad():
            model(inputs)
        model.eval().requires_grad_(False)
        with peak_memory(torch.device("cpu")) as eval_stats:
            model(inputs)
        peaks.append((no_grad_stats["peak"], eval_stats["peak"]))
    assert peaks[0] == peaks[1] == peaks[2]


def test_frozen_batch_norm_saves_memory():
    """model.eval() with gradients (frozen BN, input gradients): the efficient modes keep what they keep in training."""
    inputs = torch.randn(2, 3, 32, 32).requires_grad_()
    model = de.cifar_densenet(40, growth_rate=12, efficient=False).eval()
    saved = {mode: saved_bytes(model.set_efficient(mode), inputs) for mode in (False, True, "max")}
    train_saved = {mode: saved_bytes(model.train().set_efficient(mode), inputs) for mode in (True, "max")}
    model.eval()
    assert saved[True] < 0.5 * saved[False]
    assert saved["max"] < 0.7 * saved[True]
    # Eval mode keeps the running statistics (parameters of the model, not new memory) instead of batch ones.
    for mode in (True, "max"):
        assert saved[mode] <= train_saved[mode]
