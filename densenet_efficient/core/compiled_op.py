"""The memory-efficient autograd functions as opaque operators for ``torch.compile``.

``torch.compile`` traces through a plain ``torch.autograd.Function`` and then chooses itself what to keep for
backward (densenet121 at batch 8, 224 px, ``efficient=True``: 0.70 x naive compiled, 0.31 x eager). Under
compilation :mod:`.efficient` calls ``torch.library.custom_op`` operators instead:
``densenet_efficient::bn_relu_conv_chain`` for ``_BnReluConvChain`` (dense layers, transitions, the final norm),
``densenet_efficient::conv_bn_relu_max_pool`` for ``_ConvBnReluMaxPool`` (the ImageNet stem) and, in mode
"max", ``densenet_efficient::dense_block`` for a block's layers (:class:`_DenseBlockChain`). The compiler
fuses around them but cannot see inside, and saves what ``setup_context`` saves: what the eager function saves.
Each backward is an operator too (``..._backward``; traced, inductor kept more alive than eager; a block's: one
per layer, :func:`_block_backward`). Both run the eager functions' own code on a stand-in context (the same
values) on tensors in the layout inductor gives them (``flexible_layout``: no copy of a channels-last map per
operator). Arguments (:func:`_stage_arguments`): the
function's tensors, running statistics, ints and floats; each returns the updated running statistics (copies),
the function's output(s), then the tensors its forward saved that are not inputs. Synchronized batch norms and
``torch.export`` trace the function itself (:func:`_falls_back`); ``torch.compile`` refuses double backward of a
compiled model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .functional import _BnReluConvChain, _ConvBnReluMaxPool, _MaxPool, _Stage, autocast_dtype, autocast_off

# Stage kinds: how a stage's batch norm normalises, and which running statistics it holds.
_TRAIN_UPDATING = 0  # batch statistics, running statistics updated (training, tracking them)
_TRAIN_UNTRACKED = 1  # batch statistics, no running statistics (training without tracking; eval without them)
_FROZEN = 2  # running statistics read (eval mode)

# By the operator's structure: its number of results, and where each tensor its forward saves comes from (an index
# into its tensors, frozen statistics and extra outputs; None for None). The forward (real or fake, which runs
# first) records it for setup_context: the functions save by structure, not values.
_LAYOUTS: dict[tuple[Any, ...], tuple[int, tuple[int | None, ...]]] = {}


class _ForwardContext:
    """What an eager function's forward records on its context: attributes, and the tensors it saves."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved = tensors


def _stage_arguments(stages: Sequence[_Stage]) -> tuple[list[Tensor], list[Tensor], list[int], list[float]]:
    """The operator arguments that describe ``stages``: updated and frozen running statistics, ints (per stage its
    kind, pooling, groups and spatial dimensions, none without convolution; then each stage's stride, padding and
    dilation) and floats (each stage's momentum, then each one's eps)."""
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
        ints += (int(stage.pool), stage.groups, len(stage.stride))
        geometry += (*stage.stride, *stage.padding, *stage.dilation)
    return updated, frozen, ints + geometry, [s.momentum for s in stages] + [s.eps for s in stages]


def _stages(
    updated: Sequence[Tensor], frozen: Sequence[Tensor], ints: list[int], floats: list[float]
) -> tuple[tuple[_Stage, ...], list[int]]:
    """The stages the operator's arguments describe (see :func:`_stage_arguments`), and the ints after theirs.
    Empty ``updated`` and ``frozen``: stages without running statistics, for backward (it reads the saved ones)."""
    stages = []
    running = {_TRAIN_UPDATING: iter(updated), _FROZEN: iter(frozen)}
    num_stages = len(floats) // 2
    start = 4 * num_stages
    for index in range(num_stages):
        kind, pool, groups, dims = ints[4 * index : 4 * index + 4]
        mean, var = (next(running[kind], None), next(running[kind], None)) if kind in running else (None, None)
        stride, padding, dilation = (tuple(ints[start + k * dims : start + (k + 1) * dims]) for k in range(3))
        start += 3 * dims
        momentum, eps = floats[index], floats[num_stages + index]
        stages.append(
            _Stage(mean, var, momentum, eps, stride, padding, dilation, groups, kind != _FROZEN, pool=bool(pool))
        )
    return tuple(stages), ints[start:]


def _with_gaps(items: Sequence[Any], stages: Sequence[_Stage], gap: Any) -> list[Any]:
    """``items``, one per tensor the eager function takes, with ``gap`` for the convolution weight of each stage
    without convolution (a chain's: its parameters come first, norm weight, norm bias, convolution weight)."""
    gaps = {3 * index + 2 for index, stage in enumerate(stages) if not stage.stride}
    remaining = iter(items)
    return [gap if index in gaps else next(remaining) for index in range(len(items) + len(gaps))]


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


def _custom_op(name: str, impl: Callable[..., Any], mutates_args: tuple[str, ...] = ()) -> Any:
    """``impl`` as the operator ``densenet_efficient::name``, ``impl`` itself on fake tensors (shapes only)."""
    operator = torch.library.custom_op(
        f"densenet_efficient::{name}", impl, mutates_args=mutates_args, tags=torch.Tag.flexible_layout
    )
    operator.register_fake(impl)
    return operator


def _operator(
    name: str, function: Any, arguments: Callable[[Any, list[int]], dict[str, Any]], formula: Any = None
) -> Any:
    """``function`` as the operator ``densenet_efficient::name`` with its backward ``..._backward``; ``arguments``:
    the function's arguments before its tensors from the stages and the ints after theirs, by the names its forward
    gives them on its context. ``formula(ctx, grads)``: the inputs' gradients, if not by ``..._backward``."""

    def forward(
        tensors: list[Tensor],
        updated: list[Tensor],
        frozen: list[Tensor],
        ints: list[int],
        floats: list[float],
        compute_dtype: torch.dtype | None,
    ) -> list[Tensor]:
        # A functional operator (autograd cannot be registered for a mutating one): training norms update copies of
        # their running statistics, returned for the caller to copy back once.
        updated = [t.clone() for t in updated]
        stages, tail = _stages(updated, frozen, ints, floats)
        context = _ForwardContext()
        device_type = tensors[0].device.type  # the caller's autocast state again: the compute dtype's source
        with torch.autocast(device_type, dtype=compute_dtype) if compute_dtype else autocast_off(device_type):
            results = function.forward(context, *arguments(stages, tail).values(), *_with_gaps(tensors, stages, None))
        results = list(results) if isinstance(results, tuple) else [results]
        inputs = (*tensors, *frozen, *results)
        extras = [t for t in context.saved if t is not None and all(t is not i for i in inputs)]
        positions = {id(t): index for index, t in enumerate((*inputs, *extras))}
        layout = tuple(None if t is None else positions[id(t)] for t in context.saved)
        outputs = [*updated, *results, *extras]
        _LAYOUTS[(name, len(tensors), tuple(ints), len(outputs))] = (len(results), layout)
        return outputs

    def backward_op(
        grads: list[Tensor],
        saved: list[Tensor | None],
        ints: list[int],
        floats: list[float],
        compute_dtype: torch.dtype | None,
        needs_input_grad: list[bool],
    ) -> list[Tensor]:
        """The gradients ``needs_input_grad`` asks for, by the eager function's backward from what it saved."""
        stages, tail = _stages([], [], ints, floats)
        leading = arguments(stages, tail)
        needs = _with_gaps(needs_input_grad, stages, False)
        context = SimpleNamespace(
            saved_tensors=tuple(saved),
            needs_input_grad=(False,) * len(leading) + tuple(needs),
            compute_dtype=compute_dtype,
            num_inputs=len(needs) - 3 * len(stages),  # the chain's feature maps
            **leading,
        )
        # The compiled backward is never differentiated again (torch.compile refuses create_graph=True).
        with torch.no_grad():
            gradients = function.backward(context, *grads)[len(leading) :]
        return [grad for grad, needed in zip(gradients, needs, strict=True) if needed]

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
        tensors, updated, frozen, ints, floats, compute_dtype = inputs
        num_results, layout = _LAYOUTS[(name, len(tensors), tuple(ints), len(output))]
        ctx.results = slice(len(updated), len(updated) + num_results)
        # Running statistics and saved tensors: no gradient flows back.
        ctx.mark_non_differentiable(*output[: ctx.results.start], *output[ctx.results.stop :])
        available = (*tensors, *frozen, *output[ctx.results], *output[ctx.results.stop :])
        ctx.save_for_backward(*(None if index is None else available[index] for index in layout))
        ctx.arguments = (ints, floats, compute_dtype)
        ctx.needs = [t.requires_grad for t in tensors]
        ctx.layouts = [(t.shape, t.stride(), t.dtype, t.device) for t in tensors]
        ctx.no_gradients = ([None] * len(updated), [None] * len(frozen), None, None, None)

    def backward(ctx: Any, grads: list[Tensor]) -> tuple[Any, ...]:
        if formula is not None:
            return formula(ctx, grads[ctx.results]), *ctx.no_gradients
        computed = iter(backward_operator(grads[ctx.results], list(ctx.saved_tensors), *ctx.arguments, ctx.needs))
        return [next(computed) if needed else None for needed in ctx.needs], *ctx.no_gradients

    if formula is None:  # a block's backward is its own (one operator per layer)
        backward_operator = _custom_op(f"{name}_backward", backward_op)
    operator = _custom_op(name, forward)
    operator.register_autograd(backward, setup_context=setup_context)
    return operator


def _stem_arguments(stages: Sequence[_Stage], tail: list[int]) -> dict[str, Any]:
    """The stem's stage, max pooling and ``keep_activation``; ``tail``: the pooling's kernel size, stride, padding
    and dilation (one per spatial dimension), ``ceil_mode``, ``keep_activation``."""
    dims = (len(tail) - 2) // 4
    kernel_size, stride, padding, dilation = (tuple(tail[k * dims : (k + 1) * dims]) for k in range(4))
    pool = _MaxPool(kernel_size, stride, padding, dilation, bool(tail[-2]))
    return dict(stage=stages[0], pool=pool, keep_activation=bool(tail[-1]))


_chain_op = _operator(
    "bn_relu_conv_chain", _BnReluConvChain, lambda stages, tail: dict(stages=stages, keep_intermediates=bool(tail[0]))
)
_stem_op = _operator("conv_bn_relu_max_pool", _ConvBnReluMaxPool, _stem_arguments)


class _DenseBlockChain:
    """A dense block's layers in mode "max", each a :class:`_BnReluConvChain` on every feature map before it, as
    one operator (:func:`dense_block`). ``forward`` takes ``layers`` (each layer's stages), each layer's parameters
    (norm weight, norm bias, conv weight per stage), the block's input map; returns each layer's new features (N,
    k, *spatial) and saves what each layer's function saves, layer after layer."""

    @staticmethod
    def forward(ctx: Any, layers: Sequence[Sequence[_Stage]], *tensors: Tensor) -> Any:
        params = iter(tensors)
        features = list(tensors[sum(3 * len(stages) for stages in layers) :])
        saved: list[Tensor | None] = []
        for stages in layers:
            layer = _ForwardContext()
            layer_params = [next(params) for _ in range(3 * len(stages))]
            features.append(_BnReluConvChain.forward(layer, stages, False, *layer_params, *features))
            saved += layer.saved
        ctx.save_for_backward(*saved)
        return tuple(features[len(features) - len(layers) :])


def _block_arguments(stages: Sequence[_Stage], tail: list[int]) -> dict[str, Any]:
    """The block's layers (``tail``: each layer's number of stages)."""
    ends = [sum(tail[: index + 1]) for index in range(len(tail))]
    return dict(layers=[stages[end - size : end] for end, size in zip(ends, tail, strict=True)])


def _layer_backward_impl(
    grads: list[Tensor],
    into: list[Tensor],
    previous: Tensor | None,
    saved: list[Tensor | None],
    ints: list[int],
    floats: list[float],
    compute_dtype: torch.dtype | None,
    needs_input_grad: list[bool],
    layer: int,
) -> Tensor:
    """Backward of dense layer ``layer`` of a block of one input map (``ints``, ``floats``) from what its function
    saved: from its new features' gradient ``grads[-1]``, the earlier new features' added into ``grads[:-1]``, the
    parameters' written ``into`` (those ``needs_input_grad`` asks for); returns the input map's, plus ``previous``
    (empty if not asked for)."""
    context = SimpleNamespace(
        saved_tensors=tuple(saved),
        needs_input_grad=(False, False, *needs_input_grad),
        compute_dtype=compute_dtype,
        num_inputs=len(grads),
        stages=_block_arguments(*_stages([], [], ints, floats))["layers"][layer],
        keep_intermediates=False,
    )
    with torch.no_grad():
        gradients = _BnReluConvChain.backward(context, grads[-1])[2:]
    count = 3 * len(context.stages)
    for target, grad in zip(into, [g for g in gradients[:count] if g is not None], strict=True):
        target.copy_(grad)
    for target, grad in zip(grads, gradients[count + 1 :], strict=False):
        target.add_(grad)
    result = gradients[count]
    if result is None:
        return grads[-1].new_empty(0)
    # Eager adds in the other order (the earlier sum first): the same sum, as a + b == b + a
    return result if previous is None else result.add_(previous)


_layer_backward = _custom_op("dense_layer_backward", _layer_backward_impl, ("grads", "into"))


def _block_backward(ctx: Any, grads: list[Tensor]) -> list[Tensor | None]:
    """The block's backward, one operator per layer in reverse (:func:`_layer_backward`): each map's partial
    gradients added into one tensor as they arrive, as eager autograd adds them (inductor summed those of per-layer
    operators last, side by side), the new features' into their own gradients; each layer's saved tensors and
    gradient free once its operator has run."""
    ints, floats, compute_dtype = ctx.arguments
    layers = _block_arguments(*_stages([], [], ints, floats))["layers"]
    num_params = sum(3 * len(stages) for stages in layers)
    accumulated = [g.clone() if 0 in g.stride() else g for g in grads]  # a sum's expanded: copied
    into = [torch.empty_strided(*layout[:2], dtype=layout[2], device=layout[3]) for layout in ctx.layouts[:-1]]
    end, param_end, needs, input_grad = len(ctx.saved_tensors), num_params, ctx.needs, None
    for index in reversed(range(len(layers))):
        stages, count = layers[index], 3 * len(layers[index])
        start = end - (5 * len(stages) + 1 + index)  # parameters, statistics, input maps
        layer_needs = [*needs[param_end - count : param_end], needs[-1], *[True] * index]
        wanted = [t for t, needed in zip(into[param_end - count : param_end], layer_needs, strict=False) if needed]
        saved = list(ctx.saved_tensors[start:end])
        rest = (saved, ints, floats, compute_dtype, layer_needs, index)
        input_grad = _layer_backward(accumulated[: index + 1], wanted, input_grad, *rest)
        end, param_end = start, param_end - count
    return [grad if needed else None for grad, needed in zip([*into, input_grad], needs, strict=True)]


_block_op = _operator("dense_block", _DenseBlockChain, _block_arguments, _block_backward)


def _run(operator: Any, stages: Sequence[_Stage], tail: list[int], tensors: Sequence[Tensor | None]) -> list[Tensor]:
    """The outputs of the eager function of ``operator`` on ``stages``, ``tensors`` and the ints ``tail``."""
    updated, frozen, ints, floats = _stage_arguments(stages)
    present = [t for t in tensors if t is not None]
    outputs = operator(present, updated, frozen, ints + tail, floats, autocast_dtype(present[0].device.type))
    with torch.no_grad():  # the updated running statistics into the buffers, once per forward as in eager
        for running, value in zip(updated, outputs, strict=False):
            running.copy_(value)
    return outputs[len(updated) :]


def bn_relu_conv_chain(stages: Sequence[_Stage], keep_intermediates: bool, *tensors: Tensor | None) -> Tensor:
    """``_BnReluConvChain.apply(stages, keep_intermediates, *tensors)`` as one opaque operator (see
    :func:`_falls_back` for when the function itself runs, traced through by the compiler)."""
    if _falls_back(stages):
        return _BnReluConvChain.apply(stages, keep_intermediates, *tensors)
    return _run(_chain_op, stages, [int(keep_intermediates)], tensors)[0]


def conv_bn_relu_max_pool(
    stage: _Stage, pool: _MaxPool, keep_activation: bool, x: Tensor, *params: Tensor
) -> Tensor | tuple[Tensor, Tensor]:
    """``_ConvBnReluMaxPool.apply(stage, pool, keep_activation, x, conv_weight, norm_weight, norm_bias)`` as one
    opaque operator; falls back as :func:`bn_relu_conv_chain` does."""
    if _falls_back([stage]):
        return _ConvBnReluMaxPool.apply(stage, pool, keep_activation, x, *params)
    tail = [*pool.kernel_size, *pool.stride, *pool.padding, *pool.dilation, int(pool.ceil_mode), int(keep_activation)]
    outputs = _run(_stem_op, [stage], tail, (x, *params))
    return (outputs[0], outputs[1]) if keep_activation else outputs[0]


def dense_block(layers: Sequence[Sequence[_Stage]], params: Sequence[Tensor], x: Tensor) -> list[Tensor]:
    """A dense block's new features in mode "max" as one operator (:class:`_DenseBlockChain`): ``layers``' stages,
    each layer's parameters (norm weight, norm bias, conv weight per stage), the block's input map ``x`` (N, C,
    *spatial)."""
    stages = [stage for layer in layers for stage in layer]
    return _run(_block_op, stages, [len(layer) for layer in layers], (*params, x))[: len(layers)]
