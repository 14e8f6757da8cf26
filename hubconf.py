"""torch.hub entrypoints: ``torch.hub.load('<owner>/<repo>', 'densenet_bc_100_k12', efficient=True)``.

The registry's models (``densenet_efficient.list_models(include_aliases=True)``) and ``cifar_densenet`` (any
depth: ``depth=190, growth_rate=12``); each takes ``pretrained``, ``weights``, ``efficient`` and ``DenseNet``'s
arguments (``torch.hub.help``). Offline: ``source="local"`` on a checkout (docs/getting-started.md)."""

dependencies = ["torch", "safetensors", "huggingface_hub"]

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402
import warnings as _warnings  # noqa: E402

# Python reuses a densenet_efficient already imported from elsewhere: say so, naming both folders.
_imported = _sys.modules.get("densenet_efficient")
_here = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "densenet_efficient")
_there = _os.path.dirname(_os.path.abspath(getattr(_imported, "__file__", None) or "?"))
if _imported is not None and _os.path.realpath(_there) != _os.path.realpath(_here):
    _warnings.warn(
        f"densenet_efficient is already imported from {_there}, not {_here}: load from a fresh Python process",
        stacklevel=2,
    )

from densenet_efficient.core.registry import entrypoints as _entrypoints  # noqa: E402
from densenet_efficient.models import cifar_densenet  # noqa: E402, F401  (any CIFAR depth; registers the models)

globals().update(_entrypoints())
