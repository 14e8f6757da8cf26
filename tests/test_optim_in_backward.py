"""The optimizer step inside backward (densenet_efficient.optim_in_backward): exact, and refused where it cannot be."""

import copy

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.tools.memory import LiveTensorBytes

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
}


def _batches(steps=3):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([0, 3, 5, 9])) for _ in range(steps)]


@pytest.mark.parametrize("mode", [False, "max"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weights_after_three_steps_are_those_of_the_ordinary_step(name, mode):
    torch.manual_seed(0)
    ordinary = de.create_model("densenet_40_k12", efficient=mode, num_classes=10)
    fused = copy.deepcopy(ordinary)
    initial = copy.deepcopy(ordinary.state_dict())
    optimizer = OPTIMIZERS[name](list(ordinary.parameters()))
    handle = de.optim_in_backward(fused, OPTIMIZERS[name])
    for images, labels in _batches():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ordinary(images), labels).backward()
        optimizer.step()
        F.cross_entropy(fused(images), labels).backward()
    state, fused_state = ordinary.state_dict(), fused.state_dict()
    for key, value in state.items():
        assert torch.equal(fused_state[key], value), key  # parameters and BatchNorm buffers, bitwise
    assert not torch.equal(state["classifier.weight"], initial["classifier.weight"])  # it did train
    assert all(p.grad is None for p in fused.parameters())  # freed as soon as applied
    assert len(handle.optimizers) == len(list(fused.parameters()))
    handle.remove()
    before = [p.detach().clone() for p in fused.parameters()]
    F.cross_entropy(fused(_batches(1)[0][0]), _batches(1)[0][1]).backward()
    assert all(torch.equal(p, b) for p, b in zip(fused.parameters(), before, strict=True))  # hooks removed


def test_gradients_are_freed_during_backward_so_the_peak_is_lower():
    torch.manual_seed(0)
    model = de.create_model("densenet_40_k12", efficient="max", num_classes=10)
    fused = copy.deepcopy(model)
    images, labels = _batches(1)[0]
    peaks = []
    for net, optimizer in ((model, torch.optim.SGD(model.parameters(), lr=0.1)), (fused, None)):
        if optimizer is None:
            de.optim_in_backward(net, lambda params: torch.optim.SGD(params, lr=0.1))
        with LiveTensorBytes() as counter:
            F.cross_entropy(net(images), labels).backward()
            if optimizer is not None:
                optimizer.step()
        peaks.append(counter.peak)
    gradient_bytes = sum(p.nbytes for p in model.parameters())
    assert peaks[1] < peaks[0] - gradient_bytes / 2


def test_refuses_what_cannot_be_exact():
    model = de.create_model("densenet_40_k12", num_classes=10)
    F.cross_entropy(model(_batches(1)[0][0]), _batches(1)[0][1]).backward()
    with pytest.raises(ValueError, match="already hold a gradient.*accumulation"):
        de.optim_in_backward(model, OPTIMIZERS["sgd"])
    model.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        de.optim_in_backward(model, lambda params: params)
    handle = de.optim_in_backward(model, OPTIMIZERS["adamw"])
    # A loop written for an ordinary optimizer (clipping, a GradScaler, accumulation) fails instead of reading
    # gradients that no longer exist; a scheduler needs one of the per-parameter optimizers.
    for call in (handle.step, handle.zero_grad):
        with pytest.raises(RuntimeError, match="steps inside backward.*clipping by the global norm"):
            call()
    with pytest.raises(TypeError):
        torch.optim.lr_scheduler.StepLR(handle, 1)  # type: ignore[arg-type]
    assert len(handle.param_groups) == len(handle.optimizers) and all(g["lr"] == 1e-2 for g in handle.param_groups)


def test_refuses_distributed_data_parallel(monkeypatch):
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group: only the type matters
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ValueError, match="DistributedDataParallel.*all-reduce"):
        de.optim_in_backward(FakeDDP(torch.nn.Linear(2, 2)), OPTIMIZERS["sgd"])


def test_state_round_trips():
    model = de.create_model("densenet_40_k12", num_classes=10)
    handle = de.optim_in_backward(model, OPTIMIZERS["adamw"])
    F.cross_entropy(model(_batches(1)[0][0]), _batches(1)[0][1]).backward()
    states = handle.state_dict()
    other = de.optim_in_backward(copy.deepcopy(model), OPTIMIZERS["adamw"])
    other.load_state_dict(states)
    assert all(o.state_dict()["state"][0]["step"] == 1 for o in other)
    with pytest.raises(ValueError, match="1 optimizer states for"):
        other.load_state_dict(states[:1])
