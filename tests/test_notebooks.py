"""The notebooks run top to bottom (on a tiny trained run and the embedded sample)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "analysis"])
def test_notebook_runs(name, request, tmp_path, monkeypatch):
    # the quickstart shows the reasoning chain: a model with evidence heads
    tiny_run = request.getfixturevalue("tiny_evidence_run" if name == "quickstart" else "tiny_run")
    monkeypatch.setenv("GEOLOC_CKPT", str(tiny_run["ckpt"]))
    monkeypatch.setenv("GEOLOC_SAMPLE_ROOT", str(tiny_run["sample"]))
    monkeypatch.setenv("GEOLOC_SAMPLE_N", "240")
    monkeypatch.setenv("GEOLOC_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("GEOLOC_REPO", str(REPO))
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figures were drawn
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    if name == "quickstart":
        assert "1. cell" in text and "error" in text
        assert "1. Scene:" in text and "3. Region:" in text and "driving_side" in text
    else:
        assert (tmp_path / "out" / "model" / "metrics.json").is_file()
        assert "median_km" in text and "ECE" in text
    assert os.environ["GEOLOC_CKPT"] == str(tiny_run["ckpt"])
