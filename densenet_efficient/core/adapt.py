"""Give an existing torchvision or timm DenseNet the memory modes: :func:`make_efficient`.

Modules are recognised by their shape (duck typing), not by importing torchvision or timm: a dense layer is a
module with ``norm1``/``conv1`` (and optionally ``norm2``/``conv2``) batch norms and convolutions, a transition
a module with ``norm``, ``conv`` and a 2x2 average ``pool``.
"""

from __future__ import annotations

from typing import TypeGuard

from torch import nn

from .functional import MemoryMode, check_memory_mode
from .model import DenseLayer, Transition, _set_memory_mode


def _relu_norm(module: object) -> TypeGuard[nn.BatchNorm2d]:
    """A batch norm followed by nothing but a ReLU: ``nn.BatchNorm2d``, or timm's ``BatchNormAct2d`` with a ReLU
    activation and no dropout."""
    if not isinstance(module, nn.BatchNorm2d):
        return False
    act, drop = getattr(module, "act", nn.ReLU()), getattr(module, "drop", nn.Identity())
    return isinstance(act, nn.ReLU) and isinstance(drop, nn.Identity)


def _plain_conv(module: object) -> TypeGuard[nn.Conv2d]:
    return isinstance(module, nn.Conv2d) and module.bias is None and module.padding_mode == "zeros"


def _as_dense_layer(module: nn.Module, efficient: MemoryMode) -> DenseLayer | None:
    norm1, conv1 = getattr(module, "norm1", None), getattr(module, "conv1", None)
    if isinstance(module, DenseLayer) or not _relu_norm(norm1) or not _plain_conv(conv1):
        return None
    norm2, conv2 = getattr(module, "norm2", None), getattr(module, "conv2", None)
    if (norm2 is None) != (conv2 is None) or (conv2 is not None and not (_relu_norm(norm2) and _plain_conv(conv2))):
        return None
    return DenseLayer.from_modules(
        norm1,
        conv1,
        norm2,
        conv2,
        getattr(module, "drop_rate", 0.0),
        efficient,
    )


def _as_transition(module: nn.Module, efficient: MemoryMode) -> Transition | None:
    pool, norm, conv = getattr(module, "pool", None), getattr(module, "norm", None), getattr(module, "conv", None)
    if isinstance(module, Transition) or not _relu_norm(norm) or not _plain_conv(conv):
        return None
    if not (
        isinstance(pool, nn.AvgPool2d)
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and not pool.ceil_mode
    ):
        return None
    return Transition.from_modules(norm, conv, efficient)


def make_efficient(model: nn.Module, efficient: MemoryMode = True) -> nn.Module:
    """Convert a torchvision or timm DenseNet (or any model with such dense layers) in place to memory mode
    ``efficient`` and return it.

    Each dense layer (``norm1, conv1[, norm2, conv2]``, BN-ReLU-Conv) and each transition (``norm, conv, pool``
    with 2x2 average pooling) is replaced by this package's module around the same submodules: parameters,
    buffers and state-dict keys stay the same, and outputs, gradients and batch-norm running statistics equal
    the original's. ``set_efficient`` is not added to foreign models: call ``make_efficient`` again to switch
    modes. timm's ``set_grad_checkpointing`` (and torchvision's ``memory_efficient``) no longer apply to the
    converted layers. Raises ``ValueError`` if ``model`` has no dense layer to convert.
    """
    efficient = check_memory_mode(efficient)
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _as_dense_layer(child, efficient) or _as_transition(child, efficient)
            if replacement is not None:
                replacement.train(child.training)
                setattr(parent, name, replacement)
                converted += 1
    _set_memory_mode(model, efficient)
    if not converted and not any(isinstance(m, DenseLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no dense layer to convert: make_efficient expects modules with "
            "norm1/conv1 (and optionally norm2/conv2) batch norms and convolutions, as torchvision's and timm's "
            "DenseNets have"
        )
    return model
