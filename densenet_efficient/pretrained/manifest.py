"""The weights manifest (``weights_manifest.json``): which weights exist for which model, where they live, and
how they were measured. ``DENSENET_EFFICIENT_MANIFEST`` names another manifest file (a mirror, or tests).
"""

from __future__ import annotations

import fnmatch
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UnknownWeightsError

MANIFEST_FILENAME = "weights_manifest.json"
MANIFEST_ENV = "DENSENET_EFFICIENT_MANIFEST"


def manifest_path() -> Path:
    """The manifest in use: ``$DENSENET_EFFICIENT_MANIFEST`` if set, else the one shipped in the package."""
    override = os.environ.get(MANIFEST_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files(__package__).joinpath(MANIFEST_FILENAME)))


def load_manifest() -> dict[str, Any]:
    """The manifest as a dict: ``{"default_tags": {model: tag}, "weights": {"model.tag": entry}}``."""
    return json.loads(manifest_path().read_text(encoding="utf-8"))


def list_pretrained(pattern: str = "*") -> list[str]:
    """Sorted ``model.tag`` keys of the manifest that match the shell-style ``pattern``."""
    return sorted(key for key in load_manifest()["weights"] if fnmatch.fnmatchcase(key, pattern))


def weights_entry(name: str, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(key, entry)`` of the manifest for model ``name`` and ``tag`` (``None``: the model's default tag)."""
    manifest = load_manifest()
    tags = sorted(key.split(".", 1)[1] for key in manifest["weights"] if key.split(".", 1)[0] == name)
    if not tags:
        with_weights = sorted({key.split(".", 1)[0] for key in manifest["weights"]})
        raise UnknownWeightsError(
            f"No pretrained weights are published for {name!r}. Models with weights: {', '.join(with_weights)}. "
            f"Pass weights='path/to/model.safetensors' or 'hf-hub:org/name' to load your own."
        )
    tag = tag or manifest["default_tags"].get(name)
    if tag is None:
        raise UnknownWeightsError(f"{name!r} has no default weights: pass weights=<tag>, one of {', '.join(tags)}.")
    if tag not in tags:
        raise UnknownWeightsError(f"Unknown weights tag {tag!r} for {name!r}. Valid tags: {', '.join(tags)}.")
    key = f"{name}.{tag}"
    return key, manifest["weights"][key]
