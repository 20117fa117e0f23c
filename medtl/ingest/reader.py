"""Read, validate and decode one DICOM file into a model-ready float array.

Every failure is raised as :class:`RejectedFile`, whose message is the precise quarantine reason
recorded in the ledger, so a person can tell from the ledger alone what is wrong with a file.

The array convention is the manifest's: ``float32``, shape ``(1, S, S)`` (or ``(1, S, S, S)`` for a
multi-frame volume), values in [0, 1], bright = dense.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

MIN_SIDE, MAX_SIDE = 8, 16384
WINDOW_PERCENTILES = (0.5, 99.5)


class RejectedFile(Exception):
    """A file that cannot be ingested; ``str(exc)`` is the quarantine reason."""


def read_dataset(path: Path) -> Dataset:
    """Parse a DICOM file, also accepting datasets written without the Part 10 preamble or file meta.

    Args:
        path: the file.

    Returns:
        The parsed dataset (pixel data included) with a Transfer Syntax UID in its file meta.

    Raises:
        RejectedFile: when the file is not DICOM or cannot be parsed.
    """
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        ds = _read_raw_dataset(path)
        if ds is None:
            raise RejectedFile("not a DICOM file (no DICM preamble and no valid dataset): "
                               f"InvalidDicomError: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "unreadable"
        raise RejectedFile(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # without file meta the encoding the parser detected is the transfer syntax
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _read_raw_dataset(path: Path) -> Dataset | None:
    """Old exports omit the 128-byte preamble and file meta; keep them only if they hold an image."""
    try:
        ds = pydicom.dcmread(path, force=True)
        return ds if "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds) else None
    except Exception:  # forced parsing of a non-DICOM file fails in arbitrary ways
        return None


def validate(ds: Dataset, spatial_dims: int) -> None:
    """Check that ``ds`` holds one decodable grayscale image of the expected dimensionality.

    Args:
        ds: dataset from :func:`read_dataset`.
        spatial_dims: 2 for single-frame images, 3 for multi-frame volumes.

    Raises:
        RejectedFile: naming the offending attribute.
    """
    if "PixelData" not in ds:
        raise RejectedFile("no PixelData element (0x7FE0,0x0010)")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not all(isinstance(v, int) and MIN_SIDE <= v <= MAX_SIDE for v in (rows, columns)):
        raise RejectedFile(f"implausible image size Rows={rows!r}, Columns={columns!r} "
                           f"(each must be between {MIN_SIDE} and {MAX_SIDE})")
    samples = ds.get("SamplesPerPixel", 1)
    if samples != 1:
        raise RejectedFile(f"SamplesPerPixel={samples}: only single-channel (grayscale) images are supported")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RejectedFile(f"PhotometricInterpretation {photometric!r} is not MONOCHROME1/MONOCHROME2")
    frames = _n_frames(ds)
    if spatial_dims == 2 and frames != 1:
        raise RejectedFile(f"multi-frame image (NumberOfFrames={frames}) but ingest.spatial_dims is 2")
    if spatial_dims == 3 and frames < 2:
        raise RejectedFile("single-frame image but ingest.spatial_dims is 3 (expects a multi-frame volume)")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise RejectedFile("BurnedInAnnotation is YES: the pixels may show identifying text, which header "
                           "de-identification cannot remove; clean the pixels before ingesting")
    bits = ds.get("BitsAllocated")
    if bits not in (1, 8, 16, 32, 64):
        raise RejectedFile(f"unsupported BitsAllocated={bits!r}")
    if not _transfer_syntax(ds).is_encapsulated:
        expected = math.ceil(rows * columns * frames * bits / 8)
        actual = len(ds.PixelData)
        # an odd-length value is padded with one byte
        if actual < expected:
            raise RejectedFile(f"truncated: pixel data length {actual} != expected {expected} "
                               f"(Rows {rows} x Columns {columns} x frames {frames} x {bits} bits)")
        if actual > expected + 1:
            raise RejectedFile(f"pixel data length {actual} != expected {expected} "
                               f"(Rows {rows} x Columns {columns} x frames {frames} x {bits} bits)")


def _n_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise RejectedFile(f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from exc


def _transfer_syntax(ds: Dataset) -> UID:
    return UID(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))


def decode(ds: Dataset) -> np.ndarray:
    """Decode the pixels to modality values oriented so that bright = dense.

    Applies the Modality LUT (rescale slope/intercept or LUT sequence) and inverts MONOCHROME1,
    whose stored values run the other way.

    Args:
        ds: a dataset that passed :func:`validate`.

    Returns:
        ``float64`` array ``(rows, columns)`` or ``(frames, rows, columns)``.

    Raises:
        RejectedFile: when the pixel data cannot be decoded or does not match the header.
    """
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder plugins raise their own types
        raise RejectedFile(f"cannot decode pixel data ({_transfer_syntax(ds).name}): "
                           f"{type(exc).__name__}: {exc}") from exc
    frames = _n_frames(ds)
    declared = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
    if stored.shape != declared:
        raise RejectedFile(f"decoded pixel array shape {stored.shape} != declared {declared}")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = -values
    if not np.isfinite(values).all():
        raise RejectedFile("pixel values are not finite after the modality LUT (check RescaleSlope/Intercept)")
    return values


def window(values: np.ndarray) -> np.ndarray:
    """Robust windowing to [0, 1] between the 0.5th and 99.5th percentile.

    Args:
        values: modality values, bright = dense.

    Returns:
        Array of the same shape in [0, 1].

    Raises:
        RejectedFile: when the image is blank (a single value).
    """
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    if high <= low:
        # a few bright pixels on a flat image: fall back to the full range
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise RejectedFile(f"blank image: every pixel has the value {low:g}")
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Zero-pad every axis to the longest one, centred, so that resizing keeps the aspect ratio.

    Zero is "no density" (air) after :func:`window`, which is what lies outside a radiograph.

    Args:
        image: 2D or 3D array.

    Returns:
        Square (cubic) array.
    """
    side = max(image.shape)
    pads = [((side - n) // 2, side - n - (side - n) // 2) for n in image.shape]
    return np.pad(image, pads)


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


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased linear resize of every axis to ``size``.

    Args:
        image: 2D or 3D array.
        size: output length of every axis.

    Returns:
        ``float32`` array of shape ``(size,) * image.ndim``.
    """
    out = image.astype(np.float32)
    for axis in range(image.ndim):
        index, weights = _resize_taps(out.shape[axis], size)
        moved = np.moveaxis(out, axis, 0)
        weights = weights.reshape(*weights.shape, *([1] * (moved.ndim - 1)))
        out = np.moveaxis((moved[index] * weights).sum(axis=1), 0, axis)
    return np.ascontiguousarray(out)


def preprocess(values: np.ndarray, size: int) -> np.ndarray:
    """Window, pad to square, resize and add the channel axis.

    Args:
        values: output of :func:`decode`.
        size: side length of the stored array.

    Returns:
        ``float32`` array ``(1, size, size)`` (or ``(1, size, size, size)``) in [0, 1].
    """
    image = resize(pad_to_square(window(values)), size)
    return np.clip(image, 0.0, 1.0)[None]
