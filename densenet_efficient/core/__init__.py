"""The model core: the memory-efficient autograd function, the DenseNet model and the named architectures.

It imports nothing else of the project. The model factories (``densenet121_efficient``, ...) are exported from
the registry, which is the one list of them.
"""

from . import compiled_op as compiled_op  # registers the operator the efficient layers run as under torch.compile
from . import registry
from .adapt import make_efficient
from .functional import MEMORY_MODES, MemoryMode, bn_relu_conv, check_memory_mode
from .model import DenseNet, DenseNetFeatures
from .monai_layout import from_monai
from .optim import OptimizerInBackward, optim_in_backward
from .registry import cifar_densenet, create_model, is_model, list_models, register_model
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

globals().update(registry.entrypoints())

__all__ = [
    "MEMORY_MODES",
    "DenseNet",
    "DenseNetFeatures",
    "MemoryMode",
    "SyncBatchNorm",
    "bn_relu_conv",
    "check_memory_mode",
    "cifar_densenet",
    "convert_sync_batchnorm",
    "create_model",
    "is_model",
    "from_monai",
    "list_models",
    "make_efficient",
    "optim_in_backward",
    "OptimizerInBackward",
    "register_model",
    *registry.entrypoints(),
]
