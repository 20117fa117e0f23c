"""Every notebook under notebooks/ runs top to bottom at the tiny configuration, and is stored without outputs.

The notebooks read ``MEDTL_NOTEBOOK_CONFIG`` (default configs/demo.yaml) and ``MEDTL_NOTEBOOK_RUNS`` (default
runs/); here they get configs/tiny.yaml with three adaptation methods instead of eight (tests/test_pipeline_e2e.py
runs all of them; this keeps the notebooks' time in CI down) and one scratch folder shared by the module, as a
researcher's notebooks share runs/: whichever of quickstart and compare_backbones runs second resumes the first
one's work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BACKBONES = ("efficientnet_lite0.imagenet", "efficientnet_lite0.ssl", "efficientnet_lite0.scratch")


def _outputs(nb) -> str:
    """Text of every stream and text/plain output of the executed notebook."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _check_quickstart(runs: Path, text: str) -> None:
    assert "Full report:" in text
    assert (runs / "notebook" / "report" / "report.html").exists()


def _check_your_dicom_folder(runs: Path, text: str) -> None:
    from medtl.ingest import load_ledger
    from medtl.workspace import Workspace

    ws = Workspace(runs / "my-dicom")
    ledger = load_ledger(ws)
    quarantined = ledger[ledger["status"] == "quarantined"]
    assert len(quarantined) >= 3  # tiny.yaml plants 3 broken files (truncated, not DICOM, no pixel data)
    assert f"quarantined {len(quarantined)}" in text  # the accounting line
    assert all(reason.split(":")[0] in text for reason in quarantined["reason"])  # the quarantine table
    assert ws.manifest.exists()


def _check_compare_backbones(runs: Path, text: str) -> None:
    from mlflow.tracking import MlflowClient

    from medtl import tracking
    from medtl.config import TrackingConfig

    workdir = runs / "notebook"
    for name in BACKBONES:  # every scored candidate fine-tuned in its own workspace
        assert json.loads((workdir / "compare" / name / "finetune" / "model.json").read_text())["backbone"] == name
    assert "The selector picked" in text and "oracle (uses target labels):" in text and "HTML:" in text
    client = MlflowClient(tracking.tracking_uri(TrackingConfig(backend="mlflow"), workdir))
    logged = client.search_runs([client.get_experiment_by_name("medtl").experiment_id])
    parents = {r.info.run_name: r.info.run_id for r in logged if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"notebook", "compare-backbones"}  # run_pipeline's run, then the comparison's
    compared = [r for r in logged if r.data.tags.get("mlflow.parentRunId") == parents["compare-backbones"]]
    assert sorted(r.data.params["finetune.backbone"] for r in compared) == sorted(BACKBONES)
    assert all(r.info.status == "FINISHED" for r in logged)


CHECKS = {"quickstart": _check_quickstart, "your_dicom_folder": _check_your_dicom_folder,
          "compare_backbones": _check_compare_backbones}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The notebooks' run folder, inside a working directory that is not the repository (nothing lands there)."""
    cwd = tmp_path_factory.mktemp("notebooks")
    (cwd / "configs").symlink_to(ROOT / "configs")
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    tiny["adapt"]["methods"] = ["source_only", "adabn", "coral"]
    (cwd / "notebooks.yaml").write_text(yaml.safe_dump(tiny))
    return cwd / "runs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs_and_reads_the_config_variable(path: Path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"clear the outputs of {path.name}"
    assert nb.cells[0].cell_type == "markdown"  # says what the notebook is for before any code
    assert "MEDTL_NOTEBOOK_CONFIG" in code[0].source and "MEDTL_NOTEBOOK_RUNS" in code[0].source
    assert path.stem in CHECKS, f"add a check of what {path.name} produces to CHECKS"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_tiny_size(path: Path, runs: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MEDTL_CACHE", str(runs.parent / "cache"))
    monkeypatch.setenv("MEDTL_NOTEBOOK_CONFIG", str(runs.parent / "notebooks.yaml"))
    monkeypatch.setenv("MEDTL_NOTEBOOK_RUNS", str(runs))
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(runs.parent)}}).execute()
    CHECKS[path.stem](runs, _outputs(nb))
