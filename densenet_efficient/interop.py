"""timm integration: :func:`register_with_timm` puts this package's architectures and their pretrained
configurations in timm's registry (timm is imported only then)."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .core import registry
from .core.config import adapt_cfg, check_pretrained_cfg, with_pool_sizes
from .core.model import DenseNet, DenseNetFeatures
from .models import create_model
from .pretrained.loading import WEIGHTS_FILENAME, check_model_args
from .pretrained.manifest import load_manifest, weights_entry

# timm lists an entrypoint under its module, appends it to that module's __all__ and reads its default_cfgs.
_ENTRYPOINT_MODULE = "densenet_efficient"


def _weights_reference(name: str, cfg: Mapping[str, Any]) -> str | None:
    """What this package's loader reads for timm's resolved ``pretrained_cfg``, in timm's order of sources; ``None``:
    timm's ``load_pretrained`` reads it (``state_dict``, ``url``, another Hub file name)."""
    if cfg.get("source") == "hf-hub":
        return f"hf-hub:{cfg['hf_hub_id']}"
    if cfg.get("source") == "local-dir" or (cfg.get("file") and cfg.get("state_dict") is None):
        return str(cfg["file"])
    if cfg.get("state_dict") is not None:
        return None
    if cfg.get("tag") and f"{name}.{cfg['tag']}" in load_manifest()["weights"]:
        entry = weights_entry(name, cfg["tag"]).model_cfg()  # the manifest's weights, if they are those asked for
        if all(cfg.get(key) == entry.get(key) for key in ("hf_hub_id", "url")):
            return str(cfg["tag"])
    if cfg.get("hf_hub_id") and cfg.get("hf_hub_filename") in (None, WEIGHTS_FILENAME):
        return f"hf-hub:{cfg['hf_hub_id']}"
    return None


# What the built network itself determines; timm's registered configuration describes the default architecture.
_STRUCTURE_KEYS = ("pool_size", "test_pool_size", "min_input_size", "num_classes", "first_conv", "classifier")


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
                f"feature_cls={feature_cls!r} is not supported: features_only gives DenseNetFeatures ('getter')"
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
        # timm's resolved cfg below what the loader read with the weights, else over the network's but for its
        # structure; the overlay over all; adapted to the model
        timm_keys = {key: value for key, value in cfg.items() if value is not None and key != "state_dict"}
        if reference is None:
            merged = {**model.pretrained_cfg, **{k: v for k, v in timm_keys.items() if k not in _STRUCTURE_KEYS}}
        else:
            merged = {**timm_keys, **model.pretrained_cfg}
        merged.update({k: v for k, v in (pretrained_cfg_overlay or {}).items() if k != "state_dict"})
        merged = adapt_cfg(merged, model.in_chans, model.num_classes)
        blocks = len(model.config["block_config"])
        model.pretrained_cfg = check_pretrained_cfg(with_pool_sizes(merged, str(model.config["stem"]), blocks))
        model.pretrained_model_args = dict(pretrained_model_args or {})
        if dtype is not None:
            model.to(dtype=dtype)
        return DenseNetFeatures(model, out_indices) if features_only else model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = _ENTRYPOINT_MODULE
    entrypoint.__doc__ = registry._ENTRYPOINTS[name].__doc__
    return entrypoint


def register_with_timm(pattern: str = "*") -> list[str]:
    """Register the architectures matching ``pattern`` and their pretrained configurations with timm; returns
    their names. Then ``timm.create_model("densenet121_efficient.ra_in1k", pretrained=True, ...)`` loads the
    manifest's weights (checksums checked), ``"local-dir:FOLDER"``/``"hf-hub:org/name"`` a ``save_pretrained`` (or
    ``save_for_hf``) set; ``pretrained_cfg``, ``pretrained_cfg_overlay`` and ``pretrained_model_args`` act as on
    timm's models, and ``timm.list_pretrained``/``get_pretrained_cfg_value``/``resolve_data_config`` see them."""
    from timm.models import generate_default_cfgs, register_model

    names, manifest, cfgs = registry.list_models(pattern), load_manifest(), dict[str, Any]()
    for name in names:  # each one's manifest tags (default first), else its architecture's (built on meta)
        tags = sorted(key.split(".", 1)[1] for key in manifest["weights"] if key.split(".", 1)[0] == name)
        default = manifest["default_tags"].get(name)
        for tag in sorted(tags, key=lambda tag: tag != default):
            cfgs[f"{name}.{tag}{'*' if tag == default else ''}"] = weights_entry(name, tag).model_cfg()
        if not tags:
            with torch.device("meta"):
                cfgs[name] = create_model(name, efficient=False).pretrained_cfg
    package = sys.modules[_ENTRYPOINT_MODULE]
    package.default_cfgs = {**getattr(package, "default_cfgs", {}), **generate_default_cfgs(cfgs)}  # type: ignore[attr-defined]
    for name in names:
        with warnings.catch_warnings():  # timm warns when a name is registered again
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            register_model(_timm_entrypoint(name))
    return names
