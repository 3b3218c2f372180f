"""The Colab notebook executes top to bottom (on CPU, with a smoke-sized config)."""

from __future__ import annotations

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


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
