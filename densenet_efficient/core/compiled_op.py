"""The memory-efficient BN-ReLU-Conv chain as an opaque operator for ``torch.compile``.

``torch.compile`` traces through a plain ``torch.autograd.Function``: the chain's saved-tensor contract is then
gone, and what is kept for backward becomes the compiler's choice (densenet121 at batch 8, 224 px: 0.70 x naive
compiled against 0.31 x eager for ``efficient=True``). Under compilation :func:`..functional.bn_relu_conv` calls
:func:`bn_relu_conv_chain` instead, a ``torch.library.custom_op`` whose autograd is registered: the compiler
fuses around it but cannot see inside, and saves for backward exactly what ``setup_context`` saves, which is what
the eager function saves. Forward and backward are the eager function's own (``_BnReluConvChain``), run on a
stand-in for its autograd context, so both paths compute the same values.

Operator arguments are tensors and plain values only: the parameters, the feature maps, the running statistics
(those a training norm updates, declared mutated, and those an eval-mode norm reads), and per stage its kind,
momentum, eps, convolution geometry and groups. It returns the chain's output followed by the tensors forward
computed for backward (batch statistics, kept bottlenecks); the parameters, feature maps and running statistics
it saves are its inputs, saved as such.

Not covered, each said where it happens: synchronized batch norms (their collectives cannot run inside an opaque
operator) fall back to the traced function, with a warning; so does ``torch.export`` (exported programs hold
standard operators only); double backward (``create_graph=True``) of a compiled model is refused by
``torch.compile`` itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import functional
from .functional import _BnReluConvChain, _Stage

# Stage kinds: how a stage's batch norm normalises, and which running statistics it holds.
_TRAIN_UPDATING = 0  # batch statistics, running statistics updated (training, tracking them)
_TRAIN_UNTRACKED = 1  # batch statistics, no running statistics (training without tracking; eval without them)
_FROZEN = 2  # running statistics read (eval mode)

# Where each tensor ``_BnReluConvChain.forward`` saves comes from, by the chain's structure: ("input", i) for the
# i-th of the operator inputs it may save (params, features, frozen, flattened), ("extra", j) for the j-th extra
# output. Recorded by the forward (real or fake, which always runs first) for setup_context; it rests on the
# function saving by the chain's structure only (the key), not by values.
_LAYOUTS: dict[tuple[Any, ...], tuple[tuple[str, int], ...]] = {}


class _ForwardContext:
    """What ``_BnReluConvChain.forward`` records on its context: attributes, and the tensors it saves."""

    saved: tuple[Tensor, ...] = ()

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved = tensors


class _BackwardContext:
    """The context ``_BnReluConvChain.backward`` reads: the forward's attributes and saved tensors."""

    def __init__(self, attributes: dict[str, Any], saved: Sequence[Tensor], needs_input_grad: tuple[bool, ...]):
        self.__dict__.update(attributes)
        self.saved_tensors = tuple(saved)
        self.needs_input_grad = needs_input_grad


def _stages(
    updated: Sequence[Tensor],
    frozen: Sequence[Tensor],
    kinds: Sequence[int],
    momentum: Sequence[float],
    eps: Sequence[float],
    geometry: Sequence[int],
    groups: Sequence[int],
) -> tuple[_Stage, ...]:
    """The stages the operator's arguments describe (``geometry``: stride, padding, dilation per stage, flat)."""
    stages = []
    running = {_TRAIN_UPDATING: iter(updated), _FROZEN: iter(frozen)}
    dims = len(geometry) // (3 * len(kinds))
    for index, kind in enumerate(kinds):
        mean, var = (next(running[kind]), next(running[kind])) if kind in running else (None, None)
        start = 3 * dims * index
        stride, padding, dilation = (tuple(geometry[start + k * dims : start + (k + 1) * dims]) for k in range(3))
        stages.append(
            _Stage(mean, var, momentum[index], eps[index], stride, padding, dilation, groups[index], kind != _FROZEN)
        )
    return tuple(stages)


def _layout_key(num_params: int, num_features: int, kinds: Sequence[int], keep_intermediates: bool) -> tuple:
    return num_params, num_features, tuple(kinds), keep_intermediates


def _chain_impl(
    params: list[Tensor],
    features: list[Tensor],
    updated: list[Tensor],
    frozen: list[Tensor],
    kinds: list[int],
    momentum: list[float],
    eps: list[float],
    geometry: list[int],
    groups: list[int],
    keep_intermediates: bool,
    compute_dtype: torch.dtype | None,
) -> list[Tensor]:
    """The chain's output, the updated running statistics (for ``updated``), then the tensors saved for backward
    that are not inputs (see the module's docstring)."""
    # A functional operator (autograd cannot be registered for a mutating one): training norms update copies of
    # their running statistics, returned for the caller to copy back once.
    updated = [t.clone() for t in updated]
    stages = _stages(updated, frozen, kinds, momentum, eps, geometry, groups)
    context = _ForwardContext()
    device_type = features[0].device.type
    # The eager function reads the autocast state to choose its compute dtype: give it the caller's.
    with torch.autocast(device_type, dtype=compute_dtype, enabled=compute_dtype is not None):
        output = _BnReluConvChain.forward(context, stages, keep_intermediates, *params, *features)
    inputs = {id(t): index for index, t in enumerate((*params, *features, *frozen))}
    layout: list[tuple[str, int]] = []
    extras: list[Tensor] = []
    for tensor in context.saved:
        if id(tensor) in inputs:
            layout.append(("input", inputs[id(tensor)]))
        else:
            layout.append(("extra", len(extras)))
            extras.append(tensor)
    _LAYOUTS[_layout_key(len(params), len(features), kinds, keep_intermediates)] = tuple(layout)
    return [output, *updated, *extras]


_chain_op = torch.library.custom_op("densenet_efficient::bn_relu_conv_chain", _chain_impl, mutates_args=())
# Shapes only (fake tensors): the same computation, which every operator it calls can run on fake tensors.
_chain_op.register_fake(_chain_impl)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    params, features, updated, frozen, kinds, momentum, eps, geometry, groups, keep, compute_dtype = inputs
    flat_inputs = (*params, *features, *frozen)
    layout = _LAYOUTS[_layout_key(len(params), len(features), kinds, keep)]
    ctx.mark_non_differentiable(*output[1:])  # running statistics and saved tensors: no gradient flows back
    extras = output[1 + len(updated) :]
    ctx.save_for_backward(*(flat_inputs[i] if source == "input" else extras[i] for source, i in layout))
    ctx.chain_attributes = {
        "stages": _stages(updated, frozen, kinds, momentum, eps, geometry, groups),
        "keep_intermediates": keep,
        "compute_dtype": compute_dtype,
        "num_inputs": len(features),
    }
    ctx.inputs_require_grad = tuple(t.requires_grad for t in (*params, *features))
    ctx.chain_num_params = len(params)
    ctx.chain_num_running = len(updated), len(frozen)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    grad_output = grads[0]
    assert grad_output is not None, "backward reached the chain without a gradient for its output"
    context = _BackwardContext(ctx.chain_attributes, ctx.saved_tensors, (False, False, *ctx.inputs_require_grad))
    # The compiled backward is never differentiated again (torch.compile refuses create_graph=True): the eager
    # function's first-order backward.
    with torch.no_grad():
        gradients = _BnReluConvChain.backward(context, grad_output)[2:]
    params, features = list(gradients[: ctx.chain_num_params]), list(gradients[ctx.chain_num_params :])
    # The structure of the operator's arguments: a list per tensor list, None for everything without a gradient.
    num_updated, num_frozen = ctx.chain_num_running
    return (params, features, [None] * num_updated, [None] * num_frozen, *(None,) * 7)


_chain_op.register_autograd(_backward, setup_context=_setup_context)


def bn_relu_conv_chain(
    stages: Sequence[_Stage], keep_intermediates: bool, params: Sequence[Tensor], features: Sequence[Tensor]
) -> Tensor:
    """``_BnReluConvChain.apply(stages, keep_intermediates, *params, *features)`` as one opaque operator.

    Synchronized batch norms fall back to the function itself (traced through by the compiler, which then
    chooses what to save), with a warning that says so. So does ``torch.export``, without one: an exported
    program holds standard operators only (ONNX, other runtimes), and is rarely trained.
    """
    if torch.compiler.is_exporting():
        return _BnReluConvChain.apply(stages, keep_intermediates, *params, *features)
    if any(stage.sync is not None for stage in stages):
        warnings.warn(
            "torch.compile of synchronized batch norms in the memory-efficient modes: their collectives cannot "
            "run inside the opaque operator, so the autograd function is traced through and what it saves for "
            "backward is the compiler's choice (more memory than eager)",
            stacklevel=3,
        )
        return _BnReluConvChain.apply(stages, keep_intermediates, *params, *features)
    updated: list[Tensor] = []
    frozen: list[Tensor] = []
    kinds: list[int] = []
    geometry: list[int] = []
    for stage in stages:
        if stage.running_mean is not None and stage.running_var is not None:
            (updated if stage.batch_stats else frozen).extend((stage.running_mean, stage.running_var))
            kinds.append(_TRAIN_UPDATING if stage.batch_stats else _FROZEN)
        else:
            kinds.append(_TRAIN_UNTRACKED)
        geometry += (*stage.stride, *stage.padding, *stage.dilation)
    device_type = features[0].device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    outputs = _chain_op(
        list(params),
        list(features),
        updated,
        frozen,
        kinds,
        [stage.momentum for stage in stages],
        [stage.eps for stage in stages],
        geometry,
        [stage.groups for stage in stages],
        keep_intermediates,
        compute_dtype,
    )
    with torch.no_grad():
        for running, new in zip(updated, outputs[1 : 1 + len(updated)], strict=True):
            running.copy_(new)
    return outputs[0]


functional._compiled_chain = bn_relu_conv_chain
