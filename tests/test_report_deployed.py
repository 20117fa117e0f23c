"""The report describes the deployed model: nothing headlined is chosen on the data it is measured on, every stage's
reads are stated, and sections whose stage did not run say so (report-level, synthetic predictions)."""

from __future__ import annotations

import copy
import json

import pytest

from medtl.config import ReportConfig
from medtl.evaluate.metrics import expected_calibration_error
from medtl.evaluate.report import _fmt_ci, build_report, validate_report

from tests.test_report import DEPLOYED, FINETUNED, make_context, make_data_use, make_predictions


def _build(tmp_path, context=None, predictions=None):
    return build_report(make_predictions() if predictions is None else predictions,
                        make_context() if context is None else context, ReportConfig(n_bootstrap=100, pdf=False),
                        tmp_path)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("deployed"))


def test_the_oracle_pick_is_never_headlined(report):
    """The target's best run by its labels (coral) differs from the label-free pick that is deployed (adabn): the
    summary, the cards, the markdown and the warnings quote the deployed model, the oracle only its labelled row."""
    metrics = report.metrics
    adaptation = metrics["adaptation"]
    upper, deployed = adaptation["upper_bound"], adaptation["deployed"]
    assert upper["method"] == "coral" and upper["uses_target_labels"] is True
    assert adaptation["methods"]["coral"]["auc"]["value"] > deployed["auc"]["value"]  # they do differ
    oracle_auc = _fmt_ci(adaptation["methods"]["coral"]["auc"])
    deployed_auc = _fmt_ci(metrics["per_hospital"]["hospital_c"]["auc"])
    assert deployed["auc"]["value"] == pytest.approx(metrics["per_hospital"]["hospital_c"]["auc"]["value"])
    text = " ".join(metrics["summary"]["paragraphs"])
    assert deployed_auc in text and oracle_auc not in text and "coral" not in text
    assert "upper bound" in text
    html = report.html_path.read_text(encoding="utf-8")
    cards = html[html.index('<div class="cards">'):html.index('</section>', html.index('<div class="cards">'))]
    assert "coral" not in cards and f"{metrics['per_hospital']['hospital_c']['auc']['value']:.3f}" in cards
    assert not any("coral" in w for w in metrics["warnings"])
    head = report.summary_markdown.split("**Adaptation")[0]
    assert "coral" not in head
    assert "| coral (upper bound: uses target labels) |" in report.summary_markdown
    assert "upper bound · uses labels" in html
    data = json.loads(report.json_path.read_text())
    assert data["primary_model"] == DEPLOYED and data["comparison_model"] == FINETUNED
    assert data["per_hospital"]["hospital_c"]["auc"] == data["adaptation"]["deployed"]["auc"] | {
        "value": data["per_hospital"]["hospital_c"]["auc"]["value"]}


def test_every_headline_section_describes_the_deployed_model(report):
    metrics = report.metrics
    predictions = make_predictions()
    deployed = predictions[predictions["model"] == DEPLOYED]
    for hospital, entry in metrics["per_hospital"].items():
        assert entry["n"] == int((deployed["hospital"] == hospital).sum())
    assert metrics["subgroups"]["model"] == DEPLOYED
    assert metrics["deployed_model"]["model"] == DEPLOYED
    assert metrics["deployed_model"]["origin"]["candidate"] == "adabn@epoch2"
    html = report.html_path.read_text(encoding="utf-8")
    assert 'id="deployed-model"' in html and "deploy/model.safetensors" in html
    assert "temperature on the source validation split: temperature 1.900" in html


def test_predictive_values_brier_and_recalibration_are_shown(report):
    metrics = report.metrics
    for site in metrics["operating_point"]["per_site"]:
        flagged = site["tp"] + site["fp"]
        assert site["ppv"]["value"] == pytest.approx(site["tp"] / flagged)
        assert site["npv"]["value"] == pytest.approx(site["tn"] / (site["tn"] + site["fn"]))
    for entry in metrics["per_hospital"].values():
        assert 0 <= entry["brier"]["value"] <= 1
    recalibration = metrics["recalibration"]
    assert recalibration["available"] and len(recalibration["sites"]) == 3
    predictions = make_predictions()
    for row in recalibration["sites"]:  # the network's ECE is that of raw_prob, the deployed one that of prob
        rows = predictions[(predictions["model"] == DEPLOYED) & (predictions["hospital"] == row["hospital"])]
        assert row["ece_network"]["value"] == pytest.approx(expected_calibration_error(rows["label"], rows["raw_prob"]))
        assert row["ece_deployed"]["value"] == pytest.approx(expected_calibration_error(rows["label"], rows["prob"]))
    html = report.html_path.read_text(encoding="utf-8")
    assert 'id="recalibration-table"' in html and "<th class=\"num\">PPV</th>" in html


def test_data_use_table_and_the_external_claim(report, tmp_path):
    assert report.metrics["data_use"]["external_unseen"] is True
    html = report.html_path.read_text(encoding="utf-8")
    assert 'id="data-use-table"' in html and "No stage that built the deployed model read an image of an external" \
        in html
    context = make_context()
    context["data_use"] = make_data_use(ssl=45)  # SSL read 45 of the external hospital's images
    breached = _build(tmp_path, context)
    assert breached.metrics["data_use"]["external_unseen"] is False
    assert any(w.startswith("hospital_b is called external, but self-supervised pretraining read 45")
               for w in breached.metrics["warnings"])
    assert "An external hospital was read by a stage" in breached.html_path.read_text(encoding="utf-8")


def test_evaluation_and_leave_one_hospital_out_reads_do_not_break_the_external_claim(tmp_path):
    context = make_context()
    context["data_use"] = make_data_use()
    context["data_use"]["stages"]["loho"]["ran"] = True
    context["data_use"]["hospitals"][1]["read"]["loho"] = 90
    assert _build(tmp_path, context).metrics["data_use"]["external_unseen"] is True


def test_without_adaptation_the_sections_say_so(tmp_path):
    """A single-hospital study: no target, no adaptation; the report is complete and says why."""
    predictions = make_predictions()
    predictions = predictions[predictions["model"].isin([DEPLOYED, FINETUNED])].copy()
    predictions.loc[predictions["hospital"] == "hospital_c", "role"] = "external"
    context = make_context()
    context["cohort"][2]["role"] = "external"
    context["adaptation"] = {"ran": False, "target_hospital": None, "methods": [],
                             "reason": "single-hospital study (no target hospital): no adaptation"}
    context["deployed"]["origin"] = {"stage": "finetune", "file": "finetune/model.safetensors", "notes": [],
                                     "description": "the fine-tuned model"}
    result = _build(tmp_path, context, predictions)
    validate_report(json.loads(result.json_path.read_text()))
    adaptation = result.metrics["adaptation"]
    assert adaptation["ran"] is False and adaptation["methods"] == {} and adaptation["upper_bound"] is None
    assert result.metrics["figures"]["roc_adaptation"] is None
    html = result.html_path.read_text(encoding="utf-8")
    assert "No adaptation.</strong> single-hospital study" in html
    assert any("No adaptation: single-hospital study" in p for p in result.metrics["summary"]["paragraphs"])
    assert "No adaptation: single-hospital study" in result.summary_markdown


def test_adaptation_that_ran_needs_its_methods_and_one_that_did_not_lists_none(tmp_path):
    context = make_context()
    context["adaptation"]["methods"] = []
    with pytest.raises(ValueError, match="non-empty list of model names when adaptation ran"):
        _build(tmp_path, context)
    context = make_context()
    context["adaptation"]["ran"] = False
    with pytest.raises(ValueError, match="does not run|did not run"):
        _build(tmp_path, context)


def test_sections_without_their_analysis_say_not_available(report):
    # the fixture's context holds no prevalence, performance estimates or audit: each section says so
    for section in ("label_shift", "performance_estimates", "shortcut_audit"):
        assert report.metrics[section]["available"] is False and report.metrics[section]["reason"]
    html = report.html_path.read_text(encoding="utf-8")
    for section_id in ("label-shift", "shortcuts", "expected"):
        assert f'id="{section_id}"' in html


def _with_analyses() -> dict:
    context = make_context()
    interval = {"value": 0.61, "ci_low": 0.55, "ci_high": 0.67}
    context["prevalence"] = {
        "hospital_a": {"role": "source", "images": "evaluated images (labels unused)",
                       "bbse": {"method": "bbse", "prevalence": 0.41, "ci_low": 0.33, "ci_high": 0.49,
                                "source_prevalence": 0.4},
                       "em": {"method": "em", "prevalence": 0.40, "ci_low": 0.34, "ci_high": 0.47,
                              "source_prevalence": 0.4}},
        "hospital_c": {"role": "target", "images": "unlabeled images",
                       "bbse": {"method": "bbse", "prevalence": None, "ci_low": None, "ci_high": None,
                                "reason": "the confusion matrix is singular"},
                       "em": {"method": "em", "prevalence": 0.71, "ci_low": 0.64, "ci_high": 0.78,
                              "source_prevalence": 0.4}}}
    context["performance_estimates"] = {
        "hospital_c": {"role": "target", "images": "unlabeled images",
                       "atc": {"method": "atc", "auc": interval, "accuracy": interval, "n": 320, "confidence": 0.95,
                               "details": {"source_auc": 0.95}},
                       "agreement": {"method": "agreement", "auc": {**interval, "value": 0.64},
                                     "accuracy": interval, "n": 320, "confidence": 0.95}}}
    context["shortcut_audit"] = {
        "label": [{"hospital": "hospital_a", "n": 160, "auc": {"value": 0.93, "ci_low": 0.9, "ci_high": 0.96},
                   "predictable": True, "field_auc": [{"field": "columns", "auc": 0.91}]}],
        "hospital": {"auc": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}, "field_auc": [], "fields_used": ["rows"]},
        "threshold": 0.7, "confidence": 0.95, "reference": "Zech et al. 2018",
        "warnings": ["At hospital_a, the label can be predicted from the acquisition alone"]}
    return context


def test_label_shift_estimates_and_shortcut_audit_render_and_warn(tmp_path):
    result = _build(tmp_path, _with_analyses())
    metrics = result.metrics
    sites = {s["hospital"]: s for s in metrics["label_shift"]["sites"]}
    assert sites["hospital_a"]["true_prevalence"] == pytest.approx(
        metrics["per_hospital"]["hospital_a"]["n_positive"] / metrics["per_hospital"]["hospital_a"]["n"])
    assert metrics["label_shift"]["source_prevalence"] == 0.4
    warnings = metrics["warnings"]
    assert any(w.startswith("hospital_c: the finding's prevalence, estimated without labels") for w in warnings)
    assert not any(w.startswith("hospital_a: the finding's prevalence") for w in warnings)  # 0.40 inside its CI
    assert any("Expected AUC at hospital_c 0.61" in w for w in warnings)  # far below the source's 0.95
    assert sum("Expected AUC at hospital_c" in w for w in warnings) == 1  # once per site
    assert "At hospital_a, the label can be predicted from the acquisition alone" in warnings
    paragraphs = " ".join(metrics["summary"]["paragraphs"])
    assert "prevalence at hospital_c is 71 %" in paragraphs and "not corrected" in paragraphs
    assert ("hospital_c AUC 0.610 [0.550–0.670] (ATC), AUC 0.640 [0.550–0.670] (agreement of the adaptation "
            "candidates)") in paragraphs
    html = result.html_path.read_text(encoding="utf-8")
    assert "the confusion matrix is singular" in html and "predictable</span>" in html
    table = html[html.index('id="expected-table"'):]
    assert table[:table.index("</table>")].count("agreement of the adaptation candidates") == 1


def test_an_atc_estimate_without_auc_is_read_as_accuracy_and_warns_on_it(tmp_path):
    """ATC out of its temperature reach gives no AUC (the scores moved past the threshold, the ranking may hold):
    the summary quotes its accuracy, and the warning compares that with the source validation accuracy."""
    context = _with_analyses()
    nan = float("nan")
    atc = context["performance_estimates"]["hospital_c"]["atc"]
    atc["auc"] = {"value": nan, "ci_low": nan, "ci_high": nan}
    atc["accuracy"] = {"value": 0.43, "ci_low": 0.39, "ci_high": 0.48}
    atc["details"] = {"source_auc": 0.95, "source_accuracy": 0.90}
    context["performance_estimates"]["hospital_c"]["agreement"]["auc"] = {"value": 0.93, "ci_low": 0.9,
                                                                          "ci_high": 0.95}
    metrics = _build(tmp_path, context).metrics
    paragraphs = " ".join(metrics["summary"]["paragraphs"])
    assert "hospital_c accuracy at the operating threshold 0.430 [0.390–0.480] (ATC; no AUC estimate)" in paragraphs
    warnings = [w for w in metrics["warnings"] if "hospital_c" in w and "Expected" in w]
    assert len(warnings) == 1 and warnings[0].startswith("Expected accuracy at the operating threshold at hospital_c")
    assert "source validation accuracy 0.90" in warnings[0]


def test_schema_requires_the_new_sections(report):
    for section in ("deployed_model", "data_use", "recalibration", "label_shift", "shortcut_audit",
                    "performance_estimates"):
        broken = copy.deepcopy(report.metrics)
        del broken[section]
        with pytest.raises(Exception, match=section):
            validate_report(broken)


def test_the_fine_tuned_model_before_adaptation_is_a_comparison_row(report):
    adaptation = report.metrics["adaptation"]
    before = adaptation["before_adaptation"]
    predictions = make_predictions()
    rows = predictions[(predictions["model"] == FINETUNED) & (predictions["hospital"] == "hospital_c")]
    assert before["model"] == FINETUNED and before["n"] == len(rows)
    assert adaptation["deployed"]["comparison_auc"] == before["auc"]
    assert "finetuned (before adaptation)" in report.html_path.read_text(encoding="utf-8")


def test_prevalence_estimates_that_cannot_both_hold_are_not_reported_as_an_estimate(tmp_path):
    from medtl.deploy import label_shift_inconsistency

    bbse = {"method": "bbse", "prevalence": 0.72, "ci_low": 0.66, "ci_high": 0.78}
    em = {"method": "em", "prevalence": 0.45, "ci_low": 0.40, "ci_high": 0.50}
    assert "disagree" in label_shift_inconsistency(bbse, em)
    assert label_shift_inconsistency(bbse, {**em, "ci_high": 0.70}) is None  # overlapping intervals
    assert "edge" in label_shift_inconsistency(bbse, {**em, "prevalence": 1.0, "ci_low": 0.99, "ci_high": 1.0})
    assert label_shift_inconsistency({**bbse, "prevalence": None}, em) is None  # one estimate: nothing to compare
    context = _with_analyses()
    context["prevalence"]["hospital_c"] = {**context["prevalence"]["hospital_c"], "bbse": bbse, "em": em,
                                           "inconsistent": label_shift_inconsistency(bbse, em)}
    result = _build(tmp_path, context)
    assert any(w.startswith("hospital_c: the finding's prevalence cannot be estimated without labels: BBSE")
               for w in result.metrics["warnings"])
    assert any("cannot be estimated without its labels" in p for p in result.metrics["summary"]["paragraphs"])
    assert "no estimate holds" in result.html_path.read_text(encoding="utf-8")
