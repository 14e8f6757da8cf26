"""Memory-efficient DenseNets for PyTorch: same outputs, gradients and BatchNorm statistics, a fraction of the memory.

Layers (imports only go down): :mod:`.core` (the autograd chain, model, registry), :mod:`.pretrained` (manifest,
downloads, loading, saving), :mod:`.models` (``create_model``, the factories), :mod:`.tools` (the commands);
:mod:`.interop` registers the architectures with timm on request."""

from importlib import metadata as _metadata

from . import pretrained
from .core import (
    MEMORY_MODES,
    DenseNet,
    DenseNetFeatures,
    MemoryMode,
    OptimizerInBackward,
    SyncBatchNorm,
    check_memory_mode,
    convert_sync_batchnorm,
    is_model,
    list_models,
    make_efficient,
    optim_in_backward,
    register_model,
    registry,
)
from .interop import register_with_timm
from .models import cifar_densenet, create_model
from .pretrained import (
    ChecksumMismatchError,
    IncompatibleWeightsError,
    InvalidConfigError,
    InvalidWeightsFileError,
    ManifestError,
    PretrainedCfg,
    UnknownWeightsError,
    UnverifiedWeightsError,
    WeightsNotAvailableError,
    get_pretrained_cfg,
    list_pretrained,
    save_pretrained,
    transforms,
)

globals().update(registry.entrypoints())  # the factories of .models, as registered: the one list of them

try:
    __version__ = _metadata.version("densenet-efficient")
except _metadata.PackageNotFoundError:  # run from a source tree (torch.hub) without installing
    __version__ = "0+unknown"

__all__ = ["MEMORY_MODES", "ChecksumMismatchError", "DenseNet", "DenseNetFeatures", "IncompatibleWeightsError"]
__all__ += ["InvalidConfigError", "InvalidWeightsFileError", "ManifestError", "MemoryMode", "PretrainedCfg"]
__all__ += ["SyncBatchNorm", "UnknownWeightsError", "UnverifiedWeightsError", "WeightsNotAvailableError"]
__all__ += ["check_memory_mode", "cifar_densenet", "convert_sync_batchnorm", "create_model", "get_pretrained_cfg"]
__all__ += ["is_model", "list_models", "list_pretrained", "make_efficient", "optim_in_backward", "OptimizerInBackward"]
__all__ += ["pretrained", "register_model", "register_with_timm", "save_pretrained", "transforms"]
__all__ += [*registry.entrypoints()]
