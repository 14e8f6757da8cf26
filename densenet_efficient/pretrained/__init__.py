"""Pretrained weights: the manifest, Hub and URL downloads with their checks, loading, saving, model cards.
It knows the core, the core knows nothing of it; :mod:`densenet_efficient.models` calls
:func:`.loading.resolve_weights`."""

from .errors import (
    ChecksumMismatchError,
    IncompatibleWeightsError,
    InvalidConfigError,
    InvalidWeightsFileError,
    ManifestError,
    UnknownWeightsError,
    UnverifiedWeightsError,
    WeightsNotAvailableError,
)
from .loading import load_state_dict_into, read_state_dict, resolve_weights
from .manifest import PretrainedCfg, get_pretrained_cfg, list_pretrained, load_manifest
from .preprocessing import transforms
from .saving import save_pretrained

__all__ = ["ChecksumMismatchError", "IncompatibleWeightsError", "InvalidConfigError", "InvalidWeightsFileError"]
__all__ += ["ManifestError", "PretrainedCfg", "UnknownWeightsError", "UnverifiedWeightsError"]
__all__ += ["WeightsNotAvailableError", "get_pretrained_cfg", "list_pretrained", "load_manifest"]
__all__ += ["load_state_dict_into", "read_state_dict", "resolve_weights", "save_pretrained", "transforms"]
