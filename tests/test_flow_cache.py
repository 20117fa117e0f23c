"""Content-addressed caching of the Prefect stage tasks: a re-run with nothing changed runs no stage; changing one
config field re-runs that stage and the ones that read its outputs, and nothing before it."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.artifacts import ADAPT_KEY, FINETUNE_KEY, SELECT_KEY, SITES_KEY
from medtl import deploy as medtl_deploy
from medtl import stages as medtl_stages
from medtl.config import load_config
from medtl.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
# every medtl function a task of the pipeline calls, by module
STAGE_FUNCTIONS = {"run_synth": medtl_stages, "run_ingest": medtl_stages, "run_pretrain": medtl_stages,
                   "run_select": medtl_stages, "run_finetune": medtl_stages, "run_adapt": medtl_stages,
                   "run_deploy": medtl_deploy, "evaluation_sites": medtl_stages, "run_evaluate_site": medtl_stages,
                   "run_report": medtl_stages}


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """How often each stage function ran (the tasks call them through the ``medtl.stages`` module)."""
    counter: Counter = Counter()
    for name, module in STAGE_FUNCTIONS.items():
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counter[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counter


def _small(tmp_path: Path, **finetune_train) -> object:
    """configs/tiny.yaml, trimmed further so that three pipeline runs fit in a test: no self-supervised candidate
    (so no pretraining, the costliest tiny stage), no scratch baseline, two adaptation methods, a small bootstrap,
    no PDF."""
    return load_config(ROOT / "configs" / "tiny.yaml", {
        "workdir": str(tmp_path / "run"),
        "select": {"candidates": ["efficientnet_lite0.imagenet", "efficientnet_lite0.scratch"]},
        "finetune": {"scratch_baseline": False, "train": {"epochs": 2, **finetune_train}},
        "adapt": {"methods": ["source_only", "adabn"]},
        "report": {"n_bootstrap": 50, "pdf": False},
    })


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _latest_artifacts() -> dict[str, tuple[str, object]]:
    """(type, data) of the latest version of each artifact, by key (the module's own harness server);
    table data as rows."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(sort="CREATED_DESC", limit=100)
    latest: dict[str, tuple[str, object]] = {}
    for artifact in artifacts:
        if artifact.key and artifact.key not in latest:
            data = artifact.data
            if artifact.type == "table" and isinstance(data, str):
                data = json.loads(data)
            latest[artifact.key] = (artifact.type, data)
    return latest


def _task_states_since(moment: datetime) -> Counter:
    """State names of the task runs created after ``moment``, as the Prefect API records them."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            start_time=TaskRunFilterStartTime(after_=moment)), limit=200)
    # a subflow shows up in its parent as a task run too: count only the stage tasks
    return Counter(run.state.name for run in runs
                   if run.state is not None and run.state.state_details.child_flow_run_id is None)


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_a_changed_field_reruns_downstream(prefect_harness, tmp_path, calls,
                                                                          monkeypatch):
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    from flows.pipeline import pipeline

    config = _small(tmp_path)
    first = pipeline(config=config)
    assert set(calls) == set(STAGE_FUNCTIONS) - {"run_pretrain"}
    assert calls["run_evaluate_site"] == 3  # one task per hospital
    report_before = json.loads(Path(first["json"]).read_text())
    artifacts = _latest_artifacts()
    tables = {key: data for key, (kind, data) in artifacts.items() if kind == "table"}  # metric tables
    assert artifacts["medtl-validation-report"] == ("markdown", first["summary_markdown"])
    # Prefect stores a link artifact as markdown holding the link
    assert artifacts["medtl-validation-report-html"] == (
        "markdown", f"[full HTML validation report](file://{first['html']})")
    assert [row["backbone"] for row in tables[SELECT_KEY]] == [
        r["backbone"] for r in sorted(json.loads((tmp_path / "run" / "select" / "ranking.json").read_text())[
            "ranking"], key=lambda r: r["rank"])]
    assert [row["phase"] for row in tables[FINETUNE_KEY]] == ["probe", "finetune"]  # tiny.yaml: LP-FT
    deployed = report_before["adaptation"]["deployed"]
    assert [row["method"] for row in tables[ADAPT_KEY]] == [f"deployed ({deployed['candidate']})",
                                                            "finetuned (before adaptation)", "source_only", "adabn"]
    assert tables[ADAPT_KEY][0]["deployed"] and not tables[ADAPT_KEY][1]["deployed"]
    assert tables[ADAPT_KEY][3]["auc"] == round(report_before["adaptation"]["methods"]["adabn"]["auc"]["value"], 4)
    # the report shows every scorer's pick, the deployed one marked, next to the oracle's (adapt/selection.json)
    picks = json.loads((tmp_path / "run" / "adapt" / "selection.json").read_text())["picks"]
    shown = report_before["adaptation"]["selection"]
    assert [row["scorer"] for row in shown] == [*picks, "oracle"] and shown[-1]["uses_target_labels"]
    assert [row["scorer"] for row in shown if row["chosen"]] == [config.adapt.selection_scorer]
    assert all(row["candidate"] == picks[row["scorer"]]["candidate"] for row in shown[:-1])
    assert {row["hospital"] for row in tables[SITES_KEY]} == set(report_before["per_hospital"])
    sites = [json.loads(path.read_text()) for path in (tmp_path / "run" / "evaluate").glob("*.json")]
    assert len(sites) == 3
    for site in sites:  # the per-site tasks give exactly the report's per-hospital numbers
        assert site["metrics"] == report_before["per_hospital"][site["hospital"]]
    model = tmp_path / "run" / "finetune" / "model.safetensors"
    model_before = _sha256(model)

    calls.clear()
    moment = datetime.now(timezone.utc)
    second = pipeline(config=config)
    assert sum(calls.values()) == 0, f"stages ran again with nothing changed: {dict(calls)}"
    assert second == first  # read back from the JSON result storage
    states = _task_states_since(moment)
    assert states["Cached"] == 11 and set(states) == {"Cached"}, states  # 7 stages, the site list, 3 sites
    assert (tmp_path / "run" / ".prefect-results").is_dir()

    calls.clear()
    changed = _small(tmp_path, lr=3e-4)  # one fine-tuning field
    third = pipeline(config=changed)
    assert set(calls) == {"run_finetune", "run_adapt", "run_deploy", "evaluation_sites", "run_evaluate_site",
                          "run_report"}, calls
    assert calls["run_finetune"] == 1 and calls["run_report"] == 1
    assert _sha256(model) != model_before  # the re-run trained anew, and the report was rebuilt from it
    report_after = json.loads(Path(third["json"]).read_text())
    assert report_after["generated_at"] >= report_before["generated_at"]
    assert report_after["context"]["provenance"]["config_sha256"] != report_before["context"]["provenance"][
        "config_sha256"]


def test_missing_outputs_refresh_the_cache(tmp_path):
    """A stage whose outputs were deleted is re-run even though its key is unchanged."""
    from flows.caching import outputs_present

    config = load_config(ROOT / "configs" / "tiny.yaml", {"workdir": str(tmp_path / "run")})
    assert not outputs_present("select", config)
    ranking = tmp_path / "run" / "select" / "ranking.json"
    ranking.parent.mkdir(parents=True)
    ranking.write_text("{}")
    assert outputs_present("select", config)
    assert not outputs_present("pretrain", config)  # weights/efficientnet_lite0.ssl.safetensors is named by arch


def test_an_ingest_with_files_to_retry_is_not_trusted_from_the_cache(tmp_path):
    """A file a resource limit stopped (ledger status retry) must be parsed again by the next run, cache or not."""
    from flows.caching import outputs_present
    from medtl.ingest.manifest import LEDGER_COLUMNS, MANIFEST_COLUMNS, as_table, write_table_atomic

    config = load_config(ROOT / "configs" / "tiny.yaml", {"workdir": str(tmp_path / "run")})
    ws = Workspace(config.workdir)
    ws.ingest.mkdir(parents=True)
    write_table_atomic(as_table([], MANIFEST_COLUMNS), ws.manifest)
    row = {"path": "a.dcm", "content_hash": "0" * 64, "status": "ingested", "reason": "", "image": "x.npy"}
    write_table_atomic(as_table([row], LEDGER_COLUMNS), ws.ingest / "ledger.parquet")
    assert outputs_present("ingest", config)
    retry = {**row, "path": "b.dcm", "status": "retry", "reason": "MemoryError", "image": ""}
    write_table_atomic(as_table([row, retry], LEDGER_COLUMNS), ws.ingest / "ledger.parquet")
    assert not outputs_present("ingest", config)


def test_skipped_entries_are_part_of_the_ingest_cache_key(tmp_path):
    """An entry ingestion accounts for without reading it (here a FIFO) changes what the ingest stage writes."""
    from flows.caching import cache_key

    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"not dicom")
    config = load_config(ROOT / "configs" / "tiny.yaml",
                         {"workdir": str(tmp_path / "run"), "ingest": {"input_dir": str(folder)}})
    before = cache_key("ingest", "ingest", {"config": config})
    os.mkfifo(folder / "pipe")
    assert cache_key("ingest", "ingest", {"config": config}) != before


def test_cache_key_follows_config_and_input_content(tmp_path):
    from flows.caching import cache_key

    config = load_config(ROOT / "configs" / "tiny.yaml", {"workdir": str(tmp_path / "run")})
    manifest = tmp_path / "run" / "ingest" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"one")
    key = cache_key("select", "select", {"config": config})
    assert key == cache_key("select", "select", {"config": config.model_copy(deep=True)})
    # another stage's section does not matter; the stage's own section and its input files do
    assert key == cache_key("select", "select", {"config": config.model_copy(update={
        "adapt": config.adapt.model_copy(update={"reg": 0.5})})})
    assert key != cache_key("select", "select", {"config": config.model_copy(update={
        "select": config.select.model_copy(update={"candidates": ["efficientnet_lite0.imagenet"]})})})
    manifest.write_bytes(b"two")
    assert key != cache_key("select", "select", {"config": config})
    # the task and its own parameters are in the key (an ingest shard is not the merge)
    assert cache_key("ingest", "ingest-shard", {"config": config, "shard": 0}) != cache_key(
        "ingest", "ingest-shard", {"config": config, "shard": 1})
    pacs = config.model_copy(update={"ingest": config.ingest.model_copy(update={"pacs": object()})})
    assert cache_key("ingest", "ingest", {"config": pacs}) is None  # a PACS may have new studies: never cached


def test_io_tasks_retry_with_backoff_and_cache_can_be_switched_off(tmp_path):
    from prefect.cache_policies import NO_CACHE

    from flows.caching import cached, result_storage
    from flows.stages import ingest_task, report_task

    config = load_config(ROOT / "configs" / "tiny.yaml", {"workdir": str(tmp_path / "run"),
                                                          "orchestration": {"retries": 3, "retry_delay_s": 5}})
    ingest = cached(ingest_task, "ingest", config, io=True)
    assert ingest.retries == 3 and ingest.retry_delay_seconds == [5, 10, 20]
    assert ingest.result_serializer == "json" and ingest.persist_result
    assert ingest.result_storage == result_storage(config) == (tmp_path / "run" / ".prefect-results").resolve()
    assert cached(report_task, "report", config).retries == 0  # computing, not I/O
    off = config.model_copy(update={"orchestration": config.orchestration.model_copy(update={"cache": False})})
    assert cached(report_task, "report", off).cache_policy == NO_CACHE
