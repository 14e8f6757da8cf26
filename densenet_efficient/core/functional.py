"""Memory-efficient BN-ReLU-Conv on concatenated feature maps.

A dense layer reads the concatenation of every feature map produced so far in its block::

    x   = cat(features)             # C_in channels, grows with depth
    b   = conv1(relu(norm1(x)))     # bottleneck: bn_size * k channels
    out = conv2(relu(norm2(b)))     # k new channels

Plain autograd keeps ``x`` and ``relu(norm1(x))`` of every layer until backward: memory quadratic in depth.
:class:`_BnReluConvChain` computes the same but keeps only references to the input feature maps (the network
holds them anyway), per batch norm two per-channel tensors (training: batch mean and inverse std; eval mode: the
running statistics themselves, not copied) and, with ``efficient=True``, the bottleneck ``b``. Backward recomputes
the concatenation, batch norm and ReLU from these (elementwise: the batch is never reduced again) and runs the
convolution and batch-norm backward kernels; only ``efficient="max"`` re-runs a convolution forward (``b``'s 1x1).
Each norm follows its own mode; running statistics are updated once, in forward, as ``nn.BatchNorm2d`` does.

Double backward (``create_graph=True``) recomputes the chain with differentiable operations (batch statistics a
function of the input, running statistics never updated) and differentiates that, at plain autograd's cost.
Under ``torch.func`` transforms :func:`.efficient.bn_relu_conv` runs the plain modules. Synchronized batch norms
(:mod:`.sync_batchnorm`) take one collective in forward and one in backward; the recomputation reuses the saved
global statistics. Feature maps are (N, C, *spatial) with 1 to 3 spatial dimensions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .batchnorm import (
    SyncGroup,
    batch_norm_momentum,
    batch_norm_train,
    batch_norm_train_backward,
    channel_view,
    sync_group,
)
from .eligibility import activation, is_frozen_norm, norm_kind

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
    pool: bool = False  # 2x average pooling after the convolution (a transition: one stage)
    norm: str = "batch"  # per channel; "instance": per sample and channel; "group": per sample and group
    num_groups: int = 0  # GroupNorm's
    act: tuple[str, float] = ("relu", 0.0)  # the activation and its parameter (see _activate)

    @property
    def default(self) -> bool:
        """Batch norm and ReLU: the path with per-run recomputation (and the compiled operator)."""
        return self.norm == "batch" and self.act[0] == "relu"


def _stage(norm: Any, conv: _ConvNd | None, pool: bool = False, act: nn.Module | None = None) -> _Stage:
    """The stage of ``norm`` (then ``act``, ``None``: ReLU; ``conv`` ``None``: none) in its current mode, counting
    one training batch in it if it is training. As nn.BatchNormNd: a training norm that tracks no running
    statistics neither uses nor updates them, an eval-mode (or frozen) norm without them uses the batch's.
    InstanceNorm uses the sample's in training or when it tracks none, and counts no batches; GroupNorm has none."""
    assert conv is None or not isinstance(conv.padding, str)  # string padding takes the plain path (.eligibility)
    kind = norm_kind(norm)
    training = norm.training and not is_frozen_norm(norm)
    tracking = getattr(norm, "track_running_stats", False)
    use_running = (not training or tracking) and kind != "group"
    running_mean, running_var = (norm.running_mean, norm.running_var) if use_running else (None, None)
    batch_stats = training or (running_mean is None and running_var is None)
    momentum = batch_norm_momentum(norm) if training and kind == "batch" else 0.0
    momentum = (norm.momentum or 0.0) if kind == "instance" else momentum
    spec = activation(act)
    assert spec is not None  # unsupported activations take the plain path (.eligibility)
    geometry = ((), (), (), 1) if conv is None else (conv.stride, conv.padding, conv.dilation, conv.groups)
    sync = sync_group(norm) if training and kind == "batch" else None
    stats = (running_mean, running_var, momentum, norm.eps)
    return _Stage(*stats, *geometry, batch_stats, sync, pool, kind, getattr(norm, "num_groups", 0), spec)  # type: ignore[arg-type]


def _to(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by input rank, as nn.Conv1d/2d/3d call them


def _conv(x: Tensor, weight: Tensor, stage: _Stage) -> Tensor:
    """``stage``'s convolution (no bias) of ``x``, (N, C, *spatial) with 1 to 3 spatial dimensions."""
    return _CONVOLUTIONS[x.dim()](x, weight, None, stage.stride, stage.padding, stage.dilation, stage.groups)


def _conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, stage: _Stage, weight_needs_grad: bool, input_needs_grad: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`_conv` of ``x`` for ``x`` and ``weight`` (each if it needs one), from ``grad``."""
    geometry = (stage.stride, stage.padding, stage.dilation, False, [0] * len(stage.stride), stage.groups)
    mask = [input_needs_grad, weight_needs_grad, False]
    return torch.ops.aten.convolution_backward(grad, x, weight, None, *geometry, mask)[:2]


def _relu_backward_(grad: Tensor, activated: Tensor) -> Tensor:
    """ReLU's backward written over ``grad`` (a tensor of its own): zero where the ReLU output ``activated`` is."""
    return torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad)


_AVERAGE_POOLS = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}


def _avg_pool(x: Tensor) -> Tensor:
    """2x average pooling over every spatial dimension of ``x`` (N, C, *spatial)."""
    return _AVERAGE_POOLS[x.dim()](x, kernel_size=2)


def _statistics(saved: Sequence[Tensor], stage: _Stage) -> tuple[Tensor, Tensor]:
    """Per-channel mean and inverse standard deviation from what :func:`_norm` returned for a batch norm."""
    mean, second = saved
    return (mean, second) if stage.batch_stats else (mean, torch.rsqrt(second + stage.eps))


def _per_sample(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Instance norm as ``torch.instance_norm`` computes it: batch norm of ``x`` viewed (1, N * C, *spatial), with
    weight and bias repeated per sample."""
    n = x.shape[0]
    return x.reshape(1, -1, *x.shape[2:]), *(None if t is None else t.repeat(n) for t in (weight, bias))  # type: ignore[return-value]


def _norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, stage: _Stage, update_running_stats: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``stage``'s norm of ``x`` (N, C, *spatial) and the two tensors its backward needs: for batch norm per
    channel, the batch mean and inverse std (in the dtype the kernels give), or the running statistics
    themselves (eval mode: not modified, as plain autograd saves them); per (sample, group) mean and rstd for group
    norm; per (sample, channel) for instance norm (the running ones repeated per sample, whose running statistics
    become the sample average of their updated repetitions, as ``torch.instance_norm`` does). Running statistics
    are updated unless ``update_running_stats`` is False (double backward's recomputation)."""
    n, c = x.shape[:2]
    if stage.norm == "group":
        return torch.native_group_norm(x.contiguous(), weight, bias, n, c, x[0, 0].numel(), stage.num_groups, stage.eps)
    if stage.norm == "batch" and stage.batch_stats:
        buffers = (stage.running_mean, stage.running_var) if update_running_stats else (None, None)
        out, first, second = batch_norm_train(x, weight, bias, *buffers, stage.momentum, stage.eps, stage.sync)
        # As real kernels give them (fake ones: x's dtype): fp32 for reduced-precision x, on CPU with fp32 weights only
        kept = x.is_cpu and getattr(weight, "dtype", x.dtype) == x.dtype
        reduced = first.dtype in (torch.float16, torch.bfloat16) and not kept
        return (out, first.float(), second.float()) if reduced else (out, first, second)
    if stage.norm == "batch":
        stats = stage.running_mean, stage.running_var
        return torch.native_batch_norm(x, weight, bias, *stats, False, 0.0, stage.eps)[0], *stats  # type: ignore[return-value]
    view, weight, bias = _per_sample(x, weight, bias)
    tracked = [t for t in (stage.running_mean, stage.running_var) if t is not None]
    running = [t.repeat(n) for t in tracked] if update_running_stats or not stage.batch_stats else []
    mean, var = running or (None, None)
    out, first, second = torch.native_batch_norm(
        view, weight, bias, mean, var, stage.batch_stats, stage.momentum, stage.eps
    )
    for buffer, repeated in zip(tracked, running if update_running_stats else [], strict=False):
        buffer.copy_(repeated.view(n, c).mean(0))
    return (out.view_as(x), first, second) if stage.batch_stats else (out.view_as(x), *running)  # type: ignore[return-value]


def _renorm(x: Tensor, weight: Tensor | None, bias: Tensor | None, saved: Sequence[Tensor], stage: _Stage) -> Tensor:
    """``stage``'s norm of ``x`` again in backward, from what :func:`_norm` saved: batch norm from its statistics,
    per-sample norms by their kernel (the same values forward computed)."""
    if stage.norm == "batch":
        shift, scale = _shift_scale(weight, bias, *_statistics(saved, stage), x)  # type: ignore[arg-type]
        return torch.addcmul(shift, x, scale).to(x.dtype)
    if stage.norm == "group":
        return _norm(x, weight, bias, stage, False)[0]
    view, weight, bias = _per_sample(x, weight, bias)
    mean, var = (None, None) if stage.batch_stats else saved
    return torch.native_batch_norm(view, weight, bias, mean, var, stage.batch_stats, 0.0, stage.eps)[0].view_as(x)


def _norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, saved: Sequence[Tensor], stage: _Stage, mask: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_norm` of ``x`` for input, weight and bias (those of ``mask``) from ``grad``."""
    n, c = x.shape[:2]
    if stage.norm == "group":
        return torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x.contiguous(), *saved, weight, n, c, x[0, 0].numel(), stage.num_groups, mask
        )
    if stage.norm == "instance":
        view, repeated, _ = _per_sample(x, weight, None)
        grads = _norm_backward(grad.reshape(view.shape), view, repeated, saved, replace(stage, norm="batch"), mask)
        return grads[0].view_as(x), *(None if g is None else g.view(n, c).sum(0) for g in grads[1:])  # type: ignore[union-attr,return-value]
    first, second = saved
    if stage.batch_stats:
        return batch_norm_train_backward(grad, x, weight, first, second, stage.eps, stage.sync, mask)
    return torch.ops.aten.native_batch_norm_backward(grad, x, weight, first, second, None, None, False, stage.eps, mask)


def _activate(x: Tensor, stage: _Stage, weight: Tensor | None) -> Tensor:
    """``stage``'s activation of ``x``, out of place, as its module computes it (``weight``: PReLU's)."""
    name, value = stage.act
    if name == "swish":  # MONAI's Swish
        return x * torch.sigmoid(value * x)
    if name == "prelu":
        return F.prelu(x, weight)  # type: ignore[arg-type]
    return getattr(F, name)(x, value) if name in ("leaky_relu", "elu") else getattr(F, name)(x)  # relu, silu


def _norm_act_backward(
    conv_grad: Callable[[Tensor], Tensor],
    x: Tensor,
    params: Sequence[Tensor | None],
    saved: Sequence[Tensor],
    stage: _Stage,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Backward through ``a = act(norm(x))`` of any stage: ``a`` recomputed (a small graph for the activation's
    backward kernels) and handed to ``conv_grad``, which returns its gradient. ``params``: norm weight and bias,
    activation weight; ``needs``: which need a gradient. Returns the gradients of ``x`` and ``params``."""
    weight, bias, act_weight = params
    normalized = _renorm(x, weight, bias, saved, stage).requires_grad_()
    leaves = [normalized] + ([act_weight.detach().requires_grad_()] if needs[2] and act_weight is not None else [])
    with torch.enable_grad():
        activated = _activate(normalized, stage, leaves[1] if len(leaves) > 1 else act_weight)
    grad = conv_grad(activated.detach())
    grads = torch.autograd.grad(activated, leaves, grad.to(activated.dtype))
    del activated, normalized
    grad_x, grad_weight, grad_bias = _norm_backward(grads[0], x, weight, saved, stage, [True, needs[0], needs[1]])
    assert grad_x is not None
    return grad_x, grad_weight, grad_bias, grads[1] if len(grads) > 1 else None


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``torch.cat`` gives a concatenation of tensors laid out like ``x``."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat``, or the one tensor itself (no copy, no operator)."""
    return torch.cat(list(tensors), dim) if len(tensors) > 1 else tensors[0]


def _split(tensor: Tensor, sizes: Sequence[int], dim: int = 0) -> Sequence[Tensor]:
    """``tensor.split(sizes, dim)``, or ``[tensor]`` for one size (no operator)."""
    return tensor.split(list(sizes), dim) if len(sizes) > 1 else [tensor]


def _shift_scale(weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``batch_norm(x)`` is ``shift + x * scale``: the two per-channel tensors as the kernels compute them, shaped
    to broadcast over maps like ``like``."""
    scale = weight * invstd
    shape = channel_view(like)
    return torch.addcmul(bias, mean, scale, value=-1).view(shape), scale.view(shape)


def _bn_relu_into(x: Tensor, shift: Tensor, scale: Tensor, dtype: torch.dtype | None, owned: bool) -> Tensor:
    """``relu(shift + x * scale)`` (see :func:`_shift_scale`) in ``dtype`` (default: ``x``'s): written over ``x``
    if it is ``owned`` (a concatenation built for this) and of that dtype, else into a new tensor laid out as ``x``."""
    dtype = dtype or x.dtype
    if not owned and x.dtype == dtype == shift.dtype:
        return torch.addcmul(shift, x, scale).relu_()  # a new tensor, laid out as x
    out = x if owned and x.dtype == dtype else torch.empty_like(x, dtype=dtype)
    return torch.addcmul(shift, x, scale, out=out).relu_()


def _chunks(channels: Sequence[int], limit: int | None) -> list[tuple[int, int]]:
    """Runs ``[first, last)`` of consecutive pieces with ``channels`` whose widths add up to at most ``limit`` (a
    wider piece is a run of its own); one run of every piece if ``limit`` is ``None``."""
    if limit is None:
        return [(0, len(channels))]
    runs: list[tuple[int, int]] = []
    first, width = 0, 0
    for index, piece in enumerate(channels):
        if index > first and width + piece > limit:
            runs.append((first, index))
            first, width = index, 0
        width += piece
    runs.append((first, len(channels)))
    return runs


def _concat_bn_relu_backward(
    activation_grad: Callable[[Tensor, int], Tensor],
    inputs: Sequence[Tensor],
    inputs_need_grad: Sequence[bool],
    norm_params: Sequence[Tensor],
    norm_params_need_grad: Sequence[bool],
    saved: Sequence[Tensor],
    stage: _Stage,
    compute_dtype: torch.dtype | None,
    runs: Sequence[tuple[int, int]],
) -> tuple[list[Tensor | None], Tensor | None, Tensor | None]:
    """Backward through ``a = relu(batch_norm(cat(inputs, 1)))`` to the inputs and the norm's weight and bias. Run
    by run of :func:`_chunks`, ``a`` is recomputed and handed to ``activation_grad(a, run)``, which takes what it
    needs (a weight gradient) and returns a new tensor, the gradient for ``a``: ReLU's backward is written over it,
    then batch norm's gives each piece's. The transients are two runs wide. Synchronized batch norms (one run) take
    one backward of the concatenation: one collective."""
    weight, bias = norm_params
    channels = [t.shape[1] for t in inputs]
    widths = [sum(channels[first:last]) for first, last in runs]
    shifts, scales = (_split(t, widths, 1) for t in _shift_scale(weight, bias, *_statistics(saved, stage), inputs[0]))
    norm_mask = list(norm_params_need_grad)
    # Per-piece views taken once (one operator each, not one per piece: the number of operators is what a
    # launch-bound GPU step and a fake-tensor step, plan's model, spend their time on).
    piece_weights = _split(weight, channels)
    piece_saved = list(zip(*(_split(t, channels) for t in saved), strict=True))
    input_grads: list[Tensor | None] = []
    weight_grads: list[Tensor] = []
    bias_grads: list[Tensor] = []
    for run, (first, last) in enumerate(runs):
        x = _cat(inputs[first:last], 1)
        activated = _bn_relu_into(x, shifts[run], scales[run], compute_dtype, last - first > 1 and stage.sync is None)
        x_kept = x if stage.sync is not None else None
        del x
        grad = _relu_backward_(activation_grad(activated, run), activated)
        del activated
        if x_kept is not None:
            grads = _norm_backward(grad.to(x_kept.dtype), x_kept, weight, saved, stage, [True, *norm_mask])
            assert grads[0] is not None
            pieces = [g.to(t.dtype) for g, t in zip(_split(grads[0], channels, 1), inputs, strict=True)]
            return [g if needed else None for g, needed in zip(pieces, inputs_need_grad, strict=True)], *grads[1:]
        piece_grads = _split(grad, channels[first:last], 1)
        # Dense copies in each piece's layout: on CPU the kernel sums a strided gradient less accurately (in
        # reduced precision, in that precision; 3D fp32 maps lost a digit), and channels-last ones 8 x slower.
        # One operator for a run of contiguous pieces (clone's layout of a channels-last slice is ambiguous).
        contiguous = all(_memory_format(t) == torch.contiguous_format for t in inputs[first:last])
        piece_grads = torch._foreach_clone(list(piece_grads)) if last - first > 1 and contiguous else piece_grads
        del grad
        for index, piece_grad in zip(range(first, last), piece_grads, strict=True):
            mask = [inputs_need_grad[index], *norm_mask]
            if not any(mask):
                input_grads.append(None)
                continue
            piece = inputs[index]
            piece_grad = piece_grad.to(piece.dtype).contiguous(memory_format=_memory_format(piece))
            grad_input, grad_weight, grad_bias = _norm_backward(
                piece_grad, piece, piece_weights[index], piece_saved[index], stage, mask
            )
            input_grads.append(grad_input)
            weight_grads += [] if grad_weight is None else [grad_weight]
            bias_grads += [] if grad_bias is None else [grad_bias]
        del piece_grads, piece_grad
    return input_grads, _cat(weight_grads) if weight_grads else None, _cat(bias_grads) if bias_grads else None


def _chain(
    stages: Sequence[_Stage],
    params: Sequence[Tensor],
    inputs: Sequence[Tensor],
    compute_dtype: torch.dtype | None,
    keep_intermediates: bool = False,
    update_running_stats: bool = True,
    act_weights: Sequence[Tensor | None] = (),
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run the stages on ``cat(inputs, 1)`` (autocast disabled by the caller; casts are explicit): the last
    output, the two tensors of :func:`_norm` per stage and, with ``keep_intermediates``, the input of every stage
    but the first. ``act_weights``: PReLU's weight per stage."""
    statistics: list[Tensor] = []
    intermediates: list[Tensor] = []
    x = _cat(inputs, 1)
    for index, stage in enumerate(stages):
        weight, bias, conv_weight = params[3 * index : 3 * index + 3]
        if index > 0 and keep_intermediates:
            intermediates.append(x)
        normalized, first, second = _norm(x, weight, bias, stage, update_running_stats)
        statistics += (first, second)
        activated = normalized.relu_() if stage.act[0] == "relu" else _activate(normalized, stage, act_weights[index])
        # Under autocast a convolution casts its input; a BN-ReLU without one keeps its input's dtype.
        activated = activated if conv_weight is None else _to(activated, compute_dtype)
        del normalized
        x = activated if conv_weight is None else _conv(activated, _to(conv_weight, compute_dtype), stage)
        del activated
        if stage.pool:
            x = _avg_pool(x)
    return x, statistics, intermediates


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes convolutions in on ``device_type``; ``None`` with autocast off, or on a device
    without autocast (``meta``: timm's config tests)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled; nothing to disable on a device without autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _act_weights(stages: Sequence[_Stage], weights: Sequence[Tensor | None]) -> list[Tensor | None]:
    """PReLU's weight per stage (``None`` for other activations), from the weights of the PReLU stages."""
    remaining = iter(weights)
    return [next(remaining) if stage.act[0] == "prelu" else None for stage in stages]


class _BnReluConvChain(torch.autograd.Function):
    """``conv_n(act_n(norm_n(... conv_1(act_1(norm_1(cat(inputs)))) ...)))``, each norm a batch norm (training or
    frozen), an instance norm or a group norm, each activation a ReLU or another of :data:`.eligibility.ACTIVATIONS`.
    ``apply`` takes ``stages`` (:class:`_Stage`), ``keep_intermediates`` (save every stage's output but the last),
    ``weight, bias, conv_weight`` per stage, the input feature maps (N, C_i, *spatial), the weight of each PReLU
    stage; returns the last convolution's output. Stages other than batch norm and ReLU recompute through
    :func:`_norm_act_backward`, run by run of pieces (group norm: the whole concatenation at once)."""

    @staticmethod
    def forward(ctx, stages: Sequence[_Stage], keep_intermediates: bool, *tensors: Tensor) -> Tensor:
        num_params = 3 * len(stages)
        end = len(tensors) - sum(stage.act[0] == "prelu" for stage in stages)
        params, inputs = tensors[:num_params], tensors[num_params:end]
        device_type = inputs[0].device.type
        # Under autocast, convolutions run in the autocast dtype and batch norm in its input's dtype, as in
        # plain autograd. Casts are explicit here so that backward can repeat them exactly.
        compute_dtype = autocast_dtype(device_type)
        with autocast_off(device_type):
            act_weights = _act_weights(stages, tensors[end:])
            x, statistics, intermediates = _chain(
                stages, params, inputs, compute_dtype, keep_intermediates, True, act_weights
            )
        ctx.stages, ctx.keep_intermediates, ctx.compute_dtype = stages, keep_intermediates, compute_dtype
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*params, *statistics, *intermediates, *inputs, *tensors[end:])
        return x

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        stages: Sequence[_Stage] = ctx.stages
        num_stages = len(stages)
        saved = ctx.saved_tensors
        end = len(saved) - sum(stage.act[0] == "prelu" for stage in stages)
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself will be differentiated

            def recompute(*tensors: Tensor) -> list[Tensor]:
                params, inputs = tensors[: 3 * num_stages], tensors[3 * num_stages : 3 * num_stages + ctx.num_inputs]
                act_weights = _act_weights(stages, tensors[3 * num_stages + ctx.num_inputs :])
                return [_chain(stages, params, inputs, ctx.compute_dtype, False, False, act_weights)[0]]

            tensors = saved[: 3 * num_stages] + saved[end - ctx.num_inputs :]
            return None, None, *_differentiate(ctx, stages, tensors, 2, recompute, [grad_output])
        act_weights = _act_weights(stages, saved[end:])
        params, saved = saved[: 3 * num_stages], saved[3 * num_stages : end]
        statistics, saved = saved[: 2 * num_stages], saved[2 * num_stages :]
        inputs = saved[len(saved) - ctx.num_inputs :]
        compute_dtype = ctx.compute_dtype
        needs = ctx.needs_input_grad
        param_needs_grad = needs[2 : 2 + 3 * num_stages]
        input_needs_grad = needs[2 + 3 * num_stages : 2 + 3 * num_stages + ctx.num_inputs]
        act_needs_grad = _act_weights(stages, needs[2 + 3 * num_stages + ctx.num_inputs :])
        act_grads: list[Tensor | None] = [None] * num_stages

        def relu_output(index: int, x: Tensor) -> Tensor:
            stage, weight, bias = stages[index], params[3 * index], params[3 * index + 1]
            normalized = _renorm(x, weight, bias, statistics[2 * index : 2 * index + 2], stage)
            activated = (
                normalized.relu_() if stage.act[0] == "relu" else _activate(normalized, stage, act_weights[index])
            )
            return _to(activated, compute_dtype)

        def conv_weight(index: int) -> Tensor:
            return _to(params[3 * index + 2], compute_dtype)

        param_grads: list[Tensor | None] = [None] * (3 * num_stages)
        with autocast_off(grad_output.device.type):
            # The inputs of the stages after the first: the saved intermediates or, in "max" mode, the
            # convolutions' outputs again (the first stage's input is recomputed piece by piece below).
            stage_inputs: list[Tensor | None] = [None]
            if ctx.keep_intermediates:
                stage_inputs += saved[: num_stages - 1]
            elif num_stages > 1:
                recomputed = _cat(inputs, 1)
                if stages[0].default:  # written over the concatenation
                    shift_scale = _shift_scale(params[0], params[1], *_statistics(statistics[:2], stages[0]), inputs[0])
                    recomputed = _bn_relu_into(recomputed, *shift_scale, compute_dtype, len(inputs) > 1)
                else:
                    recomputed = relu_output(0, recomputed)
                for index in range(num_stages - 1):
                    recomputed = _conv(recomputed, conv_weight(index), stages[index])
                    if stages[index].pool:
                        recomputed = _avg_pool(recomputed)
                    stage_inputs.append(recomputed)
                    if index + 1 < num_stages - 1:
                        recomputed = relu_output(index + 1, recomputed)
                del recomputed

            grad = grad_output
            for index in reversed(range(1, num_stages)):
                stage, x = stages[index], stage_inputs[index]
                stage_inputs[index] = None
                assert x is not None

                def conv_grad(activated: Tensor, index: int = index, grad: Tensor = grad) -> Tensor:
                    weight, stage, needed = conv_weight(index), stages[index], param_needs_grad[3 * index + 2]
                    result, param_grads[3 * index + 2] = _conv_backward(
                        _to(grad, activated.dtype), activated, weight, stage, needed
                    )
                    return result

                saved_stats, needs = statistics[2 * index : 2 * index + 2], param_needs_grad[3 * index : 3 * index + 2]
                if not stage.default:
                    norm_params = (*params[3 * index : 3 * index + 2], act_weights[index])
                    grad, param_grads[3 * index], param_grads[3 * index + 1], act_grads[index] = _norm_act_backward(
                        conv_grad, x, norm_params, saved_stats, stage, (*needs, bool(act_needs_grad[index]))
                    )
                    continue
                activated = relu_output(index, x)
                grad = _relu_backward_(conv_grad(activated), activated).to(x.dtype)
                del activated
                grad, param_grads[3 * index], param_grads[3 * index + 1] = _norm_backward(  # type: ignore[assignment]
                    grad, x, params[3 * index], saved_stats, stage, [True, *needs]
                )
                del x

            first = stages[0]
            weight = None if params[2] is None else conv_weight(0)  # None: a BN-ReLU without convolution
            grad = grad if weight is None else _to(grad, weight.dtype)
            # A transition's gradient is spread to full size (each window shares its output's gradient: an exact
            # division by a power of two; what the pooling dropped, odd sizes, gets zero) and the convolution's
            # gradients taken there, as plain autograd takes them: taken at the pooled size (the two commute),
            # they would sum in another order, which ill-conditioned batch norms (1x1 maps at batch 2) amplify.
            # The spread gradient is a transient of the convolution's output size.
            if first.pool:
                shape, pooled = [*grad.shape[:2], *inputs[0].shape[2:]], [2 * size for size in grad.shape[2:]]
                result = grad.new_zeros(shape) if pooled != shape[2:] else grad.new_empty(shape)
                windows = result[(slice(None), slice(None)) + tuple(slice(0, size) for size in pooled)]
                spread = grad * 0.5 ** len(pooled)
                for dim in range(2, 2 + len(pooled)):
                    windows, spread = windows.unflatten(2 * dim - 2, (-1, 2)), spread.unsqueeze(2 * dim - 1)
                windows.copy_(spread)
                grad = result
                del windows, spread, result
            grad_conv_weight: list[Tensor] = []
            channels = [t.shape[1] for t in inputs]
            one_run = first.sync is not None or first.groups != 1 or weight is None or first.norm == "group"
            runs = _chunks(channels, None if one_run else weight.shape[0])  # type: ignore[union-attr]
            # Each run's columns of the convolution's weight, or of the output's gradient for a BN-ReLU.
            run_slices = _split(grad if weight is None else weight, [sum(channels[a:b]) for a, b in runs], 1)

            def activation_grad(activated: Tensor, run: int) -> Tensor:
                if weight is None:  # a BN-ReLU: the gradient is the output's, copied (it is modified in place)
                    return run_slices[run].clone(memory_format=_memory_format(activated))
                result, weight_part = _conv_backward(grad, activated, run_slices[run], first, param_needs_grad[2])
                if weight_part is not None:
                    grad_conv_weight.append(weight_part)
                return result

            if first.default:
                dtype = None if weight is None else compute_dtype
                norm = (params[:2], param_needs_grad[:2], statistics[:2], first, dtype)
                input_grads, param_grads[0], param_grads[1] = _concat_bn_relu_backward(
                    activation_grad, inputs, input_needs_grad, *norm, runs
                )
            else:  # run by run too (group norm: one run), each run's channels of the per-channel tensors
                input_grads, parts = [], []
                n, act_weight, needs = inputs[0].shape[0], act_weights[0], (*param_needs_grad[:2], act_needs_grad[0])
                for run, (a, b) in enumerate(runs):
                    cols = slice(sum(channels[:a]), sum(channels[:b]))

                    def cut(t: Tensor | None, per_sample: bool = False, cols: slice = cols) -> Tensor | None:
                        if t is None or len(runs) == 1 or (t is act_weight and t.numel() == 1):
                            return t
                        return t.view(n, -1)[:, cols].reshape(-1) if per_sample else t[cols]

                    run_params = (cut(params[0]), cut(params[1]), cut(act_weight))
                    run_stats: Any = [cut(t, first.norm == "instance") for t in statistics[:2]]
                    x, conv_grad = _cat(inputs[a:b], 1), partial(activation_grad, run=run)
                    grad_x, *grads = _norm_act_backward(conv_grad, x, run_params, run_stats, first, needs)
                    del x
                    pieces = zip(_split(grad_x, channels[a:b], 1), inputs[a:b], input_needs_grad[a:b], strict=True)
                    input_grads += [g.to(t.dtype) if needed else None for g, t, needed in pieces]
                    parts.append(grads)
                param_grads[0], param_grads[1], act_grads[0] = (  # PReLU's one weight: its gradient summed
                    None if g[0] is None else sum(g[1:], g[0]) if i == 2 and g[0].numel() == 1 else _cat(g)
                    for i, g in enumerate(zip(*parts, strict=True))
                )
            if grad_conv_weight:
                param_grads[2] = _cat(grad_conv_weight, 1)
        param_grads = [g if g is None else g.to(p.dtype) for g, p in zip(param_grads, params, strict=True)]
        act_grads = [g for g, stage in zip(act_grads, stages, strict=True) if stage.act[0] == "prelu"]
        return (None, None, *param_grads, *input_grads, *act_grads)


def _differentiate(
    ctx: Any,
    stages: Sequence[_Stage],
    tensors: Sequence[Tensor],
    skip: int,
    recompute: Callable[..., list[Tensor]],
    grads: list[Tensor],
) -> list[Tensor | None]:
    """A backward that autograd can differentiate again (``create_graph=True``): ``recompute`` of the saved
    ``tensors`` (the function's inputs after ``skip`` non-tensor ones) with differentiable operations (batch
    statistics a function of the input, running statistics never updated), differentiated keeping the graph."""
    if any(stage.sync is not None for stage in stages):
        raise RuntimeError(
            "double backward (create_graph=True) through synchronized batch norms is not supported in the "
            "memory-efficient modes: use efficient=False, or plain BatchNorm"
        )
    needs = ctx.needs_input_grad[skip:]
    # Aliases, so that the gradients are partial derivatives: differentiating with respect to the saved
    # tensors themselves would add the paths between them (a later feature map computed from an earlier one).
    tensors = [t.view_as(t) if needed else t for t, needed in zip(tensors, needs, strict=True)]
    with autocast_off(grads[0].device.type):
        outputs = recompute(*tensors)
    wanted = [t for t, needed in zip(tensors, needs, strict=True) if needed]
    results = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    return [next(results) if needed else None for needed in needs]


# ----------------------------------------------------------------------------------------------- the stem


@dataclass(frozen=True)
class _MaxPool:
    """A max pooling's geometry, over two or three spatial dimensions (1D pools run as 2D, one row high)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool

    @classmethod
    def of(cls, pool: nn.Module, spatial_dims: int) -> _MaxPool:
        def sizes(value: Any, first: int = 1) -> tuple[int, ...]:
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial_dims
            return (first, *values) if spatial_dims == 1 else values

        kernel_size = sizes(pool.kernel_size)
        stride = sizes(pool.stride) if pool.stride else kernel_size
        return cls(kernel_size, stride, sizes(pool.padding, 0), sizes(pool.dilation), bool(pool.ceil_mode))


def _as_pooled(x: Tensor) -> Tensor:
    """``x`` with two or three spatial dimensions: a signal (N, C, L) as an image one row high."""
    return x.unsqueeze(2) if x.dim() == 3 else x


def _max_pool(x: Tensor, pool: _MaxPool) -> tuple[Tensor, Tensor]:
    """Max pooling of ``x`` (N, C, *spatial, 2 or 3 spatial dimensions): output and flat int64 input indices."""
    max_pool = torch.ops.aten.max_pool2d_with_indices if x.dim() == 4 else torch.ops.aten.max_pool3d_with_indices
    return max_pool(x, *astuple(pool))


def _window_starts(pool: _MaxPool, dim: int, indices: Tensor) -> Tensor:
    """First input coordinate along spatial dimension ``dim`` of each output's window, shaped to broadcast."""
    shape = [1] * indices.dim()
    shape[2 + dim] = indices.shape[2 + dim]
    return (torch.arange(shape[2 + dim], device=indices.device) * pool.stride[dim] - pool.padding[dim]).view(shape)


def _window_positions(indices: Tensor, input_sizes: Sequence[int], pool: _MaxPool) -> Tensor:
    """Flat input indices of a max pooling -> each maximum's position inside its window, in the narrowest integer
    type (uint8 for 3x3 or 3x3x3 windows: a sixteenth of the int64 indices' bytes)."""
    coordinates: list[Tensor] = []
    remaining = indices
    for size in reversed(input_sizes):
        coordinates.insert(0, remaining % size)
        remaining = remaining // size
    position = torch.zeros_like(indices)
    for dim, coordinate in enumerate(coordinates):
        offset = (coordinate - _window_starts(pool, dim, indices)) // pool.dilation[dim]
        position = position * pool.kernel_size[dim] + offset
    window = math.prod(pool.kernel_size)
    return position.to(torch.uint8 if window <= 256 else torch.int16 if window <= 2**15 else torch.int32)


def _flat_indices(positions: Tensor, input_sizes: Sequence[int], pool: _MaxPool) -> Tensor:
    """Inverse of :func:`_window_positions`: the flat int64 input indices the pooling backward kernel takes."""
    remaining = positions.long()
    offsets: list[Tensor] = []
    for kernel in reversed(pool.kernel_size):
        offsets.insert(0, remaining % kernel)
        remaining = remaining // kernel
    indices = torch.zeros_like(remaining)
    for dim, (offset, size) in enumerate(zip(offsets, input_sizes, strict=True)):
        indices = indices * size + _window_starts(pool, dim, positions) + offset * pool.dilation[dim]
    return indices


def _channel_runs(channels: int, stage: _Stage) -> list[slice]:
    """The stem's four channel runs, so that its transients are a quarter of its output (one for synchronized batch
    norm: one collective per pass)."""
    width = channels if stage.sync is not None else -(-channels // 4)
    return [slice(start, min(start + width, channels)) for start in range(0, channels, width)]


class _ConvBnReluMaxPool(torch.autograd.Function):
    """An ImageNet stem, ``max_pool(relu(bn(conv(x))))``, with the training- or eval-mode batch norm exact.
    ``apply`` takes the batch norm's :class:`_Stage`, the :class:`_MaxPool`, ``keep_activation`` (also return the
    BN-ReLU output), ``x``, the convolution's weight, the norm's weight and bias; returns the pooled output, or
    ``(pooled, activation)``.

    Stored for backward: the per-channel statistics and each maximum's position in its pooling window (one byte,
    not plain autograd's int64 index); the input is referenced (the caller holds it anyway) and backward recomputes
    the convolution from it (1 or 3 input channels: a few percent of a step). Plain autograd stores 2.5 times the
    convolution's output. Both passes run by :func:`_channel_runs`, so the transients are a run's, except the
    convolution output's gradient, held whole when the input needs a gradient (one convolution backward over all
    channels: plain autograd's order)."""

    @staticmethod
    def forward(ctx, stage: _Stage, pool: _MaxPool, keep_activation: bool, x: Tensor, *params: Tensor) -> Any:
        conv_weight, norm_weight, norm_bias = params
        compute_dtype = autocast_dtype(x.device.type)
        pooled_parts, positions, statistics = [], [], []
        activation: Tensor | None = None
        channels = conv_weight.shape[0]
        with autocast_off(x.device.type):
            inputs, weight = _to(x, compute_dtype), _to(conv_weight, compute_dtype)
            for part in _channel_runs(channels, stage):
                conv_output = _conv(inputs, weight[part], stage)
                # The running statistics of channels part: views, updated in place
                mean, var = (None if t is None else t[part] for t in (stage.running_mean, stage.running_var))
                part_stage = replace(stage, running_mean=mean, running_var=var)
                activated, first, second = _norm(conv_output, norm_weight[part], norm_bias[part], part_stage)
                activated = activated.relu_()
                pooled, indices = _max_pool(_as_pooled(activated), pool)
                positions.append(_window_positions(indices, _as_pooled(activated).shape[2:], pool))
                del indices, conv_output
                pooled_parts.append(pooled)
                statistics.append((first, second))
                if keep_activation:
                    if activation is None:
                        activation = activated.new_empty((activated.shape[0], channels, *activated.shape[2:]))
                    activation[:, part] = activated
                del activated
            output = torch.cat(pooled_parts, 1)
        del pooled_parts
        ctx.stage, ctx.pool, ctx.compute_dtype = stage, pool, compute_dtype
        ctx.save_for_backward(x, *params, *(torch.cat(s) for s in zip(*statistics, strict=True)), *positions)
        output = output.squeeze(2) if x.dim() == 3 else output
        return output if activation is None else (output, activation)

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_activation: Tensor | None = None):
        stage: _Stage = ctx.stage
        if torch.is_grad_enabled():  # create_graph=True (see _differentiate)

            def recompute(x: Tensor, conv_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor) -> list[Tensor]:
                conv_output = _conv(_to(x, ctx.compute_dtype), _to(conv_weight, ctx.compute_dtype), stage)
                activated = _norm(conv_output, norm_weight, norm_bias, stage, update_running_stats=False)[0].relu()
                pooled = _max_pool(_as_pooled(activated), ctx.pool)[0].view_as(grad_output)
                return [pooled] if grad_activation is None else [pooled, activated]

            out_grads = [grad_output] if grad_activation is None else [grad_output, grad_activation]
            return None, None, None, *_differentiate(ctx, [stage], ctx.saved_tensors[:4], 3, recompute, out_grads)
        x, conv_weight, norm_weight, norm_bias, first, second, *positions = ctx.saved_tensors
        channels = conv_weight.shape[0]
        needs = ctx.needs_input_grad[3:]
        mean, invstd = _statistics((first, second), stage)
        grad_conv_output: Tensor | None = None  # kept whole only for the input's gradient (see below)
        grad_weights, norm_weight_grads, norm_bias_grads = [], [], []
        with autocast_off(x.device.type):
            inputs, weight = _to(x, ctx.compute_dtype), _to(conv_weight, ctx.compute_dtype)
            for index, part in enumerate(_channel_runs(channels, stage)):
                conv_output = _conv(inputs, weight[part], stage)
                shift_scale = _shift_scale(norm_weight[part], norm_bias[part], mean[part], invstd[part], conv_output)
                activated = _bn_relu_into(conv_output, *shift_scale, None, False)
                pooled_input = _as_pooled(activated)
                indices = _flat_indices(positions[index], pooled_input.shape[2:], ctx.pool)
                grad_part = _as_pooled(grad_output[:, part]).to(activated.dtype)
                max_pool_backward = getattr(torch.ops.aten, f"max_pool{pooled_input.dim() - 2}d_with_indices_backward")
                grad = max_pool_backward(grad_part, pooled_input, *astuple(ctx.pool), indices).view_as(activated)
                del indices, pooled_input
                if grad_activation is not None:
                    grad += grad_activation[:, part]
                grad = _relu_backward_(grad, activated)
                del activated
                mask = [True, needs[2], needs[3]]
                grad_conv, *norm_grads = _norm_backward(
                    grad, conv_output, norm_weight[part], (first[part], second[part]), stage, mask
                )
                del grad, conv_output
                assert grad_conv is not None
                norm_weight_grads += norm_grads[:1] if needs[2] else []
                norm_bias_grads += norm_grads[1:] if needs[3] else []
                grad_weights += [_conv_backward(grad_conv, inputs, weight[part], stage, needs[1], False)[1]]
                if needs[0]:
                    if grad_conv_output is None:
                        grad_conv_output = grad_conv.new_empty((grad_conv.shape[0], channels, *grad_conv.shape[2:]))
                    grad_conv_output[:, part] = grad_conv
                del grad_conv
            # The input's gradient sums over every output channel: one convolution backward over all of them sums
            # in plain autograd's order (per run, the partial sums would round differently). Only when the input
            # needs a gradient (gradient penalties, attributions) is the convolution output's gradient held whole.
            grad_x = (
                None if grad_conv_output is None else _conv_backward(grad_conv_output, inputs, weight, stage, False)[0]
            )
            del grad_conv_output
        grads: list[list[Any]] = [[] if grad_x is None else [grad_x], grad_weights if needs[1] else []]
        grads += [norm_weight_grads, norm_bias_grads]
        wanted = (x, conv_weight, norm_weight, norm_bias)
        return None, None, None, *(_cat(g).to(t.dtype) if g else None for g, t in zip(grads, wanted, strict=True))
