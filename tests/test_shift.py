"""The acquisition-shift simulator: each operation does what it claims, 2D and 3D, deterministically."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

import medtl.data.shift
from medtl.data.shift import (PRESET_PROFILES, AcquisitionProfile, SimulateAcquisitiond, resample_prevalence,
                              simulate_acquisition, simulate_hospitals, tone_curve)


def _image(shape=(1, 32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _ramp(size=32) -> np.ndarray:
    return np.tile(np.linspace(0, 1, size, dtype=np.float32), (1, size, 1))


def _high_frequency_energy(image: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftn(image[0] - image[0].mean())) ** 2
    frequencies = np.meshgrid(*[np.fft.fftfreq(s) for s in image.shape[1:]], indexing="ij")
    radius = np.sqrt(sum(f**2 for f in frequencies))
    return float(spectrum[radius > 0.25].sum())


# --- the profile ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 8, 10, 12)])
def test_identity_profile_returns_the_input_exactly(shape):
    image = _image(shape)
    out = simulate_acquisition(image, AcquisitionProfile("same"), np.random.default_rng(0))
    assert out.dtype == np.float32 and out is not image
    np.testing.assert_array_equal(out, image)
    assert AcquisitionProfile("same").is_identity and PRESET_PROFILES["reference"].is_identity
    assert not any(p.is_identity for name, p in PRESET_PROFILES.items() if name != "reference")


@pytest.mark.parametrize("field, value", [("crop", 0.5), ("blur_sigma", -1.0), ("downsample_factor", 0.5),
                                          ("exposure", 0.0), ("photon_count", 0.5), ("read_noise_sigma", -0.1),
                                          ("contrast", 50.0), ("gamma", 0.0), ("collimation", 0.6),
                                          ("gamma", float("nan")), ("invert", "yes")])
def test_profile_rejects_out_of_range_fields(field, value):
    with pytest.raises(ValueError, match=field):
        AcquisitionProfile("bad", **{field: value})


def test_profile_needs_both_window_fields_and_is_frozen():
    with pytest.raises(ValueError, match="both window_center and window_width"):
        AcquisitionProfile("bad", window_center=0.5)
    with pytest.raises(ValueError, match="window_width"):
        AcquisitionProfile("bad", window_center=0.5, window_width=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESET_PROFILES["reference"].gamma = 2.0  # type: ignore[misc]


def test_image_validation_says_how_to_fix_it():
    with pytest.raises(ValueError, match="rescale"):
        simulate_acquisition(np.full((1, 4, 4), 2.0, np.float32), PRESET_PROFILES["reference"], 0)
    with pytest.raises(ValueError, match="channel axis"):
        simulate_acquisition(np.zeros((4, 4), np.float32), PRESET_PROFILES["reference"], 0)
    with pytest.raises(TypeError, match="default_rng"):
        simulate_acquisition(np.zeros((1, 4, 4), np.float32), PRESET_PROFILES["reference"], rng="seed")


# --- each operation -----------------------------------------------------------------------------------------------

def test_blur_lowers_high_frequency_energy():
    image = _image()
    blurred = simulate_acquisition(image, AcquisitionProfile("b", blur_sigma=1.5), 0)
    assert _high_frequency_energy(blurred) < 0.05 * _high_frequency_energy(image)
    assert abs(blurred.mean() - image.mean()) < 0.01


def test_noise_variance_matches_poisson_plus_gaussian():
    flat = np.full((1, 128, 128), 0.5, np.float32)
    poisson = simulate_acquisition(flat, AcquisitionProfile("p", photon_count=100.0), 0)
    assert poisson.var() == pytest.approx(0.5 / 100, rel=0.1)
    assert poisson.mean() == pytest.approx(0.5, abs=0.01)
    both = simulate_acquisition(flat, AcquisitionProfile("pg", photon_count=100.0, read_noise_sigma=0.05), 0)
    assert both.var() == pytest.approx(0.5 / 100 + 0.05**2, rel=0.1)
    read = simulate_acquisition(flat, AcquisitionProfile("g", read_noise_sigma=0.03), 0)
    assert read.std() == pytest.approx(0.03, rel=0.1)


def test_exposure_scales_and_saturates():
    x = np.array([0.1, 0.3, 0.6], np.float32).reshape(1, 1, 3)
    out = simulate_acquisition(x, AcquisitionProfile("e", exposure=2.0), 0)
    np.testing.assert_allclose(out.ravel(), [0.2, 0.6, 1.0], atol=1e-6)


def test_inversion_maps_x_to_one_minus_x():
    image = _image()
    np.testing.assert_allclose(simulate_acquisition(image, PRESET_PROFILES["inverted_monochrome1"], 0),
                               1 - image, atol=1e-7)


def test_lower_resolution_removes_detail_but_keeps_smooth_content():
    checkerboard = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)[None]
    profile = AcquisitionProfile("lo", downsample_factor=2.0)
    out = simulate_acquisition(checkerboard, profile, 0)
    assert out.shape == checkerboard.shape
    assert out.std() < 0.05 * checkerboard.std()  # 2-pixel detail is gone
    ramp = _ramp()
    np.testing.assert_allclose(simulate_acquisition(ramp, profile, 0), ramp, atol=0.04)


def test_collimation_zeroes_the_border_only():
    image = _image() * 0.5 + 0.25  # strictly positive
    out = simulate_acquisition(image, AcquisitionProfile("c", collimation=0.125), 0)  # 4 of 32 pixels per side
    border = np.ones((32, 32), bool)
    border[4:28, 4:28] = False
    assert (out[0][border] == 0).all()
    np.testing.assert_array_equal(out[0, 4:28, 4:28], image[0, 4:28, 4:28])


def test_crop_zooms_in():
    ramp = _ramp()
    out = simulate_acquisition(ramp, AcquisitionProfile("z", crop=0.25), 0)
    assert out.shape == ramp.shape
    assert out[0, :, 0].min() > 0.2 and out[0, :, -1].max() < 0.8  # the field of view is the central half
    assert (np.diff(out[0, 0]) >= -1e-6).all()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gamma_is_monotone_and_fixes_the_endpoints(gamma):
    ramp = _ramp()
    out = simulate_acquisition(ramp, AcquisitionProfile("g", gamma=gamma), 0)
    assert (np.diff(out[0, 0]) > 0).all()
    assert out[0, 0, 0] == 0 and out[0, 0, -1] == 1
    assert (out <= ramp + 1e-7).all() if gamma > 1 else (out >= ramp - 1e-7).all()


@pytest.mark.parametrize("strength", [-6.0, 6.0])
def test_tone_curve_is_monotone_with_its_inverse(strength):
    x = np.linspace(0, 1, 101)
    y = tone_curve(x, strength)
    assert (np.diff(y) > 0).all() and y[0] == 0 and y[-1] == pytest.approx(1)
    assert y[25] < x[25] if strength > 0 else y[25] > x[25]  # an S-curve darkens the lower mid-tones
    np.testing.assert_allclose(tone_curve(y, -strength), x, atol=1e-9)


def test_wrong_window_clips_and_rescales():
    x = np.array([0.1, 0.25, 0.5, 0.75, 0.9], np.float32).reshape(1, 1, 5)
    out = simulate_acquisition(x, AcquisitionProfile("w", window_center=0.5, window_width=0.5), 0)
    np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 1, 1], atol=1e-6)


# --- determinism, 3D, presets, the transform -----------------------------------------------------------------------

def test_same_seed_same_output_other_seed_other_output():
    image, profile = _image(), PRESET_PROFILES["low_dose_portable"]
    a = simulate_acquisition(image, profile, np.random.default_rng(7))
    np.testing.assert_array_equal(a, simulate_acquisition(image, profile, np.random.default_rng(7)))
    np.testing.assert_array_equal(a, simulate_acquisition(image, profile, 7))
    assert not np.array_equal(a, simulate_acquisition(image, profile, 8))


@pytest.mark.parametrize("name", sorted(PRESET_PROFILES))
def test_every_preset_works_in_3d(name):
    volume = _image((1, 12, 12, 12))
    out = simulate_acquisition(volume, PRESET_PROFILES[name], 0)
    assert out.shape == volume.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


def test_3d_blur_and_collimation_act_on_all_three_axes():
    volume = _image((1, 16, 16, 16))
    blurred = simulate_acquisition(volume, AcquisitionProfile("b", blur_sigma=1.5), 0)
    assert _high_frequency_energy(blurred) < 0.05 * _high_frequency_energy(volume)
    masked = simulate_acquisition(volume * 0.5 + 0.25, AcquisitionProfile("c", collimation=0.125), 0)
    assert (masked[:, :2] == 0).all() and (masked[:, :, :, -2:] == 0).all() and (masked[:, 2:-2, 2:-2, 2:-2] > 0).all()


def test_dictionary_transform_keeps_types_and_is_reproducible():
    image = _image()
    t = SimulateAcquisitiond(["image"], "low_dose_portable", seed=3)
    first = t({"image": image, "label": 1})
    assert first["label"] == 1 and isinstance(first["image"], np.ndarray) and first["image"].shape == image.shape
    second = t({"image": image})["image"]
    assert not np.array_equal(first["image"], second)  # fresh noise per call
    again = SimulateAcquisitiond(["image"], "low_dose_portable", seed=3)({"image": image})["image"]
    np.testing.assert_array_equal(first["image"], again)

    meta = MetaTensor(torch.from_numpy(image), meta={"filename_or_obj": "x.npy"})
    pipeline = Compose([SimulateAcquisitiond("image", PRESET_PROFILES["inverted_monochrome1"])])
    out = pipeline({"image": meta})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.npy"
    np.testing.assert_allclose(out.numpy(), 1 - image, atol=1e-7)
    with pytest.raises(ValueError, match="unknown preset"):
        SimulateAcquisitiond("image", "blurry")


# --- prevalence and hospitals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prevalence", [0.0, 0.1, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("n", [None, 37])
def test_resampling_hits_the_prevalence_within_one_sample(prevalence, n):
    labels = (np.random.default_rng(1).uniform(size=200) < 0.4).astype(int)
    idx = resample_prevalence(labels, prevalence, np.random.default_rng(0), n=n)
    assert len(np.unique(idx)) == len(idx)  # without replacement
    if n is not None:
        assert len(idx) == n
    assert abs(labels[idx].sum() - prevalence * len(idx)) <= 1
    largest = resample_prevalence(labels, prevalence, 0)  # n=None: the largest subset, here >= 60 of 200
    assert len(largest) >= 60 and abs(labels[largest].sum() - prevalence * len(largest)) < 0.5


def test_resampling_errors_and_replacement():
    labels = np.array([1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="use n <= 2"):
        resample_prevalence(labels, 0.5, 0, n=6)
    idx = resample_prevalence(labels, 0.5, 0, n=6, replace=True)
    assert labels[idx].sum() == 3 and (idx == 0).sum() == 3
    with pytest.raises(ValueError, match="needs positive samples"):
        resample_prevalence(np.zeros(5, int), 0.2, 0)
    with pytest.raises(ValueError, match="binary"):
        resample_prevalence(np.array([0, 1, 2]), 0.2, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resample_prevalence(labels, 1.5, 0)


def test_hospitals_are_patient_disjoint_and_cover_the_dataset():
    n = 40
    images = _image((n, 1, 8, 8))
    labels = np.arange(n) % 2
    groups = np.arange(n) // 2  # two images per patient
    profiles = ["reference", "low_dose_portable", "collimated"]
    sites = simulate_hospitals(images, labels, profiles, seed=1, groups=groups)
    assert [s["name"] for s in sites] == profiles
    all_indices = np.concatenate([s["indices"] for s in sites])
    assert sorted(all_indices.tolist()) == list(range(n))  # every image exactly once
    patients = [set(s["groups"].tolist()) for s in sites]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for site in sites:
        assert site["images"].shape == (len(site["indices"]), 1, 8, 8) and site["images"].dtype == np.float32
        np.testing.assert_array_equal(site["labels"], labels[site["indices"]])
    np.testing.assert_array_equal(sites[0]["images"], images[sites[0]["indices"]])  # the reference is untouched
    assert (sites[2]["images"][:, :, 0] == 0).all()  # collimated
    again = simulate_hospitals(images, labels, profiles, seed=1, groups=groups)
    np.testing.assert_array_equal(sites[1]["images"], again[1]["images"])


def test_hospitals_with_prevalence_shift():
    n = 60
    images = _image((n, 1, 8, 8))
    labels = (np.arange(n) % 3 == 0).astype(int)  # prevalence 1/3
    sites = simulate_hospitals(images, labels, ["reference", "old_detector_blurry"], prevalences=[0.1, None])
    low, kept = sites
    assert abs(low["labels"].sum() - 0.1 * len(low["indices"])) <= 1 and low["prevalence"] < 0.2
    assert len(kept["indices"]) == n // 2  # no prevalence: the whole part
    assert not set(low["indices"].tolist()) & set(kept["indices"].tolist())
    with pytest.raises(ValueError, match="distinct"):
        simulate_hospitals(images, labels, ["reference", "reference"])
    with pytest.raises(ValueError, match="one entry"):
        simulate_hospitals(images, labels, ["reference", "collimated"], prevalences=[0.5])


def test_docstring_examples_run():
    result = doctest.testmod(medtl.data.shift, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
