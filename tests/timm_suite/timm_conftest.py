"""Run timm's own ``tests/test_models.py`` (from the installed timm version's sdist) on this package's models.

``tests/test_timm_suite.py`` copies this file to the root of the unpacked sdist as ``conftest.py`` (it is no
conftest here, so that this repository's own test run does not load it), and pytest loads it before timm's
test module is imported. It registers the architectures with timm and narrows timm's model lists to them, so
that timm's own filters (``exclude_filters``, ``name_matches_cfg``, ``pretrained``, ``module``) pick among ours.
``DENSENET_TIMM_SUITE_MODELS`` (comma-separated, set by the test) names the architectures: 2D models small enough
for a 2-core machine (timm's tests assume NCHW images, so the 3D models are not in their scope).
Tests that only download timm's published weights (``*_pretrained``, ``test_model_inference``) and tests of
named timm models are deselected.
"""

import os

import pytest
import timm
import timm.models

import densenet_efficient

if not os.environ.get("DENSENET_TIMM_SUITE_MODELS"):
    raise pytest.UsageError("set DENSENET_TIMM_SUITE_MODELS to the architectures to test, e.g. densenet_40_k12")
MODELS = set(os.environ["DENSENET_TIMM_SUITE_MODELS"].split(","))
NETWORK_TESTS = ("test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained")

unknown = MODELS - set(densenet_efficient.register_with_timm())
if unknown:
    raise pytest.UsageError(f"DENSENET_TIMM_SUITE_MODELS names unknown architectures {sorted(unknown)}")


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in MODELS


def _narrowed(list_fn):
    def narrowed(*args, **kwargs):
        return [name for name in list_fn(*args, **kwargs) if _ours(name)]

    return narrowed


# test_models.py does ``from timm import list_models, list_pretrained`` at import time.
timm.list_models = timm.models.list_models = _narrowed(timm.list_models)
timm.list_pretrained = timm.models.list_pretrained = _narrowed(timm.list_pretrained)


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        ours = isinstance(name, str) and _ours(name) and item.originalname not in NETWORK_TESTS
        (kept if ours else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept
