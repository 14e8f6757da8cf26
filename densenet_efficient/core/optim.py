"""The optimizer step inside backward (PyTorch's "optimizer step in backward" tutorial): each parameter updated,
and its gradient freed, as soon as the gradient is accumulated (``Tensor.register_post_accumulate_grad_hook``).

It computes what ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` computes with an optimizer that
steps each parameter from its own gradient and state (SGD, Adam, AdamW, ...), and refuses what needs every gradient
at once or several backward passes per step (clipping, a GradScaler, accumulation, DistributedDataParallel).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn


class OptimizerInBackward:
    """The hooks of :func:`optim_in_backward`: each steps its parameter with a one-parameter optimizer sharing
    ``optimizer``'s state and hyperparameters (so lr schedulers, ``state_dict`` and ``load_state_dict`` work)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._handles = []
        for index, group in enumerate(optimizer.param_groups):
            for parameter in group["params"]:
                if parameter.requires_grad:
                    # torch.optim's optimizers take (params, **hyperparameters): the group's, its own group
                    one = type(optimizer)([{**group, "params": [parameter]}])  # type: ignore[call-arg]
                    self._handles.append(parameter.register_post_accumulate_grad_hook(partial(self._step, one, index)))

    def _step(self, one: torch.optim.Optimizer, index: int, parameter: torch.Tensor) -> None:
        # The group's hyperparameters and state now: schedulers change the former, load_state_dict replaces both
        group = self.optimizer.param_groups[index]
        one.param_groups[0].update({key: value for key, value in group.items() if key != "params"})
        one.state = self.optimizer.state
        one.step()
        parameter.grad = None
        self.optimizer._opt_called = True  # type: ignore[attr-defined]  # a step happened (lr schedulers check)

    def step(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "the optimizer steps inside backward (optim_in_backward): loss.backward() already updated every "
            "parameter and freed its gradient, so there is nothing to step, and nothing that reads gradients after "
            "backward (clipping by the global norm, a GradScaler, gradient accumulation) can run; use an ordinary "
            "optimizer for those"
        )

    zero_grad = step

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def optim_in_backward(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> OptimizerInBackward:
    """Step every trained parameter of ``model`` inside backward with ``optimizer`` (over the model's parameters,
    or a factory of them, e.g. ``lambda params: torch.optim.AdamW(params, lr=1e-3)``): a training step is then
    ``loss.backward()``. Raises ``ValueError`` for DistributedDataParallel and for parameters already holding a
    gradient (it would be applied, and stepped again, in the next backward)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "optim_in_backward cannot wrap DistributedDataParallel: its bucketed all-reduce averages gradients "
            "after the hooks that would step them; train one process, or use an ordinary optimizer step"
        )
    if holding := [name for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]:
        raise ValueError(
            f"{len(holding)} parameters already hold a gradient (first: {holding[0]}): gradient accumulation over "
            "several backward passes cannot step inside backward; call model.zero_grad(set_to_none=True) first"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer: pass a "
                "callable such as lambda params: torch.optim.AdamW(params, lr=1e-3)"
            )
    return OptimizerInBackward(optimizer)
