"""Validation report: synthetic 3 hospitals x 3 models rendered end to end."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from medtl.config import ReportConfig
from medtl.evaluate.report import build_report

HOSPITALS = {"hospital_a": "source", "hospital_b": "external", "hospital_c": "target"}
MODELS = ("source_only", "adabn", "coral")
# class separation per (hospital, model): the target site loses signal, adaptation recovers part of it
SIGNAL = {
    "hospital_a": {"source_only": 2.2, "adabn": 2.1, "coral": 2.1},
    "hospital_b": {"source_only": 1.6, "adabn": 1.6, "coral": 1.7},
    "hospital_c": {"source_only": 0.9, "adabn": 1.4, "coral": 1.6},
}


def make_predictions(seed: int = 0, patients_per_hospital: int = 70) -> pd.DataFrame:
    """Every model scores the same images; patients have one or two images."""
    rng = np.random.default_rng(seed)
    frames = []
    for hospital, role in HOSPITALS.items():
        images_per_patient = rng.integers(1, 3, patients_per_hospital)
        patient_ids = np.repeat([f"{hospital}-p{i:03d}" for i in range(patients_per_hospital)], images_per_patient)
        labels = np.repeat(rng.random(patients_per_hospital) < 0.4, images_per_patient).astype(int)
        noise = rng.normal(size=labels.size)
        for model in MODELS:
            logit = SIGNAL[hospital][model] * (labels - 0.5) + noise + rng.normal(0, 0.3, labels.size)
            frames.append(pd.DataFrame({"model": model, "hospital": hospital, "role": role,
                                        "patient_id": patient_ids, "label": labels,
                                        "prob": 1 / (1 + np.exp(-logit))}))
    return pd.concat(frames, ignore_index=True)


def make_context() -> dict:
    return {
        "title": "Pneumothorax detector — multi-site validation",
        "primary_model": "source_only",
        "threshold": 0.47,
        "threshold_source": "the hospital_a validation split (Youden index)",
        "cohort": [
            {"hospital": "hospital_a", "role": "source", "vendor": "GE Healthcare", "model": "Definium 8000",
             "n_images": 480, "n_patients": 410, "n_labeled": 160, "prevalence": 0.5},
            {"hospital": "hospital_b", "role": "external", "vendor": "SIEMENS", "model": "Ysio Max",
             "n_images": 480, "n_patients": 402, "n_labeled": 160, "prevalence": 0.4},
            {"hospital": "hospital_c", "role": "target", "vendor": "Philips Medical Systems",
             "model": "DigitalDiagnost", "n_images": 480, "n_patients": 395, "n_labeled": 160, "prevalence": None},
        ],
        "ingest": {"files_in": 1443, "ingested": 1440, "quarantined": 3, "duplicates": 0,
                   "quarantine_reasons": {"not a DICOM file": 1, "truncated pixel data": 1, "no pixel data": 1}},
        "backbone_ranking": [
            {"backbone": "efficientnet_lite0.imagenet", "logme": -0.412, "linear_probe_auc": 0.861, "rank": 2,
             "chosen": False},
            {"backbone": "efficientnet_lite0.ssl", "logme": -0.351, "linear_probe_auc": 0.884, "rank": 1,
             "chosen": True, "pretrain_epochs": 5},
            {"backbone": "efficientnet_lite0.scratch", "logme": -0.690, "linear_probe_auc": 0.642, "rank": 3,
             "chosen": False},
        ],
        "finetune": {"backbone": "efficientnet_lite0.ssl", "freeze_groups": 2, "trainable_params": 2_871_234,
                     "epochs": 8, "lr": 1e-3, "weight_decay": 1e-4, "best_val_auc": 0.912},
        "adaptation": {"target_hospital": "hospital_c", "methods": ["source_only", "adabn", "coral"],
                       "notes": "AdaBN re-estimates BatchNorm statistics; CORAL aligns feature covariances."},
        "limitations": ["Synthetic cohort: images are simulated, not clinical.",
                        "Labels of the target hospital were used only for evaluation."],
        "provenance": {"medtl_version": "0.1.0", "config_hash": "3f9a1c0d", "created_at": "2025-01-01T00:00:00Z",
                       "data_hashes": {"manifest": "ab12cd34", "predictions": "ef56ab78"}},
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(make_predictions(), make_context(), ReportConfig(n_bootstrap=200), out)


def test_html_is_self_contained_and_complete(report):
    html = report.html_path.read_text(encoding="utf-8")
    for word in [*HOSPITALS, *MODELS, "ROC", "Calibration", "Youden index", "efficientnet_lite0.ssl"]:
        assert word in html, word
    assert html.count('<img src="data:image/png;base64,') >= 3
    assert "<script" not in html and 'href="http' not in html and 'src="http' not in html
    assert "[" in html and "–" in html  # intervals rendered as value [low–high]


def test_json_twin_has_metrics_with_cis_and_context(report):
    data = json.loads(report.json_path.read_text(encoding="utf-8"))
    assert data == report.metrics
    assert set(data["per_hospital"]) == set(HOSPITALS)
    for hospital, entry in data["per_hospital"].items():
        auc = entry["auc"]
        assert entry["role"] == HOSPITALS[hospital]
        assert 0.5 < auc["value"] <= 1 and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    methods = data["adaptation"]["methods"]
    assert set(methods) == set(MODELS)
    assert "delta_auc_vs_baseline" in methods["coral"] and "delta_auc_vs_baseline" not in methods["source_only"]
    assert data["adaptation"]["best_method"] in {"adabn", "coral"}
    assert data["context"]["cohort"][2]["prevalence"] is None
    assert data["settings"]["n_bootstrap"] == 200


def test_summary_markdown_has_headline_table(report):
    md = report.summary_markdown
    assert "| Hospital |" in md and all(h in md for h in HOSPITALS)
    assert "Adaptation on hospital_c" in md


def test_nan_metrics_become_null_in_json(tmp_path):
    predictions = make_predictions()
    external = predictions["hospital"] == "hospital_b"
    predictions.loc[external, "label"] = 1  # single class: AUC undefined there
    result = build_report(predictions, make_context(), ReportConfig(n_bootstrap=50), tmp_path)
    data = json.loads(result.json_path.read_text())
    assert data["per_hospital"]["hospital_b"]["auc"]["value"] is None
    assert any("hospital_b" in w and "undefined" in w for w in data["warnings"])
    assert not math.isnan(data["per_hospital"]["hospital_a"]["auc"]["value"])


def test_warns_when_adaptation_does_not_help(tmp_path):
    predictions = make_predictions()
    on_target = predictions["hospital"] == "hospital_c"
    baseline = predictions.loc[on_target & (predictions["model"] == "source_only"), "prob"].to_numpy()
    rng = np.random.default_rng(1)
    for model in ("adabn", "coral"):  # the baseline's scores plus noise: a strictly worse ranking
        noisy = np.clip(baseline + rng.normal(0, 0.3, baseline.size), 0, 1)
        predictions.loc[on_target & (predictions["model"] == model), "prob"] = noisy
    result = build_report(predictions, make_context(), ReportConfig(n_bootstrap=50), tmp_path)
    assert any(w.startswith("Adaptation did not beat source_only") for w in result.metrics["warnings"])


@pytest.mark.parametrize("key", ["title", "threshold", "cohort", "adaptation", "limitations"])
def test_missing_context_key_is_named(tmp_path, key):
    context = make_context()
    del context[key]
    with pytest.raises(ValueError, match=f"'{key}'"):
        build_report(make_predictions(), context, ReportConfig(n_bootstrap=50), tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_missing_nested_key_is_named(tmp_path):
    context = make_context()
    del context["ingest"]["duplicates"]
    with pytest.raises(ValueError, match=r"context\['ingest'\] is missing required key 'duplicates'"):
        build_report(make_predictions(), context, ReportConfig(n_bootstrap=50), tmp_path)


def test_method_without_target_predictions_is_rejected(tmp_path):
    context = make_context()
    context["adaptation"]["methods"].append("dann")
    with pytest.raises(ValueError, match="'dann'"):
        build_report(make_predictions(), context, ReportConfig(n_bootstrap=50), tmp_path)
