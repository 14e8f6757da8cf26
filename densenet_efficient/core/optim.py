"""The optimizer step inside backward: each parameter updated, and its gradient freed, as soon as it is accumulated.

Once the activations are small (the efficient memory modes), the parameter gradients are a large part of a
training step's peak: stepping each parameter from ``Tensor.register_post_accumulate_grad_hook`` (the pattern of
PyTorch's "optimizer step in backward" tutorial, one optimizer per parameter) means that at most the gradients of
the parameters whose backward is running are alive at once.

It computes exactly what ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` computes with an optimizer
that steps each parameter from its own gradient and state alone (SGD, with momentum, Nesterov and weight decay;
Adam and AdamW; ...). It cannot reproduce what needs every gradient at once or several backward passes per step,
and refuses it where it can see it: clipping by the global norm, a gradient scaler (fp16), a scheduler or anything
else reading gradients after backward, gradient accumulation over micro-batches, and DistributedDataParallel
(whose bucketed all-reduce averages the gradients after they are accumulated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class OptimizerInBackward:
    """The per-parameter optimizers of :func:`optim_in_backward` and their hooks.

    ``optimizers`` maps each trained parameter to its optimizer; ``param_groups`` lists every optimizer's group (set
    a learning rate there, or give each optimizer its own ``torch.optim.lr_scheduler``). Training steps are
    ``loss.backward()`` alone: :meth:`step` and :meth:`zero_grad` refuse, saying why, so that a training loop
    written for an ordinary optimizer fails loudly instead of clipping or scaling gradients that no longer exist.
    :meth:`remove` detaches the hooks (the parameters keep their values, the optimizers their state).
    """

    def __init__(self, parameters: Sequence[nn.Parameter], optimizer: Callable[[list[nn.Parameter]], Any]):
        self.optimizers: dict[nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        for parameter in parameters:
            made = optimizer([parameter])
            if not isinstance(made, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer_factory returned {type(made).__name__}, not a torch.optim.Optimizer: pass a callable "
                    "such as lambda params: torch.optim.AdamW(params, lr=1e-3)"
                )
            self.optimizers[parameter] = made
            self._handles.append(parameter.register_post_accumulate_grad_hook(self._step))

    def _step(self, parameter: torch.Tensor) -> None:
        optimizer = self.optimizers[parameter]  # type: ignore[index]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers.values())

    def state_dict(self) -> list[dict[str, Any]]:
        """Every optimizer's state, in the order of the parameters."""
        return [optimizer.state_dict() for optimizer in self.optimizers.values()]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"{len(states)} optimizer states for {len(self.optimizers)} parameters")
        for optimizer, state in zip(self.optimizers.values(), states, strict=True):
            optimizer.load_state_dict(state)

    def step(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "the optimizer steps inside backward (optim_in_backward): loss.backward() already updated every "
            "parameter and freed its gradient, so there is nothing to step, and nothing that reads gradients after "
            "backward (clipping by the global norm, a GradScaler, gradient accumulation) can run; use an ordinary "
            "optimizer for those"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.step()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def optim_in_backward(
    model: nn.Module, optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
) -> OptimizerInBackward:
    """Step every trained parameter of ``model`` inside backward, with its own ``optimizer_factory([parameter])``.

    Example: ``optim_in_backward(model, lambda params: torch.optim.AdamW(params, lr=1e-3))``, then each training
    step is ``loss.backward()``: every parameter is updated as its gradient is accumulated, and the gradient
    freed (see the module's docstring for what this computes exactly, and what it refuses). Raises ``ValueError``
    for a DistributedDataParallel model and for parameters that already hold a gradient (accumulated gradients
    would be applied, and stepped again, in the next backward).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "optim_in_backward cannot wrap DistributedDataParallel: its bucketed all-reduce averages gradients "
            "after the hooks that would step them; train one process, or use an ordinary optimizer step"
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    holding = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    if holding:
        raise ValueError(
            f"{len(holding)} parameters already hold a gradient (first: {holding[0]}): gradient accumulation over "
            "several backward passes cannot step inside backward; call model.zero_grad(set_to_none=True) first"
        )
    return OptimizerInBackward(parameters, optimizer_factory)
