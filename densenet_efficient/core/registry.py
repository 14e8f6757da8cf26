"""Named architectures: ``@register_model`` factories, ``create_model`` and ``list_models``.

Each architecture is a plain function decorated with :func:`register_model`, in the manner of timm and
torchvision, so IDEs and type checkers see its signature and docstring. The core knows nothing of pretrained
weights: the weights layer (:mod:`densenet_efficient.pretrained`) installs a resolver with
:func:`set_weights_resolver` when the package is imported, and ``create_model`` calls it for ``pretrained=True``
or ``weights=...``.

Every factory takes ``pretrained``, ``weights``, ``efficient`` and any ``DenseNet`` argument; :func:`register_model`
appends their description to its docstring, so that ``help()`` and ``torch.hub.help`` show it.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, overload

from torch import nn

from .functional import MemoryMode
from .model import DenseNet, DenseNetFeatures

_FACTORY = TypeVar("_FACTORY", bound=Callable[..., DenseNet])
_ENTRYPOINTS: dict[str, Callable[..., DenseNet]] = {}
_ARCHITECTURES: dict[str, dict[str, Any]] = {}


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


def register_model(**architecture: Any) -> Callable[[_FACTORY], _FACTORY]:
    """Register the decorated factory under its function name, with ``DenseNet`` arguments ``architecture``, and
    append the factories' common arguments to its docstring."""

    def decorate(factory: _FACTORY) -> _FACTORY:
        factory.__doc__ = (factory.__doc__ or "").rstrip() + _FACTORY_ARGS
        _ENTRYPOINTS[factory.__name__] = factory
        _ARCHITECTURES[factory.__name__] = architecture
        return factory

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered architectures that match the shell-style ``pattern``."""
    return sorted(name for name in _ENTRYPOINTS if fnmatch.fnmatchcase(name, pattern))


def architecture(name: str) -> dict[str, Any]:
    """Constructor arguments of the named architecture; raises ``ValueError`` for an unknown name."""
    if not isinstance(name, str):
        raise TypeError(
            f"model name must be a str such as 'densenet121_efficient', got {type(name).__name__} "
            f"{name!r}; list_models() lists them"
        )
    if name not in _ARCHITECTURES:
        close = difflib.get_close_matches(name, _ARCHITECTURES, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Available models: {', '.join(list_models())}")
    return dict(_ARCHITECTURES[name])


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
    """Build the named architecture; ``kwargs`` override its ``DenseNet`` arguments.

    ``pretrained=True`` loads the model's default weights, or the tag of ``"NAME.TAG"``; ``weights`` names a tag
    (``"DEFAULT"``: the default one), a file or an ``hf-hub:`` repo (see the factory functions' documentation).
    The weights' own constructor arguments apply first, then ``kwargs``: another ``num_classes`` loads all but
    the classifier (fine-tuning). ``cache_dir`` and ``endpoint`` override the Hugging Face cache folder and Hub
    address for the download.

    ``features_only=True`` returns the network as a multi-scale backbone (:class:`DenseNetFeatures`, timm's
    ``features_only``): a list of feature maps, the levels ``out_indices`` of ``feature_info`` (default all:
    the stem, each dense block but the last, the final features).
    """
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the levels of a features_only backbone: pass features_only=True")
    name, tag = _split_tag(name, weights)
    if tag is not None and pretrained:
        weights = tag
    arch = architecture(name)
    resolved = None
    if pretrained or weights is not None:
        if _weights_resolver is None:
            raise RuntimeError("no weights resolver installed: import densenet_efficient to load pretrained weights")
        resolved = _weights_resolver(name, weights, cache_dir=cache_dir, endpoint=endpoint)
        arch.update(resolved.model_args)
    model = DenseNet(**{**arch, **kwargs}, arch_name=name)
    if resolved is not None:
        resolved.load_into(model)
    return DenseNetFeatures(model, out_indices) if features_only else model


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


@register_model(
    growth_rate=12,
    block_config=(12, 12, 12),
    num_init_features=16,
    bn_size=0,
    compression=1.0,
    num_classes=10,
    stem="cifar",
)
def densenet_40_k12(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet L=40, k=12 for 32x32 inputs (CIFAR): 3 blocks of 12 layers, no bottleneck, no compression."""
    return create_model("densenet_40_k12", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, num_classes=10, stem="cifar")
def densenet_bc_100_k12(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-BC L=100, k=12 for 32x32 inputs (CIFAR): 3 blocks of 16 bottleneck layers, compression 0.5."""
    return create_model("densenet_bc_100_k12", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=24, block_config=(41, 41, 41), num_init_features=48, num_classes=10, stem="cifar")
def densenet_bc_250_k24(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-BC L=250, k=24 for 32x32 inputs (CIFAR): 3 blocks of 41 bottleneck layers, compression 0.5."""
    return create_model("densenet_bc_250_k24", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=40, block_config=(31, 31, 31), num_init_features=80, num_classes=10, stem="cifar")
def densenet_bc_190_k40(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-BC L=190, k=40 for 32x32 inputs (CIFAR): 3 blocks of 31 bottleneck layers, compression 0.5."""
    return create_model("densenet_bc_190_k40", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
def densenet121_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-121 for ImageNet (224x224): blocks of 6, 12, 24, 16 layers, k=32."""
    return create_model("densenet121_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
def densenet169_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-169 for ImageNet (224x224): blocks of 6, 12, 32, 32 layers, k=32."""
    return create_model("densenet169_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)
def densenet201_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-201 for ImageNet (224x224): blocks of 6, 12, 48, 32 layers, k=32."""
    return create_model("densenet201_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
def densenet161_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-161 for ImageNet (224x224): blocks of 6, 12, 36, 24 layers, k=48."""
    return create_model("densenet161_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)
def densenet264_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-264 for ImageNet (224x224): blocks of 6, 12, 64, 48 layers, k=32 (tech report; no weights)."""
    return create_model("densenet264_efficient", pretrained, weights, efficient=efficient, **kwargs)


# Volumetric (3D) DenseNets: the architectures of MONAI's DenseNet121/169/201/264 (ImageNet stem in 3D, compression
# 0.5), for single-channel volumes (CT, MRI) and two classes by default, as in MONAI's 3D classification examples.


@register_model(
    growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, spatial_dims=3, in_chans=1, num_classes=2
)
def densenet121_3d_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-121 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet121(spatial_dims=3)``."""
    return create_model("densenet121_3d_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(
    growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64, spatial_dims=3, in_chans=1, num_classes=2
)
def densenet169_3d_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-169 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet169(spatial_dims=3)``."""
    return create_model("densenet169_3d_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(
    growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64, spatial_dims=3, in_chans=1, num_classes=2
)
def densenet201_3d_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-201 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet201(spatial_dims=3)``."""
    return create_model("densenet201_3d_efficient", pretrained, weights, efficient=efficient, **kwargs)


@register_model(
    growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64, spatial_dims=3, in_chans=1, num_classes=2
)
def densenet264_3d_efficient(
    pretrained: bool = False, weights: str | None = None, efficient: MemoryMode = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-264 for volumes (N, 1, D, H, W), 96^3 by default: MONAI's ``DenseNet264(spatial_dims=3)``."""
    return create_model("densenet264_3d_efficient", pretrained, weights, efficient=efficient, **kwargs)


def cifar_densenet(depth: int, growth_rate: int = 12, bottleneck: bool = True, **kwargs: Any) -> DenseNet:
    """A CIFAR DenseNet of any valid depth: DenseNet-BC (``bottleneck=True``) or plain DenseNet.

    DenseNet-BC has (depth - 4) / 6 bottleneck layers per block, a stem of 2k channels and compression 0.5;
    plain DenseNet has (depth - 4) / 3 layers per block, a stem of 16 channels and no compression.
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__} {depth!r}")
    convs_per_layer = 2 if bottleneck else 1
    per_block, remainder = divmod(depth - 4, 3 * convs_per_layer)
    if remainder or per_block < 1:
        family, step = ("DenseNet-BC", 6) if bottleneck else ("DenseNet", 3)
        valid = ", ".join(str(step * n + 4) for n in range(1, 5))
        raise ValueError(f"{family} depth must be {step}n+4 with n >= 1 ({valid}, ...), got {depth}")
    arch: dict[str, Any] = dict(
        growth_rate=growth_rate,
        block_config=(per_block,) * 3,
        stem="cifar",
        num_classes=10,
        num_init_features=2 * growth_rate if bottleneck else 16,
        bn_size=4 if bottleneck else 0,
        compression=0.5 if bottleneck else 1.0,
    )
    arch_name = f"densenet{'_bc' if bottleneck else ''}_{depth}_k{growth_rate}"
    return DenseNet(**{**arch, **kwargs}, arch_name=arch_name)
