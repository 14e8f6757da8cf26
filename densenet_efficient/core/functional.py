"""Memory-efficient BN-ReLU-Conv on concatenated feature maps.

A dense layer reads the concatenation of every feature map produced so far in its block::

    x   = cat(features)             # C_in channels, grows with depth
    b   = conv1(relu(norm1(x)))     # bottleneck: bn_size * k channels
    out = conv2(relu(norm2(b)))     # k new channels

Plain autograd keeps ``x`` and ``relu(norm1(x))`` alive for every layer until backward, so feature-map memory
grows quadratically with depth. :class:`_BnReluConvChain` runs the same computation but keeps only

* references to the input feature maps (the network holds them anyway: later layers read them),
* each batch norm's per-channel batch mean and inverse standard deviation,
* with ``efficient=True``: the output of every stage but the last (the bottleneck ``b``, linear in depth).

Backward recomputes the concatenation, batch norm and ReLU from these (elementwise, cheap) and calls the
convolution backward kernels; it never re-runs a convolution forward, except ``efficient="max"``, which also
drops ``b`` and recomputes it with one 1x1 convolution. Batch norm running statistics are updated exactly once,
in forward, as ``nn.BatchNorm2d`` does: nothing in backward touches them.

Feature maps may have 1, 2 or 3 spatial dimensions, (N, C, L), (N, C, H, W) or (N, C, D, H, W), with the
matching ``nn.BatchNormNd`` and ``nn.ConvNd`` modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

MemoryMode = Literal[False, True, "max"]
MEMORY_MODES: tuple[MemoryMode, ...] = (False, True, "max")


def check_memory_mode(efficient: object) -> MemoryMode:
    """Return ``efficient`` if it is a valid memory mode (``False``, ``True`` or ``"max"``), else raise."""
    if efficient is False or efficient is True or efficient == "max":
        return efficient  # type: ignore[return-value]
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


def _batch_norm_momentum(norm: _BatchNorm) -> float:
    """Count one training batch in ``norm`` and return its running-average factor, as nn.BatchNorm2d does."""
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            return 1.0 / float(norm.num_batches_tracked)
    return 0.0 if norm.momentum is None else norm.momentum


def _stage(norm: _BatchNorm, conv: _ConvNd) -> _Stage:
    return _Stage(
        norm.running_mean, norm.running_var, _batch_norm_momentum(norm), norm.eps,
        conv.stride, conv.padding, conv.dilation, conv.groups,  # type: ignore[arg-type]
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
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape)).relu_().to(x.dtype)


class _BnReluConvChain(torch.autograd.Function):
    """``conv_n(relu(bn_n(... conv_1(relu(bn_1(cat(inputs)))) ...)))`` for batch norms in training mode.

    Arguments of ``apply``: ``stages`` (one :class:`_Stage` per BN-ReLU-Conv), ``keep_intermediates`` (save the
    output of every stage but the last), then ``weight, bias, conv_weight`` per stage, then the input feature
    maps, each (N, C_i, *spatial) with 1 to 3 spatial dimensions. Returns the last convolution's output.
    """

    @staticmethod
    def forward(ctx, stages: Sequence[_Stage], keep_intermediates: bool, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        num_params = 3 * len(stages)
        params, inputs = tensors[:num_params], tensors[num_params:]
        device_type = inputs[0].device.type
        # Under autocast, convolutions run in the autocast dtype and batch norm in its input's dtype, as in
        # plain autograd. Casts are explicit here so that backward can repeat them exactly.
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        statistics: list[Tensor] = []
        intermediates: list[Tensor] = []
        with torch.autocast(device_type, enabled=False):
            x = torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]
            for index, stage in enumerate(stages):
                weight, bias, conv_weight = params[3 * index: 3 * index + 3]
                if index > 0 and keep_intermediates:
                    intermediates.append(x)
                normalized, mean, invstd = torch.native_batch_norm(
                    x, weight, bias, stage.running_mean, stage.running_var, True, stage.momentum, stage.eps
                )
                statistics += (mean, invstd)
                x = _conv(_to(normalized.relu_(), compute_dtype), _to(conv_weight, compute_dtype), stage)
                del normalized
        ctx.stages = stages
        ctx.keep_intermediates = keep_intermediates
        ctx.compute_dtype = compute_dtype
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*params, *statistics, *intermediates, *inputs)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        stages: Sequence[_Stage] = ctx.stages
        num_stages = len(stages)
        saved = ctx.saved_tensors
        params, saved = saved[: 3 * num_stages], saved[3 * num_stages:]
        statistics, saved = saved[: 2 * num_stages], saved[2 * num_stages:]
        inputs = saved[len(saved) - ctx.num_inputs:]
        compute_dtype = ctx.compute_dtype
        param_needs_grad = ctx.needs_input_grad[2: 2 + 3 * num_stages]

        def relu_output(index: int, x: Tensor) -> Tensor:
            weight, bias, _ = params[3 * index: 3 * index + 3]
            mean, invstd = statistics[2 * index: 2 * index + 2]
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
                _to(grad, activated.dtype), activated, conv_weight(index), None,
                stage.stride, stage.padding, stage.dilation, False, [0] * len(stage.stride), stage.groups,
                [True, param_needs_grad[3 * index + 2], False],
            )
            # ReLU backward written over the convolution's input gradient: one feature-map-sized tensor less.
            grad = torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad).to(x.dtype)
            del activated
            weight = params[3 * index]
            mean, invstd = statistics[2 * index: 2 * index + 2]
            grad, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, stage.eps,
                [True, param_needs_grad[3 * index], param_needs_grad[3 * index + 1]],
            )
            stage_inputs[index] = None  # type: ignore[call-overload]
            for offset, param_grad in enumerate((grad_weight, grad_bias, grad_conv_weight)):
                if param_grad is not None:
                    param_grads[3 * index + offset] = param_grad.to(params[3 * index + offset].dtype)

        channels = [t.shape[1] for t in inputs]
        input_grads = [g.to(t.dtype) for g, t in zip(grad.split(channels, 1), inputs)]
        return (None, None, *param_grads, *input_grads)


def bn_relu_conv(
    features: Sequence[Tensor], stages: Sequence[tuple[_BatchNorm, _ConvNd]], efficient: MemoryMode
) -> Tensor:
    """Apply ``conv(relu(norm(.)))`` for each ``(norm, conv)`` of ``stages`` to ``cat(features, 1)``.

    ``features``: feature maps (N, C_i, *spatial) whose channels add up to the first norm's ``num_features``.
    With ``efficient`` set and a backward pass to come (batch norms training, grad enabled), the memory-efficient
    autograd function runs; otherwise plain modules, which cost what a naive DenseNet costs.
    """
    norms_train = all(norm.training for norm, _ in stages)
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in features) or any(p.requires_grad for pair in stages for m in pair for p in m.parameters())
    )
    if efficient and norms_train and needs_grad:
        params: list[Tensor] = []
        for norm, conv in stages:
            params += (norm.weight, norm.bias, conv.weight)
        chain = tuple(_stage(norm, conv) for norm, conv in stages)
        return _BnReluConvChain.apply(chain, efficient is True, *params, *features)
    x = torch.cat(list(features), 1) if len(features) > 1 else features[0]
    for norm, conv in stages:
        x = conv(F.relu(norm(x), inplace=True))
    return x
