"""Pretrained weights: the manifest, Hub and URL downloads with their checks, loading, saving, model cards.

This layer knows the model core (:mod:`densenet_efficient.core`); the core knows nothing of it. The factories and
``create_model`` (:mod:`densenet_efficient.models`) call :func:`.loading.resolve_weights` for ``pretrained=True``
and ``weights=``.
"""

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
from .loading import (
    load_pretrained,
    load_state_dict_into,
    read_state_dict,
    resolve_weights,
)
from .manifest import PretrainedCfg, get_pretrained_cfg, list_pretrained, load_manifest
from .preprocessing import transforms
from .saving import save_pretrained

__all__ = [
    "ChecksumMismatchError",
    "IncompatibleWeightsError",
    "InvalidConfigError",
    "InvalidWeightsFileError",
    "ManifestError",
    "PretrainedCfg",
    "UnknownWeightsError",
    "UnverifiedWeightsError",
    "WeightsNotAvailableError",
    "get_pretrained_cfg",
    "list_pretrained",
    "load_manifest",
    "load_pretrained",
    "load_state_dict_into",
    "read_state_dict",
    "resolve_weights",
    "save_pretrained",
    "transforms",
]
