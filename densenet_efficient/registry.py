"""Named architectures: ``create_model``, ``list_models`` and one factory function per name."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

from .model import DenseNet

_ENTRYPOINTS: dict[str, Callable[..., DenseNet]] = {}
_ARCHITECTURES: dict[str, dict[str, Any]] = {}

_FACTORY_ARGS_DOC = """
    Args:
        pretrained: load the default pretrained weights for this model (see ``weights_manifest.json``).
        weights: a weights tag of this model (e.g. ``"tv_in1k"``), a path to a ``.safetensors`` file, or
            ``"hf-hub:org/name[@revision]"``. Overrides ``pretrained``.
        cache_dir, endpoint: Hugging Face cache folder and Hub address for the download (default:
            ``HF_HUB_CACHE``, ``HF_ENDPOINT``).
        efficient: memory mode. ``False``: plain autograd. ``True`` (default): keep only batch statistics and
            bottleneck outputs, recompute concatenation, BN and ReLU in backward (same results, a fraction of
            the memory). ``"max"``: also recompute the bottleneck convolution, the lowest memory.
        **kwargs: any other ``DenseNet`` argument (``num_classes``, ``in_chans``, ``drop_rate``, ...).
    """


def register(name: str, description: str, **architecture: Any) -> Callable[..., DenseNet]:
    """Register architecture ``name`` and return its factory function."""

    def factory(pretrained: bool = False, weights: str | None = None, efficient: bool | str = True,
                **kwargs: Any) -> DenseNet:
        return create_model(name, pretrained=pretrained, weights=weights, efficient=efficient, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{description}\n{_FACTORY_ARGS_DOC}"
    _ENTRYPOINTS[name] = factory
    _ARCHITECTURES[name] = architecture
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered architectures that match the shell-style ``pattern``."""
    return sorted(name for name in _ENTRYPOINTS if fnmatch.fnmatchcase(name, pattern))


def architecture(name: str) -> dict[str, Any]:
    """Constructor arguments of the named architecture; raises ``ValueError`` for an unknown name."""
    if name not in _ARCHITECTURES:
        close = difflib.get_close_matches(name, _ARCHITECTURES, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Available models: {', '.join(list_models())}")
    return dict(_ARCHITECTURES[name])


def create_model(name: str, pretrained: bool = False, weights: str | None = None, *, cache_dir: str | None = None,
                 endpoint: str | None = None, **kwargs: Any) -> DenseNet:
    """Build the named architecture; ``kwargs`` override its ``DenseNet`` arguments.

    ``pretrained=True`` loads the model's default weights; ``weights`` names a tag, a file or an
    ``hf-hub:`` repo (see the factory functions' documentation). The weights' own constructor arguments apply
    first, then ``kwargs``: another ``num_classes`` loads all but the classifier (fine-tuning). ``cache_dir``
    and ``endpoint`` override the Hugging Face cache folder and Hub address for the download.
    """
    arch = architecture(name)
    pretrained_weights = None
    if pretrained or weights:
        from .weights import resolve_weights

        pretrained_weights = resolve_weights(name, weights, cache_dir=cache_dir, endpoint=endpoint)
        arch.update(pretrained_weights.model_args)
    model = DenseNet(**{**arch, **kwargs})
    model.arch_name = name
    if pretrained_weights is not None:
        pretrained_weights.load_into(model)
    return model


densenet_40_k12 = register(
    "densenet_40_k12",
    "DenseNet L=40, k=12 for 32x32 inputs (CIFAR): 3 blocks of 12 layers, no bottleneck, no compression.",
    growth_rate=12, block_config=(12, 12, 12), num_init_features=16, bn_size=0, compression=1.0,
    num_classes=10, stem="cifar",
)
densenet_bc_100_k12 = register(
    "densenet_bc_100_k12",
    "DenseNet-BC L=100, k=12 for 32x32 inputs (CIFAR): 3 blocks of 16 bottleneck layers, compression 0.5.",
    growth_rate=12, block_config=(16, 16, 16), num_init_features=24, num_classes=10, stem="cifar",
)
densenet_bc_250_k24 = register(
    "densenet_bc_250_k24",
    "DenseNet-BC L=250, k=24 for 32x32 inputs (CIFAR): 3 blocks of 41 bottleneck layers, compression 0.5.",
    growth_rate=24, block_config=(41, 41, 41), num_init_features=48, num_classes=10, stem="cifar",
)
densenet_bc_190_k40 = register(
    "densenet_bc_190_k40",
    "DenseNet-BC L=190, k=40 for 32x32 inputs (CIFAR): 3 blocks of 31 bottleneck layers, compression 0.5.",
    growth_rate=40, block_config=(31, 31, 31), num_init_features=80, num_classes=10, stem="cifar",
)
densenet121_efficient = register(
    "densenet121_efficient",
    "DenseNet-121 for ImageNet (224x224): blocks of 6, 12, 24, 16 layers, k=32.",
    growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
)
densenet169_efficient = register(
    "densenet169_efficient",
    "DenseNet-169 for ImageNet (224x224): blocks of 6, 12, 32, 32 layers, k=32.",
    growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64,
)
densenet201_efficient = register(
    "densenet201_efficient",
    "DenseNet-201 for ImageNet (224x224): blocks of 6, 12, 48, 32 layers, k=32.",
    growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64,
)
densenet161_efficient = register(
    "densenet161_efficient",
    "DenseNet-161 for ImageNet (224x224): blocks of 6, 12, 36, 24 layers, k=48.",
    growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96,
)
densenet264_efficient = register(
    "densenet264_efficient",
    "DenseNet-264 for ImageNet (224x224): blocks of 6, 12, 64, 48 layers, k=32 (tech report; no weights).",
    growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64,
)


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
        raise ValueError(
            f"{family} depth must be {step}n+4 with n >= 1 ({valid}, ...), got {depth}"
        )
    arch: dict[str, Any] = dict(
        growth_rate=growth_rate, block_config=(per_block,) * 3, stem="cifar", num_classes=10,
        num_init_features=2 * growth_rate if bottleneck else 16,
        bn_size=4 if bottleneck else 0, compression=0.5 if bottleneck else 1.0,
    )
    model = DenseNet(**{**arch, **kwargs})
    model.arch_name = f"densenet{'_bc' if bottleneck else ''}_{depth}_k{growth_rate}"
    return model
