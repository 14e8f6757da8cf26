"""The model family, in timm's shape: ``create_model`` and the ``@register_model`` factories, each naming an
architecture for :func:`_create`, which builds it and loads the weights ``pretrained=``/``weights=`` refer to
(:func:`.pretrained.loading.resolve_weights`): the one layer that knows both the core and the weights.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
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
    arch = cifar_architecture(depth, growth_rate, bottleneck)
    name = cifar_name(depth, growth_rate, bottleneck)
    return _create(name, arch, pretrained, weights, **kwargs)


def _imagenet(block_config: tuple[int, ...], growth_rate: int = 32, **arch: Any) -> dict[str, Any]:
    """An ImageNet-stem DenseNet's arguments (bottleneck 4k, compression 0.5, a stem of 2k channels)."""
    return dict(growth_rate=growth_rate, block_config=block_config, num_init_features=2 * growth_rate, **arch)


def _volumetric(block_config: tuple[int, ...]) -> dict[str, Any]:
    """MONAI's 3D DenseNets: the ImageNet stem in 3D, single-channel volumes, two classes (its examples')."""
    return _imagenet(block_config, spatial_dims=3, in_chans=1, num_classes=2)


@register_model
def densenet_40_k12(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet L=40, k=12 for 32x32 inputs (CIFAR): 3 blocks of 12 layers, no bottleneck, no compression."""
    arch = cifar_architecture(40, 12, bottleneck=False)
    return _create("densenet_40_k12", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet_bc_100_k12(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC L=100, k=12 for 32x32 inputs (CIFAR): 3 blocks of 16 bottleneck layers, compression 0.5."""
    arch = cifar_architecture(100, 12, bottleneck=True)
    return _create("densenet_bc_100_k12", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet_bc_250_k24(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC L=250, k=24 for 32x32 inputs (CIFAR): 3 blocks of 41 bottleneck layers, compression 0.5."""
    arch = cifar_architecture(250, 24, bottleneck=True)
    return _create("densenet_bc_250_k24", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet_bc_190_k40(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC L=190, k=40 for 32x32 inputs (CIFAR): 3 blocks of 31 bottleneck layers, compression 0.5."""
    arch = cifar_architecture(190, 40, bottleneck=True)
    return _create("densenet_bc_190_k40", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet121_efficient(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 for ImageNet (224x224): blocks of 6, 12, 24, 16 layers, k=32."""
    arch = _imagenet((6, 12, 24, 16))
    return _create("densenet121_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet169_efficient(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 for ImageNet (224x224): blocks of 6, 12, 32, 32 layers, k=32."""
    arch = _imagenet((6, 12, 32, 32))
    return _create("densenet169_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet201_efficient(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 for ImageNet (224x224): blocks of 6, 12, 48, 32 layers, k=32."""
    arch = _imagenet((6, 12, 48, 32))
    return _create("densenet201_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet161_efficient(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 for ImageNet (224x224): blocks of 6, 12, 36, 24 layers, k=48."""
    arch = _imagenet((6, 12, 36, 24), growth_rate=48)
    return _create("densenet161_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet264_efficient(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 for ImageNet (224x224): blocks of 6, 12, 64, 48 layers, k=32 (tech report; no weights)."""
    arch = _imagenet((6, 12, 64, 48))
    return _create("densenet264_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet121_3d(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet121(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 24, 16))
    return _create("densenet121_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet169_3d(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet169(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 32, 32))
    return _create("densenet169_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet201_3d(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet201(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 48, 32))
    return _create("densenet201_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet264_3d(pretrained=False, weights=None, efficient: MemoryMode = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet264(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 64, 48))
    return _create("densenet264_3d", arch, pretrained, weights, efficient=efficient, **kwargs)
