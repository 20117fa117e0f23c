"""Experiment tracking: a pipeline run with nested stage runs in a local MLflow store, read back with
``MlflowClient`` (parameters, per-epoch metric histories, model and report artifacts, no secrets); tracking
``none`` writes nothing and needs no MLflow (CPU; 16-pixel images, 2 epochs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medtl import stages, tracking
from medtl.config import (AdaptConfig, ConfigError, DataConfig, FinetuneConfig, PipelineConfig,
                          ReportConfig, TrackingConfig, TrainConfig, load_config)
from medtl.workspace import Workspace

from tests.conftest import TINY_SOURCE as SOURCE
from tests.conftest import TINY_TARGET as TARGET
from tests.conftest import ingest_two_hospital_cohort, run_folder_sharing_ingest

SECRET = "not-for-the-tracking-server"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    yield from ingest_two_hospital_cohort(tmp_path_factory, unlabeled_per_hospital=8)


def _config(workdir: Path, backend: str, epochs: int = 2) -> PipelineConfig:
    """LP-FT (two ``fit`` calls) with the scratch baseline (a second training in the same stage)."""
    train = TrainConfig(epochs=epochs, batch_size=8, lr=1e-3, device="cpu", progress=False)
    finetune = (FinetuneConfig(backbone="efficientnet_lite0.imagenet", strategy="lp_ft", lp_epochs=1,
                               scratch_baseline=True, train=train) if epochs > 1 else
                FinetuneConfig(backbone="efficientnet_lite0.imagenet", train=train))
    return PipelineConfig.model_validate({
        "workdir": workdir, "ingest": {"deid": {"uid_secret": SECRET}},
        "data": DataConfig(source_hospitals=[SOURCE], target_hospital=TARGET, image_size=16),
        "finetune": finetune,
        "adapt": AdaptConfig(methods=["source_only"], train=train.model_copy(update={"epochs": 1})),
        "report": ReportConfig(n_bootstrap=50, shift_images_per_site=10),
        "tracking": TrackingConfig(backend=backend)})


def _finetune_adapt_report(config: PipelineConfig, ws: Workspace) -> None:
    with tracking.pipeline_run(config):
        stages.run_finetune(config.finetune, config.data, ws)
        stages.run_adapt(config.adapt, config.data, ws)
        stages.run_report(config, ws)


def _runs(client, experiment: str) -> tuple:
    """The pipeline runs (newest first) and, per pipeline run id, its stage runs by name."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[str, dict] = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            children.setdefault(r.data.tags["mlflow.parentRunId"], {})[r.data.tags[tracking.STAGE_TAG]] = r
    return parents, children


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_pipeline_run_logs_params_epoch_metrics_model_and_report(cohort, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    ws = run_folder_sharing_ingest(cohort, tmp_path / "run")
    config = _config(ws.root, "mlflow")
    _finetune_adapt_report(config, ws)
    assert tracking.active_run() is None  # closed after the block

    client = MlflowClient(tracking.tracking_uri(config.tracking, ws.root))
    assert (ws.root / "mlruns" / "mlflow.db").is_file()
    parents, children = _runs(client, "medtl")
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    assert parent.data.params["finetune.strategy"] == "lp_ft"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]
    stage_runs = children[parent.info.run_id]
    assert set(stage_runs) == {"finetune", "adapt", "deploy", "report"}
    finetune = stage_runs["finetune"]
    assert finetune.info.status == "FINISHED"

    # parameters: the stage's config section and the data section, nothing secret anywhere
    params = finetune.data.params
    assert params["finetune.strategy"] == "lp_ft" and params["finetune.train.epochs"] == "2"
    assert params["finetune.lp_epochs"] == "1" and params["data.target_hospital"] == TARGET
    config_yaml = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert SECRET not in config_yaml and "uid_secret:" not in config_yaml
    assert all(SECRET not in value for run in (parent, finetune) for value in run.data.params.values())

    # one value per epoch, LP-FT's two phases numbered on as in the card's history, for both trainings
    card = stages.load_finetuned(ws)[1]
    run_id = finetune.info.run_id
    for key in ("loss", "val_auc", "lr"):
        assert _steps(client, run_id, key) == [1, 2]
    assert [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == \
        pytest.approx([h["loss"] for h in card["history"]])
    assert _steps(client, run_id, "scratch/val_auc") == [1, 2]
    assert finetune.data.metrics["summary.trainable_params"] == card["trainable_params"]

    model = {a.path for a in client.list_artifacts(run_id, "model")}
    assert model == {"model/model.safetensors", "model/model.json"}
    adapt = stage_runs["adapt"].info.run_id
    assert _steps(client, adapt, "source_only/loss") == [1]
    assert "model/chosen.safetensors" in {a.path for a in client.list_artifacts(adapt, "model")}
    deployed = {a.path for a in client.list_artifacts(stage_runs["deploy"].info.run_id, "model")}
    assert deployed == {"model/model.safetensors", "model/model.json", "model/analysis.json"}
    report = {a.path for a in client.list_artifacts(stage_runs["report"].info.run_id, "report")}
    assert {"report/report.html", "report/report.json"} <= report
    assert ("report/report.pdf" in report) == (ws.report / "report.pdf").exists()

    # a second pipeline run over the same workdir resumes every fit from its checkpoint (no training) and
    # still logs the whole per-epoch history into its own stage run
    with tracking.pipeline_run(config):
        stages.run_finetune(config.finetune, config.data, ws)
    parents, children = _runs(client, "medtl")
    assert len(parents) == 2
    again = children[parents[0].info.run_id]["finetune"].info.run_id
    assert _steps(client, again, "val_auc") == [1, 2] and _steps(client, again, "scratch/loss") == [1, 2]


def test_failing_stage_marks_its_runs_failed(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    config = _config(tmp_path / "empty", "mlflow")
    ws = Workspace(config.workdir)
    with pytest.raises(FileNotFoundError, match="run `medtl ingest`"):
        with tracking.pipeline_run(config):
            stages.run_finetune(config.finetune, config.data, ws)
    assert tracking.active_run() is None
    parents, children = _runs(MlflowClient(tracking.tracking_uri(config.tracking, ws.root)), "medtl")
    assert parents[0].info.status == "FAILED"
    assert children[parents[0].info.run_id]["finetune"].info.status == "FAILED"


def test_store_named_by_uri_keeps_artifacts_next_to_it_not_in_the_workdir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's fallback artifact root is ./mlruns of the current directory
    uri = f"sqlite:///{tmp_path / 'shared' / 'tracking.db'}"
    config = PipelineConfig.model_validate({"workdir": tmp_path / "run",
                                            "tracking": {"backend": "mlflow", "uri": uri, "experiment": "sites"}})
    with tracking.pipeline_run(config) as run:
        run_id = run.run_id
    assert tracking.tracking_uri(config.tracking, config.workdir) == uri
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id)] == ["config.yaml"]
    assert list((tmp_path / "shared" / "artifacts").rglob("config.yaml"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "run").exists()


def _without_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``import mlflow...`` fail, as on an install without the tracking extra."""
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_tracking_none_writes_nothing_and_needs_no_mlflow(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    _without_mlflow(monkeypatch)
    ws = run_folder_sharing_ingest(cohort, tmp_path / "run")
    config = _config(ws.root, "none", epochs=1)
    with tracking.pipeline_run(config) as run:
        assert run is None and tracking.epoch_callbacks() == []
        result = stages.run_finetune(config.finetune, config.data, ws)
    assert result["epochs_trained"] == 1 and (ws.finetune / "model.safetensors").exists()
    assert not (ws.root / "mlruns").exists()
    assert not any(p.name in ("mlruns", "mlflow.db") for p in tmp_path.rglob("*"))


def test_tracking_on_without_mlflow_says_how_to_install(tmp_path, monkeypatch):
    _without_mlflow(monkeypatch)
    config = _config(tmp_path / "run", "mlflow")
    with pytest.raises(tracking.TrackingUnavailable, match=r"pip install 'medtl\[tracking\]'.*backend: none"):
        with tracking.pipeline_run(config):
            pass
    assert tracking.active_run() is None and not (tmp_path / "run").exists()


def test_params_flatten_nested_config_and_leave_out_secrets():
    config = PipelineConfig.model_validate({"ingest": {"deid": {"uid_secret": SECRET}},
                                            "data": {"source_hospitals": ["a", "b"], "target_hospital": "c"}})
    params = tracking.flatten_params(config)
    assert params["data.source_hospitals"] == '["a", "b"]' and params["data.target_hospital"] == "c"
    assert params["ingest.deid.uid_secret_env"] == "MEDTL_UID_SECRET"  # the variable's name, not its value
    assert "ingest.deid.uid_secret" not in params and SECRET not in "".join(params.values())
    assert all(len(v) <= 6000 and len(k) <= 250 for k, v in params.items())  # MLflow's limits
    assert tracking.numeric_leaves({"auc": 0.5, "n": 3, "ok": True, "by": {"x": 1.0}, "h": [1.0], "s": "t"}) == \
        {"auc": 0.5, "n": 3.0, "by.x": 1.0}


@pytest.mark.parametrize("section, message", [
    ({"backend": "none", "uri": "http://mlflow.example.org"}, "backend is 'none'"),
    ({"backend": "mlflow", "uri": "https://user:pw@mlflow.example.org"}, "MLFLOW_TRACKING_USERNAME"),
    ({"backend": "wandb"}, "backend"),
])
def test_tracking_config_errors_say_how_to_fix(tmp_path, section, message):
    path = tmp_path / "config.yaml"
    path.write_text(f"tracking: {section!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
