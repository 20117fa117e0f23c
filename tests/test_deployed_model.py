"""The deployed model at stage level: which model is deployed and when, its one file, its operating point and
prior correction, what each stage read, and a single-hospital study run stage by stage as the README shows (one
tiny cohort per module: ingest → fine-tune → adapt → deploy → report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from medtl import cli, deploy, stages
from medtl.config import PipelineConfig, load_config
from medtl.evaluate.metrics import youden_threshold
from medtl.evaluate.report import validate_report
from medtl.models import load_model
from medtl.train.inference import positive_probability
from medtl.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def _config(root: Path, **overrides) -> PipelineConfig:
    base = {"workdir": str(root), "finetune": {"backbone": "test_efficientnet.scratch", "strategy": "full",
                                               "lp_epochs": 2, "scratch_baseline": False,
                                               "train": {"epochs": 1, "batch_size": 8, "progress": False}},
            "select": {"candidates": ["efficientnet_lite0.imagenet"]},
            "adapt": {"methods": ["source_only", "adabn", "coral"],
                      "train": {"epochs": 1, "batch_size": 8, "progress": False}},
            "report": {"n_bootstrap": 50, "pdf": False}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(ROOT / "configs" / "tiny.yaml", base)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, Workspace]:
    root = tmp_path_factory.mktemp("deployed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE", str(root / "cache"))
        config = _config(root / "run")
        ws = Workspace(config.workdir)
        stages.run_synth(config.synth, ws)
        stages.run_ingest(config.ingest, ws)
        stages.run_finetune(config.finetune, config.data, ws)
        stages.run_adapt(config.adapt, config.data, ws)
        deploy.run_deploy(config, ws)
    return config, ws


def _copy(ws: Workspace, root: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    copy = Workspace(root)
    shutil.copytree(ws.root, copy.root, ignore=shutil.ignore_patterns("dicom"))
    monkeypatch.setenv("MEDTL_CACHE", str(root.parent / "cache"))
    return copy


def test_adapts_pick_is_deployed_as_one_file_that_loads_alone(adapted, tmp_path) -> None:
    config, ws = adapted
    card = json.loads((ws.deploy / "model.json").read_text())
    selection = json.loads((ws.adapt / "selection.json").read_text())
    assert card["origin"]["stage"] == "adapt" and card["origin"]["candidate"] == selection["chosen"]["candidate"]
    # the file alone, moved away from the workspace and every other weights file, rebuilds the model
    alone = tmp_path / "elsewhere" / "deployed.safetensors"
    alone.parent.mkdir()
    shutil.copy(ws.deploy / "model.safetensors", alone)
    model, stored = load_model(alone)
    assert stored["threshold"] == card["threshold"] and stored["origin"] == card["origin"]  # the card in the file
    adapted_model, _ = stages.load_adapted(ws)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted_model(x))


def test_predictions_threshold_and_calibration_describe_the_deployed_model(adapted) -> None:
    config, ws = adapted
    model, card = deploy.load_deployed(ws)
    manifest = stages.load_split_manifest(ws, config.data)
    rows = stages.evaluation_rows(manifest)
    predictions = pd.read_parquet(ws.deploy / "predictions.parquet")
    assert set(predictions["model"]) == {"deployed"} and len(predictions) == len(rows)
    prob = positive_probability(model, stages._eval_loader(rows, model, config.data))
    np.testing.assert_allclose(predictions["raw_prob"], prob, atol=1e-5)
    np.testing.assert_allclose(predictions["prob"], predictions["raw_prob"])  # no recalibration, no correction
    source_val = manifest[(manifest["role"] == "source") & (manifest["split"] == "val")]
    val_prob = positive_probability(model, stages._eval_loader(source_val, model, config.data))
    assert card["threshold"] == pytest.approx(youden_threshold(source_val["label"].astype(int), val_prob))
    assert card["calibration"] == {"method": "none"} and card["label_shift"]["applied"] is False
    assert card["images_read"]["threshold_and_calibration"] == stages.images_read(source_val)
    analysis = json.loads((ws.deploy / "analysis.json").read_text())
    target = config.data.target_hospital
    assert analysis["prevalence"][target]["images"] == "unlabeled images"
    assert set(analysis["performance_estimates"][target]) >= {"atc", "agreement"}


def test_recalibration_and_the_prior_correction_change_the_target_probabilities(adapted, tmp_path,
                                                                                monkeypatch) -> None:
    config, ws = adapted
    copy = _copy(ws, tmp_path / "corrected", monkeypatch)
    corrected = config.model_copy(update={
        "workdir": copy.root, "adapt": config.adapt.model_copy(update={"label_shift": "em"}),
        "report": config.report.model_copy(update={"recalibrate": "bcts"})})
    assert not deploy.is_current(corrected, copy)  # other settings: deploy/ is out of date
    card = deploy.run_deploy(corrected, copy)
    assert card["calibration"]["method"] == "bcts" and card["label_shift"]["applied"] is True
    predictions = pd.read_parquet(copy.deploy / "predictions.parquet")
    at_target = predictions["hospital"] == config.data.target_hospital
    assert not np.allclose(predictions.loc[at_target, "prob"], predictions.loc[at_target, "raw_prob"])
    # elsewhere only the calibration acts: a monotone map, so each site's ranking is the network's
    for hospital, rows in predictions[~at_target].groupby("hospital"):
        assert (np.argsort(rows["prob"].to_numpy(), kind="stable")
                == np.argsort(rows["raw_prob"].to_numpy(), kind="stable")).all(), hospital
    assert card["label_shift"]["target_prior"] == pytest.approx(
        json.loads((copy.deploy / "analysis.json").read_text())["prevalence"][config.data.target_hospital]["em"][
            "prevalence"])
    assert deploy.is_current(corrected, copy)


def test_fine_tuning_again_deploys_the_fine_tuned_model_until_adapt_reruns(adapted, tmp_path, monkeypatch) -> None:
    config, ws = adapted
    copy = _copy(ws, tmp_path / "retuned", monkeypatch)
    config = config.model_copy(update={"workdir": copy.root})
    tuned = load_file(str(copy.finetune / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tuned.items()},
              str(copy.finetune / "model.safetensors"))
    origin = deploy.deployed_origin(config, copy)
    assert origin.stage == "finetune" and "adapted from another fine-tuned model" in origin.notes[0]
    assert not deploy.is_current(config, copy)
    stages.run_adapt(config.adapt, config.data, copy)
    assert deploy.deployed_origin(config, copy).stage == "adapt"


def test_the_report_runs_deploy_when_it_is_out_of_date_and_describes_that_model(adapted, tmp_path,
                                                                               monkeypatch) -> None:
    config, ws = adapted
    copy = _copy(ws, tmp_path / "report", monkeypatch)
    config = config.model_copy(update={"workdir": copy.root})
    shutil.rmtree(copy.deploy)
    result = stages.run_report(config, copy)
    report = json.loads(Path(result["json"]).read_text())
    validate_report(report)
    card = json.loads((copy.deploy / "model.json").read_text())
    assert report["primary_model"] == "deployed" and report["comparison_model"] == "finetuned"
    assert report["deployed_model"]["origin"]["candidate"] == card["origin"]["candidate"]
    assert report["deployed_model"]["threshold"] == card["threshold"] == report["settings"]["threshold"]
    assert report["adaptation"]["ran"] is True and report["adaptation"]["deployed"]["candidate"] == card["origin"][
        "candidate"]
    use = {row["hospital"]: row["read"] for row in report["data_use"]["hospitals"]}
    assert use[config.data.target_hospital]["adaptation"] > 0 and use[config.data.target_hospital]["finetuning"] == 0
    assert all(read["finetuning"] == 0 for h, read in use.items() if h not in config.data.source_hospitals)
    assert report["data_use"]["external_unseen"] is True
    assert report["shortcut_audit"]["available"] and report["label_shift"]["available"]


def test_pretraining_reads_no_evaluated_image_and_no_external_hospital_by_default(adapted) -> None:
    config, ws = adapted
    manifest = stages.load_split_manifest(ws, config.data)
    rows = stages.pretraining_rows(manifest, config.data, None)
    evaluated = set(stages.evaluation_rows(manifest)["content_hash"])
    assert evaluated.isdisjoint(rows["content_hash"])
    assert set(rows["hospital"]) == {*config.data.source_hospitals, config.data.target_hospital}
    assert (rows.loc[rows["hospital"] == config.data.target_hospital, "split"] == "unlabeled").all()
    external = sorted(set(manifest["hospital"]) - set(rows["hospital"]))
    assert external  # tiny.yaml's third hospital
    listed = stages.pretraining_rows(manifest, config.data, [*config.data.source_hospitals, *external])
    assert set(listed["hospital"]) == {*config.data.source_hospitals, *external}
    assert evaluated.isdisjoint(listed["content_hash"])  # even when listed: never an evaluated image
    with pytest.raises(ValueError, match="not in the manifest"):
        stages.pretraining_rows(manifest, config.data, ["Nowhere Hospital"])


def test_a_single_hospital_study_stage_by_stage_gives_a_complete_report(tmp_path, monkeypatch, capsys) -> None:
    """ingest → pretrain → select → finetune → report, as the README lists them, with no target hospital."""
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    config_path = tmp_path / "single.yaml"
    source = load_config(ROOT / "configs" / "tiny.yaml").data.source_hospitals
    config_path.write_text(json.dumps({
        "workdir": str(tmp_path / "run"),
        "synth": {**json.loads(load_config(ROOT / "configs" / "tiny.yaml").synth.model_dump_json()),
                  "unlabeled_per_hospital": 0},
        "data": {"source_hospitals": source, "target_hospital": None, "image_size": 32},
        "pretrain": {"arch": "efficientnet_lite0", "train": {"epochs": 1, "batch_size": 16, "progress": False}},
        "finetune": {"strategy": "full", "train": {"epochs": 1, "batch_size": 8, "progress": False}},
        "report": {"n_bootstrap": 50, "pdf": False}, "tracking": {"backend": "none"}}))
    for command in ("synth", "ingest", "pretrain", "select", "finetune", "report"):
        assert cli.main([command, "--config", str(config_path)]) == 0, capsys.readouterr().err
    ws = Workspace(tmp_path / "run")
    report = json.loads((ws.report / "report.json").read_text())
    validate_report(report)
    assert report["adaptation"]["ran"] is False and "single-hospital study" in report["adaptation"]["reason"]
    assert report["deployed_model"]["origin"]["stage"] == "finetune"
    assert {m["role"] for m in report["per_hospital"].values()} == {"source", "external"}
    ssl = json.loads((ws.pretrain / "card.json").read_text())["images_read"]
    assert set(ssl) == set(source)  # no target to read, and no external hospital
    assert report["data_use"]["external_unseen"] is True
    assert report["label_shift"]["available"] and report["performance_estimates"]["available"]


def test_selection_sees_the_target_when_there_is_one(adapted, tmp_path, monkeypatch) -> None:
    config, ws = adapted
    copy = _copy(ws, tmp_path / "select", monkeypatch)
    candidates = ["efficientnet_lite0.imagenet", "test_efficientnet.scratch"]
    cfg = config.select.model_copy(update={"candidates": candidates})
    ranking = stages.run_select(cfg, config.data, copy)
    block = ranking["target_aware"]
    assert block["target_hospital"] == config.data.target_hospital and block["scorer"] == "ensv"
    assert block["source_only_best"] in candidates
    rows = ranking["ranking"]
    assert [r["rank"] for r in rows] == [1, 2] and sum(r["chosen"] for r in rows) == 1
    assert rows[0]["backbone"] == ranking["best"]
    assert all({"source_rank", "target_ensv", "target_divergence", "target_rank"} <= set(r) for r in rows)
    target = ranking["images_read"][config.data.target_hospital]
    manifest = stages.load_split_manifest(copy, config.data)
    assert target == int(((manifest["role"] == "target") & (manifest["split"] == "unlabeled")).sum())
    torch.manual_seed(1)  # the caller's random state does not reach the scratch candidate's weights
    plain = stages.run_select(cfg.model_copy(update={"target_aware": False}), config.data, copy)
    assert plain["target_aware"] is None and config.data.target_hospital not in plain["images_read"]
    assert plain["best"] == block["source_only_best"]


@pytest.mark.parametrize("target", ["Harbor Valley Medical Center", None])
def test_the_pipeline_deploys_after_adapt_and_adapts_only_with_a_target(tmp_path, monkeypatch, target) -> None:
    """The Prefect pipeline's own function with every stage flow replaced by a recorder, and run_pipeline's."""
    import flows.pipeline as pipeline_module

    ran: list[str] = []
    flows = ("synth_flow", "ingest_flow", "pretrain_flow", "select_flow", "finetune_flow", "adapt_flow", "deploy_flow",
             "evaluate_flow", "report_flow")
    for name in flows:
        monkeypatch.setattr(pipeline_module, name,
                            lambda _name=name, **kwargs: ran.append(_name) or {"summary": "", "html": ""})
    config = _config(tmp_path / "run", data={"target_hospital": target}, select={"target_aware": None},
                     tracking={"backend": "none"})
    pipeline_module.pipeline.fn(config=config)
    # no pretrain: the module's config has no self-supervised candidate
    assert ran == [f for f in flows if f != "pretrain_flow" and (target is not None or f != "adapt_flow")]

    called: list[str] = []
    for name in ("run_synth", "run_ingest", "run_pretrain", "run_select", "run_finetune", "run_adapt", "run_report"):
        monkeypatch.setattr(stages, name, lambda *a, _name=name, **k: called.append(_name) or {})
    monkeypatch.setattr(deploy, "run_deploy", lambda *a, **k: called.append("run_deploy") or {})
    stages.run_pipeline(config)
    assert called == [c for c in ("run_synth", "run_ingest", "run_select", "run_finetune", "run_adapt", "run_deploy",
                                  "run_report") if target is not None or c != "run_adapt"]


def test_no_prior_correction_when_the_two_estimates_cannot_both_hold(adapted, tmp_path, monkeypatch) -> None:
    config, ws = adapted
    copy = _copy(ws, tmp_path / "guarded", monkeypatch)
    corrected = config.model_copy(update={"workdir": copy.root,
                                          "adapt": config.adapt.model_copy(update={"label_shift": "em"})})
    disagreeing = {"bbse": {"method": "bbse", "prevalence": 0.2, "ci_low": 0.1, "ci_high": 0.3},
                   "em": {"method": "em", "prevalence": 0.999, "ci_low": 0.99, "ci_high": 1.0}}
    monkeypatch.setattr(deploy, "_estimate_prevalence",
                        lambda method, *args: {**disagreeing[method], "source_prevalence": 0.5})
    card = deploy.run_deploy(corrected, copy)
    assert card["label_shift"]["applied"] is False and card["label_shift"]["reason"].startswith("not applied: the EM")
    predictions = pd.read_parquet(copy.deploy / "predictions.parquet")
    np.testing.assert_allclose(predictions["prob"], predictions["raw_prob"])  # nothing re-weighted
