"""Give an existing DenseNet (torchvision's, timm's, MONAI's, torchxrayvision's) the memory modes:
:func:`make_efficient`.

Modules are recognised by their shape (duck typing), not by importing those libraries:

* a dense layer: ``norm1, conv1`` (and optionally ``norm2, conv2``) norms (batch, instance or group) and
  convolutions, each norm followed by nothing but an activation of docs/efficient-path.md's table (a
  ``relu1``/``relu2`` child), or timm's ``BatchNormAct2d`` with a ReLU; torchvision and timm
  keep them in the layer, MONAI in a ``layers`` sequence;
* a dense block: the dense layers ``denselayer1, denselayer2, ...``, either in a ``ModuleDict`` that passes the
  list of feature maps to each layer (torchvision, timm) or in an ``nn.Sequential``, whose layers must then each
  return their input concatenated with their new features (MONAI, torchxrayvision);
* a transition: ``norm`` (then a ReLU), ``conv`` and a 2x average ``pool``.

1, 2 and 3 spatial dimensions alike. A layer whose modules are laid out otherwise (another activation, a bias,
MONAI's channel dropout) is left as it is.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import TypeGuard

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AvgPoolNd

from .eligibility import activation, is_frozen_norm
from .functional import MemoryMode, check_memory_mode
from .model import DenseBlock, DenseFeatures, DenseLayer, Transition, _set_memory_mode

_LAYER_NAME = re.compile(r"denselayer\d+")


def _relu_norm(module: object) -> TypeGuard[nn.Module]:
    """A norm followed by nothing but its activation: ``nn.BatchNormNd``, torchvision's ``FrozenBatchNorm2d``,
    timm's ``BatchNormAct2d`` with a ReLU activation and no dropout, ``nn.InstanceNormNd`` or ``nn.GroupNorm``."""
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


def _relus_only(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether every child of ``module`` named in ``names`` is an activation the function computes
    (torchvision's ``relu1``, MONAI's ``relu``, whatever its ``act``)."""
    return all(activation(getattr(module, name, None)) is not None for name in names)


def _layer_modules(module: nn.Module) -> nn.Module | None:
    """The module holding a dense layer's ``norm1``/``conv1``...: the layer itself or MONAI's ``layers``."""
    layers = getattr(module, "layers", None)
    return layers if isinstance(layers, nn.Sequential) and hasattr(layers, "conv1") else module


def _as_dense_layer(module: nn.Module, efficient: MemoryMode) -> DenseLayer | None:
    """A :class:`DenseLayer` around the modules of ``module`` (returning the new features), or ``None``."""
    norm1, conv1 = getattr(module, "norm1", None), getattr(module, "conv1", None)
    if isinstance(module, DenseLayer) or not _relu_norm(norm1) or not _plain_conv(conv1):
        return None
    norm2, conv2 = getattr(module, "norm2", None), getattr(module, "conv2", None)
    if (norm2 is None) != (conv2 is None) or (conv2 is not None and not (_relu_norm(norm2) and _plain_conv(conv2))):
        return None
    if isinstance(module, nn.Sequential):  # run in order: nothing else may be in the sequence
        expected = ["norm1", "relu1", "conv1"] + (["norm2", "relu2", "conv2"] if conv2 is not None else [])
        if [name for name, _ in module.named_children()] != expected or not _relus_only(module, ("relu1", "relu2")):
            return None
    elif not _relus_only(module, ("relu1", "relu2")):
        return None
    acts = (getattr(module, "relu1", None), getattr(module, "relu2", None))
    return DenseLayer.from_modules(norm1, conv1, norm2, conv2, getattr(module, "drop_rate", 0.0), efficient, acts)


class NestedDenseLayer(nn.Module):
    """A :class:`DenseLayer` kept under ``layers``, so that a converted MONAI network keeps MONAI's state-dict
    keys (``denselayer1.layers.norm1.weight``). Takes and returns what the dense layer does."""

    def __init__(self, layers: DenseLayer):
        super().__init__()
        self.layers = layers

    def forward(self, features: Tensor | list[Tensor]) -> Tensor:
        return self.layers(features)


def _block_layer(module: nn.Module, efficient: MemoryMode) -> nn.Module | None:
    """What replaces dense layer ``module`` in a converted block (a :class:`DenseLayer`, or MONAI's layout kept)."""
    if isinstance(module, (DenseLayer, NestedDenseLayer)):
        return module
    holder = _layer_modules(module)
    if holder is None:
        return None
    layer = _as_dense_layer(holder, efficient)
    if layer is None:
        return None
    return layer if holder is module else NestedDenseLayer(layer)


def _as_dense_block(module: nn.Module, efficient: MemoryMode) -> DenseBlock | None:
    """A :class:`DenseBlock` of ``module``'s dense layers, or ``None``.

    An ``nn.Sequential`` passes one tensor from layer to layer, so its layers are the concatenating kind (MONAI,
    torchxrayvision): each returns its input and its new features, which is what the block returns. A
    ``ModuleDict`` block passes the list of maps (torchvision, timm).
    """
    if isinstance(module, DenseBlock) or not isinstance(module, (nn.Sequential, nn.ModuleDict)):
        return None
    if isinstance(module, nn.Sequential) and type(module).forward is not nn.Sequential.forward:
        return None
    children = list(module.named_children())
    if not children or not all(_LAYER_NAME.fullmatch(name) for name, _ in children):
        return None
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in children:
        layer = _block_layer(child, efficient)
        if layer is None:
            return None
        layers[name] = layer
    block = DenseBlock.__new__(DenseBlock)  # around the same layer objects
    nn.ModuleDict.__init__(block, layers)
    return block


def _as_transition(module: nn.Module, efficient: MemoryMode) -> Transition | None:
    pool, norm, conv = getattr(module, "pool", None), getattr(module, "norm", None), getattr(module, "conv", None)
    if isinstance(module, Transition) or not _relu_norm(norm) or not _plain_conv(conv):
        return None
    if not isinstance(pool, _AvgPoolNd) or not _relus_only(module, ("relu",)):
        return None
    dims = conv.weight.dim() - 2
    if not (
        pool.kernel_size in (2, (2,) * dims)
        and pool.stride in (2, (2,) * dims)
        and pool.padding in (0, (0,) * dims)
        and not pool.ceil_mode
    ):
        return None
    names = [name for name, _ in module.named_children()]
    if isinstance(module, nn.Sequential) and names not in (["norm", "relu", "conv", "pool"], ["norm", "conv", "pool"]):
        return None
    return Transition.from_modules(norm, conv, efficient, getattr(module, "relu", None))


def _convert_children(parent: nn.Module, efficient: MemoryMode) -> int:
    """Replace the dense blocks, dense layers and transitions under ``parent``; returns how many were replaced."""
    converted = 0
    for name, child in list(parent.named_children()):
        block = _as_dense_block(child, efficient)
        replacement: nn.Module | None = block
        if block is None and not isinstance(parent, nn.Sequential):  # layers in a Sequential concatenate
            replacement = _as_dense_layer(child, efficient)
        if replacement is None:
            replacement = _as_transition(child, efficient)
        if replacement is not None:
            replacement.train(child.training)
            setattr(parent, name, replacement)
            converted += 1
        elif not isinstance(child, (DenseLayer, Transition)):
            converted += _convert_children(child, efficient)
    return converted


def _pass_lists(parent: nn.Module) -> None:
    """Make each ``nn.Sequential`` of dense blocks and transitions a :class:`DenseFeatures`, which hands a
    block's feature maps to the transition as a list: the block's concatenation is then not stored for backward.
    Only where every such child was converted, and without changing a state-dict key."""
    for name, child in list(parent.named_children()):
        if (
            type(child) is nn.Sequential
            and any(isinstance(m, DenseBlock) for m in child)
            and all(_ours_if_dense(m) for m in child)
        ):
            features = DenseFeatures(OrderedDict(child.named_children()))
            features.train(child.training)
            setattr(parent, name, features)
        else:
            _pass_lists(child)


def _ours_if_dense(module: nn.Module) -> bool:
    """Whether ``module`` is not a dense block or transition that :class:`DenseFeatures` would take for one, or
    is this package's (DenseFeatures dispatches on the ``denselayer1`` and ``norm``/``conv`` names)."""
    if hasattr(module, "denselayer1"):
        return isinstance(module, DenseBlock)
    if hasattr(module, "norm") and hasattr(module, "conv"):
        return isinstance(module, Transition)
    return True


def make_efficient(model: nn.Module, efficient: MemoryMode = True) -> nn.Module:
    """Convert a DenseNet of torchvision, timm, MONAI (any ``spatial_dims``) or torchxrayvision (or any model with
    such dense layers; MONAI's with any ``norm`` and ``act`` the function computes) in place to memory mode
    ``efficient`` and return it.

    Each dense block, dense layer (``norm1, conv1[, norm2, conv2]``, BN-ReLU-Conv) and transition (``norm, conv,
    pool`` with 2x average pooling) is replaced by this package's module around the same submodules; a
    ``Sequential`` of blocks and transitions (``model.features``) becomes a :class:`DenseFeatures`. Parameters,
    buffers and state-dict keys stay the same, and outputs, gradients and batch-norm running statistics equal
    the original's; the converted blocks take and return what the originals did. ``set_efficient`` is not added
    to foreign models: call ``make_efficient`` again to switch modes. timm's ``set_grad_checkpointing`` (and
    torchvision's ``memory_efficient``) no longer apply to the converted layers. Raises ``ValueError`` if
    ``model`` has no dense layer to convert.
    """
    efficient = check_memory_mode(efficient)
    converted = _convert_children(model, efficient)
    _pass_lists(model)
    _set_memory_mode(model, efficient)
    if not converted and not any(isinstance(m, DenseLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no dense layer to convert: make_efficient expects modules with "
            "norm1/conv1 (and optionally norm2/conv2) norms and convolutions, each norm followed by an activation, "
            "as torchvision's, timm's, MONAI's and torchxrayvision's DenseNets have"
        )
    return model
