"""Series → volume: grouping, slice order, geometry findings, affine, NIfTI output, and exactness vs dcm2niix."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage,
                         generate_uid)

from medtl.ingest.volume import (HEADER_TAGS, RejectedSeries, _int, _lean_header, _native_pixels, assemble,
                                 decode_stored, group_series, is_volume_series, read_header, read_slice_headers,
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
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".dcm")) == ["v.json", "v.nii.gz"]
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


# ----------------------------------------------------------------------------------------------
# the lean header reader and the native pixel path must give exactly what pydicom gives

PYDICOM_FILES = sorted({Path(f).resolve() for f in get_testdata_files() if Path(f).is_file()})


def dcmread_header(path: Path):
    """What ``read_slice_headers`` read before the lean reader (``None`` where pydicom refuses the file)."""
    try:
        return pydicom.dcmread(path, defer_size=1024, specific_tags=list(HEADER_TAGS))
    except Exception:
        return None


def outcome(get):
    try:
        return get()
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def slices(path: Path, ds):
    return outcome(lambda: read_slice_headers(path, ds))


def assert_same_header(lean, ref, path: Path) -> None:
    """Same file meta, same raw elements (VR, length, value or deferral, value_tell), same values, same slices."""
    assert type(lean) is type(ref) and lean.filename == ref.filename and lean.preamble == ref.preamble
    assert lean.original_encoding == ref.original_encoding
    assert lean.original_character_set == ref.original_character_set
    assert sorted(lean.file_meta.keys()) == sorted(ref.file_meta.keys())
    for tag in ref.file_meta.keys():
        assert lean.file_meta[tag] == ref.file_meta[tag], (path.name, tag)
    assert sorted(lean.keys()) == sorted(ref.keys()), path.name
    for tag in ref.keys():
        assert lean.get_item(tag, keep_deferred=True) == ref.get_item(tag, keep_deferred=True), (path.name, tag)
        a, b = outcome(lambda: lean[tag].value), outcome(lambda: ref[tag].value)
        assert a == b, (path.name, tag)
    assert slices(path, lean) == slices(path, ref), path.name


def assert_pixels_equal(fast: np.ndarray, reference: np.ndarray) -> None:
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    np.testing.assert_array_equal(fast, reference)
    assert fast.flags.writeable


@pytest.mark.filterwarnings("ignore")
def test_lean_header_equals_dcmread_on_every_pydicom_test_file() -> None:
    lean_syntaxes, fallbacks = set(), []
    for path in PYDICOM_FILES:
        ref, lean = dcmread_header(path), _lean_header(path)
        if ref is None:
            assert lean is None, f"{path.name}: the lean reader reads a file pydicom refuses"
            assert outcome(lambda: read_header(path))[1] == "RejectedFile"
            continue
        if lean is None:
            fallbacks.append(path.name)
            assert slices(path, read_header(path)) == slices(path, ref)
            continue
        assert_same_header(lean, ref, path)
        lean_syntaxes.add(ref.file_meta.TransferSyntaxUID)
    # not vacuous: both VR encodings, native and encapsulated, are read by the lean reader
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian} <= lean_syntaxes
    assert any(uid.is_encapsulated for uid in lean_syntaxes)
    assert "MR_small_bigendian.dcm" in fallbacks and "image_dfl.dcm" in fallbacks  # big endian, deflate
    assert len(fallbacks) < 40, fallbacks


@pytest.mark.skipif(not QA.is_dir(), reason=f"{QA} is absent (the shared dcm_qa_nih data set)")
@pytest.mark.filterwarnings("ignore")
def test_lean_header_and_native_pixels_equal_pydicom_on_dcm_qa_nih() -> None:
    files = sorted(p for p in (QA / "In").rglob("*") if p.is_file())
    dicom = [p for p in files if not p.name.startswith("README")]
    assert len(dicom) == 608
    for path in files:
        ref, lean = dcmread_header(path), _lean_header(path)
        if path.name.startswith("README"):
            assert ref is None and lean is None
            continue
        assert lean is not None, f"{path}: every GE and Siemens file here is in a common encoding"
        assert_same_header(lean, ref, path)
        fast = _native_pixels(lean)  # PixelData deferred: read from the file on access
        assert fast is not None, f"{path}: native 16-bit grayscale"
        assert_pixels_equal(fast, pydicom.dcmread(path).pixel_array)


@pytest.mark.filterwarnings("ignore")
def test_native_pixels_equal_pixel_array_on_every_file_they_accept() -> None:
    accepted = 0
    for path in PYDICOM_FILES:
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        for source in (ds, _lean_header(path)):
            fast = _native_pixels(source) if source is not None else None
            if fast is not None:
                accepted += 1
                assert_pixels_equal(fast, ds.pixel_array)
        if "PixelData" in ds and ds.file_meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian,
                                                                               ImplicitVRLittleEndian):
            assert _native_pixels(ds) is None, f"{path.name}: compressed or big endian data taken as native"
    assert accepted > 100


@pytest.mark.parametrize("signed, expected", [(0, [[4095, 1, 2048]]), (1, [[-1, 1, -2048]])])
def test_native_pixels_drop_the_bits_above_bits_stored_as_pydicom_does(tmp_path: Path, signed, expected) -> None:
    # 12 bits stored in 16 with junk in the top 4 bits (0xF001): cleared when unsigned, the sign of bit 11
    # extended when signed (0x0FFF is -1, 0x0800 is -2048 in 12-bit two's complement)
    stored = np.array([[0x0FFF, 0xF001, 0x0800]], dtype=np.uint16).view(np.int16)
    path = write_slice(tmp_path / "b.dcm", (0.0, 0.0, 0.0), stored, series_uid="1.1", instance=1,
                       BitsStored=12, HighBit=11, PixelRepresentation=signed)
    ds = read_header(path)
    reference = pydicom.dcmread(path).pixel_array
    assert_pixels_equal(_native_pixels(ds), reference)
    np.testing.assert_array_equal(reference, expected)
    assert_pixels_equal(decode_stored(ds), reference)


@pytest.mark.filterwarnings("ignore")
def test_truncated_and_big_endian_files_take_the_dcmread_path(tmp_path: Path) -> None:
    whole = write_slice(tmp_path / "whole.dcm", (0.0, 0.0, 0.0), np.zeros((40, 40), np.int16), series_uid="2.2",
                        instance=1)
    data = whole.read_bytes()
    short_pixels = tmp_path / "short_pixels.dcm"
    short_pixels.write_bytes(data[:-3])
    short_header = tmp_path / "short_header.dcm"
    short_header.write_bytes(data[:400])
    lean = _lean_header(whole)
    assert lean.get_item("PixelData", keep_deferred=True).value is None  # 3200 bytes: deferred, as by dcmread
    assert_same_header(lean, dcmread_header(whole), whole)
    for path in (short_pixels, short_header):
        assert _lean_header(path) is None
        assert slices(path, outcome(lambda: read_header(path))) == slices(path, dcmread_header(path))
    with pytest.raises(RejectedSeries, match="cannot decode the pixel data"):
        decode_stored(read_header(short_pixels), "short_pixels.dcm")

    big_endian = Path(get_testdata_file("MR_small_bigendian.dcm"))
    assert _lean_header(big_endian) is None
    ds = read_header(big_endian)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian and ds.original_encoding == (False, False)
    assert read_slice_headers(big_endian) == read_slice_headers(big_endian, dcmread_header(big_endian))
    assert _native_pixels(ds) is None
    assert_pixels_equal(decode_stored(ds), pydicom.dcmread(big_endian).pixel_array)


def nested_sequence(depth: int) -> Sequence:
    """A sequence of one undefined-length item holding a number and, below ``depth``, another such sequence."""
    item = Dataset()
    item.is_undefined_length_sequence_item = True
    item.ReferencedSOPInstanceUID = f"1.2.{depth}"
    if depth:
        item.ReferencedImageSequence = nested_sequence(depth - 1)
        item["ReferencedImageSequence"].is_undefined_length = True
    return Sequence([item])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_lean_header_reads_nested_undefined_length_sequences(tmp_path: Path, syntax) -> None:
    path = write_slice(tmp_path / "seq.dcm", (1.0, 2.0, 3.0), pattern(0), series_uid="3.3", instance=1, syntax=syntax,
                       ReferencedImageSequence=nested_sequence(3), SeriesDescription="after the sequences")
    ds = pydicom.dcmread(path)
    ds["ReferencedImageSequence"].is_undefined_length = True
    # a private sequence (implicit VR: no VR, recognised by its first item)
    ds.private_block(0x0019, "MEDTL TEST", create=True).add_new(0x10, "SQ", nested_sequence(2))
    ds[0x00191010].is_undefined_length = True
    ds.save_as(path)
    assert b"\xfe\xff\xdd\xe0" in path.read_bytes()  # sequence delimiters: undefined lengths were written
    lean = _lean_header(path)
    assert lean is not None
    assert_same_header(lean, dcmread_header(path), path)
    assert lean.SeriesDescription == "after the sequences"

    # an undefined-length sequence that is itself a header tag is parsed as dcmread parses it
    ds.SharedFunctionalGroupsSequence = nested_sequence(0)
    ds["SharedFunctionalGroupsSequence"].is_undefined_length = True
    ds.save_as(path)
    lean = _lean_header(path)
    assert lean is not None
    assert_same_header(lean, dcmread_header(path), path)
    assert lean.get_item("SharedFunctionalGroupsSequence").is_undefined_length
    assert read_header(path).SharedFunctionalGroupsSequence[0].ReferencedSOPInstanceUID == "1.2.0"
