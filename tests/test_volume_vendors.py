"""Volumes as dcm2niix writes them, vendor by vendor, on files that reproduce each vendor's structure.

Each builder writes, with pydicom, the attributes a real file of that kind carries where the vendor puts them:
UIH VFRAME tile grids with their private tags, Philips private scaling and trace volumes, diffusion b-values and
gradients in public and private elements, a Siemens mosaic whose TR is only in its CSA header, an enhanced
multi-frame file whose TR is only in its functional groups.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from medtl.config import IngestConfig
from medtl.ingest import ingest_folder, load_ledger, load_manifest
from medtl.ingest.deid import ALLOW_LIST
from medtl.ingest.manifest import read_manifest
from medtl.ingest.vendor import PRIVATE_TAGS, SIDECAR_FIELDS, bvec, precise_scaling
from medtl.ingest.volume import LAYOUT, assemble, group_series, read_slice_headers, series_to_nifti
from medtl.workspace import Workspace

ROWS, COLUMNS = 9, 8  # the reader refuses sides under 8 pixels
OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.8, 0.6)  # row (1,0,0), column (0,0.8,0.6): normal (0,-0.6,0.8)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "decoding.md"


def tile(value: int, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    r, c = np.mgrid[:rows, :columns]
    return (value + 10 * r + c).astype(np.uint16)


def base(series_uid: str, instance: int, pixels: np.ndarray, manufacturer: str, *, orientation=(1, 0, 0, 0, 1, 0),
         position=None, bits_stored: int = 16) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "MR", manufacturer, "Model X"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series_uid
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = 9, "secret description", instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.PixelSpacing, ds.SliceThickness = [2.0, 1.0], 3.0
    ds.EchoTime, ds.InPlanePhaseEncodingDirection = 30, "COL"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def save(ds: Dataset, path: Path, syntax=ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def oblique_position(k: int) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.array([5.0, -3.0, 10.0]) + 3.0 * k * np.array([0.0, -0.6, 0.8]))


def expected_bvec(gradient) -> tuple[float, float, float]:
    """(g·row, −g·column, g·normal), normalised: the image frame of medtl's and dcm2niix's voxel axes."""
    g = np.asarray(gradient, float) / np.linalg.norm(gradient)
    row, col = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    return tuple(np.array([g @ row, -(g @ col), g @ np.cross(row, col)]))


def read_text_table(path: Path) -> np.ndarray:
    return np.array([[float(v) for v in line.split(" ")] for line in path.read_text().splitlines()])


# ----------------------------------------------------------------------------------------------
# 1. UIH VFRAME: several slices tiled in one 2D image, positions in a private sequence

UIH_GRADIENTS = [(0.0, 0.0, 0.0), (0.6, 0.8, 0.0), (0.0, 0.6, -0.8)]  # image frame (read, phase, slice)


def uih_vframe_series(folder: Path, *, n_tiles: int = 5, descending: bool = False) -> list[Path]:
    """Three VFRAME files (b = 0, then two gradients), each a grid of ``n_tiles`` tiles of ROWS × COLUMNS."""
    across = math.ceil(math.sqrt(n_tiles))
    down = math.ceil(n_tiles / across)
    paths = []
    for volume, gradient in enumerate(UIH_GRADIENTS):
        image = np.zeros((down * ROWS, across * COLUMNS), np.uint16)
        for k in range(n_tiles):
            r, c = divmod(k, across)
            image[r * ROWS:(r + 1) * ROWS, c * COLUMNS:(c + 1) * COLUMNS] = tile(1000 * volume + 100 * k)
        ds = base("7.7.1", volume + 1, image, "UIH")  # no ImagePositionPatient at the top level
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "VFRAME"]
        ds.add_new(0x00650010, "LO", "Image Private Header")
        ds.add_new(PRIVATE_TAGS["uih_grid_count"].tag, "DS", str(n_tiles))
        items = []
        for k in range(n_tiles):
            item = Dataset()
            item.ImagePositionPatient = list(oblique_position(n_tiles - 1 - k if descending else k))
            items.append(item)
        ds.add_new(PRIVATE_TAGS["uih_vframe_sequence"].tag, "SQ", Sequence(items))
        ds.ImageOrientationPatient = list(OBLIQUE)
        ds.add_new(PRIVATE_TAGS["uih_b_value"].tag, "FD", 0.0 if volume == 0 else 1000.0)
        ds.add_new(PRIVATE_TAGS["uih_gradient"].tag, "FD", list(gradient))
        ds.RepetitionTime = 2500
        paths.append(save(ds, folder / f"uih_{volume}.dcm"))
    return paths


@pytest.mark.parametrize("descending", [False, True], ids=["tiles-ascending", "tiles-descending"])
def test_uih_vframe_grid_becomes_one_4d_volume_with_bval_bvec(tmp_path: Path, descending: bool) -> None:
    (outcome,) = series_to_nifti(uih_vframe_series(tmp_path, descending=descending), tmp_path / "out")
    assert outcome.status == "written", outcome.reason
    image = nib.load(outcome.nifti)
    data = np.asarray(image.dataobj.get_unscaled())
    assert data.shape == (COLUMNS, ROWS, 5, 3)  # 5 tiles on a grid 3 across, 2 down (Siemens would use 3 × 3)
    for v in range(3):
        for z in range(5):
            k = 4 - z if descending else z  # slices ascend along the normal whatever the tile order
            np.testing.assert_array_equal(data[:, :, z, v], tile(1000 * v + 100 * k).T[:, ::-1])
    np.testing.assert_allclose(image.affine[:3, 2], [0.0, 3.0 * 0.6, 3.0 * 0.8], atol=1e-5)  # LPS (0,-1.8,2.4)
    assert image.header["pixdim"][4] == pytest.approx(2.5)
    stem = outcome.nifti.with_suffix("")
    assert Path(f"{stem}.bval").read_text() == "0 1000 1000\n"
    vectors = read_text_table(Path(f"{stem}.bvec"))
    np.testing.assert_allclose(vectors.T, [(0, 0, 0), (0.6, -0.8, 0.0), (0.0, -0.6, -0.8)], atol=1e-6)


def test_uih_vframe_files_are_ingested_in_3d_not_quarantined_as_2d(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    uih_vframe_series(folder)
    ws = Workspace(tmp_path / "ws")
    summary = ingest_folder(IngestConfig(input_dir=folder, spatial_dims=3, image_size=16), ws)
    assert (summary.files_in, summary.ingested, summary.quarantined) == (3, 3, 0)
    (row,) = load_manifest(ws).itertuples()
    volume = nib.load(ws.ingest / row.volume)
    assert volume.shape == (COLUMNS, ROWS, 5, 3)
    assert (ws.ingest / row.volume).with_suffix(".bval").read_text() == "0 1000 1000\n"


def test_uih_vframe_with_too_few_tile_positions_is_refused_with_the_tags(tmp_path: Path) -> None:
    (path, *_) = uih_vframe_series(tmp_path)
    ds = pydicom.dcmread(path)
    ds[PRIVATE_TAGS["uih_grid_count"].tag].value = "9"
    save(ds, path)
    with pytest.raises(Exception, match=r"\(0065,1050\) declares 9 tiles but \(0065,1051\) has 5 items"):
        read_slice_headers(path)


# ----------------------------------------------------------------------------------------------
# 2. Philips: floating-point scaling from the private scale slope


def philips_series(folder: Path, *, slope=2.5, intercept=-4.0, scale_slope=0.00361, syntax=ExplicitVRLittleEndian,
                   series_uid="8.8.1") -> list[Path]:
    paths = []
    for k in range(3):
        ds = base(series_uid, k + 1, tile(100 * k), "Philips Medical Systems", position=(0.0, 0.0, 3.0 * k),
                  bits_stored=12)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.add_new(0x20050010, "LO", "Philips MR Imaging DD 001")
        ds.add_new(PRIVATE_TAGS["philips_scale_slope"].tag, "FL", scale_slope)
        paths.append(save(ds, folder / f"philips_{series_uid}_{k}.dcm", syntax))
    return paths


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_philips_precise_scaling_is_the_default_and_display_the_option(tmp_path: Path, syntax) -> None:
    paths = philips_series(tmp_path, syntax=syntax)
    (precise,) = series_to_nifti(paths, tmp_path / "precise")
    (display,) = series_to_nifti(paths, tmp_path / "display", philips_scaling="display")
    a, b = nib.load(precise.nifti), nib.load(display.nifti)
    np.testing.assert_array_equal(a.dataobj.get_unscaled(), b.dataobj.get_unscaled())  # the same stored integers
    assert a.get_data_dtype() == np.int16  # BitsStored 12
    # D = R·RS + RI; P = D / (RS·SS): slope 1/SS, intercept RI/(RS·SS), in float32 as dcm2niix computes them
    ss, rs, ri = np.float32(0.00361), np.float32(2.5), np.float32(-4.0)
    assert (a.dataobj.slope, a.dataobj.inter) == pytest.approx((1 / 0.00361, -4.0 / (2.5 * 0.00361)), rel=1e-5)
    assert a.dataobj.inter == pytest.approx(float(np.float32(ri / (rs * ss))), rel=1e-7)
    assert (b.dataobj.slope, b.dataobj.inter) == (2.5, -4.0)
    precise_meta = json.loads(precise.nifti.with_suffix(".json").read_text())
    display_meta = json.loads(display.nifti.with_suffix(".json").read_text())
    assert precise_meta["IntensityScaling"] == "philips_precise" and precise_meta["UsePhilipsFloatNotDisplayScaling"] == 1
    assert display_meta["IntensityScaling"] == "rescale" and display_meta["UsePhilipsFloatNotDisplayScaling"] == 0
    assert precise_meta["PhilipsScaleSlope"] == pytest.approx(0.00361, rel=1e-6)


def test_precise_scaling_formula_matches_chenevert() -> None:
    slope, intercept = precise_scaling((2.5, -4.0), 0.00361)
    stored = np.array([0.0, 1.0, 1234.0])
    display = stored * 2.5 - 4.0
    np.testing.assert_allclose(stored * slope + intercept, display / (2.5 * 0.00361), rtol=1e-5)


def test_philips_enhanced_file_takes_the_scale_slope_of_its_frames(tmp_path: Path) -> None:
    ds = base("8.9", 1, np.zeros((ROWS, COLUMNS), np.uint16), "Philips Medical Systems")
    del ds.ImageOrientationPatient, ds.PixelSpacing
    ds.NumberOfFrames = 3
    shared, measures, orientation, timing = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [2.0, 1.0], 3
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    timing.RepetitionTime = 1800
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])  # TR only here (as in Siemens XA files too)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(3):
        frame, position, transform, private = Dataset(), Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, 3 * k]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, 0, "normalized"
        private.add_new(PRIVATE_TAGS["philips_scale_slope"].tag, "FL", 0.5)
        frame.PlanePositionSequence, frame.PixelValueTransformationSequence = Sequence([position]), Sequence([transform])
        frame.add_new(0x20050010, "LO", "Philips MR Imaging DD 005")
        frame.add_new(PRIVATE_TAGS["philips_frame_sequence"].tag, "SQ", Sequence([private]))
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([tile(100 * k) for k in range(3)]).astype("<u2").tobytes()
    (outcome,) = series_to_nifti([save(ds, tmp_path / "enhanced.dcm")], tmp_path / "out")
    image = nib.load(outcome.nifti)
    assert (image.dataobj.slope, image.dataobj.inter) == (2.0, 0.0)  # 1/SS = 2, RI = 0
    assert image.shape == (COLUMNS, ROWS, 3) and image.header["pixdim"][4] == pytest.approx(1.8)
    assert json.loads(outcome.nifti.with_suffix(".json").read_text())["RepetitionTime"] == pytest.approx(1.8)


# ----------------------------------------------------------------------------------------------
# 3. diffusion: one 4D file per series, b-values wherever stored, Philips' trace volume left out

GRADIENTS = [None, (1.0, 0.0, 0.0), (0.0, 0.6, 0.8), (0.0, -0.8, 0.6)]  # patient frame (LPS); None: b = 0


def dwi_series(folder: Path, storage: str, *, with_trace: bool = False) -> list[Path]:
    """3 positions × 4 volumes (b = 0 then three directions), files ordered volume-major by InstanceNumber."""
    manufacturer = {"public": "Canon", "siemens": "SIEMENS", "philips": "Philips"}[storage]
    series_uid = {"public": "9.1", "siemens": "9.2", "philips": "9.3"}[storage]
    volumes = [*GRADIENTS, "trace"] if with_trace else GRADIENTS
    paths = []
    for v, gradient in enumerate(volumes):
        b_value = 0.0 if gradient is None else 1000.0
        for k in range(3):
            ds = base(series_uid, 1 + 3 * v + k, tile(1000 * v + 100 * k), manufacturer, orientation=OBLIQUE,
                      position=oblique_position(k))
            ds.RepetitionTime = 4000
            vector = [0.0, 0.0, 0.0] if gradient in (None, "trace") else list(gradient)
            if storage == "public":
                ds.add_new(0x00189087, "FD", b_value)
                ds.add_new(0x00189089, "FD", vector)
            elif storage == "siemens":
                ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
                ds.add_new(PRIVATE_TAGS["siemens_b_value"].tag, "IS", str(int(b_value)))
                if gradient is not None:
                    ds.add_new(PRIVATE_TAGS["siemens_gradient"].tag, "FD", vector)
            else:
                ds.add_new(0x20010010, "LO", "Philips Imaging DD 001")
                ds.add_new(PRIVATE_TAGS["philips_b_value"].tag, "FL", b_value)
                ds.add_new(PRIVATE_TAGS["philips_direction"].tag, "CS", "I" if gradient == "trace" else
                           ("O" if gradient else "0"))
                ds.add_new(0x20050010, "LO", "Philips MR Imaging DD 001")
                for axis, value in zip(("rl", "ap", "fh"), vector):
                    ds.add_new(PRIVATE_TAGS[f"philips_gradient_{axis}"].tag, "FL", value)
            paths.append(save(ds, folder / f"dwi_{storage}_{v}_{k}.dcm"))
    return paths


@pytest.mark.parametrize("storage", ["public", "siemens", "philips"])
def test_a_diffusion_series_is_one_4d_file_with_bval_and_image_frame_bvec(tmp_path: Path, storage: str) -> None:
    outcomes = series_to_nifti(dwi_series(tmp_path, storage, with_trace=storage == "philips"), tmp_path / "out")
    (outcome,) = outcomes  # not split into b = 0 and weighted files, wherever the b-value is stored
    assert outcome.status == "written", outcome.reason
    data = np.asarray(nib.load(outcome.nifti).dataobj.get_unscaled())
    assert data.shape == (COLUMNS, ROWS, 3, 4)  # Philips' isotropic trace (a 5th volume) is left out
    for v in range(4):
        np.testing.assert_array_equal(data[:, :, 1, v], tile(1000 * v + 100).T[:, ::-1])
    stem = outcome.nifti.with_suffix("")
    assert Path(f"{stem}.bval").read_text() == "0 1000 1000 1000\n"
    vectors = read_text_table(Path(f"{stem}.bvec")).T
    np.testing.assert_allclose(vectors[0], 0.0)
    for v in range(1, 4):
        np.testing.assert_allclose(vectors[v], expected_bvec(GRADIENTS[v]), atol=1e-5)
    if storage == "philips":
        assert [f.code for f in outcome.findings] == ["derived_trace_dropped"]


def test_a_series_of_trace_images_only_is_kept(tmp_path: Path) -> None:
    paths = [p for p in dwi_series(tmp_path, "philips", with_trace=True) if "_4_" in p.name or "_0_" in p.name]
    (outcome,) = series_to_nifti(paths, tmp_path / "out")  # b = 0 and trace: no directional volume to derive from
    assert outcome.status == "written" and nib.load(outcome.nifti).shape == (COLUMNS, ROWS, 3, 2)


def test_ingesting_a_diffusion_series_accounts_for_the_trace_files(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    dwi_series(folder, "philips", with_trace=True)
    ws = Workspace(tmp_path / "ws")
    summary = ingest_folder(IngestConfig(input_dir=folder, spatial_dims=3, image_size=16), ws)
    assert summary.files_in == 15 == summary.ingested
    (row,) = read_manifest(ws).itertuples()  # paths as stored, relative to the ingest folder
    assert nib.load(ws.ingest / row.volume).shape == (COLUMNS, ROWS, 3, 4)
    assert row.intensity_scaling == "rescale"
    ledger = load_ledger(ws)
    trace = ledger[ledger["path"].str.contains("dwi_philips_4_")]
    assert len(trace) == 3 and (trace["image"] == row.image).all()
    assert trace["reason"].str.contains("isotropic").all()


def test_bvec_of_ge_logical_frame_follows_dcm2niix() -> None:
    # axial, column phase encoding: flip z, negate y, negate all → (−x, y, z)
    assert bvec(1000.0, (0.6, 0.8, 0.0), "ge", (1, 0, 0, 0, 1, 0), "COL") == (1000.0, (-0.6, 0.8, 0.0))
    # a vector shortened by the scanner: b scaled by |g|², rounded to 5, the vector lengthened back
    b, vector = bvec(1000.0, (0.5, 0.0, 0.0), "ge", (1, 0, 0, 0, 1, 0), "COL")
    assert b == 250.0 and vector == pytest.approx((-1.0, 0.0, 0.0))


# ----------------------------------------------------------------------------------------------
# 4. timing and type


def csa_header(fields: dict[str, tuple[str, list]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``name → (vr, values)``, in the layout nibabel's reader parses."""
    out = b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<2I", len(fields), 77)
    for name, (vr, values) in fields.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 3, len(values), 77)
        for value in values:
            text = f"{value}".encode() + b"\x00"
            out += struct.pack("<4i", len(text), len(text), 77, len(text)) + text + b"\x00" * (-len(text) % 4)
    return out


def siemens_mosaic(folder: Path, volumes: int = 2) -> list[Path]:
    """A 4-tile mosaic (2 × 2 tiles of ROWS × COLUMNS) per volume; TR only in the CSA image header."""
    paths = []
    for v in range(volumes):
        image = np.zeros((2 * ROWS, 2 * COLUMNS), np.uint16)
        for k in range(4):
            r, c = divmod(k, 2)
            image[r * ROWS:(r + 1) * ROWS, c * COLUMNS:(c + 1) * COLUMNS] = tile(1000 * v + 100 * k)
        ds = base("6.6.6", v + 1, image, "SIEMENS", position=(0.0, 0.0, 0.0), bits_stored=12)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.SpacingBetweenSlices = 3.0
        ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
        ds.add_new(0x00291010, "OB", csa_header({"NumberOfImagesInMosaic": ("US", [4]),
                                                 "SliceNormalVector": ("FD", [0.0, 0.0, 1.0]),
                                                 "RepetitionTime": ("DS", [2130.0])}))
        paths.append(save(ds, folder / f"mosaic_{v}.dcm"))
    return paths


@pytest.mark.parametrize("volumes", [2, 1], ids=["4d", "3d"])
def test_mosaic_tr_from_the_csa_header_reaches_pixdim4(tmp_path: Path, volumes: int) -> None:
    (outcome,) = series_to_nifti(siemens_mosaic(tmp_path, volumes), tmp_path / "out")
    image = nib.load(outcome.nifti)
    assert image.shape == ((COLUMNS, ROWS, 4, 2) if volumes == 2 else (COLUMNS, ROWS, 4))
    assert image.header["pixdim"][4] == pytest.approx(2.13)
    assert image.get_data_dtype() == np.int16


def test_ingest_writes_int16_for_12_bits_stored_and_tr_for_3d(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    for k in range(3):
        ds = base("5.5.5", k + 1, tile(100 * k), "GE MEDICAL SYSTEMS", position=(0.0, 0.0, 2.0 * k), bits_stored=12)
        ds.RepetitionTime = 600
        save(ds, folder / f"s{k}.dcm")
    ws = Workspace(tmp_path / "ws")
    ingest_folder(IngestConfig(input_dir=folder, spatial_dims=3, image_size=16), ws)
    (row,) = load_manifest(ws).itertuples()
    image = nib.load(ws.ingest / row.volume)
    # the headers reach assembly without their datasets: BitsStored travels with them
    assert image.get_data_dtype() == np.int16 and image.header["pixdim"][4] == pytest.approx(0.6)


# ----------------------------------------------------------------------------------------------
# 5. the JSON sidecar


def test_sidecar_has_bids_fields_in_seconds_no_free_text_and_states_the_layout(tmp_path: Path) -> None:
    (outcome,) = series_to_nifti(philips_series(tmp_path), tmp_path / "out")
    meta = json.loads(outcome.nifti.with_suffix(".json").read_text())
    assert meta["EchoTime"] == pytest.approx(0.03) and meta["Manufacturer"] == "Philips Medical Systems"
    assert meta["SeriesNumber"] == 9 and meta["VoxelLayout"] == LAYOUT == "dcm2niix -x i"
    assert "secret description" not in outcome.nifti.with_suffix(".json").read_text()


def test_every_sidecar_field_is_kept_by_the_deidentification_allow_list() -> None:
    assert {keyword for keyword, _ in SIDECAR_FIELDS.values()} <= {keyword_for_tag(tag) for tag in ALLOW_LIST}


def test_docs_list_every_private_element_read() -> None:
    text = DOCS.read_text()
    missing = [f"{name} {spec}" for name, spec in PRIVATE_TAGS.items() if str(spec) not in text]
    assert not missing, f"docs/decoding.md does not list: {missing}"


def test_b_value_no_longer_splits_a_series(tmp_path: Path) -> None:
    headers = [h for p in dwi_series(tmp_path, "public") for h in read_slice_headers(p)]
    (group,) = group_series(headers)
    assert assemble(group).data.shape == (COLUMNS, ROWS, 3, 4)
    assert re.fullmatch(r"series 9 'secret description'", group.describe())


@pytest.mark.parametrize("choice, expected", [("precise", "philips_precise"), ("display", "rescale")])
def test_the_manifest_says_which_scaling_a_philips_volume_got(tmp_path: Path, choice: str, expected: str) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    philips_series(folder)
    ws = Workspace(tmp_path / "ws")
    ingest_folder(IngestConfig(input_dir=folder, spatial_dims=3, image_size=16, philips_scaling=choice), ws)
    (row,) = read_manifest(ws).itertuples()
    assert row.intensity_scaling == expected
    slope = nib.load(ws.ingest / row.volume).dataobj.slope
    assert slope == (pytest.approx(1 / 0.00361, rel=1e-5) if choice == "precise" else 2.5)
