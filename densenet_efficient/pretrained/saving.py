"""Saving weights as this project's Hub repos hold them: ``model.safetensors``, ``config.json`` (timm's layout,
read by timm and transformers) and a model card, written into a temporary folder and renamed into place,
``config.json`` last: it records the weights' sha256 and so seals the set (:mod:`.loading` refuses another file).
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

from ..core.config import PRETRAINED_CFG_KEYS, WEIGHT_SOURCE_KEYS, InputCfg, check_pretrained_cfg, with_pool_sizes
from .loading import CONFIG_FILENAME, CONFIG_FORMAT, FORMAT_KEY, WEIGHTS_FILENAME, check_state_values
from .manifest import label_names

CARD_FILENAME = "README.md"
SET_FILENAMES = (WEIGHTS_FILENAME, CONFIG_FILENAME, CARD_FILENAME)
LIBRARY_NAME = "densenet_efficient"
_COMPUTED = ("model", "model_args", "num_classes", "hub", "url")
_METRIC_DETAILS = ("image_size", "crop_pct", "protocol", "reported_by")


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
    **metadata: Any,
) -> dict[str, Any]:
    """Write ``model``'s weights into ``directory`` (other files are left alone); return their manifest entry.

    ``model.safetensors`` (byte-reproducible), ``config.json`` (:func:`config_json`: read by ``create_model(name,
    weights=directory)``, timm's ``"local-dir:"`` and transformers) and ``README.md`` (:func:`model_card`; one not
    written here is replaced only with ``overwrite``). Values are checked here, once (NaN, inf, negative variances:
    :class:`InvalidWeightsFileError`). ``architecture`` defaults to ``model.arch_name``; ``metadata``: JSON facts
    (``tag``, ``dataset``, ``metrics``, ``license``, ``base_model``, ``source``) and ``pretrained_cfg`` keys.
    Returns ``{"model", "model_args", "num_classes", "hub": {..., "sha256", "size"}, "url": None, **metadata}``.
    """
    from safetensors.torch import save

    name = architecture or getattr(model, "arch_name", None)
    if not name:
        raise ValueError("save_pretrained needs the model's registered name: pass architecture='densenet...'")
    if clashes := sorted(set(metadata) & set(_COMPUTED)):
        raise ValueError(f"metadata keys {clashes} are computed by save_pretrained; rename them")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable (finite numbers): {error}") from error
    directory = Path(directory)
    card = directory / CARD_FILENAME
    if card.is_file() and not overwrite and f"library_name: {LIBRARY_NAME}\n" not in card.read_text(errors="replace"):
        raise FileExistsError(f"{card} exists and was not written by save_pretrained: pass overwrite=True")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    check_state_values(tensors, f"save_pretrained({directory})")
    weights = save(tensors, metadata={"format": "pt"})
    sha256 = hashlib.sha256(weights).hexdigest()
    config = config_json(model, name, metadata, weights_sha256=sha256)
    hub = {"repo_id": None, "revision": None, "filename": WEIGHTS_FILENAME, "sha256": sha256, "size": len(weights)}
    entry = {**metadata, "model": name, "model_args": config["model_args"], "num_classes": config["num_classes"]}
    entry.update(hub=hub, url=None)
    files = {WEIGHTS_FILENAME: weights, CARD_FILENAME: model_card(entry).encode()}
    files[CONFIG_FILENAME] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()  # last: seals the set
    first = not directory.exists()  # a first save renames the whole folder into place
    (directory.parent if first else directory).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent if first else directory, prefix=".save-", suffix=".tmp"))
    try:
        for filename, data in files.items():
            try:
                with open(staging / filename, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as error:  # a full disk: say which file of which folder
                why = error.strerror or error
                raise type(error)(error.errno, f"cannot write {directory / filename}: {why}") from error
        if first:
            os.rename(staging, directory)
        for filename in files if not first else ():
            os.replace(staging / filename, directory / filename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def config_json(
    model: nn.Module, name: str, metadata: Mapping[str, Any], weights_sha256: str | None = None
) -> dict[str, Any]:
    """``config.json`` for ``model`` saved as ``name``: timm's keys, the format marker and the weights' sha256.
    Its ``pretrained_cfg`` is ``model.pretrained_cfg`` (no location) updated with the metadata's timm keys
    (``labels="imagenet-1k"`` gives its ``label_names``), checked: ``ValueError`` naming the key."""
    args = dict(getattr(model, "config", {}))
    if custom := sorted({"norm", "act"} & set(args)):  # the loader rebuilds batch norm and ReLU only
        raise ValueError(
            f"save_pretrained: a model built with {'/'.join(custom)} other than batch/relu cannot be saved as a "
            "pretrained set; use safetensors.torch.save_file"
        )
    args = json.loads(json.dumps(args))
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **metadata}
    cfg = {k: v for k, v in cfg.items() if k in PRETRAINED_CFG_KEYS and k not in WEIGHT_SOURCE_KEYS}
    if (names := label_names(metadata.get("labels"))) is not None and "label_names" not in metadata:
        cfg["label_names"] = names
    if "input_size" in metadata and "test_input_size" not in metadata:
        cfg.pop("test_input_size", None)  # it described the previous input size
    cfg.update(architecture=name, num_classes=args.get("num_classes", cfg.get("num_classes")))
    if "block_config" in args:
        cfg = with_pool_sizes(cfg, args.get("stem", "imagenet"), len(args["block_config"]))
    try:
        cfg = check_pretrained_cfg(cfg)
        inputs = InputCfg.from_dict(cfg)
    except ValueError as error:
        raise ValueError(f"save_pretrained: {error}") from None
    in_chans = args.get("in_chans", inputs.channels)
    if inputs.adapt(in_chans, cfg["num_classes"]) != inputs:
        raise ValueError(
            f"save_pretrained: input_size {inputs.input_size} and {len(inputs.label_names or ())} label_names do not "
            f"fit a model of {in_chans} input channels and {cfg['num_classes']} classes"
        )
    config: dict[str, Any] = dict(architecture=name, model_args=args, num_classes=args.get("num_classes"))
    config.update(num_features=getattr(model, "num_features", None), global_pool=args.get("global_pool", "avg"))
    config |= {FORMAT_KEY: CONFIG_FORMAT, "pretrained_cfg": json.loads(json.dumps(cfg))}
    return config | ({"weights_sha256": weights_sha256} if weights_sha256 else {})


def model_card(entry: Mapping[str, Any]) -> str:
    """A Hub model card (``huggingface_hub.ModelCard``) for a manifest entry: metadata (license, datasets, base
    model, ``model-index`` results, the files), how to load it, its sha256 and fields; the same for the same entry."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, hub = entry["model"], entry["hub"]
    title = name + ("." + entry["tag"] if entry.get("tag") else "")
    metrics = [m for m in entry.get("metrics") or [] if isinstance(m, Mapping) and m.get("dataset")]
    datasets = sorted({str(d) for d in [*(m["dataset"] for m in metrics), entry.get("dataset")] if d})
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=str(m["dataset"]),
            dataset_name=str(m["dataset"]),
            dataset_split=m.get("split"),
            metric_type="accuracy",
            metric_name=label,
            metric_value=m[key],
            metric_args={f: m[f] for f in _METRIC_DETAILS if m.get(f) is not None} or None,
        )
        for m in metrics
        for key, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy"))
        if m.get(key) is not None
    ]
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
    details = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(entry.items()) if k not in ("hub", "model"))
    body = (
        f"# {title}\n\nWeights for `{name}` of [densenet_efficient](https://github.com/densenet-efficient/"
        f"densenet_efficient), a memory-efficient DenseNet with torchvision's state-dict layout.\n\n"
        f'```python\nimport densenet_efficient as de\n\nmodel = de.create_model("{name}", weights="hf-hub:'
        f'{hub.get("repo_id") or "ORG/NAME"}")\nmodel = de.create_model("{name}", weights="path/to/this/folder")  '
        f"# a local copy\npreprocess = de.transforms(model)  # PIL image -> normalised tensor\n```\n\n"
        f"`{hub['filename']}`: {hub['size']} bytes, sha256 `{hub['sha256']}`.\n\n"
        f"| field | value |\n|---|---|\n{details}\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
