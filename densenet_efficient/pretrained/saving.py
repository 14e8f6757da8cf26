"""Saving weights as this project's Hub repos hold them: ``model.safetensors``, ``config.json`` and a model card."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .files import write_atomically
from .loading import CONFIG_FILENAME, WEIGHTS_FILENAME

CARD_FILENAME = "README.md"
_ENTRY_KEYS_COMPUTED = ("model", "model_args", "num_classes", "hub", "url")


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, architecture: str | None = None,
                    **metadata: Any) -> dict[str, Any]:
    """Write ``model``'s weights to ``directory`` the way the Hub repos of this project hold them, and return the
    manifest entry for them.

    Files (each written to a temporary file, then renamed, so a failure leaves the old one in place):

    - ``model.safetensors``: ``model.state_dict()`` on the CPU with one metadata key (``format: pt``), so the
      same weights always give the same bytes;
    - ``config.json``: ``{"architecture": name, "model_args": constructor arguments, "num_classes": n,
      "pretrained_cfg": metadata}``, enough to rebuild the model with
      ``create_model(name, weights="<directory>")`` or ``weights="hf-hub:org/name"`` once published;
    - ``README.md``: a model card with the architecture, the metadata, the sha256 and how to load it.

    Args:
        model: a ``DenseNet`` (its ``config`` gives the constructor arguments).
        directory: created if needed; existing files of the same names are replaced.
        architecture: registered model name; defaults to ``model.arch_name`` (set by ``create_model``).
        **metadata: JSON-serialisable facts for the manifest entry and the card, e.g. ``tag="c10"``,
            ``dataset="cifar10"``, ``metrics=[{"dataset": ..., "top1": ..., "protocol": ...}]``, ``license=...``,
            ``source="trained here"``, ``mean=[...]``, ``std=[...]``, ``input_size=[3, 32, 32]``.

    Returns:
        ``{"model", "model_args", "num_classes", "hub": {"repo_id": None, "revision": None, "filename",
        "sha256", "size"}, **metadata}``: fill in ``repo_id`` and ``revision`` after publishing.
    """
    from safetensors.torch import save

    name = architecture or getattr(model, "arch_name", None)
    if not name:
        raise ValueError("save_pretrained needs the model's registered name: pass architecture='densenet...'")
    clashes = sorted(set(metadata) & set(_ENTRY_KEYS_COMPUTED))
    if clashes:
        raise ValueError(f"metadata keys {clashes} are computed by save_pretrained; rename them")
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from error

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    weights_bytes = save(tensors, metadata={"format": "pt"})
    model_args = json.loads(json.dumps(model.config))
    entry = {
        **metadata,
        "model": name,
        "model_args": model_args,
        "num_classes": model_args.get("num_classes"),
        "hub": {"repo_id": None, "revision": None, "filename": WEIGHTS_FILENAME,
                "sha256": hashlib.sha256(weights_bytes).hexdigest(), "size": len(weights_bytes)},
        "url": None,
    }
    config = {"architecture": name, "model_args": model_args, "num_classes": entry["num_classes"],
              "pretrained_cfg": metadata}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILENAME, weights_bytes)
    write_atomically(directory / CONFIG_FILENAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    write_atomically(directory / CARD_FILENAME, model_card(entry).encode())
    return entry


def model_card(entry: Mapping[str, Any]) -> str:
    """A Hub model card (``README.md``) for a manifest entry."""
    name, hub = entry["model"], entry["hub"]
    license_line = f"license: {entry['license']}\n" if entry.get("license") else ""
    details = "\n".join(
        f"| {key} | `{json.dumps(value)}` |" for key, value in sorted(entry.items()) if key not in ("hub", "model")
    )
    return (
        f"---\nlibrary_name: densenet_efficient\n{license_line}tags:\n- image-classification\n- densenet\n---\n\n"
        f"# {name}{'.' + entry['tag'] if entry.get('tag') else ''}\n\n"
        f"Weights for `{name}` of [densenet_efficient](https://github.com/densenet-efficient/densenet_efficient), "
        f"a memory-efficient DenseNet with torchvision's state-dict layout.\n\n"
        f"```python\nimport densenet_efficient as de\n\n"
        f"model = de.create_model(\"{name}\", weights=\"hf-hub:{hub.get('repo_id') or 'ORG/NAME'}\")\n"
        f"model = de.create_model(\"{name}\", weights=\"path/to/this/folder\")  # a local copy\n```\n\n"
        f"`{hub['filename']}`: {hub['size']} bytes, sha256 `{hub['sha256']}`.\n\n"
        f"| field | value |\n|---|---|\n{details}\n"
    )
