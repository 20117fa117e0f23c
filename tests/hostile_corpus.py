"""A corpus of hostile input files for the ingestion reader (and the folder-level tests).

:func:`write_hostile_corpus` writes small files that each break one assumption a DICOM reader
makes: that a file is DICOM at all, that it is complete, that its transfer syntax describes its
data, that its declared sizes are honest, that its nesting is shallow, that a DICOMDIR only points
inside its own folder, that nothing hides in or behind its pixel data. Every file is at most a few
hundred kilobytes even when it declares (or inflates to) gigabytes.

Some files are written byte by byte because pydicom refuses to write them (an unknown transfer
syntax with encapsulated data, ten thousand nested sequences: its writer recurses and would hit
Python's recursion limit first).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.data import get_testdata_file
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLSLossless, MediaStorageDirectoryStorage, RLELossless, generate_uid)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NESTING_LEVELS = 10_000


def image_dataset(rows: int = 16, columns: int = 16, frames: int = 1,
                  transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A valid little MONOCHROME2 16-bit image (a ramp) with file meta, the template of the corpus.

    Args:
        rows: Rows.
        columns: Columns.
        frames: NumberOfFrames (written only when > 1).
        transfer_syntax: recorded in the file meta; the pixel data is always native little endian.

    Returns:
        The dataset, ready for ``save_as(..., enforce_file_format=True)``.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=["medtl hostile"])
    ds.Modality, ds.PatientID = "OT", "HOSTILE"
    ds.BurnedInAnnotation = "NO"  # so that folder-level ingestion reaches the file-level checks
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.arange(rows * columns * frames, dtype="<u2").tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _save_mislabelled(ds: Dataset, transfer_syntax: str, path: Path) -> None:
    """Write ``ds`` encoded as explicit VR little endian while the file meta claims ``transfer_syntax``."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    write_dataset(fp, ds)
    path.write_bytes(fp.getvalue())


def _explicit_le_element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element (PS3.5 7.1.2)."""
    group, element = tag >> 16, tag & 0xFFFF
    if vr in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR", "OD", "OF", "OL", "OV"):
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def encapsulated_dataset(fragments: list[bytes], transfer_syntax: str, like: str = "MR_small_jpeg_ls_lossless.dcm",
                         basic_offsets: list[int] | None = None) -> Dataset:
    """:func:`image_dataset` holding ``fragments`` as its encapsulated PixelData (one frame).

    Args:
        fragments: the fragments' bytes (each padded to an even length here).
        transfer_syntax: recorded in the file meta.
        like: a pydicom test file whose Image Pixel attributes (size, bit depth, sign) are copied.
        basic_offsets: the Basic Offset Table's entries; ``None`` leaves it empty.

    Returns:
        The dataset, ready for :func:`_save`.
    """
    source = pydicom.dcmread(get_testdata_file(like), stop_before_pixels=True)
    ds = image_dataset(source.Rows, source.Columns, transfer_syntax=transfer_syntax)
    for keyword in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, source[keyword].value)
    table = struct.pack(f"<{len(basic_offsets or [])}L", *(basic_offsets or []))
    items = [table, *(f + b"\x00" * (len(f) % 2) for f in fragments)]
    ds.PixelData = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item for item in items)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def codestream(name: str) -> bytes:
    """The single-fragment codestream of a pydicom test file (e.g. a real JPEG-LS or JPEG 2000 image)."""
    from pydicom.encaps import generate_fragments
    _, fragment = generate_fragments(pydicom.dcmread(get_testdata_file(name)).PixelData)
    return fragment


def jpeg_ls_header(rows: int, columns: int) -> bytes:
    """SOI and a JPEG-LS frame header (SOF55, T.87 C.2.2) declaring ``rows`` x ``columns`` 16-bit pixels."""
    return b"\xff\xd8\xff\xf7" + struct.pack(">HBHHB", 11, 16, rows, columns, 1) + b"\x01\x11\x00"


def j2k_header(rows: int, columns: int) -> bytes:
    """SOC and a JPEG 2000 SIZ segment (T.800 A.5.1) declaring ``rows`` x ``columns`` 16-bit pixels, one component."""
    return (b"\xff\x4f" + struct.pack(">HHHIIIIIIIIH", 0xFF51, 41, 0, columns, rows, 0, 0, columns, rows, 0, 0, 1)
            + b"\x0f\x01\x01")


def deflate_bomb(path: Path, inflated_mib: int) -> None:
    """A deflated (PS3.5 A.5) image whose dataset inflates to ``inflated_mib`` MiB of a private OB element's zeros.

    Written in a few milliseconds: after a full flush, deflate codes every MiB of zeros the same way, so the
    compressed MiB is repeated instead of compressing the whole value.
    """
    ds = image_dataset(transfer_syntax=DeflatedExplicitVRLittleEndian)
    pixels = ds.PixelData
    del ds.PixelData
    meta, body = DicomBytesIO(), DicomBytesIO()
    for fp in (meta, body):
        fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    write_dataset(body, ds)
    hidden = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, inflated_mib << 20)  # a private OB of zeros
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflater.compress(body.getvalue() + hidden) + deflater.flush(zlib.Z_FULL_FLUSH)
    mib = deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)
    tail = deflater.compress(_explicit_le_element(0x7FE00010, "OW", pixels)) + deflater.flush()
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + head + mib * inflated_mib + tail)


def _deep_sequence(levels: int) -> bytes:
    """``levels`` sequences nested in each other, all of undefined length (PS3.5 7.5.2).

    Undefined lengths force a parser to descend at read time: there is no length to skip by.
    """
    open_one = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)  # ContentSequence
    open_one += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)  # item
    close_one = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return open_one * levels + close_one * levels


def _deep_sequence_defined_length(levels: int) -> bytes:
    """The same nesting with every length defined, which lets a parser descend lazily, one level per access.

    Sequence k (counting from the innermost, 0) is 20 * (k + 1) bytes: a 12-byte header and an
    8-byte item header around sequence k - 1.
    """
    headers = []
    for k in range(levels - 1, -1, -1):
        headers.append(struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 8 + 20 * k))
        headers.append(struct.pack("<HHL", 0xFFFE, 0xE000, 20 * k))
    return b"".join(headers)


def _with_elements_before_pixels(ds: Dataset, extra: bytes, path: Path) -> None:
    """Write ``ds`` with raw element bytes spliced in before (7FE0,0010), keeping tag order."""
    pixels = ds.PixelData
    del ds.PixelData
    head = io.BytesIO()
    ds.save_as(head, enforce_file_format=True)
    path.write_bytes(head.getvalue() + extra + _explicit_le_element(0x7FE00010, "OW", pixels))


def write_hostile_corpus(folder: Path) -> dict[str, str]:
    """Write the hostile files into ``folder``.

    Args:
        folder: an existing, preferably empty, folder.

    Returns:
        File name -> a keyword the quarantine reason must contain (case-sensitive).
    """
    expected: dict[str, str] = {}

    def add(name: str, keyword: str) -> Path:
        expected[name] = keyword
        return folder / name

    good = _save(image_dataset(64, 64), add("truncated.dcm", "truncated"))
    (folder / "truncated.dcm").write_bytes(good[: len(good) - 3000])  # cut inside the pixel data
    header_end = good.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag in little endian
    add("truncated_in_header.dcm", "truncated").write_bytes(good[: header_end - 5])  # cut inside an element
    add("empty.dcm", "empty file").write_bytes(b"")
    add("notes.txt", "not a DICOM file").write_text("Patient doing well. Follow-up in 6 weeks.\n" * 20)
    png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 4096, 4096, 16, 0, 0, 0, 0)
           + b"\x00" * 64)
    add("scan.dcm", "not a DICOM file").write_bytes(png)  # a PNG with a DICOM name

    # the file meta says one transfer syntax, the data is in another
    _save_mislabelled(image_dataset(), JPEGBaseline8Bit, add("ts_says_jpeg_data_native.dcm", "Transfer Syntax"))
    encapsulated = image_dataset()
    encapsulated.PixelData = encapsulate([b"\xff\xd8\xff\xc0" + bytes(200)])
    encapsulated["PixelData"].is_undefined_length = True
    encapsulated["PixelData"].VR = "OB"
    _save(encapsulated, add("ts_says_native_data_encapsulated.dcm", "Transfer Syntax"))
    _save_mislabelled(image_dataset(), "1.2.826.0.1.3680043.9.9999.1", add("ts_unknown_uid.dcm", "Transfer Syntax"))

    no_pixels = image_dataset()
    del no_pixels.PixelData
    _save(no_pixels, add("no_pixel_data.dcm", "no PixelData"))
    short = image_dataset()
    short.PixelData = short.PixelData[:100]
    _save(short, add("pixel_length_short.dcm", "pixel data length"))
    long = image_dataset()
    long.PixelData = long.PixelData * 3
    _save(long, add("pixel_length_long.dcm", "pixel data length"))

    # decompression bombs: terabytes declared, a few bytes stored
    bomb = image_dataset()
    bomb.Rows = bomb.Columns = 65535
    bomb.NumberOfFrames = 10_000
    _save(bomb, add("bomb_native.dcm", "decoded size"))
    bomb_rle = image_dataset(transfer_syntax=RLELossless)
    bomb_rle.Rows = bomb_rle.Columns = 16384
    bomb_rle.NumberOfFrames = 10_000
    bomb_rle.PixelData = encapsulate([struct.pack("<16L", 1, 64, *([0] * 14)) + b"\x81\x00" * 8])
    bomb_rle["PixelData"].VR = "OB"
    bomb_rle["PixelData"].is_undefined_length = True
    _save(bomb_rle, add("bomb_rle.dcm", "decoded size"))
    # an honest-looking header over a JPEG 2000 codestream that declares 60000 x 60000 pixels
    siz = struct.pack(">HHHIIIIIIIIH", 0xFF51, 41, 0, 60000, 60000, 0, 0, 60000, 60000, 0, 0, 1) + b"\x0f\x01\x01"
    bomb_j2k = image_dataset(transfer_syntax=JPEG2000Lossless)
    bomb_j2k.PixelData = encapsulate([b"\xff\x4f" + siz + bytes(64)])
    bomb_j2k["PixelData"].VR = "OB"
    bomb_j2k["PixelData"].is_undefined_length = True
    _save(bomb_j2k, add("bomb_j2k_codestream.dcm", "codestream"))

    _with_elements_before_pixels(image_dataset(), _deep_sequence(NESTING_LEVELS), add("deep_sequence.dcm", "nest"))
    _with_elements_before_pixels(image_dataset(), _deep_sequence_defined_length(NESTING_LEVELS),
                                 add("deep_sequence_defined_length.dcm", "nest"))
    # a private element that declares 4 GB in a 1 kB file: a parser that trusts it allocates 4 GB
    lie = struct.pack("<HH2sHL", 0x0011, 0x1010, b"UN", 0, 0xFFFFFFF0) + bytes(64)
    _with_elements_before_pixels(image_dataset(), lie, add("element_length_lie.dcm", "truncated"))

    # bytes hidden in or behind the pixel data: an element swallowed by an over-long PixelData, a fragment
    # that belongs to no frame
    behind = image_dataset()
    pixels = behind.PixelData
    del behind.PixelData
    hidden = _explicit_le_element(0x00100010, "PN", b"HIDDEN^BEHIND^PIXELS")
    add("pixel_data_hides_element.dcm", "pixel data length").write_bytes(
        _save(behind, folder / "pixel_data_hides_element.dcm") + _explicit_le_element(0x7FE00010, "OW", pixels + hidden))
    jpeg_ls = codestream("MR_small_jpeg_ls_lossless.dcm")
    _save(encapsulated_dataset([jpeg_ls, b"EXTRA FRAGMENT Doe^Jane 4 July 1960"], JPEGLSLossless),
          add("extra_text_fragment.dcm", "belong to no frame"))
    # size checks that a split or compressed header would bypass
    deflate_bomb(add("deflate_bomb.dcm", "inflates"), 900)  # 900 MiB from 930 kB: over the default budget
    split = jpeg_ls_header(65535, 65535)
    _save(encapsulated_dataset([split[:8], split[8:] + bytes(64)], JPEGLSLossless),
          add("jpeg_ls_header_split.dcm", "codestream size mismatch"))
    split = j2k_header(65535, 65535)
    _save(encapsulated_dataset([split[:10], split[10:] + bytes(64)], JPEG2000Lossless),
          add("j2k_header_split.dcm", "codestream size mismatch"))
    _save(encapsulated_dataset([jpeg_ls], JPEGLSLossless, basic_offsets=[4096]),
          add("lying_basic_offset_table.dcm", "Basic Offset Table"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns that ".." is not a valid CS value
        _write_escaping_dicomdir(add("DICOMDIR", "DICOMDIR"))
    return expected


def _write_escaping_dicomdir(path: Path) -> None:
    """A DICOMDIR whose image records point outside its folder (``../../etc/passwd``).

    pydicom's FileSet refuses to write such IDs, so the directory is written as a plain dataset.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medtl hostile dicomdir"])
    ds.FileSetID = "HOSTILE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for file_id in (["..", "..", "etc", "passwd"], ["IMAGES", "..", "..", "..", "SECRET"], ["/abs", "path"]):
        record = Dataset()
        record.OffsetOfTheNextDirectoryRecord = 0
        record.RecordInUseFlag = 0xFFFF
        record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = file_id
        record.ReferencedSOPClassUIDInFile = SECONDARY_CAPTURE
        record.ReferencedSOPInstanceUIDInFile = generate_uid(entropy_srcs=file_id)
        record.ReferencedTransferSyntaxUIDInFile = ExplicitVRLittleEndian
        records.append(record)
    ds.DirectoryRecordSequence = Sequence(records)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
