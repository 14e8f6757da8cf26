"""timm integration: :func:`register_with_timm` puts this package's architectures in timm's model registry.

timm is imported only when the function is called, so ``import densenet_efficient`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core import registry
from .core.model import DenseNet, DenseNetFeatures

# timm reads an entrypoint's module to list it (``timm.list_modules``) and appends the name to that module's
# ``__all__``: the package's ``__all__`` already names every architecture.
_ENTRYPOINT_MODULE = "densenet_efficient"


def _timm_entrypoint(name: str) -> Callable[..., DenseNet | DenseNetFeatures]:
    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict | None = None,
        cache_dir: Any = None,
        feature_cls: str | None = None,
        **kwargs: Any,
    ) -> DenseNet | DenseNetFeatures:
        if feature_cls not in (None, "getter"):
            raise ValueError(
                f"feature_cls={feature_cls!r} is not supported: features_only=True returns this package's "
                "DenseNetFeatures backbone (timm's 'getter' semantics: forward_intermediates)"
            )
        weights = None
        hf_hub_id = getattr(pretrained_cfg, "hf_hub_id", None) or (
            pretrained_cfg.get("hf_hub_id") if isinstance(pretrained_cfg, dict) else None
        )
        if pretrained and hf_hub_id:
            weights = f"hf-hub:{hf_hub_id}"
        model = registry.create_model(name, pretrained=pretrained, weights=weights, cache_dir=cache_dir, **kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg_overlay}
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = _ENTRYPOINT_MODULE
    entrypoint.__doc__ = registry._ENTRYPOINTS[name].__doc__
    return entrypoint


def register_with_timm(pattern: str = "*") -> list[str]:
    """Register the architectures matching ``pattern`` in timm's registry; returns their names.

    Afterwards ``timm.create_model("densenet121_efficient", pretrained=..., num_classes=..., efficient=...,
    features_only=..., out_indices=...)`` builds this package's models (weights from this package's manifest),
    and ``timm.data.resolve_data_config({}, model=model)`` reads their ``pretrained_cfg`` (32 px for CIFAR
    models). timm's ``drop_rate`` is this package's dropout after each dense layer. Calling it again re-registers.
    """
    import warnings

    from timm.models import register_model

    names = registry.list_models(pattern)
    for name in names:
        with warnings.catch_warnings():  # timm warns when a name is registered again
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            register_model(_timm_entrypoint(name))
    return names
