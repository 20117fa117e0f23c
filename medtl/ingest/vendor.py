"""What a volume needs from each vendor's headers, and where each vendor keeps it.

Public attributes come first; a vendor's private element is read only where the public one is absent and
only for files of that vendor (Manufacturer), because the same private element number means different things
to different vendors. Private elements are read at their usual block (``gggg,10xx``), as dcm2niix reads them.
Every private element read here is declared once, in :data:`PRIVATE_TAGS`; ``docs/decoding.md`` ("Vendors")
lists what is read from where.

Coordinate frames: gradient directions are returned in the frame the file stores them in (:class:`Diffusion`);
:func:`bvec` turns them into the image frame of ``.bvec``, as dcm2niix does.

References: DICOM PS3.3 C.8.13.5.9 (MR Diffusion), C.8.13.5.2 (MR Timing and Related Parameters);
Chenevert et al., Transl Oncol 7:65-71, 2014 (Philips floating-point scaling, PMC3998685); Li et al.,
J Neurosci Methods 264:47-56, 2016 (dcm2niix).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from medtl.config import PhilipsScaling

Vendor = Literal["siemens", "ge", "philips", "uih", "canon", "other"]
PHILIPS_SCALINGS: tuple[PhilipsScaling, ...] = get_args(PhilipsScaling)
"""``precise``: Philips' floating-point values (dcm2niix's default, ``-p y``); ``display``: RescaleSlope/Intercept
(what a viewer shows, dcm2niix ``-p n``)."""


@dataclass(frozen=True)
class PrivateTag:
    """One vendor's private element.

    Attributes:
        tag: the element at its usual block, e.g. ``0x2005100E``.
        vr: its VR (private elements of implicit VR files carry none).
        vendor: whose it is.
        meaning: what it holds and in which unit or frame.
    """

    tag: int
    vr: str
    vendor: Vendor
    meaning: str

    def __str__(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"


PRIVATE_TAGS: dict[str, PrivateTag] = {
    "siemens_b_value": PrivateTag(0x0019100C, "IS", "siemens", "b-value (s/mm²)"),
    "siemens_gradient": PrivateTag(0x0019100E, "FD", "siemens", "diffusion gradient direction, patient frame (LPS)"),
    "ge_b_value": PrivateTag(0x00431039, "IS", "ge", "b-value in the first of four values, modulo 10⁹ (GE adds 10⁹)"),
    "ge_gradient_x": PrivateTag(0x001910BB, "DS", "ge", "diffusion gradient, x component (GE logical frame)"),
    "ge_gradient_y": PrivateTag(0x001910BC, "DS", "ge", "diffusion gradient, y component (GE logical frame)"),
    "ge_gradient_z": PrivateTag(0x001910BD, "DS", "ge", "diffusion gradient, z component (GE logical frame)"),
    "philips_b_value": PrivateTag(0x20011003, "FL", "philips", "b-value (s/mm²)"),
    "philips_direction": PrivateTag(0x20011004, "CS", "philips",
                                    "diffusion direction; 'I' = isotropic: the derived trace image"),
    "philips_gradient_rl": PrivateTag(0x200510B0, "FL", "philips", "diffusion gradient, RL component (LPS x)"),
    "philips_gradient_ap": PrivateTag(0x200510B1, "FL", "philips", "diffusion gradient, AP component (LPS y)"),
    "philips_gradient_fh": PrivateTag(0x200510B2, "FL", "philips", "diffusion gradient, FH component (LPS z)"),
    "philips_scale_slope": PrivateTag(0x2005100E, "FL", "philips", "MR scale slope SS of the floating-point values"),
    "philips_rescale_intercept": PrivateTag(0x20051409, "DS", "philips",
                                            "RescaleIntercept where the public one is absent"),
    "philips_rescale_slope": PrivateTag(0x2005140A, "DS", "philips", "RescaleSlope where the public one is absent"),
    "philips_frame_sequence": PrivateTag(0x2005140F, "SQ", "philips",
                                         "per-frame private items of an enhanced file (scale slope inside)"),
    "uih_b_value": PrivateTag(0x00651009, "FD", "uih", "b-value (s/mm²)"),
    "uih_gradient": PrivateTag(0x00651037, "FD", "uih", "diffusion gradient direction, image frame (read, phase, slice)"),
    "uih_grid_count": PrivateTag(0x00651050, "DS", "uih", "number of slices tiled in a VFRAME image"),
    "uih_vframe_sequence": PrivateTag(0x00651051, "SQ", "uih",
                                      "one item per tile of a VFRAME image: its ImagePositionPatient, …"),
}
"""Every private element medtl reads, by name: the one declaration (docs/decoding.md lists them)."""

PRIVATE_CREATORS = (0x00190010, 0x00430010, 0x20010010, 0x20050010, 0x00650010)
"""The private creator elements of :data:`PRIVATE_TAGS`' blocks, read with them."""

SIDECAR_FIELDS: dict[str, tuple[str, float]] = {
    "Modality": ("Modality", 1.0),
    "MagneticFieldStrength": ("MagneticFieldStrength", 1.0),
    "ImagingFrequency": ("ImagingFrequency", 1.0),
    "Manufacturer": ("Manufacturer", 1.0),
    "ManufacturersModelName": ("ManufacturerModelName", 1.0),
    "BodyPart": ("BodyPartExamined", 1.0),
    "MRAcquisitionType": ("MRAcquisitionType", 1.0),
    "ScanningSequence": ("ScanningSequence", 1.0),
    "SequenceVariant": ("SequenceVariant", 1.0),
    "ScanOptions": ("ScanOptions", 1.0),
    "ImageType": ("ImageType", 1.0),
    "SeriesNumber": ("SeriesNumber", 1.0),
    "SliceThickness": ("SliceThickness", 1.0),
    "SpacingBetweenSlices": ("SpacingBetweenSlices", 1.0),
    "EchoTime": ("EchoTime", 1e-3),  # ms in DICOM, s in BIDS
    "RepetitionTime": ("RepetitionTime", 1e-3),
    "InversionTime": ("InversionTime", 1e-3),
    "FlipAngle": ("FlipAngle", 1.0),
    "EchoTrainLength": ("EchoTrainLength", 1.0),
    "InPlanePhaseEncodingDirectionDICOM": ("InPlanePhaseEncodingDirection", 1.0),
    "ImageOrientationPatientDICOM": ("ImageOrientationPatient", 1.0),
}
"""BIDS sidecar key → (DICOM keyword, factor to BIDS units). Technical attributes only, every one kept by the
de-identification allow-list (tests check it): SeriesDescription, ProtocolName and other free text never go in."""

SIDECAR_KEYWORDS: tuple[str, ...] = tuple(dict.fromkeys(keyword for keyword, _ in SIDECAR_FIELDS.values()))


def vendor_of(ds: Dataset) -> Vendor:
    """The vendor whose private elements a file may carry, from Manufacturer (0008,0070).

    Examples:
        >>> ds = Dataset(); ds.Manufacturer = "Philips Medical Systems"
        >>> vendor_of(ds)
        'philips'
    """
    name = str(ds.get("Manufacturer", "") or "").upper()
    for vendor, marks in (("siemens", ("SIEMENS",)), ("ge", ("GE ", "GE_", "GENERAL ELECTRIC")),
                          ("philips", ("PHILIPS",)), ("uih", ("UIH", "UNITED IMAGING")),
                          ("canon", ("CANON", "TOSHIBA"))):
        if any(name.startswith(m) or m in name for m in marks) or (vendor == "ge" and name == "GE"):
            return vendor
    return "other"


# ----------------------------------------------------------------------------------------------
# reading numbers wherever and however they are stored


def numbers(ds: Dataset, tag: int, vr: str | None = None) -> tuple[float, ...]:
    """The finite numbers of an element, whatever its encoding: ``()`` when absent, empty or malformed.

    A private element of an implicit VR file arrives as bytes without a VR; ``vr`` says how to read them.
    Binary values are little endian unless the file is big endian.

    Args:
        ds: a dataset or a sequence item.
        tag: the element.
        vr: the VR to read bytes with when the element carries none (``FL``, ``FD``, ``DS``, ``IS``, ``US``,
            ``SS``, ``UL``, ``SL``).

    Returns:
        The values as floats.

    Examples:
        >>> ds = Dataset(); ds.add_new(0x2005100E, "FL", 0.25)
        >>> numbers(ds, 0x2005100E)
        (0.25,)
    """
    element = ds.get_item(tag)
    if element is None:
        return ()
    written = getattr(element, "VR", None)
    value = element.value
    if value is None and getattr(element, "is_raw", False):  # deferred: read through the dataset
        value = ds[tag].value
    vr = written if written not in (None, "UN", "OB") else vr
    try:
        if isinstance(value, (bytes, bytearray)):
            little = getattr(element, "is_little_endian", True)
            if vr in _BINARY:
                code, size = _BINARY[vr]
                count = len(value) // size
                values = struct.unpack(("<" if little else ">") + code * count, bytes(value[:count * size]))
            elif vr in ("DS", "IS"):
                values = tuple(float(v) for v in value.decode("latin-1").strip(" \x00").split("\\") if v.strip())
            else:
                return ()
        elif isinstance(value, (list, tuple, MultiValue)):
            values = tuple(float(v) for v in value)
        elif value in ("", None):
            return ()
        else:
            values = (float(value),)
    except (TypeError, ValueError, struct.error):
        return ()
    return values if all(map(math.isfinite, values)) else ()


_BINARY = {"FL": ("f", 4), "FD": ("d", 8), "US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4)}


def text(ds: Dataset, tag: int) -> str:
    """An element's value as stripped text (bytes read as Latin-1); ``""`` when absent."""
    element = ds.get_item(tag)
    if element is None:
        return ""
    value = ds[tag].value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1")
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip(" \x00")


def items(ds: Dataset, tag: int) -> list[Dataset]:
    """The items of a sequence element (public or private), ``[]`` when absent or not a sequence."""
    if ds.get_item(tag) is None:
        return []
    try:
        value = ds[tag].value
    except Exception:  # a private element that does not parse as a sequence holds no items
        return []
    return list(value) if isinstance(value, DicomSequence) else []


def _private(ds: Dataset, name: str) -> tuple[float, ...]:
    spec = PRIVATE_TAGS[name]
    return numbers(ds, spec.tag, spec.vr)


# ----------------------------------------------------------------------------------------------
# diffusion


@dataclass(frozen=True)
class Diffusion:
    """The diffusion weighting of one slice.

    Attributes:
        b_value: s/mm²; ``None`` when the file records none.
        gradient: unit direction; ``None`` for b = 0, an isotropic image, or when the file records none.
        frame: the gradient's frame: ``patient`` (LPS: public attributes, Siemens, Philips), ``image`` (UIH:
            read, phase and slice directions) or ``ge`` (GE's logical frame, turned into the image frame as
            dcm2niix does).
        isotropic: a derived isotropic (trace) image: Philips (2001,1004) = 'I', or DiffusionDirectionality
            ISOTROPIC.
    """

    b_value: float | None = None
    gradient: tuple[float, float, float] | None = None
    frame: Literal["patient", "image", "ge"] = "patient"
    isotropic: bool = False


_B_VALUE, _GRADIENT, _DIRECTIONALITY = 0x00189087, 0x00189089, 0x00189075
_MR_DIFFUSION_SEQUENCE, _GRADIENT_SEQUENCE = 0x00189117, 0x00189076


def diffusion(ds: Dataset, vendor: Vendor, frame_item: Dataset | None = None) -> Diffusion:
    """The b-value and gradient direction of a slice, public attributes first, then the vendor's.

    Args:
        ds: the file's dataset.
        vendor: from :func:`vendor_of`.
        frame_item: the MR Diffusion Sequence item (0018,9117) of an enhanced file's frame, when there is one.

    Returns:
        The :class:`Diffusion`; all ``None`` for a slice without diffusion weighting.
    """
    sources = [frame_item] if frame_item is not None else []
    sources += [item for item in items(ds, _MR_DIFFUSION_SEQUENCE)[:1]] + [ds]
    b_value = gradient = None
    isotropic, frame = False, "patient"
    for source in sources:
        if b_value is None and (found := numbers(source, _B_VALUE, "FD")):
            b_value = found[0]
        if gradient is None:
            nested = items(source, _GRADIENT_SEQUENCE)
            found = numbers(nested[0] if nested else source, _GRADIENT, "FD")
            gradient = found if len(found) == 3 else None
        isotropic = isotropic or text(source, _DIRECTIONALITY).upper() == "ISOTROPIC"
    if vendor == "siemens":
        b_value = _first(b_value, _private(ds, "siemens_b_value"))
        gradient = gradient or _vector(_private(ds, "siemens_gradient"))
    elif vendor == "philips":
        b_value = _first(b_value, _private(ds, "philips_b_value"))
        gradient = gradient or _vector(sum((_private(ds, f"philips_gradient_{axis}") for axis in ("rl", "ap", "fh")),
                                           ()))
        isotropic = isotropic or text(ds, PRIVATE_TAGS["philips_direction"].tag).upper() == "I"
    elif vendor == "uih":
        # dcm2niix reads UIH's own element before (0018,9089), whatever the order in the file (its issue 836)
        uih = _vector(_private(ds, "uih_gradient"))
        gradient, frame = (uih, "image") if uih is not None else (gradient, frame)
        b_value = _first(b_value, _private(ds, "uih_b_value"))
    elif vendor == "ge":
        ge = _private(ds, "ge_b_value")
        b_value = _first(b_value, (ge[0] % 1e9,) if ge else ())
        components = sum((_private(ds, f"ge_gradient_{axis}") for axis in "xyz"), ())
        if gradient is None and len(components) == 3:
            gradient, frame = _vector(components), "ge"
    if gradient is not None and frame != "ge":  # GE's vector length scales its b-value (kept for the image frame)
        norm = math.sqrt(sum(v * v for v in gradient))
        # b = 0 images and isotropic (trace) images have no direction; a zero vector carries none either
        gradient = None if norm < 1e-6 or isotropic or not b_value else tuple(v / norm for v in gradient)
    return Diffusion(b_value=b_value, gradient=gradient, frame=frame if gradient else "patient",
                     isotropic=isotropic and bool(b_value))


def _first(current: float | None, found: tuple[float, ...]) -> float | None:
    return current if current is not None else (found[0] if found else None)


def _vector(values: tuple[float, ...]) -> tuple[float, float, float] | None:
    return (values[0], values[1], values[2]) if len(values) == 3 else None


# ----------------------------------------------------------------------------------------------
# intensity scaling


def philips_scale_slope(ds: Dataset, frame_item: Dataset | None = None) -> float | None:
    """Philips' MR scale slope SS (2005,100E) of a slice: the frame's private item first, then the file's.

    Args:
        ds: the file's dataset.
        frame_item: an enhanced file's per-frame functional group item.

    Returns:
        SS, or ``None`` when absent or zero (then only the display scaling exists).
    """
    spec = PRIVATE_TAGS["philips_scale_slope"]
    sources = []
    if frame_item is not None:
        sources += items(frame_item, PRIVATE_TAGS["philips_frame_sequence"].tag)[:1] + [frame_item]
    sources += items(ds, PRIVATE_TAGS["philips_frame_sequence"].tag)[:1] + [ds]
    for source in sources:
        if (found := numbers(source, spec.tag, spec.vr)) and found[0] != 0:
            return found[0]
    return None


def philips_display_rescale(ds: Dataset) -> tuple[float | None, float | None]:
    """Philips' private copies of RescaleSlope/RescaleIntercept (2005,140A)/(2005,1409), for files without the public ones."""
    slope, intercept = _private(ds, "philips_rescale_slope"), _private(ds, "philips_rescale_intercept")
    return (slope[0] if slope else None, intercept[0] if intercept else None)


def precise_scaling(rescale: tuple[float, float], scale_slope: float) -> tuple[float, float]:
    """Philips floating-point scaling (Chenevert et al. 2014): stored value R → ``R / SS + RI / (RS · SS)``.

    The display value is ``D = R · RS + RI``; the floating-point value is ``D / (RS · SS)``.

    Args:
        rescale: (RescaleSlope RS, RescaleIntercept RI).
        scale_slope: Philips' MR scale slope SS (2005,100E).

    Returns:
        ``(slope, intercept)`` for NIfTI scl_slope / scl_inter.

    Examples:
        >>> precise_scaling((2.0, 10.0), 0.5)
        (2.0, 10.0)
    """
    # in float32, as dcm2niix computes it, so that the NIfTI header holds the same two numbers
    slope, intercept, ss = np.float32(rescale[0]), np.float32(rescale[1]), np.float32(scale_slope)
    low = np.float32(intercept / (slope * ss))
    high = np.float32((slope + intercept) / (slope * ss))
    return (float(high - low), float(low)) if low != high else (float(slope), float(intercept))


# ----------------------------------------------------------------------------------------------
# timing


_TIMING_SEQUENCE, _REPETITION_TIME = 0x00189112, 0x00180080


def repetition_time_ms(ds: Dataset, csa: Mapping | None = None, frame_item: Dataset | None = None) -> float | None:
    """RepetitionTime (ms): the file's (0018,0080), else Siemens' CSA image header, else the functional groups.

    Args:
        ds: the file's dataset.
        csa: the Siemens CSA image header, as ``nibabel.nicom.csareader`` reads it.
        frame_item: an enhanced file's per-frame functional group item (MR Timing and Related Parameters).

    Returns:
        TR in ms, or ``None`` when nothing records it.
    """
    if found := numbers(ds, _REPETITION_TIME, "DS"):
        return found[0]
    if csa:
        value = (csa.get("tags", {}).get("RepetitionTime") or {}).get("items") or []
        if value and isinstance(value[0], (int, float)) and value[0] > 0:
            return float(value[0])
    for group in ([frame_item] if frame_item is not None else []) + items(ds, 0x52009229)[:1]:
        for timing in items(group, _TIMING_SEQUENCE)[:1]:
            if found := numbers(timing, _REPETITION_TIME, "DS"):
                return found[0]
    return None


# ----------------------------------------------------------------------------------------------
# the JSON sidecar


def sidecar_fields(ds: Dataset) -> dict[str, object]:
    """The BIDS sidecar fields of :data:`SIDECAR_FIELDS` that a file records, in BIDS units.

    Args:
        ds: the dataset (only technical attributes are read).

    Returns:
        Key → number, string, or list; absent attributes are left out.

    Examples:
        >>> ds = Dataset(); ds.EchoTime, ds.Modality = 30, "MR"
        >>> sidecar_fields(ds)
        {'Modality': 'MR', 'EchoTime': 0.03}
    """
    out: dict[str, object] = {}
    for key, (keyword, factor) in SIDECAR_FIELDS.items():
        element = ds.get(keyword)
        if element is None or element == "":
            continue
        try:
            value = ds[keyword].value
        except Exception:  # a malformed technical attribute is left out of the sidecar, not fatal
            continue
        if isinstance(value, (list, tuple, MultiValue)):
            value = [_plain(v, factor) for v in value]
        else:
            value = _plain(value, factor)
        if value not in ("", None, []):
            out[key] = value
    return out


def _plain(value: object, factor: float) -> object:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).strip()
    if isinstance(value, int) and factor == 1.0:
        return int(value)
    return float(f"{float(value) * factor:.9g}")


# ----------------------------------------------------------------------------------------------
# gradients in the image frame


def bvec(b_value: float | None, gradient: tuple[float, float, float] | None, frame: str,
         orientation: tuple[float, ...], phase_direction: str = "") -> tuple[float, tuple[float, float, float]]:
    """A volume's b-value and gradient direction as dcm2niix writes them to ``.bval`` and ``.bvec``.

    The image frame is that of medtl's (and dcm2niix's) voxel axes: columns, rows reversed (the NIfTI row
    flip), slices ascending along ``row × column``. A patient-frame (LPS) direction ``g`` becomes
    ``(g·row, −g·column, g·normal)``; a UIH image-frame direction ``(r, p, s)`` becomes ``(r, −p, s)``; GE's
    logical-frame vector goes through dcm2niix's ``geCorrectBvecs`` (plane-dependent flips, the row flip, a
    swap for row phase encoding, a final negation, and its b-value rescaled by the squared vector length
    when the scanner shortened the vector).

    Args:
        b_value: s/mm² (``None`` = 0).
        gradient: the direction in ``frame``; ``None`` for b = 0 and isotropic images.
        frame: ``patient``, ``image`` or ``ge`` (:class:`Diffusion`).
        orientation: ImageOrientationPatient (row cosines, then column cosines).
        phase_direction: InPlanePhaseEncodingDirection (``ROW`` / ``COL``), for GE.

    Returns:
        ``(b_value, (x, y, z))``, the vector ``(0, 0, 0)`` for b = 0 or without a direction.

    Examples:
        >>> bvec(1000.0, (0.0, 1.0, 0.0), "patient", (1, 0, 0, 0, 1, 0))
        (1000.0, (0.0, -1.0, 0.0))
    """
    b = float(b_value or 0.0)
    if gradient is None or b <= 0 or math.sqrt(sum(v * v for v in gradient)) <= 1e-7:
        return b, (0.0, 0.0, 0.0)
    row, col = orientation[:3], orientation[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    g = list(gradient)
    if frame == "patient":
        g = [_dot(g, row), -_dot(g, col), _dot(g, normal)]
        norm = math.sqrt(sum(v * v for v in g))
        g = [v / norm for v in g]
    elif frame == "image":
        g = [g[0], -g[1], g[2]]
    else:  # GE
        length = math.sqrt(sum(v * v for v in g))
        if 0.03 < length < 0.97:  # the scanner scaled the vector instead of the b-value (dcm2niix issues 163, 245)
            scaled = b * length * length
            rounded = 5.0 if 0 < scaled < 5 else float(int((scaled + 2.5) / 5) * 5)
            g = [v * math.sqrt(b / rounded) for v in g] if rounded else [0.0, 0.0, 0.0]
            b = rounded
        plane = max(range(3), key=lambda i: abs(normal[i]))  # 0 sagittal, 1 coronal, 2 axial
        flips = ((True, True, False), (False, True, True), (False, False, True))[plane]
        g = [-v if flip else v for v, flip in zip(g, flips)]
        g[1] = -g[1]
        if phase_direction.upper() == "ROW":
            g = [-g[1], g[0], g[2]]
        g = [-v for v in g]
    return b, tuple(0.0 if abs(v) == 0 else float(v) for v in g)


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


MIN_DIFFUSION_B_VALUE = 6.0
"""s/mm²: a series whose b-values are all equal and no higher than this, without directions, is not diffusion
weighted (dcm2niix's threshold): no ``.bval``/``.bvec`` for it."""


def is_diffusion_weighted(volumes: Sequence[tuple[float, tuple[float, float, float]]]) -> bool:
    """Whether a series' ``(b-value, bvec)`` per volume call for ``.bval``/``.bvec``, as dcm2niix decides.

    Args:
        volumes: from :func:`bvec`, one per volume.

    Returns:
        True when the b-values differ, all exceed :data:`MIN_DIFFUSION_B_VALUE`, or some direction is not zero.

    Examples:
        >>> is_diffusion_weighted([(0.0, (0.0, 0.0, 0.0))] * 10)
        False
        >>> is_diffusion_weighted([(0.0, (0.0, 0.0, 0.0)), (1000.0, (1.0, 0.0, 0.0))])
        True
    """
    b_values = [b for b, _ in volumes]
    return bool(volumes) and (len(set(b_values)) > 1 or min(b_values) > MIN_DIFFUSION_B_VALUE
                              or any(any(v) for _, v in volumes))
