"""Deprecated: the weights functions moved to :mod:`densenet_efficient.pretrained` (its submodules ``loading``,
``saving``, ``manifest``, ``download``, ``files`` and ``errors``). Names read from here still work, with a
``DeprecationWarning`` that says where each one lives now."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    **dict.fromkeys(
        (
            "ChecksumMismatchError",
            "IncompatibleWeightsError",
            "InvalidWeightsFileError",
            "UnknownWeightsError",
            "WeightsNotAvailableError",
        ),
        "errors",
    ),
    **dict.fromkeys(
        ("load_manifest", "list_pretrained", "manifest_path", "weights_entry", "MANIFEST_FILENAME", "MANIFEST_ENV"),
        "manifest",
    ),
    **dict.fromkeys(
        (
            "PretrainedWeights",
            "resolve_weights",
            "load_pretrained",
            "read_state_dict",
            "load_state_dict_into",
            "rename_legacy_keys",
            "WEIGHTS_FILENAME",
            "CONFIG_FILENAME",
            "HF_HUB_PREFIX",
        ),
        "loading",
    ),
    **dict.fromkeys(("save_pretrained", "model_card", "CARD_FILENAME"), "saving"),
    **dict.fromkeys(("write_atomically", "file_sha256"), "files"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new_module = f"densenet_efficient.pretrained.{_MOVED[name]}"
    warnings.warn(f"densenet_efficient.weights.{name} moved to {new_module}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new_module), name)
