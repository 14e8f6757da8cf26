"""Memory-efficient DenseNets for PyTorch: same outputs, gradients and BatchNorm statistics, a fraction of the memory.

Layers (imports only go down): :mod:`.core` (autograd function, model, named architectures),
:mod:`.pretrained` (manifest, downloads, loading, saving), :mod:`.tools` (the ``densenet-efficient`` commands,
imported only by the command line). :mod:`.interop` registers the architectures with timm on request.
"""

from importlib import metadata as _metadata

from . import pretrained
from .core import (
    MEMORY_MODES,
    DenseNet,
    DenseNetFeatures,
    MemoryMode,
    SyncBatchNorm,
    check_memory_mode,
    cifar_densenet,
    convert_sync_batchnorm,
    create_model,
    densenet121_3d_efficient,
    densenet121_efficient,
    densenet161_efficient,
    densenet169_3d_efficient,
    densenet169_efficient,
    densenet201_3d_efficient,
    densenet201_efficient,
    densenet264_3d_efficient,
    densenet264_efficient,
    densenet_40_k12,
    densenet_bc_100_k12,
    densenet_bc_190_k40,
    densenet_bc_250_k24,
    list_models,
    make_efficient,
    register_model,
)
from .interop import register_with_timm
from .pretrained import (
    ChecksumMismatchError,
    IncompatibleWeightsError,
    InvalidConfigError,
    InvalidWeightsFileError,
    ManifestError,
    PretrainedCfg,
    UnknownWeightsError,
    WeightsNotAvailableError,
    get_pretrained_cfg,
    list_pretrained,
    save_pretrained,
    transforms,
)

try:
    __version__ = _metadata.version("densenet-efficient")
except _metadata.PackageNotFoundError:  # run from a source tree (torch.hub) without installing
    __version__ = "0+unknown"

__all__ = [
    "MEMORY_MODES",
    "ChecksumMismatchError",
    "DenseNet",
    "DenseNetFeatures",
    "IncompatibleWeightsError",
    "InvalidConfigError",
    "InvalidWeightsFileError",
    "ManifestError",
    "MemoryMode",
    "PretrainedCfg",
    "SyncBatchNorm",
    "UnknownWeightsError",
    "WeightsNotAvailableError",
    "check_memory_mode",
    "cifar_densenet",
    "convert_sync_batchnorm",
    "create_model",
    "densenet121_3d_efficient",
    "densenet121_efficient",
    "densenet161_efficient",
    "densenet169_3d_efficient",
    "densenet169_efficient",
    "densenet201_3d_efficient",
    "densenet201_efficient",
    "densenet264_3d_efficient",
    "densenet264_efficient",
    "densenet_40_k12",
    "densenet_bc_100_k12",
    "densenet_bc_190_k40",
    "densenet_bc_250_k24",
    "get_pretrained_cfg",
    "list_models",
    "list_pretrained",
    "make_efficient",
    "pretrained",
    "register_model",
    "register_with_timm",
    "save_pretrained",
    "transforms",
]
