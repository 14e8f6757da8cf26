"""The Python blocks of docs/ecosystem.md and docs/efficient-path.md run, each file's in order in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def snippets(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("name", [pytest.param("ecosystem.md", marks=pytest.mark.slow), "efficient-path.md"])
def test_doc_snippets_run(name):
    pytest.importorskip("monai")
    pytest.importorskip("torchxrayvision")
    blocks = snippets(name)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS / name), "exec"), namespace)
