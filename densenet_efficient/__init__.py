"""Memory-efficient DenseNets for PyTorch: same outputs, gradients and BatchNorm statistics, a fraction of the memory."""

from .functional import MEMORY_MODES, check_memory_mode
from .model import DenseNet
from .registry import (
    cifar_densenet,
    create_model,
    densenet121_efficient,
    densenet161_efficient,
    densenet169_efficient,
    densenet201_efficient,
    densenet264_efficient,
    densenet_40_k12,
    densenet_bc_100_k12,
    densenet_bc_190_k40,
    densenet_bc_250_k24,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "MEMORY_MODES",
    "DenseNet",
    "check_memory_mode",
    "cifar_densenet",
    "create_model",
    "densenet121_efficient",
    "densenet161_efficient",
    "densenet169_efficient",
    "densenet201_efficient",
    "densenet264_efficient",
    "densenet_40_k12",
    "densenet_bc_100_k12",
    "densenet_bc_190_k40",
    "densenet_bc_250_k24",
    "list_models",
]
