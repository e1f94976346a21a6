"""notebooks/quickstart.ipynb runs top to bottom on tiny settings: it trains, animates, shows the videos inline and
animates again with a custom audio processor."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_quickstart_notebook_trains_animates_and_swaps_the_audio_processor(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIPORTRAIT_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ANIPORTRAIT_BUNDLE", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    text = "\n".join(output.get("text", "") for output in outputs)
    videos = [output["data"]["text/html"] for output in outputs if "<video" in output.get("data", {}).get("text/html", "")]
    assert len(videos) == 3 and all("base64" in video for video in videos)  # embedded, so the notebook stands alone
    assert "s/frame, cpu" in text and "trimmed" in text and "of silence" in text
    assert (tmp_path / "talking.mp4").is_file() and (tmp_path / "talking_trimmed.mp4").is_file()
