"""The DenseNet model: CIFAR-style and ImageNet-style networks, naive or memory-efficient, in 1, 2 or 3 spatial
dimensions (signals, images, volumes).

State-dict keys follow torchvision's ``DenseNet``: ``features.conv0``, ``features.norm0``,
``features.denseblockN.denselayerM.{norm1,conv1,norm2,conv2}``, ``features.transitionN.{norm,conv}``,
``features.norm5`` and ``classifier``, so torchvision and timm weights load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .functional import MemoryMode, bn_relu_conv, check_memory_mode

STEMS = ("imagenet", "cifar")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
VOLUME_SIZE = 96  # side of the volumes (e.g. CT/MRI patches) a 3D network is configured for, as in MONAI's examples


@dataclass(frozen=True)
class SpatialLayers:
    """The layer classes and pooling functions of a network with ``len(axes)`` spatial dimensions."""

    conv: Callable[..., _ConvNd]
    norm: Callable[..., _BatchNorm]
    max_pool: Callable[..., nn.Module]
    avg_pool: Callable[..., Tensor]
    adaptive_avg_pool: Callable[..., Tensor]
    axes: str  # the spatial axes, for messages: "L", "H, W" or "D, H, W"
    sides: str  # what they are called, for messages


SPATIAL_LAYERS: dict[int, SpatialLayers] = {
    1: SpatialLayers(nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, F.avg_pool1d, F.adaptive_avg_pool1d, "L", "length"),
    2: SpatialLayers(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, F.avg_pool2d, F.adaptive_avg_pool2d, "H, W",
                     "height and width"),
    3: SpatialLayers(nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, F.avg_pool3d, F.adaptive_avg_pool3d, "D, H, W",
                     "depth, height and width"),
}


def architecture_cfg(stem: str, in_chans: int, num_classes: int, spatial_dims: int = 2) -> dict[str, Any]:
    """The input configuration a network of this stem was designed for, in timm's ``pretrained_cfg`` keys.

    Pretrained weights replace it with their own (see :mod:`densenet_efficient.pretrained`). CIFAR networks take
    32x32 images normalised with CIFAR-10's statistics; ImageNet networks 224x224 crops (crop fraction 0.875,
    bicubic resize) normalised with ImageNet's. For ``in_chans`` other than 3 the mean and std are the
    channel average, repeated. 1D and 3D networks take signals of length 224 or 32 and volumes of side 96
    (``VOLUME_SIZE``) or 32, already normalised (mean 0, std 1, as MONAI's intensity transforms leave them).
    """
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size, mean, std = (32, CIFAR10_MEAN, CIFAR10_STD) if stem == "cifar" else (224, IMAGENET_MEAN, IMAGENET_STD)
    if in_chans != 3:
        mean, std = (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    if spatial_dims != 2:
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    if spatial_dims == 3 and stem == "imagenet":
        size = VOLUME_SIZE
    return {
        "input_size": (in_chans,) + (size,) * spatial_dims,
        "interpolation": {1: "linear", 2: "bicubic", 3: "trilinear"}[spatial_dims],
        "crop_pct": 1.0 if stem == "cifar" or spatial_dims != 2 else 0.875,
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": num_classes,
        "first_conv": "features.conv0",
        "classifier": "classifier",
    }


class DenseLayer(nn.Module):
    """One dense layer on the concatenation of the block's feature maps so far.

    With a bottleneck (``bn_size > 0``): BN-ReLU-Conv1x1 to ``bn_size * growth_rate`` channels, then
    BN-ReLU-Conv3x3 to ``growth_rate`` channels. Without: a single BN-ReLU-Conv3x3. Dropout follows if
    ``drop_rate > 0``.

    Input: a list of (N, C_i, H, W) tensors with sum(C_i) == ``in_channels``. Output: (N, growth_rate, H, W).
    With ``spatial_dims`` 1 or 3, (N, C, L) or (N, C, D, H, W) and 1D or 3D layers instead.
    Stored for backward: plain autograd keeps the concatenation and each BN-ReLU output; ``efficient=True`` keeps
    only the per-channel batch statistics and the bottleneck output; ``"max"`` only the statistics.
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float, efficient: MemoryMode,
                 spatial_dims: int = 2):
        super().__init__()
        layers = SPATIAL_LAYERS[spatial_dims]
        self.norm1 = layers.norm(in_channels)
        if bn_size:
            width = bn_size * growth_rate
            self.conv1 = layers.conv(in_channels, width, kernel_size=1, bias=False)
            self.norm2 = layers.norm(width)
            self.conv2 = layers.conv(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = layers.conv(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.efficient = efficient

    def stages(self) -> list[tuple[_BatchNorm, _ConvNd]]:
        stages = [(self.norm1, self.conv1)]
        if hasattr(self, "conv2"):
            stages.append((self.norm2, self.conv2))
        return stages

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        new_features = bn_relu_conv(features, self.stages(), self.efficient)
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers. Input: a list of feature maps; output: that list plus each layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float,
                 efficient: MemoryMode, spatial_dims: int = 2):
        super().__init__()
        for index in range(num_layers):
            layer = DenseLayer(in_channels + index * growth_rate, growth_rate, bn_size, drop_rate, efficient,
                               spatial_dims)
            self.add_module(f"denselayer{index + 1}", layer)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:  # type: ignore[override]
        features = list(features)
        for layer in self.values():
            features.append(layer(features))
        return features


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 then 2x2 average pooling, between two dense blocks.

    Input: the previous block's list of feature maps (N, C_i, H, W). Output: (N, out_channels, H/2, W/2).
    With ``spatial_dims`` 1 or 3, every spatial dimension is halved likewise.
    In the efficient modes the block's concatenation is not stored for backward: only its statistics are.
    """

    def __init__(self, in_channels: int, out_channels: int, efficient: MemoryMode, spatial_dims: int = 2):
        super().__init__()
        layers = SPATIAL_LAYERS[spatial_dims]
        self.norm = layers.norm(in_channels)
        self.conv = layers.conv(in_channels, out_channels, kernel_size=1, bias=False)
        self.spatial_dims = spatial_dims
        self.efficient = efficient

    def forward(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(features, Tensor):
            features = [features]
        avg_pool = SPATIAL_LAYERS[self.spatial_dims].avg_pool
        return avg_pool(bn_relu_conv(features, [(self.norm, self.conv)], self.efficient), kernel_size=2)


class DenseFeatures(nn.Sequential):
    """The stem, dense blocks, transitions and final norm; passes feature lists between blocks."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        features: Tensor | list[Tensor] = x
        for module in self:
            if isinstance(module, DenseBlock):
                features = module([features] if isinstance(features, Tensor) else features)
            elif isinstance(module, Transition) or isinstance(features, Tensor):
                features = module(features)
            else:
                features = module(torch.cat(features, 1))
        return features  # type: ignore[return-value]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_real(name: str, value: object, low: float, high: float, high_inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (low <= value <= high) or (value == high and not high_inclusive):
        interval = f"[{low}, {high}]" if high_inclusive else f"[{low}, {high})"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


class DenseNet(nn.Module):
    """DenseNet (Huang et al., arXiv 1608.06993) with a memory-efficient training mode.

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: number of layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width factor (bottleneck has ``bn_size * growth_rate`` channels); 0 for none.
        compression: fraction of channels a transition keeps (DenseNet-BC: 0.5; plain DenseNet: 1).
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs; 0 for no classifier (``forward`` then returns pooled features).
        in_chans: input channels.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"cifar"`` (3x3 conv).
        spatial_dims: 2 for images (N, C, H, W); 3 for volumes (N, C, D, H, W), 1 for signals (N, C, L), with
            the 3D or 1D convolutions, batch norms and pooling of the same sizes (MONAI's ``DenseNet`` layout).
        efficient: ``False`` (plain autograd), ``True`` (recompute concatenation, BN and ReLU in backward) or
            ``"max"`` (also recompute the bottleneck convolution). All three give the same outputs, gradients
            and batch-norm statistics; they differ in memory and time.
        arch_name: the registered name this network was built as (``create_model`` sets it); saved with the
            weights so that they can be loaded by name. Not a constructor argument of the architecture itself.

    Input (N, in_chans, H, W), or (N, in_chans, D, H, W) / (N, in_chans, L); output (N, num_classes) logits.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        efficient: MemoryMode = True,
        arch_name: str | None = None,
        spatial_dims: int = 2,
    ):
        super().__init__()
        _check_int("growth_rate", growth_rate, 1)
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
            raise TypeError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
        block_config = tuple(_check_int("block_config entries", n, 1) for n in block_config)
        _check_int("num_init_features", num_init_features, 1)
        _check_int("bn_size", bn_size, 0)
        compression = _check_real("compression", compression, 0.0, 1.0, high_inclusive=True)
        if compression == 0:
            raise ValueError("compression must be in (0, 1], got 0")
        drop_rate = _check_real("drop_rate", drop_rate, 0.0, 1.0, high_inclusive=False)
        _check_int("num_classes", num_classes, 0)
        _check_int("in_chans", in_chans, 1)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in SPATIAL_LAYERS:
            raise ValueError(f"spatial_dims must be 1, 2 or 3 (signals, images, volumes), got {spatial_dims!r}")
        efficient = check_memory_mode(efficient)
        layers = SPATIAL_LAYERS[spatial_dims]

        self.config = dict(
            growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features,
            bn_size=bn_size, compression=compression, drop_rate=drop_rate, num_classes=num_classes,
            in_chans=in_chans, stem=stem, spatial_dims=spatial_dims,
        )
        self.in_chans = in_chans
        self.spatial_dims = spatial_dims
        self.efficient = efficient
        self.arch_name = arch_name

        if stem == "imagenet":
            stem_layers = [
                ("conv0", layers.conv(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", layers.norm(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", layers.max_pool(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            stem_layers = [("conv0", layers.conv(in_chans, num_init_features, kernel_size=3, padding=1, bias=False))]
        features = DenseFeatures(OrderedDict(stem_layers))

        num_features = num_init_features
        for index, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, growth_rate, bn_size, drop_rate, efficient, spatial_dims)
            features.add_module(f"denseblock{index + 1}", block)
            num_features += num_layers * growth_rate
            if index != len(block_config) - 1:
                out_features = math.floor(num_features * compression)
                if out_features < 1:
                    raise ValueError(f"compression={compression} leaves no channels after dense block {index + 1}")
                features.add_module(f"transition{index + 1}",
                                    Transition(num_features, out_features, efficient, spatial_dims))
                num_features = out_features
        features.add_module("norm5", layers.norm(num_features))
        self.features = features
        self.num_features = num_features
        self.classifier: nn.Module = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()
        self.min_input_size = self._min_input_size(stem, len(block_config))
        # timm's name for what the weights (or, without weights, the architecture) expect as input.
        self.pretrained_cfg: dict[str, Any] = architecture_cfg(stem, in_chans, num_classes, spatial_dims)

        for module in self.modules():
            if isinstance(module, _ConvNd):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, _BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @staticmethod
    def _min_input_size(stem: str, num_blocks: int) -> int:
        """Smallest side (height, width, depth or length) that leaves at least one pixel after the stem and every
        transition."""
        def final_size(size: int) -> int:
            if stem == "imagenet":
                size = (size - 1) // 2 + 1  # 7x7 conv, stride 2, padding 3
                size = (size - 1) // 2 + 1  # 3x3 max-pool, stride 2, padding 1
            return size // 2 ** (num_blocks - 1)

        size = 1
        while final_size(size) < 1:
            size += 1
        return size

    def set_efficient(self, efficient: MemoryMode) -> DenseNet:
        """Switch every dense layer and transition to memory mode ``efficient``; returns ``self``."""
        efficient = check_memory_mode(efficient)
        self.efficient = efficient
        for module in self.modules():
            if isinstance(module, (DenseLayer, Transition)):
                module.efficient = efficient
        return self

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: none)."""
        _check_int("num_classes", num_classes, 0)
        self.config["num_classes"] = num_classes
        param = next(self.parameters())
        if num_classes:
            self.classifier = nn.Linear(self.num_features, num_classes, device=param.device, dtype=param.dtype)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        layers = SPATIAL_LAYERS[self.spatial_dims]
        shape = f"(N, {self.in_chans}, {layers.axes})"
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor of shape {shape}, got {type(x).__name__}")
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape {shape}, got {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(
                f"input of size {tuple(x.shape[2:])} is too small: this network needs {layers.sides} of at "
                f"least {self.min_input_size}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H', W'): features after the final BN and ReLU (likewise for
        (N, in_chans, D, H, W) and (N, in_chans, L))."""
        self._check_input(x)
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, H', W') -> pooled features (N, num_features) or logits (N, num_classes)."""
        x = torch.flatten(SPATIAL_LAYERS[self.spatial_dims].adaptive_avg_pool(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
