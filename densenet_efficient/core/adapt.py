"""Give an existing DenseNet (torchvision's, timm's, MONAI's, torchxrayvision's) the memory modes:
:func:`make_efficient`. Modules are recognised by their layout, not by importing those libraries: a dense layer has
norms and bias-free convolutions ``norm1, conv1[, norm2, conv2]``, each norm followed by nothing but an activation
the function computes (a ``relu1``/``relu2`` child, or timm's ``BatchNormAct2d`` with a ReLU), in the layer or in
its ``layers`` sequence (MONAI); a dense block holds ``denselayer1, ...`` in a ``ModuleDict`` passing the list of
maps (torchvision, timm) or in an ``nn.Sequential`` of concatenating layers (MONAI, torchxrayvision); a transition
has ``norm`` (then an activation), ``conv`` and a 2x average ``pool``. Other layouts are left as they are.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, TypeGuard, TypeVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AvgPoolNd

from .eligibility import activation, is_frozen_norm
from .functional import MemoryMode, check_memory_mode
from .model import DenseBlock, DenseFeatures, DenseLayer, Transition, _relu, _set_memory_mode

_LAYER_NAME = re.compile(r"denselayer\d+")
_TRANSITION_ORDERS = (["norm", "relu", "conv", "pool"], ["norm", "conv", "pool"])  # the modules a Sequential runs
_M = TypeVar("_M", bound=nn.Module)


def _around(cls: type[_M], **attributes: Any) -> _M:
    """A ``cls`` holding ``attributes``: existing modules (the same objects, weights shared) and settings."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


def _relu_norm(module: object) -> TypeGuard[nn.Module]:
    """A norm followed by nothing but its activation: batch (or torchvision's frozen batch) norm, timm's
    ``BatchNormAct2d`` with a ReLU and no dropout, instance norm or group norm."""
    if isinstance(module, (_InstanceNorm, nn.GroupNorm)):
        return True
    if not (isinstance(module, _BatchNorm) or (isinstance(module, nn.Module) and is_frozen_norm(module))):
        return False
    act, drop = getattr(module, "act", nn.ReLU()), getattr(module, "drop", nn.Identity())
    return isinstance(act, nn.ReLU) and isinstance(drop, nn.Identity)


def _plain_conv(module: object) -> TypeGuard[_ConvNd]:
    return (
        isinstance(module, _ConvNd) and not module.transposed and module.bias is None and module.padding_mode == "zeros"
    )


def _as_dense_layer(module: nn.Module) -> DenseLayer | None:
    """A :class:`DenseLayer` around the modules of ``module`` (returning the new features), or ``None``."""
    norm1, conv1 = getattr(module, "norm1", None), getattr(module, "conv1", None)
    norm2, conv2 = getattr(module, "norm2", None), getattr(module, "conv2", None)
    if isinstance(module, DenseLayer) or not _relu_norm(norm1) or not _plain_conv(conv1):
        return None
    if (norm2 is None) != (conv2 is None) or (conv2 is not None and not (_relu_norm(norm2) and _plain_conv(conv2))):
        return None
    if any(activation(getattr(module, name, None)) is None for name in ("relu1", "relu2")):
        return None
    names = ["norm1", "relu1", "conv1"] + (["norm2", "relu2", "conv2"] if conv2 is not None else [])
    if isinstance(module, nn.Sequential) and list(module._modules) != names:  # it runs in order: nothing else
        return None
    modules = {name: getattr(module, name, None) or _relu() for name in names}
    return _around(DenseLayer, **modules, drop_rate=float(getattr(module, "drop_rate", 0.0)))


class NestedDenseLayer(nn.Module):
    """A :class:`DenseLayer` under ``layers``: a converted MONAI network keeps MONAI's state-dict keys
    (``denselayer1.layers.norm1.weight``). Takes and returns what the dense layer does."""

    def __init__(self, layers: DenseLayer):
        super().__init__()
        self.layers = layers

    def forward(self, features: Tensor | list[Tensor]) -> Tensor:
        return self.layers(features)


def _block_layer(module: nn.Module) -> nn.Module | None:
    """What replaces dense layer ``module`` in a converted block (a :class:`DenseLayer`, or MONAI's layout kept)."""
    if isinstance(module, (DenseLayer, NestedDenseLayer)):
        return module
    layers = getattr(module, "layers", None)
    if isinstance(layers, nn.Sequential) and hasattr(layers, "conv1"):  # MONAI's
        layer = _as_dense_layer(layers)
        return None if layer is None else NestedDenseLayer(layer)
    return _as_dense_layer(module)


def _as_dense_block(module: nn.Module) -> DenseBlock | None:
    """A :class:`DenseBlock` of ``module``'s dense layers, or ``None``. An ``nn.Sequential`` passes one tensor from
    layer to layer: its layers are the concatenating kind (MONAI, torchxrayvision), and return what the block does."""
    if isinstance(module, DenseBlock) or not isinstance(module, (nn.Sequential, nn.ModuleDict)):
        return None
    if isinstance(module, nn.Sequential) and type(module).forward is not nn.Sequential.forward:
        return None
    if not module._modules or not all(_LAYER_NAME.fullmatch(name) for name in module._modules):
        return None
    layers = {name: _block_layer(child) for name, child in module.named_children()}
    return None if None in layers.values() else _around(DenseBlock, **layers)


def _as_transition(module: nn.Module) -> Transition | None:
    pool, norm, conv = getattr(module, "pool", None), getattr(module, "norm", None), getattr(module, "conv", None)
    if isinstance(module, Transition) or not _relu_norm(norm) or not _plain_conv(conv):
        return None
    if not isinstance(pool, _AvgPoolNd) or activation(getattr(module, "relu", None)) is None:
        return None
    dims = conv.weight.dim() - 2
    pooling = ((pool.kernel_size, 2), (pool.stride, 2), (pool.padding, 0))
    if pool.ceil_mode or not all(value in (size, (size,) * dims) for value, size in pooling):  # 2x, no padding
        return None
    if isinstance(module, nn.Sequential) and list(module._modules) not in _TRANSITION_ORDERS:
        return None
    return _around(Transition, norm=norm, relu=getattr(module, "relu", None) or _relu(), conv=conv)


def _convert_children(parent: nn.Module) -> int:
    """Replace the dense blocks, dense layers and transitions under ``parent``; returns how many were replaced."""
    converted = 0
    for name, child in list(parent.named_children()):
        replacement: nn.Module | None = _as_dense_block(child)
        if replacement is None and not isinstance(parent, nn.Sequential):  # layers in a Sequential concatenate
            replacement = _as_dense_layer(child)
        if replacement is None:
            replacement = _as_transition(child)
        if replacement is not None:
            replacement.train(child.training)
            setattr(parent, name, replacement)
            converted += 1
        elif not isinstance(child, (DenseLayer, Transition)):
            converted += _convert_children(child)
    return converted


def _pass_lists(parent: nn.Module) -> None:
    """Make each ``nn.Sequential`` of converted dense blocks and transitions a :class:`DenseFeatures`, which hands
    a block's maps to the transition as a list (no concatenation stored for backward); state-dict keys stay."""
    for name, child in list(parent.named_children()):
        if type(child) is nn.Sequential and any(isinstance(m, DenseBlock) for m in child):
            # DenseFeatures dispatches on the names denselayer1 and norm/conv: every module with them must be ours
            named = [m for m in child if hasattr(m, "denselayer1") or (hasattr(m, "norm") and hasattr(m, "conv"))]
            if all(isinstance(m, (DenseBlock, Transition)) for m in named):
                setattr(parent, name, DenseFeatures(OrderedDict(child.named_children())).train(child.training))
                continue
        _pass_lists(child)


def make_efficient(model: nn.Module, efficient: MemoryMode = True) -> nn.Module:
    """Convert ``model``'s dense blocks, layers and transitions (see the module docstring) in place to this package's
    modules around the same submodules, in memory mode ``efficient``, and a ``Sequential`` of them to a
    :class:`DenseFeatures`: parameters, buffers, state-dict keys, outputs, gradients and statistics stay the same.
    Call it again to switch modes (timm's ``set_grad_checkpointing`` and torchvision's ``memory_efficient`` no longer
    apply). Returns ``model``; ``ValueError`` if it has no dense layer to convert."""
    efficient = check_memory_mode(efficient)
    converted = _convert_children(model)
    _pass_lists(model)
    _set_memory_mode(model, efficient)
    if not converted and not any(isinstance(m, DenseLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no dense layer to convert: make_efficient expects modules with "
            "norm1/conv1 (and optionally norm2/conv2) norms and convolutions, each norm followed by an activation, "
            "as torchvision's, timm's, MONAI's and torchxrayvision's DenseNets have"
        )
    return model
