"""What the ledger says of byte-identical copies and of repeated 3D slices, and that it names the right file.

A copy of a quarantined file is quarantined like it (not a "duplicate" of a file that is no output), in the same
run or a later one; a copy of an ingested file is a duplicate naming it; a 3D slice dropped because a kept slice
repeats its position and pixels (the same image in another transfer syntax) names that kept file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from medtl.config import IngestConfig
from medtl.ingest import ingest_folder, load_ledger
from medtl.ingest.folder import IngestSummary, file_sha256
from medtl.ingest.manifest import read_manifest
from medtl.ingest.shards import ingest_shard, merge_shards, plan_shards
from medtl.workspace import Workspace
from tests.hostile_corpus import image_dataset

NOT_DICOM = b"a scanned consent form, not DICOM\n"


def _config(folder: Path, **overrides: object) -> IngestConfig:
    return IngestConfig(input_dir=folder, image_size=16, workers=1, **overrides)


def _image(path: Path, seed: int) -> Path:
    """A tiny valid 2D image with its own SOP Instance UID."""
    ds = image_dataset()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"ledger {seed}"])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _outcomes(ws: Workspace) -> dict[str, tuple[str, str]]:
    ledger = load_ledger(ws)
    assert ledger["path"].is_unique  # exactly one status per input file
    return {path: (status, reason) for path, status, reason in zip(ledger["path"], ledger["status"], ledger["reason"])}


def _balances(summary: IngestSummary) -> bool:
    return summary.files_in == (summary.ingested + summary.quarantined + summary.duplicates + summary.skipped
                                + summary.to_retry)


def _quarantined_bytes(ws: Workspace) -> list[bytes]:
    return [p.read_bytes() for p in sorted(ws.quarantine.iterdir())]


def test_identical_files_that_are_not_dicom_are_all_quarantined_and_name_the_first(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    _image(inputs / "good.dcm", 1)
    for rel in ("a/form.pdf", "b/form.pdf", "c.pdf"):  # two share a name: their quarantine copies must not clash
        _write(inputs / rel, NOT_DICOM)
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    outcomes = _outcomes(ws)
    status, reason = outcomes["a/form.pdf"]
    assert status == "quarantined" and reason and "same bytes" not in reason
    assert outcomes["b/form.pdf"] == ("quarantined", f"{reason} (same bytes as a/form.pdf)")
    assert outcomes["c.pdf"] == ("quarantined", f"{reason} (same bytes as a/form.pdf)")
    assert (summary.files_in, summary.ingested, summary.quarantined, summary.duplicates) == (4, 1, 3, 0)
    assert _balances(summary)
    assert _quarantined_bytes(ws) == [NOT_DICOM] * 3  # one copy per quarantined input

    again = ingest_folder(_config(inputs), ws)
    assert again.skipped_already_done == again.files_in == 4 and again.quarantined == 3 and _balances(again)
    assert len(list(ws.quarantine.iterdir())) == 3


def test_identical_copies_of_an_image_are_one_ingested_and_duplicates_naming_it(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    first = _image(inputs / "site" / "scan.dcm", 1)
    _copy(first, inputs / "site" / "zz_copy.dcm")
    _copy(first, inputs / "other" / "scan.dcm")
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    outcomes = _outcomes(ws)
    assert outcomes["other/scan.dcm"] == ("ingested", "")  # first in input (path) order
    assert outcomes["site/scan.dcm"] == ("duplicate", "same content as other/scan.dcm")
    assert outcomes["site/zz_copy.dcm"] == ("duplicate", "same content as other/scan.dcm")
    assert (summary.files_in, summary.ingested, summary.duplicates, summary.quarantined) == (3, 1, 2, 0)
    assert _balances(summary) and len(read_manifest(ws)) == 1 and not list(ws.quarantine.iterdir())


def test_a_copy_of_a_file_an_earlier_run_quarantined_is_quarantined_naming_the_first(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    good = _image(inputs / "good.dcm", 1)
    _write(inputs / "form.pdf", NOT_DICOM)
    ws = Workspace(tmp_path / "work")
    ingest_folder(_config(inputs), ws)
    reason = _outcomes(ws)["form.pdf"][1]

    _write(inputs / "a" / "form.pdf", NOT_DICOM)  # sorts before the first file: it still names form.pdf
    _copy(good, inputs / "a" / "good.dcm")
    second = ingest_folder(_config(inputs), ws)

    outcomes = _outcomes(ws)
    assert outcomes["a/form.pdf"] == ("quarantined", f"{reason} (same bytes as form.pdf)")
    assert outcomes["a/good.dcm"] == ("duplicate", "same content as good.dcm")
    assert (second.files_in, second.ingested, second.quarantined, second.duplicates) == (4, 1, 2, 1)
    assert second.skipped_already_done == 2 and _balances(second)
    assert _quarantined_bytes(ws) == [NOT_DICOM] * 2

    _write(inputs / "c" / "form.pdf", NOT_DICOM)  # the original is named, not the copy a/form.pdf
    third = ingest_folder(_config(inputs), ws)

    assert _outcomes(ws)["c/form.pdf"] == ("quarantined", f"{reason} (same bytes as form.pdf)")
    assert third.quarantined == 3 and third.skipped_already_done == 4 and _balances(third)
    assert _quarantined_bytes(ws) == [NOT_DICOM] * 3


def test_sharded_ingestion_quarantines_copies_like_a_plain_run(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    _image(inputs / "good.dcm", 1)
    _write(inputs / "a.pdf", NOT_DICOM)
    _write(inputs / "b.pdf", NOT_DICOM)
    ws = Workspace(tmp_path / "work")
    cfg = _config(inputs)

    plan = plan_shards(cfg, ws, 2)
    for shard in range(len(plan["shards"])):
        ingest_shard(cfg, ws, shard)
    summary = merge_shards(cfg, ws)

    outcomes = _outcomes(ws)
    assert outcomes["b.pdf"] == ("quarantined", f"{outcomes['a.pdf'][1]} (same bytes as a.pdf)")
    assert (summary.files_in, summary.ingested, summary.quarantined) == (3, 1, 2) and _balances(summary)
    assert _quarantined_bytes(ws) == [NOT_DICOM] * 2


# ---------------------------------------------------------------------------------------------- 3D

SERIES_UID = "1.2.826.0.1.3680043.8.498.77.2"


def _slice(k: int) -> Dataset:
    """Slice ``k`` of a tiny axial MR series (2 mm apart, its own 8x8 pixels), explicit VR little endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.3.{k + 1}"
    ds.Modality, ds.PatientID, ds.BurnedInAnnotation = "MR", "LEDGER", "NO"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77.1", SERIES_UID
    ds.SeriesNumber, ds.InstanceNumber = 5, k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 2.0 * k]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = (np.arange(64, dtype="<u2").reshape(8, 8) * (k + 1)).tobytes()
    return ds


def test_a_slice_repeated_in_another_transfer_syntax_names_the_kept_file(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    (inputs / "explicit").mkdir(parents=True)
    for k in range(3):
        _slice(k).save_as(inputs / "explicit" / f"s{k}.dcm", enforce_file_format=True)
    # A transfer-syntax test set: the same instance (same UIDs, same pixels) encoded otherwise, different bytes.
    (inputs / "rle").mkdir()
    rle = _slice(1)
    rle.compress(RLELossless, generate_instance_uid=False)
    rle.save_as(inputs / "rle" / "s1.dcm", enforce_file_format=True)
    (inputs / "zimplicit").mkdir()
    implicit = _slice(2)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(inputs / "zimplicit" / "s2.dcm", enforce_file_format=True)
    assert file_sha256(inputs / "rle" / "s1.dcm") != file_sha256(inputs / "explicit" / "s1.dcm")
    assert file_sha256(inputs / "zimplicit" / "s2.dcm") != file_sha256(inputs / "explicit" / "s2.dcm")
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs, spatial_dims=3), ws)

    outcomes = _outcomes(ws)
    assert [outcomes[f"explicit/s{k}.dcm"][0] for k in range(3)] == ["ingested"] * 3
    status, reason = outcomes["rle/s1.dcm"]
    assert status == "duplicate" and reason.endswith("same position and pixels as explicit/s1.dcm"), reason
    status, reason = outcomes["zimplicit/s2.dcm"]
    assert status == "duplicate" and reason.endswith("same position and pixels as explicit/s2.dcm"), reason
    assert str(tmp_path) not in reason
    assert (summary.files_in, summary.ingested, summary.duplicates) == (5, 3, 2) and _balances(summary)
    assert len(read_manifest(ws)) == 1
    # the dropped copies share the kept slices' SOP Instance UIDs: dropping them leaves the kept slices' DICOM
    assert len(list((ws.ingest / "dicom").glob("*.dcm"))) == 3
