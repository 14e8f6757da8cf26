"""The entry points of the memory-efficient layers: each runs a BN-ReLU-Conv chain, a transition, the final norm
and ReLU, or the ImageNet stem as the memory-efficient autograd function of :mod:`.functional`, as that function's
opaque operator of :mod:`.compiled_op` under ``torch.compile``, or as the plain modules, which compute what a naive
DenseNet computes (see :func:`bn_relu_conv` for when each runs, and :mod:`.eligibility` for which modules the
function computes exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import compiled_op
from .eligibility import efficient_obstacle, is_frozen_norm, warn_fallback
from .functional import (
    MemoryMode,
    _avg_pool,
    _BnReluConvChain,
    _ConvBnReluMaxPool,
    _MaxPool,
    _stage,
)


def _apply(function: type[torch.autograd.Function], operator: Callable[..., Any], *args: Any) -> Any:
    """``function.apply(*args)`` or, under ``torch.compile``, ``operator(*args)``: the function as one opaque
    operator of :mod:`.compiled_op` (torch.compile traces through an autograd function and then chooses what to
    save itself)."""
    if torch.compiler.is_compiling():
        return operator(*args)
    return function.apply(*args)


def _use_function(
    features: Sequence[Tensor],
    stages: Sequence[tuple[nn.Module, nn.Module | None]],
    efficient: MemoryMode,
    owner: nn.Module | None = None,
) -> bool:
    """Whether the memory-efficient autograd function should run on ``features`` with the ``(norm, conv)`` pairs
    of ``stages`` (``conv`` ``None`` for a BN-ReLU): ``efficient`` set and a backward pass to come (grad enabled
    and something requiring it), outside ``torch.func`` transforms, forward-mode AD and ``torch.jit.trace``, which
    cannot run it, and batches too small for batch norm's statistics (they get plain modules), and modules that it
    computes exactly (see :mod:`.eligibility`; otherwise a one-time warning names ``owner``, the layer they belong
    to). Tracing a training model raises a ``RuntimeError`` that
    names the alternatives."""
    modules = [module for pair in stages for module in pair if module is not None]
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in features) or any(p.requires_grad for m in modules for p in m.parameters())
    )
    training = any(norm.training and not is_frozen_norm(norm) for norm, _ in stages)
    if efficient and needs_grad and torch.jit.is_tracing() and training:
        raise RuntimeError(
            f"torch.jit.trace cannot record the memory-efficient autograd function (efficient={efficient!r}) "
            "of a training model: trace it in eval mode (model.eval()) or without gradients, switch to "
            "efficient=False (model.set_efficient(False)) for a training trace, or use torch.compile or "
            "torch.fx (they keep the memory savings)"
        )
    if (
        not efficient
        or not needs_grad
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0  # forward-mode AD: the function has no jvp
        or torch.jit.is_tracing()
        or _too_few_values(features[0], training)
    ):
        return False
    obstacle = efficient_obstacle(stages)
    if obstacle is not None:
        warn_fallback(owner if owner is not None else modules[0], *obstacle)
        return False
    return True


def _too_few_values(x: Tensor, training: bool) -> bool:
    """Whether batch norm of ``x`` (N, C, *spatial) must go to the plain modules: an empty batch (batch norm
    passes it through) or, in training, one value per channel (batch norm raises; the function would write NaN
    into ``running_var``). Either way there is nothing to save."""
    values = x.numel() // max(x.shape[1], 1)
    return values == 0 or (training and values == 1)


def _check_channels(features: Sequence[Tensor], norm: _BatchNorm) -> None:
    """Refuse feature maps whose channels do not add up to what ``norm`` normalises (the batch-norm kernels
    would read past or short of its parameters)."""
    channels = [t.shape[1] for t in features]
    expected = norm.weight.shape[0]  # FrozenBatchNorm2d has no num_features
    if sum(channels) != expected:
        raise ValueError(
            f"feature maps of {'+'.join(map(str, channels))} = {sum(channels)} channels, but "
            f"{type(norm).__name__} normalises {expected}: pass the feature maps it was built for"
        )


def bn_relu_conv(
    features: Sequence[Tensor],
    stages: Sequence[tuple[_BatchNorm, _ConvNd]],
    efficient: MemoryMode,
    owner: nn.Module | None = None,
) -> Tensor:
    """Apply ``conv(relu(norm(.)))`` for each ``(norm, conv)`` of ``stages`` to ``cat(features, 1)``.

    ``features``: feature maps (N, C_i, *spatial) whose channels add up to the first norm's ``num_features``.
    With ``efficient`` set and a backward pass to come (grad enabled and something requiring it; batch norms
    training, frozen in eval mode, or a mix), the memory-efficient autograd function runs; otherwise, and under
    ``torch.func`` transforms, plain modules, which cost what a naive DenseNet costs. So do stages the function
    would not compute exactly (see :mod:`.eligibility`: another norm, a convolution bias, hooks, ...), with a
    one-time warning naming ``owner``, the layer they belong to. ``torch.jit.trace`` cannot record the function:
    an eval-mode model traces with the plain modules, and tracing a training model raises a ``RuntimeError`` that
    names the alternatives.
    """
    if _use_function(features, stages, efficient, owner):
        _check_channels(features, stages[0][0])
        params: list[Tensor] = []
        for norm, conv in stages:
            params += (norm.weight, norm.bias, conv.weight)
        chain = tuple(_stage(norm, conv) for norm, conv in stages)
        return _apply(_BnReluConvChain, compiled_op.bn_relu_conv_chain, chain, efficient is True, *params, *features)
    x = torch.cat(list(features), 1) if len(features) > 1 else features[0]
    for norm, conv in stages:
        # In place unless a backward hook made the norm's output a view that autograd forbids modifying.
        x = conv(F.relu(norm(x), inplace=not (norm._backward_hooks or norm._backward_pre_hooks)))
    return x


def _pointwise(conv: _ConvNd) -> bool:
    """Whether ``conv`` is a 1x1 convolution without bias, stride or padding: its output has its input's spatial
    size, which is where a transition's backward spreads the pooling's gradient."""
    return (
        conv.bias is None
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and not isinstance(conv.padding, str)
        and all(p == 0 for p in conv.padding)
    )


def bn_relu_conv_pool(
    features: Sequence[Tensor], norm: _BatchNorm, conv: _ConvNd, efficient: MemoryMode, owner: nn.Module | None = None
) -> Tensor:
    """A transition: ``avg_pool(conv(relu(norm(cat(features, 1)))), 2)``, (N, C, *spatial) -> (N, C_out,
    *spatial / 2).

    In the efficient modes (see :func:`bn_relu_conv`) with a pointwise ``conv`` nothing full-size is stored for
    backward, only the norm's per-channel statistics. Forward computes what the plain modules compute, in their
    order (the same output, to the bit on CPU); backward recomputes the BN-ReLU output from the feature maps, piece
    by piece, and takes the convolution's gradients as plain autograd does (the same values, summed in the same
    order). Plain autograd stores the concatenation, the BN-ReLU output and the convolution's full-size output
    (the pooling's input).
    """
    if _pointwise(conv) and _use_function(features, [(norm, conv)], efficient, owner):
        _check_channels(features, norm)
        chain = (_stage(norm, conv, pool=True),)
        params = (norm.weight, norm.bias, conv.weight)
        return _apply(_BnReluConvChain, compiled_op.bn_relu_conv_chain, chain, efficient is True, *params, *features)
    return _avg_pool(bn_relu_conv(features, [(norm, conv)], efficient, owner))


def bn_relu(
    features: Sequence[Tensor], norm: _BatchNorm, efficient: MemoryMode, owner: nn.Module | None = None
) -> Tensor:
    """``relu(norm(cat(features, 1)))``, the final norm and ReLU of a DenseNet.

    In the efficient modes (see :func:`bn_relu_conv`) only the norm's per-channel statistics are stored for
    backward (the feature maps are the network's anyway); plain autograd stores the concatenation and the ReLU
    output.
    """
    if _use_function(features, [(norm, None)], efficient, owner):
        _check_channels(features, norm)
        chain = (_stage(norm, None),)
        params = (norm.weight, norm.bias, None)
        return _apply(_BnReluConvChain, compiled_op.bn_relu_conv_chain, chain, efficient is True, *params, *features)
    return F.relu(norm(torch.cat(list(features), 1) if len(features) > 1 else features[0]))


def _stem_supported(conv: _ConvNd, norm: _BatchNorm, pool: nn.Module) -> bool:
    """Whether :class:`_ConvBnReluMaxPool` computes exactly what these modules do."""
    pools = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
    return (
        type(pool) is pools.get(conv.weight.dim() - 2)
        and not pool.return_indices
        and norm.affine
        and conv.bias is None
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not conv.transposed
    )


def conv_bn_relu_max_pool(
    x: Tensor,
    conv: nn.Module,
    norm: nn.Module,
    pool: nn.Module,
    efficient: MemoryMode,
    keep_activation: bool = False,
    owner: nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """An ImageNet stem: ``pool(relu(norm(conv(x))))`` and, with ``keep_activation``, ``relu(norm(conv(x)))``.

    ``x`` (N, C_in, *spatial); ``pool`` a max pooling. In the efficient modes (see :func:`bn_relu_conv`) only
    the batch norm's statistics and one byte per pooled value (each maximum's place in its window) are stored for
    backward; the convolution is recomputed from ``x`` in backward (see :class:`_ConvBnReluMaxPool`).
    Batch-norm statistics are updated once, in forward. Plain modules run otherwise, and when the modules are of
    kinds the function does not reproduce.
    """
    if (
        isinstance(conv, _ConvNd)
        and isinstance(norm, _BatchNorm)
        and _stem_supported(conv, norm, pool)
        and _use_function([x], [(norm, conv)], efficient, owner)
    ):
        outputs = _apply(
            _ConvBnReluMaxPool,
            compiled_op.conv_bn_relu_max_pool,
            _stage(norm, conv),
            _MaxPool.of(pool, x.dim() - 2),
            keep_activation,
            x,
            conv.weight,
            norm.weight,
            norm.bias,
        )
        return (outputs[0], outputs[1]) if keep_activation else (outputs, None)
    activation = F.relu(norm(conv(x)))
    return pool(activation), activation if keep_activation else None
