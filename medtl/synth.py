"""Synthetic multi-hospital chest-radiograph cohort, written as real DICOM files.

Every hospital in :class:`~medtl.config.SynthConfig` gets its own acquisition profile, both in the
headers (vendor, photometric interpretation, bit depth, rescale, pixel spacing) and in the pixels
(intensity curve, contrast, noise, blur, matrix size), so that models trained at one site see a real
domain shift at another. A hospital may also acquire its images *with the finding* differently
(``HospitalProfile.positive_acquisition``: another matrix, view or detector), an acquisition shortcut for
:mod:`medtl.evaluate.shortcut` to find. Images carry realistic fake PHI for de-identification to remove, and a few
broken files and one exact duplicate are planted so that ingestion's quarantine and accounting are
exercised.

Everything is a pure function of ``cfg.seed``: the same config writes byte-identical files, and no
header depends on the wall clock.

Layout written by :func:`write_cohort`::

    out_dir/labels.csv                 path,label  (labeled images only, path relative to out_dir)
    out_dir/<hospital>/<opaque id>.dcm
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import functools
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from medtl.config import HospitalProfile, SynthConfig
from medtl.ingest.sandbox import available_cpus

logger = logging.getLogger("medtl.synth")

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
"""SOP Class UID of Digital X-Ray Image Storage - For Presentation."""

_OPAQUE_NAME = re.compile(r"^[0-9a-f]{16}\.dcm$")
_BROKEN_KINDS = ("truncated", "not_dicom", "no_pixel_data")

_FIRST_NAMES_F = ("Mary", "Anna", "Linda", "Grace", "Sofia", "Emma", "Olivia", "Helen", "Laura", "Julia",
                  "Maria", "Chloe", "Ruth", "Irene", "Nora", "Alice", "Clara", "Eva", "Rosa", "Ingrid")
_FIRST_NAMES_M = ("James", "John", "Robert", "Michael", "David", "Thomas", "Daniel", "Paul", "Mark", "Peter",
                  "Lukas", "Omar", "Henrik", "Marco", "Samuel", "Victor", "Arjun", "Felix", "Hugo", "Karl")
_LAST_NAMES = ("Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Martinez", "Lopez",
               "Wilson", "Anderson", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Thompson", "White",
               "Harris", "Clark", "Lewis", "Walker", "Young", "King", "Wright", "Scott", "Hill", "Green",
               "Nakamura", "Kowalski", "Novak", "Jansen", "Rossi", "Schmidt", "Okafor", "Haddad", "Larsen")
_STREETS = ("Oak Street", "Maple Avenue", "Cedar Lane", "Pine Road", "Elm Street", "Harbor Drive",
            "Hillcrest Road", "River Street", "Park Avenue", "Mill Lane", "Church Street", "Lake View")
_CITIES = ("Springfield", "Riverton", "Fairview", "Greenville", "Kingsport", "Milford", "Ashland",
           "Brookside", "Clearwater", "Westbury")

# The finding: size (sigma, in units of half the image height) and peak density. Lungs are 0.34
# darker than soft tissue; the texture inside them has an amplitude of about 0.04.
FINDING_SIGMA = (0.06, 0.12)
FINDING_AMPLITUDE = (0.25, 0.45)

# How the stored value range is used: detectors never use the extreme codes.
_STORED_LOW, _STORED_HIGH = 0.04, 0.96


@dataclass(frozen=True)
class HospitalCounts:
    """What :func:`write_cohort` wrote for one hospital."""

    labeled: int
    unlabeled: int
    labeled_positive: int
    broken: int


@dataclass(frozen=True)
class SynthSummary:
    """Counts of a written cohort; ``str()`` gives one line."""

    out_dir: Path
    per_hospital: dict[str, HospitalCounts] = field(default_factory=dict)
    n_files: int = 0
    n_broken: int = 0
    n_duplicates: int = 0

    def __str__(self) -> str:
        sites = " + ".join(f"{name} {c.labeled + c.unlabeled} ({c.labeled} labeled, {c.labeled_positive} positive)"
                           for name, c in self.per_hospital.items())
        return (f"synthetic cohort {self.out_dir}: {self.n_files} files = {sites} "
                f"+ {self.n_broken} broken + {self.n_duplicates} duplicate")


# ----------------------------------------------------------------------------------------------
# anatomy and pixels


@dataclass(frozen=True)
class Anatomy:
    """Per-patient anatomy in normalised coordinates (image height spans [-1, 1])."""

    body_half_width: float
    center_x: float
    lung_x: float
    lung_y: float
    lung_ax: tuple[float, float]
    lung_ay: tuple[float, float]
    heart_scale: float
    rib_period: float
    rib_slope: float
    rotation_deg: float


@dataclass(frozen=True)
class Blob:
    """A soft Gaussian density in normalised anatomy coordinates (see :class:`Anatomy`)."""

    x: float
    y: float
    sigma: float
    amplitude: float
    elongation: float = 1.0
    angle: float = 0.0


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy.

    Args:
        rng: random generator of this patient.

    Returns:
        The patient's :class:`Anatomy`.
    """
    ax = rng.uniform(0.24, 0.30)
    ay = rng.uniform(0.52, 0.62)
    return Anatomy(
        body_half_width=rng.uniform(0.82, 0.96),
        center_x=rng.normal(0.0, 0.03),
        lung_x=rng.uniform(0.31, 0.37),
        lung_y=rng.uniform(-0.12, -0.02),
        # the right lung (image left) is usually a little larger than the left one
        lung_ax=(ax * rng.uniform(1.0, 1.08), ax),
        lung_ay=(ay, ay * rng.uniform(0.92, 1.0)),
        heart_scale=rng.uniform(0.85, 1.2),
        rib_period=rng.uniform(0.15, 0.19),
        rib_slope=rng.uniform(0.3, 0.5),
        rotation_deg=rng.normal(0.0, 2.5),
    )


def jitter_anatomy(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The same patient imaged again: slightly different positioning and inspiration.

    Args:
        anatomy: the patient's anatomy.
        rng: random generator of this image.

    Returns:
        A perturbed copy.
    """
    inspiration = rng.uniform(0.96, 1.04)
    return Anatomy(
        body_half_width=anatomy.body_half_width,
        center_x=anatomy.center_x + rng.normal(0.0, 0.015),
        lung_x=anatomy.lung_x,
        lung_y=anatomy.lung_y + rng.normal(0.0, 0.015),
        lung_ax=anatomy.lung_ax,
        lung_ay=(anatomy.lung_ay[0] * inspiration, anatomy.lung_ay[1] * inspiration),
        heart_scale=anatomy.heart_scale,
        rib_period=anatomy.rib_period,
        rib_slope=anatomy.rib_slope,
        rotation_deg=anatomy.rotation_deg + rng.normal(0.0, 1.0),
    )


def _lung_center(anatomy: Anatomy, side: int) -> tuple[float, float]:
    sign = -1.0 if side == 0 else 1.0
    return anatomy.center_x + sign * anatomy.lung_x, anatomy.lung_y


def _point_in_lung(anatomy: Anatomy, rng: np.random.Generator, max_radius: float = 0.8) -> tuple[float, float]:
    side = int(rng.integers(2))
    cx, cy = _lung_center(anatomy, side)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    radius = max_radius * np.sqrt(rng.uniform())
    return cx + anatomy.lung_ax[side] * radius * np.cos(theta), cy + anatomy.lung_ay[side] * radius * np.sin(theta)


def sample_blobs(anatomy: Anatomy, rng: np.random.Generator, finding: bool) -> list[Blob]:
    """The focal opacity (when ``finding``) plus distractors that both classes share.

    The finding is a soft, medium-sized, low-contrast opacity inside a lung field. Distractors make
    the task non-trivial: small bright nodules in the lungs, opacity-like blobs outside the lungs and
    broad hazy densities at the lung bases occur at the same rate in both classes.

    Args:
        anatomy: the anatomy the blobs are placed in.
        rng: random generator of this image.
        finding: whether to include the finding.

    Returns:
        Blobs in normalised anatomy coordinates.
    """
    blobs: list[Blob] = []
    if finding:
        x, y = _point_in_lung(anatomy, rng)
        blobs.append(Blob(x, y, sigma=rng.uniform(*FINDING_SIGMA), amplitude=rng.uniform(*FINDING_AMPLITUDE),
                          elongation=rng.uniform(1.0, 1.6), angle=rng.uniform(0.0, np.pi)))
    for _ in range(rng.poisson(0.8)):
        x, y = _point_in_lung(anatomy, rng, max_radius=0.9)
        blobs.append(Blob(x, y, sigma=rng.uniform(0.010, 0.022), amplitude=rng.uniform(0.10, 0.25)))
    if rng.uniform() < 0.35:
        # an opacity of the same kind as the finding but outside the lungs (shoulder or abdomen)
        y = rng.choice([rng.uniform(-0.95, -0.75), rng.uniform(0.65, 0.9)])
        x = anatomy.center_x + rng.uniform(-0.6, 0.6)
        blobs.append(Blob(x, y, sigma=rng.uniform(*FINDING_SIGMA), amplitude=rng.uniform(*FINDING_AMPLITUDE)))
    if rng.uniform() < 0.3:
        # soft-tissue overlap at a lung base: broad and faint
        side = int(rng.integers(2))
        cx, cy = _lung_center(anatomy, side)
        blobs.append(Blob(cx + rng.normal(0.0, 0.05), cy + 0.6 * anatomy.lung_ay[side], sigma=rng.uniform(0.15, 0.22),
                          amplitude=rng.uniform(0.03, 0.07), elongation=1.8, angle=0.0))
    return blobs


def _cosine_field(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """A smooth random field: a random mix of separable cosines of the given spatial frequencies."""
    cy = np.cos(np.pi * freqs[None, :] * y[:, None] + rng.uniform(0, 2 * np.pi, len(freqs))[None, :])
    cx = np.cos(np.pi * freqs[None, :] * x[:, None] + rng.uniform(0, 2 * np.pi, len(freqs))[None, :])
    weights = rng.normal(0.0, 1.0, (len(freqs), len(freqs))) / (1.0 + freqs[:, None] * freqs[None, :])
    # einsum rather than matmul: BLAS threads would spin against the worker processes
    out = np.einsum("ik,kl,jl->ij", cy, weights, cx).astype(np.float32)
    return out / max(float(np.abs(out).max()), 1e-6)


def _add_blob(img: np.ndarray, blob: Blob, to_pixel: np.ndarray, px_per_unit: float) -> None:
    """Add ``blob`` in place, evaluated only in a window of 4 sigma around its centre."""
    r0, c0 = to_pixel @ np.array([blob.y, blob.x, 1.0])
    sigma_px = blob.sigma * px_per_unit
    half = int(np.ceil(4.0 * sigma_px * blob.elongation)) + 1
    top, bottom = max(int(r0) - half, 0), min(int(r0) + half + 1, img.shape[0])
    left, right = max(int(c0) - half, 0), min(int(c0) + half + 1, img.shape[1])
    if top >= bottom or left >= right:
        return
    dr = np.arange(top, bottom, dtype=np.float32)[:, None] - np.float32(r0)
    dc = np.arange(left, right, dtype=np.float32)[None, :] - np.float32(c0)
    cos, sin = np.float32(np.cos(blob.angle)), np.float32(np.sin(blob.angle))
    u = (cos * dc + sin * dr) / np.float32(sigma_px * blob.elongation)
    v = (-sin * dc + cos * dr) / np.float32(sigma_px)
    img[top:bottom, left:right] += np.float32(blob.amplitude) * np.exp(-0.5 * (u * u + v * v))


def _upsample2(img: np.ndarray, axis: int) -> np.ndarray:
    """Linear 2x upsampling along ``axis`` with pixel-centre alignment (edges clamped)."""
    a = np.moveaxis(img, axis, 0)
    before = np.concatenate([a[:1], a[:-1]])
    after = np.concatenate([a[1:], a[-1:]])
    out = np.empty((2 * a.shape[0], *a.shape[1:]), dtype=img.dtype)
    out[0::2] = 0.75 * a + 0.25 * before
    out[1::2] = 0.75 * a + 0.25 * after
    return np.moveaxis(out, 0, axis)


def _soft_step(t: np.ndarray) -> np.ndarray:
    """Smooth 0→1 transition over t in [-1, 1] (cheaper than a logistic, same look)."""
    t = np.clip(0.5 * t + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def render_density(anatomy: Anatomy, blobs: list[Blob], rows: int, columns: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Render a chest-radiograph-like density map (bright = dense) before any acquisition effects.

    Everything here is smooth, so matrices of 160 pixels or more are rendered at half resolution
    and upsampled linearly; that halves the cohort's generation time.

    Args:
        anatomy: patient anatomy.
        blobs: focal densities (finding and distractors) from :func:`sample_blobs`.
        rows: image height in pixels.
        columns: image width in pixels.
        rng: random generator of this image (texture).

    Returns:
        ``float32`` array ``(rows, columns)`` with values roughly in [0, 1].
    """
    factor = 2 if min(rows, columns) >= 160 else 1
    n_rows, n_cols = -(-rows // factor), -(-columns // factor)
    aspect = columns / rows
    # normalised coordinates of the (possibly coarse) pixel centres: rows span [-1, 1]
    yi = ((np.arange(n_rows, dtype=np.float32) * factor + factor / 2) / rows * 2.0 - 1.0)[:, None]
    xi = ((np.arange(n_cols, dtype=np.float32) * factor + factor / 2) / columns * 2.0 - 1.0)[None, :] * aspect
    theta = np.deg2rad(anatomy.rotation_deg)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    # anatomy coordinates of every pixel: the patient is rotated by theta on the detector
    x = cos * xi + sin * yi
    y = -sin * xi + cos * yi

    dx = x - np.float32(anatomy.center_x)
    adx = np.abs(dx)
    # body: a rounded rectangle that narrows to the neck at the top
    half_width = anatomy.body_half_width - (anatomy.body_half_width - 0.3) * _soft_step((-0.82 - y) / 0.1)
    bx, by = np.square(dx / half_width), np.square(y / 1.25)
    body = _soft_step((1.0 - np.sqrt(np.sqrt(bx * bx + by * by))) / 0.04)
    lungs = np.zeros_like(body)
    for side in (0, 1):
        cx, cy = _lung_center(anatomy, side)
        ty = (y - cy) / anatomy.lung_ay[side]
        # egg-shaped: narrow apex, wide base
        half_x = anatomy.lung_ax[side] * (1.0 + 0.3 * np.clip(ty, -1.0, 1.0))
        lungs += _soft_step((1.0 - np.sqrt(np.square((x - cx) / half_x) + np.square(ty))) / 0.12)
    lung_base = anatomy.lung_y + max(anatomy.lung_ay)
    h = anatomy.heart_scale
    heart = _soft_step((1.0 - np.sqrt(np.square((dx - 0.1) / (0.26 * h))
                                      + np.square((y - lung_base + 0.28) / (0.22 * h)))) / 0.2)
    mediastinum = np.exp(-np.square(np.square(dx / 0.1))) * _soft_step((lung_base - y) / 0.2)
    lungs = np.minimum(lungs, 1.0) * (1.0 - heart) * (1.0 - mediastinum)
    ribcage = _soft_step((1.0 - np.sqrt(np.square(dx / (anatomy.lung_x + max(anatomy.lung_ax) + 0.08))
                                        + np.square((y - anatomy.lung_y) / (max(anatomy.lung_ay) + 0.1)))) / 0.1)
    rib_phase = (y - anatomy.rib_slope * adx + 0.6 * dx * dx) * (2.0 * np.pi / anatomy.rib_period)
    rib_sq = np.square(np.maximum(np.cos(rib_phase), 0.0))
    ribs = rib_sq * rib_sq
    clavicles = (np.exp(-np.square((y - anatomy.lung_y + max(anatomy.lung_ay) - 0.08 + 0.15 * adx) / 0.035))
                 * _soft_step((adx - 0.08) / 0.04) * _soft_step((0.6 - adx) / 0.06))
    spine = np.exp(-np.square(np.square(dx / 0.07))) * (1.0 + 0.15 * np.cos((2.0 * np.pi / 0.09) * y))
    hilum = np.exp(-(np.square(adx - 0.2) + np.square(y - anatomy.lung_y)) / 0.15)

    density = (0.04 + 0.50 * body + 0.05 * ribcage - 0.34 * lungs + 0.05 * heart + 0.12 * spine
               + 0.07 * ribs * ribcage + 0.10 * clavicles
               + 0.03 * _cosine_field(rng, yi[:, 0], xi[0, :], np.arange(1, 5, dtype=np.float32)) * body
               + 0.035 * _cosine_field(rng, yi[:, 0], xi[0, :], np.arange(6, 16, dtype=np.float32))
               * lungs * (0.4 + hilum)).astype(np.float32)

    # (row, col) of an anatomy point (y, x): undo the rotation, then scale to the pixel grid
    px_per_unit = rows / (2.0 * factor)
    to_image = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    to_grid = np.array([[px_per_unit, 0.0, rows / (2.0 * factor) - 0.5],
                        [0.0, px_per_unit, columns / (2.0 * factor) - 0.5]])
    for blob in blobs:
        _add_blob(density, blob, to_grid @ to_image, px_per_unit)
    if factor == 2:
        density = _upsample2(_upsample2(density, 0), 1)[:rows, :columns]
    return np.ascontiguousarray(density)


def acquire(density: np.ndarray, profile: HospitalProfile, rng: np.random.Generator) -> np.ndarray:
    """Turn a density map into the stored pixel values of one hospital's detector.

    Applies the hospital's contrast, intensity curve (gamma), blur and noise, then its
    ``acquisition_shift`` through :func:`medtl.data.shift.simulate_acquisition` if it has one, quantises to
    ``bits_stored`` bits and stores MONOCHROME1 inverted. The modality value of a stored pixel is
    ``stored * rescale_slope + rescale_intercept`` (equivalently ``stored = (value - intercept) / slope``).

    Args:
        density: output of :func:`render_density`.
        profile: the acquiring hospital.
        rng: random generator of this image (noise).

    Returns:
        ``uint16`` array of stored values.
    """
    signal = np.clip(0.5 + profile.contrast * (density - 0.5), 0.0, 1.0) ** profile.gamma
    if profile.blur_sigma_px > 0:
        signal = gaussian_filter(signal, profile.blur_sigma_px, mode="nearest")
    if profile.noise_std > 0:
        signal = signal + rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(profile.noise_std)
    if profile.acquisition_shift is not None:
        # imported here: medtl.data.shift loads torch and MONAI (5 s), which a cohort without shifts never needs
        from medtl.data.shift import profile_from_spec, simulate_acquisition

        shift = profile_from_spec(profile.acquisition_shift, profile.name)
        signal = simulate_acquisition(np.clip(signal, 0.0, 1.0)[None].astype(np.float32), shift, rng)[0]
    full_scale = 2 ** profile.bits_stored - 1
    stored = np.rint((_STORED_LOW + (_STORED_HIGH - _STORED_LOW) * np.clip(signal, 0.0, 1.0)) * full_scale)
    if profile.photometric == "MONOCHROME1":
        stored = full_scale - stored
    return stored.astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# headers


@dataclass(frozen=True)
class Site:
    """Per-hospital identifying details that appear in every header of that hospital."""

    address: str
    station: str
    serial: str
    code: str


@dataclass(frozen=True)
class Patient:
    """Fake patient demographics."""

    name: str
    patient_id: str
    other_id: str
    sex: str
    birth: dt.date
    address: str
    phone: str


def _person_name(rng: np.random.Generator, sex: str) -> tuple[str, str]:
    first = str(rng.choice(_FIRST_NAMES_F if sex == "F" else _FIRST_NAMES_M))
    return str(rng.choice(_LAST_NAMES)), first


def _address(rng: np.random.Generator) -> str:
    return f"{rng.integers(1, 999)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)} {rng.integers(10000, 99999)}"


def _sample_site(profile: HospitalProfile, rng: np.random.Generator) -> Site:
    code = "".join(word[0] for word in profile.institution.split() if word[0].isalpha()).upper()[:3]
    return Site(address=_address(rng), station=f"{code}DX{rng.integers(1, 9)}",
                serial=f"SN{rng.integers(10**7, 10**8)}", code=code)


def _sample_patient(rng: np.random.Generator, mrn: int, site: Site) -> Patient:
    sex = "F" if rng.uniform() < 0.5 else "M"
    last, first = _person_name(rng, sex)
    middle = chr(ord("A") + int(rng.integers(26)))
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(rng.integers(0, 75 * 365)))
    return Patient(name=f"{last}^{first}^{middle}", patient_id=f"{site.code}{mrn:07d}",
                   other_id=f"{rng.integers(10**8, 10**9)}", sex=sex, birth=birth, address=_address(rng),
                   phone=f"+1-555-{rng.integers(100, 999)}-{rng.integers(1000, 9999)}")


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["medtl-synth", *map(str, parts)]))


def acquisition_profile(profile: HospitalProfile, finding: bool) -> HospitalProfile:
    """The profile an image is acquired with: the hospital's, or for an image with the finding at a hospital with
    ``positive_acquisition``, the hospital's with those fields replaced.

    Args:
        profile: the hospital.
        finding: whether the image shows the finding.

    Returns:
        ``profile`` itself when nothing differs (so every other image renders exactly as before), else a copy.

    Examples:
        >>> h = HospitalProfile(name="a", manufacturer="m", model_name="x", institution="i",
        ...                     positive_acquisition={"rows": 160, "columns": 192, "view_position": "AP"})
        >>> p = acquisition_profile(h, finding=True)
        >>> (p.rows, p.columns, p.view_position), acquisition_profile(h, finding=False) is h
        ((160, 192, 'AP'), True)
    """
    if not finding or profile.positive_acquisition is None:
        return profile
    changes = {name: value for name, value in profile.positive_acquisition.model_dump().items() if value is not None}
    return profile.model_copy(update={**changes, "positive_acquisition": None})


_SERIES_DESCRIPTION = {"PA": "PA ERECT", "AP": "AP PORTABLE"}


def build_dataset(profile: HospitalProfile, site: Site, patient: Patient, stored: np.ndarray,
                  study_date: dt.date, rng: np.random.Generator, uid_key: tuple) -> Dataset:
    """Assemble the DICOM dataset (with file meta) of one image.

    Args:
        profile: acquiring hospital.
        site: the hospital's identifying details.
        patient: the patient.
        stored: stored pixel values from :func:`acquire`.
        study_date: date of the study.
        rng: random generator of this image (times, accession number, staff names).
        uid_key: values that make this image's UIDs unique and reproducible.

    Returns:
        A dataset ready for :func:`pydicom.dcmwrite` with ``enforce_file_format=True``.
    """
    study_uid, series_uid, sop_uid, frame_uid = (_uid(*uid_key, kind) for kind in ("study", "series", "sop", "for"))
    date = study_date.strftime("%Y%m%d")
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    time = f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"
    ref_last, ref_first = _person_name(rng, "F" if rng.uniform() < 0.5 else "M")
    op_last, op_first = _person_name(rng, "F" if rng.uniform() < 0.5 else "M")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", date)
        setattr(ds, f"{prefix}Time", time)
    ds.AccessionNumber = f"A{rng.integers(10**8, 10**9)}"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.InstitutionAddress = site.address
    ds.ReferringPhysicianName = f"{ref_last}^{ref_first}^^^Dr."
    ds.StationName = site.station
    ds.StudyDescription = f"CHEST {profile.view_position}"
    ds.SeriesDescription = _SERIES_DESCRIPTION[profile.view_position]
    ds.OperatorsName = f"{op_last}^{op_first}"
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.OtherPatientIDs = patient.other_id
    ds.PatientAge = _age(patient.birth, study_date)
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = site.serial
    ds.ViewPosition = profile.view_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{rng.integers(1000, 99999)}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = stored.shape
    spacing = f"{profile.pixel_spacing_mm:g}"
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{profile.rescale_intercept:g}"
    ds.RescaleSlope = f"{profile.rescale_slope:g}"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.ProcedureCodeSequence = Sequence([_code("RPID16", "RADLEX", "XR CHEST PA")])
    block = ds.private_block(0x0011, "MEDTL SYNTH PACS", create=True)
    block.add_new(0x01, "LO", f"{patient.name} {patient.patient_id}")
    block.add_new(0x02, "LO", f"exported for {ref_last} {ref_first}")
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def encode(ds: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file.

    Args:
        ds: dataset with file meta.

    Returns:
        The file's bytes.
    """
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# cohort


# Independent random streams; keys have a fixed length because numpy's SeedSequence gives
# [a, b] and [a, b, 0] the same stream.
_STREAM_SITE, _STREAM_LABELS, _STREAM_PATIENT, _STREAM_IMAGE = range(4)
_ROLES = ("labeled", "unlabeled", "extra")


def _rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    padded = [*key, *([0] * (4 - len(key)))]
    return np.random.default_rng([seed % 2**64, stream, *padded])


@dataclass(frozen=True)
class _Task:
    """One file to write; everything random about it follows from these keys and the seed."""

    relpath: str
    h_index: int
    role_index: int
    index: int
    mrn: int
    finding: bool
    label: int | None
    broken_kind: str | None


def _opaque_name(seed: int, hospital: str, role: str, index: int) -> str:
    return hashlib.sha256(f"{seed}/{hospital}/{role}/{index}".encode()).hexdigest()[:16] + ".dcm"


def _plan_hospital(cfg: SynthConfig, h_index: int, n_broken: int) -> list[_Task]:
    """Decide labels, patient numbers and file names of one hospital (cheap; no pixels)."""
    profile = cfg.hospitals[h_index]
    sizes = (cfg.labeled_per_hospital, cfg.unlabeled_per_hospital, n_broken)
    patients_per_role = [-(-n // cfg.images_per_patient) for n in sizes]
    mrns = _rng(cfg.seed, _STREAM_SITE, h_index, 1).choice(10**7, size=sum(patients_per_role), replace=False)
    tasks: list[_Task] = []
    first_patient = 0
    for role_index, (role, n) in enumerate(zip(_ROLES, sizes)):
        findings = np.zeros(n, dtype=bool)
        if role != "extra":
            findings[: int(round(profile.prevalence * n))] = True
            _rng(cfg.seed, _STREAM_LABELS, h_index, role_index).shuffle(findings)
        for i in range(n):
            if role == "extra":
                # broken file j of the cohort lives in hospital j % n_hospitals and has kind j % 3
                j = h_index + i * len(cfg.hospitals)
                kind: str | None = _BROKEN_KINDS[j % len(_BROKEN_KINDS)]
                name = _opaque_name(cfg.seed, profile.name, "broken", i)
            else:
                kind, name = None, _opaque_name(cfg.seed, profile.name, role, i)
            tasks.append(_Task(relpath=f"{profile.name}/{name}", h_index=h_index, role_index=role_index, index=i,
                               mrn=int(mrns[first_patient + i // cfg.images_per_patient]),
                               finding=bool(findings[i]), label=int(findings[i]) if role == "labeled" else None,
                               broken_kind=kind))
        first_patient += patients_per_role[role_index]
    return tasks


def _render_file(cfg: SynthConfig, task: _Task) -> bytes:
    """Render the bytes of one planned file (valid DICOM, or a broken one)."""
    profile = cfg.hospitals[task.h_index]
    site = _sample_site(profile, _rng(cfg.seed, _STREAM_SITE, task.h_index))
    patient_index, visit = divmod(task.index, cfg.images_per_patient)
    patient_rng = _rng(cfg.seed, _STREAM_PATIENT, task.h_index, task.role_index, patient_index)
    patient = _sample_patient(patient_rng, task.mrn, site)
    anatomy = sample_anatomy(patient_rng)
    first_date = dt.date(2018, 1, 1) + dt.timedelta(days=int(patient_rng.integers(0, 5 * 365)))
    follow_ups = patient_rng.integers(30, 400, size=cfg.images_per_patient)
    study_date = first_date + dt.timedelta(days=int(follow_ups[:visit].sum()))

    rng = _rng(cfg.seed, _STREAM_IMAGE, task.h_index, task.role_index, task.index)
    if visit:
        anatomy = jitter_anatomy(anatomy, rng)
    # the same draws whatever the acquisition: an image without the finding renders as if there were no shortcut
    acquisition = acquisition_profile(profile, task.finding)
    rows = int(round(acquisition.rows * rng.uniform(0.94, 1.06)))
    columns = int(round(acquisition.columns * rng.uniform(0.94, 1.06)))
    density = render_density(anatomy, sample_blobs(anatomy, rng, task.finding), rows, columns, rng)
    ds = build_dataset(acquisition, site, patient, acquire(density, acquisition, rng), study_date, rng,
                       uid_key=(cfg.seed, profile.name, _ROLES[task.role_index], task.index))
    if task.broken_kind == "truncated":
        data = encode(ds)
        return data[: len(data) // 2]
    if task.broken_kind == "not_dicom":
        return b"modality worklist export\nstatus: FAILED\nreason: transfer aborted by remote AE\n"
    if task.broken_kind == "no_pixel_data":
        del ds.PixelData
    return encode(ds)


def _write_task(cfg: SynthConfig, out_dir: Path, task: _Task) -> None:
    _write_atomic(out_dir / task.relpath, _render_file(cfg, task))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_cohort(cfg: SynthConfig, out_dir: Path) -> SynthSummary:
    """Write the synthetic cohort described by ``cfg`` into ``out_dir``.

    Re-running with the same config rewrites identical files; DICOM files that a previous run wrote
    into a hospital folder (opaque ``<16 hex>.dcm`` names) and that this config no longer produces
    are removed, so the folder always holds exactly this cohort. Other files are left alone.

    Args:
        cfg: cohort description (hospitals, sizes, seed, number of broken files, workers).
        out_dir: destination folder; created if missing.

    Returns:
        A :class:`SynthSummary` of what was written.
    """
    out_dir = Path(out_dir)
    names = [h.name for h in cfg.hospitals]
    if len(set(names)) != len(names):
        raise ValueError(f"synth.hospitals: hospital names must be unique, got {names}")
    unsafe = [n for n in names if n in ("", ".", "..") or Path(n).name != n]
    if unsafe:
        raise ValueError(f"synth.hospitals: names {unsafe} cannot be folder names; use e.g. hospital_a")
    n_hosp = len(cfg.hospitals)
    tasks = [task for h in range(n_hosp)
             for task in _plan_hospital(cfg, h, len(range(h, cfg.broken_files, n_hosp)))]
    for name in names:
        (out_dir / name).mkdir(parents=True, exist_ok=True)

    write = functools.partial(_write_task, cfg, out_dir)
    workers = min(cfg.workers or available_cpus(), len(tasks))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
    else:
        for task in tasks:
            write(task)

    # the duplicated file is unlabeled when possible so that labels.csv is unaffected
    source = next((t for t in tasks if t.role_index == 1), tasks[0])
    duplicate = f"{names[0]}/{_opaque_name(cfg.seed, names[0], 'duplicate', 0)}"
    _write_atomic(out_dir / duplicate, (out_dir / source.relpath).read_bytes())

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(sorted((t.relpath, t.label) for t in tasks if t.label is not None))
    _write_atomic(out_dir / "labels.csv", text.getvalue().encode())

    _remove_stale(out_dir, names, {t.relpath for t in tasks} | {duplicate})
    per_hospital = {
        name: HospitalCounts(
            labeled=cfg.labeled_per_hospital, unlabeled=cfg.unlabeled_per_hospital,
            labeled_positive=sum(t.label == 1 for t in tasks if t.h_index == h),
            broken=sum(t.broken_kind is not None for t in tasks if t.h_index == h))
        for h, name in enumerate(names)}
    summary = SynthSummary(out_dir=out_dir, per_hospital=per_hospital, n_files=len(tasks) + 1,
                           n_broken=cfg.broken_files, n_duplicates=1)
    logger.info("%s", summary)
    return summary


def _remove_stale(out_dir: Path, hospitals: list[str], keep: set[str]) -> None:
    """Delete cohort files an earlier run with another config left behind (and only those)."""
    for name in hospitals:
        for path in (out_dir / name).iterdir():
            if path.is_file() and _OPAQUE_NAME.match(path.name) and f"{name}/{path.name}" not in keep:
                logger.info("removing stale cohort file %s", path)
                path.unlink()
