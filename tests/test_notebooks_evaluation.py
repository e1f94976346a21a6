"""notebooks/evaluation.ipynb runs top to bottom on tiny settings and shows the benchmark table and plots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "evaluation.ipynb"


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_evaluation_notebook_executes_and_shows_the_table(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ANIPORTRAIT_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ANIPORTRAIT_BUNDLE", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    texts = "\n".join(output.get("text", "") + "".join(output.get("data", {}).get("text/markdown", ""))
                      for output in outputs)
    assert "| mouth_open_corr |" in texts  # the landmark benchmark of the quickstart bundle
    assert "| metric | generated | ground truth vs itself | copy reference frame |" in texts
    assert "| ssim ↑ |" in texts and "missing:" in texts
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2
    assert os.listdir(tmp_path / "generated")
