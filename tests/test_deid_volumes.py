"""De-identification in 3D: a synthetic MR series full of planted PHI goes through the real ingestion with
``spatial_dims: 3``; no marker, UID root or date may reach any output file (the NIfTI volume included) or any
output file name, and the volume is named by the de-identified series UID, never by SeriesDescription."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medtl.config import DeidConfig, IngestConfig
from medtl.ingest import ingest_folder, load_ledger
from medtl.ingest.manifest import read_manifest
from medtl.workspace import Workspace
from tests.test_deid import Markers, medtl_log

MR = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.999.424242.3"  # distinctive: "999.424242" must appear in no output
UID_MARK = "999.424242"
SLICES, SIZE, SLICE_STEP_MM = 6, 16, 2.0
INSTITUTION = "PHI Memorial Hospital of Ninewells"  # raw site name; the alias must replace it everywhere
DATES = {  # distinctive, one per attribute; none may survive (a shifted date differs)
    "PatientBirthDate": "19610823", "StudyDate": "20080311", "SeriesDate": "20080312",
    "AcquisitionDate": "20080313", "ContentDate": "20080314", "InstanceCreationDate": "20080315",
}
NESTED_DATE = "20080316"
DATETIME = "20080313101530.250000+0100"


def slice_pixels(k: int) -> np.ndarray:
    """Stored values of slice ``k``, shape ``(SIZE, SIZE)`` uint16 (12 bits used), distinct per slice."""
    return (np.add.outer(np.arange(SIZE) * 16, np.arange(SIZE)) * 8 + k * 100).astype(np.uint16)


def planted_series(m: Markers) -> list[Dataset]:
    """``SLICES`` axial MR slices of one series, 2 mm apart, each carrying PHI in names, IDs, dates,
    addresses, the institution, descriptions, nested sequences and private elements; ``m`` records every
    marker (descriptions are ``descriptor`` markers, kept by the Clean Descriptors option)."""
    patient = {"PatientName": f"{m('PatientName family')}^{m('PatientName given')}", "PatientID": m("PatientID")}
    for keyword in ("ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                    "NameOfPhysiciansReadingStudy", "OtherPatientNames"):
        patient[keyword] = f"{m(keyword)}^{m(keyword + ' given')}"
    for keyword in ("OtherPatientIDs", "AccessionNumber", "StudyID", "IssuerOfPatientID", "PatientAddress",
                    "PatientTelephoneNumbers", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                    "DeviceSerialNumber", "RequestingPhysician"):
        patient[keyword] = m(keyword)
    family, given = patient["PatientName"].split("^")
    identity = f"{family} {given} {patient['PatientID']} 1961-08-23 +41 79 555 1234"
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName", "PatientComments",
                    "AdditionalPatientHistory"):
        # "T1 MPRAGE" would survive a file-name sanitiser: the series' outputs must not be named after it
        patient[keyword] = f"{m(keyword, descriptor=True)} T1 MPRAGE {identity}"[:64]
    nested_name, nested_private = m("nested L2 PatientName"), m("nested L2 private element")
    nested_operator, request_id = m("nested L1 PerformingPhysicianName"), m("RequestAttributes RequestedProcedureID")
    step_description = m("ScheduledProcedureStepDescription", descriptor=True)
    private_creator, private_lo = m("private creator"), m("private LO")
    private_ob = m("private OB")

    series = []
    for k in range(SLICES):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.Modality, ds.BurnedInAnnotation = MR, "MR", "NO"
        ds.SOPInstanceUID = f"{UID_ROOT}.3.{k + 1}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{UID_ROOT}.1", f"{UID_ROOT}.2"
        ds.FrameOfReferenceUID = f"{UID_ROOT}.4"
        ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName = "ACME", "Scanner 3T", INSTITUTION
        for keyword, value in patient.items():
            setattr(ds, keyword, value)
        ds.ImageComments = f"{m(f'ImageComments slice {k}', descriptor=True)} {identity}"
        for keyword, value in DATES.items():
            setattr(ds, keyword, value)
        ds.AcquisitionDateTime, ds.StudyTime, ds.SeriesTime = DATETIME, "101503", "101604"
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 4, k + 1, 1

        level2 = Dataset()
        level2.ReferencedSOPClassUID, level2.ReferencedSOPInstanceUID = MR, f"{UID_ROOT}.6"
        level2.PatientName, level2.StudyDate = nested_name, NESTED_DATE
        level2.add_new(0x00310010, "LO", "OTHER CREATOR")
        level2.add_new(0x00311001, "LT", nested_private)
        level1 = Dataset()
        level1.ReferencedSOPClassUID, level1.ReferencedSOPInstanceUID = MR, f"{UID_ROOT}.5"
        level1.PerformingPhysicianName = nested_operator
        level1.SourceImageSequence = Sequence([level2])
        ds.ReferencedImageSequence = Sequence([level1])
        request = Dataset()
        request.RequestedProcedureID, request.ScheduledProcedureStepDescription = request_id, step_description
        ds.RequestAttributesSequence = Sequence([request])
        ds.add_new(0x00290010, "LO", private_creator)
        ds.add_new(0x00291010, "LO", private_lo)
        ds.add_new(0x00291011, "OB", private_ob.encode())

        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-7.5, -7.5, -5.0 + SLICE_STEP_MM * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], SLICE_STEP_MM
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = slice_pixels(k).astype("<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MR, ds.SOPInstanceUID
        series.append(ds)
    return series


def needles(m: Markers, allowed: set[str]) -> dict[bytes, str]:
    """Byte strings that must not appear in an output (or its name) → what they are."""
    found = {marker.encode(): where for marker, where in m.where.items() if marker not in allowed}
    found[UID_MARK.encode()] = "UID root"
    found[b"Ninewells"] = "InstitutionName"
    for keyword, date in [*DATES.items(), ("nested StudyDate", NESTED_DATE), ("AcquisitionDateTime", DATETIME[:8])]:
        found[date.encode()] = keyword
        found[f"{date[:4]}-{date[4:6]}-{date[6:]}".encode()] = keyword
    return found


def scan(ws: Workspace, m: Markers, descriptors_allowed_in_dicom: bool = False,
         skip_contents_of: Path | None = None) -> tuple[int, list[str]]:
    """Byte-scan every file under the workspace and every path name; returns (files scanned, leaks).

    With the Clean Descriptors option, the descriptions' own markers may stay in the de-identified DICOM,
    and only there: never in a NIfTI, an array, a table, the log or a name. ``skip_contents_of``: a folder
    whose files' names are scanned but not their bytes (quarantine/ holds the originals by design).
    """
    strict = needles(m, set())
    relaxed = needles(m, m.descriptors if descriptors_allowed_in_dicom else set())
    scanned, leaks = 0, []
    for path in sorted(ws.root.rglob("*")):
        name = path.relative_to(ws.root).as_posix().encode()
        leaks += [f"file name {name.decode()}: {n.decode()} ({what})" for n, what in strict.items() if n in name]
        if path.is_file() and (skip_contents_of is None or skip_contents_of not in path.parents):
            forbidden = relaxed if path.suffix == ".dcm" and path.parent == ws.ingest / "dicom" else strict
            data = path.read_bytes()
            scanned += 1
            leaks += [f"{path.relative_to(ws.root)}: {n.decode()} ({what})" for n, what in forbidden.items()
                      if n in data]
    return scanned, leaks


@pytest.mark.parametrize("options", [
    {},
    {"longitudinal_temporal": "shift", "clean_descriptors": True},
], ids=["basic", "modified-dates+clean-descriptors"])
def test_no_planted_phi_reaches_any_output_of_a_3d_series(tmp_path: Path, monkeypatch, options: dict) -> None:
    monkeypatch.setenv("MEDTL_UID_SECRET", "test-volume-key")
    m = Markers(7)
    source = tmp_path / "input" / "series"
    source.mkdir(parents=True)
    for k, ds in enumerate(planted_series(m)):
        ds.save_as(source / f"slice_{k:02d}.dcm", enforce_file_format=True)
    ws = Workspace(tmp_path / "out")
    ws.root.mkdir()
    deid = DeidConfig(site_aliases={INSTITUTION: "site_mr"}, **options)
    cfg = IngestConfig(input_dir=tmp_path / "input", spatial_dims=3, image_size=SIZE, deid=deid)
    with medtl_log(ws.root / "ingest.log"):
        summary = ingest_folder(cfg, ws)

    # the series is one volume, every slice file is ingested, nothing is quarantined (quarantine holds originals)
    assert (summary.files_in, summary.ingested, summary.quarantined, summary.duplicates) == (SLICES, SLICES, 0, 0)
    assert not any(ws.quarantine.iterdir())
    assert set(load_ledger(ws)["status"]) == {"ingested"}
    manifest = read_manifest(ws)  # paths as stored, relative to the ingest folder
    assert len(manifest) == 1
    row = manifest.iloc[0]
    assert row.series_uid.startswith("2.25.") and row.hospital == "site_mr" and row.modality == "MR"
    assert (row.volume, row.image) == (f"volumes/{row.series_uid}.nii", f"arrays/{row.series_uid}.npy")
    # the NIfTI and its BIDS sidecar (technical fields only: the scan below finds no planted marker in it)
    assert sorted(p.name for p in (ws.ingest / "volumes").iterdir()) == [f"{row.series_uid}.json",
                                                                       f"{row.series_uid}.nii"]

    # the volume is the series itself: (columns, rows reversed, slices ascending), 2 mm apart in RAS
    volume = nib.load(ws.ingest / row.volume)
    stored = np.asarray(volume.dataobj.get_unscaled())
    assert stored.shape == (SIZE, SIZE, SLICES)
    for k in range(SLICES):
        np.testing.assert_array_equal(stored[:, ::-1, k].T, slice_pixels(k))
    np.testing.assert_allclose(volume.affine[:3, 2], [0.0, 0.0, SLICE_STEP_MM])
    header = volume.header
    assert {bytes(header[f]).strip(b"\0") for f in ("descrip", "aux_file", "intent_name", "db_name")} == {b""}
    assert np.load(ws.ingest / row.image).shape == (1, SIZE, SIZE, SIZE)

    written = sorted((ws.ingest / "dicom").glob("*.dcm"))
    assert len(written) == SLICES
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.SeriesInstanceUID == row.series_uid
        assert not any(e.tag.is_private for e in ds)
    log = (ws.root / "ingest.log").read_text()
    assert f"files in {SLICES} = ingested {SLICES} + quarantined 0 + duplicates 0" in log

    scanned, leaks = scan(ws, m, descriptors_allowed_in_dicom=deid.clean_descriptors)
    assert scanned >= SLICES + 5  # DICOM slices, NIfTI, array, manifest, ledger, log
    assert not leaks, "\n".join(leaks)
    if deid.clean_descriptors:  # kept and scrubbed in the DICOM, as the option says
        description = next(k for k, v in m.where.items() if v == "SeriesDescription")
        kept = str(pydicom.dcmread(written[0]).SeriesDescription)
        assert kept.startswith(description) and "***" in kept


@pytest.mark.parametrize("defect", ["duplicate-slice", "missing-slice"])
def test_series_description_stays_out_of_ledger_and_log_when_a_series_has_a_defect(
        tmp_path: Path, monkeypatch, defect: str) -> None:
    monkeypatch.setenv("MEDTL_UID_SECRET", "test-volume-key")
    m = Markers(7)
    series = planted_series(m)
    source = tmp_path / "input" / "series"
    source.mkdir(parents=True)
    if defect == "duplicate-slice":  # a PACS re-sending an instance under a new SOPInstanceUID
        extra = copy.deepcopy(series[0])  # Dataset.copy() shares elements: both files would change
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.99"
        series.append(extra)
    else:  # a gap in the stack: the series is rejected and its files quarantined
        del series[SLICES // 2]
    for k, ds in enumerate(series):
        ds.save_as(source / f"slice_{k:02d}.dcm", enforce_file_format=True)
    ws = Workspace(tmp_path / "out")
    ws.root.mkdir()
    cfg = IngestConfig(input_dir=tmp_path / "input", spatial_dims=3, image_size=SIZE,
                       deid=DeidConfig(site_aliases={INSTITUTION: "site_mr"}))
    with medtl_log(ws.root / "ingest.log"):
        summary = ingest_folder(cfg, ws)

    expected = (SLICES, 0, 1) if defect == "duplicate-slice" else (0, SLICES - 1, 0)
    assert (summary.ingested, summary.quarantined, summary.duplicates) == expected
    scanned, leaks = scan(ws, m, skip_contents_of=ws.quarantine)
    assert scanned >= 3  # ledger, manifest, log
    assert not leaks, "\n".join(leaks)
