"""The model family, in timm's shape: ``create_model`` and the ``@register_model`` factories, each naming an
architecture for :func:`_create`, which builds it and loads the weights ``pretrained=``/``weights=`` refer to
(:func:`.pretrained.loading.resolve_weights`): the one layer that knows both the core and the weights.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

from .core.functional import MemoryMode
from .core.model import DenseNet, DenseNetFeatures
from .core.registry import architecture, cifar_architecture, cifar_name, entrypoints, register_model, resolve_model
from .pretrained.loading import resolve_weights


@overload
def create_model(
    name: str, pretrained: bool = ..., *, features_only: Literal[False] = ..., **kwargs: Any
) -> DenseNet: ...
@overload
def create_model(
    name: str, pretrained: bool = ..., *, features_only: Literal[True], **kwargs: Any
) -> DenseNetFeatures: ...
def create_model(
    name: str, pretrained: bool = False, weights: Any = None, **kwargs: Any
) -> DenseNet | DenseNetFeatures:
    """Build the named architecture (:func:`resolve_model`) by its factory; ``kwargs`` are its arguments
    (``efficient``, ``cache_dir``, ``endpoint``, ``features_only``, ``out_indices``) and ``DenseNet``'s, applied
    after the weights' own. ``pretrained=True`` loads the default weights, or the tag of ``"NAME.TAG"``;
    ``weights`` names a tag (``"DEFAULT"``), a file, a folder or an ``hf-hub:`` repo. Another ``num_classes``
    loads all but the classifier. ``features_only=True``: a :class:`DenseNetFeatures` of levels ``out_indices``.
    """
    if isinstance(name, str) and "." in name:  # timm's "NAME.TAG", loaded with pretrained=True
        name, tag = name.split(".", 1)
        if weights is not None and weights != tag:
            raise ValueError(f"create_model({name + '.' + tag!r}, weights={weights!r}) names two different weights")
        weights = tag if pretrained else weights
    name = resolve_model(name)
    factory = entrypoints().get(name) or functools.partial(_create, name, architecture(name))  # a CIFAR depth
    return factory(pretrained=pretrained, weights=weights, **kwargs)


def _create(
    name: str,
    arch: dict[str, Any],
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> Any:
    """``DenseNet(**arch, **kwargs)`` named ``name``, built once, with the weights ``pretrained``/``weights`` refer
    to (their constructor arguments apply before ``kwargs``); a :class:`DenseNetFeatures` with ``features_only``."""
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the levels of a features_only backbone: pass features_only=True")
    resolved = None
    if pretrained or weights is not None:
        resolved = resolve_weights(name, weights, cache_dir=cache_dir, endpoint=endpoint)
        arch = {**arch, **resolved.model_args}
    model = DenseNet(**{**arch, **kwargs}, arch_name=name)
    if resolved is not None:
        resolved.load_into(model)
    return DenseNetFeatures(model, out_indices) if features_only else model


def cifar_densenet(
    depth: int,
    growth_rate: int = 12,
    bottleneck: bool = True,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
) -> DenseNet:
    """A CIFAR DenseNet of any valid depth for 32x32 inputs: DenseNet-BC (``bottleneck``: (depth - 4) / 6
    bottleneck layers a block, a 2k stem, compression 0.5) or plain ((depth - 4) / 3 layers, a 16 stem, none).
    Its ``arch_name`` (:func:`cifar_name`) builds it again with :func:`create_model`; the rest: the factories'."""
    shape = (depth, growth_rate, bottleneck)
    return _create(cifar_name(*shape), cifar_architecture(*shape), pretrained, weights, **kwargs)


def _factory(name: str, arch: dict[str, Any], doc: str) -> Callable[..., DenseNet]:
    """The registered factory ``name`` (a real function: torch.hub and timm read its name, signature and doc)."""

    def factory(pretrained: bool = False, weights: Any = None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
        return _create(name, arch, pretrained, weights, efficient=efficient, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return register_model(factory)


def _family() -> dict[str, Callable[..., DenseNet]]:
    """The factories of the family: four CIFAR networks, the ImageNet DenseNets and MONAI's 3D ones."""
    family = {}
    for depth, k, bc in ((40, 12, False), (100, 12, True), (250, 24, True), (190, 40, True)):
        arch, kind = cifar_architecture(depth, k, bc), "bottleneck layers, compression 0.5" if bc else "layers"
        about = f"DenseNet{'-BC' if bc else ''} L={depth}, k={k} for 32x32 inputs (CIFAR): 3 blocks of "
        family[cifar_name(depth, k, bc)] = (arch, about + f"{arch['block_config'][0]} {kind}.")
    blocks = {121: (6, 12, 24, 16), 161: (6, 12, 36, 24), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32)}
    for depth, layers in (blocks | {264: (6, 12, 64, 48)}).items():
        k = 48 if depth == 161 else 32
        arch = dict(growth_rate=k, block_config=layers, num_init_features=2 * k)
        about = f"for ImageNet (224x224): blocks of {', '.join(map(str, layers))} layers, k={k}."
        family[f"densenet{depth}_efficient"] = (arch, f"DenseNet-{depth} {about}")
        if depth != 161:  # MONAI's: the ImageNet stem in 3D, single-channel volumes, two classes (its examples')
            about = f"for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet{depth}(spatial_dims=3)``."
            volumes = arch | dict(spatial_dims=3, in_chans=1, num_classes=2)
            family[f"densenet{depth}_3d"] = (volumes, f"DenseNet-{depth} {about}")
    return {name: _factory(name, arch, about) for name, (arch, about) in family.items()}


globals().update(_family())  # densenet121_efficient, ...: module attributes, as torch.hub and timm expect
