"""Named architectures: the ``@register_model`` table, ``list_models``, ``architecture`` and the name resolver.

The factories and ``create_model`` live in :mod:`densenet_efficient.models`, which also knows the weights. Names
that torchvision or timm also use carry the ``_efficient`` suffix (registering with timm never shadows timm's own
``densenet121``); the CIFAR and 3D names have none (docs/index.md).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .model import DenseNet

_FACTORY = TypeVar("_FACTORY", bound=Callable[..., DenseNet])
_ENTRYPOINTS: dict[str, Callable[..., DenseNet]] = {}
# Earlier names that keep working: alias -> registered name.
_ALIASES = {f"densenet{depth}_3d_efficient": f"densenet{depth}_3d" for depth in (121, 169, 201, 264)}
# Any CIFAR depth: densenet_bc_<depth>_k<growth> (DenseNet-BC) or densenet_<depth>_k<growth> (no digits with a
# leading zero, so that each network has one name).
_CIFAR_NAME = re.compile(r"densenet(_bc)?_([1-9]\d*)_k([1-9]\d*)")
CIFAR_NAME_PATTERNS = "densenet_bc_<depth>_k<growth>, densenet_<depth>_k<growth>"


_FACTORY_ARGS = """

    Args:
        pretrained: load this model's default weights (``weights_manifest.json``).
        weights: a weights tag of this model (``"tv_in1k"``), a ``.safetensors`` path, or
            ``"hf-hub:org/name[@revision]"``; overrides ``pretrained``.
        efficient: memory mode: ``False`` plain autograd; ``True`` (default) recompute concatenation, BN and ReLU
            in backward (same results, a fraction of the memory); ``"max"`` also the bottleneck convolution.
        features_only: return a ``DenseNetFeatures`` backbone (a list of feature maps, the levels ``out_indices``).
        **kwargs: other ``DenseNet`` arguments (``num_classes``, ``in_chans``, ...), and ``cache_dir``, ``endpoint``
            for the download (default: ``HF_HUB_CACHE``, ``HF_ENDPOINT``).
"""


def register_model(factory: _FACTORY) -> _FACTORY:
    """Register ``factory`` under its name (once: again raises ``ValueError``), its docstring completed."""
    name = factory.__name__
    if name in _ENTRYPOINTS or name in _ALIASES:
        raise ValueError(f"model {name!r} is already registered: pick another function name")
    factory.__doc__ = (factory.__doc__ or "").rstrip() + _FACTORY_ARGS
    _ENTRYPOINTS[name] = factory
    return factory


def list_models(pattern: str = "*", include_aliases: bool = False) -> list[str]:
    """Sorted names of the registered architectures that match the shell-style ``pattern``; with
    ``include_aliases``, also the earlier names that still build them (``densenet121_3d_efficient``, ...)."""
    names = [*_ENTRYPOINTS, *(_ALIASES if include_aliases else ())]
    return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))


def resolve_model(name: str) -> str:
    """The canonical name of a registered name, an alias, or a CIFAR network of any depth: the one name resolver.
    Raises ``TypeError``/``ValueError`` naming the valid names."""
    if not isinstance(name, str):
        raise TypeError(
            f"model name must be a str such as 'densenet121_efficient', got {type(name).__name__} "
            f"{name!r}; list_models() lists them"
        )
    name = _ALIASES.get(name, name)
    if name in _ENTRYPOINTS:
        return name
    match = _CIFAR_NAME.fullmatch(name)
    if match:
        cifar_architecture(int(match[2]), int(match[3]), bool(match[1]))  # a depth no network has raises
        return name
    close = difflib.get_close_matches(name, list_models(include_aliases=True), n=3, cutoff=0.5)
    # torchvision's and timm's names (densenet121) are this project's with the suffix: suggested first, not
    # accepted, so that register_with_timm never shadows timm's own model of that name.
    ours = f"{name.lower()}_efficient"
    if ours in _ENTRYPOINTS:
        close = [ours, *(other for other in close if other != ours)][:3]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown model {name!r}.{hint} Available models: {', '.join(list_models())}; or any CIFAR depth as "
        f"{CIFAR_NAME_PATTERNS}"
    )


def is_model(name: str) -> bool:
    """Whether ``name`` is a name :func:`create_model` builds (registered, an alias, or a CIFAR depth)."""
    try:
        resolve_model(name)
    except (TypeError, ValueError):
        return False
    return True


@functools.cache
def _architecture(name: str) -> dict[str, Any]:
    """The constructor arguments of registered ``name``, from its network built on the ``meta`` device."""
    with torch.device("meta"):
        return dict(_ENTRYPOINTS[name](efficient=False).config)


def architecture(name: str) -> dict[str, Any]:
    """Constructor arguments of the named architecture (its ``DenseNet.config``); ``ValueError`` if unknown."""
    name = resolve_model(name)
    match = _CIFAR_NAME.fullmatch(name)
    if name not in _ENTRYPOINTS and match:
        return cifar_architecture(int(match[2]), int(match[3]), bool(match[1]))
    return dict(_architecture(name))


def cifar_architecture(depth: int, growth_rate: int = 12, bottleneck: bool = True) -> dict[str, Any]:
    """Constructor arguments of a CIFAR DenseNet of ``depth``; raises for a depth no network of the family has."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__} {depth!r}")
    convs_per_layer = 2 if bottleneck else 1
    per_block, remainder = divmod(depth - 4, 3 * convs_per_layer)
    if remainder or per_block < 1:
        family, step = ("DenseNet-BC", 6) if bottleneck else ("DenseNet", 3)
        valid = ", ".join(str(step * n + 4) for n in range(1, 5))
        raise ValueError(f"{family} depth must be {step}n+4 with n >= 1 ({valid}, ...), got {depth}")
    return dict(
        growth_rate=growth_rate,
        block_config=(per_block,) * 3,
        num_init_features=2 * growth_rate if bottleneck else 16,
        bn_size=4 if bottleneck else 0,
        compression=0.5 if bottleneck else 1.0,
        num_classes=10,
        stem="cifar",
    )


def cifar_name(depth: int, growth_rate: int = 12, bottleneck: bool = True) -> str:
    """The model name of a CIFAR DenseNet."""
    return f"densenet{'_bc' if bottleneck else ''}_{depth}_k{growth_rate}"


def entrypoints() -> dict[str, Callable[..., DenseNet]]:
    """``{name: factory}`` of every registered model and alias: what the package and ``hubconf.py`` export."""
    names = {**{name: name for name in _ENTRYPOINTS}, **_ALIASES}
    return {name: _ENTRYPOINTS[target] for name, target in sorted(names.items())}
