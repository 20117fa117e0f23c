"""Decoding: the public DICOM test corpus, pixel correctness against references, hostile files.

References for "correct pixels":
* pydicom-data and pydicom ship the same image in several encodings; lossless ones must decode
  equal to the uncompressed one, lossy ones within a small error, and the WG04 ``*_UNCI`` files are
  the lossy ``*_J2KI`` images decompressed by another toolkit, so those must match exactly too;
* constructed datasets, where the expected values follow from the DICOM formulas by hand.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medtl.ingest.reader import (RejectedFile, decode, fit_to_square, preprocess, read_dataset, validate,
                                 voi_window)
from tests.hostile_corpus import write_hostile_corpus

ROOT = Path(__file__).resolve().parents[1]

LOSSLESS = [  # (reference, same image in another encoding)
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"), ("693_UNCR.dcm", "693_J2KR.dcm"), ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm"), ("US1_UNCR.dcm", "US1_J2KR.dcm"), ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),
    ("MR2_UNCI.dcm", "MR2_J2KI.dcm"), ("693_UNCI.dcm", "693_J2KI.dcm"), ("RG1_UNCI.dcm", "RG1_J2KI.dcm"),
    ("RG3_UNCI.dcm", "RG3_J2KI.dcm"), ("US1_UNCI.dcm", "US1_J2KI.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm"), ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"), ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_RLE.dcm"), ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_expb.dcm"), ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"), ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_padded.dcm"),
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"), ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"),
    ("OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm"), ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm"), ("SC_rgb.dcm", "SC_rgb_rle.dcm"), ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm"),
    ("SC_rgb.dcm", "SC_rgb_gdcm_KY.dcm"), ("SC_rgb.dcm", "SC_rgb_gdcm2k_uncompressed.dcm"),
    ("SC_rgb_2frame.dcm", "SC_rgb_rle_2frame.dcm"), ("SC_rgb_32bit.dcm", "SC_rgb_rle_32bit.dcm"),
    ("SC_rgb_32bit_2frame.dcm", "SC_rgb_expb_32bit_2frame.dcm"),
    ("rtdose.dcm", "rtdose_expb.dcm"), ("rtdose.dcm", "rtdose_rle.dcm"), ("liver.dcm", "liver_expb.dcm"),
]
LOSSY = [  # (reference, lossy encoding, tolerated RMS error as a fraction of the 0.5-99.5 % range)
    ("MR2_UNCR.dcm", "MR2_J2KI.dcm", 0.02), ("693_UNCR.dcm", "693_J2KI.dcm", 0.04),
    ("RG1_UNCR.dcm", "RG1_J2KI.dcm", 0.01), ("RG3_UNCR.dcm", "RG3_J2KI.dcm", 0.01),
    ("US1_UNCR.dcm", "US1_J2KI.dcm", 0.02), ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 0.01),
    ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", 0.01), ("SC_rgb.dcm", "SC_rgb_jls_lossy_line.dcm", 0.01),
    # YBR stores the luma itself: RGB -> luma and YBR's Y differ only by the rounding of Y
    ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", 0.005), ("SC_rgb.dcm", "SC_ybr_full_422_uncompressed.dcm", 0.005),
    ("SC_rgb_16bit.dcm", "SC_rgb_rle_16bit.dcm", 1e-12),  # 16-bit RGB: float rounding of the luma sum only
]


def _decoded(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(Path(get_testdata_file(name)))
        validate(ds, 3 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 2)
        return decode(ds)


def _load_table_script():
    spec = importlib.util.spec_from_file_location("decode_table", ROOT / "scripts" / "decode_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# the public corpus


def test_every_public_test_file_decodes_or_is_quarantined_and_the_table_is_current() -> None:
    table = _load_table_script()
    files = table.corpus_files()
    assert len(files) >= 200 and any(label.startswith("pydicom-data/") for label, _ in files)
    rows = [table.outcome(label, path) for label, path in files]
    assert not [r for r in rows if r.outcome.startswith("CRASH")]
    assert all(r.decoded or r.outcome.startswith("quarantined: ") and len(r.outcome) > 30 for r in rows)
    document = (ROOT / "docs" / "decoding.md").read_text()
    assert table.updated_document(table.render(rows), document) == document, \
        "docs/decoding.md is stale: run .venv/bin/python scripts/decode_table.py"
    by_file = {r.file.split("/")[-1]: r.outcome for r in rows}
    assert by_file["color3d_jpeg_baseline.dcm"] == "decoded (120, 480, 640)"  # YBR_FULL_422 JPEG, multi-frame
    assert by_file["OT-PAL-8-face.dcm"] == "decoded (480, 640)"  # palette, no preamble
    assert by_file["JPEG-lossy.dcm"].startswith("quarantined: cannot decode pixel data (JPEG Extended")


@pytest.mark.parametrize(("reference", "variant"), LOSSLESS, ids=[v for _, v in LOSSLESS])
def test_lossless_encodings_decode_to_identical_pixels(reference: str, variant: str) -> None:
    expected, actual = _decoded(reference), _decoded(variant)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(("reference", "variant", "tolerance"), LOSSY, ids=[v for _, v, _ in LOSSY])
def test_lossy_encodings_decode_close_to_the_reference(reference: str, variant: str, tolerance: float) -> None:
    expected, actual = _decoded(reference), _decoded(variant)
    assert actual.shape == expected.shape
    low, high = np.percentile(expected, [0.5, 99.5])
    rms = float(np.sqrt(np.mean((actual - expected) ** 2)))
    assert rms <= tolerance * (high - low)
    assert np.corrcoef(actual.ravel(), expected.ravel())[0, 1] > 0.99


def test_known_values_of_reference_images() -> None:
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # signed 16-bit CT with a rescale
    values = _decoded("CT_small.dcm")
    np.testing.assert_array_equal(values, ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept))
    mono1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    np.testing.assert_array_equal(_decoded("RG1_UNCR.dcm"), -mono1.pixel_array.astype(np.float64))
    lut = _decoded("mlut_18.dcm")  # Modality LUT Sequence
    stored = pydicom.dcmread(get_testdata_file("mlut_18.dcm")).pixel_array
    assert lut.shape == stored.shape and not np.array_equal(lut, stored)
    assert np.all(np.diff(lut.ravel()[np.argsort(stored.ravel(), kind="stable")]) >= 0)  # the LUT is monotonic


# ----------------------------------------------------------------------------------------------
# constructed datasets: expected values by hand


def _dataset(stored: np.ndarray, *, bits_stored: int = 16, signed: bool = False, **attrs) -> Dataset:
    """A native little endian dataset around raw 16-bit words ``stored`` ``(frames, rows, columns)``."""
    frames, rows, columns = stored.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stored.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _ramp(frames: int = 1, rows: int = 8, columns: int = 16) -> np.ndarray:
    return np.arange(frames * rows * columns, dtype=np.uint16).reshape(frames, rows, columns)


def test_monochrome1_is_negated_and_windows_to_the_complement() -> None:
    ramp = _ramp(rows=16)
    mono2 = decode(_dataset(ramp))
    mono1 = decode(_dataset(ramp, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, -mono2)
    np.testing.assert_allclose(preprocess(mono1, 16), 1.0 - preprocess(mono2, 16), atol=1e-6)


def test_rescale_slope_and_intercept() -> None:
    values = decode(_dataset(_ramp(), RescaleSlope="2.5", RescaleIntercept="-1024"))
    np.testing.assert_allclose(values, _ramp()[0] * 2.5 - 1024)


def test_modality_lut_sequence() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 16]  # 4 entries, first input value 10
    item.LUTData = [100, 200, 300, 400]
    item.ModalityLUTType = "HU"
    stored = np.array([[[0, 10, 11, 12, 13, 14, 99, 5]]], dtype=np.uint16).repeat(8, axis=1)
    values = decode(_dataset(stored, ModalityLUTSequence=Sequence([item])))
    np.testing.assert_array_equal(values[0], [100, 100, 200, 300, 400, 400, 400, 100])  # clamped at both ends


def test_enhanced_multi_frame_rescale_per_frame_then_shared() -> None:
    def transform(slope: str, intercept: str) -> Dataset:
        group, item = Dataset(), Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
        group.PixelValueTransformationSequence = Sequence([item])
        return group

    stored = _ramp(frames=2)
    ds = _dataset(stored, SharedFunctionalGroupsSequence=Sequence([transform("3", "0")]),
                  PerFrameFunctionalGroupsSequence=Sequence([transform("2", "-5"), Dataset()]))
    values = decode(ds)
    np.testing.assert_allclose(values[0], stored[0] * 2.0 - 5)  # its own per-frame transform
    np.testing.assert_allclose(values[1], stored[1] * 3.0)  # falls back to the shared one


def test_garbage_above_bits_stored_is_masked_and_signed_values_are_sign_extended() -> None:
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 16, size=(1, 8, 16), dtype=np.uint16) << 12  # overlay bits in 12..15
    unsigned = np.arange(128, dtype=np.uint16).reshape(1, 8, 16) * 31  # 0..3937, 12-bit values
    np.testing.assert_array_equal(decode(_dataset(unsigned | garbage, bits_stored=12)), unsigned[0])
    signed = np.arange(-64, 64, dtype=np.int16).reshape(1, 8, 16) * 31  # -1984..1953 in 12 bits
    words = (signed.astype(np.uint16) & 0x0FFF) | garbage
    np.testing.assert_array_equal(decode(_dataset(words, bits_stored=12, signed=True)), signed[0])


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"HighBit": 15, "BitsStored": 12}, "HighBit=15 is not BitsStored - 1 = 11"),
    ({"BitsStored": 17}, "BitsStored=17 is not between 1 and BitsAllocated=16"),
    ({"PhotometricInterpretation": "RGB"}, "SamplesPerPixel=1 does not match PhotometricInterpretation 'RGB'"),
    ({"PhotometricInterpretation": "HSV"}, "PhotometricInterpretation 'HSV' is not supported"),
    ({"BitsAllocated": 12}, "unsupported BitsAllocated=12"),
    ({"NumberOfFrames": 0}, "invalid NumberOfFrames 0: must be at least 1"),
    ({"Rows": 9}, "truncated: pixel data length 256 != expected 288"),
])
def test_inconsistent_image_pixel_attributes_are_named(attrs: dict, reason: str) -> None:
    ds = _dataset(_ramp(rows=8, columns=16))
    for key, value in attrs.items():
        setattr(ds, key, value)
    with pytest.raises(RejectedFile, match=reason.replace("(", r"\(").replace(")", r"\)")):
        validate(ds, 2)


def test_colour_images_become_bt601_luma() -> None:
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array.astype(np.float64)
    np.testing.assert_allclose(_decoded("SC_rgb.dcm"), rgb @ [0.299, 0.587, 0.114])
    palette = _decoded("OBXXXX1A.dcm")
    assert palette.shape == (600, 800) and palette.max() > palette.min()


# ----------------------------------------------------------------------------------------------
# windowing


def test_dicom_voi_window_follows_ps3_3_c_11_2_1_2() -> None:
    x = np.array([0.0, 39.5, 40.0, 50.0, 60.0, 61.0, 100.0])
    linear = voi_window(_dataset(_ramp(), WindowCenter="50", WindowWidth="21"))
    # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; c = 50, w = 21
    np.testing.assert_allclose(linear(x), np.clip((x - 49.5) / 20 + 0.5, 0, 1))
    exact = voi_window(_dataset(_ramp(), WindowCenter=["50", "999"], WindowWidth=["20", "1"],
                                VOILUTFunction="LINEAR_EXACT"))  # the first window is the default
    np.testing.assert_allclose(exact(x), np.clip((x - 50) / 20 + 0.5, 0, 1))
    sigmoid = voi_window(_dataset(_ramp(), WindowCenter="50", WindowWidth="20", VOILUTFunction="SIGMOID"))
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-4 * (x - 50) / 20)))
    mono1 = voi_window(_dataset(_ramp(), WindowCenter="50", WindowWidth="21", PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(mono1(-x), 1 - linear(x))  # decode() negated it; still bright = dense


def test_voi_lut_sequence_is_scaled_by_its_own_range() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 100, 16]  # declared 16 bits, entries only reach 4000 (a common header error)
    item.LUTData = [1000, 2500, 4000]
    transform = voi_window(_dataset(_ramp(), VOILUTSequence=Sequence([item])))
    np.testing.assert_allclose(transform(np.array([50.0, 100.0, 101.0, 102.0, 500.0])), [0, 0, 0.5, 1, 1])


def test_voi_window_is_absent_or_refused_with_a_fix() -> None:
    assert voi_window(_dataset(_ramp())) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert voi_window(read_dataset(Path(get_testdata_file("SC_rgb.dcm")))) is None  # colour: no VOI
    with pytest.raises(RejectedFile, match=r"WindowWidth 0 \(0028,1051\) is below 1.*ingest.windowing: percentile"):
        voi_window(_dataset(_ramp(), WindowCenter="50", WindowWidth="0"))
    with pytest.raises(RejectedFile, match="blank image after the header's VOI window"):
        preprocess(np.zeros((8, 8)) + 5000, 8, voi=voi_window(_dataset(_ramp(), WindowCenter="50", WindowWidth="20")))


def test_header_window_of_a_real_file() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(Path(get_testdata_file("MR2_UNCR.dcm")))  # WindowCenter 1000, WindowWidth 2000
    image = preprocess(decode(ds), 32, voi=voi_window(ds))
    assert image.shape == (1, 32, 32) and 0.0 <= image.min() < image.max() <= 1.0


def test_fit_to_square_resizes_before_padding() -> None:
    volume = np.ones((4, 20, 40), dtype=np.float32)
    out = fit_to_square(volume, 16)
    assert out.shape == (16, 16, 16)
    assert out[8, 8, 8] == pytest.approx(1.0) and out[0].max() == 0.0 and out[:, 0].max() == 0.0
    assert fit_to_square(np.ones((1000, 10)), 8).shape == (8, 8)  # a side shorter than one pixel keeps one


# ----------------------------------------------------------------------------------------------
# budgets and hostile files


def test_declared_size_and_file_size_budgets() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(Path(get_testdata_file("MR_small.dcm")))
        budget = r"declared decoded size 41.0 KB .* x 10 bytes: .* exceeds the 10.0 KB budget"
        with pytest.raises(RejectedFile, match=budget):
            validate(ds, 2, max_decoded_bytes=10_000)
        with pytest.raises(RejectedFile, match=r"file is 9.8 KB, larger than the 1.0 KB decode budget"):
            read_dataset(Path(get_testdata_file("MR_small.dcm")), max_bytes=1000)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, write_hostile_corpus(folder)


def _reason(path: Path) -> str:
    """The quarantine reason of one file; anything but RejectedFile propagates and fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(path)
            validate(ds, 2)
            decode(ds)
    except RejectedFile as exc:
        return str(exc)
    return "accepted"


def test_every_hostile_file_is_rejected_with_its_reason(hostile) -> None:
    folder, expected = hostile
    assert len(expected) >= 17 and all((folder / name).is_file() for name in expected)
    assert max(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    wrong = {name: reason for name, keyword in expected.items() if keyword not in (reason := _reason(folder / name))}
    assert not wrong, json.dumps(wrong, indent=1)


_UNDER_LIMIT = """
import json, resource, sys, warnings
from pathlib import Path
from medtl.ingest.reader import RejectedFile, decode, read_dataset, validate
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
vm = int(status["VmSize"].split()[0]) * 1024
limit = vm + 768 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(path); validate(ds, 2); decode(ds)
        out[path.name] = "accepted"
    except RejectedFile as exc:
        out[path.name] = str(exc)
    except BaseException as exc:
        out[path.name] = f"CRASH {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def test_hostile_files_are_rejected_within_an_address_space_limit(hostile) -> None:
    """No check allocates what a file declares: the whole corpus passes with 768 MiB of headroom."""
    folder, expected = hostile
    run = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, str(folder)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
                                                     "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    reasons = json.loads(run.stdout.splitlines()[-1])
    assert {name: keyword in reasons[name] for name, keyword in expected.items()} == dict.fromkeys(expected, True)
