"""The memory-efficient layers' entry points: a BN-ReLU-Conv chain, a transition, the final norm and ReLU, or the
ImageNet stem, run as the autograd function of :mod:`.functional`, as its opaque operator of :mod:`.compiled_op`
under ``torch.compile``, or as the plain modules (see :func:`bn_relu_conv` and :mod:`.eligibility`).
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
from .batchnorm import sync_group
from .eligibility import efficient_obstacle, is_customised, is_frozen_norm, norm_kind, warn_fallback
from .functional import (
    MemoryMode,
    _avg_pool,
    _BnReluConvChain,
    _ConvBnReluMaxPool,
    _MaxPool,
    _Stage,
    _stage,
    autocast_dtype,
)

Stages = Sequence[tuple[nn.Module, nn.Module | None] | tuple[nn.Module, nn.Module | None, nn.Module | None]]


def _apply(function: type[torch.autograd.Function], operator: Callable[..., Any], *args: Any) -> Any:
    """``function.apply(*args)`` or, under ``torch.compile``, ``operator(*args)``, its opaque operator."""
    return operator(*args) if torch.compiler.is_compiling() else function.apply(*args)


def _use_function(
    features: Sequence[Tensor],
    stages: Sequence[tuple[nn.Module, nn.Module | None, nn.Module | None]],
    efficient: MemoryMode,
    owner: nn.Module | None = None,
) -> bool:
    """Whether the memory-efficient function runs on ``features`` for ``(norm, act, conv)`` ``stages``: with
    ``efficient`` set and a backward pass to come, outside ``torch.func``, forward-mode AD and ``torch.jit.trace``
    (a training trace raises), for batches with enough values for the norm's statistics and modules it computes
    exactly (:mod:`.eligibility`; else a one-time warning names ``owner``). Norms and activations other than batch
    norm and ReLU run the plain modules under autocast and ``torch.compile``."""
    modules = [module for stage in stages for module in stage if module is not None]
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in features) or any(p.requires_grad for m in modules for p in m.parameters())
    )
    training = any(norm.training and not is_frozen_norm(norm) for norm, _, _ in stages)
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
    ):
        return False
    # Too few values for the norm's statistics go to the plain modules: an empty batch or, in training, one value
    # per channel (batch norm raises; the function would write NaN into running_var), one per sample per-sample.
    x, per_sample = features[0], norm_kind(stages[0][0]) != "batch"
    values = x[0, 0].numel() if per_sample and x.numel() else x.numel() // max(x.shape[1], 1)
    if values == 0 or ((training or per_sample) and values == 1):
        return False
    if (torch.compiler.is_compiling() or autocast_dtype(features[0].device.type) is not None) and any(
        norm_kind(norm) != "batch" or not (act is None or type(act) is nn.ReLU) for norm, act, _ in stages
    ):
        return False
    obstacle = efficient_obstacle(stages)
    if obstacle is not None:
        warn_fallback(owner if owner is not None else modules[0], *obstacle)
        return False
    return True


def _chain(
    features: Sequence[Tensor], stages: Sequence[tuple[Any, Any, Any]], efficient: MemoryMode, pool: bool = False
) -> Tensor:
    """The memory-efficient function on ``features`` for ``(norm, act, conv)`` stages."""
    # Channels must add up to what the norm normalises (the kernels do not check). FrozenBatchNorm2d has no
    # num_features, GroupNorm num_channels, a non-affine InstanceNorm no weight.
    norm, channels = stages[0][0], [t.shape[1] for t in features]
    expected = getattr(norm, "num_channels", None) or getattr(norm, "num_features", None) or norm.weight.shape[0]
    if sum(channels) != expected:
        raise ValueError(
            f"feature maps of {'+'.join(map(str, channels))} = {sum(channels)} channels, but "
            f"{type(norm).__name__} normalises {expected}: pass the feature maps it was built for"
        )
    chain: tuple[_Stage, ...] = tuple(_stage(norm, conv, pool, act) for norm, act, conv in stages)
    params = [t for norm, _, conv in stages for t in (norm.weight, norm.bias, None if conv is None else conv.weight)]
    act_weights = [act.weight for (_, act, _), stage in zip(stages, chain, strict=True) if stage.act[0] == "prelu"]
    arguments = (chain, efficient is True, *params, *features, *act_weights)
    return _apply(_BnReluConvChain, compiled_op.bn_relu_conv_chain, *arguments)


def bn_relu_conv(
    features: Sequence[Tensor], stages: Stages, efficient: MemoryMode, owner: nn.Module | None = None
) -> Tensor:
    """Apply ``conv(act(norm(.)))`` for each ``(norm, act, conv)`` of ``stages`` to ``cat(features, 1)``, feature
    maps (N, C_i, *spatial); a ``(norm, conv)`` pair has a ReLU. The memory-efficient function runs where
    :func:`_use_function` says (training, frozen or mixed batch norms), otherwise the plain modules, at a naive
    DenseNet's cost; stages it would not compute exactly (:mod:`.eligibility`) warn once, naming ``owner``."""
    triples = [stage if len(stage) == 3 else (stage[0], None, stage[1]) for stage in stages]
    if _use_function(features, triples, efficient, owner):
        return _chain(features, triples, efficient)
    x = torch.cat(list(features), 1) if len(features) > 1 else features[0]
    for norm, act, conv in triples:
        x = norm(x)
        # A ReLU in place unless a backward hook made the norm's output a view that autograd forbids modifying
        plain_relu = act is None or (type(act) is nn.ReLU and not is_customised(act))
        x = conv(F.relu(x, inplace=not (norm._backward_hooks or norm._backward_pre_hooks)) if plain_relu else act(x))  # type: ignore[misc]
    return x


def dense_block(
    features: Sequence[Tensor], layers: Sequence[tuple[Sequence[tuple[Any, Any, Any]], MemoryMode, nn.Module]]
) -> list[Tensor] | None:
    """Under ``torch.compile``, the new features (N, k, *spatial) of dense layers ``((norm, act, conv) stages,
    efficient, owner)`` on the block's one map ``features`` as one operator (:func:`.compiled_op.dense_block`: each
    map's gradient summed as eager sums it), where every layer would run the function in mode ``"max"``; else
    ``None``. Not for channels-last maps (the stem's gradient came out wrong: they run layer by layer), nor for
    ``True``, whose per-layer operators keep the eager peak (DenseNet-BC-40, batch 32: 1.003 x;
    ``"max"`` 1.114 x per layer, 1.009 x as blocks)."""
    compiling = torch.compiler.is_compiling() and not torch.compiler.is_exporting()
    if not compiling or len(features) != 1 or not features[0].is_contiguous() or {e for _, e, _ in layers} != {"max"}:
        return None
    if any(sync_group(norm) is not None for stages, _, _ in layers for norm, _, _ in stages) or not all(
        _use_function(features, stages, "max", owner) for stages, _, owner in layers
    ):
        return None
    chains = [tuple(_stage(norm, conv, False, act) for norm, act, conv in stages) for stages, _, _ in layers]
    params = [t for stages, _, _ in layers for norm, _, conv in stages for t in (norm.weight, norm.bias, conv.weight)]
    return compiled_op.dense_block(chains, params, features[0])


def bn_relu_conv_pool(
    features: Sequence[Tensor],
    norm: nn.Module,
    conv: _ConvNd,
    efficient: MemoryMode,
    owner: nn.Module | None = None,
    act: nn.Module | None = None,
) -> Tensor:
    """A transition: ``avg_pool(conv(act(norm(cat(features, 1)))), 2)``, (N, C, *spatial) -> (N, C_out,
    *spatial / 2); ``act`` ``None``: a ReLU. The efficient modes (:func:`bn_relu_conv`) with a pointwise ``conv``
    store only the norm's statistics (plain autograd: the concatenation, the BN-ReLU output, the pooling's input)."""
    # The function's backward spreads the pooling's gradient at the input's size: 1x1, no bias, stride or padding
    ones = all(v == 1 for v in (*conv.kernel_size, *conv.stride))
    pointwise = conv.bias is None and ones and not isinstance(conv.padding, str) and not any(conv.padding)
    if pointwise and _use_function(features, [(norm, act, conv)], efficient, owner):
        return _chain(features, [(norm, act, conv)], efficient, pool=True)
    return _avg_pool(bn_relu_conv(features, [(norm, act, conv)], efficient, owner))


def bn_relu(
    features: Sequence[Tensor],
    norm: nn.Module,
    efficient: MemoryMode,
    owner: nn.Module | None = None,
    act: nn.Module | None = None,
) -> Tensor:
    """``act(norm(cat(features, 1)))``, a DenseNet's final norm and activation (``act`` ``None``: ReLU). In the
    efficient modes (see :func:`bn_relu_conv`) only the norm's statistics are stored for backward (plain
    autograd: the concatenation and the ReLU output)."""
    if _use_function(features, [(norm, act, None)], efficient, owner):
        return _chain(features, [(norm, act, None)], efficient)
    x = norm(torch.cat(list(features), 1) if len(features) > 1 else features[0])
    return F.relu(x) if act is None else act(x)


def conv_bn_relu_max_pool(
    x: Tensor,
    conv: nn.Module,
    norm: nn.Module,
    pool: nn.Module,
    efficient: MemoryMode,
    keep_activation: bool = False,
    owner: nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """An ImageNet stem: ``pool(relu(norm(conv(x))))`` and, with ``keep_activation``, ``relu(norm(conv(x)))``;
    ``x`` (N, C_in, *spatial), ``pool`` a max pooling. The efficient modes (:func:`bn_relu_conv`) store only the
    statistics and a byte per pooled value (:class:`_ConvBnReluMaxPool`) for the modules that function reproduces."""
    pools = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
    supported = (  # modules that _ConvBnReluMaxPool reproduces exactly
        isinstance(conv, _ConvNd)
        and isinstance(norm, _BatchNorm)
        and type(pool) is pools.get(conv.weight.dim() - 2)
        and not pool.return_indices
        and norm.affine
        and conv.bias is None
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not conv.transposed
    )
    if supported and _use_function([x], [(norm, None, conv)], efficient, owner):
        stage, max_pool = _stage(norm, conv), _MaxPool.of(pool, x.dim() - 2)  # type: ignore[arg-type]  # checked
        stem = (stage, max_pool, keep_activation, x, conv.weight, norm.weight, norm.bias)
        outputs = _apply(_ConvBnReluMaxPool, compiled_op.conv_bn_relu_max_pool, *stem)
        return (outputs[0], outputs[1]) if keep_activation else (outputs, None)
    activation = F.relu(norm(conv(x)))
    return pool(activation), activation if keep_activation else None
