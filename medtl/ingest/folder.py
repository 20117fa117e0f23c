"""``ingest_folder``: a DICOM folder → de-identified, validated arrays, a manifest and a ledger.

Every entry below the input folder is accounted for (except the labels CSV and an ingest folder inside
the input, which are not inputs). Each one ends up in exactly one of five states, recorded in the ledger
with its content hash:

* ``ingested`` — validated, decoded to ``arrays/<sop uid>.npy`` (and, when ``deid.keep_dicom``,
  ``dicom/<sop uid>.dcm`` de-identified), one manifest row;
* ``quarantined`` — copied to ``quarantine/<hash[:16]>_<name>`` (holes of a sparse file stay holes; a
  long name is cut to its end) with the reason in the ledger. A byte-identical copy of a quarantined file is
  quarantined too, with the first file's reason followed by ``(same bytes as <its path>)``, and copied to
  ``quarantine/<hash[:16]>_<hash of its path[:8]>_<name>`` (its content hash, and maybe its name, are the first's);
* ``duplicate`` — same bytes as an ingested file at another path (``same content as <its path>``), or, in 3D, a
  slice whose position and pixels repeat a kept slice of its series (``same position and pixels as <its path>``);
* ``skipped`` — not read, with the reason: a symbolic link leaving the input folder, a link loop or a
  broken link, a link to a folder, a FIFO, socket or device, a file or folder that cannot be read. Its
  "content hash" stands for the reason (nothing was read);
* ``retry`` — parsing hit a resource limit (out of memory, timed out, worker killed): nothing is
  copied and the next run parses the file again.

Symbolic links are never followed out of the input folder. A link to a *file* inside it is read like a
file, so the linked content counts once as an image and once as a duplicate; a link to a *folder* is
skipped, because the folder's files are already counted under their own paths (following it would only add
duplicates, or loop).

Re-running is incremental: a file whose path and content hash are already in the ledger (other than as
``retry``) is not touched again, and it counts under its recorded state. The input folder is never modified.
A name that is not valid UTF-8 is recorded with its undecodable bytes written ``\\xNN``.
"""

from __future__ import annotations

import functools
import errno
import hashlib
import io
import logging
import os
import shutil
import stat
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.datadict import tag_for_keyword

from medtl.config import IngestConfig, PhilipsScaling
from medtl.ingest.deid import DeidOptions, check_uid_root, resolve_secret
from medtl.ingest.manifest import (LEDGER_COLUMNS, MANIFEST_COLUMNS, as_table, ledger_path, merge_manifest,
                                   load_ledger, read_manifest, write_table_atomic)
from medtl.ingest.reader import RejectedFile, preprocess
from medtl.ingest.sandbox import available_cpus, is_resource_failure, sandboxed_map
from medtl.ingest.volume import RejectedSeries, SeriesGroup, Volume, assemble, group_series, is_volume_series, write_nifti
from medtl.ingest.worker import STAGING, FileJob, FileResult, WorkerSettings, ingest_file
from medtl.workspace import Workspace

logger = logging.getLogger("medtl.ingest")

_HASH_CHUNK = 1 << 20
CHECKPOINT_SECONDS = 30.0
_PARTIAL_SUFFIX = ".tmp"
_QUARANTINE_NAME_BYTES = 128  # of the input's name kept in its quarantine copy's: file systems allow 255 in all


@dataclass(frozen=True)
class IngestSummary:
    """Accounting of one ingestion run; ``str()`` gives the one-line balance.

    ``files_in`` counts every entry below the input folder; each is in exactly one of ``ingested``,
    ``quarantined``, ``duplicates``, ``skipped`` (not read, see the ledger for why) and ``to_retry`` (hit a
    resource limit; the next run parses it again). Entries already handled by an earlier run count under
    their recorded state *and* in ``skipped_already_done``.

    Examples:
        >>> str(IngestSummary(files_in=7, ingested=2, quarantined=0, duplicates=1, skipped=4, to_retry=0,
        ...                   skipped_already_done=0))
        'files in 7 = ingested 2 + quarantined 0 + duplicates 1 + skipped 4 (already done 0)'
    """

    files_in: int
    ingested: int
    quarantined: int
    duplicates: int
    skipped: int
    to_retry: int
    skipped_already_done: int
    per_hospital: dict[str, int] = field(default_factory=dict)
    manifest_rows: int = 0
    manifest: Path | None = None

    def __str__(self) -> str:
        # skipped and to-retry entries are rare: their terms appear when there are some
        rare = "".join(f" + {name} {n}" for name, n in (("skipped", self.skipped), ("to retry", self.to_retry)) if n)
        return (f"files in {self.files_in} = ingested {self.ingested} + quarantined {self.quarantined} "
                f"+ duplicates {self.duplicates}{rare} (already done {self.skipped_already_done})")


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
    prepared = prepare_ingest(cfg, ws)
    return finish_ingest(ws, prepared, _run(prepared.plan.jobs, prepared.settings, cfg))


@dataclass
class PreparedIngest:
    """Everything decided before any file is parsed: the inputs, the labels, the ledger and manifest this run
    starts from and the plan (which files need a worker). :func:`finish_ingest` settles the workers' results
    against it; :mod:`medtl.ingest.shards` stores it to run the workers as separate tasks."""

    input_dir: Path
    files: list[tuple[str, Path]]
    skipped: list[tuple[str, str]]  # (relative path, reason): entries discovery does not read
    labels: dict[str, int]
    settings: WorkerSettings
    ledger: pd.DataFrame  # the stored ledger without the entries of images that went missing, nor those to retry
    manifest: pd.DataFrame  # likewise for the manifest
    plan: _Plan


def prepare_ingest(cfg: IngestConfig, ws: Workspace) -> PreparedIngest:
    """Check the config, find and hash the inputs and plan the run; resets the staging folder.

    Args:
        cfg: the ``ingest`` config section.
        ws: the run's workspace.

    Returns:
        The :class:`PreparedIngest` whose ``plan.jobs`` are the files a worker must parse.

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
    settings = worker_settings(cfg, ws.ingest)

    files, skipped = scan_inputs(input_dir, skip=[labels_csv, ws.ingest])
    labels = read_labels(labels_csv, {rel for rel, _ in files}) if labels_csv.is_file() else {}
    for folder in (ws.ingest / "arrays", ws.quarantine, *([ws.ingest / "dicom"] if cfg.deid.keep_dicom else [])):
        folder.mkdir(parents=True, exist_ok=True)
    remove_partial_files(ws.ingest)
    shutil.rmtree(_staging(ws), ignore_errors=True)
    _staging(ws).mkdir(parents=True)
    ledger, manifest = drop_missing_images(load_ledger(ws), read_manifest(ws), ws)
    ledger = ledger[ledger["status"] != "retry"].reset_index(drop=True)  # this run parses them again
    logger.info("ingesting %d files from %s (%d other entries skipped)", len(files), input_dir, len(skipped))
    return PreparedIngest(input_dir=input_dir, files=files, skipped=skipped, labels=labels, settings=settings,
                          ledger=ledger, manifest=manifest, plan=_plan(files, skipped, ledger))


def finish_ingest(ws: Workspace, prepared: PreparedIngest, results: Iterable[FileResult]) -> IngestSummary:
    """Settle the workers' results in input order, write the manifest and ledger, and account for every file.

    Args:
        ws: the run's workspace.
        prepared: from :func:`prepare_ingest`.
        results: one :class:`FileResult` per ``prepared.plan.jobs`` entry, in that order (an iterator is
            consumed as it comes, with a checkpoint every :data:`CHECKPOINT_SECONDS`).

    Returns:
        The run's :class:`IngestSummary`.
    """
    stored_ledger, stored_manifest = load_ledger(ws), read_manifest(ws)
    ledger, manifest, plan = prepared.ledger, prepared.manifest, prepared.plan
    decided, copies = _settle_planned(plan, dict(prepared.files), ws.quarantine)

    def save(new_rows: list[dict], ingested_rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
        # Manifest first: a kill between the two writes leaves rows the ledger does not know yet, which the next
        # run ingests again and merges away by content hash, never a ledger entry without its manifest row.
        new_ledger = _concat(ledger, as_table(decided + new_rows, LEDGER_COLUMNS), LEDGER_COLUMNS)
        new_manifest = apply_labels(merge_manifest(manifest, as_table(ingested_rows, MANIFEST_COLUMNS)),
                                    new_ledger, prepared.labels)
        new_ledger = new_ledger.sort_values("path", kind="stable", ignore_index=True)
        new_manifest = new_manifest.sort_values("image", kind="stable", ignore_index=True)
        if not ws.manifest.is_file() or not new_manifest.equals(stored_manifest):
            write_table_atomic(new_manifest, ws.manifest)
        if not ledger_path(ws).is_file() or not new_ledger.equals(stored_ledger):
            write_table_atomic(new_ledger, ledger_path(ws))
        return new_ledger, new_manifest

    new_rows, ingested_rows = _process(results, len(plan.jobs), prepared.settings, manifest, ws, copies,
                                       checkpoint=save)
    new_ledger, new_manifest = save(new_rows, ingested_rows)

    counts = Counter(status for status, _ in plan.already)
    counts.update(row["status"] for row in decided + new_rows)
    hospital_of = dict(zip(new_manifest["image"], new_manifest["hospital"]))
    this_run = {rel for rel, _ in prepared.files}
    per_hospital = Counter(hospital_of.get(image, "unknown")  # ingested files per hospital
                           for path, status, image in zip(new_ledger["path"], new_ledger["status"], new_ledger["image"])
                           if status == "ingested" and path in this_run)
    summary = IngestSummary(files_in=len(prepared.files) + len(prepared.skipped), ingested=counts["ingested"],
                            quarantined=counts["quarantined"], duplicates=counts["duplicate"],
                            skipped=counts["skipped"], to_retry=counts["retry"],
                            skipped_already_done=len(plan.already), per_hospital=dict(sorted(per_hospital.items())),
                            manifest_rows=len(new_manifest), manifest=ws.manifest)
    if summary.files_in != (summary.ingested + summary.quarantined + summary.duplicates + summary.skipped
                            + summary.to_retry):
        raise RuntimeError(f"ingest accounting does not balance: {summary}; this is a bug in medtl.ingest")
    logger.info("%s", summary)
    return summary


def worker_settings(cfg: IngestConfig, outputs: Path) -> WorkerSettings:
    """What each worker needs from the ``ingest`` config, with outputs under ``outputs`` (the ingest folder)."""
    return WorkerSettings(image_size=cfg.image_size, spatial_dims=cfg.spatial_dims, site_attribute=cfg.site_attribute,
                          key=resolve_secret(cfg.deid), uid_root=cfg.deid.uid_root, keep_dicom=cfg.deid.keep_dicom,
                          deid=DeidOptions.from_config(cfg.deid), site_aliases=dict(cfg.deid.site_aliases),
                          pixels_cleaned_upstream=cfg.deid.pixels_cleaned_upstream, windowing=cfg.windowing,
                          max_decoded_bytes=cfg.max_decoded_mib * 1024**2, outputs=outputs,
                          philips_scaling=cfg.philips_scaling)


@dataclass
class _Plan:
    jobs: list[FileJob] = field(default_factory=list)
    # ledger rows decided without parsing (also skipped entries); a copy of a file that is a job of this run is a
    # "duplicate" row until that file's fate is known (:func:`_settle_planned`)
    duplicates: list[dict] = field(default_factory=list)
    already: list[tuple[str, str]] = field(default_factory=list)  # (status, content hash) from earlier runs


def _plan(files: list[tuple[str, Path]], skipped: list[tuple[str, str]], ledger: pd.DataFrame) -> _Plan:
    """Decide every entry's fate from its content hash (or why it is skipped) before doing any expensive work."""
    done = dict(zip(zip(ledger["path"], ledger["content_hash"]), ledger["status"]))
    owner = _owners(ledger)  # content hash → (path, status, reason) of the file that stands for those bytes
    plan = _Plan()

    def skip(rel: str, reason: str) -> None:
        # Nothing was read: the reason stands in for the content, so the entry counts as done until it changes.
        key = hashlib.sha256(f"skipped\0{reason}".encode()).hexdigest()
        if (rel, key) in done:
            plan.already.append((done[(rel, key)], key))
        else:
            logger.warning("skipped %s: %s", rel, reason)
            plan.duplicates.append(_ledger_row(rel, key, "skipped", reason))

    for rel, reason in skipped:
        skip(rel, reason)
    for rel, path in files:
        try:
            content_hash = file_sha256(path)
        except OSError as exc:
            skip(rel, f"unreadable: {(exc.strerror or str(exc)).lower()}; give the account running medtl read "
                      "access and run ingest again")
            continue
        status = done.get((rel, content_hash))
        if status is not None:
            plan.already.append((status, content_hash))
        elif content_hash in owner:
            first, first_status, first_reason = owner[content_hash]
            if first_status == "quarantined":  # an earlier run's: the same bytes fail the same way
                reason = _base_reason(first_reason) + _SAME_BYTES.format(first)
                plan.duplicates.append(_ledger_row(rel, content_hash, "quarantined", reason))
            else:  # ingested earlier, or a job of this run (settled with it, see _settle_planned)
                plan.duplicates.append(_ledger_row(rel, content_hash, "duplicate", f"same content as {first}"))
        else:
            owner[content_hash] = (rel, "", "")
            plan.jobs.append(FileJob(path, rel, content_hash))
    return plan


_SAME_BYTES = " (same bytes as {})"  # ends the reason of a quarantined copy, naming the first file with its bytes
_SAME_BYTES_PREFIX = _SAME_BYTES.split("{")[0]
_NO_COPY = " (no copy in quarantine/: "  # starts what _quarantine adds to a reason when it cannot copy


def _base_reason(reason: str) -> str:
    """``reason`` without what :func:`_quarantine` added to it, so that a copy's reason is about its bytes only."""
    head, sep, _ = reason.rpartition(_NO_COPY)
    return head if sep else reason


def _owners(ledger: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """For each content hash an earlier run ingested or quarantined, the ``(path, status, reason)`` of the file that
    stands for those bytes: the ingested one, else the quarantined one its copies name, else the first by path.

    Args:
        ledger: the stored ledger (without ``retry`` entries).

    Returns:
        Content hash → ``(path, status, reason)``.
    """
    rows: dict[str, list[tuple[str, str, str]]] = {}
    for path, content_hash, status, reason in zip(ledger["path"], ledger["content_hash"], ledger["status"],
                                                  ledger["reason"]):
        if status not in ("duplicate", "skipped"):
            rows.setdefault(content_hash, []).append((path, status, reason))
    owners = {}
    for content_hash, candidates in rows.items():
        # Copies quarantined by earlier runs all name their first file: naming it again keeps one "first" per content
        # rather than a chain of copies of copies.
        named = {_named_first(reason) for _, status, reason in candidates if status == "quarantined"}
        owners[content_hash] = min(candidates, key=lambda row: (row[1] != "ingested", row[0] not in named, row[0]))
    return owners


def _named_first(reason: str) -> str:
    """The first file a quarantined copy's ``reason`` names (see :data:`_SAME_BYTES`); "" when it names none."""
    base = _base_reason(reason)
    _, sep, named = base.rpartition(_SAME_BYTES_PREFIX)
    return named[:-1] if sep and named.endswith(")") else ""


def _settle_planned(plan: _Plan, files: Mapping[str, Path],
                    quarantine: Path) -> tuple[list[dict], dict[str, list[FileJob]]]:
    """Split the rows decided while planning into those final now and the copies that wait for their first file.

    A quarantined row is a copy of a file an earlier run quarantined: it is copied to ``quarantine/`` here. A
    ``duplicate`` row whose content hash is a job's (planning makes one job per new content) shares that job's
    fate, known once its result is settled (:func:`_copy_rows`).

    Args:
        plan: the run's plan.
        files: relative path → path of the files to read.
        quarantine: the quarantine folder.

    Returns:
        ``(rows, copies)``: the final ledger rows, and the waiting copies by their first file's relative path.
    """
    first_of = {job.content_hash: job.relpath for job in plan.jobs}
    rows: list[dict] = []
    copies: dict[str, list[FileJob]] = {}
    for row in plan.duplicates:
        rel, content_hash = row["path"], row["content_hash"]
        if row["status"] == "duplicate" and content_hash in first_of:
            copies.setdefault(first_of[content_hash], []).append(FileJob(files[rel], rel, content_hash))
        elif row["status"] == "quarantined":
            reason = row["reason"] + _quarantine(FileJob(files[rel], rel, content_hash), quarantine, copy=True)
            logger.warning("quarantined %s: %s", rel, reason)
            rows.append({**row, "reason": reason})
        else:
            rows.append(row)
    return rows, copies


def _copy_rows(first: dict, first_reason: str, copies: Iterable[FileJob], quarantine: Path) -> list[dict]:
    """Ledger rows of byte-identical copies of a file of this run, which share its fate.

    Args:
        first: the first file's ledger row.
        first_reason: its reason without what quarantining it added.
        copies: the other files with its content hash.
        quarantine: the quarantine folder.

    Returns:
        One row per copy: a ``duplicate`` naming the first file when that was ingested (or dropped as a repeated 3D
        slice); else the first file's status (``quarantined``, copied to ``quarantine/``, or ``retry``) with its
        reason, noting the first file.
    """
    rows = []
    for copy in copies:
        if first["status"] in ("ingested", "duplicate"):
            rows.append(_ledger_row(copy.relpath, copy.content_hash, "duplicate", f"same content as {first['path']}"))
            continue
        reason = first_reason + _SAME_BYTES.format(first["path"])
        if first["status"] == "quarantined":
            reason += _quarantine(copy, quarantine, copy=True)
            logger.warning("quarantined %s: %s", copy.relpath, reason)
        rows.append(_ledger_row(copy.relpath, copy.content_hash, first["status"], reason))
    return rows


def _process(results: Iterable[FileResult], n_jobs: int, settings: WorkerSettings, manifest: pd.DataFrame,
             ws: Workspace, copies: Mapping[str, list[FileJob]],
             checkpoint: Callable[[list[dict], list[dict]], object]) -> tuple[list[dict], list[dict]]:
    """Ingest or quarantine each job from its worker result (in input order); returns its ledger rows (and its
    byte-identical copies', from ``copies``: first file's relative path → copies) and the new manifest rows.

    ``checkpoint(ledger_rows, manifest_rows)`` is called every :data:`CHECKPOINT_SECONDS` so that a run
    that is killed loses at most that much work.
    """
    last_checkpoint = time.monotonic()
    sop_owner = dict(zip(manifest["sop_uid"], manifest["content_hash"]))
    ledger_rows: list[dict] = []
    manifest_rows: list[dict] = []
    slices: list[FileResult] = []
    for i, result in enumerate(results, start=1):
        job = result.job
        if result.headers and not result.reason:
            slices.append(_move_staged(result, ws))
            continue
        sop = result.record.get("sop_uid", "")
        if not result.reason and sop_owner.get(sop, job.content_hash) != job.content_hash:
            result.reason = (f"SOPInstanceUID collision: another file with different content already has this "
                             f"SOPInstanceUID (content hash {sop_owner[sop][:16]}); fix the UIDs at the source")
        if result.reason and is_resource_failure(result.reason):
            # Not the file's fault alone (a busy machine, a limit set low): nothing is copied, the next run retries.
            logger.warning("not ingested %s, retried by the next run: %s", job.relpath, result.reason)
            ledger_rows.append(_ledger_row(job.relpath, job.content_hash, "retry", result.reason))
        elif result.reason:
            reason = result.reason + _quarantine(job, ws.quarantine)
            logger.warning("quarantined %s: %s", job.relpath, reason)
            ledger_rows.append(_ledger_row(job.relpath, job.content_hash, "quarantined", reason))
        else:
            sop_owner[sop] = job.content_hash
            manifest_rows.append(_store(result, ws))
            ledger_rows.append(_ledger_row(job.relpath, job.content_hash, "ingested", "", manifest_rows[-1]["image"]))
        ledger_rows += _copy_rows(ledger_rows[-1], result.reason, copies.get(job.relpath, ()), ws.quarantine)
        if i % max(1, n_jobs // 10) == 0 or i == n_jobs:
            logger.info("processed %d/%d new files", i, n_jobs)
        if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
            checkpoint(ledger_rows, manifest_rows)
            last_checkpoint = time.monotonic()
    if slices:
        _process_series(slices, settings, ws, copies, ledger_rows, manifest_rows, checkpoint)
    shutil.rmtree(_staging(ws), ignore_errors=True)
    return ledger_rows, manifest_rows


def _staging(ws: Workspace) -> Path:
    # outputs the main process must settle (and 3D slices until their whole series is known) wait here; emptied at
    # each run's start and end
    return ws.ingest / STAGING


def _move_staged(result: FileResult, ws: Workspace) -> FileResult:
    for final, staged in result.staged.items():
        os.replace(staged, ws.ingest / final)
    return result


def assemble_series(group: SeriesGroup, image_size: int, decoded: Mapping[Path, np.ndarray],
                    philips_scaling: PhilipsScaling = "precise") -> tuple[Volume, np.ndarray]:
    """Assemble one series into its exact volume and its model-ready array.

    Args:
        group: slices of one series (headers without their datasets).
        image_size: side of the stored cubic array.
        decoded: each file's stored pixels, decoded in the sandbox.
        philips_scaling: ``ingest.philips_scaling`` (:func:`medtl.ingest.volume.assemble`).

    Returns:
        The volume and its ``(1, S, S, S)`` float32 array in [0, 1] (a 4D series contributes its first volume).

    Raises:
        RejectedSeries, RejectedFile: why the series cannot be assembled.
    """
    volume = assemble(group, decoded, philips_scaling)
    slope, intercept = volume.scaling
    values = volume.data[..., 0] if volume.data.ndim == 4 else volume.data
    return volume, preprocess(values.astype(np.float64) * slope + intercept, image_size).astype(np.float32)


def _process_series(slices: list[FileResult], settings: WorkerSettings, ws: Workspace,
                    copies: Mapping[str, list[FileJob]], ledger_rows: list[dict], manifest_rows: list[dict],
                    checkpoint: Callable[[list[dict], list[dict]], object]) -> None:
    """3D: group the new files' slices into series, assemble each from the pixels the sandbox decoded, write
    NIfTI + arrays. Assembly parses nothing (the stashed arrays are our own ``.npy``), so it runs here.

    Args:
        slices: the results of the files that hold 3D slices, in input order.
        settings: the workers' settings (``image_size``).
        ws: the run's workspace.
        copies: first file's relative path → its byte-identical copies, settled with it.
        ledger_rows: this run's ledger rows, extended with one per slice file (and per copy).
        manifest_rows: this run's manifest rows, extended with one per volume.
        checkpoint: called once all are settled, to write the tables.
    """
    by_path = {r.job.path: r for r in slices}
    fate: dict[Path, tuple[str, str, str]] = {}  # (status, reason, image); a file in several groups: first wins
    volumes = []
    for group in group_series(h for r in slices for h in r.headers):
        if is_volume_series(group):
            volumes.append(group)
        else:
            for path in group.files:
                fate.setdefault(path, ("quarantined", "2D image (one slice position, or no ImagePositionPatient / "
                                                      "ImageOrientationPatient) but ingest.spatial_dims is 3; "
                                                      "ingest it with spatial_dims: 2", ""))
    (ws.ingest / "volumes").mkdir(parents=True, exist_ok=True)
    for group in volumes:
        members = [by_path[p] for p in group.files]
        decoded = {r.job.path: np.load(_staging(ws) / f"{r.job.content_hash}.pixels.npy", allow_pickle=False)
                   for r in members}
        try:
            volume, array = assemble_series(group, settings.image_size, decoded, settings.philips_scaling)
        except (RejectedSeries, RejectedFile) as exc:
            for path in group.files:
                fate.setdefault(path, ("quarantined", f"{group.describe()}: {exc}", ""))
            continue
        dropped = set(volume.dropped_files)
        kept = [r for r in members if r.job.path not in dropped]
        manifest_rows.append(_store_volume(group, volume, array, kept, ws))
        for path in volume.derived_files:  # part of the series as sent, left out of its volume: said so, not lost
            fate.setdefault(path, ("ingested", f"{group.describe()}: derived isotropic (trace) diffusion image, left "
                                               "out of the series' 4D volume as dcm2niix leaves it out",
                                   manifest_rows[-1]["image"]))
        for path in group.files:
            # The kept file is named by its path below the input folder, as in the ledger: never an absolute path.
            fate.setdefault(path, ("duplicate", f"{group.describe()}: same position and pixels as "
                                                f"{by_path[volume.duplicate_of[path]].job.relpath}", "")
                            if path in dropped else ("ingested", "", manifest_rows[-1]["image"]))
    # A dropped slice may be the same instance as the kept one (same SOP Instance UID, another transfer syntax):
    # their de-identified copies share one name, which stays the kept slice's.
    ingested_sops = {r.record["sop_uid"] for p, r in by_path.items() if fate[p][0] == "ingested"}
    for path, result in by_path.items():
        status, reason, image = fate[path]
        if status != "ingested" and result.record["sop_uid"] not in ingested_sops:
            # its de-identified copy was written when it arrived; it is not an output
            (ws.ingest / "dicom" / f"{result.record['sop_uid']}.dcm").unlink(missing_ok=True)
        if status == "quarantined":
            reason += _quarantine(result.job, ws.quarantine)
            logger.warning("quarantined %s: %s", result.job.relpath, reason)
        ledger_rows.append(_ledger_row(result.job.relpath, result.job.content_hash, status, reason, image))
        ledger_rows += _copy_rows(ledger_rows[-1], fate[path][1], copies.get(result.job.relpath, ()), ws.quarantine)
    checkpoint(ledger_rows, manifest_rows)


def _store_volume(group: SeriesGroup, volume: Volume, array: np.ndarray, members: list[FileResult],
                  ws: Workspace) -> dict:
    # The series' acquisition fields (vendor, spacing, bits_stored, photometric, view_position, body_part) are its
    # first kept slice's: grouping splits a series whose slices differ in matrix or spacing, and the others are
    # per-acquisition attributes. rows / columns become the volume's in-plane matrix below.
    record = dict(members[0].record)
    # The de-identified series UID names the outputs: SeriesDescription could carry identifying text.
    stem = record["series_uid"] + (f"_{group.part}" if group.part else "")
    nifti = Path("volumes") / f"{stem}.nii"
    write_nifti(volume, ws.ingest / nifti)
    image = Path("arrays") / f"{stem}.npy"
    buffer = io.BytesIO()
    np.save(buffer, array)
    _write_atomic(ws.ingest / image, buffer.getvalue())
    digest = hashlib.sha256("".join(sorted(r.job.content_hash for r in members)).encode()).hexdigest()
    shape = volume.data.shape
    record.update(image=image.as_posix(), volume=nifti.as_posix(), intensity_scaling=volume.scaling_source,
                  label=pd.NA, content_hash=digest,
                  sop_uid="", rows=int(shape[1]), columns=int(shape[0]))
    return record


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
    lost = (ledger["status"] == "ingested") & ~ledger["image"].isin(set(manifest["image"]))
    if lost.any():
        logger.warning("%d previously ingested files lost their array or manifest row; ingesting them again",
                       int(lost.sum()))
    return ledger[~lost].reset_index(drop=True), manifest


def remove_partial_files(root: Path) -> int:
    """Delete the temporary files a killed run left behind (``.<name>.tmp``), so none is ever mistaken for output.

    Args:
        root: the ingest folder.

    Returns:
        How many were removed.
    """
    partial = [p for p in root.rglob(f".*{_PARTIAL_SUFFIX}*") if p.is_file()]
    for path in partial:
        path.unlink()
    if partial:
        logger.info("removed %d partial files left by an interrupted run", len(partial))
    return len(partial)


def discover(input_dir: Path, skip: Iterable[Path] = ()) -> list[tuple[str, Path]]:
    """The files to read below ``input_dir``, sorted by relative path (:func:`scan_inputs` without the entries it
    skips).

    Args:
        input_dir: the folder to walk.
        skip: files or folders to leave out (the labels CSV, an ingest folder inside the input).

    Returns:
        ``(relative posix path, path)`` pairs.
    """
    return scan_inputs(input_dir, skip)[0]


def scan_inputs(input_dir: Path, skip: Iterable[Path] = ()) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Every entry below ``input_dir``: the files to read and, with why, the entries not to read.

    A symbolic link is read only when it leads to a regular file inside ``input_dir``. Links leaving the folder,
    loops, broken links, links to folders (their files are counted under their own paths), FIFOs, sockets,
    devices and folders that cannot be listed are skipped, each with its reason.

    Args:
        input_dir: the folder to walk.
        skip: files or folders to leave out (the labels CSV, an ingest folder inside the input): not inputs.

    Returns:
        ``(files, skipped)``: ``(relative path, path)`` pairs of the files to read and ``(relative path,
        reason)`` pairs of the others, each sorted by relative path. Relative paths use ``/`` and write the
        bytes of a name that is not valid UTF-8 as ``\\xNN``.
    """
    excluded = {p.resolve() for p in skip}
    root = input_dir.resolve()
    found: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    folders = [("", Path())]  # (relative path as recorded, relative path on disk)
    while folders:
        relative, on_disk = folders.pop()
        try:
            entries = list(os.scandir(input_dir / on_disk))
        except OSError as exc:
            if not relative:
                raise
            skipped.append((relative, f"folder cannot be listed: {(exc.strerror or str(exc)).lower()}; its "
                                      "files are not counted"))
            continue
        for entry in entries:
            rel = f"{relative}/{_printable(entry.name)}" if relative else _printable(entry.name)
            path = input_dir / on_disk / entry.name
            if entry.is_symlink():
                reason = _link_reason(path, root, excluded)
                if reason is None:
                    found.append((rel, path))
                elif reason:
                    skipped.append((rel, reason))
            elif root / on_disk / entry.name in excluded:
                continue
            elif entry.is_dir(follow_symlinks=False):
                folders.append((rel, on_disk / entry.name))
            elif entry.is_file(follow_symlinks=False):
                found.append((rel, path))
            else:
                skipped.append((rel, f"not a regular file ({_kind(entry.stat(follow_symlinks=False).st_mode)})"))
    return sorted(found), sorted(skipped)


def _link_reason(link: Path, root: Path, excluded: set[Path]) -> str | None:
    """Why a symbolic link is not read; ``None`` to read it (a regular file inside ``root``), ``""`` to leave it
    out (it leads to an excluded path)."""
    try:
        mode = os.stat(link).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: not followed"
        if exc.errno == errno.ENOENT:
            return "broken symbolic link: its target does not exist"
        return f"symbolic link whose target cannot be examined: {(exc.strerror or str(exc)).lower()}"
    real = Path(os.path.realpath(link))
    if real in excluded:
        return ""
    if not real.is_relative_to(root):
        # Reading through it could pull in any file the process may read: accounted for, never followed.
        return "symbolic link leaving the input folder: not followed; copy the file or folder in instead"
    if stat.S_ISDIR(mode):
        return ("symbolic link to a folder inside the input folder: not followed, its files are counted under "
                "their own paths")
    if not stat.S_ISREG(mode):
        return f"symbolic link to something that is not a regular file ({_kind(mode)})"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):o}"


def _printable(name: str) -> str:
    """``name`` as valid UTF-8: undecodable bytes (lone surrogates from ``os.fsdecode``) written ``\\xNN``, so that
    Parquet, JSON and logs can hold it."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
    image_of = {h: image for h, image in zip(ledger["content_hash"], ledger["image"]) if image}
    by_image: dict[str, int] = {}
    for path, content_hash, image in zip(ledger["path"], ledger["content_hash"], ledger["image"]):
        target = image or image_of.get(content_hash)  # a duplicate's label goes to its original's image
        if path in labels and target:
            if by_image.setdefault(target, labels[path]) != labels[path]:
                logger.warning("%s: label %d conflicts with %d given to another file of the same image or "
                               "series; keeping %d", path, labels[path], by_image[target], by_image[target])
    out = manifest.copy()
    out["label"] = pd.array([by_image.get(image, old) for image, old in zip(out["image"], out["label"])],
                            dtype="Int64")
    return out


def _ledger_row(path: str, content_hash: str, status: str, reason: str, image: str = "") -> dict:
    return {"path": path, "content_hash": content_hash, "status": status, "reason": reason, "image": image}


def _concat(first: pd.DataFrame, second: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    frames = [f for f in (first, second) if len(f)]
    return pd.concat(frames, ignore_index=True).astype(columns) if frames else as_table([], columns)


# ----------------------------------------------------------------------------------------------
# running the per-file work (medtl.ingest.worker) in the sandbox


def _run(jobs: list[FileJob], settings: WorkerSettings, cfg: IngestConfig) -> Iterator[FileResult]:
    workers = max(1, min(cfg.workers or available_cpus(), len(jobs)))
    return sandboxed_map(functools.partial(ingest_file, settings=settings), jobs, workers=workers,
                         memory_mb=cfg.worker_memory_mb, timeout_s=cfg.file_timeout_s,
                         on_failure=lambda job, reason: FileResult(job, reason=reason))


# ----------------------------------------------------------------------------------------------
# settling outputs in input order (main process)


def _store(result: FileResult, ws: Workspace) -> dict:
    _move_staged(result, ws)  # a name a worker found taken goes to this input, the first in input order to claim it
    return {**result.record, "image": f"arrays/{result.record['sop_uid']}.npy", "volume": "", "label": pd.NA}


def _quarantine(job: FileJob, quarantine: Path, copy: bool = False) -> str:
    """Copy ``job``'s file to ``quarantine/<hash[:16]>_<name>``; returns what to add to its reason ("" when copied).

    The name keeps at most the last :data:`_QUARANTINE_NAME_BYTES` bytes of the input's (its extension, within
    the file system's 255), written as in the ledger.

    Args:
        job: the file.
        quarantine: the quarantine folder.
        copy: the file is a byte-identical copy of another quarantined file, so its content hash (and maybe its
            name, from another folder) is that file's: ``<hash[:16]>_<sha256 of its relative path[:8]>_<name>``
            keeps one copy per input file instead of overwriting the first's.

    Returns:
        ``""``, or why no copy was made, to append to the ledger reason.
    """
    name = job.relpath.rsplit("/", 1)[-1]
    while len(name.encode()) > _QUARANTINE_NAME_BYTES:
        name = name[1:]
    if copy:
        name = f"{hashlib.sha256(job.relpath.encode()).hexdigest()[:8]}_{name}"
    target = quarantine / f"{job.content_hash[:16]}_{name}"
    tmp = target.with_name(f".{target.name}{_PARTIAL_SUFFIX}")
    try:
        copy_sparse(job.path, tmp)
        os.replace(tmp, target)
    except OSError as exc:  # e.g. the file went away or became unreadable since it was hashed
        tmp.unlink(missing_ok=True)
        return f" (no copy in quarantine/: {(exc.strerror or str(exc)).lower()})"
    return ""


def copy_sparse(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, leaving the source's holes unwritten, so that a sparse file that declares
    terabytes costs only its real data on disk.

    Args:
        source: the file to copy.
        target: the copy (created or replaced).

    Raises:
        OSError: when either file cannot be opened, read or written.
    """
    if not hasattr(os, "SEEK_DATA"):  # Windows: no way to find the holes
        shutil.copyfile(source, target)
        return
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
                end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                if exc.errno != errno.EINVAL:
                    raise
                start, end = offset, size  # a file system that cannot tell holes: copy the rest as data
            src.seek(start)
            dst.seek(start)
            while start < end and (chunk := src.read(min(_HASH_CHUNK, end - start))):
                dst.write(chunk)
                start += len(chunk)
            offset = end
        dst.truncate(size)  # a trailing hole, written as length only


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{_PARTIAL_SUFFIX}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
