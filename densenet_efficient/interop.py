"""timm integration: :func:`register_with_timm` puts this package's architectures and their pretrained
configurations in timm's model registry.

timm is imported only when the function is called, so ``import densenet_efficient`` stays light.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .core import registry
from .core.config import adapt_cfg, architecture_cfg, check_pretrained_cfg, with_pool_sizes
from .core.model import DenseNet, DenseNetFeatures
from .models import create_model
from .pretrained.errors import UnknownWeightsError
from .pretrained.loading import WEIGHTS_FILENAME, check_model_args
from .pretrained.manifest import load_manifest, weights_entry

# timm reads an entrypoint's module to list it (``timm.list_modules``), appends the name to that module's
# ``__all__`` (the package's already names every architecture) and registers the pretrained configurations in
# that module's ``default_cfgs``, which register_with_timm sets.
_ENTRYPOINT_MODULE = "densenet_efficient"


def timm_default_cfgs(names: list[str]) -> dict[str, Any]:
    """timm's ``default_cfgs`` for the architectures ``names``: per architecture a ``DefaultCfg`` of its manifest
    tags (the default tag first), or of its architecture's configuration (no weights) when it has none."""
    from timm.models import generate_default_cfgs

    manifest = load_manifest()
    cfgs: dict[str, Any] = {}
    for name in names:
        tags = sorted(key.split(".", 1)[1] for key in manifest["weights"] if key.split(".", 1)[0] == name)
        default = manifest["default_tags"].get(name)
        for tag in sorted(tags, key=lambda tag: tag != default):
            cfgs[f"{name}.{tag}{'*' if tag == default else ''}"] = weights_entry(name, tag).model_cfg()
        if not tags:
            args = registry.architecture(name)
            cfgs[name] = architecture_cfg(
                args.get("stem", "imagenet"),
                args.get("in_chans", 3),
                args.get("num_classes", 1000),
                args.get("spatial_dims", 2),
                len(args["block_config"]),
                architecture=name,
            )
    return generate_default_cfgs(cfgs)


def _weights_reference(name: str, cfg: Mapping[str, Any]) -> str | None:
    """What this package's loader reads for timm's resolved ``pretrained_cfg``, in timm's order of sources
    (``source``, then ``file``, then a manifest tag whose location is unchanged, then ``hf_hub_id``); ``None``:
    timm's own ``load_pretrained`` reads it (``state_dict``, ``url``, another Hub file name)."""
    if cfg.get("source") == "local-dir":
        return str(cfg["file"])
    if cfg.get("source") == "hf-hub":
        return f"hf-hub:{cfg['hf_hub_id']}"
    if cfg.get("state_dict") is not None:
        return None
    if cfg.get("file"):
        return str(cfg["file"])
    tag = cfg.get("tag")
    if tag:
        try:
            entry = weights_entry(name, tag).model_cfg()
        except UnknownWeightsError:
            entry = None
        if entry is not None and all(cfg.get(key) == entry.get(key) for key in ("hf_hub_id", "url")):
            return str(tag)
    if cfg.get("hf_hub_id") and cfg.get("hf_hub_filename") in (None, WEIGHTS_FILENAME):
        return f"hf-hub:{cfg['hf_hub_id']}"
    return None


# What the built network itself determines; timm's registered configuration describes the default architecture.
_STRUCTURE_KEYS = ("pool_size", "test_pool_size", "min_input_size", "num_classes", "first_conv", "classifier")


def _model_cfg(
    model: DenseNet, timm_cfg: Mapping[str, Any], overlay: Mapping[str, Any], weights_loaded: bool
) -> dict[str, Any]:
    """``model.pretrained_cfg`` as timm sets it: timm's resolved configuration, except what this package's loader
    read with the weights (which it keeps) and what the built network determines; the overlay over all; then
    adapted to the model's channels, classes and pool sizes."""
    timm_keys = {key: value for key, value in timm_cfg.items() if value is not None and key != "state_dict"}
    if weights_loaded:
        cfg = {**timm_keys, **model.pretrained_cfg}
    else:
        cfg = {**model.pretrained_cfg, **{k: v for k, v in timm_keys.items() if k not in _STRUCTURE_KEYS}}
    cfg.update({key: value for key, value in overlay.items() if key != "state_dict"})
    cfg = adapt_cfg(cfg, model.in_chans, model.num_classes)
    stem, block_config = model.config["stem"], model.config["block_config"]
    assert isinstance(stem, str) and isinstance(block_config, tuple)
    return check_pretrained_cfg(with_pool_sizes(cfg, stem, len(block_config)))


def _timm_entrypoint(name: str) -> Callable[..., DenseNet | DenseNetFeatures]:
    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict | None = None,
        pretrained_model_args: dict | None = None,
        cache_dir: Any = None,
        feature_cls: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> DenseNet | DenseNetFeatures:
        from timm.models import load_pretrained, resolve_pretrained_cfg

        if feature_cls not in (None, "getter"):
            raise ValueError(
                f"feature_cls={feature_cls!r} is not supported: features_only=True returns this package's "
                "DenseNetFeatures backbone (timm's 'getter' semantics: forward_intermediates)"
            )
        if pretrained_model_args:  # a config.json's model_args, which timm also passed on in kwargs
            check_model_args(name, {k: v for k, v in pretrained_model_args.items() if k != "efficient"}, "config.json")
        cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
        reference = _weights_reference(name, cfg) if pretrained else None
        features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", None)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = create_model(name, weights=reference, cache_dir=cache_dir, **kwargs)
        if pretrained and reference is None:
            load_pretrained(model, cfg, model.num_classes, model.in_chans, cache_dir=cache_dir, strict=False)
        model.pretrained_cfg = _model_cfg(
            model, cfg, pretrained_cfg_overlay or {}, weights_loaded=reference is not None
        )
        model.pretrained_model_args = dict(pretrained_model_args or {})
        if dtype is not None:
            model.to(dtype=dtype)
        return DenseNetFeatures(model, out_indices) if features_only else model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = _ENTRYPOINT_MODULE
    entrypoint.__doc__ = registry._ENTRYPOINTS[name].__doc__
    return entrypoint


def register_with_timm(pattern: str = "*") -> list[str]:
    """Register the architectures matching ``pattern`` and their pretrained configurations in timm's registry;
    returns their names.

    Afterwards ``timm.create_model("densenet121_efficient.ra_in1k", pretrained=True, num_classes=...,
    efficient=..., features_only=..., out_indices=...)`` builds this package's models and loads the weights of
    that tag (from this package's manifest, checksums checked); ``timm.create_model("local-dir:FOLDER")`` and
    ``"hf-hub:org/name"`` read a folder or repo written by ``save_pretrained`` (or timm's ``save_for_hf``);
    ``pretrained_cfg`` (a tag, or a dict naming ``file``/``hf_hub_id``/``url``), ``pretrained_cfg_overlay`` and
    ``pretrained_model_args`` act as on timm's own models. ``timm.list_pretrained``,
    ``timm.list_models(pretrained=True)`` and ``timm.get_pretrained_cfg_value`` include the manifest's tags, and
    ``timm.data.resolve_data_config({}, model=model)`` reads ``model.pretrained_cfg`` (32 px for CIFAR models).
    timm's ``drop_rate`` is this package's dropout after each dense layer. Calling it again re-registers.
    """
    from timm.models import register_model

    names = registry.list_models(pattern)
    package = sys.modules[_ENTRYPOINT_MODULE]
    package.default_cfgs = {**getattr(package, "default_cfgs", {}), **timm_default_cfgs(names)}  # type: ignore[attr-defined]
    for name in names:
        with warnings.catch_warnings():  # timm warns when a name is registered again
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            register_model(_timm_entrypoint(name))
    return names
