"""Pretrained weights: the manifest, Hub and URL downloads with their checks, loading, saving, model cards.

This layer knows the model core (:mod:`densenet_efficient.core`); the core knows nothing of it. Importing it
installs :func:`.loading.resolve_weights` as the core's weights resolver, so that ``create_model(name,
pretrained=True)`` and the factories' ``weights=`` argument load weights.
"""

from ..core.registry import set_weights_resolver
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

set_weights_resolver(resolve_weights)

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
