"""The source distribution: its test suite collects from the unpacked archive, with everything it needs."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdist_tests_collect(tmp_path):
    pytest.importorskip("build")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (source,) = (tmp_path / "unpacked").iterdir()
    shipped = sorted(path.name for path in (source / "tests").glob("*.py"))
    assert shipped == sorted(path.name for path in (ROOT / "tests").glob("*.py"))
    for needed in ("hubconf.py", "weights_manifest.json", "mkdocs.yml", "docs/index.md", "export/convert.py"):
        assert (source / needed).is_file(), needed
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "collected" in summary and "error" not in summary, summary
