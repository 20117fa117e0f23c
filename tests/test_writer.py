"""The fast writer of de-identified copies writes the bytes of ``dcmwrite(..., enforce_file_format=True)``.

Every file of pydicom's test data (and a sample of the dcm_qa_nih scanner files) is read, de-identified and
written both ways; the bytes must be equal, or both writers must refuse the dataset with the same error type.
Each dataset is de-identified twice from two reads of the file, because ``dcmwrite`` converts elements of the
dataset it writes: each writer gets a dataset in the state that ingestion hands over.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medtl.ingest import writer
from medtl.ingest.deid import DeidOptions, deidentify
from medtl.ingest.reader import RejectedFile, read_dataset
from medtl.ingest.writer import encode_dicom, fallback_reason, write_dicom

KEY = b"k" * 32
SHARED = Path(__file__).resolve().parents[2] / "shared"
NIH_INPUT = SHARED / "data" / "dicom" / "dcm_qa_nih" / "In"
NIH_SAMPLE = 20
# the benchmark options: device identity kept, descriptors cleaned, dates shifted
OPTIONS = DeidOptions(retain_device_identity=True, clean_descriptors=True, longitudinal_temporal="shift")


def _pydicom_data_files() -> list[Path]:
    store = Path(pydicom.__file__).resolve().parents[1] / "data_store" / "data"
    files = {Path(p) for p in get_testdata_files()}
    if store.is_dir():
        files |= set(store.iterdir())
    return sorted(p for p in files if p.is_file())


def _dcmwrite(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _outcome(write, ds: Dataset) -> bytes | type:
    """The bytes written, or the type of the error raised."""
    try:
        return write(ds)
    except Exception as exc:  # compared with dcmwrite's: both writers must refuse the same datasets
        return type(exc)


def _compare(files: list[Path], options: DeidOptions) -> dict[str, int]:
    """Write every readable file both ways; return counts, failing with the files whose bytes differ."""
    counts = {"compared": 0, "fast": 0, "refused": 0}
    mismatches = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about odd values in its own test files
        for path in files:
            try:
                mine, reference = (deidentify(read_dataset(path), KEY, "2.25", options=options) for _ in range(2))
            except RejectedFile:
                continue
            expected = _outcome(_dcmwrite, reference)
            fast = fallback_reason(mine) is None
            got = _outcome(encode_dicom, mine)
            counts["compared"] += 1
            counts["fast"] += fast
            counts["refused"] += isinstance(expected, type)
            if got != expected:
                mismatches.append(f"{path.name}: {_describe(got)} != dcmwrite {_describe(expected)}")
            elif not isinstance(got, type):
                # what the fast writer converted in `mine` must not change what dcmwrite writes afterwards
                again = _outcome(_dcmwrite, mine)
                if again != expected:
                    mismatches.append(f"{path.name}: dcmwrite after write_dicom differs")
    assert not mismatches, "\n".join(mismatches)
    return counts


def _describe(outcome: bytes | type) -> str:
    return outcome.__name__ if isinstance(outcome, type) else f"{len(outcome)} bytes"


@pytest.mark.parametrize("options", [DeidOptions(), OPTIONS], ids=["basic", "device-descriptors-shift"])
def test_pydicom_data_bytes_equal_dcmwrite(options: DeidOptions) -> None:
    counts = _compare(_pydicom_data_files(), options)
    # pydicom-data 3.0: 261 test files (+ the data store); a handful are not DICOM or lack SOP UIDs
    assert counts["compared"] >= 200, counts
    # only the big endian and deflated files take dcmwrite's own road
    assert counts["fast"] >= 0.85 * counts["compared"], counts


@pytest.mark.parametrize("options", [DeidOptions(), OPTIONS], ids=["basic", "device-descriptors-shift"])
def test_scanner_files_bytes_equal_dcmwrite(options: DeidOptions) -> None:
    if not NIH_INPUT.is_dir():
        pytest.skip(f"dcm_qa_nih scanner files not found at {NIH_INPUT} (the shared data folder is absent)")
    files = sorted(p for p in NIH_INPUT.rglob("*") if p.is_file())
    sample = files[:: max(1, len(files) // NIH_SAMPLE)][:NIH_SAMPLE]
    counts = _compare(sample, options)
    assert counts["compared"] >= NIH_SAMPLE // 2 and counts["fast"] == counts["compared"], counts


def _clean(name: str, options: DeidOptions = OPTIONS) -> Dataset:
    return deidentify(read_dataset(Path(get_testdata_file(name))), KEY, "2.25", options=options)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm"])
def test_path_and_file_object_get_dcmwrite_bytes(tmp_path: Path, name: str) -> None:
    expected = _dcmwrite(_clean(name))
    write_dicom(tmp_path / "copy.dcm", _clean(name))
    assert (tmp_path / "copy.dcm").read_bytes() == expected
    write_dicom(str(tmp_path / "str.dcm"), _clean(name))
    assert (tmp_path / "str.dcm").read_bytes() == expected
    stream = io.BytesIO(b"head")
    stream.seek(0, io.SEEK_END)
    write_dicom(stream, _clean(name))  # written from the stream's position, the stream left open
    assert stream.getvalue() == b"head" + expected


def test_implicit_vr_file_takes_the_fast_path() -> None:
    # written in its own encoding, pydicom copies the raw elements too: no reason to hand it over
    clean = _clean("MR_small_implicit.dcm")
    assert clean.original_encoding == (True, True)
    assert fallback_reason(clean) is None
    assert encode_dicom(clean) == _dcmwrite(_clean("MR_small_implicit.dcm"))


def _implicit_as_explicit() -> Dataset:
    clean = _clean("MR_small_implicit.dcm")
    clean.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return clean


def _charset_changed() -> Dataset:
    clean = _clean("CT_small.dcm")
    clean.SpecificCharacterSet = "ISO_IR 192"
    return clean


def _big_endian() -> Dataset:
    return _clean("MR_small_bigendian.dcm")


def _deflated() -> Dataset:
    return _clean("image_dfl.dcm")


@pytest.mark.parametrize(("make", "reason"), [
    (_implicit_as_explicit, "original encoding"),
    (_charset_changed, "Specific Character Set"),
    (_big_endian, "big endian"),
    (_deflated, "deflated"),
])
def test_other_roads_are_left_to_dcmwrite(make, reason: str) -> None:
    clean = make()
    assert reason in (fallback_reason(clean) or "")
    assert encode_dicom(clean) == _dcmwrite(make())


def test_other_pydicom_release_is_left_to_dcmwrite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom, "__version__", "3.1.0")
    clean = _clean("CT_small.dcm")
    assert "3.1.0" in fallback_reason(clean)
    assert encode_dicom(clean) == _dcmwrite(_clean("CT_small.dcm"))


def test_input_dataset_elements_are_not_modified() -> None:
    source = read_dataset(Path(get_testdata_file("CT_small.dcm")))
    pixels = source["PixelData"]  # decoding converts it: the copy then shares this DataElement with the input
    pixels.is_undefined_length = True  # a flag dcmwrite would reset, in place, for this native transfer syntax
    clean = deidentify(source, KEY, "2.25")
    assert clean.get_item(0x7FE00010) is pixels
    before = {tag: source.get_item(tag) for tag in source.keys()}
    data = encode_dicom(clean)
    assert {tag: source.get_item(tag) for tag in source.keys()} == before
    assert all(source.get_item(tag) is elem for tag, elem in before.items())
    assert pixels.is_undefined_length is True
    reference = deidentify(read_dataset(Path(get_testdata_file("CT_small.dcm"))), KEY, "2.25")
    assert data == _dcmwrite(reference)


def _with(clean: Dataset, *elements: DataElement | RawDataElement) -> Dataset:
    for elem in elements:
        clean[elem.tag] = elem
    return clean


def _odd_elements() -> list[DataElement | RawDataElement]:
    undefined_item = Dataset()
    undefined_item.CodeValue = "1"
    undefined_item.is_undefined_length_sequence_item = True
    open_sequence = DataElement(0x00082218, "SQ", Sequence([Dataset()]), is_undefined_length=True)
    return [
        DataElement(0x00081032, "SQ", Sequence([undefined_item])),  # item with undefined length
        open_sequence,  # sequence with undefined length
        DataElement(0x00082220, "SQ", Sequence()),  # empty sequence
        DataElement(0x00204000, "LT", "x" * 70000),  # over 64 KiB in a 16-bit length VR: pydicom writes UN
        RawDataElement(0x00091010, "LO", 70000, b"y" * 70000, 0, False, True),  # the same, still raw
        RawDataElement(0x00091011, "OB", 3, b"odd", 0, False, True),  # odd raw length: written as it is
        DataElement(0x00180015, "CS", ""),  # empty value
        DataElement(0x00280034, "IS", [1, 1]),  # multi-valued number string
    ]


def test_odd_elements_get_dcmwrite_bytes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = _with(_clean("CT_small.dcm"), *_odd_elements())
        reference = _with(_clean("CT_small.dcm"), *_odd_elements())
        assert fallback_reason(mine) is None
        assert encode_dicom(mine) == _dcmwrite(reference)


def test_refusals_match_dcmwrite() -> None:
    no_uid = _clean("CT_small.dcm")
    del no_uid.SOPClassUID
    del no_uid.file_meta.MediaStorageSOPClassUID
    with pytest.raises(AttributeError, match="Media Storage SOP Class UID"):
        encode_dicom(no_uid)
    meta_in_dataset = _clean("CT_small.dcm")
    meta_in_dataset.add_new(0x00020010, "UI", ExplicitVRLittleEndian)
    assert "file meta" in fallback_reason(meta_in_dataset)
    with pytest.raises(ValueError, match="File Meta Information Group elements"):
        encode_dicom(meta_in_dataset)
    bad_value = _clean("CT_small.dcm")
    with pytest.warns(UserWarning, match="cannot be assigned"):
        bad_value[0x00180050] = DataElement(0x00180050, "FD", "thick")  # a value pydicom cannot encode
    with pytest.raises(OSError, match=r"With tag \(0018,0050\).*not a float"):
        encode_dicom(bad_value)
    with pytest.raises(OSError, match=r"With tag \(0018,0050\).*not a float"):
        _dcmwrite(bad_value)


def test_write_dicom_rejects_what_is_no_file() -> None:
    with pytest.raises(TypeError, match="file path or a binary file object"):
        write_dicom(42, _clean("CT_small.dcm"))  # type: ignore[arg-type]


def test_fast_path_emits_raw_values_without_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    # the point of the module: kept raw elements never reach write_data_element
    calls = []
    original = writer.write_data_element
    monkeypatch.setattr(writer, "write_data_element", lambda fp, elem, *a: (calls.append(elem), original(fp, elem, *a)))
    encode_dicom(_clean("CT_small.dcm"))
    assert calls and not any(isinstance(elem, RawDataElement) for elem in calls)
    assert {elem.tag for elem in calls} == {0x7FE00010}  # only Pixel Data is written by pydicom itself


def test_non_latin_character_sets_get_dcmwrite_bytes(tmp_path: Path) -> None:
    # pydicom's character set files, given SOP UIDs and a non-ASCII description that de-identification re-encodes
    from pydicom.data import get_charset_files

    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in get_charset_files("chr*.dcm"):
            ds = pydicom.dcmread(source)
            ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
            # the name's characters reversed: text of the file's own scripts that is not an identifier to scrub
            ds.StudyDescription = str(ds.get("PatientName", "") or "")[::-1].replace("^", " ").replace("=", " ")
            ds.save_as(tmp_path / Path(source).name)
            files.append(tmp_path / Path(source).name)
    descriptions = [str(deidentify(read_dataset(f), KEY, "2.25", options=OPTIONS).get("StudyDescription", ""))
                    for f in files]
    assert sum(not d.isascii() for d in descriptions) >= 10, descriptions  # re-encoded in the file's character set
    counts = _compare(files, OPTIONS)
    assert counts["compared"] == len(files) >= 15 and counts["refused"] == 0, counts


def test_converted_sop_class_uid_is_re_encoded_like_dcmwrite() -> None:
    # dcmwrite reads SOPClassUID (converting it) to fill the file meta; the converted value is written re-encoded,
    # here with a NUL instead of the file's space padding
    def padded() -> Dataset:
        clean = _clean("CT_small.dcm")
        clean[0x00080016] = RawDataElement(0x00080016, "UI", 26, b"1.2.840.10008.5.1.4.1.1.2 ", 0, False, True)
        return clean

    data = encode_dicom(padded())
    assert data == _dcmwrite(padded())
    assert b"1.2.840.10008.5.1.4.1.1.2\x00" in data and b"1.2.840.10008.5.1.4.1.1.2 " not in data
