"""The DenseNet model: CIFAR-style and ImageNet-style networks, naive or memory-efficient, in 1, 2 or 3 spatial
dimensions (signals, images, volumes).

State-dict keys follow torchvision's ``DenseNet``: ``features.conv0``, ``features.norm0``,
``features.denseblockN.denselayerM.{norm1,conv1,norm2,conv2}``, ``features.transitionN.{norm,conv}``,
``features.norm5`` and ``classifier``, so torchvision and timm weights load with ``strict=True``.

The model has timm's interface (``num_classes``, ``num_features``, ``global_pool``, ``reset_classifier``,
``group_matcher``, ``feature_info``, ``forward_intermediates``, ...) and :class:`DenseNetFeatures` is its
``features_only`` backbone. Tracing: dense layers and transitions record themselves in ``torch.fx`` graphs as leaf
modules (``call_module``), so a traced model still runs the memory-efficient function when it trains, and a dense
block's output node is its concatenation (what ``features.denseblockN`` means in torchvision);
``torch.jit.script`` compiles their plain-module path. Blocks, layers and transitions take and return what
torchvision's do (see :class:`DenseBlock`), so torchvision's and MONAI's code can drive them.
"""

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .config import architecture_cfg, min_input_side
from .efficient import bn_relu, bn_relu_conv, bn_relu_conv_pool, conv_bn_relu_max_pool
from .eligibility import activation, is_customised
from .functional import MemoryMode, check_memory_mode

STEMS = ("imagenet", "cifar")
# timm's SelectAdaptivePool2d pool types; "fast..." spellings compute the same values ("fast" alone is "avg").
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")
# timm's MATCH_PREV_GROUP: a group_matcher ordinal that puts a parameter in the previous group.
_MATCH_PREV_GROUP = (99999,)


@dataclass(frozen=True)
class SpatialLayers:
    """The layer classes of a network with 1, 2 or 3 spatial dimensions."""

    conv: Callable[..., _ConvNd]
    norm: Callable[..., _BatchNorm]
    max_pool: Callable[..., nn.Module]


SPATIAL_LAYERS: dict[int, SpatialLayers] = {
    1: SpatialLayers(nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
    2: SpatialLayers(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
    3: SpatialLayers(nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d),
}
# MONAI's spellings (monai.networks.layers.factories' Norm and Act, lower case) of the norms and activations the
# memory-efficient function computes; "swish"/"silu" are torch's SiLU.
_INSTANCE_NORMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
NORMS = ("batch", "instance", "group")
ACTS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
}


def _split(spec: Any, kind: str, valid: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """MONAI's ``name`` or ``(name, {arguments})``: the lower-case name (or class) and the arguments."""
    name, args = spec if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict) else (spec, {})
    if isinstance(name, str) and name.lower() in valid:
        return name.lower(), args
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name, args
    raise ValueError(
        f"{kind}={spec!r} is not a {kind} this package builds: use one of {', '.join(valid)} (MONAI's spellings, "
        f"optionally as (name, {{arguments}})), an nn.Module class or (for act) a module"
    )


def norm_layer(norm: Any, spatial_dims: int) -> Callable[[int], nn.Module]:
    """``channels -> norm module`` for MONAI's ``norm`` argument (``"batch"``, ``"instance"``,
    ``("group", {"num_groups": 4})``, ...) or an ``nn.Module`` class taking the channels first."""
    name, args = _split(norm, "norm", NORMS)
    if name == "group":
        if "num_groups" not in args:
            raise ValueError('norm="group" needs its number of groups: ("group", {"num_groups": 4})')
        return lambda channels: nn.GroupNorm(num_channels=channels, **args)
    cls: Any = {"batch": SPATIAL_LAYERS[spatial_dims].norm, "instance": _INSTANCE_NORMS[spatial_dims]}.get(name, name)
    return lambda channels: cls(channels, **args)


def act_layer(act: Any) -> Callable[[], nn.Module]:
    """``() -> activation module`` for MONAI's ``act`` argument (``"prelu"``, ``("leakyrelu", {"negative_slope":
    0.1})``, ...), an ``nn.Module`` class, or a module (copied for each use)."""
    if isinstance(act, nn.Module):
        return lambda: copy.deepcopy(act)
    name, args = _split(act, "act", tuple(ACTS))
    if name == "relu" and not args:
        args = {"inplace": True}
    cls = ACTS.get(name, name)
    return lambda: cls(**args)


_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm)  # what DenseFeatures runs with its activation as one function


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class DenseLayer(nn.Module):
    """One dense layer on the concatenation of the block's feature maps so far.

    With a bottleneck (``bn_size > 0``): BN-ReLU-Conv1x1 to ``bn_size * growth_rate`` channels, then
    BN-ReLU-Conv3x3 to ``growth_rate`` channels. Without: a single BN-ReLU-Conv3x3. Dropout follows if
    ``drop_rate > 0``.

    Input: a (N, in_channels, H, W) tensor or, as torchvision's ``_DenseLayer``, a list of (N, C_i, H, W) tensors
    with sum(C_i) == ``in_channels`` (the list is concatenated, in the efficient modes only in backward). Output:
    the new features (N, growth_rate, H, W). With ``spatial_dims`` 1 or 3, (N, C, L) or (N, C, D, H, W) and 1D or
    3D layers instead.
    Stored for backward: plain autograd keeps the concatenation and each BN-ReLU output; ``efficient=True`` keeps
    only the per-channel batch statistics and the bottleneck output; ``"max"`` only the statistics.
    """

    __jit_ignored_attributes__ = ["efficient", "qualified_name"]  # the scripted path runs plain modules
    qualified_name = ""  # where the layer is in its network (see name_layers), for messages

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
        layers = SPATIAL_LAYERS[spatial_dims]
        norm, act = norm or layers.norm, act or _relu
        self.norm1, self.relu1 = norm(in_channels), act()
        if bn_size:
            width = bn_size * growth_rate
            self.conv1 = layers.conv(in_channels, width, kernel_size=1, bias=False)
            self.norm2, self.relu2 = norm(width), act()
            self.conv2 = layers.conv(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = layers.conv(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.efficient = efficient

    def stages(self) -> list[tuple[nn.Module, nn.Module, _ConvNd]]:
        stages = [(self.norm1, self.relu1, self.conv1)]
        if hasattr(self, "conv2"):
            stages.append((self.norm2, self.relu2, self.conv2))
        return stages

    @classmethod
    def from_modules(
        cls,
        norm1: nn.Module,
        conv1: _ConvNd,
        norm2: nn.Module | None,
        conv2: _ConvNd | None,
        drop_rate: float,
        efficient: MemoryMode,
        acts: Sequence[nn.Module | None] = (None, None),
    ) -> "DenseLayer":
        """A dense layer around existing modules (the same objects: weights and buffers are shared); ``acts``: the
        activations after ``norm1`` and ``norm2`` (``None``: a ReLU)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.norm1, layer.relu1, layer.conv1 = norm1, acts[0] or _relu(), conv1
        if norm2 is not None and conv2 is not None:
            layer.norm2, layer.relu2, layer.conv2 = norm2, acts[1] or _relu(), conv2
        layer.drop_rate = float(drop_rate)
        layer.efficient = check_memory_mode(efficient)
        return layer

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


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each reading every feature map before it.

    ``forward``, as torchvision's ``_DenseBlock`` and MONAI's: a (N, C, H, W) tensor (or a list of maps whose
    channels add up to C) -> the concatenation of the input and every layer's new features (N, C + num_layers *
    growth_rate, H, W). Under ``torch.fx`` that concatenation is the block's output node, so
    ``create_feature_extractor(model, ["features.denseblock1"])`` returns what torchvision's DenseNet returns.
    :meth:`extend` returns the maps as a list instead: :class:`DenseFeatures` hands that list to the transition,
    so that no concatenation of the block is stored for backward.
    """

    def __init__(
        self,
        num_layers: int,
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
        for index in range(num_layers):
            layer = DenseLayer(
                in_channels + index * growth_rate, growth_rate, bn_size, drop_rate, efficient, spatial_dims, norm, act
            )
            self.add_module(f"denselayer{index + 1}", layer)

    def forward(self, features: Union[Tensor, List[Tensor]]) -> Tensor:
        return _concat(self.extend(_feature_list(features)))

    def extend(self, features: List[Tensor]) -> List[Tensor]:
        """The input feature maps followed by each layer's new features (N, growth_rate, H, W)."""
        features = list(features)
        for layer in self.values():
            features.append(layer(features))
        return features


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 then 2x2 average pooling, between two dense blocks.

    Input: the previous block's list of feature maps (N, C_i, H, W). Output: (N, out_channels, H/2, W/2).
    With ``spatial_dims`` 1 or 3, every spatial dimension is halved likewise.
    In the efficient modes nothing full-size is stored for backward, only the norm's statistics: backward
    recomputes the BN-ReLU output from the feature maps.
    """

    __jit_ignored_attributes__ = ["efficient", "qualified_name"]  # the scripted path runs plain modules
    qualified_name = ""  # where the layer is in its network (see name_layers), for messages

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
        layers = SPATIAL_LAYERS[spatial_dims]
        self.norm, self.relu = (norm or layers.norm)(in_channels), (act or _relu)()
        self.conv = layers.conv(in_channels, out_channels, kernel_size=1, bias=False)
        self.spatial_dims = spatial_dims
        self.efficient = efficient

    @classmethod
    def from_modules(
        cls, norm: nn.Module, conv: _ConvNd, efficient: MemoryMode, act: nn.Module | None = None
    ) -> "Transition":
        """A transition around existing modules (the same objects: weights and buffers are shared)."""
        transition = cls.__new__(cls)
        nn.Module.__init__(transition)
        transition.norm, transition.relu, transition.conv = norm, act or _relu(), conv
        transition.efficient = check_memory_mode(efficient)
        transition.spatial_dims = conv.weight.dim() - 2
        return transition

    def forward(self, features: Union[Tensor, List[Tensor]]) -> Tensor:
        if torch.jit.is_scripting():
            x = _avg_pool(self.conv(self.relu(self.norm(_concat(_feature_list(features))))), self.spatial_dims)
        else:
            traced = _record_as_fx_leaf(self, features)
            if traced is not None:
                return traced
            x = bn_relu_conv_pool(_feature_list(features), self.norm, self.conv, self.efficient, self, self.relu)
        return x


def _avg_pool(x: Tensor, spatial_dims: int) -> Tensor:
    """2x average pooling over every spatial dimension of ``x`` (written out for TorchScript)."""
    if spatial_dims == 1:
        return F.avg_pool1d(x, kernel_size=2)
    if spatial_dims == 3:
        return F.avg_pool3d(x, kernel_size=2)
    return F.avg_pool2d(x, kernel_size=2)


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
    """``block.extend(features)``, calling the block as a module where something observes the call.

    Under ``torch.fx`` tracing the block is called, so that its concatenation is recorded under its name, and the
    maps it concatenated are taken back from that node: the graph passes them to the transition as a list, so
    that the concatenation, unused there, costs one copy per block in a traced model but no memory stored for
    backward (feature extractors drop it unless it is asked for). A block with hooks is called
    too, so that they fire with what torchvision's block would give them; the transition then reads (and stores
    for backward) that concatenation.
    """
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
    """Under ``torch.fx`` symbolic tracing, record ``module(features)`` as FX records a leaf module and return
    the proxy; otherwise ``None``.

    The graph then calls the module at run time, which picks the memory-efficient function or plain modules
    from the training mode and grad mode of that moment, exactly as the untraced model does.
    """
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
    """The stem, dense blocks, transitions, final norm and ReLU; passes feature lists between blocks.

    Input (N, in_chans, H, W); output the last module's output, the concatenation if that is a dense block.
    In the memory-efficient modes (``efficient``, set by the network) the ImageNet stem (conv0, norm0, relu0,
    pool0) runs as one function that stores only statistics and one byte per pooled value (see
    :func:`~densenet_efficient.core.efficient.conv_bn_relu_max_pool`), and the final norm and ReLU as one that
    stores only statistics (:func:`~densenet_efficient.core.efficient.bn_relu`); under ``torch.fx`` tracing,
    TorchScript, or with hooks on those modules, the modules run one by one.
    """

    __jit_ignored_attributes__ = ["efficient"]  # the scripted path runs the modules one by one
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
        """Run the modules; return the last output and the outputs of the modules at positions ``taps`` (a
        dense block's as the concatenation of its feature maps)."""
        features = [x]
        outputs: List[Tensor] = []
        index = 0  # a counter, not enumerate(): TorchScript cannot enumerate a Sequential of modules
        fused_until = 0  # the modules before this position ran fused with an earlier one
        fused_taps: Dict[int, Tensor] = {}
        for module in self:
            if not torch.jit.is_scripting():
                if index >= fused_until:
                    fused = self._run_fused(index, features, taps)
                    if fused is not None:
                        features, fused_until, fused_taps = fused
            if index < fused_until:  # no `continue`: TorchScript unrolls this loop
                if index + 1 < fused_until and index in taps:
                    outputs.append(fused_taps[index])
            # Dispatch on submodule names: TorchScript resolves hasattr on modules statically (isinstance on a
            # ModuleDict subclass it does not always).
            elif hasattr(module, "denselayer1"):  # a DenseBlock: list in, list out
                if torch.jit.is_scripting():
                    features = module.extend(features)  # type: ignore[operator]
                else:
                    features = _block_features(module, features)
            elif hasattr(module, "norm") and hasattr(module, "conv"):  # a Transition: list in, tensor out
                features = [module(features)]
            else:
                features = [module(_concat(features))]
            if index in taps and (index >= fused_until or index + 1 == fused_until):
                outputs.append(_concat(features))
            index += 1
        return _concat(features), outputs

    def _run_fused(
        self, index: int, features: List[Tensor], taps: List[int]
    ) -> Optional[Tuple[List[Tensor], int, Dict[int, Tensor]]]:
        """Run the modules from position ``index`` on as one memory-efficient function, if they are the stem or a
        BN-ReLU pair and the efficient modes apply: returns the features after them, the position after them and
        the outputs of tapped positions among them but the last. ``None``: run the module at ``index`` by itself."""
        if not self.efficient or any(isinstance(t, torch.fx.Proxy) for t in features):
            return None
        modules = list(self._modules.values())[index:]
        names = list(self._modules)[index:]
        stem = names[:4] == ["conv0", "norm0", "relu0", "pool0"] and isinstance(modules[1], _BatchNorm)
        if stem and type(modules[2]) is nn.ReLU:
            if not any(is_customised(m) for m in modules[:4]) and index not in taps and index + 1 not in taps:
                pooled, stem_output = conv_bn_relu_max_pool(
                    _concat(features), modules[0], modules[1], modules[3], self.efficient, index + 2 in taps, self
                )
                return [pooled], index + 4, {} if stem_output is None else {index + 2: stem_output}
        if len(modules) >= 2 and isinstance(modules[0], _NORMS) and activation(modules[1]) is not None:
            if not any(is_customised(m) for m in modules[:2]) and index not in taps:
                return [bn_relu(features, modules[0], self.efficient, self, modules[1])], index + 2, {}
        return None


class FeatureInfo(list):
    """Feature levels as timm describes them: a list of dicts ``num_chs``, ``reduction``, ``module``, ``index``,
    with timm's ``FeatureInfo`` accessors ``channels()``, ``reduction()`` and ``module_name()``."""

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [info[key] for info in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        rows = self if idx is None else [self[idx]] if isinstance(idx, int) else [self[i] for i in idx]
        picked = [dict(row) if keys is None else {key: row[key] for key in keys} for row in rows]
        return picked[0] if isinstance(idx, int) else picked


def take_indices(num_levels: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's feature index selection: ``None`` all levels, an int ``n`` the last ``n``, a sequence those levels
    (negative from the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = num_levels
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)):
        raise TypeError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"indices={indices} asks for the last {indices} levels; valid: 1 to {num_levels}")
        taken = list(range(num_levels - indices, num_levels))
    else:
        taken = []
        for index in indices:
            absolute = num_levels + index if index < 0 else index
            if not 0 <= absolute < num_levels:
                raise ValueError(
                    f"feature index {index} is out of range: this network has levels 0 to {num_levels - 1}"
                )
            taken.append(absolute)
        if not taken:
            raise ValueError("indices is empty: name at least one feature level")
    return taken, max(taken)


def _set_memory_mode(root: nn.Module, efficient: MemoryMode) -> None:
    for module in root.modules():
        if isinstance(module, (DenseLayer, Transition, DenseFeatures)):
            module.efficient = efficient
    name_layers(root)


def name_layers(root: nn.Module) -> None:
    """Record in each dense layer and transition of ``root`` its name there (``features.denseblock1.denselayer1``),
    for messages."""
    for name, module in root.named_modules():
        if isinstance(module, (DenseLayer, Transition)):
            module.qualified_name = name


def _shape(x: Tensor) -> str:
    sizes = [str(size) for size in x.shape]
    return "(" + ", ".join(sizes) + (",)" if len(sizes) == 1 else ")")


def _axes(spatial_dims: int) -> str:
    """The spatial axes of an input, for messages (a function, not a table: TorchScript compiles it)."""
    if spatial_dims == 1:
        return "L"
    if spatial_dims == 3:
        return "D, H, W"
    return "H, W"


def _sides(spatial_dims: int) -> str:
    if spatial_dims == 1:
        return "length"
    if spatial_dims == 3:
        return "depth, height and width"
    return "height and width"


def _checked_input(x: Tensor, in_chans: int, min_input_size: int, spatial_dims: int = 2) -> Tensor:
    """``x`` if it is (N, in_chans, *spatial) with ``spatial_dims`` sides >= min_input_size, else a
    ``TypeError``/``ValueError``.

    A ``torch.fx`` leaf function (see ``torch.fx.wrap`` below): traced graphs call it, with the same errors.
    """
    shape = "(N, " + str(in_chans) + ", " + _axes(spatial_dims) + ")"
    if not torch.jit.is_scripting():
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor of shape {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point input (float32, float16, bfloat16 or float64), got {x.dtype}: convert "
            "images with x.float() / 255 and normalise them (densenet_efficient.transforms does both)"
        )
    if x.dim() != spatial_dims + 2 or x.shape[1] != in_chans:
        raise ValueError(f"expected input of shape {shape}, got {_shape(x)}")
    if min(x.shape[2:]) < min_input_size:
        sizes = [str(size) for size in x.shape[2:]]
        raise ValueError(
            f"input of size ({', '.join(sizes)}) is too small: this network needs {_sides(spatial_dims)} of at "
            f"least {min_input_size}"
        )
    return x


torch.fx.wrap("_checked_input")


def _pool_kind(pool_type: str) -> str:
    """``pool_type`` without timm's ``fast`` prefix: ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""``."""
    return "avg" if pool_type == "fast" else pool_type[4:] if pool_type.startswith("fast") else pool_type


def _pooled_width(num_features: int, pool_type: str) -> int:
    """Width of the pooled features: twice ``num_features`` for ``catavgmax``."""
    return 2 * num_features if _pool_kind(pool_type) == "catavgmax" else num_features


def _global_pool(x: Tensor, pool_type: str) -> Tensor:
    """(N, C, *spatial) -> (N, C): ``"avg"``, ``"max"``, ``"avgmax"`` (their mean, as timm), or (N, 2C):
    ``"catavgmax"`` (both, concatenated); ``""``: ``x``. timm's ``fast`` spellings are the same."""
    kind = _pool_kind(pool_type)
    if kind == "":
        return x
    flat = x.flatten(2)
    if kind == "avg":
        return flat.mean(2)
    if kind == "max":
        return flat.amax(2)
    if kind == "catavgmax":
        return torch.cat([flat.mean(2), flat.amax(2)], 1)
    return 0.5 * (flat.mean(2) + flat.amax(2))


def _check_pool(global_pool: object, num_classes: int) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('' for no pooling), got {global_pool!r}")
    if _pool_kind(global_pool) == "" and num_classes:
        raise ValueError(
            f"global_pool='' (unpooled feature maps) needs num_classes=0, got num_classes={num_classes}: "
            "a linear classifier needs pooled features"
        )
    return global_pool


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
    value = float(value)
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
        norm: the norms, MONAI's argument: ``"batch"`` (default), ``"instance"``, ``("group", {"num_groups": G})``
            (optionally ``(name, {arguments})``) or a norm class taking the channels.
        act: the activations, MONAI's argument: ``"relu"`` (default), ``"leakyrelu"``, ``"prelu"``, ``"elu"``,
            ``"swish"``/``"silu"`` (optionally ``(name, {arguments})``), an activation class or module. The
            memory-efficient function computes all of these (see docs/efficient-path.md).
        global_pool: pooling before the classifier, timm's values: ``"avg"`` (default), ``"max"``, ``"avgmax"``
            (their mean), ``"catavgmax"`` (both, concatenated: the classifier reads ``2 * num_features``), their
            ``"fast..."`` spellings, or ``""`` (none: ``forward`` returns feature maps; needs ``num_classes=0``).

    Input (N, in_chans, H, W), or (N, in_chans, D, H, W) / (N, in_chans, L); output (N, num_classes) logits.

    timm's model interface: ``num_classes``, ``num_features`` (channels of the final features),
    ``head_hidden_size`` (width of the pooled features the classifier reads), ``global_pool``, ``pretrained_cfg``
    (alias ``default_cfg``), ``feature_info`` (one entry per feature level: the stem, each dense block but the
    last, the final features; ImageNet stem reductions 2, 4, 8, ..., CIFAR stem 1, 1, 2, ...),
    ``forward_features``, ``forward_head``, ``forward_intermediates``, ``prune_intermediate_layers``,
    ``reset_classifier``, ``set_grad_checkpointing`` and ``group_matcher``.
    """

    __jit_unused_properties__ = ["default_cfg"]

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
        compression = _check_real("compression", compression, 0.0, 1.0, high_inclusive=True)
        if compression == 0:
            raise ValueError("compression must be in (0, 1], got 0")
        drop_rate = _check_real("drop_rate", drop_rate, 0.0, 1.0, high_inclusive=False)
        num_classes = _check_int("num_classes", num_classes, 0)
        in_chans = _check_int("in_chans", in_chans, 1)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in SPATIAL_LAYERS:
            raise ValueError(f"spatial_dims must be 1, 2 or 3 (signals, images, volumes), got {spatial_dims!r}")
        efficient = check_memory_mode(efficient)
        global_pool = _check_pool(global_pool, num_classes)
        layers = SPATIAL_LAYERS[spatial_dims]
        make_norm, make_act = norm_layer(norm, spatial_dims), act_layer(act)

        self.config = dict(
            growth_rate=growth_rate,
            block_config=block_config,
            num_init_features=num_init_features,
            bn_size=bn_size,
            compression=compression,
            drop_rate=drop_rate,
            num_classes=num_classes,
            in_chans=in_chans,
            stem=stem,
            spatial_dims=spatial_dims,
            global_pool=global_pool,
        )
        # recorded only when not the default, so the configs of batch norm + ReLU models stay timm's
        self.config.update({k: v for k, v, default in (("norm", norm, "batch"), ("act", act, "relu")) if v != default})
        self.in_chans = in_chans
        self.spatial_dims = spatial_dims
        self.efficient = efficient
        self.arch_name = arch_name

        if stem == "imagenet":
            stem_layers = [
                ("conv0", layers.conv(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", make_norm(num_init_features)),
                ("relu0", make_act()),
                ("pool0", layers.max_pool(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            stem_layers = [("conv0", layers.conv(in_chans, num_init_features, kernel_size=3, padding=1, bias=False))]
        features = DenseFeatures(OrderedDict(stem_layers))

        num_features = num_init_features
        for index, num_layers in enumerate(block_config):
            block = DenseBlock(
                num_layers, num_features, growth_rate, bn_size, drop_rate, efficient, spatial_dims, make_norm, make_act
            )
            features.add_module(f"denseblock{index + 1}", block)
            num_features += num_layers * growth_rate
            if index != len(block_config) - 1:
                out_features = math.floor(num_features * compression)
                if out_features < 1:
                    raise ValueError(f"compression={compression} leaves no channels after dense block {index + 1}")
                features.add_module(
                    f"transition{index + 1}",
                    Transition(num_features, out_features, efficient, spatial_dims, make_norm, make_act),
                )
                num_features = out_features
        features.add_module("norm5", make_norm(num_features))
        features.add_module("relu5", make_act())
        features.efficient = efficient
        self.features = features
        self.num_features = num_features
        self.head_hidden_size = _pooled_width(num_features, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.classifier: nn.Module = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        name_layers(self)
        self.feature_info, self.feature_ends = self._feature_levels(stem)
        self.min_input_size = min_input_side(stem, len(block_config))
        # timm's name for what the weights (or, without weights, the architecture) expect as input.
        self.pretrained_cfg: dict[str, Any] = architecture_cfg(
            stem, in_chans, num_classes, spatial_dims, len(block_config), architecture=arch_name
        )

        for module in self.modules():
            if isinstance(module, _ConvNd):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, _BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def _feature_levels(self, stem: str) -> tuple[FeatureInfo, list[int]]:
        """timm's ``feature_info`` (stem, each dense block but the last, final features) and the positions in
        ``self.features`` of the modules whose outputs they are."""
        names = [name for name, _ in self.features.named_children()]
        stem_name, reduction = ("relu0", 2) if stem == "imagenet" else ("conv0", 1)
        stem_channels = self.features.get_submodule("conv0").out_channels
        levels = [dict(num_chs=stem_channels, reduction=reduction, module=f"features.{stem_name}")]
        reduction = 2 * reduction if stem == "imagenet" else reduction
        for name, module in self.features.named_children():
            if isinstance(module, Transition):
                block = names[names.index(name) - 1]
                levels.append(dict(num_chs=module.conv.in_channels, reduction=reduction, module=f"features.{block}"))
                reduction *= 2
        levels.append(dict(num_chs=self.num_features, reduction=reduction, module="features.relu5"))
        info = FeatureInfo(dict(level, index=index) for index, level in enumerate(levels))
        return info, [names.index(level["module"].split(".", 1)[1]) for level in info]

    def set_efficient(self, efficient: MemoryMode) -> "DenseNet":
        """Switch every dense layer and transition to memory mode ``efficient``; returns ``self``."""
        efficient = check_memory_mode(efficient)
        self.efficient = efficient
        _set_memory_mode(self, efficient)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for trading compute for memory (``train.py --grad-checkpointing``), mapped to the memory
        modes so that turning it on never raises memory: ``True`` keeps a mode that recomputes already (``True``,
        the default, or ``"max"``) and turns plain autograd into ``efficient=True`` (recompute concatenation, BN
        and ReLU in backward); ``False`` recomputes nothing: plain autograd (``efficient=False``).
        ``set_efficient("max")`` is the lowest-memory mode."""
        if not enable:
            self.set_efficient(False)
        elif not self.efficient:
            self.set_efficient(True)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning rates (timm's ``group_matcher``): the stem, then each dense
        block with its transition (``coarse``) or each dense layer, the transition joining the layer before it.
        The final norm and the classifier fall in timm's last group, as in timm's DenseNet."""
        return dict(
            stem=r"^features\.conv[012]|features\.norm[012]|features\.pool[012]",
            blocks=r"^features\.(?:denseblock|transition)(\d+)"
            if coarse
            else [
                (r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
                (r"^features\.transition(\d+)", _MATCH_PREV_GROUP),
            ],
        )

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: none), and the
        pooling by ``global_pool`` (``None`` keeps it, or restores ``"avg"`` when a classifier returns to an
        unpooled model, as timm's tests expect; ``""`` with ``num_classes=0``: unpooled feature maps)."""
        num_classes = _check_int("num_classes", num_classes, 0)
        if global_pool is None:
            global_pool = self.global_pool or ("avg" if num_classes else "")
        global_pool = _check_pool(global_pool, num_classes)
        self.config["num_classes"] = self.num_classes = num_classes
        self.config["global_pool"] = self.global_pool = global_pool
        self.head_hidden_size = _pooled_width(self.num_features, global_pool)
        param = next(self.parameters())
        if num_classes:
            self.classifier = nn.Linear(self.head_hidden_size, num_classes, device=param.device, dtype=param.dtype)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()
        self.classifier.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H', W'): features after the final BN and ReLU (likewise for
        (N, in_chans, D, H, W) and (N, in_chans, L))."""
        return self.features(_checked_input(x, self.in_chans, self.min_input_size, self.spatial_dims))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, H', W') -> pooled features (N, head_hidden_size) or logits (N, num_classes);
        with ``global_pool=""`` the feature maps themselves."""
        x = _global_pool(x, self.global_pool)
        return x if pre_logits else self.classifier(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's multi-scale features: the feature maps of the levels in ``feature_info``.

        Args:
            x: (N, in_chans, H, W).
            indices: ``None`` all levels, an int ``n`` the last ``n``, a sequence those levels (negative from the
                end). Level 0 is the stem output, then each dense block's concatenated output before its
                transition, the last the final features (after the final BN and ReLU).
            norm: accepted for timm's signature; unused (the last level already is the normalised output).
            stop_early: stop after the last requested level (the final features are then that level's).
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of levels (and stop after the last requested one).

        Returns: the levels, each (N, num_chs, H / reduction, W / reduction), or ``(final, levels)`` where
        ``final`` is ``forward_features(x)``. In training the efficient modes keep their memory savings: the
        concatenations returned are outputs, not stored for backward.
        """
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

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the modules after the last level in ``indices`` (timm's semantics); returns the absolute indices.

        The classifier goes with ``prune_head``, and always when the final features are pruned (then
        ``num_features`` and ``head_hidden_size`` become the last kept level's channels). ``prune_norm`` is
        accepted for timm's signature; the final norm goes only with the final level.
        """
        taken, last = take_indices(len(self.feature_info), indices)
        end = self.feature_ends[last]
        pruned_end = end < len(self.features) - 1
        efficient = self.features.efficient
        self.features = DenseFeatures(OrderedDict(list(self.features.named_children())[: end + 1]))
        self.features.efficient = efficient
        if pruned_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return taken

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class DenseNetFeatures(nn.Module):
    """A DenseNet as a multi-scale backbone (timm's ``features_only``): returns a list of feature maps.

    Built from a :class:`DenseNet` (``create_model(name, features_only=True, out_indices=...)``): the modules
    after the last requested level are dropped, the rest are the model's own (same state-dict keys, weights
    shared). ``feature_info`` lists the returned levels: ``channels()``, ``reduction()``, ``module_name()``.

    Input (N, in_chans, H, W); output one (N, num_chs, H / reduction, W / reduction) tensor per level of
    ``out_indices``. Training keeps the memory mode's savings: only the returned maps are extra.
    """

    __jit_unused_properties__ = ["default_cfg"]

    def __init__(self, model: DenseNet, out_indices: int | Sequence[int] | None = None):
        super().__init__()
        taken = model.prune_intermediate_layers(len(model.feature_info) if out_indices is None else out_indices)
        self.out_indices = tuple(taken)
        self.features = model.features
        self.feature_info = FeatureInfo(dict(model.feature_info[index]) for index in taken)
        self.taps = [model.feature_ends[index] for index in taken]
        self.in_chans = model.in_chans
        self.min_input_size = model.min_input_size
        self.spatial_dims = model.spatial_dims
        self.efficient = model.efficient
        self.arch_name = model.arch_name
        self.config = dict(model.config, num_classes=0)
        self.pretrained_cfg: dict[str, Any] = dict(model.pretrained_cfg)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    def set_efficient(self, efficient: MemoryMode) -> "DenseNetFeatures":
        """Switch every dense layer and transition to memory mode ``efficient``; returns ``self``."""
        self.efficient = check_memory_mode(efficient)
        _set_memory_mode(self, self.efficient)
        return self

    def forward(self, x: Tensor) -> List[Tensor]:
        x = _checked_input(x, self.in_chans, self.min_input_size, self.spatial_dims)
        return self.features.forward_taps(x, self.taps)[1]
