"""The model core: the memory-efficient autograd function, the DenseNet model and the named architectures.

It imports nothing else of the project.
"""

from . import compiled_op as compiled_op  # registers the operator the efficient layers run as under torch.compile
from .adapt import make_efficient
from .functional import MEMORY_MODES, MemoryMode, bn_relu_conv, check_memory_mode
from .model import DenseNet, DenseNetFeatures
from .registry import (
    cifar_densenet,
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
    register_model,
)
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

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
    "list_models",
    "make_efficient",
    "register_model",
]
