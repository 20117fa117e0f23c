"""Write de-identified DICOM copies fast, byte for byte as ``pydicom.dcmwrite`` would.

``pydicom.dcmwrite(path, ds, enforce_file_format=True)`` spends most of its time on per-element Python
overhead in ``filewriter.write_data_element`` (a fresh buffer, encoding set-up and several small writes for every
element, also for the ``RawDataElement`` objects that de-identification keeps from the input, whose bytes it
writes unchanged). This module mirrors pydicom 3.0's ``dcmwrite``, ``write_file_meta_info``, ``write_dataset``
and ``write_data_element`` decision for decision, but

* emits a raw element's header and value bytes directly,
* encodes other elements' values with pydicom's own value writers (``filewriter.writers``) into one reused
  buffer, and sequences item by item as ``write_sequence_item`` does,
* hands everything else to ``write_data_element`` itself: Pixel Data, undefined lengths, buffered values, and
  VRs that pydicom rejects or writes as UN.

The element conversions ``dcmwrite`` makes as a side effect (SOP Class/Instance UID, Pixel Data and Specific
Character Set converted from raw; every element of a sequence item read in another character set) are made in
the same order, so that the same values are re-encoded the same way. Where pydicom takes another road for the
whole dataset -- a big endian or deflated transfer syntax, no or a private transfer syntax, a dataset whose
original encoding or character set differs from the one being written (``write_dataset`` then converts and
re-encodes every element), an input ``dcmwrite`` refuses, or a pydicom release other than the one mirrored --
``pydicom.dcmwrite`` writes it. ``tests/test_writer.py`` compares the bytes with ``dcmwrite``'s on every file of
pydicom's test data, de-identified.

References: DICOM PS3.10 7.1 (File Meta Information), PS3.5 7.1.2 (explicit VR element headers, Table 7.1-1),
7.1.3 (implicit VR), 6.2.2 (values over 64 KiB in a 16-bit length VR).
"""

from __future__ import annotations

import copy
import io
import os
import struct
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO, DicomIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, writers
from pydicom.tag import tag_in_exception
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_32, STANDARD_VR, VR

__all__ = ["encode_dicom", "fallback_reason", "write_dicom"]

# The pydicom release whose filewriter this module mirrors (and whose Dataset internals it reads); any other
# release is written by dcmwrite itself until the equality tests (tests/test_writer.py) have been run against it.
_PYDICOM = "3.0."
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
# explicit VR: tag, VR, 2 reserved bytes, 32-bit length (OB, OW, SQ, UN, UT, ...) or tag, VR, 16-bit length
_LONG_HEADER = struct.Struct("<HH2sHL").pack
_SHORT_HEADER = struct.Struct("<HH2sH").pack
_IMPLICIT_HEADER = struct.Struct("<HHL").pack
# items and their delimiters have no VR in any encoding (PS3.5 7.5)
_ITEM_UNDEFINED = _IMPLICIT_HEADER(0xFFFE, 0xE000, _UNDEFINED_LENGTH)
_ITEM_DELIMITER = _IMPLICIT_HEADER(0xFFFE, 0xE00D, 0)
# VR text -> (bytes written, whether its length field is 32-bit); a VR outside this table goes to pydicom
_VR_CODES = {vr.value: (vr.value.encode("ascii"), vr in EXPLICIT_VR_LENGTH_32) for vr in STANDARD_VR}


def write_dicom(path: Path | str | os.PathLike | BinaryIO, ds: Dataset) -> None:
    """Write ``ds`` as a DICOM Part 10 file, the bytes of ``pydicom.dcmwrite(path, ds, enforce_file_format=True)``.

    Like ``dcmwrite``, it converts some raw elements of ``ds`` (and of its sequence items) to ``DataElement``
    in place, and leaves ``ds.file_meta`` alone. Unlike ``dcmwrite``, it never changes an element object:
    ``dcmwrite`` sets Pixel Data's undefined-length flag on the element, which de-identification shares with
    the input dataset; here a copy is written instead.

    Args:
        path: a file path (created or overwritten) or a binary file object, written from its position.
        ds: the dataset, with ``file_meta`` holding its Transfer Syntax UID.

    Raises:
        ValueError, TypeError, AttributeError: whatever ``pydicom.dcmwrite`` raises for the same dataset
            (missing or invalid file meta, command or file meta elements in the dataset, a value that cannot
            be encoded); pydicom's message names the element.
        OSError: when the file cannot be written.
    """
    chunks = _encode_chunks(ds)
    if chunks is None:
        _unshare_pixel_data(ds)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        return
    if isinstance(path, (str, os.PathLike)):
        # encoded before opening: a dataset pydicom cannot encode leaves no partial file behind
        with open(path, "wb") as fp:
            fp.writelines(chunks)
    elif hasattr(path, "write"):
        for chunk in chunks:
            path.write(chunk)
    else:
        raise TypeError(f"write_dicom: expected a file path or a binary file object, got {type(path).__name__}")


def encode_dicom(ds: Dataset) -> bytes:
    """The bytes ``pydicom.dcmwrite(..., ds, enforce_file_format=True)`` writes.

    Args:
        ds: the dataset, with ``file_meta`` holding its Transfer Syntax UID.

    Returns:
        Preamble, ``DICM`` prefix, file meta and dataset.

    Raises:
        ValueError, TypeError, AttributeError: as :func:`write_dicom`.
    """
    chunks = _encode_chunks(ds)
    if chunks is None:
        _unshare_pixel_data(ds)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()
    return b"".join(chunks)


def fallback_reason(ds: Dataset) -> str | None:
    """Why :func:`write_dicom` hands ``ds`` to ``pydicom.dcmwrite`` whole, or ``None`` when it takes the fast path.

    Like ``dcmwrite``, it converts ``ds``'s Specific Character Set (0008,0005) from raw when present.

    Args:
        ds: the dataset.

    Returns:
        A reason in words, or ``None``.
    """
    if not pydicom.__version__.startswith(_PYDICOM):
        return f"pydicom {pydicom.__version__}: this writer mirrors the filewriter of pydicom {_PYDICOM}x"
    if any(tag >> 16 in (0, 2) for tag in ds.keys()):
        return "command (0000,eeee) or file meta (0002,eeee) elements in the dataset (dcmwrite refuses them)"
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not isinstance(syntax, UID):
        return "no Transfer Syntax UID in the file meta (dcmwrite derives the encoding from the dataset)"
    if syntax.is_private or not syntax.is_transfer_syntax:
        return f"private or unknown transfer syntax {syntax}"
    if not syntax.is_little_endian:
        return "big endian transfer syntax"
    if syntax == DeflatedExplicitVRLittleEndian:
        return "deflated transfer syntax"
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        return "preamble is not 128 bytes long (dcmwrite refuses it)"
    if (syntax.is_implicit_VR, True) != ds.original_encoding:
        return (f"the dataset's original encoding {ds.original_encoding} (implicit VR, little endian) differs from "
                f"the transfer syntax's: every element is converted and re-encoded")
    # pydicom's own test in write_dataset: a changed character set re-encodes every text value
    if _reencodes(ds, syntax.is_implicit_VR):
        return "the Specific Character Set differs from the one the dataset was read with: text is re-encoded"
    return None


def _encode_chunks(ds: Dataset) -> list[bytes] | None:
    """The file's bytes in pieces (large values are not copied), or ``None`` when dcmwrite must write it."""
    if fallback_reason(ds) is not None:
        return None
    # dcmwrite's File Format steps, in its order: the element conversions they cause must be the same
    file_meta: FileMetaDataset = copy.deepcopy(ds.file_meta)
    syntax: UID = file_meta.TransferSyntaxUID
    meta_class = file_meta.get("MediaStorageSOPClassUID", None)
    ds_class = ds.get("SOPClassUID", None)
    if meta_class is None or (ds_class and ds_class != meta_class):
        file_meta.MediaStorageSOPClassUID = ds_class
    meta_instance = file_meta.get("MediaStorageSOPInstanceUID", None)
    ds_instance = ds.get("SOPInstanceUID", None)
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        file_meta.MediaStorageSOPInstanceUID = ds_instance
    validate_file_meta(file_meta, enforce_standard=True)
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    _unshare_pixel_data(ds)
    meta = _file_meta_bytes(file_meta) if file_meta else b""
    body = _Encoder(implicit=syntax.is_implicit_VR).dataset(ds, default_encoding)
    return [bytes(preamble), b"DICM", meta, *body]


def _unshare_pixel_data(ds: Dataset) -> None:
    """dcmwrite's Pixel Data step, on a copy of the element where it would change an element object.

    PS3.5 A.4: encapsulated pixel data has an undefined length, native pixel data a defined one; dcmwrite sets
    the element's flag accordingly, in place. De-identification shares the element with the input dataset, so
    where the flag must change, ``ds`` gets a copy with the flag set (the same bytes, the input left alone).
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not isinstance(syntax, UID) or syntax.is_private or not syntax.is_transfer_syntax or "PixelData" not in ds:
        return
    pixels = ds["PixelData"]
    if pixels.is_undefined_length != syntax.is_compressed:
        pixels = copy.copy(pixels)
        pixels.is_undefined_length = syntax.is_compressed
        ds["PixelData"] = pixels


def _file_meta_bytes(file_meta: FileMetaDataset) -> bytes:
    """``write_file_meta_info(fp, file_meta, enforce_standard=True)``: always Explicit VR Little Endian."""
    validate_file_meta(file_meta, enforce_standard=True)
    if "FileMetaInformationGroupLength" not in file_meta:
        file_meta.FileMetaInformationGroupLength = 0  # the real value once the group is encoded
    encoder = _Encoder(implicit=False)
    encoded = b"".join(encoder.dataset(file_meta, default_encoding))
    if "FileMetaInformationGroupLength" in file_meta:
        # its 12 bytes (tag, VR, length, UL value) are not counted
        file_meta.FileMetaInformationGroupLength = len(encoded) - 12
        first = b"".join(encoder.element(0x00020000, file_meta[0x00020000], None))
        encoded = first + encoded[len(first):]  # written over the start, as pydicom does
    return encoded


def _reencodes(ds: Dataset, implicit: bool) -> bool:
    """pydicom's test in ``write_dataset``: whether it converts and re-encodes every element of ``ds``."""
    return (implicit, True) != ds.original_encoding or ds.original_character_set != ds._character_set


class _Encoder:
    """pydicom's ``write_dataset`` and ``write_data_element`` for little endian output, less their per-element cost.

    Raw elements are emitted as header + value bytes; other elements' values are encoded by pydicom's own value
    writers (``filewriter.writers``) into one reused buffer; whatever else (undefined lengths, Pixel Data,
    buffered values, VRs pydicom rejects or turns into UN) is written by ``write_data_element`` itself.
    """

    def __init__(self, implicit: bool) -> None:
        self.implicit = implicit
        self._bytes = io.BytesIO()
        self._sink = DicomIO(self._bytes)
        self._sink.is_implicit_VR, self._sink.is_little_endian = implicit, True
        # write_data_element converts the dataset's character set for every element; once per dataset is enough
        self._encodings: object = None
        self._converted: list[str] = []

    def dataset(self, ds: Dataset, parent_encoding: str | list[str]) -> list[bytes]:
        """The encoded elements of ``ds``, as ``write_dataset(fp, ds, parent_encoding)`` writes them."""
        elements = ds._dict  # read directly, as get_item does (pinned pydicom version, see _PYDICOM)
        convert = False
        if _reencodes(ds, self.implicit):
            # write_dataset's road for an item read in another encoding or character set: every element converted
            ds = correct_ambiguous_vr(ds, True)
            convert = True
        encodings = ds.get("SpecificCharacterSet", parent_encoding)
        chunks: list[bytes] = []
        for tag in sorted(elements, key=int):  # int order, without BaseTag's Python-level comparisons
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                continue  # retired group lengths are not written (PS3.5 7.2)
            elem = elements[tag]
            if type(elem) is RawDataElement:
                value = elem.value
                if (not convert and type(value) is bytes and elem.length != _UNDEFINED_LENGTH
                        and (header := self._header(elem.tag, elem.VR, len(value))) is not None):
                    chunks += (header, value)
                    continue
                # as get_item / __getitem__ would: a deferred value is read, or every element converted
                elem = ds[tag] if convert or value is None else elem
            chunks += self.element(tag, elem, encodings)
        return chunks

    def element(self, tag: int, elem: DataElement | RawDataElement, encodings: str | list[str] | None) -> list[bytes]:
        """``write_data_element(fp, elem, encodings)`` (``tag`` is the dataset's key, for error messages)."""
        try:
            encoded = None if isinstance(elem, RawDataElement) else self._data_element(elem, encodings)
        except Exception:
            with tag_in_exception(tag):  # pydicom's wrapping of the error, naming the element
                raise
        if encoded is not None:
            return encoded
        buffer = DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = self.implicit, True
        with tag_in_exception(tag):
            write_data_element(buffer, elem, encodings)
        return [buffer.getvalue()]

    def _data_element(self, elem: DataElement, encodings: str | list[str] | None) -> list[bytes] | None:
        """``write_data_element`` of a ``DataElement``, or ``None`` where it needs pydicom's own."""
        vr = elem.VR
        if (vr not in writers or elem.is_undefined_length or elem.tag == _PIXEL_DATA
                or (vr != VR.SQ and elem.is_buffered)):
            return None
        if encodings is not self._encodings or encodings is None:
            self._converted = convert_encodings(encodings or [default_encoding])
            self._encodings = encodings
        converted = self._converted
        if vr == VR.SQ:
            return self._sequence(elem, converted)
        if elem.is_empty:
            value = b""
        else:
            self._bytes.seek(0)
            self._bytes.truncate()
            write, param = writers[vr]
            if vr in CUSTOMIZABLE_CHARSET_VR:
                write(self._sink, elem, encodings=converted)
            elif param is not None:
                write(self._sink, elem, param)
            else:
                write(self._sink, elem)
            value = self._bytes.getvalue()
        header = self._header(elem.tag, vr, len(value))
        return None if header is None else [header, value]

    def _sequence(self, elem: DataElement, encodings: list[str]) -> list[bytes] | None:
        """A defined-length sequence: ``write_sequence`` and ``write_sequence_item`` for its items."""
        items = elem.value or ()
        if not all(isinstance(item, Dataset) for item in items):
            return None
        body: list[bytes] = []
        for item in items:
            content = self.dataset(item, encodings)
            if getattr(item, "is_undefined_length_sequence_item", False):
                body += (_ITEM_UNDEFINED, *content, _ITEM_DELIMITER)
            else:
                body += (_IMPLICIT_HEADER(0xFFFE, 0xE000, sum(map(len, content))), *content)
        return [self._header(elem.tag, VR.SQ, sum(map(len, body))), *body]

    def _header(self, tag: int, vr: str | None, length: int) -> bytes | None:
        """The tag, VR and length pydicom writes before a value, or ``None`` where its rules need pydicom."""
        group, element = tag >> 16, tag & 0xFFFF
        if self.implicit:
            return _IMPLICIT_HEADER(group, element, length)
        code = _VR_CODES.get(vr)
        if code is None:
            return None  # no, ambiguous or unknown VR: pydicom raises or writes it its own way
        vr_bytes, long_length = code
        if long_length:
            return _LONG_HEADER(group, element, vr_bytes, 0, length)
        if length > 0xFFFF:
            return None  # PS3.5 6.2.2: pydicom warns and writes the element as UN
        return _SHORT_HEADER(group, element, vr_bytes, length)
