"""Leave-one-hospital-out in the pipeline and the validation report: the optional report section (HTML, JSON twin,
schema check), the opt-in pipeline step and its cache keys. No training and no Prefect server: the report is built
from synthetic predictions, the flow's wiring is checked on its plain Python functions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from medtl.config import ReportConfig, load_config
from medtl.evaluate.report import ReportSchemaError, build_report, validate_report
from tests.test_report import HOSPITALS, make_context, make_predictions

ROOT = Path(__file__).resolve().parents[1]
# hospital_a is the source (the primary model trained on it), hospital_b external, hospital_c the target
SUMMARY = {
    "backbone": "efficientnet_lite0.imagenet", "strategy": "full",
    "held_out": {
        "hospital_a": {"train_hospitals": ["hospital_b", "hospital_c"], "train_images": 131, "val_images": 29,
                       "test_images": 107, "val_auc": 0.81, "auc": 0.7734, "auc_ci": [0.6812, 0.8531],
                       "seconds": 12.5},
        "hospital_b": {"train_hospitals": ["hospital_a", "hospital_c"], "train_images": 140, "val_images": 30,
                       "test_images": 101, "val_auc": 0.84, "auc": 0.6421, "auc_ci": [0.5307, 0.7468],
                       "seconds": 11.0},
        "hospital_c": {"train_hospitals": ["hospital_a", "hospital_b"], "train_images": 128, "val_images": 27,
                       "test_images": 104, "val_auc": None, "auc": None, "auc_ci": [None, None], "seconds": 9.1},
    },
}


def _context(summary: dict | None = SUMMARY) -> dict:
    context = make_context()
    if summary is not None:
        context["leave_one_hospital_out"] = copy.deepcopy(summary)
    return context


@pytest.fixture(scope="module")
def with_loho(tmp_path_factory):
    return build_report(make_predictions(), _context(), ReportConfig(n_bootstrap=50, pdf=False),
                        tmp_path_factory.mktemp("with"))


@pytest.fixture(scope="module")
def without_loho(tmp_path_factory):
    return build_report(make_predictions(), _context(None), ReportConfig(n_bootstrap=50, pdf=False),
                        tmp_path_factory.mktemp("without"))


# --------------------------------------------------------------------------------------------------- report


def test_section_has_each_held_out_hospitals_numbers_in_json(with_loho):
    data = json.loads(with_loho.json_path.read_text(encoding="utf-8"))
    validate_report(data)
    section = data["leave_one_hospital_out"]
    assert (section["backbone"], section["strategy"], section["comparison_model"]) == (
        "efficientnet_lite0.imagenet", "full", "deployed")
    assert section["confidence"] == 0.95 and section["bootstrap_unit"] == "patient"
    rows = {row["hospital"]: row for row in section["held_out"]}
    assert list(rows) == list(SUMMARY["held_out"])
    for hospital, entry in SUMMARY["held_out"].items():
        row = rows[hospital]
        assert row["role"] == HOSPITALS[hospital]
        assert row["train_hospitals"] == entry["train_hospitals"]
        assert (row["train_images"], row["val_images"], row["test_images"]) == (
            entry["train_images"], entry["val_images"], entry["test_images"])
        assert [row["auc"][k] for k in ("value", "ci_low", "ci_high")] == [entry["auc"], *entry["auc_ci"]]
        # next to the same hospital's AUC of the report's own model
        assert row["comparison"]["auc"] == data["per_hospital"][hospital]["auc"]
        assert row["comparison"]["trained_on_this_hospital"] == (HOSPITALS[hospital] == "source")
    # a backbone other than the fine-tuned one is said, not hidden
    assert any("different recipes" in note for note in section["notes"])
    assert any("hospital_b AUC 0.642 [0.531–0.747]" in p for p in data["summary"]["paragraphs"])
    item = next(i for i in data["tripod_ai"]["items"] if i["item"] == "23")
    assert item["see_also"] == [{"section": "loho", "section_title": "13. Leave-one-hospital-out (multi-source "
                                                                     "training)"}]


def test_section_states_the_ci_level_the_summary_was_computed_at(tmp_path):
    # a summary written before it recorded its level keeps 0.95 (the fixture above); one at 0.9 says 90 %
    result = build_report(make_predictions(), _context({**SUMMARY, "confidence": 0.9}),
                          ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    assert json.loads(result.json_path.read_text(encoding="utf-8"))["leave_one_hospital_out"]["confidence"] == 0.9
    assert "(90 % CIs)" in result.json_path.read_text(encoding="utf-8")


def test_section_is_in_the_html_in_plain_words(with_loho):
    html = with_loho.html_path.read_text(encoding="utf-8")
    assert '<section id="loho">' in html and "<h2>13. Leave-one-hospital-out (multi-source training)</h2>" in html
    assert "<h2>14. Failure examples</h2>" in html and "<h2>16. TRIPOD+AI map</h2>" in html
    assert "how does the model do at a hospital it has never seen?" in html
    table = html[html.index('id="loho-table"'):]
    table = table[:table.index("</table>")]
    rows = table.split("<tr>")[2:]  # after the header row
    assert [r.split('<td class="name">')[1].split("<")[0] for r in rows] == list(SUMMARY["held_out"])
    assert "hospital_b, hospital_c" in rows[0] and ">131<" in rows[0] and "0.773" in rows[0]
    assert "[0.681–0.853]" in rows[0]
    assert "n/a" in rows[2] and "has no AUC there (its labeled images are all of one class)" in html  # hospital_c
    assert "a model trained on hospital_a, hospital_c (140 images) and tested on 101 images from hospital_b" in html
    assert 'href="#loho">13. Leave-one-hospital-out' in html  # from the TRIPOD+AI map
    assert "**Leave-one-hospital-out**" in with_loho.summary_markdown
    assert "| hospital_b | hospital_a, hospital_c | 0.642 [0.531–0.747] |" in with_loho.summary_markdown


def test_section_is_absent_without_a_summary(without_loho):
    data = json.loads(without_loho.json_path.read_text(encoding="utf-8"))
    validate_report(data)  # optional: the required sections are enough
    assert "leave_one_hospital_out" not in data
    assert all(also["section"] != "loho" for item in data["tripod_ai"]["items"] for also in item["see_also"])
    html = without_loho.html_path.read_text(encoding="utf-8")
    assert 'id="loho"' not in html and "Leave-one-hospital-out" not in html
    assert "<h2>13. Failure examples</h2>" in html and "<h2>15. TRIPOD+AI map</h2>" in html
    assert "Leave-one-hospital-out" not in without_loho.summary_markdown


def test_schema_check_validates_the_section_when_present(with_loho):
    broken = copy.deepcopy(with_loho.metrics)
    del broken["leave_one_hospital_out"]["held_out"][1]["comparison"]
    with pytest.raises(ReportSchemaError, match=r"held_out\[1\] is missing key 'comparison'"):
        validate_report(broken)
    broken = copy.deepcopy(with_loho.metrics)
    del broken["leave_one_hospital_out"]["backbone"]
    with pytest.raises(ReportSchemaError, match="section 'leave_one_hospital_out' is missing key 'backbone'"):
        validate_report(broken)
    broken["leave_one_hospital_out"] = {}
    with pytest.raises(ReportSchemaError, match="must be a non-empty dict"):
        validate_report(broken)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["held_out"]["hospital_b"].pop("auc_ci"), r"\['hospital_b'\] is missing required key 'auc_ci'"),
    (lambda s: s.pop("strategy"), "missing required key 'strategy'"),
    (lambda s: s["held_out"]["hospital_a"].update(train_hospitals=["hospital_a"]), "other hospitals"),
])
def test_malformed_summary_is_refused_by_name(tmp_path, change, message):
    summary = copy.deepcopy(SUMMARY)
    change(summary)
    with pytest.raises(ValueError, match=message):
        build_report(make_predictions(), _context(summary), ReportConfig(n_bootstrap=50, pdf=False), tmp_path)
    assert not (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------------------------------- flow


def _config(tmp_path: Path, loho: bool):
    return load_config(ROOT / "configs" / "tiny.yaml", {"workdir": str(tmp_path / "run"),
                                                        "tracking": {"backend": "none"},
                                                        "report": {"leave_one_hospital_out": loho}})


@pytest.mark.parametrize("enabled", [False, True])
def test_pipeline_runs_loho_after_finetune_only_when_enabled(tmp_path, monkeypatch, enabled):
    """The flow's own function with every stage flow replaced by a recorder: the order, without running one."""
    import flows.pipeline as pipeline_module

    ran: list[str] = []
    for name in ("synth_flow", "ingest_flow", "pretrain_flow", "select_flow", "finetune_flow", "loho_flow",
                 "adapt_flow", "deploy_flow", "evaluate_flow", "report_flow"):
        monkeypatch.setattr(pipeline_module, name,
                            lambda _name=name, **kwargs: ran.append(_name) or {"summary": "", "html": ""})
    pipeline_module.pipeline.fn(config=_config(tmp_path, enabled))
    expected = ["synth_flow", "ingest_flow", "pretrain_flow", "select_flow", "finetune_flow", "adapt_flow",
                "deploy_flow", "evaluate_flow", "report_flow"]
    if enabled:
        expected.insert(expected.index("adapt_flow"), "loho_flow")
    assert ran == expected


def test_loho_task_makes_one_medtl_call_and_its_table(tmp_path, monkeypatch):
    from flows.artifacts import loho_rows
    from flows.stages import loho_task
    from medtl import stages

    config = _config(tmp_path, True)
    seen, levels = [], []
    monkeypatch.setattr(stages, "run_leave_one_hospital_out",
                        lambda cfg, data, ws, n_bootstrap, confidence: seen.append((cfg, data, ws.root, n_bootstrap))
                        or levels.append(confidence) or SUMMARY)
    assert loho_task.fn(config) == SUMMARY
    assert seen == [(config.finetune, config.data, Path(config.workdir), config.report.n_bootstrap)]
    assert levels == [config.report.confidence]  # the report's CI level, recorded in the summary
    rows = loho_rows(SUMMARY)
    assert [r["held_out"] for r in rows] == list(SUMMARY["held_out"])
    assert rows[1] == {"held_out": "hospital_b", "trained_on": "hospital_a, hospital_c", "train_images": 140,
                       "test_images": 101, "auc": 0.6421, "auc_ci_low": 0.5307, "auc_ci_high": 0.7468,
                       "val_auc": 0.84}
    assert rows[2]["auc"] is None and rows[2]["auc_ci_low"] is None


def test_cache_keys_of_loho_and_of_the_report(tmp_path):
    from flows.caching import STAGES, cache_key, outputs_present

    config = _config(tmp_path, True)
    loho = tmp_path / "run" / "loho"
    assert STAGES["loho"].outputs == ("loho/summary.json", "loho/predictions.parquet")
    assert not outputs_present("loho", config)
    loho.mkdir(parents=True)
    (loho / "predictions.parquet").write_bytes(b"rows")

    report_key = cache_key("report", "report", {"config": config})
    (loho / "summary.json").write_text(json.dumps(SUMMARY))
    assert outputs_present("loho", config)
    with_summary = cache_key("report", "report", {"config": config})
    assert with_summary != report_key  # a new summary rebuilds the report, and so does a changed one
    (loho / "summary.json").write_text(json.dumps({**SUMMARY, "strategy": "lp_ft"}))
    assert cache_key("report", "report", {"config": config}) != with_summary

    def changed(section: str, **fields):
        return config.model_copy(update={section: getattr(config, section).model_copy(update=fields)})

    key = cache_key("loho", "loho", {"config": config})
    assert key == cache_key("loho", "loho", {"config": changed("report", title="another title")})
    assert key != cache_key("loho", "loho", {"config": changed("report", n_bootstrap=500)})
    assert key != cache_key("loho", "loho", {"config": changed("report", confidence=0.9)})
    assert key != cache_key("loho", "loho", {"config": changed("finetune", strategy="full")})
