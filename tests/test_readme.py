"""The README's library example runs as written."""

from __future__ import annotations

import os
import re

from conftest import ROOT


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert blocks, "README.md has no python example"
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
  assert "ACCEPTED: 4 of 4 segments" in capsys.readouterr().out
  assert os.path.exists(tmp_path / "runs" / "readme" / "proof" / "manifest.json")
