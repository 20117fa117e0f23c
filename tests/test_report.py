"""Validation report: synthetic 3 hospitals x 3 models rendered end to end, its schema check, and the shift
diagnostics it shows."""

import copy
import functools
import json
import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from medtl.adapt.functional import median_heuristic_bandwidths, mk_mmd
from medtl.config import ReportConfig
from medtl.evaluate import report as report_module
from medtl.evaluate.report import REQUIRED_CONTEXT, REQUIRED_SECTIONS, ReportSchemaError, build_report, validate_report
from medtl.evaluate.shift import IMAGE_STATISTICS, image_statistics, shift_diagnostics

HOSPITALS = {"hospital_a": "source", "hospital_b": "external", "hospital_c": "target"}
MODELS = ("source_only", "adabn", "coral")  # the adaptation runs
DEPLOYED, FINETUNED = "deployed", "finetuned"  # the deployed model (adabn@epoch2, the EnsV pick) and the comparison
# class separation per (hospital, model): the target site loses signal, adaptation recovers part of it; the oracle
# (best target AUC, chosen with the target's labels) is coral, the label-free pick adabn
SIGNAL = {
    "hospital_a": {FINETUNED: 2.2, DEPLOYED: 2.1, "source_only": 2.2, "adabn": 2.1, "coral": 2.1},
    "hospital_b": {FINETUNED: 1.6, DEPLOYED: 1.6, "source_only": 1.6, "adabn": 1.6, "coral": 1.7},
    "hospital_c": {FINETUNED: 0.9, DEPLOYED: 1.4, "source_only": 0.9, "adabn": 1.4, "coral": 1.8},
}


PATIENT_ID = re.compile(r"hospital_[abc]-p\d{3}")


def make_predictions(seed: int = 0, patients_per_hospital: int = 70, image_dir=None) -> pd.DataFrame:
    """Every model scores the same images; patients have one or two images. With ``image_dir``, each image gets a
    stored 24 x 24 array, a UID-like de-identified id and the patient's sex."""
    rng = np.random.default_rng(seed)
    pixels = np.random.default_rng(seed + 1)  # its own stream: the scores must not depend on image_dir
    frames = []
    for hospital, role in HOSPITALS.items():
        images_per_patient = rng.integers(1, 3, patients_per_hospital)
        patient_ids = np.repeat([f"{hospital}-p{i:03d}" for i in range(patients_per_hospital)], images_per_patient)
        labels = np.repeat(rng.random(patients_per_hospital) < 0.4, images_per_patient).astype(int)
        sex = np.repeat(rng.choice(["F", "M"], patients_per_hospital), images_per_patient)
        noise = rng.normal(size=labels.size)
        extra = {}
        if image_dir is not None:
            ids = [f"2.25.{seed}{list(HOSPITALS).index(hospital) + 1}{i:020d}" for i in range(labels.size)]
            for image_id, label in zip(ids, labels):
                array = pixels.uniform(0, 0.6 + 0.4 * label, (1, 24, 24)).astype(np.float32)
                np.save(image_dir / f"{image_id}.npy", array)
            extra = {"image": [str(image_dir / f"{i}.npy") for i in ids], "image_id": ids, "sex": sex}
        for model in (FINETUNED, DEPLOYED, *MODELS):
            logit = SIGNAL[hospital][model] * (labels - 0.5) + noise + rng.normal(0, 0.3, labels.size)
            prob = 1 / (1 + np.exp(-logit))
            # the deployed rows carry the network's own probabilities too: sharper, i.e. less calibrated
            raw = {"raw_prob": 1 / (1 + np.exp(-2 * logit))} if model == DEPLOYED else {}
            frames.append(pd.DataFrame({"model": model, "hospital": hospital, "role": role,
                                        "patient_id": patient_ids, "label": labels, "prob": prob, **raw, **extra}))
    return pd.concat(frames, ignore_index=True)


@functools.lru_cache(maxsize=1)
def _shift() -> dict:
    """Image statistics of three simulated sites: hospital_c noisier and darker than the others."""
    rng = np.random.default_rng(3)
    features, groups = [], []
    for hospital, (level, noise) in {"hospital_a": (0.5, 0.02), "hospital_b": (0.5, 0.02),
                                     "hospital_c": (0.4, 0.08)}.items():
        for _ in range(30):
            ramp = level + 0.2 * np.sin(np.linspace(0, 3, 32))[None, :]
            smooth = np.clip(ramp + rng.normal(0, noise, (32, 32)), 0, 1)
            features.append(image_statistics(smooth))
            groups.append(hospital)
    return shift_diagnostics(np.stack(features), groups, "hospital_a", n_permutations=50)


def make_context() -> dict:
    return {
        "title": "Pneumothorax detector — multi-site validation",
        "intended_use": "Flags adult chest radiographs that may show a pneumothorax so that a radiologist reads "
                        "them first; it does not replace the radiologist's read.",
        "primary_model": DEPLOYED,
        "comparison_model": FINETUNED,
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
        "ingest": {"files_in": 1443, "ingested": 1440, "quarantined": 3, "duplicates": 0, "skipped": 0, "to_retry": 0,
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
        "adaptation": {"ran": True, "target_hospital": "hospital_c", "methods": ["source_only", "adabn", "coral"],
                       "deployed_candidate": "adabn@epoch2",
                       "notes": "AdaBN re-estimates BatchNorm statistics; CORAL aligns feature covariances.",
                       "selection": [
                           {"scorer": "ensv", "candidate": "adabn@epoch2", "target_auc": 0.861,
                            "auc_gap_to_oracle": 0.004, "chosen": True, "uses_target_labels": False},
                           {"scorer": "entropy", "candidate": "source_only@epoch1", "target_auc": 0.702,
                            "auc_gap_to_oracle": 0.163, "chosen": False, "uses_target_labels": False},
                           {"scorer": "dev", "candidate": None, "target_auc": None, "auc_gap_to_oracle": None,
                            "chosen": False, "uses_target_labels": False},
                           {"scorer": "oracle", "candidate": "coral@epoch1", "target_auc": 0.865,
                            "auc_gap_to_oracle": 0.0, "chosen": False, "uses_target_labels": True}]},
        "deployed": {"origin": {"stage": "adapt", "file": "adapt/chosen.safetensors", "notes": [],
                                "description": "adabn after epoch 2 adapted to hospital_c, chosen without "
                                               "hospital_c's labels by the ensv score", "candidate": "adabn@epoch2"},
                     "file": "deploy/model.safetensors", "sha256": "d" * 64, "backbone": "efficientnet_lite0.ssl",
                     "calibration": {"method": "temperature", "temperature": 1.9, "bias": [0.0, 0.0],
                                     "fitted_on": "source validation split", "nll_before": 0.41, "nll_after": 0.33},
                     "label_shift": {"method": "none", "applied": False, "hospital": "hospital_c"}},
        "data_use": make_data_use(),
        "limitations": ["Synthetic cohort: images are simulated, not clinical.",
                        "Labels of the target hospital were used only for evaluation."],
        "shift_diagnostics": copy.deepcopy(_shift()),
        "provenance": {"medtl_version": "0.1.0", "git_commit": None, "config_hash": "3f9a1c0d",
                       "created_at": "2025-01-01T00:00:00Z",
                       "sites": [{"hospital": h, "content_sha256": f"{i}" * 64,
                                  "study_dates": "2019-03-01 to 2021-06-30" if i == 0 else None}
                                 for i, h in enumerate(HOSPITALS)]},
    }


def make_data_use(**external_reads: int) -> dict:
    """What each stage read: SSL and selection the source (and SSL the target's unlabeled images), adaptation the
    source and the target, evaluation every hospital; ``external_reads`` adds reads of hospital_b by a stage."""
    labels = {"ssl": "self-supervised pretraining", "selection": "backbone selection", "finetuning": "fine-tuning",
              "adaptation": "adaptation", "threshold": "threshold and calibration",
              "prevalence": "target prevalence and label-free estimates", "evaluation": "evaluation",
              "loho": "leave-one-hospital-out (separate models)"}
    read = {"hospital_a": {"ssl": 300, "selection": 100, "finetuning": 100, "adaptation": 100, "threshold": 30,
                           "prevalence": 0, "evaluation": 50},
            "hospital_b": {"ssl": 0, "selection": 0, "finetuning": 0, "adaptation": 0, "threshold": 0, "prevalence": 0,
                           "evaluation": 160, **external_reads},
            "hospital_c": {"ssl": 320, "selection": 0, "finetuning": 0, "adaptation": 320, "threshold": 0,
                           "prevalence": 320, "evaluation": 160}}
    return {"stages": {k: {"label": v, "ran": k != "loho"} for k, v in labels.items()},
            "hospitals": [{"hospital": h, "role": HOSPITALS[h], "images": 480,
                           "read": {**read[h], "loho": None}} for h in HOSPITALS], "notes": []}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    predictions = make_predictions(image_dir=tmp_path_factory.mktemp("arrays"))
    return build_report(predictions, make_context(), ReportConfig(n_bootstrap=200), out)


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
    upper = data["adaptation"]["upper_bound"]
    assert upper["method"] == "coral" and upper["uses_target_labels"] is True
    assert data["context"]["cohort"][2]["prevalence"] is None
    assert data["settings"]["n_bootstrap"] == 200


def test_each_scorers_pick_is_shown_next_to_the_oracle(report):
    html = report.html_path.read_text(encoding="utf-8")
    table = html[html.index('id="selection-table"'):]
    table = table[:table.index("</table>")]
    rows = table.split("<tr")[2:]  # after the header row
    assert [r.split('<td class="name">')[1].split("<")[0] for r in rows] == ["ensv", "entropy", "dev", "oracle"]
    assert 'class="hl"' in rows[0] and "deployed" in rows[0] and "adabn@epoch2" in rows[0] and "0.861" in rows[0]
    assert "none (no candidate has this score)" in rows[2]
    assert "uses labels" in rows[3] and "uses labels" not in "".join(rows[:3])
    assert json.loads(report.json_path.read_text())["adaptation"]["selection"][0]["candidate"] == "adabn@epoch2"


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


def test_warns_when_the_deployed_adapted_model_does_not_beat_the_fine_tuned_one(tmp_path):
    predictions = make_predictions()
    on_target = predictions["hospital"] == "hospital_c"
    baseline = predictions.loc[on_target & (predictions["model"] == FINETUNED), "prob"].to_numpy()
    rng = np.random.default_rng(1)
    noisy = np.clip(baseline + rng.normal(0, 0.3, baseline.size), 0, 1)  # a strictly worse ranking
    predictions.loc[on_target & (predictions["model"] == DEPLOYED), "prob"] = noisy
    result = build_report(predictions, make_context(), ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    assert any(w.startswith("At hospital_c, the deployed adapted model does not beat the fine-tuned model")
               for w in result.metrics["warnings"])


@pytest.mark.parametrize("key", list(REQUIRED_CONTEXT))
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


# --------------------------------------------------------------------------------------- sections and schema


def test_every_required_section_is_in_json_and_html(report):
    data = json.loads(report.json_path.read_text(encoding="utf-8"))
    validate_report(data)
    assert set(REQUIRED_SECTIONS) <= set(data)
    html = report.html_path.read_text(encoding="utf-8")
    for section_id in ("summary", "intended-use", "data", "model", "negative-transfer", "hospitals", "fig-roc",
                       "fig-calibration", "operating-point", "subgroups", "shift", "adaptation", "failures",
                       "limitations", "tripod"):
        assert f'id="{section_id}"' in html, section_id
    assert "Flags adult chest radiographs" in html and "Placeholder text" not in html


@pytest.mark.parametrize("section", list(REQUIRED_SECTIONS))
def test_removing_any_required_section_is_refused_by_name(report, section):
    broken = copy.deepcopy(report.metrics)
    del broken[section]
    with pytest.raises(ReportSchemaError, match=f"missing required section '{section}'"):
        validate_report(broken)


def test_section_missing_a_key_is_named(report):
    broken = copy.deepcopy(report.metrics)
    del broken["operating_point"]["per_site"]
    with pytest.raises(ReportSchemaError, match=r"section 'operating_point' is missing key 'per_site'"):
        validate_report(broken)


def test_no_patient_identifiers_in_any_output(report):
    html = report.html_path.read_text(encoding="utf-8")
    assert not PATIENT_ID.search(html)
    assert not PATIENT_ID.search(report.json_path.read_text(encoding="utf-8"))
    assert not PATIENT_ID.search(report.summary_markdown)


def test_provenance_lists_code_version_and_site_hashes(report):
    provenance = report.metrics["data_provenance"]
    assert provenance["code"] == {"medtl_version": "0.1.0", "git_commit": None}
    assert [s["hospital"] for s in provenance["sites"]] == list(HOSPITALS)
    assert provenance["sites"][0]["content_sha256"] == "0" * 64
    html = report.html_path.read_text(encoding="utf-8")
    assert "2019-03-01 to 2021-06-30" in html and "not available (medtl not run from a git checkout)" in html


def test_provenance_without_a_site_entry_is_refused(tmp_path):
    context = make_context()
    del context["provenance"]["sites"][1]
    with pytest.raises(ValueError, match="no entry for hospital 'hospital_b'"):
        build_report(make_predictions(), context, ReportConfig(n_bootstrap=50), tmp_path)


def test_operating_point_counts_match_the_threshold(report):
    predictions = make_predictions()
    rows = predictions[(predictions["model"] == DEPLOYED) & (predictions["hospital"] == "hospital_b")]
    site = next(s for s in report.metrics["operating_point"]["per_site"] if s["hospital"] == "hospital_b")
    flagged = rows["prob"] >= 0.47
    assert site["tp"] == int((flagged & (rows["label"] == 1)).sum())
    assert site["fp"] == int((flagged & (rows["label"] == 0)).sum())
    assert site["tp"] + site["fn"] == int(rows["label"].sum())
    assert math.isclose(site["sensitivity"]["value"], site["tp"] / (site["tp"] + site["fn"]))


def test_subgroups_cover_site_vendor_sex_and_say_not_recorded_for_age(report):
    attributes = {a["attribute"]: a for a in report.metrics["subgroups"]["attributes"]}
    assert [g["group"] for g in attributes["hospital"]["groups"]] == list(HOSPITALS)
    assert {g["group"] for g in attributes["vendor"]["groups"]} == {"GE Healthcare", "SIEMENS",
                                                                     "Philips Medical Systems"}
    assert [g["group"] for g in attributes["sex"]["groups"]] == ["female", "male"]
    assert sum(g["n"] for g in attributes["sex"]["groups"]) == sum(g["n"] for g in attributes["hospital"]["groups"])
    assert attributes["age"]["recorded"] is False and attributes["age"]["groups"] == []
    for group in attributes["sex"]["groups"]:
        assert group["auc"]["ci_low"] <= group["auc"]["value"] <= group["auc"]["ci_high"]
    assert "not recorded — no age group is recorded" in report.html_path.read_text(encoding="utf-8")


def test_age_groups_from_years_and_dicom_age_strings(tmp_path):
    predictions = make_predictions()
    predictions["age"] = np.where(predictions.index % 3 == 0, "072Y", np.where(predictions.index % 3 == 1, 35, None))
    result = build_report(predictions, make_context(), ReportConfig(n_bootstrap=50), tmp_path)
    age = next(a for a in result.metrics["subgroups"]["attributes"] if a["attribute"] == "age")
    assert [g["group"] for g in age["groups"]] == ["age under 40", "age 65 and over", "not recorded"]


def test_failure_examples_are_the_most_confident_errors_with_thumbnails(report):
    failures = report.metrics["failure_examples"]
    assert failures["available"] and len(failures["false_positives"]) == 4 and len(failures["false_negatives"]) == 4
    predictions = make_predictions()
    rows = predictions[predictions["model"] == DEPLOYED]
    worst_fp = rows[(rows["label"] == 0) & (rows["prob"] >= 0.47)]["prob"].max()
    worst_fn = rows[(rows["label"] == 1) & (rows["prob"] < 0.47)]["prob"].min()
    assert failures["false_positives"][0]["prob"] == pytest.approx(worst_fp)
    assert failures["false_negatives"][0]["prob"] == pytest.approx(worst_fn)
    probs = [e["prob"] for e in failures["false_positives"]]
    assert probs == sorted(probs, reverse=True)
    for example in failures["false_positives"] + failures["false_negatives"]:
        assert example["thumbnail"].startswith("data:image/png;base64,")
        assert example["image_id"].startswith("2.25.") and set(example) >= {"hospital", "label", "prob"}
        assert "image" not in example  # the local path stays out of the report
    assert report.html_path.read_text(encoding="utf-8").count('alt="Most confident false') == 8


def test_failure_examples_without_images_say_why(tmp_path):
    result = build_report(make_predictions(), make_context(), ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    failures = result.metrics["failure_examples"]
    assert failures["available"] is False and "no image paths" in failures["reason"]
    assert "Not available." in result.html_path.read_text(encoding="utf-8")


def test_image_path_without_id_is_shown_as_a_hash(tmp_path):
    predictions = make_predictions(image_dir=tmp_path).drop(columns="image_id")
    result = build_report(predictions, make_context(), ReportConfig(n_bootstrap=50, pdf=False), tmp_path / "out")
    ids = [e["image_id"] for e in result.metrics["failure_examples"]["false_positives"]]
    assert all(re.fullmatch(r"img-[0-9a-f]{16}", i) for i in ids)
    assert str(tmp_path) not in result.html_path.read_text(encoding="utf-8")


def test_negative_transfer_block_is_rendered_and_warned(tmp_path):
    context = make_context()
    context["finetune"]["negative_transfer"] = {
        "checked": True, "transfer_val_auc": 0.81, "scratch_val_auc": 0.84, "delta": -0.03, "negative": True,
        "message": "efficientnet_lite0.ssl (full) is 0.030 AUC below efficientnet_lite0.scratch on validation: "
                   "negative transfer", "fallback_applied": True}
    result = build_report(make_predictions(), context, ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    assert result.metrics["negative_transfer"]["negative"] is True
    assert any(w.startswith("Negative transfer:") and "scratch was used instead" in w
               for w in result.metrics["warnings"])
    html = result.html_path.read_text(encoding="utf-8")
    assert "Negative transfer." in html and "0.840" in html and "-0.030" in html
    assert "negative_transfer" not in dict(result.metrics["model_development"]["finetune"])


def test_negative_transfer_absent_or_unchecked_says_not_checked(report, tmp_path):
    assert report.metrics["negative_transfer"]["checked"] is False
    assert "Not checked</strong>" in report.html_path.read_text(encoding="utf-8")
    context = make_context()
    context["finetune"]["negative_transfer"] = {"checked": False, "negative": None, "fallback_applied": False,
                                                "message": "not checked: finetune.scratch_baseline is false"}
    result = build_report(make_predictions(), context, ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    assert result.metrics["negative_transfer"]["message"] == "finetune.scratch_baseline is false"
    html = result.html_path.read_text(encoding="utf-8")
    assert "Not checked</strong> — finetune.scratch_baseline is false." in html


def test_default_intended_use_and_limitations_are_flagged(tmp_path):
    defaults = ReportConfig()
    context = make_context()
    context["intended_use"] = defaults.intended_use
    context["limitations"] = ["Synthetic cohort.", *defaults.limitations]
    result = build_report(make_predictions(), context, ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    assert result.metrics["intended_use"]["is_default"] is True
    assert [i["default"] for i in result.metrics["limitations"]["items"]] == [False, True, True, True]
    assert any("intended-use statement is medtl's placeholder" in w for w in result.metrics["warnings"])
    assert any(w.startswith("3 limitation(s) are medtl's placeholder") for w in result.metrics["warnings"])
    html = result.html_path.read_text(encoding="utf-8")
    assert "Placeholder text." in html and "[medtl default" not in html


def test_tripod_map_points_at_real_sections(report):
    items = report.metrics["tripod_ai"]["items"]
    assert len({i["item"].rstrip("abc") for i in items}) == 27
    html = report.html_path.read_text(encoding="utf-8")
    for item in items:
        if item["covered"]:
            assert f'id="{item["section"]}"' in html, item
    assert {i["item"] for i in items if not i["covered"]} >= {"17", "19", "8"}


def test_shift_section_names_what_differs(report):
    shift = report.metrics["shift_diagnostics"]
    by_site = {c["site"]: c for c in shift["comparisons"]}
    assert by_site["hospital_c"]["proxy_a_distance"] > by_site["hospital_b"]["proxy_a_distance"]
    html = report.html_path.read_text(encoding="utf-8")
    assert "clearly different" in html and "noise higher" in html


# --------------------------------------------------------------------------------------- PDF


def test_pdf_is_written(report):
    assert report.pdf_path is not None and report.pdf_renderer in {"xhtml2pdf", "chromium"}
    assert report.pdf_path.read_bytes()[:5] == b"%PDF-" and report.pdf_path.stat().st_size > 20_000


def test_report_survives_without_any_pdf_renderer(tmp_path, monkeypatch, caplog):
    (tmp_path / "report.pdf").write_bytes(b"%PDF- stale")

    def no_xhtml2pdf(html):
        raise ImportError("No module named 'xhtml2pdf'")

    monkeypatch.setattr(report_module, "_xhtml2pdf", no_xhtml2pdf)
    monkeypatch.setattr(report_module, "_chromium", lambda: None)
    with caplog.at_level(logging.WARNING, logger="medtl"):
        result = build_report(make_predictions(), make_context(), ReportConfig(n_bootstrap=50), tmp_path)
    assert result.pdf_path is None and result.pdf_renderer is None
    assert result.html_path.exists() and result.json_path.exists()
    assert not (tmp_path / "report.pdf").exists()  # no stale PDF next to a new report.json
    assert "PDF skipped" in caplog.text and "pip install xhtml2pdf" in caplog.text


# --------------------------------------------------------------------------------------- shift diagnostics


def test_image_statistics_see_noise_and_brightness():
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0.2, 0.8, 32), (32, 1))
    clean, noisy = image_statistics(ramp[None]), image_statistics(np.clip(ramp + rng.normal(0, 0.05, ramp.shape), 0, 1))
    names = list(IMAGE_STATISTICS)
    assert clean[names.index("noise")] == pytest.approx(0.0, abs=1e-9)  # a linear ramp has no noise
    assert noisy[names.index("noise")] == pytest.approx(0.05, rel=0.2)
    assert image_statistics(ramp + 0.1)[names.index("brightness")] > clean[names.index("brightness")]
    volume = image_statistics(np.stack([ramp] * 5)[None])
    assert volume.shape == (len(IMAGE_STATISTICS),)
    with pytest.raises(ValueError, match="NaN"):
        image_statistics(np.full((8, 8), np.nan))


def test_shift_diagnostics_separate_shifted_from_same_distribution():
    rng = np.random.default_rng(0)
    features = np.vstack([rng.normal(size=(60, 4)), rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + [4, 0, 0, 0]])
    groups = ["ref"] * 60 + ["same"] * 60 + ["moved"] * 60
    result = shift_diagnostics(features, groups, "ref", names=["a", "b", "c", "d"], n_permutations=100)
    same, moved = sorted(result["comparisons"], key=lambda c: c["site"] != "same")
    assert same["proxy_a_distance"] < 0.6 and same["mmd_p_value"] > 0.05
    assert moved["proxy_a_distance"] > 1.5 and moved["mmd_p_value"] < 0.02
    assert moved["differences"][0]["feature"] == "a" and moved["differences"][0]["effect_size"] > 1.5
    assert result["n_reference"] == 60 and result["reference"] == ["ref"]


def test_shift_mmd_matches_mk_mmd_on_standardised_features():
    rng = np.random.default_rng(1)
    features = np.vstack([rng.normal(size=(20, 3)), rng.normal(size=(25, 3)) + 0.5])
    result = shift_diagnostics(features, ["r"] * 20 + ["s"] * 25, "r", n_permutations=0)
    z = (features - features.mean(0)) / features.std(0)
    zr, zs = torch.tensor(z[:20], dtype=torch.float32), torch.tensor(z[20:], dtype=torch.float32)
    expected = float(mk_mmd(zr, zs, median_heuristic_bandwidths(zr, zs)))
    assert result["comparisons"][0]["mmd2"] == pytest.approx(expected, rel=1e-5)
    assert math.isnan(result["comparisons"][0]["mmd_p_value"])


def test_shift_diagnostics_reject_a_missing_reference():
    with pytest.raises(ValueError, match="no rows belong to the reference"):
        shift_diagnostics(np.zeros((4, 2)), ["a", "a", "b", "b"], "c")
