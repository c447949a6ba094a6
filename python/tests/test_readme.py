"""The README's Python section, run as it is: every ```python block of it, in order, in one
namespace (so a later block may use what an earlier one defined)."""

import os
import re

from conftest import ROOT


def python_blocks():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("\n## Python\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_readme_python_section_runs(capsys):
    blocks = python_blocks()
    assert len(blocks) >= 3
    ns = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "after 50 steps on the" in out
    assert "E0101 (62, 66)" in out
    assert "unknown name `grad`" in out
