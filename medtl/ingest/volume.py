"""Series → volume: group DICOM slices into series, order them in space, check the geometry, write NIfTI.

A *slice* is one 2D image with its own position: a single-frame file, one frame of an enhanced
multi-frame file, or one tile of a Siemens mosaic or a UIH VFRAME image. Slices are grouped by study, series
and every acquisition attribute that must not be mixed in one array (orientation, matrix, pixel spacing,
echo, image type; diffusion weightings stay together as the volumes of one series); each group is sorted
along the slice normal, checked for missing, duplicated and unevenly spaced slices, and written as NIfTI-1
with dcm2niix's sidecars: ``.json`` (BIDS fields), and ``.bval``/``.bvec`` for a diffusion series.

Geometry follows DICOM PS3.3 C.7.6.2.1.1: the centre of pixel (row ``r``, column ``c``) lies at
``IPP + c·Δc·X + r·Δr·Y`` (LPS, mm), where ``X, Y`` are the row and column direction cosines of
ImageOrientationPatient and ``PixelSpacing = (Δr, Δc)``. The slice normal is ``X × Y``.

The NIfTI layout is dcm2niix's (Li et al., J Neurosci Methods 264:47-56, 2016), checked voxel for
voxel against its output on dcm_qa_nih: data axes ``(column, row reversed, slice ascending along the
normal[, volume])``, sform = qform (code 1, scanner) in RAS, the stored integers kept with
``scl_slope``/``scl_inter`` taken from RescaleSlope/RescaleIntercept (Philips: its floating-point scaling,
dcm2niix's default), unsigned data with BitsStored < 16 stored as ``int16``, pixdim[4] the repetition time in
seconds. 3D acquisitions keep their acquisition layout: dcm2niix's ``-x i`` (by default dcm2niix reorients
them to the nearest canonical axes, the same voxels in the same place). Vendor-specific sources:
:mod:`medtl.ingest.vendor`.

Headers are read by :mod:`medtl.ingest.fastparse`, which gives exactly what
``pydicom.dcmread(..., specific_tags=HEADER_TAGS)`` gives, in a fraction of the time, and leaves every file it
does not fully understand to ``dcmread`` (:func:`read_header`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medtl import __version__
from medtl.ingest import fastparse, vendor
from medtl.ingest.reader import RejectedFile, decode_failure, effective_vr
from medtl.config import PhilipsScaling
from medtl.ingest.vendor import PHILIPS_SCALINGS

with warnings.catch_warnings():
    # nibabel.nicom warns that its DICOM *readers* are experimental; only the CSA header parser is used here
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

POSITION_TOLERANCE_MM = 0.01
"""Slices whose positions along the normal differ by less than this are at the same position."""
SPACING_TOLERANCE = 0.01
"""Relative tolerance of slice spacing (plus ``POSITION_TOLERANCE_MM``): 1 % of the spacing."""
_ORIENTATION_DECIMALS = 3  # direction cosines equal to 1e-3 (~0.06°) belong to one stack
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TEXT_VRS = {"IS", "DS", "CS", "UI"}

# Only these elements are parsed; PixelData is deferred (read when first accessed), so each file is
# parsed once and its pixels are read without parsing it again.
HEADER_TAGS: tuple[str | int, ...] = (
    "SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "ImageType", "InstanceNumber", "AcquisitionNumber", "TemporalPositionIdentifier",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
    "EchoNumbers", "EchoTime", "RepetitionTime", "DiffusionBValue", "InPlanePhaseEncodingDirection",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "DiffusionGradientOrientation", "DiffusionDirectionality", *vendor.SIDECAR_KEYWORDS,
    0x00290010, 0x00290011, 0x00290012, 0x00291010, 0x00291110, 0x00291210,  # Siemens CSA image header
    *vendor.PRIVATE_CREATORS, *(spec.tag for spec in vendor.PRIVATE_TAGS.values()),
    "PixelData",
)


class RejectedSeries(Exception):
    """A series that cannot be written as a volume; ``str(exc)`` is the reason, ``findings`` the evidence."""

    def __init__(self, reason: str, findings: Sequence[Finding] = ()) -> None:
        super().__init__(reason)
        self.findings = tuple(findings)


@dataclass(frozen=True)
class Finding:
    """One observation about a series' geometry.

    Attributes:
        code: stable identifier (``duplicate_dropped``, ``conflicting_images``, ``missing_slices``,
            ``uneven_spacing``, ``not_collinear``, ``sheared``, ``rescale_varies``).
        message: what was seen, where, and what it means for the output.
        blocking: True when the series is not written because of it.
    """

    code: str
    message: str
    blocking: bool

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class SliceHeader:
    """The attributes of one slice that grouping, ordering and geometry need.

    Attributes:
        path: the file.
        frame: frame (enhanced multi-frame) or tile (mosaic) index in the file; ``None`` = the whole file.
        position: LPS position (mm) of the slice's first pixel centre; ``None`` without geometry.
        orientation: the 6 direction cosines (row direction, then column direction).
        pixel_spacing: (between rows, between columns) in mm.
        rows, columns: size of the slice (of one tile for a mosaic).
        mosaic_tiles: number of slices tiled in a Siemens mosaic or a UIH VFRAME image (0 otherwise).
        mosaic_grid: (tiles down, tiles across) of such an image.
        rescale: (RescaleSlope, RescaleIntercept) of this slice: the display scaling.
        philips_scale_slope: Philips' MR scale slope SS (2005,100E), for the floating-point scaling.
        b_value: diffusion b-value (s/mm²), public or the vendor's private element.
        gradient: unit diffusion gradient direction; ``None`` for b = 0 or isotropic images.
        gradient_frame: ``patient`` (LPS), ``image`` (UIH: read, phase, slice) or ``ge`` (GE's logical frame).
        isotropic: a derived isotropic (trace) diffusion image.
        bits_stored: BitsStored, which decides the NIfTI integer type.
        sidecar: the BIDS sidecar fields (:func:`medtl.ingest.vendor.sidecar_fields`; not compared).
        dataset: the parsed header with deferred pixel data (not compared).
    """

    path: Path
    frame: int | None
    study_uid: str
    series_uid: str
    series_number: int | None
    series_description: str
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    echo_number: int | None
    echo_time: float | None
    b_value: float | None
    instance_number: int | None
    acquisition_number: int | None
    temporal_position: int | None
    rescale: tuple[float, float]
    repetition_time_ms: float | None
    phase_direction: str
    mosaic_tiles: int = 0
    mosaic_grid: tuple[int, int] = (0, 0)
    philips_scale_slope: float | None = None
    gradient: tuple[float, float, float] | None = None
    gradient_frame: Literal["patient", "image", "ge"] = "patient"
    isotropic: bool = False
    bits_stored: int | None = None
    sidecar: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    dataset: Dataset | None = field(default=None, compare=False, repr=False)

    @property
    def has_geometry(self) -> bool:
        return self.position is not None and self.orientation is not None and self.pixel_spacing is not None

    @functools.cached_property  # asked for once per slice and per comparison while grouping and sorting
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row cosines × column cosines`` (LPS)."""
        row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        n = np.cross(row, col)
        return n / np.linalg.norm(n)

    @property
    def time_key(self) -> tuple:
        """Orders repeated images at one position: volume (temporal position, acquisition), then instance."""
        return (self.temporal_position or 0, self.acquisition_number or 0, self.instance_number or 0,
                self.frame or 0, str(self.path))


@dataclass(frozen=True)
class SeriesGroup:
    """Slices that belong in one array.

    Attributes:
        key: the grouping key (study, series, orientation, matrix, spacing, echo, image type).
        headers: the slices, in file order.
        part: 0 when the series is not split, else 1, 2, … for each of its groups.
        split_by: names of the attributes that differ between the groups of this series.
    """

    key: tuple
    headers: tuple[SliceHeader, ...]
    part: int = 0
    split_by: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(h.path for h in self.headers))

    def describe(self) -> str:
        first = self.headers[0]
        text = f"series {first.series_number}" + (f" {first.series_description!r}" if first.series_description else "")
        if self.part:
            text += f" part {self.part} (split by {', '.join(self.split_by)})"
        return text


@dataclass(frozen=True)
class Volume:
    """A 3D or 4D array on a regular grid.

    Attributes:
        data: stored values, NIfTI axis order ``(X columns, Y rows reversed, Z slices[, T volumes])``.
        affine: 4×4 voxel index → RAS mm.
        scaling: (slope, intercept) turning ``data`` into modality values (NIfTI scl_slope/scl_inter).
        scaling_source: where ``scaling`` comes from: ``rescale`` (RescaleSlope/Intercept, the display values),
            ``philips_precise`` (Philips' floating-point values); ``…_per_slice`` when it differed between
            slices and ``data`` holds the scaled values as float32.
        findings: non-blocking observations (dropped duplicates, shear, …).
        dropped_files: files left out entirely because every slice in them duplicates a kept one.
        duplicate_of: for each dropped file, the kept file whose pixels it repeats.
        derived_files: files left out because they hold only derived isotropic (trace) diffusion images.
        repetition_time_s: the repetition time (NIfTI pixdim[4], as dcm2niix also writes for 3D volumes).
        phase_axis: data axis (0 or 1) of the in-plane phase-encoding direction, when known.
        diffusion: per volume, ``(b-value, bvec)`` in the image frame (``.bval``/``.bvec``); ``None`` when no
            slice records a b-value.
        sidecar: the BIDS JSON sidecar's fields (``.json``).
    """

    data: np.ndarray
    affine: np.ndarray
    scaling: tuple[float, float] = (1.0, 0.0)
    scaling_source: str = "rescale"
    findings: tuple[Finding, ...] = ()
    dropped_files: tuple[Path, ...] = ()
    duplicate_of: Mapping[Path, Path] = field(default_factory=dict)
    derived_files: tuple[Path, ...] = ()
    repetition_time_s: float | None = None
    phase_axis: int | None = None
    diffusion: tuple[tuple[float, tuple[float, float, float]], ...] | None = None
    sidecar: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesOutcome:
    """What :func:`series_to_nifti` did with one group of files.

    Attributes:
        status: ``written``; ``rejected`` (a volume that cannot be written, ``reason`` says why);
            ``not_volume`` (2D images: one position, or no geometry; handle them as 2D);
            ``unreadable`` (one file whose header could not be read).
        files: the input files of the group.
        nifti: the written file (``written`` only).
        reason: why nothing was written (empty when written).
        findings: every finding, blocking or not.
        dropped_files: exact duplicates left out of the written volume.
        group: the group (``None`` for ``unreadable``).
    """

    status: Literal["written", "rejected", "not_volume", "unreadable"]
    files: tuple[Path, ...]
    nifti: Path | None = None
    reason: str = ""
    findings: tuple[Finding, ...] = ()
    dropped_files: tuple[Path, ...] = ()
    group: SeriesGroup | None = None


# ----------------------------------------------------------------------------------------------
# reading headers


def read_header(path: Path) -> Dataset:
    """The :data:`HEADER_TAGS` of a DICOM file, as ``dcmread(path, defer_size=1024, specific_tags=HEADER_TAGS)``.

    pydicom's generic parser walks every element of a file in Python, several microseconds each; GE MR
    files carry ~340 top-level elements, mostly private, of which a volume needs ~40. Files are therefore
    parsed by :func:`medtl.ingest.fastparse.parse` (the same dataset, faster), and every file it leaves
    aside by ``dcmread``, so that odd files are read, or refused, as before.

    Args:
        path: a DICOM file (Part 10: preamble and ``DICM`` prefix).

    Returns:
        The dataset: the elements of ``HEADER_TAGS`` present in the file and SpecificCharacterSet,
        values over 1024 bytes (PixelData) read from the file on first access.

    Raises:
        RejectedFile: when the file cannot be read or parsed.
    """
    try:
        ds = _lean_header(path)
    except OSError:  # dcmread meets it too, and words it as before
        ds = None
    if ds is not None:
        return ds
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_SIZE, specific_tags=list(HEADER_TAGS))
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "unreadable"
        raise RejectedFile(f"unreadable DICOM header: {type(exc).__name__}: {exc}") from exc


_DEFER_SIZE = 1024  # dcmread's defer_size: longer values are read from the file on first access
_LEAN_MAX_BYTES = 64 * 1024**2  # larger files (big multi-frames) are streamed by dcmread, not read whole
_WANTED = frozenset(int(Tag(t)) for t in HEADER_TAGS)


def _lean_header(path: Path) -> FileDataset | None:
    """``dcmread(path, defer_size=1024, specific_tags=HEADER_TAGS)`` by :func:`fastparse.parse`, or ``None``.

    Args:
        path: the file.

    Returns:
        The dataset, or ``None`` for a file over 64 MiB or one that ``fastparse`` leaves to ``dcmread``.

    Raises:
        OSError: when the file cannot be read.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > _LEAN_MAX_BYTES:
            return None
        data = f.read()
    return fastparse.parse(data, specific_tags=_WANTED, defer_size=_DEFER_SIZE, path=str(path))


def read_slice_headers(path: Path, ds: Dataset | None = None) -> list[SliceHeader]:
    """Parse one file's header into its slices (one per file, per enhanced frame or per mosaic tile).

    Args:
        path: a DICOM file.
        ds: the file already parsed (by ingestion's reader), to skip parsing it again; without it the
            header is read with :func:`read_header`.

    Returns:
        One :class:`SliceHeader` per slice; a file without position/orientation (a radiograph, a
        secondary capture) or a multi-frame file without per-frame geometry gives one header with
        ``position=None`` and ``frame=None``.

    Raises:
        RejectedFile: when the file cannot be parsed or an attribute it has is malformed (the
            message names the attribute).
    """
    path = path if isinstance(path, Path) else Path(path)
    if ds is None:
        ds = read_header(path)
    if not all(_tag(keyword) in ds for keyword in ("Rows", "Columns", "PixelData")):
        raise RejectedFile("not an image: Rows (0028,0010), Columns (0028,0011) or PixelData (7FE0,0010) missing")
    maker = vendor.vendor_of(ds)
    common = dict(
        path=path, study_uid="".join(_strings(ds, "StudyInstanceUID")),
        series_uid="".join(_strings(ds, "SeriesInstanceUID")),
        series_number=_int(ds, "SeriesNumber"), series_description=str(_value(ds, "SeriesDescription", "") or ""),
        image_type=tuple(v.upper() for v in _strings(ds, "ImageType")),
        instance_number=_int(ds, "InstanceNumber"), acquisition_number=_int(ds, "AcquisitionNumber"),
        repetition_time_ms=_float(ds, "RepetitionTime"), bits_stored=_int(ds, "BitsStored"),
        phase_direction=str(_value(ds, "InPlanePhaseEncodingDirection", "") or "").upper(),
        sidecar=vendor.sidecar_fields(ds), dataset=ds)
    if _tag("PerFrameFunctionalGroupsSequence") in ds:
        return _enhanced_headers(ds, common, maker)
    weighting = vendor.diffusion(ds, maker)
    header = SliceHeader(
        frame=None, position=_vector(ds, "ImagePositionPatient", 3), orientation=_orientation(ds),
        pixel_spacing=_spacing(ds), rows=int(_value(ds, "Rows")), columns=int(_value(ds, "Columns")),
        echo_number=_int(ds, "EchoNumbers"), echo_time=_float(ds, "EchoTime"), b_value=weighting.b_value,
        gradient=weighting.gradient, gradient_frame=weighting.frame, isotropic=weighting.isotropic,
        temporal_position=_int(ds, "TemporalPositionIdentifier"), rescale=_rescale(ds, maker),
        philips_scale_slope=vendor.philips_scale_slope(ds) if maker == "philips" else None, **common)
    if "MOSAIC" in header.image_type:
        return _mosaic_headers(ds, header)
    if maker == "uih" and vendor.items(ds, vendor.PRIVATE_TAGS["uih_vframe_sequence"].tag):
        return _uih_grid_headers(ds, header)
    if header.repetition_time_ms is None and maker == "siemens":
        header = _replace(header, repetition_time_ms=vendor.repetition_time_ms(ds, _csa_image_header(ds)))
    if _int(ds, "NumberOfFrames") not in (None, 1):
        return [_replace(header, position=None)]  # multi-frame without per-frame geometry: not a volume here
    return [header]


def _mosaic_headers(ds: Dataset, header: SliceHeader) -> list[SliceHeader]:
    """Split a Siemens mosaic into its tiles and give each tile its true position.

    The mosaic's ImagePositionPatient is that of the whole mosaic image, as if it were one slice of
    ``Rows × Columns``; the first tile's centre coincides with it, hence the shift by half the size
    difference. Tile ``k`` lies ``k`` slice spacings along the CSA SliceNormalVector (the order in which
    the scanner stored the slices), which need not be the direction of ``row × column``.
    """
    try:
        csa = csareader.get_csa_header(ds, "image")
    except Exception as exc:  # the CSA parser raises its own and struct errors on corrupt headers
        raise RejectedFile(f"Siemens mosaic with an unreadable CSA image header (0029,xx10): {exc}") from exc
    if header.repetition_time_ms is None:  # mosaics without (0018,0080) keep TR in the CSA header only
        header = _replace(header, repetition_time_ms=vendor.repetition_time_ms(ds, csa))
    n_tiles = csareader.get_n_mosaic(csa) if csa else None
    if not n_tiles:
        raise RejectedFile("Siemens mosaic (ImageType MOSAIC) without NumberOfImagesInMosaic in the CSA image "
                           "header (0029,xx10): the number of slices is unknown")
    if not header.has_geometry:
        raise RejectedFile("Siemens mosaic without ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    per_side = math.ceil(math.sqrt(n_tiles))
    if header.rows % per_side or header.columns % per_side:
        raise RejectedFile(f"Siemens mosaic of {header.rows}x{header.columns} pixels cannot hold {n_tiles} tiles "
                           f"on a {per_side}x{per_side} grid")
    rows, columns = header.rows // per_side, header.columns // per_side
    spacing = _float(ds, "SpacingBetweenSlices") or _float(ds, "SliceThickness")
    if not spacing:
        raise RejectedFile("Siemens mosaic without SpacingBetweenSlices (0018,0088) or SliceThickness (0018,0050): "
                           "the slice positions are unknown")
    row_cos, col_cos = np.asarray(header.orientation[:3]), np.asarray(header.orientation[3:])
    d_row, d_col = header.pixel_spacing
    first = (np.asarray(header.position) + (header.columns - columns) / 2 * d_col * row_cos
             + (header.rows - rows) / 2 * d_row * col_cos)
    normal = csareader.get_slice_normal(csa)
    normal = header.normal if normal is None else np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    return [_replace(header, frame=k, rows=rows, columns=columns, mosaic_tiles=n_tiles, mosaic_grid=(per_side, per_side),
                     position=tuple(float(v) for v in first + k * spacing * normal)) for k in range(n_tiles)]


def _csa_image_header(ds: Dataset) -> dict | None:
    try:
        return csareader.get_csa_header(ds, "image")
    except Exception:  # a damaged CSA header only costs what it would have added (TR): the public header stands
        return None


def _uih_grid_headers(ds: Dataset, header: SliceHeader) -> list[SliceHeader]:
    """Split a UIH VFRAME image (several slices tiled in one 2D image) into its tiles, each at its own position.

    The number of tiles is (0065,1050); they fill a grid ``ceil(sqrt(n))`` tiles across and as many rows as
    needed (20 tiles: 5 across, 4 down; a Siemens mosaic would be 5 × 5), row by row, and tile ``k`` lies where
    item ``k`` of (0065,1051) says (ImagePositionPatient): unlike a Siemens mosaic, the top level has no
    position to correct. Orientation and spacing are the top level's, else the first item's.
    """
    tiles = vendor.items(ds, vendor.PRIVATE_TAGS["uih_vframe_sequence"].tag)
    count = vendor.numbers(ds, vendor.PRIVATE_TAGS["uih_grid_count"].tag, "DS")
    n_tiles = int(count[0]) if count else len(tiles)
    if n_tiles < 1 or len(tiles) < n_tiles:
        raise RejectedFile(f"UIH VFRAME image: (0065,1050) declares {n_tiles} tiles but (0065,1051) has "
                           f"{len(tiles)} items: the tile positions are unknown")
    across = math.ceil(math.sqrt(n_tiles))
    down = math.ceil(n_tiles / across)
    if header.rows % down or header.columns % across:
        raise RejectedFile(f"UIH VFRAME image of {header.rows}x{header.columns} pixels cannot hold {n_tiles} tiles "
                           f"on a grid {across} across and {down} down")
    orientation = header.orientation or _orientation(tiles[0])
    spacing = header.pixel_spacing or _spacing(tiles[0])
    positions = [_vector(tile, "ImagePositionPatient", 3) for tile in tiles[:n_tiles]]
    if orientation is None or spacing is None or any(p is None for p in positions):
        raise RejectedFile("UIH VFRAME image without ImageOrientationPatient, PixelSpacing or a tile's "
                           "ImagePositionPatient in (0065,1051)")
    return [_replace(header, frame=k, rows=header.rows // down, columns=header.columns // across,
                     mosaic_tiles=n_tiles, mosaic_grid=(down, across), position=positions[k],
                     orientation=orientation, pixel_spacing=spacing) for k in range(n_tiles)]


def _enhanced_headers(ds: Dataset, common: dict, maker: vendor.Vendor) -> list[SliceHeader]:
    """One header per frame of an enhanced multi-frame file (functional groups, PS3.3 C.7.6.16)."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
    headers = []
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def item(sequence: str) -> Dataset:
            for source in (frame, shared):  # a per-frame value overrides the shared one
                if source.get(sequence):
                    return source[sequence][0]
            return Dataset()

        content, echo, diffusion = item("FrameContentSequence"), item("MREchoSequence"), item("MRDiffusionSequence")
        transform = item("PixelValueTransformationSequence")
        weighting = vendor.diffusion(ds, maker, diffusion)
        # Siemens XA and other enhanced files keep TR in the functional groups only
        timing = {**common, "repetition_time_ms": vendor.repetition_time_ms(ds, frame_item=frame)}
        headers.append(SliceHeader(
            frame=index, position=_vector(item("PlanePositionSequence"), "ImagePositionPatient", 3),
            orientation=_orientation(item("PlaneOrientationSequence")),
            pixel_spacing=_spacing(item("PixelMeasuresSequence")),
            rows=int(ds.Rows), columns=int(ds.Columns), echo_number=None,
            echo_time=_float(echo, "EffectiveEchoTime"), b_value=weighting.b_value, gradient=weighting.gradient,
            gradient_frame=weighting.frame, isotropic=weighting.isotropic,
            temporal_position=_int(content, "TemporalPositionIndex"),
            rescale=_rescale(transform) if "RescaleSlope" in transform else _rescale(ds, maker),
            philips_scale_slope=vendor.philips_scale_slope(ds, frame) if maker == "philips" else None, **timing))
    return headers


def _replace(header: SliceHeader, **changes) -> SliceHeader:
    return SliceHeader(**{**{f: getattr(header, f) for f in header.__dataclass_fields__}, **changes})


@functools.cache
def _tag(keyword: str) -> BaseTag:
    """The tag of a keyword, looked up once: pydicom's ``Tag(keyword)`` first tries to parse it as hex."""
    return Tag(keyword)


def _value(ds: Dataset, keyword: str, default: object = None) -> object:
    """``ds.get(keyword, default)``, by tag."""
    tag = _tag(keyword)
    return ds[tag].value if tag in ds else default


def _strings(ds: Dataset, keyword: str) -> list[str]:
    """The values of an ASCII element (IS, DS, CS, UI, or a binary number) as strings.

    Numeric and code strings are ASCII by definition (PS3.5 6.2), so they are split from the raw
    bytes: pydicom's conversion to DSfloat/IS objects was a third of the time spent on a header.
    """
    element = ds.get_item(_tag(keyword))
    if element is None:
        return []
    # implicit VR files leave the VR to the dictionary
    vr = effective_vr(element) if isinstance(element, RawDataElement) else None
    if vr in _TEXT_VRS and isinstance(element.value, bytes):
        values = element.value.decode("latin-1").split("\\")
    else:
        value = ds[_tag(keyword)].value  # converted by pydicom (binary VRs, or already converted)
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    values = ["" if v is None else str(v).strip(" \x00") for v in values]
    return [] if values == [""] else values


def _number(ds: Dataset, keyword: str, cast: Callable[[str], float | int]):
    values = _strings(ds, keyword)
    if not values:
        return None
    try:
        number = cast(values[0])
    except (TypeError, ValueError) as exc:
        raise RejectedFile(f"malformed {keyword}: {values!r} is not a number") from exc
    if isinstance(number, float) and not math.isfinite(number):
        raise RejectedFile(f"malformed {keyword}: {values!r} is not finite")
    return number


def _int(ds: Dataset, keyword: str) -> int | None:
    return _number(ds, keyword, lambda v: int(float(v)))


def _float(ds: Dataset, keyword: str) -> float | None:
    return _number(ds, keyword, float)


def _vector(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    values = _strings(ds, keyword)
    if not values:
        return None
    try:
        vector = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise RejectedFile(f"malformed {keyword}: {values!r} is not {n} numbers") from exc
    if len(vector) != n or not all(map(math.isfinite, vector)):
        raise RejectedFile(f"malformed {keyword}: {values!r} is not {n} finite numbers")
    return vector


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    cosines = _vector(ds, "ImageOrientationPatient", 6)
    if cosines is None:
        return None
    row, col = np.asarray(cosines[:3]), np.asarray(cosines[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise RejectedFile(f"malformed ImageOrientationPatient (0020,0037) {cosines}: the row and column "
                           "direction cosines must be orthogonal unit vectors")
    return cosines


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = _vector(ds, "PixelSpacing", 2)
    if spacing is not None and min(spacing) <= 0:
        raise RejectedFile(f"malformed PixelSpacing (0028,0030) {spacing}: spacings must be positive")
    return spacing


def _rescale(ds: Dataset, maker: vendor.Vendor = "other") -> tuple[float, float]:
    slope, intercept = _float(ds, "RescaleSlope"), _float(ds, "RescaleIntercept")
    if maker == "philips" and slope is None:  # Philips keeps a private copy where the public one is absent
        slope, intercept = vendor.philips_display_rescale(ds)
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


# ----------------------------------------------------------------------------------------------
# grouping


_KEY_FIELDS = ("study", "series", "orientation", "matrix", "pixel spacing", "echo number", "echo time",
               "image type")


def _group_key(h: SliceHeader) -> tuple:
    def rounded(values, decimals):
        # + 0.0 turns -0.0 into 0.0 so that "-0" and "0" cosines group together
        return None if values is None else tuple(round(v, decimals) + 0.0 for v in values)

    return (h.study_uid, h.series_uid, rounded(h.orientation, _ORIENTATION_DECIMALS), (h.rows, h.columns),
            rounded(h.pixel_spacing, 4), h.echo_number, h.echo_time, h.image_type)


def group_series(headers: Iterable[SliceHeader]) -> list[SeriesGroup]:
    """Group slices by study and series, splitting a series whose slices must not share one array.

    A series is split when its slices differ in orientation, matrix size, pixel spacing, echo
    (EchoNumbers/EchoTime) or ImageType. Diffusion weightings are volumes of one 4D series, as dcm2niix
    writes them (b = 0 and weighted volumes together, whichever element holds the b-value).

    Args:
        headers: slices from :func:`read_slice_headers`, any order.

    Returns:
        Groups ordered by study, series number and series UID, then part.
    """
    by_key: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        by_key[_group_key(h)].append(h)
    by_series: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for key in by_key:
        by_series[key[:2]].append(key)
    groups = []
    for series_keys in by_series.values():
        series_keys.sort(key=repr)
        differs = tuple(name for i, name in enumerate(_KEY_FIELDS) if len({k[i] for k in series_keys}) > 1)
        for part, key in enumerate(series_keys, start=1 if len(series_keys) > 1 else 0):
            groups.append(SeriesGroup(key=key, headers=tuple(by_key[key]), part=part, split_by=differs))
    return sorted(groups, key=lambda g: (g.key[0], g.headers[0].series_number or 0, g.key[1], g.part))


def is_volume_series(group: SeriesGroup) -> bool:
    """Whether a group is a volume (slices at two or more positions) rather than 2D images.

    Args:
        group: from :func:`group_series`.

    Returns:
        False for images without geometry (CR/DX/MG/SC …) and for groups whose slices all lie at one
        position (a single slice, or repeats of it).
    """
    if not all(h.has_geometry for h in group.headers):
        return False
    depths = np.array([np.dot(h.position, group.headers[0].normal) for h in group.headers])
    return bool(np.ptp(depths) > POSITION_TOLERANCE_MM)


# ----------------------------------------------------------------------------------------------
# assembling


def assemble(group: SeriesGroup, decoded: Mapping[Path, np.ndarray] | None = None,
             philips_scaling: PhilipsScaling = "precise") -> Volume:
    """Sort a volume group along its normal, check its geometry, and stack its pixels.

    Repeated positions are either exact duplicates (identical pixels; the extras are dropped) or
    volumes of a 4D series (every position holds the same number of images, ordered by temporal
    position, acquisition and instance number). Missing slices, uneven spacing and slices off the
    stack's line are blocking: a regular grid would misplace every slice after the defect.

    Args:
        group: a group for which :func:`is_volume_series` is True.
        decoded: stored pixel arrays by file (``pixel_array`` of each file, as from :func:`decode_stored`)
            already decoded elsewhere, e.g. in a sandboxed worker; files not in it are read and decoded here.
        philips_scaling: ``precise`` (Philips' floating-point values, dcm2niix's default) or ``display``
            (RescaleSlope/Intercept) for Philips files with an MR scale slope (2005,100E).

    Returns:
        The :class:`Volume`: ``data`` of shape ``(columns, rows, slices)`` or ``(columns, rows, slices,
        volumes)``, and its RAS affine.

    Raises:
        RejectedSeries: with the reason and the findings, when the group cannot be written.
    """
    where = group.describe()
    if philips_scaling not in PHILIPS_SCALINGS:
        raise ValueError(f"philips_scaling={philips_scaling!r}: choose one of {PHILIPS_SCALINGS}")
    if not is_volume_series(group):
        raise RejectedSeries(f"{where} is not a volume: its slices lack geometry or lie at a single position")
    findings: list[Finding] = []
    headers, derived = _without_derived_trace(group.headers)
    if derived:
        findings.append(Finding("derived_trace_dropped", f"{len(derived)} isotropic (trace) image(s) of this diffusion "
                                f"series left out ({', '.join(_name(h) for h in derived[:3])}"
                                f"{' …' if len(derived) > 3 else ''}): derived from the directional volumes, as "
                                "dcm2niix leaves them out", blocking=False))
    first = headers[0]
    pixels = _load_pixels(headers, where, decoded)

    depth_of = {h: float(np.dot(h.position, first.normal)) for h in headers}
    clusters = _clusters(sorted(headers, key=lambda h: (depth_of[h], h.time_key)), depth_of)
    kept_clusters, dropped = [], []
    for cluster in clusters:
        kept: list[SliceHeader] = []
        for h in sorted(cluster, key=lambda h: h.time_key):
            same = next((k for k in kept if np.array_equal(pixels[k], pixels[h])), None)
            if same is None:
                kept.append(h)
            else:
                dropped.append((h, same))
                findings.append(Finding("duplicate_dropped", f"{_name(h)} duplicates {_name(same)} (same position "
                                        f"{depth_of[h]:.3f} mm along the normal, identical pixels); dropped",
                                        blocking=False))
        kept_clusters.append(kept)

    counts = [len(c) for c in kept_clusters]
    if len(set(counts)) > 1:
        n_volumes = min(counts)
        extra = [c for c in kept_clusters if len(c) > n_volumes]
        shown = "; ".join(f"{len(c)} images at {depth_of[c[0]]:.3f} mm ({', '.join(_name(h) for h in c[:4])})"
                          for c in extra[:3])
        finding = Finding("conflicting_images", f"positions hold different numbers of images with different pixels "
                          f"({n_volumes} at most positions; {shown}{' …' if len(extra) > 3 else ''}): conflicting "
                          "duplicates, or an incomplete multi-volume series", blocking=True)
        raise RejectedSeries(f"{where}: {finding}", [*findings, finding])

    positions = np.array([c[0].position for c in kept_clusters])
    step, geometry_findings = check_spacing(positions, first.normal)
    findings += geometry_findings
    if any(f.blocking for f in findings):
        raise RejectedSeries(f"{where}: " + "; ".join(str(f) for f in findings if f.blocking), findings)

    scaling_of = {h: _scaling(h, philips_scaling) for c in kept_clusters for h in c}
    slopes = set(scaling_of.values())
    source = "philips_precise" if philips_scaling == "precise" and first.philips_scale_slope else "rescale"
    ordered = [[c[t] for c in kept_clusters] for t in range(counts[0])]  # [volume][slice]
    if len(slopes) == 1:
        scaling = slopes.pop()
        data = np.stack([np.stack([pixels[h] for h in vol], axis=-1) for vol in ordered], axis=-1)
        data = _compact_integers(data, first.bits_stored)
    else:
        findings.append(Finding("rescale_varies", f"the scaling of the stored values differs between slices "
                                f"({len(slopes)} slope/intercept pairs); values stored rescaled as float32",
                                blocking=False))
        scaling, source = (1.0, 0.0), f"{source}_per_slice"
        data = np.stack([np.stack([pixels[h] * scaling_of[h][0] + scaling_of[h][1] for h in vol], axis=-1)
                         for vol in ordered], axis=-1).astype(np.float32)
    # (rows, columns, slices, volumes) → (columns, rows reversed, slices, volumes)
    data = np.ascontiguousarray(data.transpose(1, 0, 2, 3)[:, ::-1])
    if data.shape[3] == 1:
        data = data[..., 0]
    used = {h.path for c in kept_clusters for h in c}
    duplicate_of = {h.path: same.path for h, same in dropped if h.path not in used}
    phase_axis = {"COL": 1, "ROW": 0}.get(first.phase_direction)
    tr = first.repetition_time_ms / 1000 if first.repetition_time_ms else None
    diffusion = tuple(vendor.bvec(vol[0].b_value, vol[0].gradient, vol[0].gradient_frame, first.orientation,
                                  first.phase_direction) for vol in ordered)
    if not vendor.is_diffusion_weighted(diffusion):
        diffusion = None  # e.g. GE fMRI records b = 0 for every volume: no .bval, as dcm2niix
    sidecar = {**first.sidecar, **({"PhilipsRescaleSlope": first.rescale[0], "PhilipsRescaleIntercept": first.rescale[1],
                                    "PhilipsScaleSlope": first.philips_scale_slope,
                                    "UsePhilipsFloatNotDisplayScaling": int(philips_scaling == "precise")}
                                   if first.philips_scale_slope else {})}
    return Volume(data=data, affine=slice_affine(first, positions[0], step), scaling=scaling, scaling_source=source,
                  findings=tuple(findings), dropped_files=tuple(duplicate_of), duplicate_of=duplicate_of,
                  derived_files=tuple(dict.fromkeys(h.path for h in derived if h.path not in used)),
                  repetition_time_s=tr, phase_axis=phase_axis, diffusion=diffusion, sidecar=sidecar)


def _without_derived_trace(headers: Sequence[SliceHeader]) -> tuple[list[SliceHeader], list[SliceHeader]]:
    """Split off isotropic (trace) images, when the series also holds directional diffusion images.

    Philips appends the trace of a diffusion series to the series itself, labelled ORIGINAL\\PRIMARY but
    marked (2001,1004) = 'I'. It is computed from the directional volumes, so dcm2niix leaves it out. A series of
    trace images only (a TRACEW series) is kept whole: there the trace is what was sent.
    """
    derived = [h for h in headers if h.isotropic]
    if not derived or not any(h.gradient is not None for h in headers):
        return list(headers), []
    return [h for h in headers if not h.isotropic], derived


def _scaling(h: SliceHeader, philips_scaling: PhilipsScaling) -> tuple[float, float]:
    """(scl_slope, scl_inter) of one slice: the display rescale, or Philips' floating-point scaling."""
    if philips_scaling == "precise" and h.philips_scale_slope and h.rescale[0]:
        return vendor.precise_scaling(h.rescale, h.philips_scale_slope)
    return h.rescale


def _clusters(ordered: list[SliceHeader], depth_of: dict[SliceHeader, float]) -> list[list[SliceHeader]]:
    """Runs of slices whose depth along the normal is within the position tolerance of the run's first."""
    clusters: list[list[SliceHeader]] = []
    for h in ordered:
        if clusters and depth_of[h] - depth_of[clusters[-1][0]] <= POSITION_TOLERANCE_MM:
            clusters[-1].append(h)
        else:
            clusters.append([h])
    return clusters


def check_spacing(positions: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, list[Finding]]:
    """The slice step vector of a stack, and what is wrong with its spacing.

    The reference spacing is the step that most steps agree with (the smallest on a tie), so one gap
    in a long stack does not shift it. A step ``k`` times the reference is ``k − 1`` missing slices;
    any other deviation beyond tolerance is uneven spacing. All are blocking.

    Args:
        positions: ``(n, 3)`` LPS positions of the slices, sorted along ``normal``, ``n ≥ 2``.
        normal: unit slice normal.

    Returns:
        ``(step, findings)``: ``step`` is the ``(3,)`` vector from one slice to the next,
        ``(last − first) / (n − 1)`` — not necessarily along the normal (gantry tilt).
    """
    depths = positions @ normal
    steps = np.diff(depths)
    tolerance = POSITION_TOLERANCE_MM + SPACING_TOLERANCE * steps
    agree = (np.abs(steps[:, None] - steps[None, :]) <= tolerance[None, :]).sum(axis=0)
    reference = float(steps[np.flatnonzero(agree == agree.max())].min())
    tol = POSITION_TOLERANCE_MM + SPACING_TOLERANCE * reference
    findings = []
    for i, s in enumerate(steps):
        if abs(s - reference) <= tol:
            continue
        k = round(s / reference)
        if k >= 2 and abs(s - k * reference) <= k * tol:
            findings.append(Finding("missing_slices", f"{k - 1} slice(s) missing between {depths[i]:.3f} and "
                                    f"{depths[i + 1]:.3f} mm along the normal (spacing {reference:.4g} mm)",
                                    blocking=True))
        else:
            findings.append(Finding("uneven_spacing", f"step of {s:.4g} mm between {depths[i]:.3f} and "
                                    f"{depths[i + 1]:.3f} mm along the normal, expected {reference:.4g} mm",
                                    blocking=True))
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if not findings:
        expected = positions[0] + np.arange(len(positions))[:, None] * step
        off = np.linalg.norm(positions - expected, axis=1)
        if off.max() > tol:
            i = int(off.argmax())
            findings.append(Finding("not_collinear", f"slice {i} at depth {depths[i]:.3f} mm lies {off[i]:.3g} mm "
                                    "off the line through the first and last slice positions", blocking=True))
        elif np.linalg.norm(step - (step @ normal) * normal) > tol:
            findings.append(Finding("sheared", "slice positions advance obliquely to the slice normal (gantry tilt); "
                                    "the affine keeps the shear", blocking=False))
    return step, findings


def slice_affine(first: SliceHeader, position: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Voxel → RAS affine of a stack in dcm2niix's layout (rows reversed).

    Args:
        first: any slice of the stack (orientation, spacing, rows).
        position: LPS position of the first slice (lowest along the normal).
        step: LPS vector from one slice to the next.

    Returns:
        4×4 affine mapping ``(i column, j reversed row, k slice)`` to RAS mm.
    """
    row_cos, col_cos = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    d_row, d_col = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = d_col * row_cos
    lps[:3, 1] = -d_row * col_cos
    lps[:3, 2] = step
    lps[:3, 3] = np.asarray(position) + (first.rows - 1) * d_row * col_cos
    return _LPS_TO_RAS @ lps


def _load_pixels(headers: Sequence[SliceHeader], where: str,
                 decoded: Mapping[Path, np.ndarray] | None = None) -> dict[SliceHeader, np.ndarray]:
    """Decode each file once and cut out each slice (frame or mosaic tile) as ``(rows, columns)``."""
    arrays: dict[Path, np.ndarray] = dict(decoded or {})
    out = {}
    for h in headers:
        if h.path not in arrays:
            arrays[h.path] = _decode(h, where)
        array = arrays[h.path]
        if h.mosaic_tiles:
            per_side = array.shape[1] // h.columns
            r, c = divmod(h.frame, per_side)
            out[h] = array[r * h.rows:(r + 1) * h.rows, c * h.columns:(c + 1) * h.columns]
        elif h.frame is not None:
            out[h] = array[h.frame]
        else:
            out[h] = array
    return out


def _decode(h: SliceHeader, where: str) -> np.ndarray:
    return decode_stored(h.dataset if h.dataset is not None else pydicom.dcmread(h.path), _name(h), where)


def decode_stored(ds: Dataset, name: str = "the file", where: str = "series") -> np.ndarray:
    """A file's stored pixel values, ``(rows, columns)`` or ``(frames, rows, columns)``, checked against its header.

    Args:
        ds: the parsed file, pixel data included.
        name: how the reason names the file.
        where: how the reason names the series.

    Returns:
        ``ds.pixel_array`` (stored values: the rescale is applied through the NIfTI scaling), taken
        straight from the bytes for uncompressed grayscale data (:func:`_native_pixels`).

    Raises:
        RejectedSeries: colour data, undecodable data, or a shape the header does not declare.
    """
    samples = _value(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise RejectedSeries(f"{where}: {name} has SamplesPerPixel={samples}; only grayscale volumes are supported")
    try:
        array = _native_pixels(ds)
        if array is None:
            array = ds.pixel_array
    except Exception as exc:  # decoder plugins raise their own types
        syntax = _value(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID", ExplicitVRLittleEndian)
        raise RejectedSeries(f"{where}: cannot decode the pixel data of {name} ({UID(syntax).name}): "
                             f"{decode_failure(ds, exc)}") from exc
    frames = _int(ds, "NumberOfFrames") or 1
    rows, columns = _value(ds, "Rows"), _value(ds, "Columns")
    expected = (rows, columns) if frames == 1 else (frames, rows, columns)
    if array.shape != expected:
        raise RejectedSeries(f"{where}: decoded pixel array of {name} has shape {array.shape}, "
                             f"the header declares {expected}")
    return array


_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """``ds.pixel_array`` of uncompressed little-endian grayscale integers, straight from the bytes; else ``None``.

    For such data ``pixel_array`` is a reshaped copy of PixelData, yet pydicom's decoder set-up (pixel
    ids, runner, validation) costs more than the copy on small MR slices. Only files whose Image Pixel
    attributes pydicom would accept, and whose PixelData holds exactly the pixels they declare, are
    read here; everything else (and every odd case) is left to ``pixel_array``.

    Args:
        ds: a dataset with its file meta (the transfer syntax).

    Returns:
        ``(rows, columns)`` or ``(frames, rows, columns)`` stored values, writeable, equal to
        ``ds.pixel_array`` (dtype included); ``None`` when this fast path does not apply.
    """
    if sys.byteorder != "little" or _tag("PixelData") not in ds:  # pydicom returns native byte order
        return None
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or _value(file_meta, "TransferSyntaxUID") not in _NATIVE_SYNTAXES:
        return None
    rows, columns = _value(ds, "Rows"), _value(ds, "Columns")
    allocated, stored, signed = _value(ds, "BitsAllocated"), _value(ds, "BitsStored"), _value(ds, "PixelRepresentation")
    frames, samples = _value(ds, "NumberOfFrames", 1), _value(ds, "SamplesPerPixel")
    if (not all(isinstance(v, int) for v in (rows, columns, allocated, stored, signed, frames, samples))
            or samples != 1 or _value(ds, "PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
            or allocated not in (8, 16, 32) or not 1 <= stored <= allocated or signed not in (0, 1)
            or not (0 < rows < 2**16 and 0 < columns < 2**16 and frames >= 1)):
        return None
    pixel_bytes = _value(ds, "PixelData")
    count = frames * rows * columns
    size = count * allocated // 8
    # a trailing pad byte makes odd-length 8-bit data even (PS3.5 8.1.1); pydicom ignores it
    if not isinstance(pixel_bytes, bytes) or len(pixel_bytes) not in (size, size + size % 2):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    array = np.frombuffer(pixel_bytes, dtype=dtype, count=count).reshape(
        (rows, columns) if frames == 1 else (frames, rows, columns)).copy()
    if stored < allocated:
        # as pydicom (correct_unused_bits): the bits above BitsStored are not part of the value, so they are
        # cleared (unsigned) or filled with the sign bit (signed, arithmetic shift)
        shift = allocated - stored
        np.left_shift(array, shift, out=array)
        np.right_shift(array, shift, out=array)
    return array


def _compact_integers(data: np.ndarray, bits_stored: int | None) -> np.ndarray:
    # dcm2niix stores unsigned 16-bit data as int16 when BitsStored < 16 (most MR: 12 bits), so that the type
    # depends on the header, not on the values; it keeps uint16 for 16 bits stored (checked on both kinds)
    if (data.dtype == np.uint16 and bits_stored is not None and bits_stored < 16
            and (data.size == 0 or data.max() <= np.iinfo(np.int16).max)):
        return data.astype(np.int16)
    return data


def _name(h: SliceHeader) -> str:
    return h.path.name if h.frame is None else f"{h.path.name}[{h.frame}]"


# ----------------------------------------------------------------------------------------------
# writing


def write_nifti(volume: Volume, path: Path) -> Path:
    """Write a volume as NIfTI-1 with its sidecars, each atomically (temporary file in the same folder, then rename).

    Beside ``<stem>.nii`` go ``<stem>.json`` (the BIDS fields, :func:`sidecar`) and, for a diffusion series,
    ``<stem>.bval`` and ``<stem>.bvec`` in dcm2niix's format (``%g`` values separated by spaces; one line of
    b-values, three lines of vector components in the image frame).

    Args:
        volume: from :func:`assemble`.
        path: destination ending in ``.nii`` or ``.nii.gz``; its folder must exist.

    Returns:
        ``path``.

    Raises:
        ValueError: when ``path`` does not end in ``.nii`` or ``.nii.gz``.
        FileNotFoundError: when the destination folder does not exist.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI path {path} must end in .nii or .nii.gz")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    import nibabel as nib  # only the main process writes NIfTI; workers need not load it

    image = nib.Nifti1Image(volume.data, volume.affine)
    header = image.header
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    # dcm2niix writes TR to pixdim[4] of 3D volumes too (dim[4] is 1 there), and 0 when no header records it
    header["pixdim"][4] = volume.repetition_time_s or 0.0
    if volume.phase_axis is not None:
        header.set_dim_info(freq=1 - volume.phase_axis, phase=volume.phase_axis, slice=2)
    if volume.scaling != (1.0, 0.0):
        header.set_slope_inter(*volume.scaling)
    stem = path.name[:-len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name[:-len(".nii")]
    _write_atomic(path.with_name(f"{stem}.json"), json.dumps(sidecar(volume), indent="\t") + "\n")
    if volume.diffusion is not None:
        _write_atomic(path.with_name(f"{stem}.bval"), " ".join(f"{b:g}" for b, _ in volume.diffusion) + "\n")
        _write_atomic(path.with_name(f"{stem}.bvec"), "".join(
            " ".join(f"{v[axis]:g}" for _, v in volume.diffusion) + "\n" for axis in range(3)))
    _write_atomic(path, lambda tmp: nib.save(image, tmp))
    return path


LAYOUT = "dcm2niix -x i"
"""The voxel layout, as the dcm2niix option giving the same: 3D acquisitions keep their acquisition order."""


def sidecar(volume: Volume) -> dict[str, object]:
    """The BIDS JSON sidecar of a volume: its technical DICOM fields, how it was scaled and laid out.

    Args:
        volume: from :func:`assemble`.

    Returns:
        The fields of :data:`medtl.ingest.vendor.SIDECAR_FIELDS` the series records (no free text, nothing the
        de-identification removes), RepetitionTime wherever it was found, and ``ConversionSoftware``,
        ``VoxelLayout`` (:data:`LAYOUT`), ``IntensityScaling`` (:attr:`Volume.scaling_source`).
    """
    out = dict(volume.sidecar)
    if volume.repetition_time_s:
        out["RepetitionTime"] = float(f"{volume.repetition_time_s:.9g}")
    out.update(IntensityScaling=volume.scaling_source, VoxelLayout=LAYOUT, ConversionSoftware="medtl",
               ConversionSoftwareVersion=__version__)
    return out


def _write_atomic(path: Path, content: str | Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp-{path.name}")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_name(group: SeriesGroup) -> str:
    """``<SeriesNumber>_<SeriesDescription>[_<part>]`` with unsafe characters replaced by ``_``.

    Args:
        group: the group.

    Returns:
        A file stem (no extension).
    """
    first = group.headers[0]
    stem = f"{first.series_number if first.series_number is not None else 'x'}_{first.series_description}"
    stem = re.sub(r"[^A-Za-z0-9.=+-]+", "_", stem).strip("_.") or "series"
    return f"{stem}_{group.part}" if group.part else stem


def series_to_nifti(paths: Iterable[Path], out_dir: Path, name: Callable[[SeriesGroup], str] = default_name,
                    philips_scaling: PhilipsScaling = "precise") -> list[SeriesOutcome]:
    """Convert every volume series among ``paths`` to ``<out_dir>/<name(group)>.nii`` and its sidecars.

    Every input file appears in at least one outcome: ``written``, ``rejected`` (with a reason),
    ``not_volume`` (2D images, for the caller's 2D path) or ``unreadable``. Never raises for bad input.

    Args:
        paths: DICOM files (any order, any number of series).
        out_dir: output folder (created when missing).
        name: file stem for a group; make it unique per group (a counter is appended on a clash).
        philips_scaling: see :func:`assemble`.

    Returns:
        One :class:`SeriesOutcome` per unreadable file and per group.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[SeriesOutcome] = []
    headers: list[SliceHeader] = []
    for path in map(Path, paths):
        try:
            headers += read_slice_headers(path)
        except RejectedFile as exc:
            outcomes.append(SeriesOutcome("unreadable", (path,), reason=str(exc)))
    used: set[str] = set()
    for group in group_series(headers):
        if not is_volume_series(group):
            outcomes.append(SeriesOutcome("not_volume", group.files, group=group,
                                          reason="2D: no geometry or a single slice position"))
            continue
        try:
            volume = assemble(group, philips_scaling=philips_scaling)
        except RejectedSeries as exc:
            outcomes.append(SeriesOutcome("rejected", group.files, reason=str(exc), findings=exc.findings, group=group))
            continue
        stem = name(group)
        unique, n = stem, 1
        while unique in used:
            n += 1
            unique = f"{stem}_{n}"
        used.add(unique)
        target = write_nifti(volume, out_dir / f"{unique}.nii")
        outcomes.append(SeriesOutcome("written", group.files, nifti=target, findings=volume.findings,
                                      dropped_files=volume.dropped_files, group=group))
    return outcomes
