"""Memory-efficient BN-ReLU-Conv on concatenated feature maps.

A dense layer reads the concatenation of every feature map produced so far in its block::

    x   = cat(features)             # C_in channels, grows with depth
    b   = conv1(relu(norm1(x)))     # bottleneck: bn_size * k channels
    out = conv2(relu(norm2(b)))     # k new channels

Plain autograd keeps ``x`` and ``relu(norm1(x))`` alive for every layer until backward, so feature-map memory
grows quadratically with depth. :class:`_BnReluConvChain` runs the same computation but keeps only

* references to the input feature maps (the network holds them anyway: later layers read them),
* per batch norm, two per-channel tensors: in training mode the batch mean and inverse standard deviation; in
  eval mode (frozen batch norm, input gradients) the running mean and variance themselves, not copied, exactly
  what plain autograd keeps of them,
* with ``efficient=True``: the output of every stage but the last (the bottleneck ``b``, linear in depth).

Backward recomputes the concatenation, batch norm and ReLU from these (elementwise, cheap: the normalisation
uses the saved batch statistics in training mode and the running statistics in eval mode, so the batch is never
reduced again) and calls the convolution and batch norm backward kernels; it never re-runs a convolution forward,
except ``efficient="max"``, which also drops ``b`` and recomputes it with one 1x1 convolution. Each batch norm
follows its own mode, so a chain may mix training and frozen norms. Running statistics are updated exactly once,
in forward, as ``nn.BatchNorm2d`` does: nothing in backward touches them.

Double backward (gradient penalties, ``create_graph=True``): backward then recomputes the whole chain from the
saved inputs and parameters with differentiable operations, batch statistics again a function of the input
(running statistics read in eval mode, never updated), and differentiates it. That recomputation is kept for the
second backward: it costs what plain autograd costs. Under ``torch.func`` transforms (``grad``, ``vmap``, ...)
:func:`bn_relu_conv` runs the plain modules, which behave there exactly as in ``efficient=False``.

Synchronized batch norms (see :mod:`.sync_batchnorm`) normalise with the statistics of every process's batch: one
collective per batch norm in forward, one in backward, none in the recomputation, which reuses the saved global
statistics.

Feature maps may have 1, 2 or 3 spatial dimensions, (N, C, L), (N, C, H, W) or (N, C, D, H, W), with the
matching ``nn.BatchNormNd`` and ``nn.ConvNd`` modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .batchnorm import (
    SyncGroup,
    batch_norm_momentum,
    batch_norm_train,
    batch_norm_train_backward,
    channel_view,
    sync_group,
)

MemoryMode = Literal[False, True, "max"]
MEMORY_MODES: tuple[MemoryMode, ...] = (False, True, "max")


def check_memory_mode(efficient: object) -> MemoryMode:
    """Return ``efficient`` if it is a valid memory mode (``False``, ``True`` or ``"max"``), else raise."""
    if efficient is False or efficient is True or efficient == "max":
        return efficient
    raise ValueError(
        f"efficient={efficient!r} is not a memory mode; valid values are False (plain autograd), "
        "True (recompute batch norm and concatenation in backward) and 'max' (also recompute the bottleneck "
        "convolution)"
    )


@dataclass(frozen=True)
class _Stage:
    """What one BN-ReLU-Conv stage needs besides its parameters."""

    running_mean: Tensor | None
    running_var: Tensor | None
    momentum: float
    eps: float
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    batch_stats: bool = True  # normalise with the batch's statistics (training mode), else the running ones
    sync: SyncGroup | None = None  # share the batch statistics with these processes (training mode only)


def _stage(norm: _BatchNorm, conv: _ConvNd) -> _Stage:
    """The stage of ``norm`` in its current mode, counting one training batch in it if it is training."""
    # As nn.BatchNormNd: a training norm that does not track running statistics neither uses nor updates them,
    # and an eval-mode norm without running statistics normalises with the batch's.
    if isinstance(conv.padding, str):
        raise ValueError(
            f"{type(conv).__name__} with padding={conv.padding!r}: the memory-efficient layers need numeric padding"
        )
    use_running = not norm.training or norm.track_running_stats
    running_mean, running_var = (norm.running_mean, norm.running_var) if use_running else (None, None)
    batch_stats = norm.training or (running_mean is None and running_var is None)
    return _Stage(
        running_mean,
        running_var,
        batch_norm_momentum(norm) if norm.training else 0.0,
        norm.eps,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        batch_stats,
        sync_group(norm) if norm.training else None,
    )


def _to(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by input rank, as nn.Conv1d/2d/3d call them


def _conv(x: Tensor, weight: Tensor, stage: _Stage) -> Tensor:
    """``stage``'s convolution (no bias) of ``x``, (N, C, *spatial) with 1 to 3 spatial dimensions."""
    return _CONVOLUTIONS[x.dim()](x, weight, None, stage.stride, stage.padding, stage.dilation, stage.groups)


def _bn_relu_from_stats(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """relu(batch_norm(x)) from saved per-channel statistics; the same values forward computed."""
    scale = weight * invstd
    shift = bias - mean * scale
    shape = channel_view(x)
    return torch.addcmul(shift.view(shape), x, scale.view(shape)).relu_().to(x.dtype)


def _batch_norm(
    x: Tensor, weight: Tensor, bias: Tensor, stage: _Stage, update_running_stats: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_norm(x)`` (N, C, *spatial) and the two per-channel tensors its backward needs (see :func:`_statistics`).

    Batch statistics: the running statistics are updated unless ``update_running_stats`` is False (recomputation).
    Running statistics: returned as they are (plain autograd saves them too; they are not modified in eval mode).
    """
    if stage.batch_stats and update_running_stats:
        return batch_norm_train(
            x, weight, bias, stage.running_mean, stage.running_var, stage.momentum, stage.eps, stage.sync
        )
    if stage.batch_stats:  # recomputation (double backward): batch statistics of x, running ones untouched
        return torch.native_batch_norm(x, weight, bias, None, None, True, stage.momentum, stage.eps)
    mean, var = stage.running_mean, stage.running_var
    assert mean is not None and var is not None
    return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, stage.eps)[0], mean, var


def _statistics(saved: Sequence[Tensor], stage: _Stage) -> tuple[Tensor, Tensor]:
    """Per-channel mean and inverse standard deviation from what :func:`_batch_norm` returned for ``stage``."""
    mean, second = saved
    return (mean, second) if stage.batch_stats else (mean, torch.rsqrt(second + stage.eps))


def _batch_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, saved: Sequence[Tensor], stage: _Stage, output_mask: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``batch_norm(x)`` for input, weight and bias (those of ``output_mask``) from ``grad``."""
    first, second = saved
    if stage.batch_stats:
        return batch_norm_train_backward(grad, x, weight, first, second, stage.eps, stage.sync, output_mask)
    return torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, first, second, None, None, False, stage.eps, output_mask
    )


def _chain(
    stages: Sequence[_Stage],
    params: Sequence[Tensor],
    inputs: Sequence[Tensor],
    compute_dtype: torch.dtype | None,
    keep_intermediates: bool = False,
    update_running_stats: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run the stages on ``cat(inputs, 1)``, autocast disabled by the caller; casts are explicit.

    Returns the last convolution's output, the two tensors of :func:`_batch_norm` per stage and, with
    ``keep_intermediates``, the input of every stage but the first.
    """
    statistics: list[Tensor] = []
    intermediates: list[Tensor] = []
    x = torch.cat(list(inputs), 1) if len(inputs) > 1 else inputs[0]
    for index, stage in enumerate(stages):
        weight, bias, conv_weight = params[3 * index : 3 * index + 3]
        if index > 0 and keep_intermediates:
            intermediates.append(x)
        normalized, first, second = _batch_norm(x, weight, bias, stage, update_running_stats)
        statistics += (first, second)
        x = _conv(_to(normalized.relu_(), compute_dtype), _to(conv_weight, compute_dtype), stage)
        del normalized
    return x, statistics, intermediates


class _BnReluConvChain(torch.autograd.Function):
    """``conv_n(relu(bn_n(... conv_1(relu(bn_1(cat(inputs)))) ...)))``, each batch norm training or frozen.

    Arguments of ``apply``: ``stages`` (one :class:`_Stage` per BN-ReLU-Conv), ``keep_intermediates`` (save the
    output of every stage but the last), then ``weight, bias, conv_weight`` per stage, then the input feature
    maps, each (N, C_i, *spatial) with 1 to 3 spatial dimensions. Returns the last convolution's output.
    """

    @staticmethod
    def forward(ctx, stages: Sequence[_Stage], keep_intermediates: bool, *tensors: Tensor) -> Tensor:
        num_params = 3 * len(stages)
        params, inputs = tensors[:num_params], tensors[num_params:]
        device_type = inputs[0].device.type
        # Under autocast, convolutions run in the autocast dtype and batch norm in its input's dtype, as in
        # plain autograd. Casts are explicit here so that backward can repeat them exactly.
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        with torch.autocast(device_type, enabled=False):
            x, statistics, intermediates = _chain(stages, params, inputs, compute_dtype, keep_intermediates)
        ctx.stages = stages
        ctx.keep_intermediates = keep_intermediates
        ctx.compute_dtype = compute_dtype
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*params, *statistics, *intermediates, *inputs)
        return x

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself will be differentiated
            return _BnReluConvChain._differentiable_backward(ctx, grad_output)
        stages: Sequence[_Stage] = ctx.stages
        num_stages = len(stages)
        saved = ctx.saved_tensors
        params, saved = saved[: 3 * num_stages], saved[3 * num_stages :]
        statistics, saved = saved[: 2 * num_stages], saved[2 * num_stages :]
        inputs = saved[len(saved) - ctx.num_inputs :]
        compute_dtype = ctx.compute_dtype
        param_needs_grad = ctx.needs_input_grad[2 : 2 + 3 * num_stages]

        def relu_output(index: int, x: Tensor) -> Tensor:
            weight, bias, _ = params[3 * index : 3 * index + 3]
            mean, invstd = _statistics(statistics[2 * index : 2 * index + 2], stages[index])
            return _to(_bn_relu_from_stats(x, weight, bias, mean, invstd), compute_dtype)

        def conv_weight(index: int) -> Tensor:
            return _to(params[3 * index + 2], compute_dtype)

        # Recompute each stage's input: the concatenation, then either the saved intermediates or, in "max"
        # mode, the bottleneck convolution's output again.
        stage_inputs = [torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]]
        relu_outputs: dict[int, Tensor] = {}
        if ctx.keep_intermediates:
            stage_inputs += saved[: num_stages - 1]
        else:
            for index in range(num_stages - 1):
                relu_outputs[index] = relu_output(index, stage_inputs[index])
                stage_inputs.append(_conv(relu_outputs[index], conv_weight(index), stages[index]))

        grad = grad_output
        param_grads: list[Tensor | None] = [None] * (3 * num_stages)
        for index in reversed(range(num_stages)):
            stage, x = stages[index], stage_inputs[index]
            activated = relu_outputs.pop(index, None)
            if activated is None:
                activated = relu_output(index, x)
            grad, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
                _to(grad, activated.dtype),
                activated,
                conv_weight(index),
                None,
                stage.stride,
                stage.padding,
                stage.dilation,
                False,
                [0] * len(stage.stride),
                stage.groups,
                [True, param_needs_grad[3 * index + 2], False],
            )
            # ReLU backward written over the convolution's input gradient: one feature-map-sized tensor less.
            grad = torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad).to(x.dtype)
            del activated
            grad_input, grad_weight, grad_bias = _batch_norm_backward(
                grad,
                x,
                params[3 * index],
                statistics[2 * index : 2 * index + 2],
                stage,
                [True, param_needs_grad[3 * index], param_needs_grad[3 * index + 1]],
            )
            assert grad_input is not None  # requested: the first entry of the output mask is True
            grad = grad_input
            stage_inputs[index] = None
            for offset, param_grad in enumerate((grad_weight, grad_bias, grad_conv_weight)):
                if param_grad is not None:
                    param_grads[3 * index + offset] = param_grad.to(params[3 * index + offset].dtype)

        channels = [t.shape[1] for t in inputs]
        input_grads = [g.to(t.dtype) for g, t in zip(grad.split(channels, 1), inputs, strict=True)]
        return (None, None, *param_grads, *input_grads)

    @staticmethod
    def _differentiable_backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        """Backward that autograd can differentiate again: recompute the chain from the saved parameters and
        inputs with differentiable operations (batch statistics a function of the input, running statistics
        never updated) and differentiate it, keeping the graph."""
        if any(stage.sync is not None for stage in ctx.stages):
            raise RuntimeError(
                "double backward (create_graph=True) through synchronized batch norms is not supported in the "
                "memory-efficient modes: use efficient=False, or plain BatchNorm"
            )
        saved = ctx.saved_tensors
        num_params = 3 * len(ctx.stages)
        needs_grad = ctx.needs_input_grad[2:]
        # Aliases, so that the gradients are partial derivatives: differentiating with respect to the saved
        # tensors themselves would add the paths between them (a later feature map computed from an earlier one).
        tensors = [
            t.view_as(t) if needed else t
            for t, needed in zip(saved[:num_params] + saved[-ctx.num_inputs :], needs_grad, strict=True)
        ]
        with torch.autocast(grad_output.device.type, enabled=False):
            output = _chain(
                ctx.stages, tensors[:num_params], tensors[num_params:], ctx.compute_dtype, update_running_stats=False
            )[0]
        wanted = [t for t, needed in zip(tensors, needs_grad, strict=True) if needed]
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
        return (None, None, *(next(grads) if needed else None for needed in needs_grad))


def bn_relu_conv(
    features: Sequence[Tensor], stages: Sequence[tuple[_BatchNorm, _ConvNd]], efficient: MemoryMode
) -> Tensor:
    """Apply ``conv(relu(norm(.)))`` for each ``(norm, conv)`` of ``stages`` to ``cat(features, 1)``.

    ``features``: feature maps (N, C_i, *spatial) whose channels add up to the first norm's ``num_features``.
    With ``efficient`` set and a backward pass to come (grad enabled and something requiring it; batch norms
    training, frozen in eval mode, or a mix), the memory-efficient autograd function runs; otherwise, and under
    ``torch.func`` transforms, plain modules, which cost what a naive DenseNet costs. ``torch.jit.trace`` cannot
    record the function: an eval-mode model traces with the plain modules, and tracing a training model raises a
    ``RuntimeError`` that names the alternatives.
    """
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in features)
        or any(p.requires_grad for pair in stages for m in pair for p in m.parameters())
    )
    if efficient and needs_grad and torch.jit.is_tracing() and any(norm.training for norm, _ in stages):
        raise RuntimeError(
            f"torch.jit.trace cannot record the memory-efficient autograd function (efficient={efficient!r}) "
            "of a training model: trace it in eval mode (model.eval()) or without gradients, switch to "
            "efficient=False (model.set_efficient(False)) for a training trace, or use torch.compile or "
            "torch.fx (they keep the memory savings)"
        )
    # Under functorch transforms and torch.jit.trace (eval mode), which cannot run this Function, the plain
    # modules run.
    if efficient and needs_grad and not torch._C._are_functorch_transforms_active() and not torch.jit.is_tracing():
        params: list[Tensor] = []
        for norm, conv in stages:
            params += (norm.weight, norm.bias, conv.weight)
        chain = tuple(_stage(norm, conv) for norm, conv in stages)
        return _BnReluConvChain.apply(chain, efficient is True, *params, *features)
    x = torch.cat(list(features), 1) if len(features) > 1 else features[0]
    for norm, conv in stages:
        x = conv(F.relu(norm(x), inplace=True))
    return x
