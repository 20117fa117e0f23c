"""fastparse.parse returns exactly what pydicom.dcmread returns, or None (and then dcmread is used).

Every pydicom-data file and every dcm_qa_nih file is parsed both ways and compared object by object
(file meta, encodings, keys in order, raw vs converted elements, VR, length, value, value position,
sequences and their items), then de-identified and encoded to the same bytes, and read and decoded by
ingestion to the same arrays (or the same quarantine reason).
"""

from __future__ import annotations

import io
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtl.ingest import fastparse
from medtl.ingest.deid import deidentify
from medtl.ingest.reader import RejectedFile, decode, read_dataset
from medtl.ingest.writer import encode_dicom

SHARED = Path(__file__).resolve().parents[2] / "shared"
QA_IN = SHARED / "data" / "dicom" / "dcm_qa_nih" / "In"
DATA_STORE = Path(pydicom.__file__).resolve().parents[1] / "data_store" / "data"
PYDICOM_FILES = sorted({Path(f).resolve() for f in get_testdata_files()} | {p.resolve() for p in DATA_STORE.glob("*")})
PYDICOM_FILES = [p for p in PYDICOM_FILES if p.is_file()]
KEY = b"k" * 32
# why a file may be left to dcmread: each is a rule of fastparse, not an accident
EXPECTED_FALLBACKS = re.compile(r"no DICM prefix|transfer syntax 1\.2\.840\.10008\.1\.2\.(2|1\.99)$|"
                                r"odd or overrunning length|no Transfer Syntax UID|"
                                r"dataset not in the declared VR encoding|EOFError: End of file")


def outcome(get):
    """The value, or what was raised (type and message), so that two code paths can be compared."""
    try:
        return get()
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def fallback_reason(data: bytes) -> str:
    try:
        fastparse._parse(data, None, None, None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if not isinstance(exc, fastparse._Unsupported) else str(exc)
    return "parsed"


_NOT_COMPARED = {"_dict", "buffer", "file_meta"}  # compared below, each in its own way


def assert_same_dataset(fast: Dataset, ref: Dataset, where: str) -> None:
    """Same class, same attributes (encodings, item flags and positions), same elements in the same order."""
    assert type(fast) is type(ref), where
    assert set(vars(fast)) == set(vars(ref)), where
    for name, value in vars(ref).items():
        if name not in _NOT_COMPARED:
            assert vars(fast)[name] == value, (where, name)
    assert list(fast.keys()) == list(ref.keys()), where
    for tag in ref.keys():
        a, b, at = fast.get_item(tag, keep_deferred=True), ref.get_item(tag, keep_deferred=True), f"{where} {tag}"
        assert type(a) is type(b), at
        if isinstance(a, RawDataElement):
            assert a == b, at  # tag, VR, length, value (None when deferred), value_tell, VR and byte order
            continue
        fields = ("tag", "VR", "file_tell", "is_undefined_length")
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields], at
        if a.VR != "SQ":
            assert a.value == b.value, at
            continue
        assert type(a.value) is type(b.value) and a.value.is_undefined_length == b.value.is_undefined_length, at
        assert len(a.value) == len(b.value), at
        for index, (x, y) in enumerate(zip(a.value, b.value)):
            assert_same_dataset(x, y, f"{at}[{index}]")


def assert_same_file(fast, ref, data: bytes, where: str) -> None:
    assert_same_dataset(fast, ref, where)
    assert_same_dataset(fast.file_meta, ref.file_meta, f"{where} file meta")
    assert fast.original_encoding == ref.original_encoding and fast.original_character_set == ref.original_character_set
    assert type(fast.buffer) is type(ref.buffer) and fast.buffer.getvalue() == data, where


DECODE_MAX_BYTES = 2 * 1024**2  # larger (multi-frame, compressed) files take seconds to decode twice; their
# datasets are compared element by element all the same, and decoding depends on nothing else


def same_ingestion(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_dataset + decode, and de-identify + encode, agree with and without the fast path."""
    def ingest():
        ds = outcome(lambda: read_dataset(path))
        if isinstance(ds, tuple):
            return ds, ds
        pixels = outcome(lambda: decode(ds)) if path.stat().st_size <= DECODE_MAX_BYTES else "not decoded"
        return pixels, outcome(lambda: encode_dicom(deidentify(ds, KEY, "2.25")))

    fast = ingest()
    with monkeypatch.context() as patch:
        patch.setattr(fastparse, "parse", lambda *args, **kwargs: None)
        ref = ingest()
    (fast_pixels, fast_bytes), (ref_pixels, ref_bytes) = fast, ref
    assert fast_bytes == ref_bytes, path.name
    if isinstance(ref_pixels, np.ndarray):
        assert isinstance(fast_pixels, np.ndarray) and fast_pixels.dtype == ref_pixels.dtype, path.name
        np.testing.assert_array_equal(fast_pixels, ref_pixels)
    else:
        assert fast_pixels == ref_pixels, path.name


def check_files(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> tuple[list[Path], Counter]:
    """Compare every file both ways; the files read by the fast path, and why the others were not."""
    fast_files, fallbacks = [], Counter()
    for path in paths:
        data = path.read_bytes()
        fast = fastparse.parse(data)
        if fast is None:
            fallbacks[fallback_reason(data)] += 1
            continue
        ref = outcome(lambda: pydicom.dcmread(io.BytesIO(data)))
        assert not isinstance(ref, tuple), f"{path.name}: fastparse reads a file dcmread refuses: {ref}"
        assert_same_file(fast, ref, data, path.name)
        # the same bytes once de-identified, from datasets parsed both ways (conversions happen here)
        fast_out = outcome(lambda: encode_dicom(deidentify(fast, KEY, "2.25")))
        ref_out = outcome(lambda: encode_dicom(deidentify(ref, KEY, "2.25")))
        assert fast_out == ref_out, path.name
        same_ingestion(path, monkeypatch)
        fast_files.append(path)
    return fast_files, fallbacks


@pytest.mark.filterwarnings("ignore")
def test_parse_equals_dcmread_on_every_pydicom_data_file(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(PYDICOM_FILES) > 200
    fast_files, fallbacks = check_files(PYDICOM_FILES, monkeypatch)
    unexpected = [reason for reason in fallbacks if not EXPECTED_FALLBACKS.search(reason)]
    assert not unexpected, f"files left to dcmread for no rule of fastparse: {unexpected}"
    share = len(fast_files) / len(PYDICOM_FILES)
    print(f"pydicom-data: {len(fast_files)}/{len(PYDICOM_FILES)} ({share:.1%}) by the fast path; "
          f"left to dcmread: {dict(fallbacks)}")
    assert share > 0.8, dict(fallbacks)  # the rest: mostly big endian and preamble-less test files
    # not vacuous: both VR encodings, encapsulated pixel data and undefined-length sequences were compared
    syntaxes = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in fast_files}
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian} <= syntaxes
    assert any(uid.is_encapsulated for uid in syntaxes)


@pytest.mark.skipif(not QA_IN.is_dir(), reason=f"{QA_IN} is absent (the shared dcm_qa_nih data set)")
@pytest.mark.filterwarnings("ignore")
def test_parse_equals_dcmread_on_every_dcm_qa_nih_file(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p for p in QA_IN.rglob("*") if p.is_file())
    dicom = [p for p in files if not p.name.startswith("README")]
    assert len(dicom) == 608
    fast_files, fallbacks = check_files(files, monkeypatch)
    # every GE and Siemens file is in a common encoding; only the READMEs are not DICOM
    assert fast_files == dicom, dict(fallbacks)
    assert fallbacks == {"no DICM prefix": len(files) - len(dicom)}


@pytest.mark.filterwarnings("ignore")
def test_specific_tags_and_defer_size_equal_dcmread() -> None:
    wanted = frozenset(int(Tag(k)) for k in ("PatientName", "Rows", "PixelData", "ReferencedImageSequence",
                                              "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"))
    compared = 0
    for path in PYDICOM_FILES:
        data = path.read_bytes()
        fast = fastparse.parse(data, specific_tags=wanted, defer_size=256)
        if fast is None:
            continue
        ref = pydicom.dcmread(io.BytesIO(data), defer_size=256, specific_tags=sorted(wanted))
        assert_same_file(fast, ref, data, path.name)
        for tag in ref.keys():  # deferred values are read from the in-memory buffer
            assert outcome(lambda: fast[tag].value) == outcome(lambda: ref[tag].value), (path.name, tag)
        compared += 1
    assert compared > 200


def small_image(syntax=ExplicitVRLittleEndian, **elements) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientName = ""  # empty values are built as dcmread builds them
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = bytes(range(64))
    return ds


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def item(**elements) -> Dataset:
    out = Dataset()
    out.is_undefined_length_sequence_item = True
    for keyword, value in elements.items():
        setattr(out, keyword, value)
    return out


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.filterwarnings("ignore")
def test_undefined_length_sequences_and_character_sets(syntax) -> None:
    # a multi-byte character set declared at the top and used inside nested undefined-length items: the
    # items must inherit it as dcmread's generator passes it to read_sequence
    ds = small_image(syntax, SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎")
    inner = item(PatientName="山田^花子", ReferencedSOPInstanceUID="1.2.3")
    ds.ReferencedPatientSequence = Sequence([item(PatientName="=山田", ReferencedImageSequence=Sequence([inner]))])
    ds["ReferencedPatientSequence"].is_undefined_length = True
    ds.ReferencedPatientSequence[0]["ReferencedImageSequence"].is_undefined_length = True
    ds.ReferencedSeriesSequence = Sequence()  # empty, undefined length
    ds["ReferencedSeriesSequence"].is_undefined_length = True
    block = ds.private_block(0x0019, "MEDTL TEST", create=True)  # private: implicit VR knows it by its items
    block.add_new(0x10, "SQ", Sequence([item(ReferencedSOPInstanceUID="1.2.4")]))
    ds[0x00191010].is_undefined_length = True
    data = encoded(ds)
    assert data.count(b"\xfe\xff\xdd\xe0") == 4  # sequence delimiters: undefined lengths were written
    fast, ref = fastparse.parse(data), pydicom.dcmread(io.BytesIO(data))
    assert fast is not None
    assert_same_file(fast, ref, data, "synthetic")
    assert fast.ReferencedPatientSequence[0].ReferencedImageSequence[0].PatientName == "山田^花子"
    assert fast[0x00191010].VR == "SQ" and fast[0x00191010].value[0].ReferencedSOPInstanceUID == "1.2.4"


@pytest.mark.filterwarnings("ignore")
def test_un_of_undefined_length_is_read_as_a_sequence() -> None:
    # PS3.5 6.2.2: UN of undefined length in an explicit VR file holds implicit VR items
    ds = small_image(SeriesDescription="after the UN")
    ds.private_block(0x0019, "MEDTL TEST", create=True).add_new(0x10, "LO", "X")
    data = encoded(ds)
    placeholder = b"\x19\x00\x10\x10LO\x02\x00X "
    implicit_item = struct.pack("<HHL", 0x0008, 0x1155, 4) + b"1.2\0"
    un = (b"\x19\x00\x10\x10UN\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + implicit_item
          + b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0")
    assert data.count(placeholder) == 1
    data = data.replace(placeholder, un)
    fast, ref = fastparse.parse(data), pydicom.dcmread(io.BytesIO(data))
    assert fast is not None
    assert_same_file(fast, ref, data, "UN")
    assert fast.get_item(0x00191010).VR == "SQ" and fast[0x00191010].value[0].ReferencedSOPInstanceUID == "1.2"
    assert fast.SeriesDescription == "after the UN"


def test_filename_and_deferred_values_follow_the_path(tmp_path: Path) -> None:
    path = tmp_path / "f.dcm"
    path.write_bytes(encoded(small_image()))
    data = path.read_bytes()
    in_memory = fastparse.parse(data, defer_size=16)
    assert in_memory.filename is None and in_memory.buffer.getvalue() == data  # as dcmread(BytesIO(data))
    assert in_memory.get_item("PixelData", keep_deferred=True).value is None
    on_disk = fastparse.parse(data, defer_size=16, path=str(path))
    ref = pydicom.dcmread(path, defer_size=16)
    assert on_disk.filename == ref.filename == str(path) and on_disk.buffer is None
    assert on_disk.timestamp == ref.timestamp
    assert on_disk.PixelData == in_memory.PixelData == bytes(range(64))  # read from the file, from the buffer


def with_bytes(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.filterwarnings("ignore")
def test_what_is_left_to_dcmread() -> None:
    good = encoded(small_image(SeriesDescription="ABCD"))
    implicit = encoded(small_image(ImplicitVRLittleEndian, SeriesDescription="ABCD"))
    assert fastparse.parse(good) is not None and fastparse.parse(implicit) is not None
    big_endian = Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes()
    deflated = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    description = b"\x08\x00\x3e\x10LO\x04\x00ABCD"
    cases = {
        "no DICM prefix": good[128:],
        "transfer syntax 1.2.840.10008.1.2.2": big_endian,
        "transfer syntax 1.2.840.10008.1.2.1.99": deflated,
        "odd or overrunning length": with_bytes(good, description, b"\x08\x00\x3e\x10LO\x03\x00ABCD"),
        "unknown VR, or a switch to implicit VR": with_bytes(good, description, b"\x08\x00\x3e\x10lo\x04\x00ABCD"),
        "item or delimiter outside a sequence": with_bytes(implicit, b"\x08\x00\x3e\x10\x04\x00\x00\x00ABCD",
                                                           b"\xfe\xff\x00\xe0\x04\x00\x00\x00ABCD"),
        "error: unpack_from requires a buffer": good + b"\x10\x00",  # a header cut by the end of the file (struct)
        "overrun": good[:-10],
    }
    for name, data in cases.items():
        assert fastparse.parse(data) is None, name
        reason = fallback_reason(data)
        assert name in reason or name == "overrun" and reason == "odd or overrunning length", (name, reason)


def test_arguments_are_checked() -> None:
    data = encoded(small_image())
    with pytest.raises(TypeError, match="must be bytes"):
        fastparse.parse(bytearray(data))
    with pytest.raises(TypeError, match="frozenset of int tags"):
        fastparse.parse(data, specific_tags=["PatientName"])
    with pytest.raises(TypeError, match="defer_size must be an int"):
        fastparse.parse(data, defer_size="1 KB")
    with pytest.raises(ValueError, match="defer_size must be >= 0"):
        fastparse.parse(data, defer_size=-1)
    with pytest.raises(TypeError, match="path must be a str"):
        fastparse.parse(data, path=Path("x.dcm"))


def test_reader_rejects_as_before_when_dcmread_takes_over(tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(encoded(small_image(SeriesDescription="ABCD"))[:-70])  # 6 of the 12 bytes of PixelData's header
    assert fastparse.parse(path.read_bytes()) is None
    with pytest.raises(RejectedFile, match="truncated"):
        read_dataset(path)
