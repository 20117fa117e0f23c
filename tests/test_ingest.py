"""Ingestion: accounting, quarantine, duplicates, manifest, arrays, de-identification, incremental runs."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from medtl.config import DeidConfig, IngestConfig
from medtl.ingest import ingest_folder, load_ledger, load_manifest
from medtl.ingest.reader import RejectedFile, preprocess, resize, validate
from medtl.synth import write_cohort
from medtl.workspace import Workspace
from tests.test_synth import tiny_config

MANIFEST_COLUMNS = ["image", "volume", "label", "patient_id", "study_uid", "series_uid", "sop_uid", "hospital", "vendor",
                    "model", "modality", "content_hash", "rows", "columns", "pixel_spacing_mm", "bits_stored",
                    "photometric", "view_position", "body_part", "intensity_scaling", "sex", "age", "study_date", "split"]


def ingest_config(input_dir: Path, **overrides) -> IngestConfig:
    return IngestConfig(input_dir=input_dir, image_size=32, **overrides)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom")
    write_cohort(tiny_config(), root)
    return root


@pytest.fixture(scope="module")
def ingested(cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    ws = Workspace(tmp_path_factory.mktemp("work"))
    # the synthetic institutions label themselves (without aliases every site is a keyed site-... pseudonym)
    return ws, ingest_folder(ingest_config(cohort, deid=DeidConfig(site_aliases=tiny_config().site_aliases())), ws)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def test_every_file_is_accounted_for(ingested) -> None:
    ws, summary = ingested
    assert (summary.files_in, summary.ingested, summary.quarantined, summary.duplicates) == (28, 24, 3, 1)
    assert str(summary) == "files in 28 = ingested 24 + quarantined 3 + duplicates 1 (already done 0)"
    assert summary.per_hospital == {"Northbridge University Clinic": 12, "St. Aurelia General Hospital": 12}
    ledger = load_ledger(ws)
    assert len(ledger) == 28 and ledger["path"].is_unique
    assert ledger["status"].value_counts().to_dict() == {"ingested": 24, "quarantined": 3, "duplicate": 1}


def test_broken_files_are_quarantined_with_a_precise_reason(ingested, cohort: Path) -> None:
    ws, _ = ingested
    ledger = load_ledger(ws)
    quarantined = ledger[ledger["status"] == "quarantined"]
    reasons = sorted(quarantined["reason"])
    assert reasons[0] == "no PixelData element (0x7FE0,0x0010)"
    assert reasons[1].startswith("not a DICOM file (no DICM preamble and no valid dataset): InvalidDicomError")
    assert reasons[2].startswith("truncated: pixel data length ") and " != expected " in reasons[2]
    copies = sorted(p.name for p in ws.quarantine.iterdir())
    expected = sorted(f"{h[:16]}_{Path(p).name}" for p, h in zip(quarantined["path"], quarantined["content_hash"]))
    assert copies == expected
    for path, content_hash in zip(quarantined["path"], quarantined["content_hash"]):
        assert hashlib.sha256((cohort / path).read_bytes()).hexdigest() == content_hash  # input untouched


def test_duplicate_is_detected_and_not_ingested_twice(ingested) -> None:
    ws, _ = ingested
    ledger = load_ledger(ws)
    duplicate = ledger[ledger["status"] == "duplicate"].iloc[0]
    original = ledger[(ledger["content_hash"] == duplicate["content_hash"]) & (ledger["status"] == "ingested")]
    assert duplicate["reason"] == f"same content as {original['path'].iloc[0]}"
    assert load_manifest(ws)["content_hash"].is_unique


def test_manifest_schema_and_labels(ingested, cohort: Path) -> None:
    ws, _ = ingested
    manifest = load_manifest(ws)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert str(manifest["label"].dtype) == "Int64"
    assert manifest["rows"].dtype == np.int64 and manifest["pixel_spacing_mm"].dtype == np.float64
    assert len(manifest) == 24 and manifest["label"].notna().sum() == 12
    with open(cohort / "labels.csv", newline="") as fh:
        expected = {r["path"]: int(r["label"]) for r in csv.DictReader(fh)}
    ledger = load_ledger(ws)
    hash_of = dict(zip(ledger["path"], ledger["content_hash"]))
    label_of = dict(zip(manifest["content_hash"], manifest["label"]))
    assert {path: label_of[hash_of[path]] for path in expected} == expected
    assert set(manifest["vendor"]) == {"GE Healthcare", "SIEMENS"} and set(manifest["modality"]) == {"DX"}
    assert manifest["patient_id"].str.fullmatch(r"P[0-9a-f]{12}").all()
    # two images per patient in the tiny cohort
    assert manifest["patient_id"].nunique() == 12


def test_sex_age_and_study_date_only_where_deidentification_keeps_them(ingested, cohort: Path,
                                                                       tmp_path: Path) -> None:
    ws, _ = ingested  # the basic profile removes dates and age and blanks sex
    basic = load_manifest(ws)
    assert (basic["sex"] == "").all() and basic["age"].isna().all() and (basic["study_date"] == "").all()
    assert (basic["split"] == "").all()
    kept = Workspace(tmp_path)
    ingest_folder(ingest_config(cohort, deid=DeidConfig(retain_patient_characteristics=True,
                                                        longitudinal_temporal="shift")), kept)
    manifest = load_manifest(kept)
    original = {}
    for path in sorted(cohort.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "PatientSex" in ds:
            original[hashlib.sha256(path.read_bytes()).hexdigest()] = ds
    rows = manifest[manifest["content_hash"].isin(original)]
    assert len(rows) == len(manifest) == 24
    for _, row in rows.iterrows():
        ds = original[row["content_hash"]]
        assert row["sex"] == ds.PatientSex
        assert row["age"] == pytest.approx(int(ds.PatientAge[:3]))  # the synthetic cohort's ages are in years
        real = pd.Timestamp(ds.StudyDate)
        shifted = pd.Timestamp(row["study_date"])
        assert shifted < real  # Modified Dates: moved back by a keyed per-patient offset
    for _, patient in rows.groupby("patient_id"):  # one offset per patient keeps the intervals between studies
        offsets = {(pd.Timestamp(original[h].StudyDate) - pd.Timestamp(d)).days
                   for h, d in zip(patient["content_hash"], patient["study_date"])}
        assert len(offsets) == 1


def test_acquisition_fields_reach_the_manifest(ingested, cohort: Path) -> None:
    ws, _ = ingested
    manifest = load_manifest(ws).set_index("content_hash")
    assert manifest["bits_stored"].dtype == np.int64
    for path in sorted(cohort.rglob("*.dcm")):
        content_hash = hashlib.sha256(path.read_bytes()).hexdigest()
        if content_hash not in manifest.index:
            continue  # a planted broken file or the duplicate
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        row = manifest.loc[content_hash]
        assert (row["bits_stored"], row["photometric"], row["view_position"], row["body_part"]) == (
            ds.BitsStored, ds.PhotometricInterpretation, ds.ViewPosition, ds.BodyPartExamined)
        assert (row["rows"], row["columns"]) == (ds.Rows, ds.Columns)  # the original matrix, before resizing
    assert set(manifest["bits_stored"]) == {12, 14} and set(manifest["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert set(manifest["view_position"]) == {"PA"} and set(manifest["body_part"]) == {"CHEST"}


def test_absent_acquisition_fields_are_empty_in_the_manifest(tmp_path: Path) -> None:
    ds = _image(SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", SOPInstanceUID="1.2.3.4.9", ViewPosition="AP",
                PixelData=np.arange(256, dtype="<u2").tobytes())
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    (tmp_path / "in" / "site").mkdir(parents=True)
    ds.save_as(tmp_path / "in" / "site" / "image.dcm", enforce_file_format=True)
    ws = Workspace(tmp_path / "work")
    assert ingest_folder(IngestConfig(input_dir=tmp_path / "in", image_size=16), ws).ingested == 1
    row = load_manifest(ws).iloc[0]
    assert (row["bits_stored"], row["photometric"], row["view_position"], row["body_part"]) == (
        16, "MONOCHROME2", "AP", "")  # no BodyPartExamined in the file


def test_a_manifest_from_an_older_version_is_refused(ingested, tmp_path: Path) -> None:
    ws, _ = ingested
    old = Workspace(tmp_path)
    old.ingest.mkdir(parents=True)
    columns = ["bits_stored", "photometric", "view_position", "body_part"]
    pd.read_parquet(ws.manifest).drop(columns=columns).to_parquet(old.manifest)  # written before these columns
    with pytest.raises(ValueError, match="written by another version of medtl: delete the ingest folder and re-run"):
        load_manifest(old)


def test_arrays_are_float32_unit_range_squares(ingested) -> None:
    ws, _ = ingested
    for image in load_manifest(ws)["image"]:
        assert Path(image).is_absolute()
        array = np.load(image)
        assert array.shape == (1, 32, 32) and array.dtype == np.float32
        assert array.min() >= 0.0 and array.max() <= 1.0 and array.max() - array.min() > 0.5


def test_monochrome1_is_inverted_to_bright_is_dense(ingested) -> None:
    ws, _ = ingested
    manifest = load_manifest(ws)
    means = {h: np.mean([np.load(p)[0] for p in g["image"]], axis=0) for h, g in manifest.groupby("vendor")}
    for mean in means.values():
        lungs = np.r_[mean[9:15, 4:9].ravel(), mean[9:15, 24:29].ravel()].mean()
        mediastinum = mean[9:15, 15:18].mean()
        assert lungs < mediastinum - 0.1  # air-filled lungs are dark
    # the MONOCHROME1 site (SIEMENS) looks like the MONOCHROME2 one, not like its negative
    assert np.corrcoef(means["SIEMENS"].ravel(), means["GE Healthcare"].ravel())[0, 1] > 0.8


def test_uid_pseudonyms_depend_only_on_the_secret(ingested, cohort: Path, tmp_path: Path) -> None:
    ws, _ = ingested
    first = load_manifest(ws).set_index("content_hash")
    again = Workspace(tmp_path / "again")
    ingest_folder(ingest_config(cohort, workers=2), again)
    second = load_manifest(again).set_index("content_hash").loc[first.index]
    for column in ("sop_uid", "study_uid", "series_uid", "patient_id"):
        assert (second[column] == first[column]).all()
    for a, b in zip(first["image"], second["image"]):
        assert np.array_equal(np.load(a), np.load(b))
    other = Workspace(tmp_path / "other")
    ingest_folder(ingest_config(cohort, deid=DeidConfig(uid_secret="another secret")), other)
    third = load_manifest(other)
    assert not set(third["sop_uid"]) & set(first["sop_uid"])
    assert not set(third["patient_id"]) & set(first["patient_id"])


def test_rerun_does_no_work_twice(ingested, cohort: Path) -> None:
    ws, _ = ingested
    before = snapshot(ws.root)
    summary = ingest_folder(ingest_config(cohort), ws)
    assert summary.skipped_already_done == summary.files_in == 28
    assert (summary.ingested, summary.quarantined, summary.duplicates) == (24, 3, 1)
    assert snapshot(ws.root) == before


def test_new_files_are_ingested_incrementally(cohort: Path, tmp_path: Path) -> None:
    source = tmp_path / "dicom"
    shutil.copytree(cohort, source)
    ws = Workspace(tmp_path / "work")
    ingest_folder(ingest_config(source), ws)
    template = next(p for p in sorted((source / "site_a").glob("*.dcm")) if p.stat().st_size > 4000)
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["new"])
    (source / "site_c").mkdir()
    ds.save_as(source / "site_c" / "new.dcm")
    summary = ingest_folder(ingest_config(source), ws)
    assert (summary.files_in, summary.ingested, summary.skipped_already_done) == (29, 25, 28)
    manifest = load_manifest(ws)
    assert len(manifest) == 25 and manifest["content_hash"].is_unique and manifest["sop_uid"].is_unique


def test_images_lost_from_the_workspace_are_ingested_again(cohort: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ingest_folder(ingest_config(cohort), ws)
    lost = Path(load_manifest(ws)["image"].iloc[0])
    lost.unlink()
    summary = ingest_folder(ingest_config(cohort), ws)
    assert (summary.ingested, summary.skipped_already_done) == (24, 27) and lost.is_file()
    ws.manifest.unlink()
    summary = ingest_folder(ingest_config(cohort), ws)
    assert (summary.ingested, summary.skipped_already_done, summary.manifest_rows) == (24, 4, 24)
    assert len(load_ledger(ws)) == 28


def test_sop_instance_uid_collisions_go_to_the_first_file_in_input_order(cohort: Path, tmp_path: Path) -> None:
    template = next(p for p in sorted((cohort / "site_a").glob("*.dcm")) if p.stat().st_size > 4000)
    source = tmp_path / "dicom"
    source.mkdir()
    for name, value in (("a_first.dcm", 0), ("b_second.dcm", 50), ("c_third.dcm", 100)):
        ds = pydicom.dcmread(template)
        pixels = ds.pixel_array.copy()
        pixels[: pixels.shape[0] // 2] = value  # same SOPInstanceUID, different content
        ds.PixelData = pixels.tobytes()
        ds.save_as(source / name)
    reference = Workspace(tmp_path / "reference")
    only_first = tmp_path / "only_first"
    only_first.mkdir()
    shutil.copy(source / "a_first.dcm", only_first)
    ingest_folder(ingest_config(only_first), reference)
    expected = {p.relative_to(reference.ingest).as_posix(): p.read_bytes()
                for p in reference.ingest.glob("*/*") if p.parent.name in ("arrays", "dicom")}
    assert len(expected) == 2

    for workers in (1, 2, 2):
        ws = Workspace(tmp_path / f"work{workers}_{len(list(tmp_path.iterdir()))}")
        (ws.ingest / "arrays").mkdir(parents=True)
        for rel in expected:  # a killed run's leftover under the same name, with other content
            (ws.ingest / rel).parent.mkdir(exist_ok=True)
            (ws.ingest / rel).write_bytes(b"stale")
        summary = ingest_folder(ingest_config(source, workers=workers), ws)
        assert (summary.ingested, summary.quarantined) == (1, 2)
        ledger = load_ledger(ws).set_index("path")
        assert ledger.loc["a_first.dcm", "status"] == "ingested"
        for later in ("b_second.dcm", "c_third.dcm"):
            assert ledger.loc[later, "reason"].startswith("SOPInstanceUID collision")
        assert {rel: (ws.ingest / rel).read_bytes() for rel in expected} == expected
        assert not (ws.ingest / ".staging").exists()

    reversed_order = Workspace(tmp_path / "reversed")  # an earlier run's owner keeps the name
    later_only = tmp_path / "later_only"
    later_only.mkdir()
    shutil.copy(source / "c_third.dcm", later_only)
    ingest_folder(ingest_config(later_only), reversed_order)
    owned = {rel: (reversed_order.ingest / rel).read_bytes() for rel in expected}
    shutil.copy(source / "a_first.dcm", later_only)
    summary = ingest_folder(ingest_config(later_only), reversed_order)
    assert (summary.ingested, summary.quarantined) == (1, 1)
    assert {rel: (reversed_order.ingest / rel).read_bytes() for rel in expected} == owned


def test_label_rows_naming_missing_files_warn(cohort: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text((cohort / "labels.csv").read_text() + "site_a/missing.dcm,1\n")
    ws = Workspace(tmp_path / "work")
    with pytest.warns(UserWarning, match=r"line 14 \(site_a/missing.dcm\)"):
        summary = ingest_folder(ingest_config(cohort, labels_csv=labels), ws)
    assert summary.ingested == 24 and load_manifest(ws)["label"].notna().sum() == 12


def _image(**attrs) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PixelRepresentation = 16, 16, 1, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(16 * 16 * 2)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("attrs", "dims", "reason"), [
    ({"NumberOfFrames": 4}, 2, "multi-frame image (NumberOfFrames=4) but ingest.spatial_dims is 2"),
    ({}, 3, "single-frame image but ingest.spatial_dims is 3"),
    ({"SamplesPerPixel": 3}, 2, "SamplesPerPixel=3"),
    ({"Rows": 2}, 2, "implausible image size Rows=2"),
])
def test_validation_rejects_unusable_images(attrs: dict, dims: int, reason: str) -> None:
    with pytest.raises(RejectedFile, match=reason.replace("(", r"\(").replace(")", r"\)")):
        validate(_image(**attrs), dims)


def test_dataset_without_preamble_or_file_meta_is_ingested(tmp_path: Path) -> None:
    ds = _image(SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", SOPInstanceUID="1.2.3.4.7", PatientName="Doe^Jane",
                PixelData=np.arange(256, dtype="<u2").tobytes())
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    (tmp_path / "old_site").mkdir()
    (tmp_path / "old_site" / "image").write_bytes(fp.getvalue())
    ws = Workspace(tmp_path / "work")
    cfg = IngestConfig(input_dir=tmp_path, image_size=16, deid=DeidConfig(site_aliases={"old_site": "site_o"}))
    summary = ingest_folder(cfg, ws)
    assert (summary.ingested, summary.per_hospital) == (1, {"site_o": 1})  # site from the folder name, aliased
    written = pydicom.dcmread(next((ws.ingest / "dicom").iterdir()))
    assert written.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian and written.PatientName == ""


def test_multi_frame_volume_becomes_a_cube_when_spatial_dims_is_3(tmp_path: Path) -> None:
    ds = _image(SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", SOPInstanceUID="1.2.3.4.8", NumberOfFrames=4,
                PixelData=np.arange(4 * 256, dtype="<u2").tobytes())
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "volume.dcm", enforce_file_format=True)
    ws = Workspace(tmp_path / "work")
    assert ingest_folder(IngestConfig(input_dir=tmp_path, image_size=16, spatial_dims=3), ws).ingested == 1
    volume = np.load(load_manifest(ws)["image"].iloc[0])
    assert volume.shape == (1, 16, 16, 16) and volume.dtype == np.float32


def test_preprocess_pads_to_square_and_rejects_blank_images() -> None:
    wide = np.zeros((20, 40))
    wide[:, :20] = 1.0
    out = preprocess(wide, 8)
    assert out.shape == (1, 8, 8) and out.dtype == np.float32
    assert out[0, 0].max() == 0.0 and out[0, 4, 1] == pytest.approx(1.0)  # padding rows are air
    assert resize(np.ones((7, 13)), 5) == pytest.approx(np.ones((5, 5)))
    with pytest.raises(RejectedFile, match="blank image"):
        preprocess(np.full((10, 10), 3.0), 8)


def test_load_manifest_without_ingest_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the ingest stage"):
        load_manifest(Workspace(tmp_path))
    assert isinstance(load_ledger(Workspace(tmp_path)), pd.DataFrame)
