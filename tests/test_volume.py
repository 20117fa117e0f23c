"""Series → volume: grouping, slice order, geometry findings, affine, NIfTI output, and exactness vs dcm2niix."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from medtl.ingest.volume import (RejectedSeries, _int, assemble, group_series, is_volume_series, read_slice_headers,
                                 series_to_nifti, write_nifti)

SHARED = Path(__file__).resolve().parents[2] / "shared"
QA = SHARED / "data" / "dicom" / "dcm_qa_nih"
DATA_STORE = Path(pydicom.__file__).resolve().parents[1] / "data_store" / "data"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ROWS, COLUMNS = 4, 3


def pattern(value: int) -> np.ndarray:
    """A slice whose pixel (r, c) is ``value + 10 r + c``, so that axis order and flips are visible."""
    r, c = np.mgrid[:ROWS, :COLUMNS]
    return (value + 10 * r + c).astype(np.int16)


def write_slice(path: Path, position, pixels: np.ndarray, *, series_uid: str, instance: int,
                orientation=AXIAL, spacing=(2.0, 1.0), study_uid: str = "1.2.3", syntax=ExplicitVRLittleEndian,
                **extra) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = 7, "synthetic", instance
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def axial_series(folder: Path, depths, *, series_uid: str = "1.2.3.4", shuffle: bool = True) -> list[Path]:
    """Axial slices at z = ``depths``; slice k holds ``pattern(100 k)``; files written in shuffled order."""
    order = list(range(len(depths)))
    if shuffle:
        random.Random(0).shuffle(order)
    return [write_slice(folder / f"f{n:02d}.dcm", (10.0, 20.0, depths[k]), pattern(100 * k),
                        series_uid=series_uid, instance=n + 1) for n, k in enumerate(order)]


def headers_of(paths) -> list:
    return [h for p in paths for h in read_slice_headers(p)]


def single_group(paths):
    groups = group_series(headers_of(paths))
    assert len(groups) == 1
    return groups[0]


def test_shuffled_slices_are_sorted_along_the_normal(tmp_path: Path) -> None:
    depths = [30.0, 32.5, 35.0, 37.5, 40.0]
    volume = assemble(single_group(axial_series(tmp_path, depths)))
    assert volume.data.shape == (COLUMNS, ROWS, 5) and volume.data.dtype == np.int16
    for k in range(5):  # data[i, j, k] = slice k at row ROWS-1-j, column i
        np.testing.assert_array_equal(volume.data[:, :, k], pattern(100 * k).T[:, ::-1])
    # columns: +x LPS (1 mm) → -x RAS; reversed rows: -y LPS (2 mm) → +y RAS; slices +2.5 mm z;
    # origin = IPP + (ROWS-1)·2 mm·(0,1,0) = (10, 26, 30) LPS = (-10, -26, 30) RAS
    expected = np.array([[-1.0, 0.0, 0.0, -10.0],
                         [0.0, 2.0, 0.0, -26.0],
                         [0.0, 0.0, 2.5, 30.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
    assert volume.findings == () and volume.scaling == (1.0, 0.0)


def test_oblique_stack_affine(tmp_path: Path) -> None:
    # row cosines (1,0,0), column cosines (0,0.8,0.6) → normal (0,-0.6,0.8); slices 2.5 mm apart,
    # written from the last to the first
    orientation = (1.0, 0.0, 0.0, 0.0, 0.8, 0.6)
    paths = [write_slice(tmp_path / f"o{k}.dcm", np.array([10.0, 20.0, 30.0]) + k * 2.5 * np.array([0.0, -0.6, 0.8]),
                         pattern(100 * k), series_uid="9.9", instance=10 - k, orientation=orientation)
             for k in reversed(range(3))]
    volume = assemble(single_group(paths))
    for k in range(3):
        np.testing.assert_array_equal(volume.data[:, :, k], pattern(100 * k).T[:, ::-1])
    # LPS columns: 1·(1,0,0); −2·(0,0.8,0.6) = (0,−1.6,−1.2); step (0,−1.5,2);
    # origin (10,20,30) + 3·2·(0,0.8,0.6) = (10,24.8,33.6); RAS negates the x and y rows
    expected = np.array([[-1.0, 0.0, 0.0, -10.0],
                         [0.0, 1.6, 1.5, -24.8],
                         [0.0, -1.2, 2.0, 33.6],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(volume.affine, expected, atol=1e-5)


def test_missing_slice_is_rejected_with_its_location(tmp_path: Path) -> None:
    with pytest.raises(RejectedSeries) as info:
        assemble(single_group(axial_series(tmp_path, [0.0, 2.0, 4.0, 8.0, 10.0])))
    assert [f.code for f in info.value.findings] == ["missing_slices"]
    assert info.value.findings[0].blocking
    assert "1 slice(s) missing between 4.000 and 8.000 mm along the normal (spacing 2 mm)" in str(info.value)
    assert str(info.value).startswith("series 7 'synthetic': missing_slices: ")


def test_uneven_spacing_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(RejectedSeries) as info:
        assemble(single_group(axial_series(tmp_path, [0.0, 2.0, 4.0, 7.0, 9.0])))
    assert [f.code for f in info.value.findings] == ["uneven_spacing"]
    assert "step of 3 mm between 4.000 and 7.000 mm along the normal, expected 2 mm" in str(info.value)


def test_identical_duplicate_is_dropped_and_the_series_written(tmp_path: Path) -> None:
    paths = axial_series(tmp_path, [0.0, 2.0, 4.0, 6.0])
    copy = write_slice(tmp_path / "copy.dcm", (10.0, 20.0, 4.0), pattern(200), series_uid="1.2.3.4", instance=99)
    volume = assemble(single_group([*paths, copy]))
    assert volume.data.shape == (COLUMNS, ROWS, 4)
    assert volume.dropped_files == (copy,)
    assert [f.code for f in volume.findings] == ["duplicate_dropped"]
    assert not volume.findings[0].blocking and "copy.dcm duplicates " in volume.findings[0].message


def test_conflicting_duplicate_is_rejected(tmp_path: Path) -> None:
    paths = axial_series(tmp_path, [0.0, 2.0, 4.0, 6.0])
    other = write_slice(tmp_path / "other.dcm", (10.0, 20.0, 4.0), pattern(7), series_uid="1.2.3.4", instance=99)
    with pytest.raises(RejectedSeries) as info:
        assemble(single_group([*paths, other]))
    assert [f.code for f in info.value.findings] == ["conflicting_images"]
    assert "2 images at 4.000 mm" in str(info.value) and "other.dcm" in str(info.value)


def test_repeated_positions_with_equal_counts_make_a_4d_series(tmp_path: Path) -> None:
    # two volumes of three slices; volume order follows InstanceNumber, slice order follows position
    paths = [write_slice(tmp_path / f"t{t}z{k}.dcm", (0.0, 0.0, 3.0 * k), pattern(100 * k + t), series_uid="4.4",
                         instance=1 + t * 3 + (2 - k), RepetitionTime=2000) for t in range(2) for k in range(3)]
    volume = assemble(single_group(paths))
    assert volume.data.shape == (COLUMNS, ROWS, 3, 2) and volume.repetition_time_s == 2.0
    for t in range(2):
        for k in range(3):
            np.testing.assert_array_equal(volume.data[:, :, k, t], pattern(100 * k + t).T[:, ::-1])


def test_a_series_mixing_orientations_or_echoes_is_split(tmp_path: Path) -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    paths = axial_series(tmp_path, [0.0, 2.0, 4.0], shuffle=False)
    paths += [write_slice(tmp_path / f"sag{k}.dcm", (2.0 * k, 0.0, 0.0), pattern(k), series_uid="1.2.3.4",
                          instance=10 + k, orientation=sagittal) for k in range(3)]
    groups = group_series(headers_of(paths))
    assert [(g.part, g.split_by, len(g.headers)) for g in groups] == [(1, ("orientation",), 3),
                                                                      (2, ("orientation",), 3)]
    assert {g.headers[0].orientation for g in groups} == {AXIAL, sagittal}
    assert all(is_volume_series(g) for g in groups)
    for g in groups:
        assert assemble(g).data.shape == (COLUMNS, ROWS, 3)

    echoes = [write_slice(tmp_path / f"e{e}z{k}.dcm", (0.0, 0.0, 2.0 * k), pattern(k + e), series_uid="5.5",
                          instance=e * 3 + k, EchoNumbers=e + 1, EchoTime=10.0 * (e + 1))
              for e in range(2) for k in range(3)]
    groups = group_series(headers_of(echoes))
    assert [(g.part, g.split_by) for g in groups] == [(1, ("echo number", "echo time")),
                                                     (2, ("echo number", "echo time"))]


def test_implicit_vr_headers_match_explicit_vr(tmp_path: Path) -> None:
    kwargs = dict(series_uid="3.3", instance=4, EchoNumbers=2, EchoTime=12.5)
    explicit = write_slice(tmp_path / "e.dcm", (1.5, -2.0, 3.25), pattern(0), **kwargs)
    implicit = write_slice(tmp_path / "i.dcm", (1.5, -2.0, 3.25), pattern(0), syntax=ImplicitVRLittleEndian, **kwargs)
    (a,), (b,) = read_slice_headers(explicit), read_slice_headers(implicit)
    # a binary (US) element read straight from the deferred header, before any pixel access
    assert _int(a.dataset, "BitsStored") == _int(b.dataset, "BitsStored") == 16
    fields = [f for f in a.__dataclass_fields__ if f not in ("path", "dataset")]
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert (a.position, a.echo_number, a.echo_time, a.instance_number) == ((1.5, -2.0, 3.25), 2, 12.5, 4)
    assert a.image_type == () and a.rescale == (1.0, 0.0) and a.series_uid == "3.3"


def test_2d_images_are_not_volumes(tmp_path: Path) -> None:
    single = write_slice(tmp_path / "one.dcm", (0.0, 0.0, 0.0), pattern(0), series_uid="6.6", instance=1)
    assert not is_volume_series(single_group([single]))
    radiograph = Dataset()
    radiograph.file_meta = FileMetaDataset()
    radiograph.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    radiograph.SOPClassUID = radiograph.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX
    radiograph.SOPInstanceUID = radiograph.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    radiograph.StudyInstanceUID, radiograph.SeriesInstanceUID = "1.2", "1.2.1"
    radiograph.Rows, radiograph.Columns, radiograph.SamplesPerPixel = ROWS, COLUMNS, 1
    radiograph.BitsAllocated, radiograph.BitsStored, radiograph.HighBit, radiograph.PixelRepresentation = 16, 16, 15, 1
    radiograph.PhotometricInterpretation = "MONOCHROME2"
    radiograph.PixelData = pattern(0).tobytes()
    radiograph.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    outcomes = series_to_nifti([single, tmp_path / "dx.dcm", tmp_path / "missing.dcm"], tmp_path / "out")
    assert sorted(o.status for o in outcomes) == ["not_volume", "not_volume", "unreadable"]
    assert not list((tmp_path / "out").iterdir())


def test_malformed_geometry_names_the_attribute(tmp_path: Path) -> None:
    path = write_slice(tmp_path / "bad.dcm", (0.0, 0.0, 0.0), pattern(0), series_uid="8.8", instance=1,
                       orientation=(1.0, 0.0, 0.0, 1.0, 0.0, 0.0))
    outcome, = series_to_nifti([path], tmp_path / "out")
    assert outcome.status == "unreadable"
    assert outcome.reason.startswith("malformed ImageOrientationPatient (0020,0037)")


def test_enhanced_multiframe_ct_matches_hand_computed_geometry(tmp_path: Path) -> None:
    source = DATA_STORE / "eCT_Supplemental.dcm"
    if not source.is_file():
        pytest.skip(f"{source} (pydicom-data) is not installed")
    outcome, = series_to_nifti([source], tmp_path)
    assert outcome.status == "written", outcome.reason
    image = nib.load(outcome.nifti)
    # frames at z = -159 (frame 0) and -149 (frame 1); IOP (-1,0,0 / 0,1,0) → normal (0,0,-1), so frame 1
    # comes first; origin y = -301.5 + 511 · 0.388672 = -102.888608 (LPS)
    expected = np.array([[0.388672, 0.0, 0.0, -99.5],
                         [0.0, 0.388672, 0.0, 102.888608],
                         [0.0, 0.0, -10.0, -149.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-4)
    frames = pydicom.dcmread(source).pixel_array
    raw = np.asarray(image.dataobj.get_unscaled())
    assert raw.dtype == np.uint16  # 16 bits stored: kept unsigned, as dcm2niix does
    np.testing.assert_array_equal(raw[:, :, 0], frames[1].T[:, ::-1])
    np.testing.assert_array_equal(raw[:, :, 1], frames[0].T[:, ::-1])
    assert (image.dataobj.slope, image.dataobj.inter) == (1.0, -1024.0)  # RescaleIntercept, stored raw


def test_write_nifti_is_atomic_and_checks_the_name(tmp_path: Path) -> None:
    volume = assemble(single_group(axial_series(tmp_path, [0.0, 2.0, 4.0])))
    with pytest.raises(ValueError, match=r"must end in \.nii or \.nii\.gz"):
        write_nifti(volume, tmp_path / "x.img")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_nifti(volume, tmp_path / "nope" / "x.nii")
    target = write_nifti(volume, tmp_path / "v.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".dcm")) == ["v.nii.gz"]
    image = nib.load(target)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume.data)
    assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1


@pytest.mark.skipif(not QA.is_dir(), reason=f"{QA} is absent (the shared dcm_qa_nih data set)")
def test_dcm_qa_nih_matches_dcm2niix_exactly(tmp_path: Path) -> None:
    references = {}
    for sidecar in (QA / "Ref").glob("*.json"):
        meta = json.loads(sidecar.read_text())
        references[(meta["SeriesNumber"], meta["SeriesDescription"])] = sidecar.with_suffix(".nii")
    files = sorted(p for p in (QA / "In").rglob("*") if p.is_file())
    outcomes = series_to_nifti(files, tmp_path)
    written = [o for o in outcomes if o.status == "written"]
    # the README text files are the only non-DICOM inputs
    assert {o.status for o in outcomes} == {"written", "unreadable"}
    assert all(o.files[0].name.startswith("README") for o in outcomes if o.status == "unreadable")
    assert len(written) == len(references) == 8
    for outcome in written:
        first = outcome.group.headers[0]
        ref = nib.load(references.pop((first.series_number, first.series_description)))
        mine = nib.load(outcome.nifti)
        assert mine.shape == ref.shape
        assert mine.get_data_dtype() == ref.get_data_dtype()
        np.testing.assert_array_equal(np.asarray(mine.dataobj.get_unscaled()), np.asarray(ref.dataobj.get_unscaled()))
        assert (mine.dataobj.slope, mine.dataobj.inter) == (ref.dataobj.slope, ref.dataobj.inter)
        np.testing.assert_allclose(mine.affine, ref.affine, atol=1e-3)
        np.testing.assert_allclose(mine.get_qform(), ref.get_qform(), atol=1e-3)
        np.testing.assert_allclose(mine.header.get_zooms(), ref.header.get_zooms(), atol=1e-5)
        assert mine.header["dim_info"] == ref.header["dim_info"]
        assert outcome.findings == ()
    assert not references, f"series without output: {sorted(references)}"
