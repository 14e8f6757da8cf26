"""Every Python snippet of README's "Use it in your pipeline" section runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def pipeline_snippets() -> list[str]:
    text = README.read_text()
    start = text.index("## Use it in your pipeline")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_the_section_has_snippets():
    assert len(pipeline_snippets()) == 5


@pytest.mark.slow
def test_pipeline_snippets_run():
    pytest.importorskip("timm")
    namespace: dict = {}
    for snippet in pipeline_snippets():
        exec(compile(snippet, str(README), "exec"), namespace)
