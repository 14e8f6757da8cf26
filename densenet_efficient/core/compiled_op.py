"""The memory-efficient autograd functions as opaque operators for ``torch.compile``.

``torch.compile`` traces through a plain ``torch.autograd.Function`` and then chooses itself what to keep for
backward (densenet121 at batch 8, 224 px, ``efficient=True``: 0.70 x naive compiled, 0.31 x eager). Under
compilation :mod:`.efficient` calls ``torch.library.custom_op`` operators instead:
``densenet_efficient::bn_relu_conv_chain`` for ``_BnReluConvChain`` (dense layers, transitions, the final norm)
and ``densenet_efficient::conv_bn_relu_max_pool`` for ``_ConvBnReluMaxPool`` (the ImageNet stem). The compiler
fuses around them but cannot see inside, and saves what ``setup_context`` saves: what the eager function saves.
Each backward is an operator too (``..._backward``; traced, inductor kept more alive than eager). Both run the
eager functions' own code on a stand-in context (the same values) on tensors in the layout inductor gives them
(``flexible_layout``: no copy of a channels-last map per operator). Arguments are tensors and plain values
(:func:`_stage_arguments`); each returns its output(s), the updated running statistics (copies), then the tensors
its forward saved that are not inputs. Synchronized batch norms and ``torch.export`` trace the function itself
(:func:`_falls_back`); ``torch.compile`` refuses double backward of a compiled model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import Tensor

from .functional import _BnReluConvChain, _ConvBnReluMaxPool, _MaxPool, _Stage, autocast_dtype, autocast_off

# Stage kinds: how a stage's batch norm normalises, and which running statistics it holds.
_TRAIN_UPDATING = 0  # batch statistics, running statistics updated (training, tracking them)
_TRAIN_UNTRACKED = 1  # batch statistics, no running statistics (training without tracking; eval without them)
_FROZEN = 2  # running statistics read (eval mode)

# By the operator's structure, where each tensor its forward saves comes from (see _save_layout).
_LAYOUTS: dict[tuple[Any, ...], tuple[tuple[str, int], ...]] = {}


class _ForwardContext:
    """What an eager function's forward records on its context: attributes, and the tensors it saves."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved = tensors


def _stage_arguments(stages: Sequence[_Stage]) -> tuple[list[Tensor], list[Tensor], list[int], list[float]]:
    """The operator arguments that describe ``stages``: updated and frozen running statistics, ints (per stage its
    kind, pooling and groups, then each stage's stride, padding and dilation: none without convolution) and floats
    (each stage's momentum, then each one's eps)."""
    updated: list[Tensor] = []
    frozen: list[Tensor] = []
    ints: list[int] = []
    geometry: list[int] = []
    for stage in stages:
        if stage.running_mean is not None and stage.running_var is not None:
            (updated if stage.batch_stats else frozen).extend((stage.running_mean, stage.running_var))
            ints.append(_TRAIN_UPDATING if stage.batch_stats else _FROZEN)
        else:
            ints.append(_TRAIN_UNTRACKED)
        ints += (int(stage.pool), stage.groups)
        geometry += (*stage.stride, *stage.padding, *stage.dilation)
    return updated, frozen, ints + geometry, [s.momentum for s in stages] + [s.eps for s in stages]


def _stages(
    params: Sequence[Tensor | None],
    updated: Sequence[Tensor],
    frozen: Sequence[Tensor],
    ints: list[int],
    floats: list[float],
) -> tuple[_Stage, ...]:
    """The stages the operator's arguments describe (see :func:`_stage_arguments`); ``params``: norm weight, norm
    bias and convolution weight per stage, whose convolution weights give the geometry's dimensions. Empty
    ``updated`` and ``frozen``: stages without running statistics, for backward (it reads the saved ones)."""
    stages = []
    running = {_TRAIN_UPDATING: iter(updated), _FROZEN: iter(frozen)}
    num_stages = len(floats) // 2
    start = 3 * num_stages
    for index in range(num_stages):
        kind, pool, groups = ints[3 * index : 3 * index + 3]
        mean, var = (next(running[kind], None), next(running[kind], None)) if kind in running else (None, None)
        conv_weight = params[3 * index + 2]
        dims = 0 if conv_weight is None else conv_weight.dim() - 2
        stride, padding, dilation = (tuple(ints[start + k * dims : start + (k + 1) * dims]) for k in range(3))
        start += 3 * dims
        momentum, eps = floats[index], floats[num_stages + index]
        stages.append(
            _Stage(mean, var, momentum, eps, stride, padding, dilation, groups, kind != _FROZEN, pool=bool(pool))
        )
    return tuple(stages)


def _falls_back(stages: Sequence[_Stage]) -> bool:
    """Whether ``stages`` run as the eager function, traced through: under ``torch.export`` (exported programs hold
    standard operators only), and with a warning for synchronized batch norms (collectives need the trace)."""
    if torch.compiler.is_exporting():
        return True
    if any(stage.sync is not None for stage in stages):
        warnings.warn(
            "torch.compile of synchronized batch norms in the memory-efficient modes: their collectives cannot "
            "run inside the opaque operator, so the autograd function is traced through and what it saves for "
            "backward is the compiler's choice (more memory than eager)",
            stacklevel=4,
        )
        return True
    return False


def _save_layout(key: tuple[Any, ...], saved: Sequence[Tensor | None], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """Record under ``key`` where each of the ``saved`` tensors comes from: ``("input", i)``, the operator's
    ``inputs[i]`` (``None`` too), or ``("extra", j)``, the j-th extra output. The forward (real or fake, which runs
    first) records it for setup_context: the functions save by structure, not values. Returns the extra outputs
    (their number completes the key: the stem saves one tensor per channel run)."""
    positions = {id(t): index for index, t in enumerate(inputs)}
    layout: list[tuple[str, int]] = []
    extras: list[Tensor] = []
    for tensor in saved:
        if id(tensor) in positions:
            layout.append(("input", positions[id(tensor)]))
        else:
            assert tensor is not None
            layout.append(("extra", len(extras)))
            extras.append(tensor)
    _LAYOUTS[key + (len(extras),)] = tuple(layout)
    return extras


def _saved(key: tuple[Any, ...], inputs: Sequence[Tensor | None], extras: Sequence[Tensor]) -> list[Tensor | None]:
    """The tensors the forward saved, from the operator's inputs and extra outputs, as :func:`_save_layout`
    recorded them."""
    return [inputs[i] if source == "input" else extras[i] for source, i in _LAYOUTS[key + (len(extras),)]]


def _no_gradients(inputs: Sequence[Any]) -> list[Any]:
    """A gradient of nothing for each operator input, structured as ``torch.library`` expects: a list of ``None``
    for a list of tensors (an empty list too), else ``None``."""
    return [[None] * len(a) if isinstance(a, list) and all(isinstance(t, Tensor) for t in a) else None for a in inputs]


def _operator(name: str, impl: Callable[..., list[Tensor]]) -> Any:
    """``impl`` as the operator ``densenet_efficient::name``, ``impl`` itself on fake tensors (shapes only)."""
    operator = torch.library.custom_op(
        f"densenet_efficient::{name}", impl, mutates_args=(), tags=torch.Tag.flexible_layout
    )
    operator.register_fake(impl)
    return operator


# --------------------------------------------------------------------------------------- BN-ReLU-Conv chains


def _chain_params(params: Sequence[Tensor], convolved: Sequence[bool]) -> list[Tensor | None]:
    """The eager function's parameters, norm weight, norm bias and convolution weight per stage (``None`` for a
    stage without convolution), from the operator's: a list of tensors only (autograd is registered for lists of
    tensors, not of optional ones), and per stage whether it has a convolution."""
    tensors = iter(params)
    return [t for has_conv in convolved for t in (next(tensors), next(tensors), next(tensors) if has_conv else None)]


def _chain_impl(
    params: list[Tensor],
    convolved: list[bool],
    features: list[Tensor],
    updated: list[Tensor],
    frozen: list[Tensor],
    ints: list[int],
    floats: list[float],
    keep_intermediates: bool,
    compute_dtype: torch.dtype | None,
) -> list[Tensor]:
    """The chain's output, the updated running statistics (for ``updated``), then the tensors saved for backward
    that are not inputs (see the module's docstring)."""
    # A functional operator (autograd cannot be registered for a mutating one): training norms update copies of
    # their running statistics, returned for the caller to copy back once.
    updated = [t.clone() for t in updated]
    chain_params = _chain_params(params, convolved)
    stages = _stages(chain_params, updated, frozen, ints, floats)
    context = _ForwardContext()
    device_type = features[0].device.type  # the caller's autocast state again: the compute dtype's source
    with torch.autocast(device_type, dtype=compute_dtype) if compute_dtype else autocast_off(device_type):
        # A None parameter: the convolution weight of a stage without convolution.
        output = _BnReluConvChain.forward(context, stages, keep_intermediates, *chain_params, *features)  # type: ignore[arg-type]
    key = ("chain", tuple(convolved), len(features), tuple(ints), keep_intermediates)
    extras = _save_layout(key, context.saved, (*chain_params, *features, *frozen))
    return [output, *updated, *extras]


_chain_op = _operator("bn_relu_conv_chain", _chain_impl)


def _chain_backward_impl(
    grad_output: Tensor,
    saved: list[Tensor | None],
    ints: list[int],
    floats: list[float],
    keep_intermediates: bool,
    compute_dtype: torch.dtype | None,
    num_inputs: int,
    needs_input_grad: list[bool],
) -> list[Tensor]:
    """The gradients ``needs_input_grad`` asks for, of the eager function's parameters then feature maps, by its
    backward from the tensors its forward saved (``saved``: parameters first)."""
    stages = _stages(saved[: 3 * (len(floats) // 2)], [], [], ints, floats)
    needs = (False, False, *needs_input_grad)
    attributes = dict(stages=stages, keep_intermediates=keep_intermediates, compute_dtype=compute_dtype)
    context = SimpleNamespace(saved_tensors=tuple(saved), needs_input_grad=needs, num_inputs=num_inputs, **attributes)
    # The compiled backward is never differentiated again (torch.compile refuses create_graph=True).
    with torch.no_grad():
        gradients = _BnReluConvChain.backward(context, grad_output)[2:]
    return [grad for grad, needed in zip(gradients, needs_input_grad, strict=True) if needed]


_chain_backward_op = _operator("bn_relu_conv_chain_backward", _chain_backward_impl)


def _chain_setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    params, convolved, features, updated, frozen, *arguments = inputs
    ctx.mark_non_differentiable(*output[1:])  # running statistics and saved tensors: no gradient flows back
    key = ("chain", tuple(convolved), len(features), tuple(arguments[0]), arguments[2])
    chain_params = _chain_params(params, convolved)
    ctx.save_for_backward(*_saved(key, (*chain_params, *features, *frozen), output[1 + len(updated) :]))
    ctx.arguments = (*arguments, len(features))
    ctx.needs = [t is not None and t.requires_grad for t in (*chain_params, *features)]
    ctx.chain_present = [t is not None for t in chain_params]
    ctx.no_gradients = _no_gradients(inputs)


def _chain_backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    assert grads[0] is not None, "backward reached the chain without a gradient for its output"
    computed = iter(_chain_backward_op(grads[0], list(ctx.saved_tensors), *ctx.arguments, ctx.needs))
    gradients = [next(computed) if needed else None for needed in ctx.needs]
    present = ctx.chain_present
    param_grads = [grad for grad, is_param in zip(gradients[: len(present)], present, strict=True) if is_param]
    return param_grads, ctx.no_gradients[1], gradients[len(present) :], *ctx.no_gradients[3:]


_chain_op.register_autograd(_chain_backward, setup_context=_chain_setup_context)


def bn_relu_conv_chain(stages: Sequence[_Stage], keep_intermediates: bool, *tensors: Tensor | None) -> Tensor:
    """``_BnReluConvChain.apply(stages, keep_intermediates, *tensors)`` as one opaque operator (see
    :func:`_falls_back` for when the function itself runs, traced through by the compiler)."""
    if _falls_back(stages):
        return _BnReluConvChain.apply(stages, keep_intermediates, *tensors)
    num_params = 3 * len(stages)
    convolved = [tensors[index] is not None for index in range(2, num_params, 3)]
    params = [t for t in tensors[:num_params] if t is not None]
    features = cast(list[Tensor], list(tensors[num_params:]))
    arguments = _stage_arguments(stages)
    outputs = _chain_op(
        params, convolved, features, *arguments, keep_intermediates, autocast_dtype(features[0].device.type)
    )
    with torch.no_grad():  # the updated running statistics into the buffers, once per forward as in eager
        for running, value in zip(arguments[0], outputs[1:], strict=False):
            running.copy_(value)
    return outputs[0]


# ------------------------------------------------------------------------------------------------- the stem


def _max_pool(geometry: Sequence[int], ceil_mode: bool) -> _MaxPool:
    """The :class:`_MaxPool` of ``geometry``: kernel size, stride, padding, dilation, one per spatial dimension."""
    dims = len(geometry) // 4
    kernel_size, stride, padding, dilation = (tuple(geometry[k * dims : (k + 1) * dims]) for k in range(4))
    return _MaxPool(kernel_size, stride, padding, dilation, ceil_mode)


def _stem_impl(
    x: Tensor,
    conv_weight: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    updated: list[Tensor],
    frozen: list[Tensor],
    ints: list[int],
    floats: list[float],
    max_pool: list[int],
    ceil_mode: bool,
    keep_activation: bool,
    compute_dtype: torch.dtype | None,
) -> list[Tensor]:
    """The pooled output, the BN-ReLU output if ``keep_activation``, the updated running statistics (for
    ``updated``), then the tensors saved for backward that are not inputs (see the module's docstring)."""
    updated = [t.clone() for t in updated]  # functional, as the chain's operator
    params = (norm_weight, norm_bias, conv_weight)
    (stage,) = _stages(params, updated, frozen, ints, floats)
    context = _ForwardContext()
    device_type = x.device.type  # as the chain's
    with torch.autocast(device_type, dtype=compute_dtype) if compute_dtype else autocast_off(device_type):
        outputs = _ConvBnReluMaxPool.forward(
            context, stage, _max_pool(max_pool, ceil_mode), keep_activation, x, conv_weight, norm_weight, norm_bias
        )
    key = ("stem", tuple(ints), keep_activation)
    extras = _save_layout(key, context.saved, (x, conv_weight, norm_weight, norm_bias, *frozen))
    return [*(outputs if keep_activation else (outputs,)), *updated, *extras]


_stem_op = _operator("conv_bn_relu_max_pool", _stem_impl)


def _stem_backward_impl(
    grad_output: Tensor,
    grad_activation: Tensor | None,
    saved: list[Tensor],
    ints: list[int],
    floats: list[float],
    max_pool: list[int],
    ceil_mode: bool,
    keep_activation: bool,
    compute_dtype: torch.dtype | None,
    needs_input_grad: list[bool],
) -> list[Tensor]:
    """The gradients ``needs_input_grad`` asks for, of the input, convolution weight, norm weight and norm bias,
    by the eager function's backward from the tensors its forward saved (``saved``), as the chain's."""
    (stage,) = _stages((saved[2], saved[3], saved[1]), [], [], ints, floats)
    pool = _max_pool(max_pool, ceil_mode)
    needs = (False, False, False, *needs_input_grad)
    attributes = dict(stage=stage, pool=pool, compute_dtype=compute_dtype)
    context = SimpleNamespace(saved_tensors=tuple(saved), needs_input_grad=needs, **attributes)
    with torch.no_grad():
        gradients = _ConvBnReluMaxPool.backward(context, grad_output, grad_activation)[3:]
    return [grad for grad, needed in zip(gradients, needs_input_grad, strict=True) if needed]


_stem_backward_op = _operator("conv_bn_relu_max_pool_backward", _stem_backward_impl)


def _stem_setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    x, conv_weight, norm_weight, norm_bias, updated, frozen, *arguments = inputs
    num_outputs = 2 if arguments[-2] else 1  # keep_activation
    ctx.mark_non_differentiable(*output[num_outputs:])
    key = ("stem", tuple(arguments[0]), arguments[-2])
    tensors = (x, conv_weight, norm_weight, norm_bias)
    ctx.save_for_backward(*_saved(key, (*tensors, *frozen), output[num_outputs + len(updated) :]))
    ctx.arguments = arguments
    ctx.needs = [t.requires_grad for t in tensors]
    ctx.no_gradients = _no_gradients(inputs)


def _stem_backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    assert grads[0] is not None, "backward reached the stem without a gradient for its output"
    grad_activation = grads[1] if ctx.arguments[-2] else None  # keep_activation
    computed = iter(_stem_backward_op(grads[0], grad_activation, list(ctx.saved_tensors), *ctx.arguments, ctx.needs))
    return (*(next(computed) if needed else None for needed in ctx.needs), *ctx.no_gradients[4:])


_stem_op.register_autograd(_stem_backward, setup_context=_stem_setup_context)


def conv_bn_relu_max_pool(
    stage: _Stage, pool: _MaxPool, keep_activation: bool, x: Tensor, *params: Tensor
) -> Tensor | tuple[Tensor, Tensor]:
    """``_ConvBnReluMaxPool.apply(stage, pool, keep_activation, x, conv_weight, norm_weight, norm_bias)`` as one
    opaque operator; falls back as :func:`bn_relu_conv_chain` does."""
    if _falls_back([stage]):
        return _ConvBnReluMaxPool.apply(stage, pool, keep_activation, x, *params)
    arguments = _stage_arguments([stage])
    pooling = ([*pool.kernel_size, *pool.stride, *pool.padding, *pool.dilation], pool.ceil_mode)
    outputs = _stem_op(x, *params, *arguments, *pooling, keep_activation, autocast_dtype(x.device.type))
    with torch.no_grad():  # as the chain's
        for running, value in zip(arguments[0], outputs[2 if keep_activation else 1 :], strict=False):
            running.copy_(value)
    return (outputs[0], outputs[1]) if keep_activation else outputs[0]
