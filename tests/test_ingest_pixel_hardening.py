"""Nothing hidden in or behind the pixel data reaches the outputs, and no pixel-data size check can be bypassed.

Issue 21, classes 3 (bytes hidden in or behind the pixel data), 7 (deflate and fragmented codestream headers)
and 9 (clear reasons). Every test ingests files built here with a real ``ingest_folder`` run and scans every
output byte outside ``quarantine/`` for the text planted in the input.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, generate_uid

from medtl.config import IngestConfig
from medtl.ingest import ingest_folder, load_ledger
from medtl.ingest.reader import RejectedFile, decode, decode_failure, validate
from medtl.workspace import Workspace
from tests.hostile_corpus import (_explicit_le_element, _save, codestream, deflate_bomb, encapsulated_dataset,
                                  image_dataset, j2k_header, jpeg_ls_header)

PLANTED = b"PLANTED^DOE^JANE^19600704"


def _ingest(folder: Path, tmp_path: Path, **settings) -> tuple[Workspace, dict[str, str]]:
    """Ingest ``folder``; the workspace and each file's ledger reason ("" when ingested)."""
    ws = Workspace(tmp_path / "work")
    ingest_folder(IngestConfig(input_dir=folder, image_size=32, workers=1, **settings), ws)
    ledger = load_ledger(ws)
    return ws, dict(zip(ledger["path"], ledger["reason"].fillna("")))


def _leaks(ws: Workspace, planted: bytes = PLANTED) -> list[str]:
    """The files outside ``quarantine/`` that hold ``planted``."""
    return [p.relative_to(ws.root).as_posix() for p in sorted(ws.root.rglob("*"))
            if p.is_file() and not p.is_relative_to(ws.quarantine) and planted in p.read_bytes()]


def _written_pixel_data(ws: Workspace) -> bytes:
    (written,) = (ws.ingest / "dicom").glob("*.dcm")
    return pydicom.dcmread(written).PixelData


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "input"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------------------------
# class 3: bytes hidden in or behind the pixel data


def test_element_hidden_behind_native_pixel_data_is_quarantined_and_zero_padding_is_cut(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    ds = image_dataset()
    pixels = ds.PixelData
    del ds.PixelData
    head = _save(ds, folder / "hidden.dcm")
    # the excess (an element) is below one frame: it used to be swallowed into PixelData and written out
    hidden = _explicit_le_element(0x00104000, "LT", PLANTED + b" ")
    (folder / "hidden.dcm").write_bytes(head + _explicit_le_element(0x7FE00010, "OW", pixels + hidden))
    padded = image_dataset()
    padded.PixelData = padded.PixelData + bytes(64)
    _save(padded, folder / "padded.dcm")

    ws, reasons = _ingest(folder, tmp_path)

    assert f"pixel data length {512 + len(hidden)} != expected 512" in reasons["hidden.dcm"]
    assert "not zero padding" in reasons["hidden.dcm"] and "re-export" in reasons["hidden.dcm"]
    assert reasons["padded.dcm"] == ""
    assert _written_pixel_data(ws) == pixels  # exactly the declared frame, the padding cut
    assert not _leaks(ws)


def _with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    """``jpeg`` with marker segments inserted after its SOI."""
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _baseline_jpeg() -> tuple[bytes, np.ndarray]:
    """A real 8-bit grey JPEG baseline codestream (Pillow's, with its JFIF APP0) and its pixels."""
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), pixels


def _j2k_with_comments(text: bytes) -> bytes:
    """A real JPEG 2000 codestream with a COM segment in its main header and one in its first tile-part header."""
    j2k = codestream("MR_small_jp2klossless.dcm")
    siz_end = 4 + struct.unpack(">H", j2k[4:6])[0]
    comment = _segment(0x64, b"\x00\x01" + text)
    j2k = j2k[:siz_end] + comment + j2k[siz_end:]
    sot = j2k.index(b"\xff\x90")
    psot = struct.unpack(">L", j2k[sot + 6:sot + 10])[0]
    return j2k[:sot + 6] + struct.pack(">L", psot + len(comment)) + j2k[sot + 10:sot + 12] + comment + j2k[sot + 12:]


@pytest.mark.parametrize("kind", ["jpeg-ls", "jpeg-baseline", "jpeg-2000"])
def test_comment_and_application_segments_are_stripped_from_the_written_copy(tmp_path: Path, kind: str) -> None:
    folder = _folder(tmp_path)
    if kind == "jpeg-ls":
        original = codestream("MR_small_jpeg_ls_lossless.dcm")
        planted = _with_segments(original, _segment(0xFE, PLANTED), _segment(0xE5, b"APP5\x00" + PLANTED))
        ds = encapsulated_dataset([planted[:40], planted[40:]], JPEGLSLossless)  # split across fragments too
    elif kind == "jpeg-baseline":
        original, _ = _baseline_jpeg()
        planted = _with_segments(original, _segment(0xFE, PLANTED), _segment(0xE1, b"Exif\x00\x00" + PLANTED))
        ds = encapsulated_dataset([planted], JPEGBaseline8Bit)
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
    else:
        original = codestream("MR_small_jp2klossless.dcm")
        planted = _j2k_with_comments(PLANTED)
        ds = encapsulated_dataset([planted], JPEG2000Lossless, like="MR_small_jp2klossless.dcm")
    _save(ds, folder / "commented.dcm")
    reference = encapsulated_dataset([original], ds.file_meta.TransferSyntaxUID)
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(reference, keyword, ds[keyword].value)
    reference.SOPInstanceUID = reference.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    _save(reference, folder / "reference.dcm")

    ws, reasons = _ingest(folder, tmp_path)

    assert reasons == {"commented.dcm": "", "reference.dcm": ""}, reasons
    assert not _leaks(ws)
    written = [pydicom.dcmread(p) for p in sorted((ws.ingest / "dicom").glob("*.dcm"))]
    np.testing.assert_array_equal(written[0].pixel_array, written[1].pixel_array)  # the same image, decodable
    arrays = [np.load(p) for p in sorted((ws.ingest / "arrays").glob("*.npy"))]
    np.testing.assert_array_equal(arrays[0], arrays[1])


def test_fragment_that_belongs_to_no_frame_is_quarantined(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    _save(encapsulated_dataset([codestream("MR_small_jpeg_ls_lossless.dcm"), PLANTED + b" "], JPEGLSLossless),
          folder / "extra.dcm")

    ws, reasons = _ingest(folder, tmp_path)

    assert "bytes follow the end of frame 1's codestream" in reasons["extra.dcm"]
    assert "belong to no frame" in reasons["extra.dcm"]
    assert not _leaks(ws)


# ----------------------------------------------------------------------------------------------
# class 7: size checks that could be bypassed


def test_deflate_bomb_is_refused_while_inflating(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    deflate_bomb(folder / "bomb.dcm", 900)  # 900 MiB from about 930 kB
    assert (folder / "bomb.dcm").stat().st_size < 1_000_000

    # a worker that inflated it all would run out of its 1 GiB and leave the file to retry, not quarantined
    ws, reasons = _ingest(folder, tmp_path, max_decoded_mib=16, worker_memory_mb=1024)

    assert "inflates to more than the 16.8 MB decode budget" in reasons["bomb.dcm"]
    assert "decompression bomb" in reasons["bomb.dcm"]


@pytest.mark.parametrize("header", [jpeg_ls_header, j2k_header], ids=["jpeg-ls", "jpeg-2000"])
def test_codestream_header_split_across_fragments_is_checked(tmp_path: Path, header) -> None:
    folder = _folder(tmp_path)
    split = header(65535, 65535)
    syntax = JPEGLSLossless if header is jpeg_ls_header else JPEG2000Lossless
    for cut in (4, 6, 10):  # after the marker, after the length, inside the size (fragments have even lengths)
        _save(encapsulated_dataset([split[:cut], split[cut:] + bytes(64)], syntax), folder / f"split_{cut}.dcm")

    ws, reasons = _ingest(folder, tmp_path)

    for cut in (4, 6, 10):
        assert ("codestream size mismatch: fragment 0 declares 65535 x 65535 pixels but Rows x Columns is 64 x 64"
                in reasons[f"split_{cut}.dcm"]), reasons


# ----------------------------------------------------------------------------------------------
# class 9: clearer reasons


def _two_frames(basic_offsets: list[int]) -> pydicom.Dataset:
    jpeg_ls = codestream("MR_small_jpeg_ls_lossless.dcm")
    ds = encapsulated_dataset([jpeg_ls, jpeg_ls], JPEGLSLossless, basic_offsets=basic_offsets)
    ds.NumberOfFrames = 2
    return ds


@pytest.mark.parametrize(("offsets", "wrong"), [
    ([0, 1 << 20], "points past the end of the fragments"),
    ([0, 0], "do not start at 0 and increase"),
    ([0, 100], "inside a fragment"),
    ([0], "not 4 per frame"),
], ids=["past-the-end", "not-increasing", "inside-a-fragment", "too-short"])
def test_lying_basic_offset_table_is_named(tmp_path: Path, offsets: list[int], wrong: str) -> None:
    folder = _folder(tmp_path)
    _save(_two_frames(offsets), folder / "lying.dcm")

    _, reasons = _ingest(folder, tmp_path, spatial_dims=3)

    assert "Basic Offset Table" in reasons["lying.dcm"] and wrong in reasons["lying.dcm"], reasons


def test_honest_basic_offset_table_ingests(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    size = len(codestream("MR_small_jpeg_ls_lossless.dcm"))
    _save(_two_frames([0, 8 + size + size % 2]), folder / "honest.dcm")

    _, reasons = _ingest(folder, tmp_path, spatial_dims=3)

    assert reasons == {"honest.dcm": ""}


def test_memory_error_reason_names_the_decoder_and_the_declared_size() -> None:
    ds = encapsulated_dataset([jpeg_ls_header(64, 64)], JPEGLSLossless)
    ds.Rows = ds.Columns = 16384

    reason = decode_failure(ds, MemoryError("Unable to allocate output buffer"))

    assert reason.startswith("MemoryError: the decoder cannot allocate the decoded image")
    assert "Rows 16384 x Columns 16384 x 1 frame(s) x 1 sample(s) x 16 bits = 536.9 MB" in reason
    assert "ingest.worker_memory_mb" in reason
    assert decode_failure(ds, StopIteration()).startswith("StopIteration: the encapsulated fragments ran out")
    assert decode_failure(ds, ValueError()) == "ValueError: no message"


def test_decoder_memory_error_is_a_reason_with_the_transfer_syntax_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate output buffer")

    ds = encapsulated_dataset([codestream("MR_small_jpeg_ls_lossless.dcm")], JPEGLSLossless)
    validate(ds, 2)
    monkeypatch.setattr(Decoder, "as_array", out_of_memory)

    with pytest.raises(RejectedFile) as caught:
        decode(ds)

    assert str(caught.value).startswith("cannot decode pixel data (JPEG-LS Lossless Image Compression): MemoryError")
    assert "Rows 64 x Columns 64 x 1 frame(s) x 1 sample(s) x 16 bits = 8.2 KB declared" in str(caught.value)
