"""Which BN-ReLU-Conv stages the memory-efficient function may compute, and the warning when it may not.

The function reads a stage's tensors and settings (``norm.weight``, ``norm.running_mean``, ``conv.weight``,
``conv.stride``, ...) and never calls the modules. It therefore computes a stage exactly only when the modules do
nothing but what it computes: batch norm (training or eval mode), a norm with fixed statistics, instance norm or
group norm (affine or not), one of the activations of :data:`ACTIVATIONS`, and a bias-free, zero-padded
convolution, with no hooks that expect the modules to be called and nothing set on the instance that replaces what
its class computes. Everything else (another norm, a convolution with a bias or its
own ``forward``, a ``forward`` set on one instance, hooks, legacy reparametrisations, quantisation-aware training)
runs the plain modules for that layer, exactly, with a one-time warning that names the layer and says that its
memory saving is lost. ``torch.nn.utils.parametrize`` is computed: reading a parametrised tensor evaluates its
parametrisation, differentiably.

The hook rule: a hook on a module inside a layer (its own, or a global hook, which may look at any module's
class) sends the layer to its plain modules. The global hooks of torch's module trackers (``ModTracker``:
``MemTracker``, ``CommDebugMode``; ``ModuleTracker``: ``FlopCounterMode``) only observe where modules begin and
end: they see the dense layers, transitions and everything above them, and the efficient path and its saving.

The checks read types, attributes and hook dictionaries on every call (a few dictionary look-ups per stage), so
hooks or modules added at any time are seen.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

# Batch norms the function computes as they are: (N, C, *spatial) batch norm, statistics from the batch in
# training mode (shared across processes where ``process_group`` says so) and the running ones in eval mode.
_BATCH_NORMS = frozenset(
    {
        "torch.nn.modules.batchnorm.BatchNorm1d",
        "torch.nn.modules.batchnorm.BatchNorm2d",
        "torch.nn.modules.batchnorm.BatchNorm3d",
        "torch.nn.modules.batchnorm.SyncBatchNorm",
        "densenet_efficient.core.sync_batchnorm.SyncBatchNorm",
    }
)
# Batch norm followed by its own activation and dropout: computed when those are a ReLU (or nothing) and nothing.
_BATCH_NORM_ACTS = frozenset({"timm.layers.norm_act.BatchNormAct2d"})
# Norms with fixed statistics and affine tensors as buffers (``weight``, ``bias``, ``running_mean``,
# ``running_var``, ``eps``): computed as an eval-mode batch norm, whatever their training flag.
FROZEN_NORMS = frozenset({"torchvision.ops.misc.FrozenBatchNorm2d"})
# Per-sample norms: InstanceNorm (tracking running statistics or not) and GroupNorm, affine or not.
_INSTANCE_NORMS = frozenset(f"torch.nn.modules.instancenorm.InstanceNorm{d}d" for d in (1, 2, 3))
_GROUP_NORMS = frozenset({"torch.nn.modules.normalization.GroupNorm"})
# Activations the function recomputes in backward: class -> (name, parameter) of the stage (see functional._activate).
ACTIVATIONS: dict[str, Callable[[Any], tuple[str, float]]] = {
    "torch.nn.modules.activation.ReLU": lambda m: ("relu", 0.0),
    "torch.nn.modules.activation.LeakyReLU": lambda m: ("leaky_relu", m.negative_slope),
    "torch.nn.modules.activation.ELU": lambda m: ("elu", m.alpha),
    "torch.nn.modules.activation.SiLU": lambda m: ("silu", 0.0),
    "torch.nn.modules.activation.PReLU": lambda m: ("prelu", 0.0),
    "monai.networks.blocks.activation.Swish": lambda m: ("swish", m.alpha),  # x * sigmoid(alpha * x)
}
_CONVOLUTIONS = frozenset(
    {"torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.conv.Conv3d"}
)
_KNOWN = (
    ("batch_norm", _BATCH_NORMS),
    ("batch_norm_act", _BATCH_NORM_ACTS),
    ("frozen", FROZEN_NORMS),
    ("instance", _INSTANCE_NORMS),
    ("group", _GROUP_NORMS),
    ("act", frozenset(ACTIVATIONS)),
    ("conv", _CONVOLUTIONS),
)
SUPPORTED = (
    "BatchNorm1d/2d/3d, SyncBatchNorm, torchvision's FrozenBatchNorm2d, timm's BatchNormAct2d with a ReLU, "
    "InstanceNorm1d/2d/3d or GroupNorm, then ReLU, LeakyReLU, PReLU, ELU, SiLU or MONAI's Swish, then a "
    "Conv1d/2d/3d without bias and with zero padding, no hooks"
)


_kinds: dict[type, str] = {}  # class -> a kind of _KNOWN or "other"


def _name(cls: type) -> str:
    base = cls.__bases__[0] if cls.__module__ == parametrize.__name__ else cls
    return f"{base.__module__}.{base.__qualname__}"


def _kind(module: object) -> str:
    """What the function knows ``module``'s class as (cached per class: a class does not change). A class made by
    ``parametrize`` counts as the class it parametrises (parametrize computes its tensors on access)."""
    cls = type(module)
    kind = _kinds.get(cls)
    if kind is None:
        kind = next((known for known, names in _KNOWN if _name(cls) in names), "other")
        _kinds[cls] = kind
    return kind


def is_frozen_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with fixed statistics whatever its training flag (torchvision's
    ``FrozenBatchNorm2d``)."""
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


# Classes (and their subclasses) whose global module hooks only observe module boundaries.
_OBSERVERS = frozenset({"torch.utils.module_tracker.ModuleTracker", "torch.distributed._tools.mod_tracker.ModTracker"})
_observer_types: dict[type, bool] = {}


def _is_observer(hook: object) -> bool:
    """Whether ``hook`` is a method of one of torch's module trackers (see :data:`_OBSERVERS`)."""
    cls = type(getattr(hook, "__self__", None))
    observer = _observer_types.get(cls)
    if observer is None:
        observer = _observer_types[cls] = any(f"{c.__module__}.{c.__qualname__}" in _OBSERVERS for c in cls.__mro__)
    return observer


def has_global_module_hooks() -> bool:
    """Whether hooks for every module are registered (``torch.nn.modules.module.register_module_*_hook``) other
    than torch's module trackers' (they only observe module boundaries)."""
    hook_dicts = (
        module_hooks._global_forward_hooks,
        module_hooks._global_forward_pre_hooks,
        module_hooks._global_backward_hooks,
        module_hooks._global_backward_pre_hooks,
    )
    return any(not _is_observer(hook) for hooks in hook_dicts for hook in hooks.values())


def _own_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


_methods: dict[type, frozenset[str]] = {}  # class -> names of its methods (cached: a class does not change)


def _instance_override(module: nn.Module) -> str | None:
    """The name of a method of ``module``'s class that the instance replaces (``module.forward = ...``:
    ``types.MethodType``, ``functools.partial``, accelerate's hooks), or ``None``."""
    cls = type(module)
    methods = _methods.get(cls)
    if methods is None:
        methods = _methods[cls] = frozenset(
            name for name in dir(cls) if not name.startswith("__") and callable(getattr(cls, name, None))
        )
    return next((name for name in module.__dict__ if name in methods), None)


def is_customised(module: nn.Module) -> bool:
    """Whether calling ``module`` may do other than its class's ``forward``: hooks (its own, or global ones other
    than torch's module trackers'), or a method replaced on the instance."""
    return _own_hooks(module) or _instance_override(module) is not None or has_global_module_hooks()


def _is_exactly(module: object, *classes: type) -> TypeGuard[nn.Module]:
    return type(module) in classes


def _norm_obstacle(norm: nn.Module) -> str | None:
    kind = _kind(norm)
    if kind in ("frozen", "instance", "group"):
        return None
    if kind == "batch_norm_act":
        act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
        if not _is_exactly(act, nn.ReLU, nn.Identity) or not _is_exactly(drop, nn.Identity):
            return f"is a {type(norm).__name__} with activation {type(act).__name__} and dropout {type(drop).__name__}"
        if is_customised(act) or is_customised(drop):
            return "has hooks or a replaced method on its activation or dropout"
    elif kind != "batch_norm":
        return f"is a {type(norm).__name__}, not a batch norm"
    if norm.weight is None or norm.bias is None:
        return "is a batch norm without affine weight and bias (affine=False or bias=False)"
    return None


def _conv_obstacle(conv: nn.Module) -> str | None:
    if _kind(conv) != "conv":
        return f"is a {type(conv).__name__}, not a Conv1d/2d/3d"
    if conv.bias is not None:
        return "has a bias"
    if conv.padding_mode != "zeros":
        return f"pads with padding_mode={conv.padding_mode!r}, not zeros"
    if isinstance(conv.padding, str):
        return f"has padding={conv.padding!r}, not numeric padding"
    return None


def _act_obstacle(act: nn.Module) -> str | None:
    return None if activation(act) is not None else f"is a {type(act).__name__}, not a supported activation"


def efficient_obstacle(
    stages: Sequence[tuple[nn.Module, nn.Module | None, nn.Module | None]],
) -> tuple[nn.Module | None, str] | None:
    """``None`` if the memory-efficient function computes ``stages`` exactly (see the module docstring), else
    the first module it would get wrong (``None`` for the whole network) and why."""
    if has_global_module_hooks():
        return None, "runs while global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    for norm, act, conv in stages:
        for module, obstacle in ((norm, _norm_obstacle), (act, _act_obstacle), (conv, _conv_obstacle)):
            if module is None:  # a default ReLU, or a BN-ReLU without convolution
                continue
            reason = obstacle(module)
            override = _instance_override(module)
            if reason is None and override is not None:
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
