"""``ingest_folder``: a DICOM folder → de-identified, validated arrays, a manifest and a ledger.

Every regular file under the input folder is an input (except the labels CSV). Each one ends up in
exactly one of three states, recorded in the ledger with its content hash:

* ``ingested`` — validated, decoded to ``arrays/<sop uid>.npy`` (and, when ``deid.keep_dicom``,
  ``dicom/<sop uid>.dcm`` de-identified), one manifest row;
* ``quarantined`` — copied to ``quarantine/<hash[:16]>_<name>`` with the reason in the ledger;
* ``duplicate`` — same bytes as a file already seen at another path.

Re-running is incremental: a file whose path and content hash are already in the ledger is not
touched again, and it counts under its recorded state. The input folder is never modified.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from medtl.config import IngestConfig
from medtl.ingest.deid import check_uid_root, deidentify, resolve_secret
from medtl.ingest.manifest import (LEDGER_COLUMNS, MANIFEST_COLUMNS, as_table, ledger_path, merge_manifest,
                                   load_ledger, read_manifest, write_table_atomic)
from medtl.ingest.reader import RejectedFile, decode, preprocess, read_dataset, validate
from medtl.workspace import Workspace

logger = logging.getLogger("medtl.ingest")

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class IngestSummary:
    """Accounting of one ingestion run; ``str()`` gives the one-line balance.

    Files already handled by an earlier run count under their recorded state *and* in
    ``skipped_already_done``.
    """

    files_in: int
    ingested: int
    quarantined: int
    duplicates: int
    skipped_already_done: int
    per_hospital: dict[str, int] = field(default_factory=dict)
    manifest_rows: int = 0
    manifest: Path | None = None

    def __str__(self) -> str:
        return (f"files in {self.files_in} = ingested {self.ingested} + quarantined {self.quarantined} "
                f"+ duplicates {self.duplicates} (already done {self.skipped_already_done})")


@dataclass(frozen=True)
class _Settings:
    """What a worker needs to ingest one file (picklable)."""

    image_size: int
    spatial_dims: int
    site_attribute: str
    key: bytes
    uid_root: str
    keep_dicom: bool


@dataclass(frozen=True)
class _Job:
    path: Path
    relpath: str
    content_hash: str


@dataclass
class _Result:
    job: _Job
    reason: str = ""
    array: np.ndarray | None = None
    dicom: bytes | None = None
    record: dict = field(default_factory=dict)


def ingest_folder(cfg: IngestConfig, ws: Workspace) -> IngestSummary:
    """Ingest every file of ``cfg.input_dir`` (default ``ws.dicom``) into ``ws.ingest``.

    Args:
        cfg: the ``ingest`` config section.
        ws: the run's workspace.

    Returns:
        The run's :class:`IngestSummary`.

    Raises:
        FileNotFoundError: when the input folder or a configured labels CSV does not exist.
        ValueError: for an unknown ``site_attribute``, an invalid ``deid.uid_root`` or a malformed labels CSV.
    """
    input_dir = Path(cfg.input_dir) if cfg.input_dir is not None else ws.dicom
    if not input_dir.is_dir():
        raise FileNotFoundError(f"ingest input folder {input_dir} does not exist; set ingest.input_dir "
                                "or run the synth stage first to create the synthetic cohort")
    if tag_for_keyword(cfg.site_attribute) is None:
        raise ValueError(f"ingest.site_attribute {cfg.site_attribute!r} is not a DICOM keyword "
                         "(e.g. InstitutionName, StationName)")
    check_uid_root(cfg.deid.uid_root)
    labels_csv = cfg.labels_csv if cfg.labels_csv is not None else input_dir / "labels.csv"
    if cfg.labels_csv is not None and not labels_csv.is_file():
        raise FileNotFoundError(f"ingest.labels_csv {labels_csv} does not exist")
    settings = _Settings(image_size=cfg.image_size, spatial_dims=cfg.spatial_dims,
                         site_attribute=cfg.site_attribute, key=resolve_secret(cfg.deid),
                         uid_root=cfg.deid.uid_root, keep_dicom=cfg.deid.keep_dicom)

    files = discover(input_dir, skip=[labels_csv, ws.ingest])
    labels = read_labels(labels_csv, {rel for rel, _ in files}) if labels_csv.is_file() else {}
    for folder in (ws.ingest / "arrays", ws.quarantine, *([ws.ingest / "dicom"] if cfg.deid.keep_dicom else [])):
        folder.mkdir(parents=True, exist_ok=True)
    stored_ledger, stored_manifest = load_ledger(ws), read_manifest(ws)
    ledger, manifest = drop_missing_images(stored_ledger, stored_manifest, ws)
    logger.info("ingesting %d files from %s", len(files), input_dir)

    plan = _plan(files, ledger)
    new_rows, ingested_rows = _process(plan.jobs, settings, cfg.workers, manifest, ws)
    new_ledger = _concat(ledger, as_table(plan.duplicates + new_rows, LEDGER_COLUMNS), LEDGER_COLUMNS)
    new_manifest = apply_labels(merge_manifest(manifest, as_table(ingested_rows, MANIFEST_COLUMNS)),
                                new_ledger, labels)
    if not ledger_path(ws).is_file() or not new_ledger.equals(stored_ledger):
        write_table_atomic(new_ledger, ledger_path(ws))
    if not ws.manifest.is_file() or not new_manifest.equals(stored_manifest):
        write_table_atomic(new_manifest, ws.manifest)

    counts = Counter(status for status, _ in plan.already)
    counts.update(row["status"] for row in plan.duplicates + new_rows)
    hospital_of = dict(zip(new_manifest["content_hash"], new_manifest["hospital"]))
    per_hospital = Counter(hospital_of[h] for status, h in plan.already if status == "ingested")
    per_hospital.update(row["hospital"] for row in ingested_rows)
    summary = IngestSummary(files_in=len(files), ingested=counts["ingested"], quarantined=counts["quarantined"],
                            duplicates=counts["duplicate"], skipped_already_done=len(plan.already),
                            per_hospital=dict(sorted(per_hospital.items())), manifest_rows=len(new_manifest),
                            manifest=ws.manifest)
    if summary.files_in != summary.ingested + summary.quarantined + summary.duplicates:
        raise RuntimeError(f"ingest accounting does not balance: {summary}; this is a bug in medtl.ingest")
    logger.info("%s", summary)
    return summary


@dataclass
class _Plan:
    jobs: list[_Job] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)  # ledger rows
    already: list[tuple[str, str]] = field(default_factory=list)  # (status, content hash) from earlier runs


def _plan(files: list[tuple[str, Path]], ledger: pd.DataFrame) -> _Plan:
    """Decide every file's fate from its content hash before doing any expensive work."""
    done = dict(zip(zip(ledger["path"], ledger["content_hash"]), ledger["status"]))
    owner = {h: p for p, h, s in zip(ledger["path"], ledger["content_hash"], ledger["status"]) if s != "duplicate"}
    plan = _Plan()
    for rel, path in files:
        content_hash = file_sha256(path)
        status = done.get((rel, content_hash))
        if status is not None:
            plan.already.append((status, content_hash))
        elif content_hash in owner:
            reason = f"same content as {owner[content_hash]}"
            plan.duplicates.append(_ledger_row(rel, content_hash, "duplicate", reason))
        else:
            owner[content_hash] = rel
            plan.jobs.append(_Job(path, rel, content_hash))
    return plan


def _process(jobs: list[_Job], settings: _Settings, workers: int, manifest: pd.DataFrame,
             ws: Workspace) -> tuple[list[dict], list[dict]]:
    """Ingest or quarantine each job; returns its ledger rows and the new manifest rows."""
    sop_owner = dict(zip(manifest["sop_uid"], manifest["content_hash"]))
    ledger_rows: list[dict] = []
    manifest_rows: list[dict] = []
    for i, result in enumerate(_run(jobs, settings, workers), start=1):
        job = result.job
        sop = result.record.get("sop_uid", "")
        if not result.reason and sop_owner.get(sop, job.content_hash) != job.content_hash:
            result.reason = (f"SOPInstanceUID collision: another file with different content already has this "
                             f"SOPInstanceUID (content hash {sop_owner[sop][:16]}); fix the UIDs at the source")
        if result.reason:
            _quarantine(job, ws.quarantine)
            logger.warning("quarantined %s: %s", job.relpath, result.reason)
            ledger_rows.append(_ledger_row(job.relpath, job.content_hash, "quarantined", result.reason))
        else:
            sop_owner[sop] = job.content_hash
            manifest_rows.append(_store(result, ws))
            ledger_rows.append(_ledger_row(job.relpath, job.content_hash, "ingested", ""))
        if i % max(1, len(jobs) // 10) == 0 or i == len(jobs):
            logger.info("processed %d/%d new files", i, len(jobs))
    return ledger_rows, manifest_rows


def drop_missing_images(ledger: pd.DataFrame, manifest: pd.DataFrame,
                        ws: Workspace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Forget ingested images whose array or manifest row has gone, so that this run redoes them.

    Without this, deleting ``manifest.parquet`` or an array would leave files that the ledger
    calls done but that no later stage can load.

    Args:
        ledger: the stored ledger.
        manifest: the stored manifest (``image`` relative to ``ws.ingest``).
        ws: the run's workspace.

    Returns:
        ``(ledger, manifest)`` without the rows of missing images.
    """
    present = manifest["image"].map(lambda rel: (ws.ingest / rel).is_file()).astype(bool)
    manifest = manifest[present].reset_index(drop=True)
    lost = (ledger["status"] == "ingested") & ~ledger["content_hash"].isin(set(manifest["content_hash"]))
    if lost.any():
        logger.warning("%d previously ingested files lost their array or manifest row; ingesting them again",
                       int(lost.sum()))
    return ledger[~lost].reset_index(drop=True), manifest


def discover(input_dir: Path, skip: Iterable[Path] = ()) -> list[tuple[str, Path]]:
    """Every regular file under ``input_dir``, sorted by relative path.

    Args:
        input_dir: the folder to walk.
        skip: files or folders to leave out (the labels CSV, an ingest folder inside the input).

    Returns:
        ``(relative posix path, path)`` pairs.
    """
    skipped = {p.resolve() for p in skip}
    found = []
    for folder, dirs, names in os.walk(input_dir):
        dirs[:] = [d for d in dirs if (Path(folder) / d).resolve() not in skipped]
        for name in names:
            path = Path(folder) / name
            if path.is_file() and path.resolve() not in skipped:
                found.append((path.relative_to(input_dir).as_posix(), path))
    return sorted(found)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes.

    Args:
        path: the file.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_labels(csv_path: Path, known: set[str]) -> dict[str, int]:
    """Read ``path,label`` rows; rows naming files that are not inputs are warned about and skipped.

    Args:
        csv_path: the CSV; ``path`` is relative to the input folder, an empty ``label`` means unlabeled.
        known: relative paths of the input files.

    Returns:
        Relative posix path → integer label.

    Raises:
        ValueError: naming the file and line of a malformed row.
    """
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if not {"path", "label"} <= set(frame.columns):
        raise ValueError(f"{csv_path}: needs the columns path,label; found {list(frame.columns)}")
    labels: dict[str, int] = {}
    missing: list[str] = []
    for line, (raw_path, raw_label) in enumerate(zip(frame["path"], frame["label"]), start=2):
        rel = raw_path.strip().replace("\\", "/").removeprefix("./")
        if not raw_label.strip():
            continue
        label = _parse_label(raw_label)
        if label is None:
            raise ValueError(f"{csv_path} line {line}: label {raw_label!r} is not an integer class")
        if rel not in known:
            missing.append(f"line {line} ({raw_path})")
            continue
        if labels.get(rel, label) != label:
            raise ValueError(f"{csv_path} line {line}: {rel} is labeled both {labels[rel]} and {label}")
        labels[rel] = label
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        message = f"{csv_path}: {len(missing)} row(s) name files that are not in the input folder: {shown}"
        logger.warning("%s", message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return labels


def _parse_label(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def apply_labels(manifest: pd.DataFrame, ledger: pd.DataFrame, labels: dict[str, int]) -> pd.DataFrame:
    """Attach labels to manifest rows through the ledger (path → content hash → row).

    Going through the ledger means a label still applies when the labeled path was the duplicate
    copy, and that a corrected labels CSV updates already-ingested rows on the next run. Rows the
    CSV does not mention keep their previous label.

    Args:
        manifest: the merged manifest.
        ledger: the ledger including this run.
        labels: from :func:`read_labels`.

    Returns:
        The manifest with its ``label`` column updated.
    """
    by_hash: dict[str, int] = {}
    for path, content_hash in zip(ledger["path"], ledger["content_hash"]):
        if path in labels:
            if by_hash.setdefault(content_hash, labels[path]) != labels[path]:
                logger.warning("%s: label %d conflicts with %d given to an identical file; keeping %d",
                               path, labels[path], by_hash[content_hash], by_hash[content_hash])
    out = manifest.copy()
    out["label"] = pd.array([by_hash.get(h, old) for h, old in zip(out["content_hash"], out["label"])],
                            dtype="Int64")
    return out


def _ledger_row(path: str, content_hash: str, status: str, reason: str) -> dict:
    return {"path": path, "content_hash": content_hash, "status": status, "reason": reason}


def _concat(first: pd.DataFrame, second: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    frames = [f for f in (first, second) if len(f)]
    return pd.concat(frames, ignore_index=True).astype(columns) if frames else as_table([], columns)


# ----------------------------------------------------------------------------------------------
# per-file work (runs in worker processes when cfg.workers != 1)


def _run(jobs: list[_Job], settings: _Settings, workers: int) -> Iterator[_Result]:
    n = min(_n_workers(workers), len(jobs))
    work = functools.partial(ingest_file, settings=settings)
    if n <= 1:
        yield from map(work, jobs)
        return
    with ProcessPoolExecutor(max_workers=n) as pool:
        yield from pool.map(work, jobs, chunksize=max(1, min(32, len(jobs) // (4 * n))))


def _n_workers(requested: int) -> int:
    if requested > 0:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ingest_file(job: _Job, settings: _Settings) -> _Result:
    """Read, validate, decode, preprocess and de-identify one file; never raises.

    Args:
        job: the file.
        settings: image size, dimensionality, site attribute and de-identification key.

    Returns:
        A result with either ``reason`` (quarantine) or the array, the de-identified DICOM bytes
        and the manifest fields.
    """
    try:
        ds = read_dataset(job.path)
        validate(ds, settings.spatial_dims)
        if "SOPInstanceUID" not in ds:
            raise RejectedFile("no SOPInstanceUID (0008,0018): the image cannot be identified")
        array = preprocess(decode(ds), settings.image_size)
        site = str(ds.get(settings.site_attribute, "") or "").strip()
        record = {
            "hospital": site or (job.relpath.split("/")[0] if "/" in job.relpath else "unknown"),
            "vendor": str(ds.get("Manufacturer", "") or ""),
            "model": str(ds.get("ManufacturerModelName", "") or ""),
            "modality": str(ds.get("Modality", "") or ""),
            "content_hash": job.content_hash,
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "pixel_spacing_mm": _pixel_spacing(ds),
        }
        clean = deidentify(ds, settings.key, settings.uid_root)
        record.update(patient_id=str(clean.get("PatientID", "")), study_uid=str(clean.get("StudyInstanceUID", "")),
                      series_uid=str(clean.get("SeriesInstanceUID", "")), sop_uid=str(clean.SOPInstanceUID))
        return _Result(job, array=array.astype(np.float32), record=record,
                       dicom=_encode(clean) if settings.keep_dicom else None)
    except RejectedFile as exc:
        return _Result(job, reason=str(exc))
    except Exception as exc:  # one malformed file must not stop the run; the reason keeps the evidence
        return _Result(job, reason=f"unexpected error while ingesting: {type(exc).__name__}: {exc}")


def _pixel_spacing(ds: Dataset) -> float:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = float(ds[keyword].value[0])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return math.nan


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# writing (main process only, so that names are checked before anything lands on disk)


def _store(result: _Result, ws: Workspace) -> dict:
    sop = result.record["sop_uid"]
    image = Path("arrays") / f"{sop}.npy"
    buffer = io.BytesIO()
    np.save(buffer, result.array)
    _write_atomic(ws.ingest / image, buffer.getvalue())
    if result.dicom is not None:
        _write_atomic(ws.ingest / "dicom" / f"{sop}.dcm", result.dicom)
    return {**result.record, "image": image.as_posix(), "label": pd.NA}


def _quarantine(job: _Job, quarantine: Path) -> None:
    target = quarantine / f"{job.content_hash[:16]}_{job.path.name}"
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(job.path, tmp)
    os.replace(tmp, target)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
