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


def test_readme_excerpts_are_from_their_files():
  with open(os.path.join(ROOT, "README.md")) as f:
    excerpts = re.findall(r"```python excerpt=(\S+)\n(.*?)```", f.read(), flags=re.S)
  assert excerpts, "README.md has no excerpt"
  for path, block in excerpts:
    with open(os.path.join(ROOT, path)) as f:
      source = {line.strip() for line in f}
    stale = [line for line in block.splitlines() if line.strip() and line.strip() not in source]
    assert not stale, f"README excerpt of {path} has lines that are not in the file: {stale}"
