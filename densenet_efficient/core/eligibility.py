"""Which BN-activation-Conv stages the memory-efficient function computes exactly, and the warning when it does not.

The function reads a stage's tensors and settings and never calls its modules, so it computes only the modules of
:data:`SUPPORTED` (``torch.nn.utils.parametrize`` included) with no hooks and no method replaced on the instance;
anything else runs the layer's plain modules, exactly, with a one-time warning. So does every layer while a global
module hook other than torch's module trackers' is set. Checked on every call, so later hooks are seen.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

# Activations the function recomputes in backward: class -> (name, parameter) of the stage (see functional._activate).
ACTIVATIONS: dict[str, Callable[[Any], tuple[str, float]]] = {
    "torch.nn.modules.activation.ReLU": lambda m: ("relu", 0.0),
    "torch.nn.modules.activation.LeakyReLU": lambda m: ("leaky_relu", m.negative_slope),
    "torch.nn.modules.activation.ELU": lambda m: ("elu", m.alpha),
    "torch.nn.modules.activation.SiLU": lambda m: ("silu", 0.0),
    "torch.nn.modules.activation.PReLU": lambda m: ("prelu", 0.0),
    "monai.networks.blocks.activation.Swish": lambda m: ("swish", m.alpha),  # x * sigmoid(alpha * x)
}
_DIMS = (1, 2, 3)
_KINDS = {  # class -> what the function knows it as
    **{f"torch.nn.modules.batchnorm.BatchNorm{d}d": "batch_norm" for d in _DIMS},
    "torch.nn.modules.batchnorm.SyncBatchNorm": "batch_norm",  # statistics shared where process_group says so
    "densenet_efficient.core.sync_batchnorm.SyncBatchNorm": "batch_norm",
    "timm.layers.norm_act.BatchNormAct2d": "batch_norm_act",  # computed with a ReLU (or none) and no dropout
    "torchvision.ops.misc.FrozenBatchNorm2d": "frozen",  # fixed statistics: an eval-mode batch norm, always
    **{f"torch.nn.modules.instancenorm.InstanceNorm{d}d": "instance" for d in _DIMS},
    "torch.nn.modules.normalization.GroupNorm": "group",
    **{f"torch.nn.modules.conv.Conv{d}d": "conv" for d in _DIMS},
    **dict.fromkeys(ACTIVATIONS, "act"),
}
SUPPORTED = (
    "BatchNorm1d/2d/3d, SyncBatchNorm, torchvision's FrozenBatchNorm2d, timm's BatchNormAct2d with a ReLU, "
    "InstanceNorm1d/2d/3d or GroupNorm, then ReLU, LeakyReLU, PReLU, ELU, SiLU or MONAI's Swish, then a "
    "Conv1d/2d/3d without bias and with zero padding, no hooks"
)
# Classes (and their subclasses) whose global module hooks only observe module boundaries.
_OBSERVERS = frozenset({"torch.utils.module_tracker.ModuleTracker", "torch.distributed._tools.mod_tracker.ModTracker"})

_T = TypeVar("_T")


def _per_class(compute: Callable[[type], _T]) -> Callable[[type], _T]:
    """``compute``, cached per class (a class does not change; ``functools.cache`` is not typed for classes)."""
    cache: dict[type, _T] = {}
    return lambda cls: cache[cls] if cls in cache else cache.setdefault(cls, compute(cls))


@_per_class
def _name(cls: type) -> str:
    """The qualified name of ``cls``; of the class it parametrises for a class made by ``parametrize``."""
    base = cls.__bases__[0] if cls.__module__ == parametrize.__name__ else cls
    return f"{base.__module__}.{base.__qualname__}"


def _kind(module: object) -> str:
    return _KINDS.get(_name(type(module)), "other")


def is_frozen_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with fixed statistics whatever its training flag (``FrozenBatchNorm2d``)."""
    return _kind(norm) == "frozen"


def norm_kind(norm: nn.Module) -> str:
    """``"instance"``, ``"group"`` (per-sample norms), or ``"batch"`` for any other norm."""
    kind = _kind(norm)
    return kind if kind in ("instance", "group") else "batch"


def activation(module: nn.Module | None) -> tuple[str, float] | None:
    """The stage's activation (name, parameter) for ``module`` (``None``: a ReLU), or ``None`` if unsupported."""
    if module is None:
        return "relu", 0.0
    return ACTIVATIONS[_name(type(module))](module) if _kind(module) == "act" else None


@_per_class
def _is_observer(cls: type) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in _OBSERVERS for c in cls.__mro__)


def _global_hooks() -> bool:
    """Whether hooks for every module (``register_module_*_hook``) other than the module trackers' are set."""
    kinds = ("forward", "forward_pre", "backward", "backward_pre")
    hook_dicts = [getattr(module_hooks, f"_global_{kind}_hooks") for kind in kinds]
    return any(not _is_observer(type(getattr(h, "__self__", None))) for hooks in hook_dicts for h in hooks.values())


def _own_hooks(module: nn.Module) -> bool:
    return any((module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks))


@_per_class
def _methods(cls: type) -> frozenset[str]:
    return frozenset(name for name in dir(cls) if not name.startswith("__") and callable(getattr(cls, name, None)))


def _instance_override(module: nn.Module) -> str | None:
    """The name of a method of ``module``'s class that the instance replaces (``module.forward = ...``:
    ``types.MethodType``, ``functools.partial``, accelerate's hooks), or ``None``."""
    return next((name for name in module.__dict__ if name in _methods(type(module))), None)


def is_customised(module: nn.Module) -> bool:
    """Whether calling ``module`` may do other than its class's ``forward``: hooks (its own, or global ones other
    than the module trackers'), or a method replaced on the instance."""
    return _own_hooks(module) or _instance_override(module) is not None or _global_hooks()


def _obstacle(module: nn.Module, role: str) -> str | None:
    """Why the function would not compute ``module`` as its stage's ``role`` (norm, act, conv), or ``None``."""
    kind, name = _kind(module), type(module).__name__
    if role == "act":
        return None if kind == "act" else f"is a {name}, not a supported activation"
    if role == "conv":
        if kind != "conv":
            return f"is a {name}, not a Conv1d/2d/3d"
        if module.bias is not None:
            return "has a bias"
        if module.padding_mode != "zeros":
            return f"pads with padding_mode={module.padding_mode!r}, not zeros"
        return f"has padding={module.padding!r}, not numeric padding" if isinstance(module.padding, str) else None
    if kind in ("frozen", "instance", "group"):
        return None
    if kind == "batch_norm_act":
        act, drop = getattr(module, "act", None), getattr(module, "drop", None)
        if type(act) not in (nn.ReLU, nn.Identity) or type(drop) is not nn.Identity:
            return f"is a {name} with activation {type(act).__name__} and dropout {type(drop).__name__}"
        if is_customised(act) or is_customised(drop):  # type: ignore[arg-type]
            return "has hooks or a replaced method on its activation or dropout"
    elif kind != "batch_norm":
        return f"is a {name}, not a batch norm"
    if module.weight is None or module.bias is None:
        return "is a batch norm without affine weight and bias (affine=False or bias=False)"
    return None


def efficient_obstacle(
    stages: Sequence[tuple[nn.Module, nn.Module | None, nn.Module | None]],
) -> tuple[nn.Module | None, str] | None:
    """``None`` if the memory-efficient function computes ``stages`` exactly (see the module docstring), else
    the first module it would get wrong (``None`` for the whole network) and why."""
    if _global_hooks():
        return None, "runs while global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    for norm, act, conv in stages:
        for module, role in ((norm, "norm"), (act, "act"), (conv, "conv")):
            if module is None:  # a default ReLU, or a BN-ReLU without convolution
                continue
            reason = _obstacle(module, role)
            if reason is None and (override := _instance_override(module)) is not None:
                reason = f"has its own {override} set on the instance (not its class's)"
            if reason is None and _own_hooks(module):
                reason = "has hooks (forward, forward pre- or backward hooks, or a legacy weight_norm, spectral_norm "
                reason += "or prune reparametrisation, or quantisation-aware training's observers)"
            if reason is not None:
                return module, reason
    return None


_warned: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def warn_fallback(owner: nn.Module, module: nn.Module | None, reason: str) -> None:
    """Warn, once per layer and reason, that ``owner`` runs its plain modules because of ``module``."""
    seen = _warned.setdefault(owner, set())
    if reason in seen:
        return
    seen.add(reason)
    layer = getattr(owner, "qualified_name", "") or type(owner).__name__
    role = next((name for name, child in owner.named_children() if child is module), None)
    subject = f"{layer}.{role} ({type(module).__name__})" if role else layer
    warnings.warn(
        f"{subject} {reason}: the memory-efficient function would not compute it, so {layer} runs its plain "
        f"modules (exact, as efficient=False) and its memory saving is lost. The function computes {SUPPORTED}.",
        stacklevel=4,
    )
