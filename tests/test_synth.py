"""The synthetic cohort: determinism, per-hospital acquisition profiles, labels and planted defects."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from medtl.config import HospitalProfile, SynthConfig
from medtl.synth import DX_FOR_PRESENTATION, write_cohort


def tiny_config(**overrides) -> SynthConfig:
    hospitals = [
        HospitalProfile(name="site_a", manufacturer="GE Healthcare", model_name="Definium 8000",
                        institution="St. Aurelia General Hospital", rows=64, columns=64, bits_stored=12,
                        photometric="MONOCHROME2", prevalence=0.5),
        HospitalProfile(name="site_b", manufacturer="SIEMENS", model_name="Ysio Max",
                        institution="Northbridge University Clinic", rows=64, columns=64, bits_stored=14,
                        photometric="MONOCHROME1", rescale_slope=2.0, rescale_intercept=-1024.0, gamma=0.8,
                        noise_std=0.04, blur_sigma_px=0.8, prevalence=0.4),
    ]
    values = dict(seed=7, hospitals=hospitals, labeled_per_hospital=6, unlabeled_per_hospital=6,
                  images_per_patient=2, broken_files=3, workers=1)
    values.update(overrides)
    return SynthConfig(**values)


def file_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cohort")
    return out, write_cohort(tiny_config(), out)


def read_labels(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def classify(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        return "not_dicom"
    if "PixelData" not in ds:
        return "no_pixel_data"
    if len(ds.PixelData) < ds.Rows * ds.Columns * 2:
        return "truncated"
    return "valid"


def test_same_seed_writes_identical_files_whatever_the_worker_count(cohort, tmp_path: Path) -> None:
    root, _ = cohort
    write_cohort(tiny_config(workers=2), tmp_path)
    assert file_digests(tmp_path) == file_digests(root)


def test_another_seed_changes_pixels(cohort, tmp_path: Path) -> None:
    root, _ = cohort
    write_cohort(tiny_config(seed=8), tmp_path)
    ours = {pydicom.dcmread(p).PixelData for p in (root / "site_a").glob("*.dcm") if classify(p) == "valid"}
    theirs = {pydicom.dcmread(p).PixelData for p in (tmp_path / "site_a").glob("*.dcm") if classify(p) == "valid"}
    assert not ours & theirs


def test_each_hospital_has_its_own_acquisition_profile(cohort) -> None:
    root, _ = cohort
    headers = {}
    for site in ("site_a", "site_b"):
        path = next(p for p in sorted((root / site).glob("*.dcm")) if classify(p) == "valid")
        headers[site] = pydicom.dcmread(path)
    a, b = headers["site_a"], headers["site_b"]
    assert (a.Manufacturer, b.Manufacturer) == ("GE Healthcare", "SIEMENS")
    assert (a.PhotometricInterpretation, b.PhotometricInterpretation) == ("MONOCHROME2", "MONOCHROME1")
    assert (a.BitsStored, a.HighBit, b.BitsStored, b.HighBit) == (12, 11, 14, 13)
    assert a.BitsAllocated == b.BitsAllocated == 16
    assert (float(b.RescaleSlope), float(b.RescaleIntercept)) == (2.0, -1024.0)
    for ds in (a, b):
        assert ds.SOPClassUID == DX_FOR_PRESENTATION and ds.Modality == "DX"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.BurnedInAnnotation == "NO"
        assert "^" in str(ds.PatientName) and ds.PatientID and ds.AccessionNumber and ds.PatientAddress
        assert ds.StudyDate and ds.InstitutionAddress and ds.DeviceSerialNumber and ds.OperatorsName
        assert any(elem.tag.is_private for elem in ds)
        assert 58 <= ds.Rows <= 70 and 58 <= ds.Columns <= 70  # sizes vary a little around the profile


def test_labels_csv_lists_exactly_the_labeled_images(cohort) -> None:
    root, summary = cohort
    rows = read_labels(root)
    assert len(rows) == 2 * 6 and set(rows[0]) == {"path", "label"}
    per_site = Counter((r["path"].split("/")[0], r["label"]) for r in rows)
    # prevalence 0.5 and 0.4 of 6 labeled images
    assert per_site == {("site_a", "1"): 3, ("site_a", "0"): 3, ("site_b", "1"): 2, ("site_b", "0"): 4}
    assert all(classify(root / r["path"]) == "valid" for r in rows)
    assert summary.per_hospital["site_b"].labeled_positive == 2


def test_broken_files_and_one_duplicate_are_planted(cohort) -> None:
    root, summary = cohort
    files = [p for p in root.rglob("*.dcm")]
    kinds = Counter(classify(p) for p in files)
    assert kinds == {"valid": 2 * 12 + 1, "truncated": 1, "not_dicom": 1, "no_pixel_data": 1}
    digests = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    assert sorted(digests.values())[-2:] == [1, 2]
    labeled = {r["path"] for r in read_labels(root)}
    duplicated = {p.relative_to(root).as_posix() for p in files
                  if digests[hashlib.sha256(p.read_bytes()).hexdigest()] == 2}
    assert not labeled & duplicated
    assert (summary.n_files, summary.n_broken, summary.n_duplicates) == (len(files), 3, 1)
    assert str(summary).endswith(": 28 files = site_a 12 (6 labeled, 3 positive) + site_b 12 (6 labeled, "
                                 "2 positive) + 3 broken + 1 duplicate")


def test_rewrite_with_another_config_leaves_exactly_the_new_cohort(tmp_path: Path) -> None:
    write_cohort(tiny_config(), tmp_path)
    notes = tmp_path / "site_a" / "README.txt"
    notes.write_text("not part of the cohort")
    summary = write_cohort(tiny_config(labeled_per_hospital=4, unlabeled_per_hospital=0, broken_files=1), tmp_path)
    dicoms = list(tmp_path.rglob("*.dcm"))
    assert len(dicoms) == summary.n_files == 2 * 4 + 1 + 1
    assert notes.exists()


def test_acquisition_shift_goes_through_the_shift_simulator(tmp_path: Path) -> None:
    import numpy as np

    plain = tiny_config(labeled_per_hospital=4, unlabeled_per_hospital=0, broken_files=0)
    shifted_hospitals = [plain.hospitals[0].model_copy(update={"acquisition_shift": {"preset": "collimated"}}),
                         plain.hospitals[1]]
    shifted = plain.model_copy(update={"hospitals": shifted_hospitals})
    write_cohort(plain, tmp_path / "plain")
    write_cohort(shifted, tmp_path / "shifted")
    for path in sorted((tmp_path / "plain").rglob("*.dcm")):
        a = pydicom.dcmread(path).pixel_array.astype(float)
        b = pydicom.dcmread(tmp_path / "shifted" / path.relative_to(tmp_path / "plain")).pixel_array.astype(float)
        if path.parent.name == "site_a":  # collimation: a border of 12 % of each side is blank, the centre unchanged
            border = max(1, int(0.12 * a.shape[0]))
            assert np.ptp(b[:border - 1]) == 0 and np.ptp(b[:, :border - 1]) == 0
            assert np.array_equal(a[border + 1:-border - 1, border + 1:-border - 1],
                                  b[border + 1:-border - 1, border + 1:-border - 1])
        else:
            assert np.array_equal(a, b)  # other hospitals are untouched


def test_acquisition_shift_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="unknown field\\(s\\) \\['blurr'\\]"):
        HospitalProfile(name="x", manufacturer="m", model_name="n", institution="i",
                        acquisition_shift={"preset": "collimated", "blurr": 1.0})
    with pytest.raises(ValueError, match="unknown preset profile 'portable'"):
        HospitalProfile(name="x", manufacturer="m", model_name="n", institution="i", acquisition_shift="portable")


def test_positive_acquisition_is_a_shortcut_of_the_positives_only(tmp_path: Path) -> None:
    plain = tiny_config(labeled_per_hospital=8, unlabeled_per_hospital=4, broken_files=0)
    shortcut = {"rows": 48, "columns": 56, "pixel_spacing_mm": 1.1, "view_position": "AP"}
    hospitals = [plain.hospitals[0].model_copy(
        update={"positive_acquisition": HospitalProfile.PositiveAcquisition(**shortcut)}), plain.hospitals[1]]
    write_cohort(plain, tmp_path / "plain")
    write_cohort(plain.model_copy(update={"hospitals": hospitals}), tmp_path / "shortcut")
    labels = {r["path"]: r["label"] for r in read_labels(tmp_path / "plain")}
    assert labels == {r["path"]: r["label"] for r in read_labels(tmp_path / "shortcut")}
    plain_digests, shortcut_digests = file_digests(tmp_path / "plain"), file_digests(tmp_path / "shortcut")
    checked = Counter()
    for path, label in labels.items():
        ds = pydicom.dcmread(tmp_path / "shortcut" / path)
        if path.startswith("site_a/") and label == "1":
            checked["shortcut"] += 1
            assert ds.ViewPosition == "AP" and ds.BodyPartExamined == "CHEST" and ds.StudyDescription == "CHEST AP"
            assert 45 <= ds.Rows <= 51 and 52 <= ds.Columns <= 60 and float(ds.PixelSpacing[0]) == 1.1
        else:  # images without the finding, and every image of the other hospital, are byte for byte as before
            checked["unchanged"] += 1
            assert shortcut_digests[path] == plain_digests[path]
            assert ds.ViewPosition == "PA" and ds.StudyDescription == "CHEST PA"
    assert checked == {"shortcut": 4, "unchanged": 12}


def test_positive_acquisition_must_change_something() -> None:
    profile = dict(name="x", manufacturer="m", model_name="n", institution="i")
    with pytest.raises(ValueError, match="positive_acquisition sets nothing"):
        HospitalProfile(**profile, positive_acquisition={})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        HospitalProfile(**profile, positive_acquisition={"view": "AP"})
    with pytest.raises(ValueError, match="Input should be 'PA' or 'AP'"):
        HospitalProfile(**profile, positive_acquisition={"view_position": "LATERAL"})
