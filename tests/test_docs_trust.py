"""docs/trust.md: every python block runs offline, and the table has one row per case of issue 17."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from tests.weights_helpers import REPO_ROOT

DOC = REPO_ROOT / "docs" / "trust.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_the_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(python_blocks()[index], f"{DOC}:block{index}", "exec"), {"__name__": "__docs__"})
    for comment in re.findall(r"print\(error\)  # (.*)", python_blocks()[index]):  # the message, "..." elided
        pattern = ".*?".join(re.escape(part.strip()) for part in comment.split("...") if part.strip())
        assert re.search(pattern, printed.getvalue(), flags=re.S), (comment, printed.getvalue())


def test_the_table_has_a_row_per_case():
    rows = [
        line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ") and "---" not in line
    ]
    kinds = [row.rsplit("|", 2)[-2].strip() for row in rows[1:]]
    assert len(rows) - 1 >= 18 and {"refused", "cleaned up", "locked"} <= set(kinds)
