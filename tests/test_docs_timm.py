"""Every Python block of docs/timm.md runs, in order, in one namespace, offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "timm.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_docs_timm_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    assert len(blocks()) == 5
    namespace: dict = {}
    for block in blocks():
        exec(compile(block, str(DOC), "exec"), namespace)
