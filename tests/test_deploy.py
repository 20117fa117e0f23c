"""prefect.yaml deploys for real: a Prefect server on loopback (own PREFECT_HOME and SQLite database), a process
work pool, `prefect deploy --all` from the repository root, a triggered deployment picked up by a process worker,
and the flow run reaching COMPLETED with the stage's output in the workspace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.orthanc import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
POOL = "medtl-process"
SERVER_START_S = 120
STEP_TIMEOUT_S = 180
STAGE_FLOWS = {"medtl-synth", "medtl-ingest", "medtl-pretrain", "medtl-select", "medtl-finetune", "medtl-loho",
               "medtl-adapt", "medtl-deploy", "medtl-evaluate", "medtl-report"}


def _prefect(env: dict, *args: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on a free loopback port; yields (api url, environment for the CLI)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ,
           "PREFECT_HOME": str(home),
           "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
           "PREFECT_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false",
           # no scheduled runs from the crons: the test triggers the one run it checks
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
           "MEDTL_UID_SECRET": "medtl-test-secret"}
    env.pop("PREFECT_API_KEY", None)
    log = open(home / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (home / "server.log").read_text()[-2000:]
                pytest.skip(f"the Prefect server did not start on 127.0.0.1:{port} within {SERVER_START_S} s "
                            f"(exit code {process.poll()}); this environment cannot run one. Log:\n{tail}")
            time.sleep(0.5)
        yield api, env
    finally:
        stop_process(process, grace_s=30)
        log.close()


def test_prefect_yaml_has_a_scheduled_deployment_per_stage_and_the_pipeline():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"] for d in spec["deployments"]}
    assert "flows/pipeline.py:pipeline" in entrypoints
    assert {f"flows/stages.py:{name.removeprefix('medtl-')}_flow" for name in STAGE_FLOWS} <= entrypoints
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["name"] == POOL
        assert (ROOT / deployment["parameters"]["config_path"]).is_file()
        assert all(len(s["cron"].split()) == 5 for s in deployment["schedules"])


def test_deploy_all_then_a_worker_runs_a_triggered_deployment(server, tmp_path):
    api, env = server
    _prefect(env, "work-pool", "create", POOL, "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")

    deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=30).json()}
    names = {f"{flows[d['flow_id']]}/{d['name']}" for d in deployments}
    assert {flow for flow, _ in (n.split("/") for n in names)} == STAGE_FLOWS | {"medtl-pipeline"}
    nightly = next(d for d in deployments if d["name"] == "nightly")
    assert nightly["parameters"]["config_path"] == "configs/demo.yaml"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["work_pool_name"] == POOL

    workdir = tmp_path / "run"
    params = json.dumps({"config_path": "configs/tiny.yaml", "overrides": {"workdir": str(workdir)}})
    started = _prefect(env, "deployment", "run", "medtl-synth/synth", "--params", params)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout)
    assert match, started.stdout
    flow_run_id = match.group(1)

    for _ in range(3):  # a poll that comes before the run is due finds nothing; poll again
        worker = _prefect(env, "worker", "start", "--pool", POOL, "--run-once", "--limit", "1")
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
        if run["state"]["type"] not in ("SCHEDULED", "PENDING"):
            break
    assert run["state"]["type"] == "COMPLETED", (run["state"], worker.stdout[-3000:], worker.stderr[-3000:])
    assert len(list((workdir / "dicom").rglob("*.dcm"))) > 100  # the tiny cohort, written by the worker's run
    assert (workdir / ".prefect-results").is_dir()  # the task's result, persisted as JSON for the cache
