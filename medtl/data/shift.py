"""Simulated acquisition shift: one real dataset turned into several "hospitals".

A hospital differs from another by how it acquires images (detector, dose, processing, display) and by whom it
images (the prevalence of the finding). :class:`AcquisitionProfile` describes the first, a frozen set of
parameters that all default to "no change"; :func:`simulate_acquisition` applies one profile to one image, a pure
function of the image and a random generator; :class:`SimulateAcquisitiond` is the same as a MONAI dictionary
transform; :func:`resample_prevalence` handles the second; :func:`simulate_hospitals` splits a dataset into
patient-disjoint hospitals, each with its own profile and prevalence.

Images are ``(C, *spatial)`` float arrays in [0, 1] (2D or 3D, as everywhere in :mod:`medtl.data.transforms`),
brighter meaning more attenuation (MONOCHROME2, bone bright).

The perturbations follow the ones used to study acquisition shift in radiography and CT, e.g. Castro et al.,
"Causality matters in medical imaging", Nat. Commun. 2020 (acquisition shift vs. prevalence shift);
Pérez-García et al., "TorchIO", Comput. Methods Programs Biomed. 2021 (blur, resolution, noise, gamma);
Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019 (corruptions at graded severities).

Examples:
    >>> rng = np.random.default_rng(0)
    >>> image = rng.uniform(size=(1, 32, 32)).astype(np.float32)
    >>> shifted = simulate_acquisition(image, PRESET_PROFILES["low_dose_portable"], rng)
    >>> shifted.shape, shifted.dtype, bool(0 <= shifted.min() and shifted.max() <= 1)
    ((1, 32, 32), dtype('float32'), True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_dst_type
from scipy.ndimage import gaussian_filter

_RANGE_TOLERANCE = 1e-5
"""How far outside [0, 1] an input may stray (rounding of earlier transforms) before it is refused; it is clipped."""


@dataclass(frozen=True)
class AcquisitionProfile:
    """How a simulated hospital acquires, processes and stores an image; every default means "no change".

    The operations, in the order :func:`simulate_acquisition` applies them, are grouped by where they happen
    physically: geometry, optics and detector sampling, quanta, image processing, display, stored mask.

    Args:
        name: the hospital's name (any non-empty string).
        crop: field of view: fraction of each spatial side cut away, the rest resized back to the input size
            (a tighter field of view or a closer patient position), in [0, 0.45].
        blur_sigma: Gaussian blur of the detector's point-spread function and scatter, in pixels, in [0, 20].
        downsample_factor: detector pixel pitch relative to the input's: each spatial side is area-averaged
            down by this factor and linearly interpolated back up, which removes detail, in [1, 16].
        exposure: detector gain (dose relative to the reference); the signal is multiplied by it and
            saturates at 1, in (0, 10].
        photon_count: quanta that a full-scale (1.0) pixel receives: the signal becomes
            ``Poisson(photon_count · s) / photon_count``, whose variance is ``s / photon_count`` (lower means a
            lower dose); None adds no quantum noise. At least 1.
        read_noise_sigma: standard deviation of the detector's additive Gaussian read-out noise (fraction of
            full scale), in [0, 1].
        contrast: strength k of a sigmoid tone curve (the characteristic curve of the processing): k > 0 is an
            S-curve, more contrast in the mid-tones; k < 0 its inverse, flatter mid-tones; 0 the identity. Both
            map 0 → 0 and 1 → 1. In [-20, 20].
        gamma: exponent of the intensity curve ``s ** gamma`` (< 1 brightens, > 1 darkens), in [0.1, 10].
        window_center, window_width: a windowing mistake: the display window ``[c - w/2, c + w/2]`` is
            stretched to [0, 1], clipping what lies outside. Both set or both None; c in [0, 1], w in (0, 4].
        invert: store the image inverted (``1 - s``), as a MONOCHROME1 image read as MONOCHROME2 would be.
        collimation: fraction of each spatial side blacked out (set to 0) at the border, as by the collimator's
            shutters masked in the stored image, in [0, 0.45].

    Examples:
        >>> AcquisitionProfile("reference").is_identity
        True
        >>> AcquisitionProfile("x", gamma=0)
        Traceback (most recent call last):
        ...
        ValueError: AcquisitionProfile 'x': gamma must be in [0.1, 10] (1 = no change), got 0
    """

    name: str = "reference"
    crop: float = 0.0
    blur_sigma: float = 0.0
    downsample_factor: float = 1.0
    exposure: float = 1.0
    photon_count: float | None = None
    read_noise_sigma: float = 0.0
    contrast: float = 0.0
    gamma: float = 1.0
    window_center: float | None = None
    window_width: float | None = None
    invert: bool = False
    collimation: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"AcquisitionProfile name must be a non-empty string, got {self.name!r}")
        checks = (  # field, low, high, low inclusive, what "no change" is
            ("crop", 0.0, 0.45, True, "0"),
            ("blur_sigma", 0.0, 20.0, True, "0"),
            ("downsample_factor", 1.0, 16.0, True, "1"),
            ("exposure", 0.0, 10.0, False, "1"),
            ("read_noise_sigma", 0.0, 1.0, True, "0"),
            ("contrast", -20.0, 20.0, True, "0"),
            ("gamma", 0.1, 10.0, True, "1"),
            ("collimation", 0.0, 0.45, True, "0"),
        )
        for field, low, high, closed, neutral in checks:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not (low <= value if closed else low < value) or value > high:
                bracket = "[" if closed else "("
                raise ValueError(f"AcquisitionProfile {self.name!r}: {field} must be in {bracket}{low:g}, {high:g}] "
                                 f"({neutral} = no change), got {value!r}")
        if self.photon_count is not None and (isinstance(self.photon_count, bool)
                                              or not isinstance(self.photon_count, (int, float))
                                              or not math.isfinite(self.photon_count) or self.photon_count < 1):
            raise ValueError(f"AcquisitionProfile {self.name!r}: photon_count must be a number >= 1 (quanta per "
                             f"full-scale pixel; smaller is noisier) or None for no quantum noise, "
                             f"got {self.photon_count!r}")
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError(f"AcquisitionProfile {self.name!r}: set both window_center and window_width (a wrong "
                             f"display window) or neither, got center={self.window_center!r}, "
                             f"width={self.window_width!r}")
        if self.window_center is not None:
            if not 0.0 <= self.window_center <= 1.0:
                raise ValueError(f"AcquisitionProfile {self.name!r}: window_center must be in [0, 1], "
                                 f"got {self.window_center!r}")
            if not 0.0 < self.window_width <= 4.0:
                raise ValueError(f"AcquisitionProfile {self.name!r}: window_width must be in (0, 4] "
                                 f"(1 with center 0.5 = no change), got {self.window_width!r}")
        if not isinstance(self.invert, (bool, np.bool_)):
            raise ValueError(f"AcquisitionProfile {self.name!r}: invert must be True or False, got {self.invert!r}")

    @property
    def is_identity(self) -> bool:
        """Whether this profile leaves every image unchanged (all parameters at their defaults)."""
        defaults = AcquisitionProfile()
        return all(getattr(self, f.name) == getattr(defaults, f.name)
                   for f in dataclasses.fields(self) if f.name != "name")


PRESET_PROFILES: Mapping[str, AcquisitionProfile] = MappingProxyType({
    "reference": AcquisitionProfile("reference"),
    "low_dose_portable": AcquisitionProfile("low_dose_portable", exposure=0.8, photon_count=150.0,
                                            read_noise_sigma=0.02, blur_sigma=0.7, contrast=-2.0),
    "old_detector_blurry": AcquisitionProfile("old_detector_blurry", blur_sigma=1.5, downsample_factor=2.0,
                                              read_noise_sigma=0.01, contrast=-3.0),
    "inverted_monochrome1": AcquisitionProfile("inverted_monochrome1", invert=True),
    "mis_windowed": AcquisitionProfile("mis_windowed", window_center=0.6, window_width=0.5),
    "collimated": AcquisitionProfile("collimated", collimation=0.12),
})
"""Named profiles, one kind of shift each (read-only; build a new :class:`AcquisitionProfile` to combine them)."""


def profile_from_spec(spec: str | Mapping[str, Any] | AcquisitionProfile, name: str) -> AcquisitionProfile:
    """An :class:`AcquisitionProfile` from what a YAML config can hold.

    Args:
        spec: a ``PRESET_PROFILES`` name; or a mapping of :class:`AcquisitionProfile` fields, optionally with
            ``preset`` naming the profile they change (e.g. ``{"preset": "low_dose_portable", "collimation": 0.1}``);
            or a profile (returned renamed).
        name: the profile's name (e.g. the hospital's).

    Returns:
        The validated profile.

    Raises:
        ValueError: on an unknown preset or field, or a value out of range (the message names it).

    Examples:
        >>> profile_from_spec({"preset": "collimated", "blur_sigma": 1.0}, "site_b").collimation
        0.12
    """
    if isinstance(spec, AcquisitionProfile):
        return dataclasses.replace(spec, name=name)
    if isinstance(spec, str):
        return dataclasses.replace(_resolve_profile(spec), name=name)
    if not isinstance(spec, Mapping):
        raise TypeError(f"acquisition shift of {name!r} must be a preset name or a mapping of AcquisitionProfile "
                        f"fields, got {type(spec).__name__}")
    fields = dict(spec)
    base = _resolve_profile(fields.pop("preset")) if "preset" in fields else AcquisitionProfile(name)
    known = {f.name for f in dataclasses.fields(AcquisitionProfile)} - {"name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"acquisition shift of {name!r}: unknown field(s) {unknown}; use preset or any of "
                         f"{sorted(known)}")
    return dataclasses.replace(base, name=name, **fields)


def simulate_acquisition(image: np.ndarray, profile: AcquisitionProfile,
                         rng: np.random.Generator | int) -> np.ndarray:
    """Re-acquire an image as the hospital of ``profile`` would.

    The operations are applied in physical order, each only when its parameter differs from "no change":

    1. geometry: ``crop`` (field of view, resized back to the input size);
    2. optics and detector sampling: ``blur_sigma`` (point-spread function), then ``downsample_factor``
       (pixel pitch: area-average down, linear interpolation back up);
    3. quanta: ``exposure`` (gain, saturating at 1), ``photon_count`` (Poisson noise), ``read_noise_sigma``
       (Gaussian noise), then clipping to [0, 1];
    4. processing: the ``contrast`` tone curve, then ``gamma``;
    5. display: the wrong window (``window_center``, ``window_width``), then ``invert``;
    6. stored mask: ``collimation`` (black border).

    Spatial operations act on every spatial axis (all three of a volume) and never mix channels.

    Args:
        image: ``(C, *spatial)`` array in [0, 1], with 2 or 3 spatial dimensions.
        profile: the acquisition to simulate.
        rng: random generator of the noise (or an integer seed); the same state gives the same output.

    Returns:
        ``(C, *spatial)`` float32 array in [0, 1], the shape of ``image``; a copy of ``image`` (as float32) when
        ``profile.is_identity``.

    Examples:
        >>> x = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
        >>> bool(np.allclose(simulate_acquisition(x, AcquisitionProfile("inv", invert=True), 0), 1 - x))
        True
    """
    if not isinstance(profile, AcquisitionProfile):
        raise TypeError(f"profile must be an AcquisitionProfile (or one of PRESET_PROFILES), got {type(profile)}")
    rng = _as_generator(rng)
    x = _check_image(image)
    spatial_axes = tuple(range(1, x.ndim))
    p = profile

    if p.crop > 0:
        x = _crop_and_resize(x, p.crop)
    if p.blur_sigma > 0:
        x = gaussian_filter(x, sigma=(0.0, *(p.blur_sigma,) * len(spatial_axes)), mode="nearest")
    if p.downsample_factor > 1:
        x = _lower_resolution(x, p.downsample_factor)

    quantum = p.exposure != 1 or p.photon_count is not None or p.read_noise_sigma > 0
    if p.exposure != 1:
        x = x * np.float32(p.exposure)
    if p.photon_count is not None:
        x = rng.poisson(np.clip(x, 0.0, 1.0) * p.photon_count).astype(np.float32) / np.float32(p.photon_count)
    if p.read_noise_sigma > 0:
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(p.read_noise_sigma)
    if quantum or p.blur_sigma > 0 or p.downsample_factor > 1 or p.crop > 0:
        x = np.clip(x, 0.0, 1.0)

    if p.contrast != 0:
        x = tone_curve(x, p.contrast)
    if p.gamma != 1:
        x = x ** np.float32(p.gamma)
    if p.window_center is not None:
        low = p.window_center - p.window_width / 2
        x = np.clip((x - np.float32(low)) / np.float32(p.window_width), 0.0, 1.0)
    if p.invert:
        x = 1.0 - x
    if p.collimation > 0:
        x = x.copy()
        for axis, size in zip(spatial_axes, x.shape[1:]):
            border = min(int(round(p.collimation * size)), size // 2)
            if border:
                index = [slice(None)] * x.ndim
                index[axis] = np.r_[0:border, size - border:size]
                x[tuple(index)] = 0.0
    out = np.asarray(x, dtype=np.float32)
    return out.copy() if out is image else out


def tone_curve(x: np.ndarray, strength: float) -> np.ndarray:
    """Sigmoid tone curve through (0, 0) and (1, 1): S-shaped for ``strength`` > 0, its inverse for < 0.

    ``y = (σ(k (x - ½)) - σ(-k/2)) / (σ(k/2) - σ(-k/2))`` for k > 0, the exact inverse of that curve with
    ``|k|`` for k < 0, and ``y = x`` for k = 0; monotone increasing in every case.

    Args:
        x: array of values in [0, 1], any shape.
        strength: k, in [-20, 20].

    Returns:
        Array of ``x``'s shape and dtype, in [0, 1].

    Examples:
        >>> tone_curve(np.array([0.0, 0.5, 1.0]), 8.0)
        array([0. , 0.5, 1. ])
    """
    x = np.asarray(x)
    if strength == 0:
        return x.copy()
    k = abs(float(strength))
    low, high = _sigmoid(-k / 2), _sigmoid(k / 2)
    xd = x.astype(np.float64)
    if strength > 0:
        y = (_sigmoid(k * (xd - 0.5)) - low) / (high - low)
    else:
        t = np.clip(low + xd * (high - low), low, high)
        y = 0.5 + np.log(t / (1 - t)) / k
    return np.clip(y, 0.0, 1.0).astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)


class SimulateAcquisitiond(MapTransform, Randomizable):
    """Dictionary transform: re-acquire ``keys`` with an :class:`AcquisitionProfile` (see :func:`simulate_acquisition`).

    Place it after :func:`medtl.data.transforms.preprocess` (it needs intensities in [0, 1]) and before
    :func:`medtl.data.transforms.normalize`. Each call draws fresh noise from its own random state, which
    ``seed``, :meth:`set_random_state` and MONAI's data loaders set, so a seeded pipeline is reproducible. Arrays,
    tensors and MetaTensors come back as the type they came in (metadata kept).

    Args:
        keys: keys of the images to transform.
        profile: the acquisition to simulate, or the name of one of ``PRESET_PROFILES``.
        seed: seed of the transform's random state.
        allow_missing_keys: do not fail on a sample without some of ``keys``.

    Examples:
        >>> t = SimulateAcquisitiond("image", "inverted_monochrome1")
        >>> float(t({"image": np.zeros((1, 4, 4), np.float32)})["image"].min())
        1.0
    """

    def __init__(self, keys: KeysCollection, profile: AcquisitionProfile | str, seed: int = 0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.profile = _resolve_profile(profile)
        self.set_random_state(seed=seed)
        self._call_seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the seed of this call's noise from the transform's random state."""
        self._call_seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        rng = np.random.default_rng(self._call_seed)
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            out = simulate_acquisition(array, self.profile, rng)
            d[key] = convert_to_dst_type(out, value, dtype=np.float32 if isinstance(value, np.ndarray)
                                         else torch.float32)[0]
        return d


def resample_prevalence(labels: np.ndarray, target_prevalence: float, rng: np.random.Generator | int,
                        n: int | None = None, replace: bool = False) -> np.ndarray:
    """Indices of a subset of ``labels`` whose fraction of positives is ``target_prevalence`` (prevalence shift).

    Positives and negatives are drawn without replacement. With ``n=None`` the subset is the largest one that
    has the requested prevalence; with ``n`` given it has ``n`` samples, ``round(target_prevalence · n)``
    positive, so its prevalence is within half a sample of the target (strictly within for ``n=None``: the
    largest subset is never one where ``target_prevalence · n`` falls half-way between two counts).

    Args:
        labels: (N,) binary labels, 0/1 or bool (1 = the finding).
        target_prevalence: fraction of positives wanted, in [0, 1].
        rng: random generator (or integer seed) choosing which samples are kept.
        n: size of the subset, or None for the largest possible.
        replace: when ``n`` needs more samples of a class than there are, draw that class's shortfall with
            replacement (every sample of it is still used once first) instead of failing.

    Returns:
        (n,) int64 indices into ``labels``, sorted (with repeats only when ``replace`` had to be used).

    Raises:
        ValueError: on labels that are not binary, a prevalence outside [0, 1], or a prevalence that these
            labels cannot give (no positives for a prevalence above 0, or too few of a class for ``n``).

    Examples:
        >>> labels = np.array([1, 1, 0, 0, 0, 0, 0, 0])
        >>> idx = resample_prevalence(labels, 0.5, rng=0)
        >>> len(idx), float(labels[idx].mean())
        (4, 0.5)
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be (N,), got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be binary 0/1 (1 = the finding) to resample prevalence, got values "
                         f"{np.unique(y).tolist()[:6]}: map the positive class to 1 and the rest to 0 first")
    if isinstance(target_prevalence, bool) or not 0.0 <= float(target_prevalence) <= 1.0:
        raise ValueError(f"target_prevalence must be a fraction in [0, 1], got {target_prevalence!r}")
    if n is not None and (int(n) != n or n < 1):
        raise ValueError(f"n must be a positive integer or None (the largest subset), got {n!r}")
    rng = _as_generator(rng)
    p = float(target_prevalence)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos_available, n_neg_available = len(positives), len(negatives)
    if p > 0 and n_pos_available == 0:
        raise ValueError(f"target_prevalence {p} needs positive samples, but labels has none")
    if p < 1 and n_neg_available == 0:
        raise ValueError(f"target_prevalence {p} needs negative samples, but labels has none")

    if n is None:
        n = _largest_subset(p, n_pos_available, n_neg_available)
        if n == 0:
            raise ValueError(f"no subset of {n_pos_available} positives and {n_neg_available} negatives has "
                             f"prevalence {p} within half a sample: pass n (and replace=True) or a prevalence "
                             f"closer to {n_pos_available / len(y):.3f}")
    n = int(n)
    n_pos = int(math.floor(p * n + 0.5))
    n_neg = n - n_pos
    if not replace and (n_pos > n_pos_available or n_neg > n_neg_available):
        largest = _largest_subset(p, n_pos_available, n_neg_available)
        raise ValueError(f"prevalence {p} with n={n} needs {n_pos} positives and {n_neg} negatives, but labels has "
                         f"{n_pos_available} and {n_neg_available}: use n <= {largest}, n=None (the largest "
                         f"subset), or replace=True to repeat samples")
    chosen = np.concatenate([_draw(positives, n_pos, rng), _draw(negatives, n_neg, rng)])
    return np.sort(chosen).astype(np.int64)


def simulate_hospitals(images: np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
                       profiles: Sequence[AcquisitionProfile | str], prevalences: Sequence[float | None] | None = None,
                       seed: int = 0, groups: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Split one dataset into disjoint simulated hospitals, each re-acquired with its own profile.

    Patients (``groups``) are shuffled and dealt into as many equal parts as there are profiles, so no patient
    and no image is in two hospitals. A hospital with a prevalence then keeps the largest subset of its part
    that has that prevalence (:func:`resample_prevalence`); the images it drops are in no hospital. Without
    prevalences, the hospitals together hold every image exactly once. Each image's noise comes from a
    generator seeded by ``(seed, hospital index, image index)``, so the result does not depend on the order of
    the work.

    Args:
        images: (N, C, *spatial) array, or N arrays (C, *spatial), in [0, 1].
        labels: (N,) labels (binary 0/1 wherever a prevalence is requested).
        profiles: one profile (or ``PRESET_PROFILES`` name) per hospital; names must be distinct.
        prevalences: one target prevalence (or None to keep the part's own) per hospital, or None for all.
        seed: seed of the split, the resampling and the noise.
        groups: (N,) patient ids, or None when every image is its own patient.

    Returns:
        One dict per hospital, in the order of ``profiles``: ``name`` (str), ``profile``, ``indices`` ((n,) int64
        indices into the inputs, sorted), ``images`` ((n, C, *spatial) float32), ``labels`` ((n,)), ``groups``
        ((n,) patient ids) and ``prevalence`` (fraction of label 1, NaN for an empty hospital).

    Examples:
        >>> images = np.random.default_rng(0).uniform(size=(16, 1, 8, 8)).astype(np.float32)
        >>> labels = np.arange(16) % 2
        >>> sites = simulate_hospitals(images, labels, ["reference", "inverted_monochrome1"], prevalences=[None, 0.2])
        >>> [(s["name"], len(s["indices"]), s["prevalence"]) for s in sites]  # 4 of 8 positives → 1 of 5
        [('reference', 8, 0.5), ('inverted_monochrome1', 5, 0.2)]
    """
    resolved = [_resolve_profile(p) for p in profiles]
    if not resolved:
        raise ValueError("profiles is empty: pass one AcquisitionProfile (or preset name) per hospital")
    names = [p.name for p in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"hospital names must be distinct, got {names}: give each AcquisitionProfile its own name "
                         f"(dataclasses.replace(profile, name=...))")
    stacked = [np.asarray(image) for image in images] if not isinstance(images, np.ndarray) else list(images)
    y = np.asarray(labels)
    if y.shape != (len(stacked),):
        raise ValueError(f"labels must be (N,) = ({len(stacked)},), one per image, got {y.shape}")
    patient = np.arange(len(y)) if groups is None else np.asarray(groups)
    if patient.shape != y.shape:
        raise ValueError(f"groups must be (N,) = {y.shape}, one patient id per image, got {patient.shape}")
    if prevalences is None:
        prevalences = [None] * len(resolved)
    if len(prevalences) != len(resolved):
        raise ValueError(f"prevalences must have one entry (a fraction or None) per profile: {len(resolved)}, "
                         f"got {len(prevalences)}")

    rng = np.random.default_rng(seed)
    unique_patients = np.unique(patient)
    if len(unique_patients) < len(resolved):
        raise ValueError(f"{len(unique_patients)} patients cannot fill {len(resolved)} disjoint hospitals: "
                         f"use fewer profiles or more data")
    parts = np.array_split(rng.permutation(unique_patients), len(resolved))
    hospitals = []
    for h, (profile, prevalence, part) in enumerate(zip(resolved, prevalences, parts)):
        indices = np.flatnonzero(np.isin(patient, part))
        if prevalence is not None:
            try:
                indices = indices[resample_prevalence(y[indices], prevalence, rng)]
            except ValueError as exc:
                raise ValueError(f"hospital {profile.name!r}: {exc}") from exc
        out = [simulate_acquisition(stacked[i], profile, np.random.default_rng([seed, h, int(i)])) for i in indices]
        shape = stacked[0].shape if stacked else (0,)
        hospital_labels = y[indices]
        hospitals.append({
            "name": profile.name,
            "profile": profile,
            "indices": indices.astype(np.int64),
            "images": np.stack(out) if out else np.zeros((0, *shape), np.float32),
            "labels": hospital_labels,
            "groups": patient[indices],
            "prevalence": float(np.mean(hospital_labels == 1)) if len(indices) else float("nan"),
        })
    return hospitals


# ----------------------------------------------------------------------------------------------
# helpers


def _check_image(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim not in (3, 4):
        raise ValueError(f"image must be (C, *spatial) with 2 or 3 spatial dimensions, got shape {x.shape}: add the "
                         f"channel axis first (e.g. image[None])")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer) \
            and x.dtype != np.bool_:
        raise ValueError(f"image must be a numeric array, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if x.size and not np.isfinite(x).all():
        raise ValueError("image contains NaN or inf: fix or drop it before simulating an acquisition")
    if x.size and (x.min() < -_RANGE_TOLERANCE or x.max() > 1 + _RANGE_TOLERANCE):
        raise ValueError(f"image intensities must be in [0, 1], got [{x.min():.4g}, {x.max():.4g}]: rescale it "
                         f"first (e.g. (x - x.min()) / (x.max() - x.min())), and apply the backbone's "
                         f"normalisation only after this transform")
    if x.size and (x.min() < 0 or x.max() > 1):
        x = np.clip(x, 0.0, 1.0)
    return x


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)) or an integer seed, got {type(rng)}")


def _resolve_profile(profile: AcquisitionProfile | str) -> AcquisitionProfile:
    if isinstance(profile, AcquisitionProfile):
        return profile
    if isinstance(profile, str):
        if profile not in PRESET_PROFILES:
            raise ValueError(f"unknown preset profile {profile!r}: choose one of {sorted(PRESET_PROFILES)} or pass "
                             f"an AcquisitionProfile")
        return PRESET_PROFILES[profile]
    raise TypeError(f"profile must be an AcquisitionProfile or a preset name, got {type(profile)}")


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _resize(x: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    """Resize the spatial axes of a (C, *spatial) array; channels are treated as a batch (never mixed)."""
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    if mode == "linear":
        mode = "bilinear" if len(size) == 2 else "trilinear"
        out = F.interpolate(tensor, size=tuple(size), mode=mode, align_corners=False)
    else:
        out = F.interpolate(tensor, size=tuple(size), mode=mode)
    return out[:, 0].numpy()


def _lower_resolution(x: np.ndarray, factor: float) -> np.ndarray:
    spatial = x.shape[1:]
    low = [max(1, int(round(s / factor))) for s in spatial]
    return _resize(_resize(x, low, "area"), spatial, "linear")


def _crop_and_resize(x: np.ndarray, fraction: float) -> np.ndarray:
    spatial = x.shape[1:]
    index = [slice(None)]
    for s in spatial:
        cut = min(int(round(fraction * s)), (s - 1) // 2)
        index.append(slice(cut, s - cut))
    return _resize(x[tuple(index)], spatial, "linear")


def _largest_subset(p: float, n_pos: int, n_neg: int) -> int:
    """Largest n whose round(p n) positives and n - round(p n) negatives are available, p n not a tie (x.5)."""
    if p <= 0:
        return n_neg
    if p >= 1:
        return n_pos
    upper = int(min(math.floor((n_pos + 0.5) / p), math.floor((n_neg + 0.5) / (1 - p)))) + 1
    for n in range(min(upper, n_pos + n_neg), 0, -1):
        k = int(math.floor(p * n + 0.5))
        if k <= n_pos and n - k <= n_neg and abs(k - p * n) < 0.5 - 1e-9:
            return n
    return 0


def _draw(pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k samples of pool: without replacement while the pool lasts, the shortfall with replacement."""
    if k <= len(pool):
        return rng.choice(pool, size=k, replace=False)
    return np.concatenate([pool, rng.choice(pool, size=k - len(pool), replace=True)])
