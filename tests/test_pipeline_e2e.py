"""The whole pipeline under Prefect at tiny size: DICOM → ingest → SSL → select → finetune → adapt → report."""

import json
from pathlib import Path

import pandas as pd
import pytest

from medtl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = ("St. Aurelia General Hospital", "Northbridge University Clinic", "Harbor Valley Medical Center")


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_pipeline_flow_end_to_end(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    from flows.pipeline import pipeline

    config = load_config(ROOT / "configs" / "tiny.yaml", {"workdir": str(tmp_path / "run")})
    result = pipeline(config=config)

    html = Path(result["html"])
    assert html.exists() and html.stat().st_size > 10_000
    text = html.read_text()
    for hospital in HOSPITALS:
        assert hospital in text
    methods = {"source_only", "adabn", "tent", "coral", "mmd", "dann", "ot", "pseudo_label"}
    for method in methods:
        assert method in text

    report = json.loads(Path(result["json"]).read_text())
    assert set(report["per_hospital"]) == set(HOSPITALS)
    assert set(report["adaptation"]["methods"]) == methods

    ranking = json.loads((tmp_path / "run" / "select" / "ranking.json").read_text())
    assert {r["backbone"] for r in ranking["ranking"]} == {
        "efficientnet_lite0.imagenet", "efficientnet_lite0.ssl", "efficientnet_lite0.scratch"}
    card = json.loads((tmp_path / "run" / "weights" / "efficientnet_lite0.ssl.json").read_text())
    assert card["method"] == "simclr" and len(card["data_sha256"]) == 64

    ledger_counts = report["context"]["ingest"]
    assert ledger_counts["files_in"] == (ledger_counts["ingested"] + ledger_counts["quarantined"]
                                         + ledger_counts["duplicates"])
    assert ledger_counts["quarantined"] == 3 and ledger_counts["duplicates"] >= 1

    predictions = pd.read_parquet(tmp_path / "run" / "adapt" / "predictions.parquet")
    assert predictions["prob"].between(0, 1).all()
