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


def _model(mode=True):
    torch.manual_seed(0)
    return de.create_model("densenet_40_k12", efficient=mode, num_classes=10, block_config=(2, 2, 2))


@pytest.mark.parametrize("mode", [False, "max"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weights_after_three_steps_are_those_of_the_ordinary_step(name, mode):
    ordinary = _model(mode)
    fused = copy.deepcopy(ordinary)
    initial = copy.deepcopy(ordinary.state_dict())
    optimizer = OPTIMIZERS[name](list(ordinary.parameters()))
    handle = de.optim_in_backward(fused, OPTIMIZERS[name])
    # A scheduler on each: the hooks step with the group's current learning rate.
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (optimizer, handle.optimizer)]
    for images, labels in _batches():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ordinary(images), labels).backward()
        optimizer.step()
        F.cross_entropy(fused(images), labels).backward()
        for scheduler in schedulers:
            scheduler.step()
    state, fused_state = ordinary.state_dict(), fused.state_dict()
    for key, value in state.items():
        assert torch.equal(fused_state[key], value), key  # parameters and BatchNorm buffers, bitwise
    assert not torch.equal(state["classifier.weight"], initial["classifier.weight"])  # it did train
    assert all(p.grad is None for p in fused.parameters())  # freed as soon as applied
    # The optimizer's state is the ordinary one (a checkpoint of it resumes either way).
    expected, actual = optimizer.state_dict(), handle.optimizer.state_dict()
    assert expected["param_groups"] == actual["param_groups"]
    for index, entry in expected["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(actual["state"][index][key]), torch.as_tensor(value)), (index, key)
    handle.remove()
    before = [p.detach().clone() for p in fused.parameters()]
    images, labels = _batches(1)[0]
    F.cross_entropy(fused(images), labels).backward()
    assert all(torch.equal(p, b) for p, b in zip(fused.parameters(), before, strict=True))  # hooks removed


def test_state_loaded_into_the_optimizer_is_used_by_the_hooks():
    ordinary, fused = _model(), _model()
    optimizer = OPTIMIZERS["sgd"](list(ordinary.parameters()))
    images, labels = _batches(1)[0]
    F.cross_entropy(ordinary(images), labels).backward()
    optimizer.step()
    fused.load_state_dict(ordinary.state_dict())
    handle = de.optim_in_backward(fused, OPTIMIZERS["sgd"])
    handle.optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # a resumed run (a copy: no shared buffers)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(ordinary(images), labels).backward()
    optimizer.step()
    F.cross_entropy(fused(images), labels).backward()
    assert all(torch.equal(a, b) for a, b in zip(fused.parameters(), ordinary.parameters(), strict=True))


def test_gradients_are_freed_during_backward_so_the_peak_is_lower():
    model = _model("max")
    fused = copy.deepcopy(model)
    de.optim_in_backward(fused, lambda params: torch.optim.SGD(params, lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = _batches(1)[0]
    peaks = []
    for net in (model, fused):
        with LiveTensorBytes() as counter:
            F.cross_entropy(net(images), labels).backward()
            if net is model:
                optimizer.step()
        peaks.append(counter.peak)
    gradient_bytes = sum(p.nbytes for p in model.parameters())
    assert peaks[1] < peaks[0] - gradient_bytes / 2


def test_refuses_what_cannot_be_exact():
    model = _model()
    images, labels = _batches(1)[0]
    F.cross_entropy(model(images), labels).backward()
    with pytest.raises(ValueError, match="already hold a gradient.*accumulation"):
        de.optim_in_backward(model, OPTIMIZERS["sgd"])
    model.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        de.optim_in_backward(model, lambda params: params)
    handle = de.optim_in_backward(model, OPTIMIZERS["adamw"])
    # A loop written for an ordinary optimizer (clipping, a GradScaler, accumulation) fails instead of reading
    # gradients that no longer exist.
    for call in (handle.step, handle.zero_grad):
        with pytest.raises(RuntimeError, match="steps inside backward.*clipping by the global norm"):
            call()


def test_refuses_distributed_data_parallel():
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group: only the type matters
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ValueError, match="DistributedDataParallel.*all-reduce"):
        de.optim_in_backward(FakeDDP(torch.nn.Linear(2, 2)), OPTIMIZERS["sgd"])
