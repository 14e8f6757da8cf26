"""The model core: the memory-efficient autograd function, the DenseNet model and the named architectures. It
imports nothing else of the project; :mod:`densenet_efficient.models` registers the factories in :mod:`.registry`.
"""

from . import registry as registry
from .adapt import make_efficient
from .efficient import bn_relu_conv
from .functional import MEMORY_MODES, MemoryMode, check_memory_mode
from .model import DenseNet, DenseNetFeatures
from .monai_layout import from_monai
from .optim import OptimizerInBackward, optim_in_backward
from .registry import is_model, list_models, register_model
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["MEMORY_MODES", "DenseNet", "DenseNetFeatures", "MemoryMode", "SyncBatchNorm", "bn_relu_conv"]
__all__ += ["check_memory_mode", "convert_sync_batchnorm", "is_model", "from_monai", "list_models", "make_efficient"]
__all__ += ["optim_in_backward", "OptimizerInBackward", "register_model"]
