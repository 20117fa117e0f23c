"""The per-file half of ingestion, which runs in sandboxed worker processes (:mod:`medtl.ingest.sandbox`).

Kept apart from :mod:`medtl.ingest.folder` so that a worker imports only what parsing a file needs
(pydicom, numpy, the de-identification tables), not the tables and configuration machinery of the
main process: every worker start, and every restart after a hostile file killed one, pays for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medtl.ingest.deid import DeidOptions, burned_in_annotation_risk, deidentify, site_label
from medtl.ingest.reader import RejectedFile, decode, n_frames, preprocess, read_dataset, validate, voi_window
from medtl.ingest.volume import RejectedSeries, SliceHeader, decode_stored, read_slice_headers
from medtl.ingest.writer import write_dicom


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to ingest one file (picklable); outputs go under ``outputs`` (the ingest folder)."""

    image_size: int
    spatial_dims: int
    site_attribute: str
    key: bytes
    uid_root: str
    keep_dicom: bool
    deid: DeidOptions
    site_aliases: dict[str, str]
    pixels_cleaned_upstream: bool
    windowing: str
    max_decoded_bytes: int
    outputs: Path
    philips_scaling: str = "precise"  # ingest.philips_scaling: applied where series are assembled

    @property
    def staging(self) -> Path:
        """Where outputs wait under ``<content hash>.*`` until they can take their final names."""
        return self.outputs / STAGING


@dataclass(frozen=True)
class FileJob:
    """One input file: where it is, its path relative to the input folder, the sha256 of its bytes."""

    path: Path
    relpath: str
    content_hash: str


STAGING = ".staging"


@dataclass
class FileResult:
    """A worker's verdict on one file; no large payload crosses between processes.

    A 2D image's outputs take their final names in the worker (``arrays/<SOP UID>.npy``, and
    ``dicom/<SOP UID>.dcm`` when DICOM copies are kept), each only if that name is free. Every other output
    waits in the staging folder and is listed in ``staged`` for the main process, which settles it in
    input order: a name already taken (SOP Instance UID collision, or a killed run's leftover), a 3D
    slice's DICOM copy, whose fate depends on its whole series. 3D stored pixels stay in staging under
    ``<content hash>.pixels.npy`` until their series is assembled.
    """

    job: FileJob
    reason: str = ""
    record: dict = field(default_factory=dict)
    headers: list[SliceHeader] = field(default_factory=list)  # 3D: the file's slices, assembled per series later
    staged: dict[str, Path] = field(default_factory=dict)  # final path (relative to the ingest folder) -> staged file


def ingest_file(job: FileJob, settings: WorkerSettings) -> FileResult:
    """Read, validate, decode, preprocess and de-identify one file.

    Args:
        job: the file.
        settings: image size, dimensionality, site attribute and de-identification key.

    Returns:
        A result with either ``reason`` (quarantine) or the array, the de-identified DICOM bytes
        and the manifest fields.

    Raises:
        MemoryError: when parsing ran out of memory (also when a library wrapped the MemoryError in another
            error): this worker's memory may stay used, so the sandbox must replace it. Nothing else escapes.
    """
    try:
        ds = read_dataset(job.path, max_bytes=settings.max_decoded_bytes)
        if is_dicomdir(ds):
            raise RejectedFile(dicomdir_reason(ds))
        if "SOPInstanceUID" not in ds:
            raise RejectedFile("no SOPInstanceUID (0008,0018): the image cannot be identified")
        if risk := burned_in_annotation_risk(ds, settings.pixels_cleaned_upstream):
            raise RejectedFile(risk)
        array, headers, pixels = None, [], None
        if settings.spatial_dims == 2:
            validate(ds, 2, max_decoded_bytes=settings.max_decoded_bytes)
            array = _model_array(ds, settings)
        else:
            validate(ds, 2 if n_frames(ds) == 1 else 3, max_decoded_bytes=settings.max_decoded_bytes)
            # pixels are decoded per series, once every slice of it is known
            # SeriesDescription is free text from before de-identification: it must not reach reasons or logs
            headers = [replace(h, dataset=None, series_description="") for h in read_slice_headers(job.path, ds)]
            if n_frames(ds) > 1 and not any(h.has_geometry for h in headers):
                headers = []  # a multi-frame file without patient geometry: its frames are the slices, no NIfTI
                array = _model_array(ds, settings)
            else:
                try:
                    pixels = decode_stored(ds, job.relpath)
                except RejectedSeries as exc:
                    raise RejectedFile(str(exc)) from exc
        # Without the site attribute the first folder names the site: a folder name is as identifying as the
        # attribute (often the hospital's name), so it goes through the same aliases or pseudonym.
        raw_site = str(ds.get(settings.site_attribute, "") or "").strip()
        raw_site = raw_site or (job.relpath.split("/")[0] if "/" in job.relpath else "")
        record = {
            "hospital": site_label(raw_site, settings.site_aliases, settings.key) or "unknown",
            "vendor": str(ds.get("Manufacturer", "") or ""),
            "model": str(ds.get("ManufacturerModelName", "") or ""),
            "modality": str(ds.get("Modality", "") or ""),
            "content_hash": job.content_hash,
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "pixel_spacing_mm": _pixel_spacing(ds),
            "intensity_scaling": "",  # a volume's is set when its series is assembled
        }
        clean = deidentify(ds, settings.key, settings.uid_root, options=settings.deid)
        record.update(patient_id=str(clean.get("PatientID", "")), study_uid=str(clean.get("StudyInstanceUID", "")),
                      series_uid=str(clean.get("SeriesInstanceUID", "")), sop_uid=str(clean.SOPInstanceUID),
                      sex=_patient_sex(clean), age=age_in_years(str(clean.get("PatientAge", "") or "")),
                      study_date=_iso_date(str(clean.get("StudyDate", "") or "")), split="",
                      **acquisition_fields(clean))
        stem = settings.staging / job.content_hash  # content hashes are hex: safe names, one per input
        outputs = {}
        if array is not None:
            np.save(outputs.setdefault(f"arrays/{record['sop_uid']}.npy", Path(f"{stem}.npy")), array,
                    allow_pickle=False)
        if pixels is not None:
            np.save(f"{stem}.pixels.npy", pixels, allow_pickle=False)
        if settings.keep_dicom:
            write_dicom(outputs.setdefault(f"dicom/{record['sop_uid']}.dcm", Path(f"{stem}.dcm")), clean)
        if not headers:  # a 2D image: its outputs are final now, unless a name is taken (then it and the rest wait)
            for final, staged in list(outputs.items()):
                if not _claim(staged, settings.outputs / final):
                    break
                del outputs[final]
        return FileResult(job, record=record, headers=headers, staged=outputs)
    except Exception as exc:  # one malformed file must not stop the run; the reason keeps the evidence
        if isinstance(exc, MemoryError):
            raise
        if _out_of_memory(exc):
            raise MemoryError(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(exc, RejectedFile):
            return FileResult(job, reason=str(exc))
        return FileResult(job, reason=f"unexpected error while ingesting: {type(exc).__name__}: {exc}")


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` was raised because of a MemoryError (a decoder may wrap it in its own error)."""
    while exc is not None:
        if isinstance(exc, MemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _claim(staged: Path, final: Path) -> bool:
    """Give ``staged`` the name ``final`` if no file has it (atomically: a hard link fails on a taken name)."""
    try:
        os.link(staged, final)
    except OSError:  # taken, or a file system without hard links: the main process moves it
        return False
    os.unlink(staged)
    return True


MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def is_dicomdir(ds: Dataset) -> bool:
    """Whether ``ds`` is a media directory (DICOMDIR) rather than an image."""
    return ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


def dicomdir_reason(ds: Dataset) -> str:
    """The quarantine reason of a DICOMDIR: how many files it references and how many of those would escape the
    folder, never the file IDs themselves (they are paths of the source system, often named after patients).

    Ingestion walks the folder itself and never follows a DICOMDIR's references, so the files it lists are
    ingested (or not) as ordinary files, and a file ID like ``../../etc/passwd`` is never opened.
    """
    file_ids = []
    for record in ds.get("DirectoryRecordSequence", []):
        value = record.get("ReferencedFileID")
        if value is not None:
            parts = [value] if isinstance(value, str) else list(value)
            file_ids.append("/".join(str(p) for p in parts))
    escaping = [f for f in file_ids if f.startswith("/") or ".." in f.replace("\\", "/").split("/")]
    reason = (f"DICOMDIR (media directory index, no image; DICOMDIRs are not ingested): its {len(file_ids)} "
              "referenced files are ingested as ordinary files of the folder")
    if escaping:
        reason += f"; {len(escaping)} of its file IDs point outside the folder and were never opened"
    return reason


def _model_array(ds: Dataset, settings: WorkerSettings) -> np.ndarray:
    voi = voi_window(ds) if settings.windowing == "dicom" else None
    return preprocess(decode(ds), settings.image_size, voi=voi).astype(np.float32)


def _patient_sex(ds: Dataset) -> str:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return sex if sex in ("M", "F", "O") else ""


_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_in_years(value: str) -> float:
    """A DICOM Age String (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``) in years; NaN when empty or malformed.

    Examples:
        >>> age_in_years("045Y"), age_in_years("006M"), math.isnan(age_in_years(""))
        (45.0, 0.5, True)
    """
    value = value.strip().upper()
    if len(value) != 4 or not value[:3].isdigit() or value[3] not in _AGE_UNIT_YEARS:
        return math.nan
    return int(value[:3]) * _AGE_UNIT_YEARS[value[3]]


def _iso_date(value: str) -> str:
    value = value.strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return ""


def acquisition_fields(ds: Dataset) -> dict[str, int | str]:
    """The manifest's acquisition fields of one image: bit depth, photometric interpretation, view, body part.

    Read from the *de-identified* dataset: the allow-list keeps all four (PS3.15 Table E.1-1 lists none of
    them), and reading what survives de-identification guarantees that no attribute the profile removes ever
    reaches the manifest, whatever options are configured.

    Args:
        ds: the de-identified dataset.

    Returns:
        ``{"bits_stored": int (0 when absent or malformed), "photometric": str, "view_position": str,
        "body_part": str}``, strings stripped and ``""`` when absent.

    Examples:
        >>> ds = Dataset()
        >>> ds.BitsStored, ds.PhotometricInterpretation, ds.ViewPosition = 12, "MONOCHROME2", "AP"
        >>> acquisition_fields(ds)
        {'bits_stored': 12, 'photometric': 'MONOCHROME2', 'view_position': 'AP', 'body_part': ''}
    """
    try:
        bits_stored = int(ds.get("BitsStored", 0) or 0)
    except (TypeError, ValueError):  # a malformed value is for validation to judge, not for the manifest
        bits_stored = 0
    return {"bits_stored": bits_stored,
            "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip(),
            "view_position": str(ds.get("ViewPosition", "") or "").strip(),
            "body_part": str(ds.get("BodyPartExamined", "") or "").strip()}


def _pixel_spacing(ds: Dataset) -> float:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = float(ds[keyword].value[0])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return math.nan
