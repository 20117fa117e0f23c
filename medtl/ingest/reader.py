"""Read, validate and decode one DICOM file into a model-ready float array.

Every failure is raised as :class:`RejectedFile`, whose message is the precise quarantine reason
recorded in the ledger, so a person can tell from the ledger alone what is wrong with a file.

The array convention is the manifest's: ``float32``, shape ``(1, S, S)`` (or ``(1, S, S, S)`` for a
multi-frame volume), values in [0, 1], bright = dense.

The reader assumes nothing a file declares until it has checked it: the file is read from memory so
that a lying element length cannot make the parser allocate more than the file holds, sequence
nesting is bounded, and the decoded size that Rows, Columns, NumberOfFrames and SamplesPerPixel
imply, and the size every compressed frame's own codestream declares, are checked against a budget
before any pixel is decoded (a decompression bomb is a few bytes that declare terabytes); a deflated
dataset is inflated only up to that budget. Pixel data keeps only the declared frames: what could hide
behind or inside them (elements swallowed by an over-long PixelData, extra fragments, JPEG comment and
application segments) is removed or refused, since the de-identified copy is written from it.

References: DICOM PS3.3 C.7.6.3 (Image Pixel module), C.11.1 (Modality LUT), C.11.2 (VOI LUT),
PS3.5 8 (pixel data encoding), A.4 (encapsulation), A.5 (deflate); ITU-T T.81, T.87 and T.800 (JPEG,
JPEG-LS and JPEG 2000 codestreams); ITU-R BT.601 (luma weights).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.tag import Tag
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, MediaStorageDirectoryStorage, RLETransferSyntaxes)

from medtl.ingest import fastparse

MIN_SIDE, MAX_SIDE = 8, 16384
WINDOW_PERCENTILES = (0.5, 99.5)
# Budget on the decoded pixels: stored samples plus the float64 grey copy (ingest.max_decoded_mib).
# Decoding and preprocessing one image peak at about 2.6 times this (measured: docs/decoding.md), so the default
# fits the default 3 GB worker address space; it admits a 512 x 512 x 384 CT volume or a 9000 x 11000
# radiograph, and larger studies (breast tomosynthesis) need a larger budget and worker limit.
MAX_DECODED_BYTES = 768 * 1024**2
# Real images nest a handful of levels (enhanced multi-frame functional groups: 3); deeper
# nesting only serves to exhaust a recursive parser.
MAX_SEQUENCE_DEPTH = 32
# ITU-R BT.601 luma, which is also the Y of DICOM's YBR_FULL (PS3.3 C.7.6.3.1.2)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_IMAGE_PIXEL_TYPE1 = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                      "PhotometricInterpretation")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOF0-15 and JPEG-LS SOF55


_PERCENTILE_SAMPLES = 1 << 18
_INFLATE_CHUNK = 16 * 1024**2


class RejectedFile(Exception):
    """A file that cannot be ingested; ``str(exc)`` is the quarantine reason."""


# ----------------------------------------------------------------------------------------------
# reading


def read_dataset(path: Path, *, max_bytes: int = MAX_DECODED_BYTES) -> Dataset:
    """Parse a DICOM file, also accepting datasets written without the Part 10 preamble or file meta.

    The file is read into memory first (at most ``max_bytes``) and parsed from there, so that an
    element declaring a length of gigabytes makes the parser read what the file holds, not
    allocate what it declares. Every element whose value the file cuts short is reported, and
    sequence nesting is checked to :data:`MAX_SEQUENCE_DEPTH` levels.

    Args:
        path: the file.
        max_bytes: files larger than this are refused unread.

    Returns:
        The parsed dataset (pixel data included) with a Transfer Syntax UID in its file meta.

    Raises:
        RejectedFile: when the file is empty, too large, not DICOM, truncated or cannot be parsed.
    """
    size = path.stat().st_size
    if size == 0:
        raise RejectedFile("empty file (0 bytes)")
    if size > max_bytes:
        raise RejectedFile(f"file is {_human(size)}, larger than the {_human(max_bytes)} decode budget "
                           "(ingest.max_decoded_mib); raise the budget if such files are expected")
    data = path.read_bytes()
    # pydicom warns once per odd value; the reasons below say what matters, the rest is log noise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = fastparse.parse(data)  # the same dataset as dcmread's, faster, for the files it reads
        if ds is None:  # deflated, big endian, without file meta, or damaged: pydicom reads it
            data, file_meta = _inflate(data, max_bytes)
            ds = _parse(data)
            if file_meta is not None:
                ds.file_meta = file_meta  # the file's own: deflated, as written
        _check_complete(ds, data, [str(w.message) for w in caught])
        try:
            _check_nesting(ds, depth=0)
        except RecursionError as exc:  # a recursion limit lowered by the caller; never expected
            raise RejectedFile(f"sequences nested too deeply to parse: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # without file meta the encoding the parser detected is the transfer syntax
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _inflate(data: bytes, max_bytes: int) -> tuple[bytes, FileMetaDataset | None]:
    """A deflated file (PS3.5 A.5) as the explicit VR little endian file it inflates to, within ``max_bytes``.

    pydicom inflates the whole dataset at once, whatever its size, so a few megabytes that inflate to
    gigabytes would exhaust the worker: here the dataset is inflated to at most ``max_bytes`` and refused
    beyond, before anything is parsed.

    Args:
        data: the file's bytes.
        max_bytes: the decode budget on the inflated dataset.

    Returns:
        ``(data, None)`` for a file that is not deflated; else the inflated file and its original file meta.

    Raises:
        RejectedFile: when the dataset inflates beyond ``max_bytes`` or is not a valid deflate stream.
    """
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, True)
        file_meta = _read_file_meta_info(stream)  # where and as dcmread reads it
    except Exception:  # the parser meets the same problem and words it
        return data, None
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return data, None
    start = stream.tell()
    # first only measured, an inflated chunk at a time, so that a bomb is refused having held one chunk
    inflater, pending, size = zlib.decompressobj(-zlib.MAX_WBITS), memoryview(data)[start:], 0
    try:
        while pending and size <= max_bytes:
            size += len(inflater.decompress(pending, _INFLATE_CHUNK))
            pending = inflater.unconsumed_tail
        if size <= max_bytes:
            size += len(inflater.flush())  # the input is consumed: what is left is at most a window
        if size <= max_bytes:
            dataset = zlib.decompress(memoryview(data)[start:], -zlib.MAX_WBITS, max(size, 1))
    except zlib.error as exc:
        raise RejectedFile(f"the deflated dataset (Transfer Syntax {DeflatedExplicitVRLittleEndian.name}) cannot "
                           f"be inflated: zlib: {exc}") from exc
    if size > max_bytes:
        raise RejectedFile(f"the deflated dataset ({_human(len(data) - start)}, Transfer Syntax "
                           f"{DeflatedExplicitVRLittleEndian.name}) inflates to more than the {_human(max_bytes)} "
                           "decode budget (ingest.max_decoded_mib): a decompression bomb; raise the budget only if "
                           "such files are expected")
    inflated_meta = copy.deepcopy(file_meta)
    inflated_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, inflated_meta, enforce_standard=False)
    preamble = data[:128] if data[128:132] == b"DICM" else bytes(128)
    return b"".join((preamble, b"DICM", meta.getvalue(), dataset)), file_meta


def _parse(data: bytes) -> Dataset:
    """``dcmread(BytesIO(data))``, with its errors as quarantine reasons."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        # Old exports omit the 128-byte preamble and file meta; keep them only if they hold an image.
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception:  # forced parsing of a non-DICOM file fails in arbitrary ways
            ds = None
        if ds is None or not ("SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)):
            message = str(exc).split(" Use force=True")[0]
            raise RejectedFile("not a DICOM file (no DICM preamble and no valid dataset): "
                               f"InvalidDicomError: {message}{_looks_like(data)}") from exc
        return ds
    except RecursionError as exc:
        raise RejectedFile("sequences nested too deeply to parse (undefined-length sequences nested beyond "
                           "Python's recursion limit); no real image nests more than a few levels") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "unreadable"
        raise RejectedFile(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc


_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"%PDF": "a PDF document",
          b"PK\x03\x04": "a ZIP archive", b"\x1f\x8b": "a gzip archive", b"II*\x00": "a TIFF image",
          b"MM\x00*": "a TIFF image", b"\x5c\x01\x00\x00": "a NIfTI-1 header", b"{": "JSON or text"}


def _looks_like(data: bytes) -> str:
    """What a non-DICOM file seems to be, for the quarantine reason (`` (looks like ...)`` or empty)."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return f" (looks like {kind})"
    head = data[:512]
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return " (looks like text)"
    return ""


def _check_complete(ds: Dataset, data: bytes, parser_warnings: list[str]) -> None:
    """Turn the parser's silent stops at the end of a cut file into a truncation reason.

    pydicom stops without a word when the file ends inside an element header, and keeps a short
    value when it ends inside an element's value; both are visible only by comparing the parsed
    elements with the bytes.
    """
    for message in parser_warnings:
        if "End of file" in message:
            raise RejectedFile(f"truncated: {message.split(' in file ')[0]}")
    if len(ds) == 0:
        raise RejectedFile("no data elements: the dataset after the file meta is empty")
    # The parser reads elements in file order and stops at the end of the file, so only the last one read can be
    # cut short (a cut inside a sequence leaves that whole top-level sequence short).
    last = ds.get_item(next(reversed(ds.keys())))
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return
    if isinstance(last.value, bytes) and len(last.value) < last.length:
        if last.tag == 0x7FE00010:
            return  # validate() states the pixel shortfall in pixels
        raise RejectedFile(f"truncated: the file ends inside {_name(last.tag)}, which declares "
                           f"{last.length} bytes ({len(last.value)} present)")
    rest = data[last.value_tell + last.length:]
    if 0 < len(rest) < 12 and any(rest):  # zero bytes are padding; a cut header has a tag
        raise RejectedFile(f"truncated: the file ends inside the header of the element after "
                           f"{_name(last.tag)} ({len(rest)} bytes of it present)")


def _check_nesting(ds: Dataset, depth: int) -> None:
    """Bound sequence depth, converting only sequences.

    Other elements stay raw: de-identification copies the bytes of the elements it keeps, which is several
    times faster than converting and re-encoding them, and any element it does convert names itself in the
    reason if its value is corrupt.
    """
    for tag, raw in list(ds.items()):
        if type(raw) is RawDataElement and raw.VR not in (None, "UN", "SQ") and raw.length != 0xFFFFFFFF:
            continue  # the common case, decided without a dictionary look-up
        if not _is_sequence(raw):
            continue
        try:
            elem = ds[tag]
        except Exception as exc:  # value conversion of a corrupt sequence
            raise RejectedFile(f"cannot parse {_name(tag)}: {type(exc).__name__}: {exc}") from exc
        if elem.VR != "SQ":
            continue
        if depth >= MAX_SEQUENCE_DEPTH:
            raise RejectedFile(f"sequences nested more than {MAX_SEQUENCE_DEPTH} levels deep (at {_name(tag)}); "
                               "no real image nests more than a few levels")
        for item in elem.value:
            _check_nesting(item, depth + 1)


def _is_sequence(raw: object) -> bool:
    if isinstance(raw, RawDataElement) and raw.length == 0xFFFFFFFF and raw.tag != 0x7FE00010:
        return True  # undefined length: a sequence, whatever the VR says
    return effective_vr(raw) == "SQ"


def effective_vr(elem: object) -> str:
    """An element's VR, from the data dictionary when the file does not say (implicit VR) or says ``UN``.

    Args:
        elem: a ``DataElement`` or ``RawDataElement``.

    Returns:
        The VR; ``"UN"`` for a tag the dictionary does not know (private tags in implicit VR files).
    """
    vr = getattr(elem, "VR", None)
    if vr not in (None, "UN"):
        return vr
    try:
        return dictionary_VR(elem.tag)
    except KeyError:
        return "UN"


# ----------------------------------------------------------------------------------------------
# validation: everything about the header, before any pixel is decoded


def validate(ds: Dataset, spatial_dims: int, *, max_decoded_bytes: int = MAX_DECODED_BYTES) -> None:
    """Check that ``ds`` holds one decodable image of the expected dimensionality, within budget.

    Grey-scale (MONOCHROME1/2), palette and colour (RGB, YBR_*) images are accepted; colour ones
    are reduced to their luminance by :func:`decode`. Nothing here allocates according to a size
    the file declares: the decoded size is computed from the header and compared with
    ``max_decoded_bytes`` first, and each compressed frame's codestream header is compared with
    Rows and Columns, because decoders allocate what the codestream says.

    PixelData is cut in ``ds`` to what the image needs, so that the de-identified copy made from ``ds``
    carries nothing else: zero padding after native frames is dropped and compressed frames lose their
    comment and application segments; other bytes after the frames, in native or encapsulated data, are
    refused.

    Args:
        ds: dataset from :func:`read_dataset`.
        spatial_dims: 2 for single-frame images, 3 for multi-frame volumes.
        max_decoded_bytes: limit on the decoded stored samples plus their float64 grey copy.

    Raises:
        RejectedFile: naming the offending attribute, or the frame and offset of offending pixel data.
    """
    if _sop_class(ds) == MediaStorageDirectoryStorage:
        raise RejectedFile("DICOMDIR (Media Storage Directory): an index of other files, not an image; "
                           "the files it references are ingested as files of their own")
    if "PixelData" not in ds:
        raise RejectedFile("no PixelData element (0x7FE0,0x0010)")
    syntax = _transfer_syntax(ds)
    missing = [f"{k} {_tag_text(k)}" for k in _IMAGE_PIXEL_TYPE1 if ds.get(k) in (None, "")]
    if missing:
        raise RejectedFile(f"missing required Image Pixel attribute(s): {', '.join(missing)}")
    rows, columns, frames = _int(ds, "Rows"), _int(ds, "Columns"), n_frames(ds)
    samples, allocated = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated")
    # what decode() holds at once: the decoded stored samples and their float64 grey values
    per_pixel = max(samples, 1) * math.ceil(min(max(allocated, 1), 64) / 8) + 8
    decoded = rows * columns * frames * per_pixel
    if decoded > max_decoded_bytes:
        raise RejectedFile(f"declared decoded size {_human(decoded)} (Rows {rows} x Columns {columns} x "
                           f"NumberOfFrames {frames} x {per_pixel} bytes: SamplesPerPixel {samples} x BitsAllocated "
                           f"{allocated} stored + 8 float64) exceeds the {_human(max_decoded_bytes)} budget "
                           "(ingest.max_decoded_mib): a decompression bomb or a corrupt header; raise the budget "
                           "only if such images are expected")
    if not all(MIN_SIDE <= v <= MAX_SIDE for v in (rows, columns)):
        raise RejectedFile(f"implausible image size Rows={rows!r}, Columns={columns!r} "
                           f"(each must be between {MIN_SIDE} and {MAX_SIDE})")
    if spatial_dims == 2 and frames != 1:
        raise RejectedFile(f"multi-frame image (NumberOfFrames={frames}) but ingest.spatial_dims is 2")
    if spatial_dims == 3 and frames < 2:
        raise RejectedFile("single-frame image but ingest.spatial_dims is 3 (expects a multi-frame volume)")
    _check_photometric(ds, samples)
    _check_bits(ds)
    if syntax.is_encapsulated:
        _check_encapsulated(ds, syntax, rows, columns, frames, samples)
    else:
        _check_native_length(ds, rows, columns, frames, samples)


def _check_photometric(ds: Dataset, samples: int) -> None:
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric in _GREY or photometric == "PALETTE COLOR":
        wanted = 1
    elif photometric in _COLOUR:
        wanted = 3
    else:
        raise RejectedFile(f"PhotometricInterpretation {photometric!r} is not supported "
                           f"(supported: {', '.join(_GREY + _COLOUR)}, PALETTE COLOR)")
    if samples != wanted:
        raise RejectedFile(f"SamplesPerPixel={samples} does not match PhotometricInterpretation {photometric!r}, "
                           f"which has {wanted} sample(s) per pixel")
    if samples == 3 and _int(ds, "PlanarConfiguration", 0) not in (0, 1):
        raise RejectedFile(f"PlanarConfiguration {ds.PlanarConfiguration!r} is neither 0 nor 1")


def _check_bits(ds: Dataset) -> None:
    allocated, stored, high = _int(ds, "BitsAllocated"), _int(ds, "BitsStored"), _int(ds, "HighBit")
    if allocated not in (1, 8, 16, 32, 64):
        raise RejectedFile(f"unsupported BitsAllocated={allocated!r} (supported: 1, 8, 16, 32, 64)")
    if not 1 <= stored <= allocated:
        raise RejectedFile(f"BitsStored={stored} is not between 1 and BitsAllocated={allocated}")
    if high != stored - 1:
        # the decoders assume the stored bits are the low ones; another HighBit would shift every value
        raise RejectedFile(f"HighBit={high} is not BitsStored - 1 = {stored - 1}: pixel values not aligned "
                           "to the low bits are not supported")
    if _int(ds, "PixelRepresentation") not in (0, 1):
        raise RejectedFile(f"PixelRepresentation={ds.PixelRepresentation!r} is neither 0 (unsigned) nor 1 (signed)")


def _check_native_length(ds: Dataset, rows: int, columns: int, frames: int, samples: int) -> None:
    """Check that native PixelData holds the declared frames, and cut it to them.

    Trailing zero bytes (padding some writers add) are removed from ``ds``; anything else after the
    declared frames is refused, because it would be written out with the image: elements hidden behind an
    over-long PixelData, or a header that declares less than the data holds.
    """
    elem = ds["PixelData"]
    if elem.is_undefined_length:
        raise RejectedFile(f"PixelData is encapsulated (undefined length) but the Transfer Syntax "
                           f"{_transfer_syntax(ds).name} is native: the header's transfer syntax does not "
                           "describe the data")
    bits = _int(ds, "BitsAllocated")
    # native YBR_FULL_422 stores two samples per pixel (PS3.3 C.7.6.3.1.2)
    per_pixel = 2 if samples == 3 and str(ds.PhotometricInterpretation) == "YBR_FULL_422" else samples
    expected = math.ceil(rows * columns * per_pixel * bits / 8 * frames)
    value = elem.value or b""
    actual = len(value)
    detail = (f"(Rows {rows} x Columns {columns} x frames {frames} x samples {per_pixel} x {bits} bits)"
              if per_pixel != 1 else f"(Rows {rows} x Columns {columns} x frames {frames} x {bits} bits)")
    item_tag = b"\xfe\xff\x00\xe0" if _transfer_syntax(ds).is_little_endian else b"\xff\xfe\xe0\x00"
    if actual != expected and value.startswith(item_tag):
        raise RejectedFile(f"PixelData is encapsulated (it starts with an Item tag (FFFE,E000)) but the Transfer "
                           f"Syntax {_transfer_syntax(ds).name} is native: the header's transfer syntax does not "
                           "describe the data")
    if actual < expected:
        raise RejectedFile(f"truncated: pixel data length {actual} != expected {expected} {detail}")
    padded = expected + expected % 2  # PS3.5 7.1.1: values have an even length
    if value[expected:].strip(b"\x00"):
        raise RejectedFile(f"pixel data length {actual} != expected {expected} {detail}: the {actual - expected} "
                           "bytes after the declared frames are not zero padding (other elements or data hidden "
                           "behind the image, or Rows/Columns/NumberOfFrames declaring less than the data); "
                           "re-export the file with a header that describes its pixel data")
    if actual != padded:
        elem.value = value[:padded]


# JPEG (ITU-T T.81 B.1.1.3) and JPEG-LS (T.87 C.1.1): markers without a length; everything else has one
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RST0-7, TEM
_JPEG_DNL, _JPEG_SOS = 0xDC, 0xDA
_JPEG_TEXT = frozenset(range(0xE0, 0xF0)) | {0xFE}  # APP0-15 and COM: application data and comments
# APP segments that change how pixels decode, kept: Adobe's colour transform (APP14, which decoders also read
# its version from) and HP's JPEG-LS colour transform (APP8 "mrfx"); numbers of a fixed length, no room for text
_JPEG_DECODING_APP = {(0xEE, b"Adobe"): 12, (0xE8, b"mrfx"): 5}  # (marker, signature) -> payload length
# JPEG 2000 (ITU-T T.800 A.2): COM, start of tile-part, start of data, tile-part lengths, end of codestream
_J2K_COM, _J2K_SOT, _J2K_SOD, _J2K_TLM, _J2K_EOC = 0x64, 0x90, 0x93, 0x55, 0xD9
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # T.800 I.5.1; the codestream is in the "jp2c" box


def _check_encapsulated(ds: Dataset, syntax: UID, rows: int, columns: int, frames: int, samples: int) -> None:
    """Check encapsulated PixelData frame by frame, and keep in ``ds`` only what decodes to the image.

    The fragments are grouped into frames (by the Basic or Extended Offset Table, else by the codestreams'
    ends); every JPEG, JPEG-LS and JPEG 2000 codestream is walked marker by marker, however it is split
    into fragments, so that the size its header declares is compared with Rows, Columns and
    SamplesPerPixel before a decoder allocates it, and its comment and application segments (free text,
    thumbnails) are removed. Fragments or bytes that belong to no frame are refused.
    """
    elem = ds["PixelData"]
    if not elem.is_undefined_length:
        raise RejectedFile(f"Transfer Syntax {syntax.name} is encapsulated (compressed) but PixelData is not "
                           "(it has a defined length): the header's transfer syntax does not describe the data")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise RejectedFile(f"no pixel decoder for Transfer Syntax {syntax.name} ({syntax})") from exc
    if not decoder.is_available:
        raise RejectedFile(f"no pixel decoder installed for Transfer Syntax {syntax.name}; install one of: "
                           f"{'; '.join(decoder.missing_dependencies)}")
    try:
        items = list(generate_fragments(elem.value, endianness="<" if syntax.is_little_endian else ">"))
    except ValueError as exc:
        raise RejectedFile(f"malformed encapsulated PixelData: {_one_line(exc)}") from exc
    if len(items) < 2:  # the Basic Offset Table item, then at least one fragment
        raise RejectedFile("encapsulated PixelData holds no compressed fragment")
    bot, *fragments = items
    ranges = _frame_ranges(ds, bot, fragments, frames)
    if len(ranges) > frames:
        raise RejectedFile(f"encapsulated PixelData holds {len(fragments) - ranges[frames][0]} fragment(s) after "
                           f"the last of its {frames} frame(s): data that belongs to no frame; re-export the file")
    if len(ranges) < frames:
        raise RejectedFile(f"encapsulated PixelData holds {len(ranges)} frame(s) but NumberOfFrames is {frames}")
    if syntax in RLETransferSyntaxes:
        if len(fragments) != frames:  # PS3.5 A.4.2: each RLE frame is one fragment
            raise RejectedFile(f"RLE PixelData holds {len(fragments)} fragments for {frames} frame(s); each frame "
                               "must be one fragment (PS3.5 A.4.2): fragments that belong to no frame")
        return
    cleaned, changed = [], False
    for frame, (first, last) in enumerate(ranges, 1):
        data = b"".join(fragments[first:last])
        check = functools.partial(_check_codestream_size, first, rows=rows, columns=columns, samples=samples)
        if data.startswith(b"\xff\xd8"):
            parts, end = _clean_jpeg(data, frame, check)
        elif data.startswith((_JP2_SIGNATURE, b"\xff\x4f\xff\x51")):
            parts, end = _clean_j2k(data, frame, check)
        else:
            raise RejectedFile(f"frame {frame} of the encapsulated PixelData starts with neither a JPEG SOI nor a "
                               f"JPEG 2000 SOC marker (first bytes {data[:4].hex(' ')}), as {syntax.name} requires")
        if data[end:].strip(b"\x00\xff"):  # padding to an even length is a 0x00 or 0xFF byte
            raise RejectedFile(f"{len(data) - end} bytes follow the end of frame {frame}'s codestream (its "
                               "end marker) in the encapsulated PixelData: data or fragments that belong to no "
                               "frame; re-export the file")
        codestream = b"".join(parts)
        changed |= codestream != data[:end]
        cleaned.append(codestream)
    if changed:
        elem.value = encapsulate(cleaned, has_bot=frames > 1)
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):  # they described the old fragments
            ds.pop(keyword, None)


def _frame_ranges(ds: Dataset, bot: bytes, fragments: list[bytes], frames: int) -> list[tuple[int, int]]:
    """The fragments of each frame, as (first, end) indices, from the offset tables or the codestreams' ends.

    Offsets must start at 0, increase, and each point at the start of a fragment (PS3.5 A.4); without a
    table, one frame has every fragment, as many fragments as frames are one each, and otherwise a frame
    ends with the fragment that ends with an end-of-image marker (what pydicom's decoders assume too).
    """
    starts = [0]  # item offsets from the first fragment's Item tag, as the tables count them
    for fragment in fragments:
        starts.append(starts[-1] + 8 + len(fragment))
    if "ExtendedOffsetTable" in ds:
        table, entry, where = bytes(ds.ExtendedOffsetTable or b""), 8, "Extended Offset Table (7FE0,0001)"
    else:
        table, entry, where = bot, 4, "Basic Offset Table (the first item of PixelData)"
    if table:
        if len(table) != entry * frames:
            raise RejectedFile(f"the {where} is {len(table)} bytes, not {entry} per frame for NumberOfFrames "
                               f"{frames}: it does not describe the fragments; re-export the file")
        offsets = list(struct.unpack(f"<{frames}{'Q' if entry == 8 else 'L'}", table))
        if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise RejectedFile(f"the {where} offsets {offsets[:8]} do not start at 0 and increase: it does not "
                               "describe the fragments; re-export the file")
        index = {offset: i for i, offset in enumerate(starts[:-1])}
        for frame, offset in enumerate(offsets, 1):
            if offset not in index:
                where_to = (f"past the end of the fragments ({starts[-1]} bytes)" if offset >= starts[-1] else
                            "inside a fragment, not at the start of one")
                raise RejectedFile(f"the {where} offset of frame {frame} ({offset}) points {where_to}: it does "
                                   "not describe the fragments; re-export the file")
        bounds = [index[offset] for offset in offsets] + [len(fragments)]
        ranges = list(zip(bounds, bounds[1:]))
        if entry == 8:
            lengths = bytes(ds.get("ExtendedOffsetTableLengths") or b"")
            sizes = [sum(map(len, fragments[first:last])) for first, last in ranges]
            if len(lengths) != 8 * frames or list(struct.unpack(f"<{frames}Q", lengths)) != sizes:
                raise RejectedFile(f"the Extended Offset Table Lengths (7FE0,0002) do not give the {frames} frame "
                                   f"lengths the fragments have ({sizes[:8]}); re-export the file")
        return ranges
    if frames == 1:
        return [(0, len(fragments))]
    if len(fragments) == frames:
        return [(i, i + 1) for i in range(frames)]
    ends = [i + 1 for i, fragment in enumerate(fragments) if fragment.rstrip(b"\x00").endswith(b"\xff\xd9")]
    if not ends or ends[-1] != len(fragments):
        ends.append(len(fragments))
    return list(zip([0, *ends], ends))


def _check_codestream_size(fragment: int, size: tuple[int, int, int], *, rows: int, columns: int,
                           samples: int) -> None:
    """Compare a codestream header's (rows, columns, components) with the Image Pixel module's.

    Decoders allocate what the codestream declares, so a frame may declare neither more pixels nor more
    components than the header (which passed the decode budget); 0 rows is a JPEG height that a DNL
    segment was to give, and did not.
    """
    declared_rows, declared_columns, components = size
    if declared_rows not in (0, rows) or declared_columns != columns:
        raise RejectedFile(f"codestream size mismatch: fragment {fragment} declares {declared_rows} x "
                           f"{declared_columns} pixels but Rows x Columns is {rows} x {columns}")
    if components != samples:
        raise RejectedFile(f"codestream size mismatch: fragment {fragment} declares {components} components but "
                           f"SamplesPerPixel is {samples}")


def _clean_jpeg(data: bytes, frame: int, check: Callable[[tuple[int, int, int]], None]) -> tuple[list[bytes], int]:
    """Walk a JPEG or JPEG-LS codestream (T.81 B.2, T.87 C.2) from its SOI; drop COM and APPn segments.

    Args:
        data: the frame's fragments, joined; starts with SOI.
        frame: its number (from 1), for the reasons.
        check: called with the (rows, columns, components) of the frame header (SOF) and of a DNL segment.

    Returns:
        The codestream without comment and application segments (in pieces), and where its EOI ends in ``data``.

    Raises:
        RejectedFile: from ``check``, for a scan before the frame header, or a codestream cut short.
    """
    parts, copied, pos, size = [], 0, 2, None
    try:
        while True:
            segment_start = pos
            if data[pos] != 0xFF:
                raise RejectedFile(f"frame {frame}'s JPEG codestream has no marker at byte {pos}: corrupt data")
            while data[pos + 1] == 0xFF:  # fill bytes before a marker (T.81 B.1.1.2)
                pos += 1
            marker = data[pos + 1]
            pos += 2
            if marker == 0xD9:  # EOI
                break
            if marker in _JPEG_STANDALONE:
                continue
            length = int.from_bytes(data[pos:pos + 2], "big")
            end = pos + length
            if length < 2 or end > len(data):
                raise IndexError
            if marker in _JPEG_SOF:
                size = struct.unpack(">HHB", data[pos + 3:pos + 8])
                check(size)
            elif marker == _JPEG_DNL and size is not None:
                check((int.from_bytes(data[pos + 2:pos + 4], "big"), *size[1:]))
            elif marker in _JPEG_TEXT and not _changes_decoding(marker, data[pos + 2:end]):
                parts.append(data[copied:segment_start])
                copied = end
            elif marker == _JPEG_SOS:
                if size is None:
                    raise RejectedFile(f"frame {frame}'s JPEG codestream starts a scan before its frame header "
                                       "(SOF): its size cannot be checked before decoding")
                end = _entropy_end(data, end)
            pos = end
    except (IndexError, ValueError, struct.error):
        raise RejectedFile(f"frame {frame}'s JPEG codestream is cut short (no end-of-image marker): truncated "
                           "or corrupt pixel data") from None
    parts.append(data[copied:pos])
    return parts, pos


def _changes_decoding(marker: int, payload: bytes) -> bool:
    """Whether an APP segment is one of :data:`_JPEG_DECODING_APP`, which are kept."""
    return any(marker == app and len(payload) == length and payload.startswith(signature)
               for (app, signature), length in _JPEG_DECODING_APP.items())


def _entropy_end(data: bytes, pos: int) -> int:
    """Where a scan's entropy-coded data ends: the next marker other than RSTn.

    In JPEG a 0xFF data byte is followed by 0x00, in JPEG-LS by a byte below 0x80 (T.87 A.1); either way a
    0xFF followed by 0x80 or more, RSTn excepted, is a marker.
    """
    while True:
        pos = data.index(b"\xff", pos)
        follower = data[pos + 1]
        if follower >= 0x80 and follower not in _JPEG_STANDALONE:
            return pos
        pos += 2


def _clean_j2k(data: bytes, frame: int, check: Callable[[tuple[int, int, int]], None]) -> tuple[list[bytes], int]:
    """Walk a JPEG 2000 codestream (T.800 A), raw or in a JP2 file; drop its COM segments and any JP2 boxes.

    Tile-parts are skipped by their length (Psot), which is corrected where a COM leaves a tile-part header;
    the tile-part lengths (TLM) are then dropped, being optional.

    Args:
        data: the frame's fragments, joined; starts with SOC and SIZ, or with the JP2 signature box.
        frame: its number (from 1), for the reasons.
        check: called with the (rows, columns, components) of the SIZ segment.

    Returns:
        The raw codestream without COM segments (in pieces), and where it ends in ``data``.

    Raises:
        RejectedFile: from ``check``, for a codestream cut short, or a JP2 file without its "jp2c" box.
    """
    try:
        start, limit = 0, len(data)
        if data.startswith(_JP2_SIGNATURE):  # DICOM wants the raw codestream (PS3.5 A.4.4); keep only that
            while data[start + 4:start + 8] != b"jp2c":
                box = int.from_bytes(data[start:start + 4], "big")
                if box == 1:
                    box = int.from_bytes(data[start + 8:start + 16], "big")
                if box < 8:
                    raise RejectedFile(f"frame {frame}'s JP2 file has no codestream box (jp2c) before its end")
                start += box
            box, header = int.from_bytes(data[start:start + 4], "big"), 8
            if box == 1:
                box, header = int.from_bytes(data[start + 8:start + 16], "big"), 16
            limit, start = (start + box if box else limit), start + header
        if data[start:start + 4] != b"\xff\x4f\xff\x51":
            raise RejectedFile(f"frame {frame}'s JPEG 2000 codestream does not start with SOC and SIZ")
        x, y, x0, y0 = struct.unpack(">IIII", data[start + 8:start + 24])
        check((y - y0, x - x0, int.from_bytes(data[start + 40:start + 42], "big")))
        parts, copied, pos, tlm, shortened = [], start, start + 2, None, False
        while True:
            if data[pos] != 0xFF:
                raise RejectedFile(f"frame {frame}'s JPEG 2000 codestream has no marker at byte {pos}: corrupt data")
            marker = data[pos + 1]
            if marker == _J2K_EOC:
                pos += 2
                break
            end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == _J2K_SOT:
                psot = int.from_bytes(data[pos + 6:pos + 10], "big")
                if psot:
                    tile_end = pos + psot
                else:  # the last tile-part, up to the EOC that ends the codestream
                    tile_end = len(data[:limit].rstrip(b"\x00\xff")) - 2  # padding stops at EOC's 0xD9
                if tile_end < end + 2 or tile_end > limit:
                    raise IndexError
                header, removed, cursor = [data[pos:end]], 0, end
                while data[cursor:cursor + 2] != b"\xff\x93":  # SOD ends the tile-part header
                    segment_end = cursor + 2 + int.from_bytes(data[cursor + 2:cursor + 4], "big")
                    if data[cursor] != 0xFF or segment_end > tile_end:
                        raise IndexError
                    if data[cursor + 1] == _J2K_COM:
                        removed += segment_end - cursor
                    else:
                        header.append(data[cursor:segment_end])
                    cursor = segment_end
                if removed:
                    shortened = True
                    if psot:
                        header[0] = header[0][:6] + (psot - removed).to_bytes(4, "big") + header[0][10:]
                parts += (data[copied:pos], *header, data[cursor:tile_end])
                copied = pos = tile_end
                continue
            if end > limit:
                raise IndexError
            if marker in (_J2K_COM, _J2K_TLM):
                parts.append(data[copied:pos])
                if marker == _J2K_TLM:
                    tlm = len(parts)
                    parts.append(data[pos:end])
                copied = end
            pos = end
    except (IndexError, ValueError, struct.error):
        raise RejectedFile(f"frame {frame}'s JPEG 2000 codestream is cut short (no end-of-codestream marker): "
                           "truncated or corrupt pixel data") from None
    if shortened and tlm is not None:
        parts[tlm] = b""  # its tile-part lengths no longer hold
    parts.append(data[copied:pos])
    return parts, limit if start else pos


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID", "") or _file_meta(ds).get("MediaStorageSOPClassUID", "") or "")


def _file_meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or Dataset()


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, or a reason naming it when it is missing or not an integer."""
    value = ds.get(keyword, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    try:
        if value is not None and float(value).is_integer():
            return int(float(value))
    except (TypeError, ValueError):
        pass
    raise RejectedFile(f"invalid {keyword} {_tag_text(keyword)}: {value!r} is not an integer")


def n_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent).

    Raises:
        RejectedFile: naming an invalid value.
    """
    if ds.get("NumberOfFrames") in (None, ""):
        return 1
    frames = _int(ds, "NumberOfFrames")
    if frames < 1:
        raise RejectedFile(f"invalid NumberOfFrames {frames}: must be at least 1")
    return frames


def _transfer_syntax(ds: Dataset) -> UID:
    syntax = UID(_file_meta(ds).get("TransferSyntaxUID", ExplicitVRLittleEndian))
    if not syntax.is_transfer_syntax:
        raise RejectedFile(f"unknown Transfer Syntax UID {str(syntax)!r} (0002,0010): the encoding of the "
                           "pixel data cannot be known")
    return syntax


def _tag_text(keyword: str) -> str:
    tag = Tag(keyword)
    return f"({tag.group:04X},{tag.element:04X})"


def _name(tag: int) -> str:
    tag = Tag(tag)
    return f"({tag.group:04X},{tag.element:04X}) {keyword_for_tag(tag) or 'private/unknown'}"


def _human(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.1f} {unit}" if unit != "bytes" else f"{int(n_bytes)} bytes"
        n_bytes /= 1000
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# decoding


def decode(ds: Dataset) -> np.ndarray:
    """Decode the pixels to values oriented so that bright = dense.

    Grey-scale images: the stored values (garbage bits above BitsStored masked, signed values
    sign-extended) go through the Modality LUT (RescaleSlope/Intercept, the Modality LUT Sequence,
    or, in enhanced multi-frame images, the per-frame or shared Pixel Value Transformation), and
    MONOCHROME1, whose values run the other way, is negated. Colour images (RGB, YBR_*, PALETTE
    COLOR) are converted to RGB and reduced to their luma (ITU-R BT.601); they have no density
    axis, so "bright" is simply luminance.

    Args:
        ds: a dataset that passed :func:`validate`.

    Returns:
        ``float64`` array ``(rows, columns)`` or ``(frames, rows, columns)``.

    Raises:
        RejectedFile: when the pixel data cannot be decoded or does not match the header.
    """
    syntax = _transfer_syntax(ds)
    try:
        # as_rgb=False: YBR_FULL(_422) comes back as decoded, and its Y is already the luma
        stored, properties = get_decoder(syntax).as_array(ds, allow_excess_frames=False, as_rgb=False)
    except Exception as exc:  # decoder plugins raise their own types
        raise RejectedFile(f"cannot decode pixel data ({syntax.name}): {decode_failure(ds, exc)}") from exc
    frames, samples = n_frames(ds), _int(ds, "SamplesPerPixel", 1)
    declared = ((frames,) if frames > 1 else ()) + (ds.Rows, ds.Columns) + ((samples,) if samples > 1 else ())
    if stored.shape != declared:
        raise RejectedFile(f"decoded pixel array shape {stored.shape} != declared {declared}")
    stored = stored.reshape((frames, ds.Rows, ds.Columns) + ((samples,) if samples > 1 else ()))
    photometric = str(properties.get("photometric_interpretation", ds.PhotometricInterpretation))
    try:
        if photometric == "PALETTE COLOR":
            values = luma(_palette_rgb(stored, ds, syntax))
        elif photometric == "RGB":
            values = luma(stored)
        elif photometric in ("YBR_FULL", "YBR_FULL_422"):
            values = stored[..., 0].astype(np.float64)  # Y = BT.601 luma of the RGB (PS3.3 C.7.6.3.1.2)
        elif photometric in _GREY:
            values = modality_values(stored, ds)
            if photometric == "MONOCHROME1":
                np.negative(values, out=values)
        else:
            raise RejectedFile(f"decoder returned PhotometricInterpretation {photometric!r}, not grey, RGB or YBR")
    except RejectedFile:
        raise
    except Exception as exc:  # malformed LUTs
        raise RejectedFile(f"cannot apply the {'colour palette' if 'PALETTE' in photometric else 'Modality LUT'}: "
                           f"{type(exc).__name__}: {_one_line(exc)}") from exc
    if not np.isfinite(values).all():
        raise RejectedFile("pixel values are not finite after the modality LUT (check RescaleSlope/Intercept)")
    return values[0] if frames == 1 else values


def decode_failure(ds: Dataset, exc: BaseException) -> str:
    """What a pixel decoder's exception means, for a reason that also names the transfer syntax.

    Decoders say "Unable to allocate output buffer" without the size, and pydicom's fragment iterators
    end with an empty ``StopIteration`` when the offset table or the fragments run out.

    Args:
        ds: the dataset being decoded.
        exc: what the decoder raised.

    Returns:
        ``"<exception type>: <what happened>"`` on one line; for a MemoryError, the declared size.
    """
    if isinstance(exc, MemoryError):
        rows, columns, frames = ds.get("Rows"), ds.get("Columns"), ds.get("NumberOfFrames") or 1
        samples, allocated = ds.get("SamplesPerPixel") or 1, ds.get("BitsAllocated") or 8
        try:
            size = _human(int(rows) * int(columns) * int(frames) * int(samples) * math.ceil(int(allocated) / 8))
        except (TypeError, ValueError):
            size = "an unknown size"
        return (f"MemoryError: the decoder cannot allocate the decoded image, Rows {rows} x Columns {columns} x "
                f"{frames} frame(s) x {samples} sample(s) x {allocated} bits = {size} declared; the worker's memory "
                "(ingest.worker_memory_mb) is too small for it: raise it, or lower ingest.max_decoded_mib to refuse "
                "such images before decoding")
    if isinstance(exc, StopIteration):
        return (f"StopIteration: the encapsulated fragments ran out before the {ds.get('NumberOfFrames') or 1} "
                "frame(s) declared: the Basic Offset Table or the fragments do not match NumberOfFrames")
    return f"{type(exc).__name__}: {_one_line(exc) or 'no message'}"


def _palette_rgb(stored: np.ndarray, ds: Dataset, syntax: UID) -> np.ndarray:
    """PALETTE COLOR -> RGB (PS3.3 C.7.6.3.1.5).

    pydicom 3.0 reads non-segmented 16-bit palette data as little endian whatever the transfer
    syntax (its segmented path honours the syntax), so in big endian files every entry comes back
    byte-swapped; swapping the looked-up values back is exact. The test decodes OBXXXX1A and its
    big endian copy to the same pixels.
    """
    rgb = apply_color_lut(stored, ds)
    if rgb.dtype.itemsize == 2 and "RedPaletteColorLookupTableData" in ds and not syntax.is_little_endian:
        rgb = rgb.byteswap()
    return rgb


def luma(rgb: np.ndarray) -> np.ndarray:
    """Luminance of RGB pixels, ITU-R BT.601 weights.

    Args:
        rgb: ``(..., 3)`` array.

    Returns:
        ``float64`` array ``(...)`` in the input's units.
    """
    # channel by channel: a float64 copy of all three channels would be 24 bytes a pixel
    out = rgb[..., 0] * LUMA_WEIGHTS[0]
    for channel in (1, 2):
        out += rgb[..., channel] * LUMA_WEIGHTS[channel]
    return out


def modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT (PS3.3 C.11.1), frame by frame for enhanced multi-frame images.

    Args:
        stored: stored values ``(frames, rows, columns)``.
        ds: the dataset.

    Returns:
        ``float64`` modality values, same shape.

    Raises:
        RejectedFile: when a rescale attribute is not a number.
    """
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    values = stored.astype(np.float64)
    for frame in range(len(values)):
        transform = _functional_group(ds, "PixelValueTransformationSequence", frame)
        if transform is not None:
            slope = _number(transform, "RescaleSlope", 1.0)
            intercept = _number(transform, "RescaleIntercept", 0.0)
            values[frame] = values[frame] * slope + intercept
    return values


def _functional_group(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """The item of a functional group macro for one frame: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups) or []
        if index < len(items) and items[index].get(sequence):
            return items[index].get(sequence)[0]
    return None


def _number(ds: Dataset, keyword: str, default: float) -> float:
    return _finite(keyword, ds.get(keyword, default))


def _finite(keyword: str, value: object) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise RejectedFile(f"invalid {keyword} {_tag_text(keyword)}: {value!r} is not a number") from exc
    if not math.isfinite(number):
        raise RejectedFile(f"invalid {keyword} {_tag_text(keyword)}: {value!r} is not finite")
    return number


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()[:400]


# ----------------------------------------------------------------------------------------------
# windowing: decoded values -> [0, 1]


def voi_window(ds: Dataset) -> Callable[[np.ndarray], np.ndarray] | None:
    """The display transform the header prescribes (VOI LUT, PS3.3 C.11.2), as a function of
    :func:`decode`'s output, or ``None`` when the header prescribes none (or the image is colour).

    The first VOI LUT Sequence item takes precedence over WindowCenter/WindowWidth (as in PS3.4
    N.2.1.1); the first window of a multi-valued pair is the default one. Enhanced multi-frame
    images carry theirs in the Frame VOI LUT functional group (that of the first frame is used for
    the whole volume). MONOCHROME1 is handled, so the output is always bright = dense.

    Args:
        ds: a dataset that passed :func:`validate`.

    Returns:
        ``f(values) -> array in [0, 1]``, or ``None``.

    Raises:
        RejectedFile: when the VOI attributes are malformed (naming them).
    """
    photometric = str(ds.PhotometricInterpretation)
    if photometric not in _GREY:
        return None
    source = ds if ("VOILUTSequence" in ds or "WindowCenter" in ds) else _functional_group(ds, "FrameVOILUTSequence", 0)
    if source is None:
        return None
    if source.get("VOILUTSequence"):
        transform = _voi_lut(source)
    elif "WindowCenter" in source and "WindowWidth" in source:
        transform = _window_function(source)
    else:
        return None
    if photometric == "MONOCHROME2":
        return transform
    return lambda values: 1.0 - transform(-values)  # decode() negated MONOCHROME1; the VOI applies to -values


def _first(ds: Dataset, keyword: str) -> float:
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        if not value:
            raise RejectedFile(f"invalid {keyword} {_tag_text(keyword)}: empty")
        value = value[0]
    return _finite(keyword, value)


def _window_function(ds: Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """WindowCenter/WindowWidth with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2)."""
    centre, width = _first(ds, "WindowCenter"), _first(ds, "WindowWidth")
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "LINEAR":
        if width < 1:
            raise RejectedFile(f"WindowWidth {width:g} (0028,1051) is below 1, which a LINEAR window forbids; "
                               "set ingest.windowing: percentile to ignore the header's window")
        if width == 1:  # the formula's limit: a threshold at c - 0.5
            return lambda x: (x > centre - 0.5).astype(np.float64)
        return lambda x: np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise RejectedFile(f"WindowWidth {width:g} (0028,1051) is not positive; set ingest.windowing: percentile "
                           "to ignore the header's window")
    if function == "LINEAR_EXACT":
        return lambda x: np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return lambda x: 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - centre) / width, -700, 700)))
    raise RejectedFile(f"unknown VOILUTFunction {function!r} (0028,1056); expected LINEAR, LINEAR_EXACT or SIGMOID")


def _voi_lut(ds: Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """The first VOI LUT Sequence item, rescaled from the LUT's output range to [0, 1].

    The range is that of the LUT's own entries rather than 2**bits - 1 from the LUT Descriptor,
    which is often wrong (a 12-bit LUT declared as 16 bits would display nearly black).
    """
    try:
        descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
        entries, first = descriptor[0] or 65536, descriptor[1]
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds).astype(np.float64)
    except Exception as exc:
        raise RejectedFile(f"malformed VOI LUT Sequence (0028,3010): {type(exc).__name__}: {_one_line(exc)}") from exc
    low, high = float(table.min()), float(table.max())
    if high <= low:
        raise RejectedFile("VOI LUT Sequence (0028,3010) maps every value to the same output")
    return lambda x: (table[np.clip(np.rint(x).astype(np.int64) - first, 0, entries - 1)] - low) / (high - low)


def window(values: np.ndarray) -> np.ndarray:
    """Robust windowing to [0, 1] between the 0.5th and 99.5th percentile.

    Args:
        values: modality values, bright = dense.

    Returns:
        Array of the same shape in [0, 1].

    Raises:
        RejectedFile: when the image is blank (a single value).
    """
    flat = values.reshape(-1)
    # A regular subsample of 2^18 values pins the 0.5th / 99.5th percentiles to well under a grey level and
    # spares sorting the ~10^7 pixels of a full-size radiograph; images up to 512 x 512 use every pixel.
    sample = flat[:: max(1, flat.size // _PERCENTILE_SAMPLES)]
    low, high = np.percentile(sample, WINDOW_PERCENTILES)
    if high <= low:
        # a few bright pixels on a flat image: fall back to the full range
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise RejectedFile(f"blank image: every pixel has the value {low:g}")
    out = values - low  # in place from here: one working copy of a possibly large image
    out /= high - low
    return np.clip(out, 0.0, 1.0, out=out)


@functools.lru_cache(maxsize=64)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights of a triangle kernel widened when shrinking (antialiasing).

    This is the kernel of PIL's and torch's antialiased bilinear resize. It is applied as a
    gather and a weighted sum rather than a matrix product: BLAS threads spinning in several
    worker processes at once made parallel ingestion slower than serial.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    taps = int(np.ceil(2.0 * support)) + 1
    index = np.floor(centres - support).astype(np.int64)[:, None] + 1 + np.arange(taps)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs(index - centres[:, None]) / support)
    weights[(index < 0) | (index >= n_in)] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(index, 0, n_in - 1), weights.astype(np.float32)


def resize(image: np.ndarray, size: int | tuple[int, ...]) -> np.ndarray:
    """Antialiased linear resize of every axis.

    Args:
        image: 2D or 3D array.
        size: output length of every axis, or one length per axis.

    Returns:
        ``float32`` array of shape ``(size,) * image.ndim`` (or ``size``).
    """
    shape = (size,) * image.ndim if isinstance(size, int) else tuple(size)
    if len(shape) != image.ndim:
        raise ValueError(f"resize: {len(shape)} output lengths for a {image.ndim}D image; give one per axis")
    out = image.astype(np.float32)
    for axis, n_out in enumerate(shape):
        index, weights = _resize_taps(out.shape[axis], n_out)
        moved = np.moveaxis(out, axis, 0)
        weights = weights.reshape(*weights.shape, *([1] * (moved.ndim - 1)))
        # tap by tap: gathering all taps at once would hold (n_out x taps) rows, twice the image when shrinking
        total = np.zeros((n_out, *moved.shape[1:]), dtype=np.float32)
        for tap in range(index.shape[1]):
            total += moved[index[:, tap]] * weights[:, tap]
        out = np.moveaxis(total, 0, axis)
    return np.ascontiguousarray(out)


def fit_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so that the longest axis is ``size`` (aspect ratio kept), then zero-pad every axis to ``size``, centred.

    Zero is "no density" (air) after windowing, which is what lies outside a radiograph. Resizing
    before padding keeps memory at the image's own size: padding a 120 x 480 x 640 volume to a cube
    first would allocate a 640**3 array, 17 times the volume.

    Args:
        image: 2D or 3D array.
        size: side of the output.

    Returns:
        ``float32`` array of shape ``(size,) * image.ndim``.
    """
    scale = size / max(image.shape)
    shape = tuple(min(size, max(1, round(n * scale))) for n in image.shape)
    pads = [((size - n) // 2, size - n - (size - n) // 2) for n in shape]
    return np.pad(resize(image, shape), pads)


def preprocess(values: np.ndarray, size: int, *,
               voi: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Window, pad to square, resize and add the channel axis.

    Args:
        values: output of :func:`decode`.
        size: side length of the stored array.
        voi: the header's display transform from :func:`voi_window` (``ingest.windowing: dicom``);
            ``None`` windows robustly between percentiles (:func:`window`).

    Returns:
        ``float32`` array ``(1, size, size)`` (or ``(1, size, size, size)``) in [0, 1].

    Raises:
        RejectedFile: when the windowed image is blank.
    """
    if voi is None:
        image = window(values)
    else:
        image = voi(values)
        if float(image.max()) <= float(image.min()):
            raise RejectedFile(f"blank image after the header's VOI window: every pixel maps to "
                               f"{float(image.min()):g}; set ingest.windowing: percentile to ignore the window")
    return np.clip(fit_to_square(image, size), 0.0, 1.0)[None]
