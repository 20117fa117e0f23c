"""A lean DICOM parser that returns exactly what ``pydicom.dcmread`` returns for common files, or ``None``.

Why it exists: pydicom's ``data_element_generator`` reads every element through generic file-like calls
(``read``, ``tell``, ``seek``, an unpack, debug checks), and GE MR files carry ~340 top-level elements, so
parsing was the largest Python cost of an ingestion worker. Here the top-level elements are located with
``struct.unpack_from`` on the bytes already in memory and built as the ``RawDataElement`` objects pydicom
builds; every value is still converted by pydicom, when and as it would be. On the 686-file benchmark corpus
(pydicom-data + dcm_qa_nih, one core): parsing 0.53 → 0.27 s CPU, ``reader.read_dataset`` 0.88 → 0.61 s,
``volume.read_header`` (40 tags, values over 1 KiB deferred) 0.60 → 0.21 s.

Guarantee: :func:`parse` returns a ``FileDataset`` equal to
``dcmread(io.BytesIO(data), defer_size=defer_size, specific_tags=specific_tags)`` — same preamble, file meta
(with the same elements converted), original encoding and character set, same keys in the same order, and
for every element the same object kind (``RawDataElement``, or ``DataElement`` for undefined-length
sequences), tag, VR, length, value (or deferral) and value position — or ``None``, and then the caller uses
``dcmread``, which reads, repairs or refuses the file in its own words. It parses only what it fully
understands and never guesses:

* Part 10 files (128-byte preamble, ``DICM``, PS3.10 7.1) whose File Meta Information (explicit VR little
  endian) declares implicit VR little endian or an explicit VR little endian syntax, native or encapsulated
  (PS3.5 A.1, A.2, A.4); big endian, deflate, pydicom's private syntaxes, a missing Transfer Syntax UID,
  a command set, an empty dataset, a dataset whose first element is not in the declared VR encoding
  (pydicom switches and warns), an unknown VR, an odd or overrunning length, an element header cut by the
  end of the file, an item or delimiter outside a sequence all give ``None``;
* elements of defined length (PS3.5 7.1) are located here and become ``RawDataElement`` objects as pydicom's
  generator makes them (empty values: ``empty_value_for_VR(vr, raw=True)``; values over ``defer_size``
  bytes deferred, except SpecificCharacterSet);
* elements of undefined length (sequences, PS3.5 7.5; encapsulated pixel data, A.4; UN holding a sequence,
  6.2.2) are handed to pydicom's own ``read_sequence`` / ``read_undefined_length_value`` at the value,
  with the VR decided as pydicom decides it (UN → SQ, dictionary VR, private tags that start with an
  item) and the character set read so far, and parsing continues where pydicom leaves the stream.

Any exception while parsing (pydicom's, ``struct.error``, a recursion limit) gives ``None``: ``dcmread``
then meets the same problem and raises or warns as before, so a damaged file gets the same quarantine reason.
"""

from __future__ import annotations

import io
import struct
from collections.abc import MutableSequence

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast  # the lookup pydicom's generator uses (same repeaters rule)
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import BaseTag, SequenceDelimiterTag
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian,
                         PrivateTransferSyntaxes)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

CHARSET = 0x00080005
"""SpecificCharacterSet: kept whatever ``specific_tags`` says, and never deferred (as by dcmread)."""

_UNDEFINED = 0xFFFFFFFF
_ITEM_BYTES = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_PREFIX_END = 132  # 128-byte preamble + "DICM"
_VR_NAMES = {vr.encode(): str(vr) for vr in VR if len(vr) == 2}
_LONG_VRS = {raw: name for raw, name in _VR_NAMES.items() if name in EXPLICIT_VR_LENGTH_32}  # 4-byte length
_SHORT_VRS = {raw: name for raw, name in _VR_NAMES.items() if name not in EXPLICIT_VR_LENGTH_32}  # 2-byte length
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length
_IMPLICIT = struct.Struct("<HHL")  # group, element, 4-byte length
_LENGTH = struct.Struct("<L")
_TAGS: dict[int, BaseTag] = {}  # BaseTag objects shared between datasets: immutable, and cheaper to look up than make
_TAGS_MAX = 1 << 16  # a file of random private tags must not grow it without bound


class _Unsupported(Exception):
    """Something left to dcmread: another encoding, a quirk, or a damaged file."""


def parse(data: bytes, *, specific_tags: frozenset[int] | None = None, defer_size: int | None = None,
          path: str | None = None) -> FileDataset | None:
    """``pydicom.dcmread(io.BytesIO(data), defer_size=defer_size, specific_tags=specific_tags)``, or ``None``.

    Args:
        data: a whole Part 10 file.
        specific_tags: tags (as ints) of the top-level elements to keep (SpecificCharacterSet is always
            kept); ``None`` or empty keeps every element.
        defer_size: values longer than this many bytes are not read into the dataset but read on first
            access (from ``path`` when given, else from an in-memory buffer of ``data``); ``None`` reads all.
        path: the file ``data`` was read from: the dataset then equals ``dcmread(path, ...)`` instead
            (``filename`` is ``path``, deferred values are read from it and must still be there).

    Returns:
        The dataset, or ``None`` when the file is not one this parser fully understands (see the module
        docstring); the caller then uses ``dcmread``.

    Raises:
        TypeError: when ``data`` is not ``bytes``, ``specific_tags`` not a set of ints, ``defer_size`` not
            an int, or ``path`` not a string.
        ValueError: when ``defer_size`` is negative.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"parse: data must be bytes (the whole file), not {type(data).__name__}; "
                        "pass bytes(data) or path.read_bytes()")
    if specific_tags is not None and not (isinstance(specific_tags, (set, frozenset))
                                          and all(isinstance(t, int) for t in specific_tags)):
        raise TypeError("parse: specific_tags must be a frozenset of int tags such as 0x00100010, "
                        f"not {type(specific_tags).__name__}; convert keywords with pydicom.tag.Tag")
    if defer_size is not None and (not isinstance(defer_size, int) or isinstance(defer_size, bool)):
        raise TypeError(f"parse: defer_size must be an int number of bytes or None, not {type(defer_size).__name__}")
    if defer_size is not None and defer_size < 0:
        raise ValueError(f"parse: defer_size must be >= 0 bytes, not {defer_size}")
    if path is not None and not isinstance(path, str):
        raise TypeError(f"parse: path must be a str, not {type(path).__name__}; pass str(path)")
    try:
        return _parse(data, frozenset(specific_tags) | {CHARSET} if specific_tags else None, defer_size, path)
    except Exception:  # _Unsupported, struct.error on a cut header, or whatever pydicom raises on odd values
        return None


def _parse(data: bytes, wanted: frozenset[int] | None, defer_size: int | None, path: str | None) -> FileDataset:
    """:func:`parse` after its checks.

    Raises:
        _Unsupported: naming what is left to dcmread; or whatever pydicom or ``struct`` raise on the file.
    """
    if data[128:_PREFIX_END] != b"DICM":
        raise _Unsupported("no DICM prefix")  # dcmread (without force) refuses the file in its own words
    file_meta, start = _file_meta(data)
    syntax = file_meta.get("TransferSyntaxUID")  # converted here, as read_partial converts it
    if not isinstance(syntax, str):
        raise _Unsupported("no Transfer Syntax UID")  # dcmread guesses the encoding
    if syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian) or syntax in PrivateTransferSyntaxes:
        raise _Unsupported(f"transfer syntax {syntax}")
    if len(data) - start < 8:
        raise _Unsupported("no dataset after the file meta")
    implicit = syntax == ImplicitVRLittleEndian  # any other syntax is explicit VR little endian (PS3.5 A.4)
    if data[start:start + 2] == b"\0\0":
        raise _Unsupported("command set")
    first_vr = data[start + 4:start + 6]
    if implicit == (0x40 < first_vr[0] < 0x5B and 0x40 < first_vr[1] < 0x5B):
        raise _Unsupported("dataset not in the declared VR encoding")  # dcmread switches and warns
    stream = io.BytesIO(data)  # pydicom's own readers work on it for values of undefined length
    if path is not None:
        stream.name = path  # their warnings name the file, as when dcmread opens it
    elements = _elements(data, start, implicit, wanted, defer_size, stream)
    # the rest is read_dataset's and read_partial's epilogue, call for call (each conversion may warn)
    dataset = Dataset(elements, parent_encoding=default_encoding)
    encoding: str | MutableSequence[str] = default_encoding
    if CHARSET in elements:
        encoding = convert_encodings(convert_raw_data_element(elements[BaseTag(CHARSET)]).value)
    dataset.set_original_encoding(implicit, True, encoding)
    stream.seek(len(data))  # where dcmread leaves its buffer
    ds = FileDataset(path if path is not None else stream, dataset, data[:128], file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)  # converts SpecificCharacterSet in place
    return ds


def _file_meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """The File Meta Information (group 0002, explicit VR little endian, PS3.10 7.1) and where the dataset starts.

    Its elements are converted where ``_read_file_meta_info`` converts them (the first one, the group
    length), so that raw and converted elements match dcmread's.
    """
    pos, end = _PREFIX_END, len(data)
    elements: dict[BaseTag, RawDataElement] = {}
    while pos + 8 <= end:
        group, element, raw_vr, length = _EXPLICIT.unpack_from(data, pos)
        if group != 0x0002:
            break
        if raw_vr in _LONG_VRS:
            length, value_pos = _LENGTH.unpack_from(data, pos + 8)[0], pos + 12
        elif raw_vr in _SHORT_VRS:
            value_pos = pos + 8
        else:
            raise _Unsupported("file meta not in explicit VR")
        if length == _UNDEFINED or length & 1 or value_pos + length > end:
            raise _Unsupported("file meta element of undefined, odd or overrunning length")
        tag, vr = BaseTag(group << 16 | element), _VR_NAMES[raw_vr]
        value = data[value_pos:value_pos + length] if length else empty_value_for_VR(vr, raw=True)
        elements[tag] = RawDataElement(tag, vr, length, value, value_pos, False, True)
        pos = value_pos + length
    file_meta = FileMetaDataset(elements)
    file_meta.set_original_encoding(False, True, default_encoding)
    if elements:
        file_meta[next(iter(elements))]  # read_partial's test that the meta is explicit VR
        if "FileMetaInformationGroupLength" in file_meta:
            file_meta.FileMetaInformationGroupLength  # read_partial compares it with the actual length
    return file_meta, pos


def _elements(data: bytes, pos: int, implicit: bool, wanted: frozenset[int] | None, defer_size: int | None,
              stream: io.BytesIO) -> dict[BaseTag, RawDataElement | DataElement]:
    """The top-level elements from ``pos`` to the end of ``data``, as pydicom's ``data_element_generator``.

    Raises:
        _Unsupported, struct.error: on anything left to dcmread (see the module docstring).
    """
    end = len(data)
    # local names and one test for all rare cases: this loop runs once per element of every file
    unpack_explicit, unpack_implicit, unpack_length = _EXPLICIT.unpack_from, _IMPLICIT.unpack_from, _LENGTH.unpack_from
    short_vrs, long_vrs, undefined, charset = _SHORT_VRS, _LONG_VRS, _UNDEFINED, CHARSET
    new_tuple, raw_element, tags = tuple.__new__, RawDataElement, _TAGS  # a RawDataElement without its __new__
    keep_all = wanted is None
    defer = _UNDEFINED if defer_size is None else defer_size  # no defined length exceeds 0xFFFFFFFF
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    encoding: str | MutableSequence[str] = default_encoding  # the generator's: passed to the sequences it reads
    while pos < end:
        # a header cut by the end of the file makes unpack_from raise struct.error
        if implicit:
            group, element, length = unpack_implicit(data, pos)
            vr, value_pos = None, pos + 8
        else:
            group, element, raw_vr, length = unpack_explicit(data, pos)
            vr = short_vrs.get(raw_vr)
            if vr is not None:
                value_pos = pos + 8
            else:
                vr = long_vrs.get(raw_vr)
                if vr is None:
                    raise _Unsupported("unknown VR, or a switch to implicit VR")  # dcmread guesses; leave it to it
                length, value_pos = unpack_length(data, pos + 8)[0], pos + 12
        next_pos = value_pos + length
        tag = group << 16 | element
        if group == 0xFFFE or length & 1 or next_pos > end:
            if group == 0xFFFE:
                raise _Unsupported("item or delimiter outside a sequence")  # dcmread stops or misreads
            if length != undefined:
                raise _Unsupported("odd or overrunning length")
            pos = _undefined_length(data, tag, vr, value_pos, implicit, wanted, defer_size, encoding, stream, elements)
            continue
        if keep_all or tag in wanted:
            if length > defer or not length or tag == charset:
                if length > defer and tag != charset:
                    value = None  # deferred: pydicom reads it from value_tell when first accessed
                else:
                    value = data[value_pos:next_pos] if length else empty_value_for_VR(vr, raw=True)
                if tag == charset:
                    encoding = convert_encodings(convert_string(value or b"", True))
            else:
                value = data[value_pos:next_pos]
            key = tags.get(tag)
            if key is None:
                key = BaseTag(tag)
                if len(tags) < _TAGS_MAX:
                    tags[tag] = key
            elements[key] = new_tuple(raw_element, (key, vr, length, value, value_pos, implicit, True, True, False))
        pos = next_pos
    return elements


def _undefined_length(data: bytes, tag: int, vr: str | None, value_pos: int, implicit: bool,
                      wanted: frozenset[int] | None, defer_size: int | None, encoding: str | MutableSequence[str],
                      stream: io.BytesIO, elements: dict[BaseTag, RawDataElement | DataElement]) -> int:
    """Read an undefined-length element as pydicom's generator does; the position after its delimiter."""
    if vr == VR.UN and config.settings.infer_sq_for_un_vr:
        vr = VR.SQ  # PS3.5 6.2.2: UN of undefined length holds a sequence in implicit VR
    if vr is None or vr == VR.UN and config.replace_un_with_known_vr:
        try:
            vr = _dictionary_vr_fast(tag)
        except KeyError:  # private: a sequence if it starts with an item
            head = data[value_pos:value_pos + 4]
            if len(head) < 4:
                raise _Unsupported("file ends after an undefined length") from None
            if head == _ITEM_BYTES:
                vr = VR.SQ
    stream.seek(value_pos)
    key = BaseTag(tag)
    keep = wanted is None or tag in wanted
    if vr == VR.SQ:
        sequence = read_sequence(stream, implicit, True, _UNDEFINED, encoding)
        if keep:
            elements[key] = DataElement(key, vr, sequence, value_pos, is_undefined_length=True)
    else:  # encapsulated pixel data (PS3.5 A.4), or a value ended by a sequence delimiter
        value = read_undefined_length_value(stream, True, SequenceDelimiterTag, defer_size)
        if keep:
            elements[key] = RawDataElement(key, vr, _UNDEFINED, value, value_pos, implicit, True)
    return stream.tell()
