"""torch.hub entrypoints: ``torch.hub.load('<owner>/<repo>', 'densenet_bc_100_k12', efficient=True)``.

Every entrypoint takes ``pretrained``, ``weights`` and ``efficient`` (``False``, ``True`` or ``"max"``) plus any
``DenseNet`` argument; ``torch.hub.help(repo, name)`` prints the details.
"""

dependencies = ["torch", "safetensors", "huggingface_hub", "jsonschema"]

from densenet_efficient import (  # noqa: E402, F401  (the entrypoints torch.hub lists)
    densenet121_3d_efficient,
    densenet121_efficient,
    densenet161_efficient,
    densenet169_3d_efficient,
    densenet169_efficient,
    densenet201_3d_efficient,
    densenet201_efficient,
    densenet264_3d_efficient,
    densenet264_efficient,
    densenet_40_k12,
    densenet_bc_100_k12,
    densenet_bc_190_k40,
    densenet_bc_250_k24,
)
