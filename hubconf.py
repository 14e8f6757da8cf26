"""torch.hub entrypoints: ``torch.hub.load('<owner>/<repo>', 'densenet_bc_100_k12', efficient=True)``.

The entrypoints are the registry's models (``densenet_efficient.list_models()``), the earlier names that still
build them (``list_models(include_aliases=True)``), and ``cifar_densenet`` for a CIFAR DenseNet of any depth
(``torch.hub.load(repo, 'cifar_densenet', depth=190, growth_rate=12)``, ``bottleneck=False`` for plain DenseNet).
Every entrypoint takes ``pretrained``, ``weights`` and ``efficient`` (``False``, ``True`` or ``"max"``) plus any
``DenseNet`` argument; ``torch.hub.help(repo, name)`` prints the details. Other names here are private:
``torch.hub.list`` lists every public callable. Offline, load from a checkout or unpacked archive with
``source="local"`` (docs/getting-started.md).
"""

dependencies = ["torch", "safetensors", "huggingface_hub"]

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402
import warnings as _warnings  # noqa: E402


def _warn_if_another_copy_is_imported() -> None:
    """torch.hub imports this file with its folder on ``sys.path``, but Python reuses a ``densenet_efficient``
    already imported from elsewhere (an installed release, another checkout): say so, naming both folders."""
    imported = _sys.modules.get("densenet_efficient")
    if imported is None:
        return
    here = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "densenet_efficient")
    there = _os.path.dirname(_os.path.abspath(getattr(imported, "__file__", None) or "?"))
    if _os.path.realpath(there) != _os.path.realpath(here):
        _warnings.warn(
            f"densenet_efficient is already imported from {there}, so torch.hub builds that copy's models, not "
            f"those of {here}: load from a fresh Python process to use this checkout",
            stacklevel=3,
        )


_warn_if_another_copy_is_imported()

from densenet_efficient.core.registry import entrypoints as _entrypoints  # noqa: E402
from densenet_efficient.models import cifar_densenet  # noqa: E402, F401  (any CIFAR depth; registers the models)

globals().update(_entrypoints())
