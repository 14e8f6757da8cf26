"""timm's own ``tests/test_models.py``, fetched by pip from the installed timm version's sdist, run on this
package's registered architectures through ``tests/timm_suite/timm_conftest.py`` (nothing of timm's is copied into
this repository). Fails on any failure and on any skip (timm skips its backward, FX and TorchScript tests for
models without a registered pretrained configuration). Skipped only where pip cannot reach the index, and never
in CI (``CI`` set)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("densenet_40_k12", "densenet121_efficient")  # a CIFAR network and an ImageNet one with tags
CONFTEST = REPO_ROOT / "tests" / "timm_suite" / "timm_conftest.py"
# The tests timm's test_models.py has for a CNN classifier with a registered pretrained configuration.
EXPECTED = {
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_forward_features",
    "test_model_forward_fx",
    "test_model_backward_fx",
}


def fetch_timm_sdist(folder: Path) -> Path:
    """The unpacked sdist of the installed timm version, its ``timm/`` sources removed so that its tests import
    the installed timm."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--timeout", "60"]
    download = subprocess.run(
        [*command, f"timm=={timm.__version__}", "-d", str(folder)], capture_output=True, text=True, timeout=600
    )
    if download.returncode != 0:
        reason = f"pip could not fetch the timm {timm.__version__} sdist: {download.stderr.strip()[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    (sdist,) = folder.glob("timm-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(folder, filter="data")
    root = folder / f"timm-{timm.__version__}"
    shutil.rmtree(root / "timm")
    return root


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_timms_test_models_pass_on_the_registered_architectures(tmp_path):
    root = fetch_timm_sdist(tmp_path)
    shutil.copy(CONFTEST, root / "conftest.py")
    report = tmp_path / "report.xml"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "DENSENET_TIMM_SUITE_MODELS": ",".join(MODELS),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_models.py", "-q", "-rs", "-p", "no:cacheprovider",
         f"--junitxml={report}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1100,
    )  # fmt: skip
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[case.get("name")] = outcome
    summary = run.stdout[-3000:]
    assert run.returncode == 0, summary
    assert all(outcome == "passed" for outcome in outcomes.values()), {
        k: v for k, v in outcomes.items() if v != "passed"
    }
    ran = {name.split("[")[0] for name in outcomes}
    assert EXPECTED <= ran, f"timm's suite did not run {sorted(EXPECTED - ran)}: {summary}"
    for model in MODELS:
        assert f"test_model_backward[2-{model}]" in outcomes, summary
