"""The quick-start notebook runs top to bottom (tiny configuration)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    # run from a scratch copy of the repo root layout so runs/ lands in tmp_path
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Full report:" in outputs
    assert (tmp_path / "runs" / "notebook" / "report" / "report.html").exists()
