"""Named architectures: ``@register_model`` factories, ``create_model``, ``list_models`` and the name resolver.

Each architecture is a plain function decorated with :func:`register_model`, in the manner of timm and
torchvision, so IDEs and type checkers see its signature and docstring. Every factory builds its network with
the one shared builder, ``_create_densenet``; :func:`create_model` looks a name up and calls its factory.

Names follow the published architecture names. Only names that torchvision or timm also use for a 2D ImageNet
DenseNet carry the ``_efficient`` suffix (``densenet121_efficient`` ... ``densenet264_efficient``), so that
registering these models with timm never shadows timm's own ``densenet121``. Names unique to this project have
no suffix: the CIFAR networks (``densenet_bc_100_k12``, and any depth as ``densenet_bc_<depth>_k<growth>`` or
``densenet_<depth>_k<growth>``, built by :func:`cifar_densenet`) and the volumetric ones (``densenet121_3d`` ...
``densenet264_3d``). The earlier 3D names (``densenet121_3d_efficient``, ...) are aliases: they build the same
models, and ``list_models(include_aliases=True)`` lists them.

The core knows nothing of pretrained weights: the weights layer (:mod:`densenet_efficient.pretrained`) installs a
resolver with :func:`set_weights_resolver` when the package is imported, and the builder calls it for
``pretrained=True`` or ``weights=...``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, overload

import torch
from torch import nn

from .functional import MemoryMode
from .model import DenseNet, DenseNetFeatures

_FACTORY = TypeVar("_FACTORY", bound=Callable[..., DenseNet])
_ENTRYPOINTS: dict[str, Callable[..., DenseNet]] = {}
# Earlier names that keep working: alias -> registered name.
_ALIASES = {f"densenet{depth}_3d_efficient": f"densenet{depth}_3d" for depth in (121, 169, 201, 264)}
# Any CIFAR depth: densenet_bc_<depth>_k<growth> (DenseNet-BC) or densenet_<depth>_k<growth> (no digits with a
# leading zero, so that each network has one name).
_CIFAR_NAME = re.compile(r"densenet(_bc)?_([1-9]\d*)_k([1-9]\d*)")
CIFAR_NAME_PATTERNS = "densenet_bc_<depth>_k<growth>, densenet_<depth>_k<growth>"


class ResolvedWeights(Protocol):
    """What a weights resolver returns: the constructor arguments the weights need, and how to load them."""

    @property
    def model_args(self) -> dict[str, Any]: ...

    def load_into(self, model: nn.Module) -> nn.Module: ...


class WeightsResolver(Protocol):
    def __call__(
        self, name: str, weights: str | os.PathLike | None, *, cache_dir: str | os.PathLike | None, endpoint: str | None
    ) -> ResolvedWeights: ...


_weights_resolver: WeightsResolver | None = None

_FACTORY_ARGS = """

    Args:
        pretrained: load the default pretrained weights for this model (see ``weights_manifest.json``).
        weights: a weights tag of this model (e.g. ``"tv_in1k"``), a path to a ``.safetensors`` file, or
            ``"hf-hub:org/name[@revision]"``. Overrides ``pretrained``.
        efficient: memory mode. ``False``: plain autograd. ``True`` (default): keep only batch statistics and
            bottleneck outputs, recompute concatenation, BN and ReLU in backward (same results, a fraction of
            the memory). ``"max"``: also recompute the bottleneck convolution, the lowest memory.
        features_only: return a multi-scale backbone (``DenseNetFeatures``: a list of feature maps) instead;
            ``out_indices`` picks its levels of ``feature_info`` (default all).
        **kwargs: any other ``DenseNet`` argument (``num_classes``, ``in_chans``, ``drop_rate``, ...), and
            ``cache_dir``, ``endpoint``: the Hugging Face cache folder and Hub address for the download
            (default: ``HF_HUB_CACHE``, ``HF_ENDPOINT``).
"""


def set_weights_resolver(resolver: WeightsResolver) -> None:
    """Install the function that turns ``(name, weights reference)`` into loadable weights (done by the
    ``pretrained`` layer when ``densenet_efficient`` is imported)."""
    global _weights_resolver
    _weights_resolver = resolver


def register_model(factory: _FACTORY) -> _FACTORY:
    """Register ``factory`` under its function name and append the factories' common arguments to its
    docstring. A name is registered once: a second registration raises ``ValueError``."""
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


def resolve_model(name: str) -> tuple[str, Callable[..., DenseNet]]:
    """``(canonical name, factory)`` for a registered name, an alias, or a CIFAR network of any depth
    (``densenet_bc_<depth>_k<growth>``, ``densenet_<depth>_k<growth>``). The one name resolver: everything that
    takes a model name goes through it. Raises ``TypeError``/``ValueError`` naming the valid names."""
    if not isinstance(name, str):
        raise TypeError(
            f"model name must be a str such as 'densenet121_efficient', got {type(name).__name__} "
            f"{name!r}; list_models() lists them"
        )
    name = _ALIASES.get(name, name)
    if name in _ENTRYPOINTS:
        return name, _ENTRYPOINTS[name]
    match = _CIFAR_NAME.fullmatch(name)
    if match:
        arch = cifar_architecture(int(match[2]), int(match[3]), bool(match[1]))  # a depth no network has raises
        return name, functools.partial(_create_densenet, name, arch)
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
    """The constructor arguments of registered name ``name``, read from the network its factory builds on the
    ``meta`` device (nothing is allocated)."""
    with torch.device("meta"):
        return dict(_ENTRYPOINTS[name](efficient=False).config)


def architecture(name: str) -> dict[str, Any]:
    """Constructor arguments of the named architecture (for a registered name its ``DenseNet.config``; for a
    CIFAR depth :func:`cifar_architecture`); raises ``ValueError`` for an unknown name (see
    :func:`resolve_model`)."""
    name, _ = resolve_model(name)
    match = _CIFAR_NAME.fullmatch(name)
    if name not in _ENTRYPOINTS and match:
        return cifar_architecture(int(match[2]), int(match[3]), bool(match[1]))
    return dict(_architecture(name))


@overload
def create_model(
    name: str,
    pretrained: bool = ...,
    weights: str | os.PathLike | None = ...,
    *,
    cache_dir: str | os.PathLike | None = ...,
    endpoint: str | None = ...,
    features_only: Literal[False] = ...,
    out_indices: int | Sequence[int] | None = ...,
    **kwargs: Any,
) -> DenseNet: ...


@overload
def create_model(
    name: str,
    pretrained: bool = ...,
    weights: str | os.PathLike | None = ...,
    *,
    cache_dir: str | os.PathLike | None = ...,
    endpoint: str | None = ...,
    features_only: Literal[True],
    out_indices: int | Sequence[int] | None = ...,
    **kwargs: Any,
) -> DenseNetFeatures: ...


def create_model(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> DenseNet | DenseNetFeatures:
    """Build the named architecture (see :func:`resolve_model` for the names): call its factory; ``kwargs``
    override its ``DenseNet`` arguments.

    ``pretrained=True`` loads the model's default weights, or the tag of ``"NAME.TAG"``; ``weights`` names a tag
    (``"DEFAULT"``: the default one), a file or an ``hf-hub:`` repo (see the factory functions' documentation).
    The weights' own constructor arguments apply first, then ``kwargs``: another ``num_classes`` loads all but
    the classifier (fine-tuning). ``cache_dir`` and ``endpoint`` override the Hugging Face cache folder and Hub
    address for the download.

    ``features_only=True`` returns the network as a multi-scale backbone (:class:`DenseNetFeatures`, timm's
    ``features_only``): a list of feature maps, the levels ``out_indices`` of ``feature_info`` (default all:
    the stem, each dense block but the last, the final features).
    """
    name, tag = _split_tag(name, weights)
    if tag is not None and pretrained:
        weights = tag
    _, factory = resolve_model(name)
    return factory(
        pretrained=pretrained,
        weights=weights,
        cache_dir=cache_dir,
        endpoint=endpoint,
        features_only=features_only,
        out_indices=out_indices,
        **kwargs,
    )


def _split_tag(name: str, weights: str | os.PathLike | None) -> tuple[str, str | None]:
    """``"NAME.TAG"`` (timm's spelling) -> ``("NAME", "TAG")``, ``"NAME"`` -> ``("NAME", None)``; a tag also
    given as ``weights`` must agree. As in timm, the tag is loaded with ``pretrained=True``."""
    if not isinstance(name, str) or "." not in name:
        return name, None
    name, tag = name.split(".", 1)
    if weights is not None and weights != tag:
        raise ValueError(
            f"create_model({name + '.' + tag!r}, weights={weights!r}) names two different weights: "
            f"pass the tag in one place"
        )
    return name, tag


def _create_densenet(
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
    """The builder every factory calls: ``DenseNet(**arch, **kwargs)`` named ``name``, with the weights
    ``pretrained``/``weights`` refer to (their constructor arguments apply before ``kwargs``); a
    :class:`DenseNetFeatures` backbone with ``features_only``."""
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the levels of a features_only backbone: pass features_only=True")
    resolved = None
    if pretrained or weights is not None:
        if _weights_resolver is None:
            raise RuntimeError("no weights resolver installed: import densenet_efficient to load pretrained weights")
        resolved = _weights_resolver(name, weights, cache_dir=cache_dir, endpoint=endpoint)
        arch = {**arch, **resolved.model_args}
    model = DenseNet(**{**arch, **kwargs}, arch_name=name)
    if resolved is not None:
        resolved.load_into(model)
    return DenseNetFeatures(model, out_indices) if features_only else model


def cifar_architecture(depth: int, growth_rate: int = 12, bottleneck: bool = True) -> dict[str, Any]:
    """Constructor arguments of a CIFAR DenseNet of ``depth`` (see :func:`cifar_densenet`); raises for a depth
    that no network of the family has."""
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
    """The model name of a CIFAR DenseNet: ``densenet_bc_<depth>_k<growth>`` or ``densenet_<depth>_k<growth>``."""
    return f"densenet{'_bc' if bottleneck else ''}_{depth}_k{growth_rate}"


def cifar_densenet(
    depth: int,
    growth_rate: int = 12,
    bottleneck: bool = True,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
) -> DenseNet:
    """A CIFAR DenseNet of any valid depth: DenseNet-BC (``bottleneck=True``) or plain DenseNet, for 32x32 inputs.

    DenseNet-BC has (depth - 4) / 6 bottleneck layers per block, a stem of 2k channels and compression 0.5;
    plain DenseNet has (depth - 4) / 3 layers per block, a stem of 16 channels and no compression. Its
    ``arch_name`` is :func:`cifar_name`, a name :func:`create_model` builds again. ``pretrained``, ``weights``
    and ``kwargs`` are the factories' (see :func:`densenet_bc_100_k12`).
    """
    arch = cifar_architecture(depth, growth_rate, bottleneck)
    name = cifar_name(depth, growth_rate, bottleneck)
    return _create_densenet(name, arch, pretrained, weights, **kwargs)


@register_model
def densenet_40_k12(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet L=40, k=12 for 32x32 inputs (CIFAR): 3 blocks of 12 layers, no bottleneck, no compression."""
    arch = cifar_architecture(40, 12, bottleneck=False)
    return _create_densenet("densenet_40_k12", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet_bc_100_k12(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-BC L=100, k=12 for 32x32 inputs (CIFAR): 3 blocks of 16 bottleneck layers, compression 0.5."""
    arch = cifar_architecture(100, 12, bottleneck=True)
    return _create_densenet("densenet_bc_100_k12", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet_bc_250_k24(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-BC L=250, k=24 for 32x32 inputs (CIFAR): 3 blocks of 41 bottleneck layers, compression 0.5."""
    arch = cifar_architecture(250, 24, bottleneck=True)
    return _create_densenet("densenet_bc_250_k24", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet_bc_190_k40(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-BC L=190, k=40 for 32x32 inputs (CIFAR): 3 blocks of 31 bottleneck layers, compression 0.5."""
    arch = cifar_architecture(190, 40, bottleneck=True)
    return _create_densenet("densenet_bc_190_k40", arch, pretrained, weights, efficient=efficient, **kwargs)


def _imagenet(block_config: tuple[int, ...], growth_rate: int = 32, **arch: Any) -> dict[str, Any]:
    """The arguments of an ImageNet-stem DenseNet (bottleneck 4k, compression 0.5, a stem of 2k channels)."""
    return dict(growth_rate=growth_rate, block_config=block_config, num_init_features=2 * growth_rate, **arch)


@register_model
def densenet121_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-121 for ImageNet (224x224): blocks of 6, 12, 24, 16 layers, k=32."""
    arch = _imagenet((6, 12, 24, 16))
    return _create_densenet("densenet121_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet169_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-169 for ImageNet (224x224): blocks of 6, 12, 32, 32 layers, k=32."""
    arch = _imagenet((6, 12, 32, 32))
    return _create_densenet("densenet169_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet201_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-201 for ImageNet (224x224): blocks of 6, 12, 48, 32 layers, k=32."""
    arch = _imagenet((6, 12, 48, 32))
    return _create_densenet("densenet201_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet161_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-161 for ImageNet (224x224): blocks of 6, 12, 36, 24 layers, k=48."""
    arch = _imagenet((6, 12, 36, 24), growth_rate=48)
    return _create_densenet("densenet161_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet264_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-264 for ImageNet (224x224): blocks of 6, 12, 64, 48 layers, k=32 (tech report; no weights)."""
    arch = _imagenet((6, 12, 64, 48))
    return _create_densenet("densenet264_efficient", arch, pretrained, weights, efficient=efficient, **kwargs)


# Volumetric (3D) DenseNets: the architectures of MONAI's DenseNet121/169/201/264 (ImageNet stem in 3D, compression
# 0.5), for single-channel volumes (CT, MRI) and two classes by default, as in MONAI's 3D classification examples.
def _volumetric(block_config: tuple[int, ...]) -> dict[str, Any]:
    return _imagenet(block_config, spatial_dims=3, in_chans=1, num_classes=2)


@register_model
def densenet121_3d(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-121 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet121(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 24, 16))
    return _create_densenet("densenet121_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet169_3d(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-169 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet169(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 32, 32))
    return _create_densenet("densenet169_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet201_3d(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-201 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet201(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 48, 32))
    return _create_densenet("densenet201_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


@register_model
def densenet264_3d(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-264 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet264(spatial_dims=3)``."""
    arch = _volumetric((6, 12, 64, 48))
    return _create_densenet("densenet264_3d", arch, pretrained, weights, efficient=efficient, **kwargs)


def entrypoints() -> dict[str, Callable[..., DenseNet]]:
    """``{name: factory}`` of every registered model and alias (an alias maps to the factory of the name it
    stands for): what the package and ``hubconf.py`` export."""
    names = {**{name: name for name in _ENTRYPOINTS}, **_ALIASES}
    return {name: _ENTRYPOINTS[target] for name, target in sorted(names.items())}
