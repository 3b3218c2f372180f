"""The documentation runs: README.md and docs/*.md (their Python examples run as written, their excerpts are
from their files) and the Colab notebook (top to bottom, on CPU, with a smoke-sized config).

A fenced block's info string says what it is: ```python runs (the blocks of one page in order, in
one namespace, in a fresh directory; a docs page's after the README's example, which it may build
on), ```python no-run must at least compile (it needs CIFAR, a cluster, ...), and
```python excerpt=PATH holds lines of the file PATH.
"""

from __future__ import annotations

import glob
import os
import re

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.S | re.M)
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def blocks(page: str) -> list[tuple[str, str, int]]:
  """Every ```python block of ``page``: (info string, code, line of its first code line)."""
  with open(os.path.join(ROOT, page)) as f:
    text = f.read()
  return [(m[1].strip(), m[2], text.count("\n", 0, m.start(2)) + 1) for m in FENCE.finditer(text)]


def kind(info: str) -> str:
  return "excerpt" if info.startswith("excerpt=") else info or "run"


def run(page: str, namespace: dict) -> int:
  """Executes the runnable blocks of ``page`` in order; tracebacks give the page's own line numbers."""
  runnable = [(code, line) for info, code, line in blocks(page) if kind(info) == "run"]
  for code, line in runnable:
    exec(compile("\n" * (line - 1) + code, page, "exec"), namespace)
  return len(runnable)


def test_docs_exist_and_every_python_block_says_what_it_is():
  assert len(PAGES) > 1, "docs/ has no pages"
  unknown = [
    (page, line, info)
    for page in PAGES
    for info, _, line in blocks(page)
    if kind(info) not in ("run", "no-run", "excerpt")
  ]
  assert not unknown, f"python blocks with an unknown info string (run, no-run or excerpt=PATH): {unknown}"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert run("README.md", {"__name__": "readme"}), "README.md has no python example"
  assert "ACCEPTED: 4 of 4 segments" in capsys.readouterr().out
  assert os.path.exists(tmp_path / "runs" / "readme" / "proof" / "manifest.json")


@pytest.mark.parametrize("page", [p for p in PAGES[1:] if any(kind(info) == "run" for info, _, _ in blocks(p))])
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "docs"}
  run("README.md", namespace)
  assert run(page, namespace)  # the blocks' own asserts check what they show


NO_RUN = [(p, line, code) for p in PAGES for info, code, line in blocks(p) if kind(info) == "no-run"]


@pytest.mark.parametrize("page, line, code", NO_RUN, ids=[f"{p}:{line}" for p, line, _ in NO_RUN])
def test_docs_no_run_blocks_compile(page, line, code):
  compile("\n" * (line - 1) + code, page, "exec")


def test_readme_excerpts_are_from_their_files():
  excerpts = [
    (page, info.removeprefix("excerpt="), code)
    for page in PAGES
    for info, code, _ in blocks(page)
    if kind(info) == "excerpt"
  ]
  assert excerpts, "neither README.md nor docs/ has an excerpt"
  for page, path, code in excerpts:
    with open(os.path.join(ROOT, path)) as f:
      source = {line.strip() for line in f}
    stale = [line for line in code.splitlines() if line.strip() and line.strip() not in source]
    assert not stale, f"{page}: excerpt of {path} has lines that are not in the file: {stale}"


def test_colab_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("POL_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("POL_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "pol_colab.ipynb"), as_version=4)
  NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  outputs = "".join(
    out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))
    for cell in notebook.cells
    if cell.cell_type == "code"
    for out in cell.outputs
  )
  assert "accelerator: cpu" in outputs
  assert "ACCEPTED: 3 of 3 segments replayed bit for bit" in outputs, outputs[-3000:]
  assert any(
    "image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
  ), "the notebook shows no figure"
  assert (tmp_path / "run" / "proof" / "manifest.json").exists()
