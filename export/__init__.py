"""Maintainer tools for pretrained weights, run from the repository root:

- ``python -m export.convert``: a torchvision DenseNet checkpoint -> ``model.safetensors``, ``config.json``,
  ``README.md`` in this project's layout, checked against torchvision's logits;
- ``python -m export.publish``: upload such a folder to the Hugging Face Hub and print the commit to pin;
- ``python -m export.manifest``: check or fill manifest entries from the Hub, or print the weights table.

Each takes ``--endpoint`` (another Hub, e.g. the tests' loopback hub) and ``--help``.
"""
