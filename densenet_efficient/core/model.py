"""The DenseNet model: CIFAR-style and ImageNet-style networks, naive or memory-efficient.

State-dict keys follow torchvision's ``DenseNet``: ``features.conv0``, ``features.norm0``,
``features.denseblockN.denselayerM.{norm1,conv1,norm2,conv2}``, ``features.transitionN.{norm,conv}``,
``features.norm5`` and ``classifier``, so torchvision and timm weights load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import MemoryMode, bn_relu_conv, check_memory_mode

STEMS = ("imagenet", "cifar")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def architecture_cfg(stem: str, in_chans: int, num_classes: int) -> dict[str, Any]:
    """The input configuration a network of this stem was designed for, in timm's ``pretrained_cfg`` keys.

    Pretrained weights replace it with their own (see :mod:`densenet_efficient.pretrained`). CIFAR networks take
    32x32 images normalised with CIFAR-10's statistics; ImageNet networks 224x224 crops (crop fraction 0.875,
    bicubic resize) normalised with ImageNet's. For ``in_chans`` other than 3 the mean and std are the
    channel average, repeated.
    """
    size, mean, std = (32, CIFAR10_MEAN, CIFAR10_STD) if stem == "cifar" else (224, IMAGENET_MEAN, IMAGENET_STD)
    if in_chans != 3:
        mean, std = (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    return {
        "input_size": (in_chans, size, size),
        "interpolation": "bicubic",
        "crop_pct": 1.0 if stem == "cifar" else 0.875,
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
    Stored for backward: plain autograd keeps the concatenation and each BN-ReLU output; ``efficient=True`` keeps
    only the per-channel batch statistics and the bottleneck output; ``"max"`` only the statistics.
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float, efficient: MemoryMode):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        if bn_size:
            width = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.efficient = efficient

    def stages(self) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
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
                 efficient: MemoryMode):
        super().__init__()
        for index in range(num_layers):
            layer = DenseLayer(in_channels + index * growth_rate, growth_rate, bn_size, drop_rate, efficient)
            self.add_module(f"denselayer{index + 1}", layer)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:  # type: ignore[override]
        features = list(features)
        for layer in self.values():
            features.append(layer(features))
        return features


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 then 2x2 average pooling, between two dense blocks.

    Input: the previous block's list of feature maps (N, C_i, H, W). Output: (N, out_channels, H/2, W/2).
    In the efficient modes the block's concatenation is not stored for backward: only its statistics are.
    """

    def __init__(self, in_channels: int, out_channels: int, efficient: MemoryMode):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.efficient = efficient

    def forward(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(features, Tensor):
            features = [features]
        return F.avg_pool2d(bn_relu_conv(features, [(self.norm, self.conv)], self.efficient), kernel_size=2)


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
    """``value`` as an ``int`` (numpy integers accepted), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
        efficient: ``False`` (plain autograd), ``True`` (recompute concatenation, BN and ReLU in backward) or
            ``"max"`` (also recompute the bottleneck convolution). All three give the same outputs, gradients
            and batch-norm statistics; they differ in memory and time.
        arch_name: the registered name this network was built as (``create_model`` sets it); saved with the
            weights so that they can be loaded by name. Not a constructor argument of the architecture itself.

    Input (N, in_chans, H, W); output (N, num_classes) logits.
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
    ):
        super().__init__()
        growth_rate = _check_int("growth_rate", growth_rate, 1)
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
            raise TypeError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
        block_config = tuple(_check_int("block_config entries", n, 1) for n in block_config)
        num_init_features = _check_int("num_init_features", num_init_features, 1)
        bn_size = _check_int("bn_size", bn_size, 0)
        compression = _check_real("compression", compression, 0.0, 1.0, high_inclusive=True)
        if compression == 0:
            raise ValueError("compression must be in (0, 1], got 0")
        drop_rate = _check_real("drop_rate", drop_rate, 0.0, 1.0, high_inclusive=False)
        num_classes = _check_int("num_classes", num_classes, 0)
        in_chans = _check_int("in_chans", in_chans, 1)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        efficient = check_memory_mode(efficient)

        self.config = dict(
            growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features,
            bn_size=bn_size, compression=compression, drop_rate=drop_rate, num_classes=num_classes,
            in_chans=in_chans, stem=stem,
        )
        self.in_chans = in_chans
        self.efficient = efficient
        self.arch_name = arch_name

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            layers = [("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=3, padding=1, bias=False))]
        features = DenseFeatures(OrderedDict(layers))

        num_features = num_init_features
        for index, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, growth_rate, bn_size, drop_rate, efficient)
            features.add_module(f"denseblock{index + 1}", block)
            num_features += num_layers * growth_rate
            if index != len(block_config) - 1:
                out_features = math.floor(num_features * compression)
                if out_features < 1:
                    raise ValueError(f"compression={compression} leaves no channels after dense block {index + 1}")
                features.add_module(f"transition{index + 1}", Transition(num_features, out_features, efficient))
                num_features = out_features
        features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.features = features
        self.num_features = num_features
        self.classifier: nn.Module = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()
        self.min_input_size = self._min_input_size(stem, len(block_config))
        # timm's name for what the weights (or, without weights, the architecture) expect as input.
        self.pretrained_cfg: dict[str, Any] = architecture_cfg(stem, in_chans, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @staticmethod
    def _min_input_size(stem: str, num_blocks: int) -> int:
        """Smallest height/width that leaves at least one pixel after the stem and every transition."""
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
        num_classes = _check_int("num_classes", num_classes, 0)
        self.config["num_classes"] = num_classes
        param = next(self.parameters())
        if num_classes:
            self.classifier = nn.Linear(self.num_features, num_classes, device=param.device, dtype=param.dtype)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor of shape (N, {self.in_chans}, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point input (float32, float16, bfloat16 or float64), got {x.dtype}: convert "
                f"images with x.float() / 255 and normalise them (densenet_efficient.transforms does both)"
            )
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input of size {tuple(x.shape[-2:])} is too small: this network needs height and width of at "
                f"least {self.min_input_size}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H', W'): features after the final BN and ReLU."""
        self._check_input(x)
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, H', W') -> pooled features (N, num_features) or logits (N, num_classes)."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
