"""Saving weights as this project's Hub repos hold them: ``model.safetensors``, ``config.json`` and a model card.

The three files are written as one set, so that the folder always holds a set that loads, the old one or the
new one, even if the process is killed at any point:

1. saves into one folder take turns (an advisory ``fcntl.flock`` on the folder, released by the OS on death);
2. the new files are written into a staging folder inside the target folder and synced to disk;
3. the set they replace is kept, as hard links (no copy), in ``.previous-save/``: that folder also marks a save
   in progress;
4. the new files are renamed into place, ``config.json`` last: it records the sha256 of ``model.safetensors``
   and so seals the set;
5. ``.previous-save/`` is removed.

Loading (:mod:`.loading`) takes the top-level set when it is sealed, else the set in ``.previous-save/`` (with a
warning), and names a first save that never completed as incomplete. The next save removes what an interrupted
one left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..core.config import PRETRAINED_CFG_KEYS, WEIGHT_SOURCE_KEYS, check_pretrained_cfg, with_pool_sizes
from .files import file_sha256, locked, remove_stale_temporaries
from .loading import (
    CONFIG_FILENAME,
    CONFIG_FORMAT,
    FORMAT_KEY,
    PREVIOUS_SET_DIRNAME,
    WEIGHTS_FILENAME,
    check_state_values,
)
from .manifest import label_names

CARD_FILENAME = "README.md"
SET_FILENAMES = (WEIGHTS_FILENAME, CONFIG_FILENAME, CARD_FILENAME)
LIBRARY_NAME = "densenet_efficient"
_ENTRY_KEYS_COMPUTED = ("model", "model_args", "num_classes", "hub", "url")
_STAGING_PREFIX, _STAGING_SUFFIX = ".save-", ".tmp"
_METRIC_DETAILS = ("image_size", "crop_pct", "protocol", "reported_by")


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
    **metadata: Any,
) -> dict[str, Any]:
    """Write ``model``'s weights to ``directory`` the way the Hub repos of this project hold them, and return the
    manifest entry for them.

    Files (written as one set, see the module's documentation; other files in ``directory`` are left alone):

    - ``model.safetensors``: ``model.state_dict()`` on the CPU with one metadata key (``format: pt``), so the
      same weights always give the same bytes;
    - ``config.json``: ``{"format": "densenet_efficient", "architecture": name, "model_args": constructor
      arguments, "num_classes": n, "num_features": ..., "global_pool": ..., "pretrained_cfg": ...,
      "weights_sha256": ...}``: timm's layout plus the format marker and the sha256, so that
      ``create_model(name, weights="<directory>")`` (or ``weights="hf-hub:org/name"`` once published),
      ``timm.create_model("local-dir:<directory>")`` after :func:`~densenet_efficient.register_with_timm`, and
      transformers' ``AutoImageProcessor.from_pretrained("<directory>")`` all read it. ``pretrained_cfg`` is the
      model's (timm's keys: input size, mean, std, crop, interpolation, labels, ...; see
      :func:`saved_pretrained_cfg`) updated with the metadata of those keys;
    - ``README.md``: a model card (``huggingface_hub.ModelCard``) with the Hub's metadata (library, pipeline tag,
      license, datasets, base model, ``model-index`` results), the sha256 and how to load it.

    Args:
        model: a ``DenseNet`` (its ``config`` gives the constructor arguments). Its values are checked here, once
            (NaN or infinite values, negative running variances: :class:`InvalidWeightsFileError`): a load of the
            sealed set does not check them again.
        directory: created if needed.
        architecture: registered model name; defaults to ``model.arch_name`` (set by ``create_model``).
        overwrite: replace a ``README.md`` that this function did not write (refused otherwise).
        **metadata: JSON-serialisable facts for the manifest entry and the card, e.g. ``tag="c10"``,
            ``dataset="cifar10"``, ``metrics=[{"dataset": ..., "top1": ..., "top5": ..., "protocol": ...}]``,
            ``license=...``, ``base_model="timm/densenet121.tv_in1k"`` (fine-tuned from), ``source=...``,
            ``mean=[...]``, ``std=[...]``, ``input_size=[3, 32, 32]``, ``label_names=[...]``.

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
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable (finite numbers): {error}") from error
    directory = Path(directory)
    card_path = directory / CARD_FILENAME
    if card_path.is_file() and not overwrite and not _written_by_us(card_path):
        raise FileExistsError(
            f"{card_path} exists and was not written by save_pretrained: pass overwrite=True "
            f"to replace it, or save into another folder"
        )

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    check_state_values(tensors, f"save_pretrained({directory})")  # once, here: loading a sealed set trusts them
    weights_bytes = save(tensors, metadata={"format": "pt"})
    sha256 = hashlib.sha256(weights_bytes).hexdigest()
    model_args = json.loads(json.dumps(model.config))
    entry = {
        **metadata,
        "model": name,
        "model_args": model_args,
        "num_classes": model_args.get("num_classes"),
        "hub": {
            "repo_id": None,
            "revision": None,
            "filename": WEIGHTS_FILENAME,
            "sha256": sha256,
            "size": len(weights_bytes),
        },
        "url": None,
    }
    config = config_json(model, name, metadata, model_args, sha256)
    write_set(
        directory,
        {
            WEIGHTS_FILENAME: weights_bytes,
            CARD_FILENAME: model_card(entry).encode(),
            CONFIG_FILENAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),  # last: seals the set
        },
    )
    return entry


def config_json(
    model: nn.Module,
    name: str,
    metadata: Mapping[str, Any],
    model_args: Mapping[str, Any] | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of this package's format for ``model`` saved as ``name``: timm's keys
    (``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``
    from :func:`saved_pretrained_cfg`), the format marker and, for a saved set, the weights' sha256."""
    args = json.loads(json.dumps(model_args if model_args is not None else getattr(model, "config", {})))
    config = {
        FORMAT_KEY: CONFIG_FORMAT,
        "architecture": name,
        "model_args": args,
        "num_classes": args.get("num_classes"),
        "num_features": getattr(model, "num_features", None),
        "global_pool": args.get("global_pool", "avg"),
        "pretrained_cfg": saved_pretrained_cfg(model, name, metadata),
    }
    if weights_sha256 is not None:
        config["weights_sha256"] = weights_sha256
    return config


def saved_pretrained_cfg(model: nn.Module, name: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pretrained_cfg`` that ``config.json`` records: ``model.pretrained_cfg`` (without where its weights
    were loaded from) updated with the metadata that are timm ``pretrained_cfg`` keys (``input_size``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``, ``label_names``, ``tag``, ``license``, ...; ``labels="imagenet-1k"``
    gives that list's ``label_names``), as JSON; ``pool_size`` follows ``input_size``. ``ValueError`` naming the
    key for a value timm or this package would refuse."""
    cfg = {
        key: value
        for key, value in dict(getattr(model, "pretrained_cfg", None) or {}).items()
        if key not in WEIGHT_SOURCE_KEYS
    }
    cfg.update(
        {key: value for key, value in metadata.items() if key in PRETRAINED_CFG_KEYS and key not in WEIGHT_SOURCE_KEYS}
    )
    names = label_names(metadata.get("labels"))  # a standard label list, e.g. "imagenet-1k"
    if names is not None and "label_names" not in metadata:
        cfg["label_names"] = names
    if "input_size" in metadata and "test_input_size" not in metadata:
        cfg.pop("test_input_size", None)  # it described the previous input size
    cfg["architecture"] = name
    config = getattr(model, "config", {})
    num_classes = config.get("num_classes", cfg.get("num_classes"))
    cfg["num_classes"] = num_classes
    if "block_config" in config:
        cfg = with_pool_sizes(cfg, config.get("stem", "imagenet"), len(config["block_config"]))
    try:
        checked = check_pretrained_cfg(cfg)
    except ValueError as error:
        raise ValueError(f"save_pretrained: {error}") from None
    in_chans = config.get("in_chans", checked["input_size"][0] if "input_size" in checked else None)
    if "input_size" in checked and checked["input_size"][0] != in_chans:
        raise ValueError(
            f"save_pretrained: input_size {checked['input_size']} for a model of {in_chans} input channels"
        )
    names = checked.get("label_names")
    if names is not None and len(names) != num_classes:
        raise ValueError(f"save_pretrained: {len(names)} label_names for a model of {num_classes} classes")
    return json.loads(json.dumps(checked))


def write_set(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``directory`` as a set, in the given order (the last one seals it), as the module's
    documentation describes. Leftovers of an interrupted earlier call are removed first."""
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory):
        remove_leftovers(directory)
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=_STAGING_PREFIX, suffix=_STAGING_SUFFIX))
        try:
            for filename, data in files.items():
                try:
                    with open(staging / filename, "wb") as file:
                        file.write(data)
                        file.flush()
                        os.fsync(file.fileno())
                except OSError as error:  # a full disk: say which file of which folder
                    message = f"cannot write {directory / filename}: {error.strerror or error}"
                    raise type(error)(error.errno, message) from error
            _keep_previous_set(directory, list(files))
            for filename in files:
                os.replace(staging / filename, directory / filename)
            _fsync_folder(directory)
            shutil.rmtree(directory / PREVIOUS_SET_DIRNAME)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _keep_previous_set(directory: Path, filenames: list[str]) -> None:
    """Hard-link the set in ``directory`` into ``.previous-save/`` (synced), unless that folder already holds the
    last good set: an earlier save was killed between its renames and left the top mixed."""
    previous = directory / PREVIOUS_SET_DIRNAME
    if previous.is_dir() and not _sealed(directory):
        return
    kept = Path(tempfile.mkdtemp(dir=directory, prefix=_STAGING_PREFIX, suffix=_STAGING_SUFFIX))
    for filename in filenames:
        if (directory / filename).is_file():
            try:
                os.link(directory / filename, kept / filename)
            except OSError:  # a file system without hard links
                shutil.copy2(directory / filename, kept / filename)
    _fsync_folder(kept)
    if previous.is_dir():
        shutil.rmtree(previous)
    os.rename(kept, previous)
    _fsync_folder(directory)


def _sealed(directory: Path) -> bool:
    """Whether ``directory``'s ``config.json`` records the sha256 of its ``model.safetensors``."""
    try:
        recorded = json.loads((directory / CONFIG_FILENAME).read_text(encoding="utf-8")).get("weights_sha256")
        return recorded is not None and file_sha256(directory / WEIGHTS_FILENAME) == recorded
    except (OSError, ValueError, AttributeError):
        return False


def _fsync_folder(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_leftovers(directory: Path) -> list[Path]:
    """Remove what an interrupted save left in ``directory``: staging folders and ``write_atomically``'s
    temporary files that no living process writes. Returns what was removed. (``.previous-save/`` stays: it
    may hold the last good set; a completed save removes it.) Call it holding the folder's lock."""
    removed = []
    for path in directory.iterdir():
        if path.name.startswith(_STAGING_PREFIX) and path.name.endswith(_STAGING_SUFFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for name in SET_FILENAMES:
        removed += remove_stale_temporaries(directory, prefix=f".{name}.")
    return removed


def _written_by_us(card_path: Path) -> bool:
    """Whether a README.md is a card that save_pretrained wrote: its front matter names this library."""
    text = card_path.read_text(encoding="utf-8", errors="replace")
    front_matter = text[4 : text.find("\n---", 4)] if text.startswith("---\n") else ""
    return f"library_name: {LIBRARY_NAME}" in front_matter.splitlines()


def card_files(card: str) -> list[str]:
    """The files a card written by :func:`model_card` lists (``files`` in its metadata)."""
    from huggingface_hub import ModelCard

    return list(ModelCard(card).data.to_dict().get("files", []))


def model_card(entry: Mapping[str, Any]) -> str:
    """A Hub model card (``README.md``) for a manifest entry, built with ``huggingface_hub.ModelCard``: metadata
    (``library_name``, ``pipeline_tag``, ``license``, ``datasets``, ``base_model``, ``model-index`` from the
    entry's metrics, the files of the set), the loading code, the sha256 and the entry's fields.
    Byte-reproducible: the same entry gives the same text."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, hub = entry["model"], entry["hub"]
    title = name + ("." + entry["tag"] if entry.get("tag") else "")
    metrics = [metric for metric in entry.get("metrics") or [] if isinstance(metric, Mapping)]
    datasets = sorted(
        {str(metric["dataset"]) for metric in metrics if metric.get("dataset")}
        | ({str(entry["dataset"])} if entry.get("dataset") else set())
    )
    results = []
    for metric in metrics:
        for key, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy")):
            if metric.get(key) is None or not metric.get("dataset"):
                continue
            results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=str(metric["dataset"]),
                    dataset_name=str(metric["dataset"]),
                    dataset_split=metric.get("split"),
                    metric_type="accuracy",
                    metric_name=label,
                    metric_value=metric[key],
                    metric_args={field: metric[field] for field in _METRIC_DETAILS if metric.get(field) is not None}
                    or None,
                )
            )
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="image-classification",
        license=entry.get("license"),
        datasets=datasets or None,
        base_model=entry.get("base_model"),
        tags=["image-classification", "densenet"],
        model_name=title,
        eval_results=results or None,
        files=list(SET_FILENAMES),
    )
    details = "\n".join(
        f"| {key} | `{json.dumps(value)}` |" for key, value in sorted(entry.items()) if key not in ("hub", "model")
    )
    body = (
        f"# {title}\n\n"
        f"Weights for `{name}` of [densenet_efficient](https://github.com/densenet-efficient/densenet_efficient), "
        f"a memory-efficient DenseNet with torchvision's state-dict layout.\n\n"
        f"```python\nimport densenet_efficient as de\n\n"
        f'model = de.create_model("{name}", weights="hf-hub:{hub.get("repo_id") or "ORG/NAME"}")\n'
        f'model = de.create_model("{name}", weights="path/to/this/folder")  # a local copy\n'
        f"preprocess = de.transforms(model)  # PIL image -> normalised tensor\n```\n\n"
        f"`{hub['filename']}`: {hub['size']} bytes, sha256 `{hub['sha256']}`.\n\n"
        f"| field | value |\n|---|---|\n{details}\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
