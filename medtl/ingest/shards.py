"""Ingestion in shards: the per-file work of one ingest run split into pieces that run as separate tasks, in
other processes or on other machines that share the workspace (a Prefect task runner such as Dask), with the
same manifest, ledger and arrays as :func:`~medtl.ingest.folder.ingest_folder`.

1. :func:`plan_shards` (one process): discover and hash the inputs and plan against the ledger, exactly as
   ``ingest_folder`` does, and store the plan under ``<ingest>/.shards/``.
2. :func:`ingest_shard` (anywhere, once per shard): the sandboxed per-file work for the shard's files; stores the
   workers' verdicts as JSON next to the plan. Outputs land in the ingest folder as they do in a plain run.
3. :func:`merge_shards` (one process): settles every verdict in input order with the same code as a plain run
   (:func:`~medtl.ingest.folder.finish_ingest`: SOP Instance UID collisions, quarantine, manifest, ledger,
   labels), then removes ``.shards/``.

Only 2D ingestion is sharded: a 3D series must meet all of its slices in one process, so
:func:`plan_shards` refuses ``spatial_dims: 3`` (use :func:`ingest_folder`).

Every shard must de-identify with the same key: the plan records a fingerprint of the key (a hash, never the
key) and a shard whose ``$MEDTL_UID_SECRET`` differs stops instead of writing other pseudonyms.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pandas as pd

from medtl.config import IngestConfig
from medtl.ingest.folder import (IngestSummary, PreparedIngest, _Plan, _run, finish_ingest, prepare_ingest,
                                 worker_settings)
from medtl.ingest.manifest import LEDGER_COLUMNS, MANIFEST_COLUMNS, write_table_atomic
from medtl.ingest.worker import FileJob, FileResult
from medtl.workspace import Workspace, atomic_write

SHARDS_DIR = ".shards"
_PLAN_VERSION = 4  # 2: manifest rows gained bits_stored, photometric, view_position, body_part; 3: skipped entries;
# 4: manifest rows gained intensity_scaling


def shards_dir(ws: Workspace) -> Path:
    """Where the plan and the shards' results wait between the three steps: ``<ingest>/.shards``."""
    return ws.ingest / SHARDS_DIR


def plan_shards(cfg: IngestConfig, ws: Workspace, n_shards: int) -> dict:
    """Plan one ingest run and split the files that need parsing into ``n_shards`` contiguous shards.

    Args:
        cfg: the ``ingest`` section (with ``input_dir`` set to the folder to ingest, e.g. the PACS inbox).
        ws: the run's workspace, shared by every process that runs a shard.
        n_shards: pieces to split the work into (>= 1); fewer when there are fewer files to parse.

    Returns:
        ``{"shards": [files per shard], "files_in", "to_parse", "plan"}``; ``shards`` is empty when every file
        was handled by an earlier run (then only :func:`merge_shards` remains).

    Raises:
        ValueError: for ``n_shards < 1`` or ``cfg.spatial_dims == 3``.
        FileNotFoundError, ValueError: as :func:`~medtl.ingest.folder.prepare_ingest`.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if cfg.spatial_dims != 2:
        raise ValueError("sharded ingestion is 2D only: a 3D series needs all its slices in one process; use "
                         "ingest_folder (orchestration.ingest_shards: 1) for spatial_dims: 3")
    prepared = prepare_ingest(cfg, ws)
    jobs = prepared.plan.jobs
    n = min(n_shards, len(jobs))
    bounds = [(len(jobs) * i // n, len(jobs) * (i + 1) // n) for i in range(n)]
    folder = shards_dir(ws)
    shutil.rmtree(folder, ignore_errors=True)  # results of an earlier, unfinished plan settle nothing now
    folder.mkdir(parents=True)
    write_table_atomic(prepared.ledger, folder / "ledger.parquet")
    write_table_atomic(prepared.manifest, folder / "manifest.parquet")
    plan = {
        "version": _PLAN_VERSION,
        "config_sha256": _config_hash(cfg),
        "key_check": _key_check(prepared.settings.key),
        "ingest_dir": str(ws.ingest.resolve()),
        "input_dir": str(prepared.input_dir.resolve()),
        "files": [[rel, str(path.resolve())] for rel, path in prepared.files],
        "skipped": [list(item) for item in prepared.skipped],
        "labels": prepared.labels,
        "already": [list(item) for item in prepared.plan.already],
        "duplicates": prepared.plan.duplicates,
        "jobs": [[str(job.path.resolve()), job.relpath, job.content_hash] for job in jobs],
        "shards": [list(b) for b in bounds],
    }
    _write_json(folder / "plan.json", plan)
    return {"shards": [end - start for start, end in bounds],
            "files_in": len(prepared.files) + len(prepared.skipped), "to_parse": len(jobs),
            "plan": str(folder / "plan.json")}


def ingest_shard(cfg: IngestConfig, ws: Workspace, shard: int) -> dict:
    """Parse, check, de-identify and store shard ``shard``'s files (sandboxed workers, ``cfg.workers`` of them).

    Re-running a shard redoes its files and replaces its results; outputs that a first attempt already wrote are
    settled by :func:`merge_shards` exactly as a re-run of a killed plain ingest settles them.

    Args:
        cfg: the same ``ingest`` section the plan was made with.
        ws: the run's workspace.
        shard: index into the plan's shards.

    Returns:
        ``{"shard", "files", "quarantined", "results"}`` (``results``: the JSON file of the verdicts).

    Raises:
        FileNotFoundError: when no plan exists (run :func:`plan_shards` first).
        ValueError: for a shard index out of range, or a config or key that differs from the plan's.
    """
    plan = _load_plan(cfg, ws)
    if not 0 <= shard < len(plan["shards"]):
        raise ValueError(f"shard {shard} is out of range: the plan has {len(plan['shards'])} shards")
    settings = worker_settings(cfg, Path(plan["ingest_dir"]))
    if _key_check(settings.key) != plan["key_check"]:
        raise ValueError("this process de-identifies with another key than the plan: set the same "
                         "$MEDTL_UID_SECRET (or ingest.deid.uid_secret_env's variable) on every worker")
    start, end = plan["shards"][shard]
    jobs = [FileJob(Path(path), rel, content_hash) for path, rel, content_hash in plan["jobs"][start:end]]
    results = [_result_to_json(result) for result in _run(jobs, settings, cfg)] if jobs else []
    path = _write_json(shards_dir(ws) / f"shard-{shard:05d}.json", {"shard": shard, "results": results})
    return {"shard": shard, "files": len(results), "quarantined": sum(1 for r in results if r["reason"]),
            "results": str(path)}


def merge_shards(cfg: IngestConfig, ws: Workspace) -> IngestSummary:
    """Settle every shard's results in input order into the manifest and ledger, then remove the plan.

    Args:
        cfg: the same ``ingest`` section the plan was made with.
        ws: the run's workspace.

    Returns:
        The run's :class:`~medtl.ingest.folder.IngestSummary`, as :func:`ingest_folder` would have returned.

    Raises:
        FileNotFoundError: when no plan exists, or a shard has no results yet (run it first).
        ValueError: for a config that differs from the plan's.
    """
    plan = _load_plan(cfg, ws)
    results: list[FileResult] = []
    for shard, (start, end) in enumerate(plan["shards"]):
        path = shards_dir(ws) / f"shard-{shard:05d}.json"
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard} has no results at {path}: run ingest_shard for it before "
                                    "merging")
        stored = json.loads(path.read_text())["results"]
        if len(stored) != end - start:
            raise ValueError(f"{path} holds {len(stored)} results for a shard of {end - start} files: run the "
                             "shard again")
        results.extend(_result_from_json(item) for item in stored)
    folder = shards_dir(ws)
    ingest_dir = Path(plan["ingest_dir"])
    prepared = PreparedIngest(
        input_dir=Path(plan["input_dir"]),
        files=[(rel, Path(path)) for rel, path in plan["files"]],
        skipped=[(rel, reason) for rel, reason in plan["skipped"]],
        labels={rel: int(label) for rel, label in plan["labels"].items()},
        settings=worker_settings(cfg, ingest_dir),
        ledger=pd.read_parquet(folder / "ledger.parquet").astype(LEDGER_COLUMNS),
        manifest=pd.read_parquet(folder / "manifest.parquet").astype(MANIFEST_COLUMNS),
        plan=_Plan(jobs=[r.job for r in results], duplicates=plan["duplicates"],
                   already=[(status, content_hash) for status, content_hash in plan["already"]]))
    summary = finish_ingest(ws, prepared, results)
    shutil.rmtree(folder, ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------------------------------- helpers


def _config_hash(cfg: IngestConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()


def _key_check(key: bytes) -> str:
    # Tells two keys apart without revealing either: a hash of a long secret does not give the secret back.
    return hashlib.sha256(b"medtl ingest shard key check\0" + key).hexdigest()


def _load_plan(cfg: IngestConfig, ws: Workspace) -> dict:
    path = shards_dir(ws) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shard plan at {path}: run plan_shards first (it is removed once merged)")
    plan = json.loads(path.read_text())
    if plan.get("version") != _PLAN_VERSION:
        raise ValueError(f"{path} was written by another version of medtl: run plan_shards again")
    if plan["config_sha256"] != _config_hash(cfg):
        raise ValueError(f"the ingest config differs from the one {path} was planned with: run plan_shards again "
                         "with this config, or use the plan's config")
    return plan


def _result_to_json(result: FileResult) -> dict:
    if result.headers:
        raise ValueError(f"{result.job.relpath}: a 3D slice cannot be settled by a shard merge; ingest 3D data "
                         "with ingest_folder")
    return {"path": str(result.job.path), "relpath": result.job.relpath, "content_hash": result.job.content_hash,
            "reason": result.reason, "record": {k: _json_value(v) for k, v in result.record.items()},
            "staged": {final: str(staged) for final, staged in result.staged.items()}}


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}  # NaN stays NaN, in strict JSON
    raise TypeError(f"manifest field of type {type(value).__name__} cannot travel between shards: {value!r}")


def _from_json_value(value: object) -> object:
    return float(value["float"]) if isinstance(value, dict) else value


def _result_from_json(item: dict) -> FileResult:
    return FileResult(FileJob(Path(item["path"]), item["relpath"], item["content_hash"]), reason=item["reason"],
                      record={k: _from_json_value(v) for k, v in item["record"].items()},
                      staged={final: Path(staged) for final, staged in item["staged"].items()})


def _write_json(path: Path, payload: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, allow_nan=False)))
