"""Scale-out through prefect-dask: ingestion in shards and evaluation per site, as tasks on a local Dask cluster
(two worker processes on loopback), give exactly what the one-process run gives."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtl import stages
from medtl.config import load_config
from medtl.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dask_cluster():
    from flows.runners import local_cluster, local_cluster_kwargs

    with local_cluster(**local_cluster_kwargs(2)) as cluster:
        yield cluster


def _scheduler_transitions(address: str) -> int:
    """How many task state transitions the Dask scheduler has made: grows when tasks run there."""
    from distributed import Client

    with Client(address) as client:
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def _outputs(ws: Workspace) -> dict[str, str]:
    return {p.relative_to(ws.ingest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.ingest.rglob("*")) if p.is_file() and p.suffix != ".parquet"}


def test_sharded_ingest_on_dask_equals_the_plain_run(prefect_harness, dask_cluster, tmp_path):
    from flows.stages import ingest_flow

    config = load_config(ROOT / "configs" / "tiny.yaml", {
        "workdir": str(tmp_path / "sharded"),
        "orchestration": {"task_runner": "dask", "ingest_shards": 3, "cache": False}})
    sharded, plain = Workspace(tmp_path / "sharded"), Workspace(tmp_path / "plain")
    stages.run_synth(config.synth, sharded)
    shutil.copytree(sharded.dicom, plain.dicom)

    expected = stages.run_ingest(config.ingest, plain)
    before = _scheduler_transitions(dask_cluster.scheduler_address)
    result = ingest_flow(config=config, dask_address=dask_cluster.scheduler_address)
    assert _scheduler_transitions(dask_cluster.scheduler_address) > before  # the shards ran on the cluster

    assert result["summary"] == expected["summary"]
    assert "quarantined 3" in result["summary"]  # the cohort's broken files, not sandbox failures on Dask
    pd.testing.assert_frame_equal(pd.read_parquet(sharded.manifest), pd.read_parquet(plain.manifest))
    pd.testing.assert_frame_equal(pd.read_parquet(sharded.ingest / "ledger.parquet"),
                                  pd.read_parquet(plain.ingest / "ledger.parquet"))
    assert _outputs(sharded) == _outputs(plain)  # arrays, de-identified DICOM, quarantine: byte for byte
    assert not (sharded.ingest / ".shards").exists()


def _predictions_workspace(root: Path) -> Workspace:
    """A workspace holding only what evaluation reads: the deployed model's predictions at three hospitals and its
    card."""
    rng = np.random.default_rng(0)
    frames = []
    for hospital, role, n in (("Site A", "source", 30), ("Site B", "target", 40), ("Site C / east", "external", 25)):
        label = rng.integers(0, 2, n)
        prob = np.clip(0.3 * label + rng.uniform(0, 0.7, n), 0, 1)
        frames.append(pd.DataFrame({"model": "deployed", "hospital": hospital, "role": role,
                                    "patient_id": [f"{hospital}-{i // 2}" for i in range(n)], "label": label,
                                    "prob": prob}))
    ws = Workspace(root)
    ws.deploy.mkdir(parents=True)
    pd.concat(frames, ignore_index=True).to_parquet(ws.deploy / "predictions.parquet", index=False)
    (ws.deploy / "model.json").write_text(json.dumps({"threshold": 0.45}))
    return ws


def test_per_site_evaluation_on_dask_equals_in_process(prefect_harness, dask_cluster, tmp_path):
    from flows.stages import evaluate_flow

    ws = _predictions_workspace(tmp_path / "run")
    config = load_config(ROOT / "configs" / "tiny.yaml", {
        "workdir": str(ws.root), "report": {"n_bootstrap": 200},
        "orchestration": {"task_runner": "dask", "cache": False}})
    in_process = {h: stages.run_evaluate_site(config.report, ws, h)["metrics"] for h in stages.evaluation_sites(ws)}
    shutil.rmtree(ws.evaluate)

    results = evaluate_flow(config=config, dask_address=dask_cluster.scheduler_address)
    assert [r["hospital"] for r in results] == ["Site A", "Site B", "Site C / east"]
    assert {r["hospital"]: r["metrics"] for r in results} == in_process
    assert results[1]["metrics"]["role"] == "target" and results[1]["metrics"]["n"] == 40
    assert 0 < results[0]["metrics"]["auc"]["value"] <= 1
    assert len(list(ws.evaluate.glob("*.json"))) == 3  # one file per site, even for a name with a slash


def test_task_runner_from_config():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import local_cluster, task_runner
    from medtl.config import OrchestrationConfig

    assert isinstance(task_runner(OrchestrationConfig()), ThreadPoolTaskRunner)
    remote = task_runner(OrchestrationConfig(task_runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = task_runner(OrchestrationConfig(task_runner="dask", dask_workers=3))
    assert local.cluster_class is local_cluster and local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    with pytest.raises(ValueError, match="task_runner: dask"):
        OrchestrationConfig(dask_address="tcp://10.0.0.5:8786")
