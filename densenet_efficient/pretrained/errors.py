"""The errors the pretrained-weights layer raises; each message says what was wrong and what to do."""

from __future__ import annotations


class UnknownWeightsError(ValueError):
    """The ``weights`` reference names no tag, file or Hub repo that fits the model."""


class IncompatibleWeightsError(ValueError):
    """The weights do not fit the model: missing, unexpected or differently shaped tensors."""


class InvalidWeightsFileError(ValueError):
    """A weights file that cannot be read (truncated, empty, not a checkpoint)."""


class ChecksumMismatchError(OSError):
    """A file's sha256 is not the one expected; the bad copy has been removed from the cache."""


class UnverifiedWeightsError(OSError):
    """A cached file that no pinned hash can verify (not a blob named by its hash); refused unless opted in."""


class WeightsNotAvailableError(OSError):
    """The weights file is neither reachable nor cached; the message says where to get it."""


class ManifestError(ValueError):
    """The weights manifest is not valid JSON or breaks its JSON Schema; the message names the field."""


class InvalidConfigError(ValueError):
    """A ``config.json`` beside weights is not valid, names unknown arguments, or does not fit the weights."""
