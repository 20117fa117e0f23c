"""The manifest (one row per ingested image) and the ledger (one row per input file).

The manifest is what every later stage reads (through :func:`load_manifest`); its columns are
documented in ``docs/architecture.md``. The ledger records the fate of every entry of the input folder —
ingested, quarantined (with the reason), duplicate, skipped without being read (with the reason) or to retry
after a resource limit — keyed by path and content hash, which is what makes re-running ingestion incremental.

Both are Parquet files written atomically (temporary file + rename), so an interrupted run never
leaves a half-written table behind.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medtl.workspace import Workspace, atomic_write

MANIFEST_COLUMNS: dict[str, str] = {
    "image": "str",  # relative to the ingest folder
    "volume": "str",  # 3D: the series' exact NIfTI (volumes/<series>.nii), relative to the ingest folder; else ""
    "label": "Int64",
    "patient_id": "str",
    "study_uid": "str",
    "series_uid": "str",
    "sop_uid": "str",
    "hospital": "str",
    "vendor": "str",
    "model": "str",
    "modality": "str",
    "content_hash": "str",
    "rows": "int64",  # original matrix size, before resizing
    "columns": "int64",
    "pixel_spacing_mm": "float64",  # original row spacing (PixelSpacing, else ImagerPixelSpacing); NaN if absent
    # How the image was acquired, as recorded (kept by the de-identification profile, read from what survives it):
    # the shortcut audit (medtl.evaluate.shortcut) asks whether these predict the label or the hospital. The aspect
    # ratio is derived (columns / rows), not stored.
    "bits_stored": "int64",  # BitsStored (detector bit depth of the stored values); 0 when absent
    "photometric": "str",  # PhotometricInterpretation: MONOCHROME1 (inverted) / MONOCHROME2 / RGB ...
    "view_position": "str",  # ViewPosition (PA, AP, LL ...; AP = often a portable unit at the bedside); "" if absent
    "body_part": "str",  # BodyPartExamined (CHEST ...); "" when absent
    # 3D: how the NIfTI's scl_slope/scl_inter were chosen (medtl.ingest.volume.Volume.scaling_source): rescale
    # (RescaleSlope/Intercept), philips_precise (Philips' floating-point values), "…_per_slice"; "" for 2D images
    "intensity_scaling": "str",
    # After de-identification, so present only where the options keep them (ingest.retain_patient_characteristics,
    # ingest.longitudinal_temporal); they feed the report's subgroup table and provenance dates.
    "sex": "str",  # PatientSex: M / F / O, "" when not recorded or removed
    "age": "float64",  # PatientAge in years (D/W/M units converted); NaN when not recorded or removed
    "study_date": "str",  # StudyDate as YYYY-MM-DD (shifted under longitudinal_temporal="shift"); "" when removed
    # A dataset's own split (train / val / test) when it comes with one, e.g. a public benchmark's official split;
    # "" = assigned by patient hash (medtl.data.datasets.assign_splits). DICOM ingestion leaves it "".
    "split": "str",
}

LEDGER_COLUMNS: dict[str, str] = {
    "path": "str",  # relative to the input folder, posix separators
    "content_hash": "str",
    "status": "str",  # one of STATUSES
    "reason": "str",  # empty for ingested files, but for a note on one left out of its series' volume
    "image": "str",  # ingested: the manifest image it went into (3D: its series' array); else empty
}

STATUSES = ("ingested", "quarantined", "duplicate", "skipped", "retry")


def ledger_path(ws: Workspace) -> Path:
    """Where the ledger of ``ws`` lives.

    Args:
        ws: the run's workspace.

    Returns:
        ``<workdir>/ingest/ledger.parquet``.
    """
    return ws.ingest / "ledger.parquet"


def as_table(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    """Build a frame with exactly ``columns`` (in order) and their dtypes.

    Args:
        rows: records holding at least the keys of ``columns``.
        columns: column name to dtype.

    Returns:
        The typed frame (empty but typed when ``rows`` is empty).
    """
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)


def _read(path: Path, columns: dict[str, str], what: str) -> pd.DataFrame:
    if not path.is_file():
        return as_table([], columns)
    frame = pd.read_parquet(path)
    if list(frame.columns) != list(columns):
        raise ValueError(f"{what} {path} has columns {list(frame.columns)}, expected {list(columns)}; "
                         "it was written by another version of medtl: delete the ingest folder and re-run ingest")
    return frame.astype(columns)


def write_table_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` as Parquet without ever exposing a partial file at ``path``.

    Args:
        frame: the table.
        path: destination.
    """
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_manifest(ws: Workspace) -> pd.DataFrame:
    """The manifest as stored (``image`` relative to ``ws.ingest``); empty if there is none yet.

    Args:
        ws: the run's workspace.

    Returns:
        Frame with :data:`MANIFEST_COLUMNS`.
    """
    return _read(ws.manifest, MANIFEST_COLUMNS, "manifest")


def load_ledger(ws: Workspace) -> pd.DataFrame:
    """The ledger of every input file seen so far; empty if there is none yet.

    Args:
        ws: the run's workspace.

    Returns:
        Frame with :data:`LEDGER_COLUMNS`.
    """
    return _read(ledger_path(ws), LEDGER_COLUMNS, "ledger")


def merge_manifest(previous: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Append this run's rows to the previous manifest, one row per content hash.

    Args:
        previous: the stored manifest.
        new: rows of images ingested in this run.

    Returns:
        The merged manifest; on a repeated hash the earlier row wins.
    """
    frames = [f for f in (previous, new) if len(f)]
    if not frames:
        return as_table([], MANIFEST_COLUMNS)
    merged = pd.concat(frames, ignore_index=True).astype(MANIFEST_COLUMNS)
    return merged.drop_duplicates(subset="content_hash", keep="first").reset_index(drop=True)


def load_manifest(ws: Workspace) -> pd.DataFrame:
    """The manifest for later stages, with ``image`` as an absolute path.

    Args:
        ws: the run's workspace.

    Returns:
        Frame with :data:`MANIFEST_COLUMNS`; ``label`` is nullable ``Int64`` (``<NA>`` = unlabeled).

    Raises:
        FileNotFoundError: when ingestion has not run in this workspace.
    """
    if not ws.manifest.is_file():
        raise FileNotFoundError(f"no manifest at {ws.manifest}; run the ingest stage (medtl ingest) first")
    frame = read_manifest(ws)
    root = ws.ingest.resolve()
    frame["image"] = [str(root / rel) for rel in frame["image"]]
    return frame
