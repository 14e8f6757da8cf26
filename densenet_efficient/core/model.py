"""The DenseNet model: CIFAR- and ImageNet-style networks, plain or memory-efficient, in 1, 2 or 3 spatial
dimensions (signals, images, volumes).

State-dict keys are torchvision's (``features.denseblockN.denselayerM.norm1``, ``features.transitionN.conv``,
``features.norm5``, ``classifier``), so torchvision and timm weights load with ``strict=True``. The model has timm's
interface; :class:`DenseNetFeatures` is its ``features_only`` backbone. ``torch.fx`` and ``torch.jit.script`` work.
"""

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial, partialmethod
from numbers import Integral, Real
from typing import Any, List, Optional, Tuple, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .config import architecture_cfg, min_input_side
from .efficient import bn_relu, bn_relu_conv, bn_relu_conv_pool, conv_bn_relu_max_pool, dense_block
from .eligibility import activation, is_customised
from .functional import MemoryMode, check_memory_mode

STEMS = ("imagenet", "cifar")
# DenseNet.config: the constructor arguments a saved model is rebuilt from (norm and act when not the default)
_CONFIG_KEYS = "growth_rate block_config num_init_features bn_size compression drop_rate num_classes in_chans".split()
_CONFIG_KEYS += ["stem", "spatial_dims", "global_pool"]
# timm's SelectAdaptivePool2d pool types; "fast..." spellings compute the same values ("fast" alone is "avg").
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")
_relu = partial(nn.ReLU, inplace=True)
# MONAI's spellings (monai.networks.layers.factories, lower case) of the activations the function computes.
ACTS = dict(relu=_relu, leakyrelu=nn.LeakyReLU, prelu=nn.PReLU, elu=nn.ELU, swish=nn.SiLU, silu=nn.SiLU)
_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm)  # what DenseFeatures runs with its activation as one function


def _layer(kind: str, spatial_dims: int) -> Any:  # _layer("Conv", 3) is nn.Conv3d
    return getattr(nn, f"{kind}{spatial_dims}d")


def layer_factory(spec: Any, kind: str, spatial_dims: int = 2) -> Callable[..., nn.Module]:
    """A factory of the norms (``kind="norm"``, called with the channels) or activations (``"act"``) that ``spec``
    names: MONAI's ``name`` or ``(name, {arguments})`` (``"batch"``, ``("group", {"num_groups": 4})``,
    ``("leakyrelu", {"negative_slope": 0.1})``, ...), an ``nn.Module`` class, or an activation module (copied)."""
    if kind == "act" and isinstance(spec, nn.Module):
        return lambda: copy.deepcopy(spec)
    name, args = spec if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict) else (spec, {})
    names: dict[str, Any] = ACTS if kind == "act" else {}
    if kind == "norm":
        names = dict(batch=_layer("BatchNorm", spatial_dims), instance=_layer("InstanceNorm", spatial_dims))
        names["group"] = lambda channels, **args: nn.GroupNorm(num_channels=channels, **args)
    if isinstance(name, str) and name.lower() in names:
        if name.lower() == "group" and "num_groups" not in args:
            raise ValueError('norm="group" needs its number of groups: ("group", {"num_groups": 4})')
        return partial(names[name.lower()], **args)
    if isinstance(name, type) and issubclass(name, nn.Module):
        return partial(name, **args)
    raise ValueError(
        f"{kind}={spec!r} is not a {kind} this package builds: use one of {', '.join(names)} (MONAI's spellings, "
        f"optionally as (name, {{arguments}})), an nn.Module class or (for act) a module"
    )


class DenseLayer(nn.Module):
    """One dense layer: with a bottleneck (``bn_size > 0``) BN-ReLU-Conv1x1 to ``bn_size * growth_rate`` channels
    then BN-ReLU-Conv3x3 to ``growth_rate``, without one a single BN-ReLU-Conv3x3; dropout if ``drop_rate > 0``.
    Input: (N, in_channels, *spatial) or, as torchvision's ``_DenseLayer``, a list of (N, C_i, *spatial) maps with
    sum(C_i) == ``in_channels`` (concatenated, in the efficient modes only in backward). Output: (N, growth_rate,
    *spatial). Stored for backward: plain autograd keeps the concatenation and each BN-ReLU output;
    ``efficient=True`` only the batch statistics and the bottleneck output; ``"max"`` only the statistics."""

    __jit_ignored_attributes__ = ["efficient", "qualified_name"]  # the scripted path runs plain modules
    qualified_name = ""  # where the layer is in its network (see _set_memory_mode), for messages

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        efficient: MemoryMode,
        spatial_dims: int = 2,
        norm: Callable[[int], nn.Module] | None = None,
        act: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        conv, norm, act = _layer("Conv", spatial_dims), norm or _layer("BatchNorm", spatial_dims), act or _relu
        self.norm1, self.relu1 = norm(in_channels), act()
        if bn_size:
            width = bn_size * growth_rate
            self.conv1 = conv(in_channels, width, kernel_size=1, bias=False)
            self.norm2, self.relu2 = norm(width), act()
            self.conv2 = conv(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = conv(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate, self.efficient = float(drop_rate), efficient

    def forward(self, features: Union[Tensor, List[Tensor]]) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles plain modules; the autograd function stays Python
            new_features = self.conv1(self.relu1(self.norm1(_concat(_feature_list(features)))))
            if hasattr(self, "conv2"):
                new_features = self.conv2(self.relu2(self.norm2(new_features)))
        else:
            traced = _record_as_fx_leaf(self, features)
            if traced is not None:
                return traced
            new_features = bn_relu_conv(_feature_list(features), self.stages(), self.efficient, self)
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features

    @torch.jit.unused
    def stages(self) -> List[Tuple[nn.Module, nn.Module, nn.Module]]:
        """``(norm, act, conv)`` per BN-ReLU-Conv."""
        stages = [(self.norm1, self.relu1, self.conv1)]
        return stages + [(self.norm2, self.relu2, self.conv2)] if hasattr(self, "conv2") else stages


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each reading every feature map before it: (N, C, *spatial) (or a list of maps of
    C channels) -> (N, C + num_layers * growth_rate, *spatial), as torchvision's and MONAI's; :meth:`extend` returns
    the input and new features as a list (DenseFeatures passes it on: no concatenation stored for backward)."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, *args: Any):
        super().__init__()
        for index in range(num_layers):
            self.add_module(f"denselayer{index + 1}", DenseLayer(in_channels + index * growth_rate, growth_rate, *args))

    def forward(self, features: Union[Tensor, List[Tensor]]) -> Tensor:
        return _concat(self.extend(_feature_list(features)))

    def extend(self, features: List[Tensor]) -> List[Tensor]:
        """The input feature maps followed by each layer's new features (N, growth_rate, *spatial)."""
        features = list(features)
        if not torch.jit.is_scripting():
            new_features = _one_operator(self, features)
            if new_features is not None:
                return features + new_features
        for layer in self.values():
            features.append(layer(features))
        return features


def _one_operator(block: DenseBlock, features: List[Tensor]) -> Optional[List[Tensor]]:
    """Under ``torch.compile``, the new features of ``block``'s layers as one operator (:func:`.efficient.dense_block`)
    unless a layer has hooks or dropout in training (they run layer by layer)."""
    layers: list[Any] = list(block.values())
    if not torch.compiler.is_compiling() or any(
        type(m) is not DenseLayer or is_customised(m) or (m.drop_rate and m.training) for m in layers
    ):
        return None
    return dense_block(features, [(m.stages(), m.efficient, m) for m in layers])


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 then 2x average pooling between two dense blocks: the previous block's maps (N, C_i,
    *spatial) -> (N, out_channels, *spatial / 2). The efficient modes store only the norm's statistics."""

    __jit_ignored_attributes__ = ["efficient", "qualified_name"]  # the scripted path runs plain modules
    qualified_name = ""  # where the layer is in its network (see _set_memory_mode), for messages

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        efficient: MemoryMode,
        spatial_dims: int = 2,
        norm: Callable[[int], nn.Module] | None = None,
        act: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        self.norm, self.relu = (norm or _layer("BatchNorm", spatial_dims))(in_channels), (act or _relu)()
        self.conv = _layer("Conv", spatial_dims)(in_channels, out_channels, kernel_size=1, bias=False)
        self.efficient = efficient

    def forward(self, features: Union[Tensor, List[Tensor]]) -> Tensor:
        if torch.jit.is_scripting():
            x = self.conv(self.relu(self.norm(_concat(_feature_list(features)))))
            return F.avg_pool1d(x, 2) if x.dim() == 3 else F.avg_pool3d(x, 2) if x.dim() == 5 else F.avg_pool2d(x, 2)
        traced = _record_as_fx_leaf(self, features)
        if traced is not None:
            return traced
        return bn_relu_conv_pool(_feature_list(features), self.norm, self.conv, self.efficient, self, self.relu)


def _concat(features: List[Tensor]) -> Tensor:
    if not torch.jit.is_scripting():
        if isinstance(features, _TracedBlockMaps):
            return features.concatenation  # the block's output node, not a second concatenation
    return features[0] if len(features) == 1 else torch.cat(features, 1)


class _TracedBlockMaps(list):
    """Under ``torch.fx`` tracing, the feature maps of a dense block and the node of their concatenation."""

    def __init__(self, maps: List[Any], concatenation: Any):
        super().__init__(maps)
        self.concatenation = concatenation


def _feature_list(features: Union[Tensor, List[Tensor]]) -> List[Tensor]:
    """A feature map (a tensor, or a ``torch.fx`` proxy of one) as a one-map list; a list as it is."""
    if isinstance(features, Tensor):
        return [features]
    if not torch.jit.is_scripting():
        if isinstance(features, torch.fx.Proxy):
            return [features]
    return features


def _block_features(block: nn.Module, features: List[Tensor]) -> List[Tensor]:
    """``block.extend(features)``, or the block called where something observes the call: under ``torch.fx`` (its
    node is then the concatenation, and its maps go on to the transition as a list: a traced training model stores
    no concatenation either) and with hooks (they see what torchvision's block gives them)."""
    if any(isinstance(feature, torch.fx.Proxy) for feature in features):
        output: Any = block(features)
        node = output.node
        if node.op == "call_function" and node.target is torch.cat:
            return _TracedBlockMaps([torch.fx.Proxy(part, output.tracer) for part in node.args[0]], output)
        return [output]  # the tracer keeps the block as a leaf
    if is_customised(block):
        return [block(features)]
    return block.extend(features)  # type: ignore[operator]


def _record_as_fx_leaf(module: nn.Module, features: Union[Tensor, List[Tensor]]) -> Optional[Tensor]:
    """Under ``torch.fx`` tracing, record ``module(features)`` as a leaf module call and return its proxy (the graph
    then picks the efficient function or the plain modules at run time); otherwise ``None``."""
    for tensor in [features] if isinstance(features, torch.fx.Proxy) else features:
        if isinstance(tensor, torch.fx.Proxy):
            tracer: Any = tensor.tracer
            path = tracer.path_of_module(module)
            if not path:
                raise TypeError(
                    f"{type(module).__name__} is a leaf of torch.fx graphs: trace a model that contains it, "
                    "not the layer itself"
                )
            return tracer.create_proxy("call_module", path, (features,), {})
    return None


class DenseFeatures(nn.Sequential):
    """The stem, dense blocks, transitions, final norm and ReLU, passing feature lists between blocks: (N,
    in_chans, *spatial) -> the last module's output. In the efficient modes the ImageNet stem runs as one function
    storing statistics and one byte per pooled value (:func:`~.efficient.conv_bn_relu_max_pool`), the final norm
    and ReLU as one storing statistics (:func:`~.efficient.bn_relu`); under fx, TorchScript or hooks, one by one."""

    __jit_ignored_attributes__ = ["efficient", "qualified_name"]  # the scripted path runs the modules one by one
    efficient: MemoryMode = False

    @torch.jit.unused
    def __getitem__(self, idx: Union[int, slice]) -> Any:
        """A module, or (a slice) the modules as :class:`DenseFeatures` in the same memory mode."""
        item = super().__getitem__(idx)
        if isinstance(item, DenseFeatures):
            item.efficient = self.efficient
        return item

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_taps(x, [])[0]

    def forward_taps(self, x: Tensor, taps: List[int]) -> Tuple[Tensor, List[Tensor]]:
        """The last output and the outputs of the modules at positions ``taps`` (a block's: its concatenation)."""
        features = [x]
        outputs: List[Tensor] = []
        index = 0  # a counter, not enumerate(): TorchScript cannot enumerate a Sequential of modules
        fused = 0  # how many modules from this one on ran fused with an earlier one
        for module in self:
            if not torch.jit.is_scripting():
                if fused == 0:
                    features, fused = self._run_fused(index, features, taps, outputs)
            if fused > 0:  # no `continue`: TorchScript unrolls this loop
                fused -= 1
            # Dispatch on submodule names: TorchScript resolves hasattr on modules statically.
            elif hasattr(module, "denselayer1"):  # a DenseBlock: list in, list out
                if torch.jit.is_scripting():
                    features = module.extend(features)  # type: ignore[operator]
                else:
                    features = _block_features(module, features)
            elif hasattr(module, "norm") and hasattr(module, "conv"):  # a Transition: list in, tensor out
                features = [module(features)]
            else:
                features = [module(_concat(features))]
            if index in taps and fused == 0:
                outputs.append(_concat(features))
            index += 1
        return _concat(features), outputs

    def _run_fused(
        self, index: int, features: List[Tensor], taps: List[int], outputs: List[Tensor]
    ) -> Tuple[List[Tensor], int]:
        """Run the stem or a norm-activation pair from position ``index`` as one efficient function, if it applies,
        appending to ``outputs`` those of tapped positions among them but the last: the features after them and how
        many modules ran (0: none)."""
        if not self.efficient or any(isinstance(t, torch.fx.Proxy) for t in features):
            return features, 0
        modules = list(self._modules.values())[index:]
        stem = list(self._modules)[index : index + 4] == ["conv0", "norm0", "relu0", "pool0"]
        if stem and isinstance(modules[1], _BatchNorm) and type(modules[2]) is nn.ReLU:
            if not any(is_customised(m) for m in modules[:4]) and index not in taps and index + 1 not in taps:
                pooled, stem_output = conv_bn_relu_max_pool(
                    _concat(features), modules[0], modules[1], modules[3], self.efficient, index + 2 in taps, self
                )
                outputs.extend([] if stem_output is None else [stem_output])
                return [pooled], 4
        if len(modules) >= 2 and isinstance(modules[0], _NORMS) and activation(modules[1]) is not None:
            if not any(is_customised(m) for m in modules[:2]) and index not in taps:
                return [bn_relu(features, modules[0], self.efficient, self, modules[1])], 2
        return features, 0


class FeatureInfo(list):
    """timm's feature levels: dicts ``num_chs``, ``reduction``, ``module``, ``index``, with timm's accessors."""

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        rows = self.get_dicts([key], idx)
        return rows[key] if isinstance(idx, int) else [row[key] for row in rows]

    channels = partialmethod(get, "num_chs")
    reduction = partialmethod(get, "reduction")
    module_name = partialmethod(get, "module")

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        rows = self if idx is None else [self[idx]] if isinstance(idx, int) else [self[i] for i in idx]
        picked = [dict(row) if keys is None else {key: row[key] for key in keys} for row in rows]
        return picked[0] if isinstance(idx, int) else picked


def take_indices(num_levels: int, indices: Union[int, List[int], None]) -> tuple[list[int], int]:
    """timm's level selection: ``None`` all levels, an int ``n`` the last ``n``, a sequence those levels (negative
    from the end). Returns the absolute indices and the largest."""
    indices = num_levels if indices is None else indices
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)):
        raise TypeError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"indices={indices} asks for the last {indices} levels; valid: 1 to {num_levels}")
        indices = list(range(-indices, 0))
    if not indices:
        raise ValueError("indices is empty: name at least one feature level")
    for index in indices:
        if not -num_levels <= index < num_levels:
            raise ValueError(f"feature index {index} is out of range: this network has levels 0 to {num_levels - 1}")
    taken = [index % num_levels for index in indices]
    return taken, max(taken)


def _set_memory_mode(root: nn.Module, efficient: MemoryMode) -> None:
    """Set ``efficient`` in the dense layers, transitions and DenseFeatures of ``root``, and their names there
    (``features.denseblock1.denselayer1``, for messages)."""
    for name, module in root.named_modules():
        if isinstance(module, (DenseLayer, Transition, DenseFeatures)):
            module.efficient, module.qualified_name = efficient, name


def _checked_input(x: Tensor, in_chans: int, min_input_size: int, spatial_dims: int = 2) -> Tensor:
    """``x`` if it is a floating-point (N, in_chans, *spatial) tensor with ``spatial_dims`` sides of at least
    ``min_input_size``, else a ``TypeError``/``ValueError``. A ``torch.fx`` leaf function: traced graphs check too."""
    axes = "L" if spatial_dims == 1 else "D, H, W" if spatial_dims == 3 else "H, W"
    expected = "(N, " + str(in_chans) + ", " + axes + ")"
    if not torch.jit.is_scripting():
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor of shape {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point input (float32, float16, bfloat16 or float64), got {x.dtype}: convert "
            "images with x.float() / 255 and normalise them (densenet_efficient.transforms does both)"
        )
    wrong_shape = x.dim() != spatial_dims + 2 or x.shape[1] != in_chans
    if wrong_shape or min(x.shape[2:]) < min_input_size:
        shape = "(" + ", ".join([str(size) for size in x.shape]) + ")"  # only when refused: no guard on sizes
        if wrong_shape:
            raise ValueError(f"expected input of shape {expected}, got {shape}")
        raise ValueError(
            f"input of shape {shape} is too small: this network needs every side ({axes}) of at least {min_input_size}"
        )
    return x


torch.fx.wrap("_checked_input")


def _pool_kind(pool_type: str) -> str:
    """``pool_type`` without timm's ``fast`` prefix: ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""``."""
    return "avg" if pool_type == "fast" else pool_type[4:] if pool_type.startswith("fast") else pool_type


def _global_pool(x: Tensor, pool_type: str) -> Tensor:
    """(N, C, *spatial) -> (N, C): ``"avg"``, ``"max"``, ``"avgmax"`` (their mean, as timm), or (N, 2C):
    ``"catavgmax"`` (both, concatenated); ``""``: ``x``."""
    kind = _pool_kind(pool_type)
    if kind == "":
        return x
    flat = x.flatten(2)
    if kind == "avg" or kind == "max":
        return flat.mean(2) if kind == "avg" else flat.amax(2)
    pooled = [flat.mean(2), flat.amax(2)]
    return torch.cat(pooled, 1) if kind == "catavgmax" else 0.5 * (pooled[0] + pooled[1])


def _check_pool(global_pool: object, num_classes: int) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('' for no pooling), got {global_pool!r}")
    if _pool_kind(global_pool) == "" and num_classes:
        raise ValueError(
            f"global_pool='' (unpooled feature maps) needs num_classes=0, got num_classes={num_classes}: "
            "a linear classifier needs pooled features"
        )
    return global_pool


def _check_int(name: str, value: object, minimum: int) -> int:  # numpy integers accepted
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_fraction(name: str, value: object, interval: str) -> float:  # interval: "(0, 1]" or "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not (0 < number <= 1 if interval == "(0, 1]" else 0 <= number < 1):
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return number


_Network = TypeVar("_Network", bound="_Backbone")


class _Backbone(nn.Module):
    """What :class:`DenseNet` and :class:`DenseNetFeatures` share: the memory mode and timm's ``default_cfg``."""

    __jit_unused_properties__ = ["default_cfg"]
    __jit_ignored_attributes__ = ["pretrained_cfg", "config"]
    pretrained_cfg: dict[str, Any]

    def set_efficient(self: _Network, efficient: MemoryMode) -> _Network:
        """Switch every dense layer and transition to memory mode ``efficient``; returns ``self``."""
        self.efficient = check_memory_mode(efficient)
        _set_memory_mode(self, self.efficient)
        return self

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg


class DenseNet(_Backbone):
    """DenseNet (Huang et al., arXiv 1608.06993) with a memory-efficient training mode.

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: number of layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width factor (``bn_size * growth_rate`` channels); 0 for no bottleneck.
        compression: fraction of channels a transition keeps (DenseNet-BC: 0.5; plain DenseNet: 1).
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs; 0 for none (``forward`` then returns pooled features).
        in_chans: input channels.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"cifar"`` (3x3 conv).
        efficient: ``False`` (plain autograd), ``True`` (recompute concatenation, BN and ReLU in backward) or
            ``"max"`` (also the bottleneck convolution): the same outputs, gradients and BN statistics, less memory.
        arch_name: the registered name it was built as (``create_model`` sets it; saved with the weights).
        global_pool: timm's pooling before the classifier: ``"avg"`` (default), ``"max"``, ``"avgmax"`` (their
            mean), ``"catavgmax"`` (both, concatenated: ``2 * num_features`` wide), their ``"fast..."`` spellings,
            or ``""`` (none: ``forward`` returns feature maps; needs ``num_classes=0``).
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W), 1 for signals (N, C, L), as MONAI.
        norm: MONAI's (:func:`layer_factory`): ``"batch"`` (default), ``"instance"``, ``("group", {"num_groups": G})``.
        act: MONAI's: ``"relu"`` (default), ``"leakyrelu"``, ``"prelu"``, ``"elu"``, ``"swish"``, a class or module.
            The memory-efficient function computes all of these norms and activations (docs/efficient-path.md).

    Input (N, in_chans, *spatial); output (N, num_classes) logits. timm's interface (``head_hidden_size``: the
    width the classifier reads; ``feature_info``: the stem, each dense block but the last, the final features).
    """

    global_pool: str

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
        global_pool: str = "avg",
        spatial_dims: int = 2,
        norm: Any = "batch",
        act: Any = "relu",
    ):
        super().__init__()
        growth_rate = _check_int("growth_rate", growth_rate, 1)
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
            raise TypeError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
        block_config = tuple(_check_int("block_config entries", n, 1) for n in block_config)
        num_init_features = _check_int("num_init_features", num_init_features, 1)
        bn_size = _check_int("bn_size", bn_size, 0)
        compression = _check_fraction("compression", compression, "(0, 1]")
        drop_rate = _check_fraction("drop_rate", drop_rate, "[0, 1)")
        num_classes = _check_int("num_classes", num_classes, 0)
        in_chans = _check_int("in_chans", in_chans, 1)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if spatial_dims not in (1, 2, 3) or type(spatial_dims) is not int:
            raise ValueError(f"spatial_dims must be 1, 2 or 3 (signals, images, volumes), got {spatial_dims!r}")
        self.efficient = efficient = check_memory_mode(efficient)
        global_pool = _check_pool(global_pool, num_classes)
        make_norm, make_act = layer_factory(norm, "norm", spatial_dims), layer_factory(act, "act")
        checked = locals()  # the arguments as checked above
        self.config = {key: checked[key] for key in _CONFIG_KEYS}
        # recorded only when not the default, so the configs of batch norm + ReLU models stay timm's
        self.config.update({k: v for k, v, default in (("norm", norm, "batch"), ("act", act, "relu")) if v != default})
        self.in_chans, self.spatial_dims, self.arch_name = in_chans, spatial_dims, arch_name

        geometry = dict(kernel_size=7, stride=2, padding=3) if stem == "imagenet" else dict(kernel_size=3, padding=1)
        stem_layers = [("conv0", _layer("Conv", spatial_dims)(in_chans, num_init_features, **geometry, bias=False))]
        if stem == "imagenet":
            stem_layers += [("norm0", make_norm(num_init_features)), ("relu0", make_act())]
            stem_layers.append(("pool0", _layer("MaxPool", spatial_dims)(kernel_size=3, stride=2, padding=1)))
        features = DenseFeatures(OrderedDict(stem_layers))
        # timm's feature levels (channels, reduction, module): the stem, each dense block but the last, the final ReLU
        levels = [(num_init_features, 2, "relu0") if stem == "imagenet" else (num_init_features, 1, "conv0")]
        num_features, reduction = num_init_features, 4 if stem == "imagenet" else 1
        stage_args = (efficient, spatial_dims, make_norm, make_act)
        for index, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, growth_rate, bn_size, drop_rate, *stage_args)
            features.add_module(f"denseblock{index + 1}", block)
            num_features += num_layers * growth_rate
            if index != len(block_config) - 1:
                levels.append((num_features, reduction * 2**index, f"denseblock{index + 1}"))
                out_features = math.floor(num_features * compression)
                if out_features < 1:
                    raise ValueError(f"compression={compression} leaves no channels after dense block {index + 1}")
                features.add_module(f"transition{index + 1}", Transition(num_features, out_features, *stage_args))
                num_features = out_features
        features.add_module("norm5", make_norm(num_features))
        features.add_module("relu5", make_act())
        levels.append((num_features, reduction * 2 ** (len(block_config) - 1), "relu5"))
        self.features, self.num_features = features, num_features
        self.reset_classifier(num_classes, global_pool)
        _set_memory_mode(self, efficient)
        self.feature_info = FeatureInfo(
            dict(num_chs=chs, reduction=r, module=f"features.{name}", index=index)
            for index, (chs, r, name) in enumerate(levels)
        )
        self.feature_ends = [list(features._modules).index(name) for _, _, name in levels]  # their positions
        self.min_input_size = min_input_side(stem, len(block_config))
        # timm's name for what the weights (or, without weights, the architecture) expect as input.
        self.pretrained_cfg = architecture_cfg(
            stem, in_chans, num_classes, spatial_dims, len(block_config), architecture=arch_name
        )
        for module in self.modules():  # norms start at weight 1, bias 0 already; the classifier's bias at 0
            if isinstance(module, _ConvNd):
                nn.init.kaiming_normal_(module.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch, as memory modes that never raise memory: ``True`` keeps ``True`` or ``"max"`` (the lowest
        memory) and turns ``False`` into ``True``; ``False`` is ``efficient=False``."""
        self.set_efficient((self.efficient or True) if enable else False)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise learning rates): the stem, then each dense block with its transition
        (``coarse``) or each dense layer, a transition joining the layer before it (timm's MATCH_PREV_GROUP). The
        final norm and the classifier fall in timm's last group, as in timm's DenseNet."""
        return dict(
            stem=r"^features\.conv[012]|features\.norm[012]|features\.pool[012]",
            blocks=r"^features\.(?:denseblock|transition)(\d+)"
            if coarse
            else [(r"^features\.denseblock(\d+)\.denselayer(\d+)", None), (r"^features\.transition(\d+)", (99999,))],
        )

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier with ``num_classes`` outputs (0: none) after ``global_pool`` (``None`` keeps it, or
        restores ``"avg"`` when a classifier returns to an unpooled model, as timm's tests expect)."""
        num_classes = _check_int("num_classes", num_classes, 0)
        if global_pool is None:
            global_pool = self.global_pool or ("avg" if num_classes else "")
        global_pool = _check_pool(global_pool, num_classes)
        self.config["num_classes"] = self.num_classes = num_classes
        self.config["global_pool"] = self.global_pool = global_pool
        self.head_hidden_size = self.num_features * (2 if _pool_kind(global_pool) == "catavgmax" else 1)
        param = next(self.parameters())
        self.classifier: nn.Module = nn.Identity()
        if num_classes:
            self.classifier = nn.Linear(self.head_hidden_size, num_classes, device=param.device, dtype=param.dtype)
            nn.init.zeros_(self.classifier.bias)
        self.classifier.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, *spatial) -> (N, num_features, *spatial'): the features after the final norm and ReLU."""
        return self.features(_checked_input(x, self.in_chans, self.min_input_size, self.spatial_dims))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, *spatial') -> pooled features (N, head_hidden_size) or logits (N, num_classes);
        with ``global_pool=""`` the feature maps themselves."""
        x = _global_pool(x, self.global_pool)
        return x if pre_logits else self.classifier(x)

    @torch.jit.unused
    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's multi-scale features: the levels of ``feature_info``, each (N, num_chs, *spatial / reduction),
        or ``(final, levels)``, ``final`` as ``forward_features``. ``indices`` as :func:`take_indices`. ``stop_early``
        and ``intermediates_only`` stop after the last level asked for; ``norm`` (the last level is normalised
        already) and ``output_fmt`` (``"NCHW"`` only) are timm's. Training keeps the memory mode's savings: the
        concatenations returned are outputs, not stored for backward."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        taken, last = take_indices(len(self.feature_info), indices)
        if self.feature_ends[last] >= len(self.features):
            raise ValueError(
                f"feature level {last} was pruned (prune_intermediate_layers); levels 0 to "
                f"{self.feature_ends.index(len(self.features) - 1)} remain"
            )
        features: DenseFeatures = self.features
        if stop_early or intermediates_only:
            features = features[: self.feature_ends[last] + 1]
        x = _checked_input(x, self.in_chans, self.min_input_size, self.spatial_dims)
        final, levels = features.forward_taps(x, [self.feature_ends[i] for i in taken])
        return levels if intermediates_only else (final, levels)

    @torch.jit.unused
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the modules after the last level of ``indices`` (timm's semantics); returns the absolute indices.
        The classifier goes with ``prune_head``, and always when the final features go (``num_features`` and
        ``head_hidden_size`` are then the last kept level's). ``prune_norm`` is accepted for timm's signature."""
        taken, last = take_indices(len(self.feature_info), indices)
        end = self.feature_ends[last]
        pruned_end = end < len(self.features) - 1
        self.features = self.features[: end + 1]
        if pruned_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return taken

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class DenseNetFeatures(_Backbone):
    """A DenseNet as timm's ``features_only`` backbone: (N, in_chans, *spatial) -> one (N, num_chs, *spatial /
    reduction) map per level of ``out_indices`` (default all), listed in ``feature_info``. The modules after the last
    level are dropped; the rest are the model's own (same state-dict keys, weights shared)."""

    def __init__(self, model: DenseNet, out_indices: int | Sequence[int] | None = None):
        super().__init__()
        indices = len(model.feature_info) if out_indices is None else out_indices
        taken = model.prune_intermediate_layers(indices if isinstance(indices, int) else list(indices))
        self.out_indices = tuple(taken)
        self.features = model.features
        self.feature_info = FeatureInfo(dict(model.feature_info[index]) for index in taken)
        self.taps = [model.feature_ends[index] for index in taken]
        self.in_chans, self.min_input_size, self.spatial_dims = model.in_chans, model.min_input_size, model.spatial_dims
        self.efficient, self.arch_name = model.efficient, model.arch_name
        self.config = dict(model.config, num_classes=0)
        self.pretrained_cfg = dict(model.pretrained_cfg)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = _checked_input(x, self.in_chans, self.min_input_size, self.spatial_dims)
        return self.features.forward_taps(x, self.taps)[1]
