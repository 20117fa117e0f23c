"""The acquisition-shortcut audit: label and hospital predicted from the acquisition fields alone, by patient."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medtl.evaluate.shortcut
from medtl.config import DeidConfig, IngestConfig, load_config
from medtl.evaluate.shortcut import (ACQUISITION_FIELDS, LABEL_SHORTCUT_AUC, acquisition_features, acquisition_table,
                                     audit_hospital, audit_label, grouped_folds, shortcut_audit)
from medtl.ingest import ingest_folder, load_manifest
from medtl.synth import write_cohort
from medtl.workspace import Workspace

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def manifest_frame(n: int = 160, *, shortcut: bool, hospital: str = "site", seed: int = 0,
                   images_per_patient: int = 1) -> pd.DataFrame:
    """Manifest rows of one hospital, like the native-resolution paediatric pneumonia collection when ``shortcut``:
    pneumonia images on smaller, wider matrices (medians 1168 x 776 vs 1654 x 1357, width x height), with spread.
    Without it, every image's matrix comes from one distribution whatever its label. Other fields are as a
    PNG-derived collection has them: constant or not recorded."""
    rng = np.random.default_rng(seed)
    n_patients = -(-n // images_per_patient)
    patient_label = rng.permutation(np.arange(n_patients) % 2)
    patient = np.repeat(np.arange(n_patients), images_per_patient)[:n]
    label = patient_label[patient]
    finding = label == 1 if shortcut else np.zeros(n, dtype=bool)
    # spread chosen so that the matrix alone gives an AUC of about 0.95, near the collection's 0.925
    width = np.where(finding, rng.normal(1168, 320, n), rng.normal(1654, 400, n))
    height = np.where(finding, rng.normal(776, 264, n), rng.normal(1357, 330, n))
    return pd.DataFrame({
        "hospital": hospital, "label": pd.array(label, dtype="Int64"),
        "patient_id": [f"{hospital}-p{p}" for p in patient],
        "rows": np.maximum(height.round(), 64).astype(np.int64),
        "columns": np.maximum(width.round(), 64).astype(np.int64),
        "pixel_spacing_mm": np.nan, "bits_stored": 8, "photometric": "MONOCHROME2", "view_position": "",
        "body_part": "CHEST", "vendor": "", "model": "", "sex": "", "age": np.nan})


def test_the_pneumonia_collection_property_is_found_and_warned_about() -> None:
    audit = audit_label(manifest_frame(shortcut=True), n_bootstrap=300)
    assert audit["predictable"] and 0.85 < audit["auc"]["value"] < 1.0
    assert audit["auc"]["ci_low"] > LABEL_SHORTCUT_AUC and audit["auc"]["ci_high"] <= 1.0
    assert {audit["field_auc"][0]["field"], audit["field_auc"][1]["field"]} <= {"rows", "columns", "aspect_ratio"}
    assert audit["fields_used"] == ["rows", "columns", "aspect_ratio"]
    assert (audit["n"], audit["n_patients"], audit["n_positive"], audit["cv"]["splitter"]) == (
        160, 160, 80, "StratifiedGroupKFold")
    json.dumps(audit, allow_nan=False)  # JSON-ready: no NaN, no numpy types

    full = shortcut_audit(manifest_frame(shortcut=True), n_bootstrap=300)
    assert len(full["warnings"]) == 1
    warning = full["warnings"][0]
    assert warning.startswith("At site, the label can be predicted from the acquisition alone (AUC 0.9")
    assert "mainly rows (image height in pixels)" in warning or "mainly columns" in warning
    assert "Zech et al. 2018" in warning and "acquired alike" in warning and "Zech" in full["reference"]


def test_an_acquisition_independent_of_the_label_is_not_predictable() -> None:
    for seed in range(3):
        audit = audit_label(manifest_frame(shortcut=False, seed=seed), n_bootstrap=300, seed=seed)
        assert not audit["predictable"] and audit["auc"]["value"] < LABEL_SHORTCUT_AUC
        assert audit["auc"]["ci_low"] < 0.5 < audit["auc"]["ci_high"]
        assert shortcut_audit(manifest_frame(shortcut=False, seed=seed), n_bootstrap=100)["warnings"] == []


def test_folds_split_by_patient() -> None:
    frame = manifest_frame(120, shortcut=False, images_per_patient=4)
    folds, cv = grouped_folds(frame["label"].to_numpy(), frame["patient_id"].to_numpy(), n_splits=5)
    assert cv == {"splitter": "StratifiedGroupKFold", "n_splits": 5}
    patients = frame["patient_id"].to_numpy()
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(frame)))  # every image scored exactly once
    for train, test in folds:
        assert not set(patients[train]) & set(patients[test])


def test_a_patient_s_identical_images_do_not_leak_across_folds() -> None:
    # Four identical images per patient, on a device of the patient's own (a per-patient value, e.g. a bedside unit):
    # with images of one patient on both sides of a split, the one-hot device would give the label away.
    frame = manifest_frame(160, shortcut=False, images_per_patient=4, seed=3)
    frame["model"] = "unit-" + frame["patient_id"]
    frame["rows"], frame["columns"] = 2000, 2000
    grouped = audit_label(frame, n_bootstrap=0)
    assert grouped["fields_used"] == ["model"] and not grouped["predictable"]
    assert grouped["auc"]["value"] == pytest.approx(0.5, abs=0.1)
    by_image = audit_label(frame.assign(patient_id=[f"image-{i}" for i in range(len(frame))]), n_bootstrap=0)
    assert by_image["auc"]["value"] > 0.95  # what grouping by patient prevents


def test_hospital_audit_tells_matrices_apart_and_not_identical_acquisitions() -> None:
    a, b = manifest_frame(80, shortcut=False, hospital="a", seed=1), manifest_frame(80, shortcut=False, hospital="b",
                                                                                     seed=2)
    alike = audit_hospital(pd.concat([a, b]), n_bootstrap=200)
    assert not alike["predictable"] and alike["auc"]["value"] < LABEL_SHORTCUT_AUC
    assert alike["auc_kind"] == "binary" and alike["n_per_hospital"] == {"a": 80, "b": 80}
    b_other = b.assign(rows=b["rows"] // 2, columns=b["columns"] // 2, vendor="SIEMENS")
    apart = audit_hospital(pd.concat([a, b_other]), n_bootstrap=200)
    assert apart["predictable"] and apart["auc"]["value"] > 0.99 and apart["auc"]["ci_low"] > 0.95
    assert apart["field_auc"][0]["field"] in {"rows", "columns", "vendor"}
    assert not apart["prevalence_differs"] and apart["prevalence"] == {"a": 0.5, "b": 0.5}

    c = manifest_frame(80, shortcut=False, hospital="c", seed=4).assign(rows=500, columns=400)
    three = audit_hospital(pd.concat([a, b_other, c]), n_bootstrap=200)
    assert three["auc_kind"] == "one-vs-rest macro" and three["auc"]["value"] > 0.99
    assert three["auc"]["ci_low"] is not None and three["auc"]["ci_low"] <= three["auc"]["value"]
    json.dumps(three, allow_nan=False)


def test_identifiable_hospitals_with_different_prevalences_warn() -> None:
    a = manifest_frame(120, shortcut=False, hospital="a", seed=1)
    b = manifest_frame(120, shortcut=False, hospital="b", seed=2)
    b = b.assign(rows=b["rows"] // 2, label=pd.array((np.arange(120) % 5 == 0).astype(int), dtype="Int64"))
    audit = shortcut_audit(pd.concat([a, b]), n_bootstrap=200)
    hospital = audit["hospital"]
    assert hospital["predictable"] and hospital["prevalence_differs"] and hospital["prevalence_p_value"] < 0.001
    assert hospital["prevalence"] == {"a": 0.5, "b": 0.2}
    assert hospital["label_auc_from_hospital"]["value"] > 0.6  # the hospital alone gives the label away, in part
    assert [w[:44] for w in audit["warnings"]] == ["The hospital can be identified from the acqu"]
    assert "a 50 %, b 20 %" in audit["warnings"][0]
    # the same prevalence: identifiable, but nothing for a model to gain from knowing the hospital
    assert shortcut_audit(pd.concat([a, b.assign(label=a["label"].to_numpy())]), n_bootstrap=100)["warnings"] == []
    # a model trained on one of them cannot learn the other's prevalence: no hospital warning, the audit still shown
    alone = shortcut_audit(pd.concat([a, b]), n_bootstrap=100, pooled=["a"])
    assert alone["warnings"] == [] and alone["hospital"]["predictable"]
    pooled = shortcut_audit(pd.concat([a, b]), n_bootstrap=100, pooled=["a", "b"])["warnings"]
    assert [w[:44] for w in pooled] == ["The hospital can be identified from the acqu"]


def test_constant_and_unrecorded_fields_are_dropped_with_a_reason() -> None:
    frame = manifest_frame(40, shortcut=True)
    table, dropped = acquisition_table(frame)
    assert list(table.columns) == ["rows", "columns", "aspect_ratio"]
    assert dropped == {
        "pixel_spacing_mm": "not recorded in these images", "bits_stored": "the same value (8) in every image",
        "photometric": "the same value (MONOCHROME2) in every image", "view_position": "not recorded in these images",
        "body_part": "the same value (CHEST) in every image", "vendor": "not recorded in these images",
        "model": "not recorded in these images", "sex": "not recorded in these images",
        "age": "not recorded in these images"}
    assert set(dropped) | set(table.columns) == set(ACQUISITION_FIELDS)
    # recorded for some images only: kept, with a missing indicator
    partly = frame.assign(age=np.where(np.arange(40) % 2, 7.0, np.nan), bits_stored=np.where(np.arange(40) < 20, 0, 8))
    features = acquisition_features(partly)
    assert {"age", "bits_stored"} <= set(features.fields_used)
    assert "missingindicator_age" in features.feature_names and features.matrix.shape[0] == 40
    assert np.isfinite(features.matrix).all()
    assert acquisition_features(frame.drop(columns=["rows", "columns"])).fields_dropped["aspect_ratio"] == (
        "not a manifest column")


def test_audits_that_cannot_run_say_why() -> None:
    frame = manifest_frame(40, shortcut=True)
    one_class = audit_label(frame.assign(label=1))
    assert one_class["reason"] == "only one class (1) among the 40 images: nothing to predict"
    assert one_class["auc"] == {"value": None, "ci_low": None, "ci_high": None} and not one_class["predictable"]
    assert "at least 10" in audit_label(frame.head(6))["reason"]
    lone = frame.copy()
    lone.loc[lone.index[1:], "label"] = 0
    lone.loc[lone.index[0], "label"] = 1
    assert "needs at least 2 patients of each class" in audit_label(lone)["reason"]
    nothing = audit_label(frame.assign(rows=100, columns=100))
    assert nothing["reason"].startswith("no acquisition field differs") and nothing["fields_used"] == []
    unlabeled = frame.assign(label=pd.array([pd.NA] * 20 + list(frame["label"][20:]), dtype="Int64"))
    assert audit_label(unlabeled, n_bootstrap=0)["n"] == 20  # rows without a label are ignored
    with pytest.raises(ValueError, match="audits one hospital"):
        audit_label(pd.concat([frame, frame.assign(hospital="other")]))
    single = shortcut_audit(frame, n_bootstrap=0)
    assert single["hospital"]["reason"].startswith("fewer than two hospitals")
    json.dumps(single, allow_nan=False)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(medtl.evaluate.shortcut, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _ingested_manifest(config: str, tmp_path: Path, **synth_overrides) -> pd.DataFrame:
    synth = load_config(CONFIGS / config).synth
    synth = synth.model_copy(update={"unlabeled_per_hospital": 0, "broken_files": 0, "workers": 1, **synth_overrides})
    ws = Workspace(tmp_path)
    write_cohort(synth, ws.dicom)
    deid = DeidConfig(site_aliases=synth.site_aliases())  # the manifest names the hospitals as written
    ingest_folder(IngestConfig(input_dir=ws.dicom, image_size=16, workers=1, deid=deid), ws)
    return load_manifest(ws)


def test_end_to_end_the_shortcut_cohort_warns_and_the_tiny_cohort_does_not(tmp_path: Path) -> None:
    manifest = _ingested_manifest("shortcut.yaml", tmp_path / "shortcut")
    audit = shortcut_audit(manifest, n_bootstrap=200)
    by_hospital = {a["hospital"]: a for a in audit["label"]}
    source = by_hospital["St. Aurelia General Hospital"]
    assert source["predictable"] and source["auc"]["value"] > 0.95 and source["n"] == 120
    assert {f["field"] for f in source["field_auc"][:5]} >= {"rows", "columns", "view_position"}
    assert "photometric" in source["fields_dropped"]  # one detector at this hospital
    assert not by_hospital["Northbridge University Clinic"]["predictable"]
    assert not by_hospital["Harbor Valley Medical Center"]["predictable"]
    assert len(audit["warnings"]) == 2
    assert audit["warnings"][0].startswith("At St. Aurelia General Hospital, the label can be predicted")
    assert audit["warnings"][1].startswith("The hospital can be identified from the acquisition alone")
    assert audit["hospital"]["prevalence_differs"]  # 50 %, 30 %, 50 %
    # configs/tiny.yaml's hospitals (no shortcut), with as many labeled images for as stable an audit
    tiny = shortcut_audit(_ingested_manifest("tiny.yaml", tmp_path / "tiny", labeled_per_hospital=120),
                          n_bootstrap=200)
    assert len(tiny["label"]) == 3 and not any(a["predictable"] for a in tiny["label"])
    assert tiny["hospital"]["predictable"] and not tiny["hospital"]["prevalence_differs"]
    assert tiny["warnings"] == []
