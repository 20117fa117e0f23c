"""Label shift: prior correction, EM and BBSE target-prior estimates, the bootstrap, and (BC)TS calibration.

The simulated binary problem has a known truth: a score x ~ N(-1.5, 1) for class 0 and N(+1.5, 1) for class 1 at
both hospitals (label shift: only the prevalence differs), so the exact posterior under prior π is
``sigmoid(logit(π) + 3x)``. The "model" outputs the exact source posterior (π_s = 0.74), hence it is calibrated on
the source, and the target hospitals have prevalence 0.45 or 0.62. With this separation (AUC 0.98) and 4000 images
per hospital the standard error of either estimate is about 0.01, so the tolerance of 0.03 is about 3 of them.
"""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from sklearn.base import clone

import medtl.adapt.label_shift
import medtl.evaluate.calibration
from medtl.adapt.label_shift import (LABEL_SHIFT_METHODS, LabelShiftEstimator, bbse_prior, em_prior,
                                     prior_corrected)
from medtl.evaluate.calibration import TemperatureScaling, as_two_class, temperature_scale

SOURCE_PREVALENCE = 0.74
CLASS_MEAN = 1.5


def _logit(p: float | np.ndarray) -> float | np.ndarray:
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _exact_posterior(x: np.ndarray, prevalence: float, class_mean: float = CLASS_MEAN) -> np.ndarray:
    """P(y = 1 | x) for the two unit Gaussians at ±class_mean and P(y = 1) = prevalence."""
    return _sigmoid(_logit(prevalence) + 2 * class_mean * x)


def _hospital(n: int, prevalence: float, seed: int, logit_scale: float = 1.0, class_mean: float = CLASS_MEAN):
    """(model's P(class 1), labels, scores) of n images; the model is the exact source posterior, its logit scaled by
    ``logit_scale`` (3 = over-confident)."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < prevalence).astype(int)
    x = rng.normal(size=n) + np.where(y == 1, class_mean, -class_mean)
    return _sigmoid(logit_scale * _logit(_exact_posterior(x, SOURCE_PREVALENCE, class_mean))), y, x


# --- prior_corrected ----------------------------------------------------------------------------------------------

def test_prior_corrected_is_the_identity_when_the_prior_does_not_change():
    p = np.random.default_rng(0).dirichlet([1, 2, 3], size=50)
    prior = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(prior_corrected(p, prior, prior), p, atol=1e-12)


@pytest.mark.parametrize("target_prevalence", [0.45, 0.62])
def test_prior_corrected_gives_the_exact_target_posterior(target_prevalence):
    x = np.linspace(-4, 4, 81)
    source = as_two_class(_exact_posterior(x, SOURCE_PREVALENCE))
    corrected = prior_corrected(source, np.array([1 - SOURCE_PREVALENCE, SOURCE_PREVALENCE]),
                                np.array([1 - target_prevalence, target_prevalence]))
    np.testing.assert_allclose(corrected[:, 1], _exact_posterior(x, target_prevalence), atol=1e-12)
    np.testing.assert_allclose(corrected.sum(axis=1), 1.0)


def test_prior_corrected_rejects_bad_priors():
    p = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="source_prior must be > 0"):
        prior_corrected(p, np.array([0.0, 1.0]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="target_prior must be"):
        prior_corrected(p, np.array([0.5, 0.5]), np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"source_prior must be \(C,\)"):
        prior_corrected(p, np.array([0.2, 0.3, 0.5]), np.array([0.5, 0.5]))


# --- EM and BBSE recover the target prior -------------------------------------------------------------------------

@pytest.mark.parametrize("target_prevalence", [0.45, 0.62])
def test_em_and_bbse_functions_recover_the_target_prior(target_prevalence):
    source_p, source_y, _ = _hospital(4000, SOURCE_PREVALENCE, seed=1)
    target_p, _, _ = _hospital(4000, target_prevalence, seed=2)
    source_prior = np.array([1 - SOURCE_PREVALENCE, SOURCE_PREVALENCE])  # the exact model's prior
    em = em_prior(as_two_class(target_p), source_prior)
    hard = bbse_prior(as_two_class(source_p), source_y, as_two_class(target_p))
    soft = bbse_prior(as_two_class(source_p), source_y, as_two_class(target_p), soft=True)
    for estimate in (em, hard, soft):
        assert estimate.sum() == pytest.approx(1.0)
        assert abs(estimate[1] - target_prevalence) < 0.03, (em, hard, soft)


@pytest.mark.parametrize("method", LABEL_SHIFT_METHODS)
@pytest.mark.parametrize("target_prevalence", [0.45, 0.62])
def test_estimator_recovers_the_target_prior_and_its_interval_covers_it(method, target_prevalence):
    source_p, source_y, _ = _hospital(4000, SOURCE_PREVALENCE, seed=3)
    target_p, _, _ = _hospital(4000, target_prevalence, seed=4)
    shift = LabelShiftEstimator(method=method, n_bootstrap=100, seed=0).fit(source_p, source_y, target_p)
    assert abs(shift.target_prior_[1] - target_prevalence) < 0.03
    assert shift.ci_low_[1] < target_prevalence < shift.ci_high_[1]
    assert shift.ci_high_[1] - shift.ci_low_[1] < 0.15  # an interval, not everything
    assert shift.n_bootstrap_effective_ == 100
    np.testing.assert_allclose(shift.source_prior_, np.bincount(source_y) / len(source_y))
    np.testing.assert_allclose(shift.weights_, shift.target_prior_ / shift.source_prior_)
    assert (shift.calibration_ is not None) == (method == "em")  # BBSE is never calibrated


def test_em_needs_calibration_and_bcts_provides_it():
    """Logits x 3 make the model over-confident; EM trusts its probabilities and goes wrong, BCTS first fixes it.
    (A weaker model, AUC 0.92, whose over-confidence matters more.)"""
    truth = 0.45
    source_p, source_y, _ = _hospital(4000, SOURCE_PREVALENCE, seed=5, logit_scale=3.0, class_mean=1.0)
    target_p, _, _ = _hospital(4000, truth, seed=6, logit_scale=3.0, class_mean=1.0)
    raw = LabelShiftEstimator(method="em", calibrate=False, n_bootstrap=0).fit(source_p, source_y, target_p)
    calibrated = LabelShiftEstimator(method="em", calibrate=True, n_bootstrap=0).fit(source_p, source_y, target_p)
    raw_error, calibrated_error = abs(raw.target_prior_[1] - truth), abs(calibrated.target_prior_[1] - truth)
    assert calibrated_error < 0.04  # EM's standard error ~0.01, plus the calibration's own estimation error
    assert raw_error > calibrated_error + 0.05, (raw_error, calibrated_error)  # raw: ~0.11 off
    assert raw.calibration_ is None
    assert calibrated.calibration_.temperature_ == pytest.approx(3.0, rel=0.1)


def test_em_after_bcts_on_the_source_split_itself_returns_the_source_prior():
    """At the BCTS optimum the mean calibrated probability of each class is its frequency, EM's fixed point."""
    source_p, source_y, _ = _hospital(1000, SOURCE_PREVALENCE, seed=7, logit_scale=0.5)  # under-confident
    shift = LabelShiftEstimator(method="em", n_bootstrap=0).fit(source_p, source_y, source_p)
    np.testing.assert_allclose(shift.target_prior_, shift.source_prior_, atol=1e-3)


def test_transform_is_the_prior_correction_and_improves_the_target_log_loss():
    source_p, source_y, _ = _hospital(3000, SOURCE_PREVALENCE, seed=8)
    target_p, target_y, _ = _hospital(3000, 0.45, seed=9)
    shift = LabelShiftEstimator(method="em", calibrate=False, n_bootstrap=0).fit(source_p, source_y, target_p)
    corrected = shift.transform(target_p)
    assert corrected.shape == target_p.shape  # 1-D in, 1-D out
    np.testing.assert_allclose(shift.transform(as_two_class(target_p))[:, 1], corrected)
    np.testing.assert_allclose(corrected, prior_corrected(as_two_class(target_p), shift.source_prior_,
                                                          shift.target_prior_)[:, 1])

    def log_loss(p):
        return -np.mean(np.log(np.where(target_y == 1, p, 1 - p)))
    assert log_loss(corrected) < log_loss(target_p) - 0.01

    calibrated = LabelShiftEstimator(method="em", n_bootstrap=0).fit(source_p, source_y, target_p)
    np.testing.assert_allclose(calibrated.transform(target_p),
                               prior_corrected(as_two_class(calibrated.calibration_.transform(target_p)),
                                               calibrated.source_prior_, calibrated.target_prior_)[:, 1])


def test_one_dimensional_and_two_class_inputs_give_the_same_fit():
    source_p, source_y, _ = _hospital(500, SOURCE_PREVALENCE, seed=10)
    target_p, _, _ = _hospital(500, 0.45, seed=11)
    for method in LABEL_SHIFT_METHODS:
        flat = LabelShiftEstimator(method=method, n_bootstrap=20).fit(source_p, source_y, target_p)
        matrix = LabelShiftEstimator(method=method, n_bootstrap=20).fit(
            as_two_class(source_p), source_y, as_two_class(target_p))
        np.testing.assert_allclose(flat.target_prior_, matrix.target_prior_)
        np.testing.assert_allclose(flat.ci_low_, matrix.ci_low_)


def test_em_and_bbse_on_three_classes():
    rng = np.random.default_rng(12)
    means = np.array([[0.0, 0.0], [2.5, 0.0], [0.0, 2.5]])
    source_prior, target_prior = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])

    def hospital(n, prior):
        y = rng.choice(3, size=n, p=prior)
        x = means[y] + rng.normal(size=(n, 2))
        log_likelihood = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
        return _softmax(log_likelihood + np.log(source_prior)), y  # the exact source posterior

    source_p, source_y = hospital(4000, source_prior)
    target_p, _ = hospital(4000, target_prior)
    for method in LABEL_SHIFT_METHODS:
        shift = LabelShiftEstimator(method=method, n_bootstrap=0).fit(source_p, source_y, target_p)
        np.testing.assert_allclose(shift.target_prior_, target_prior, atol=0.03)


# --- BBSE's failure mode ------------------------------------------------------------------------------------------

def test_bbse_raises_a_clear_error_when_the_model_predicts_one_class():
    rng = np.random.default_rng(13)
    source_p = rng.uniform(0.6, 0.95, size=200)  # P(class 1) > 0.5 everywhere: every image predicted class 1
    source_y = rng.integers(0, 2, size=200)
    target_p = rng.uniform(0.1, 0.9, size=200)
    with pytest.raises(ValueError, match=r"invertible.*'em'"):
        bbse_prior(as_two_class(source_p), source_y, as_two_class(target_p))
    with pytest.raises(ValueError, match="invertible"):
        LabelShiftEstimator(method="bbse").fit(source_p, source_y, target_p)
    # EM has no such requirement
    assert np.isfinite(LabelShiftEstimator(method="em", n_bootstrap=0).fit(source_p, source_y, target_p)
                       .target_prior_).all()


def test_a_class_without_labeled_source_images_is_an_error():
    with pytest.raises(ValueError, match=r"source_labels have no image of class\(es\) \[1\]"):
        LabelShiftEstimator().fit(np.full(10, 0.3), np.zeros(10, int), np.full(10, 0.3))
    with pytest.raises(ValueError, match="no image of class"):
        bbse_prior(np.full((4, 3), 1 / 3), np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3))


# --- the bootstrap ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", LABEL_SHIFT_METHODS)
def test_group_bootstrap_draws_whole_patients(method):
    """Four identical images per patient: drawing patients is the image bootstrap of one image per patient (the
    same random draws, hence the same interval), while drawing images makes the interval too narrow."""
    source_p, source_y, _ = _hospital(300, SOURCE_PREVALENCE, seed=14)
    target_p, _, _ = _hospital(300, 0.45, seed=15)
    copies, patients = 4, np.repeat(np.arange(300), 4)
    duplicated = (np.repeat(source_p, copies), np.repeat(source_y, copies), np.repeat(target_p, copies))
    settings = dict(method=method, n_bootstrap=200, seed=3)

    one_image = LabelShiftEstimator(**settings).fit(source_p, source_y, target_p)
    by_patient = LabelShiftEstimator(**settings).fit(*duplicated, source_groups=patients, target_groups=patients)
    by_image = LabelShiftEstimator(**settings).fit(*duplicated)

    np.testing.assert_allclose(by_patient.target_prior_, one_image.target_prior_, atol=1e-6)
    np.testing.assert_allclose(by_patient.ci_low_, one_image.ci_low_, atol=1e-4)
    np.testing.assert_allclose(by_patient.ci_high_, one_image.ci_high_, atol=1e-4)
    assert np.isfinite(by_patient.ci_low_).all() and np.isfinite(by_patient.ci_high_).all()
    width = one_image.ci_high_[1] - one_image.ci_low_[1]
    assert by_image.ci_high_[1] - by_image.ci_low_[1] < 0.7 * width  # ~1/2: pseudo-replication
    assert by_patient.n_source_ == 1200 and by_patient.n_target_ == 1200


def test_patient_ids_may_be_strings_and_only_one_side_grouped():
    source_p, source_y, _ = _hospital(200, SOURCE_PREVALENCE, seed=16)
    target_p, _, _ = _hospital(240, 0.45, seed=17)
    patients = np.array([f"patient-{i // 3}" for i in range(240)])
    shift = LabelShiftEstimator(n_bootstrap=30).fit(source_p, source_y, target_p, target_groups=patients)
    assert np.isfinite(shift.ci_low_).all() and (shift.ci_low_ <= shift.ci_high_).all()
    with pytest.raises(ValueError, match="target_groups must hold one patient id per image"):
        LabelShiftEstimator(n_bootstrap=5).fit(source_p, source_y, target_p, target_groups=patients[:-1])


def test_no_bootstrap_gives_nan_intervals_and_a_json_summary():
    source_p, source_y, _ = _hospital(200, SOURCE_PREVALENCE, seed=18)
    target_p, _, _ = _hospital(150, 0.45, seed=19)
    shift = LabelShiftEstimator(method="em", n_bootstrap=0).fit(source_p, source_y, target_p)
    assert np.isnan(shift.ci_low_).all() and np.isnan(shift.ci_high_).all()
    assert shift.n_bootstrap_effective_ == 0
    summary = json.loads(json.dumps(shift.summary(), allow_nan=False))  # strict JSON: no NaN
    assert set(summary) == {"method", "calibrated", "source_prior", "target_prior", "ci_low", "ci_high",
                            "confidence", "n_source", "n_target", "n_bootstrap"}
    assert summary["ci_low"] == [None, None] and summary["calibrated"] is True
    assert summary["n_source"] == 200 and summary["n_target"] == 150 and summary["n_bootstrap"] == 0
    assert summary["target_prior"] == pytest.approx(shift.target_prior_.tolist())


def test_the_bootstrap_is_reproducible_from_its_seed():
    source_p, source_y, _ = _hospital(200, SOURCE_PREVALENCE, seed=20)
    target_p, _, _ = _hospital(200, 0.45, seed=21)
    a, b, c = (LabelShiftEstimator(method="bbse", n_bootstrap=50, seed=s).fit(source_p, source_y, target_p)
               for s in (1, 1, 2))
    np.testing.assert_array_equal(a.ci_low_, b.ci_low_)
    assert not np.array_equal(a.ci_low_, c.ci_low_)


@pytest.mark.parametrize("arguments, name", [
    (dict(method="kmm"), "method"), (dict(n_bootstrap=-1), "n_bootstrap"), (dict(n_bootstrap=2.5), "n_bootstrap"),
    (dict(confidence=0.4), "confidence"), (dict(confidence=1.0), "confidence"), (dict(calibrate="yes"), "calibrate"),
    (dict(seed=-1), "seed"),
])
def test_estimator_checks_its_arguments(arguments, name):
    with pytest.raises(ValueError, match=name):
        LabelShiftEstimator(**arguments)


def test_estimator_is_a_scikit_learn_estimator():
    assert clone(LabelShiftEstimator(method="bbse", n_bootstrap=7)).get_params()["n_bootstrap"] == 7
    assert clone(TemperatureScaling(bias=True)).bias is True


def test_estimator_rejects_bad_arrays():
    p, y = np.full(10, 0.5), np.arange(10) % 2
    with pytest.raises(ValueError, match="target_probabilities"):
        LabelShiftEstimator().fit(p, y, np.full(10, 1.5))
    with pytest.raises(ValueError, match="source_labels"):
        LabelShiftEstimator().fit(p, y[:-1], p)
    with pytest.raises(ValueError, match="source_probabilities have 2 classes and target_probabilities 3"):
        LabelShiftEstimator().fit(p, y, np.full((10, 3), 1 / 3))
    with pytest.raises(ValueError, match="2 classes but the estimator was fitted on 3"):
        LabelShiftEstimator(n_bootstrap=0).fit(np.full((10, 3), 1 / 3), np.arange(10) % 3,
                                               np.full((10, 3), 1 / 3)).transform(p)


# --- temperature scaling and BCTS ---------------------------------------------------------------------------------

def test_temperature_scaling_undoes_over_confidence():
    probabilities, labels, scores = _hospital(5000, SOURCE_PREVALENCE, seed=22, logit_scale=3.0, class_mean=1.0)
    scaler = TemperatureScaling().fit(probabilities, labels)
    assert scaler.temperature_ == pytest.approx(3.0, rel=0.1)  # its standard error is about 0.07
    np.testing.assert_array_equal(scaler.bias_, [0.0, 0.0])
    assert scaler.nll_after_ < scaler.nll_before_ - 0.05
    exact = _exact_posterior(scores, SOURCE_PREVALENCE, class_mean=1.0)
    assert np.abs(scaler.transform(probabilities) - exact).max() < 0.03


def test_temperature_scaling_a_calibrated_model_changes_little_and_never_worsens_the_nll():
    probabilities, labels, _ = _hospital(3000, SOURCE_PREVALENCE, seed=23)
    for bias in (False, True):
        scaler = TemperatureScaling(bias=bias).fit(probabilities, labels)
        assert scaler.nll_after_ <= scaler.nll_before_
        assert scaler.temperature_ == pytest.approx(1.0, abs=0.1)
        nll = -np.mean(np.log(np.where(labels == 1, scaler.transform(probabilities),
                                       1 - scaler.transform(probabilities))))
        assert nll == pytest.approx(scaler.nll_after_, abs=1e-9)


def test_bcts_bias_recovers_a_shifted_prior():
    """Probabilities exact for prior 0.74 on labels drawn at 0.45: the right correction is T = 1 and a class-1
    bias of logit(0.45) - logit(0.74)."""
    probabilities, labels, _ = _hospital(5000, 0.45, seed=24, class_mean=1.0)
    scaler = TemperatureScaling(bias=True).fit(probabilities, labels)
    assert scaler.bias_[0] == 0.0
    # -1.25; the bias's standard error is about 0.05 here
    assert scaler.bias_[1] == pytest.approx(_logit(0.45) - _logit(SOURCE_PREVALENCE), abs=0.15)
    assert scaler.temperature_ == pytest.approx(1.0, abs=0.1)
    # BCTS's defining property: the mean calibrated probability equals the label frequency
    assert scaler.transform(probabilities).mean() == pytest.approx(labels.mean(), abs=1e-4)
    no_bias = TemperatureScaling().fit(probabilities, labels)
    assert scaler.nll_after_ < no_bias.nll_after_


def test_bcts_on_three_classes_recovers_temperature_and_biases():
    rng = np.random.default_rng(25)
    logits = 1.5 * rng.normal(size=(6000, 3))
    true_bias = np.array([0.0, 0.8, -0.5])
    labels = np.array([rng.choice(3, p=row) for row in _softmax(logits + true_bias)])
    scaler = TemperatureScaling(bias=True).fit(_softmax(2.0 * logits), labels)  # over-confident x 2, biased
    assert scaler.temperature_ == pytest.approx(2.0, rel=0.1)
    np.testing.assert_allclose(scaler.bias_, true_bias, atol=0.12)
    np.testing.assert_allclose(temperature_scale(_softmax(2.0 * logits), scaler.temperature_, scaler.bias_),
                               scaler.transform(_softmax(2.0 * logits)))


def test_one_dimensional_probabilities_round_trip():
    probabilities, labels, _ = _hospital(1000, SOURCE_PREVALENCE, seed=26, logit_scale=2.0)
    flat = TemperatureScaling(bias=True).fit(probabilities, labels)
    matrix = TemperatureScaling(bias=True).fit(as_two_class(probabilities), labels)
    assert flat.temperature_ == pytest.approx(matrix.temperature_)
    calibrated = flat.transform(probabilities)
    assert calibrated.shape == (1000,)
    np.testing.assert_allclose(calibrated, matrix.transform(as_two_class(probabilities))[:, 1])
    # the identity calibration returns the input (clipping at 1e-12 aside)
    identity = TemperatureScaling().fit(probabilities, labels)
    identity.temperature_, identity.bias_ = 1.0, np.zeros(2)
    np.testing.assert_allclose(identity.transform(probabilities), probabilities, atol=1e-11)


def test_warm_start_reaches_the_same_fit():
    probabilities, labels, _ = _hospital(800, SOURCE_PREVALENCE, seed=27, logit_scale=2.5)
    cold = TemperatureScaling(bias=True).fit(probabilities, labels)
    warm = TemperatureScaling(bias=True).fit(probabilities, labels, temperature_init=2.0, bias_init=[0.3, 0.1])
    assert warm.temperature_ == pytest.approx(cold.temperature_, rel=1e-3)
    np.testing.assert_allclose(warm.bias_, cold.bias_, atol=1e-3)


def test_as_two_class():
    np.testing.assert_array_equal(as_two_class(np.array([0.0, 0.25])), [[1.0, 0.0], [0.75, 0.25]])
    with pytest.raises(ValueError, match="p must be a 1-D"):
        as_two_class(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="p must hold probabilities"):
        as_two_class(np.array([0.5, np.nan]))


@pytest.mark.parametrize("probabilities, labels, name", [
    (np.array([[0.5, 0.5], [np.nan, 0.5]]), [0, 1], "probabilities"),
    (np.array([[1.5, -0.5], [0.5, 0.5]]), [0, 1], "probabilities"),
    (np.array([[0.5, 0.2], [0.5, 0.5]]), [0, 1], "probabilities rows must sum to 1"),
    (np.full((2, 1), 1.0), [0, 1], "probabilities must be"),
    (np.full((2, 2, 2), 0.5), [0, 1], "probabilities must be"),
    (np.array([0.2, 1.2]), [0, 1], "probabilities"),
    (np.full((3, 2), 0.5), [0, 1], r"labels must be \(N,\)"),
    (np.full((2, 2), 0.5), [0, 2], r"labels must lie in \[0, 2\)"),
    (np.full((2, 2), 0.5), [0.0, 0.5], "labels must be integer"),
    (np.full((2, 2), 0.5), [1, 1], "labels hold only class 1"),
])
def test_temperature_scaling_rejects_bad_inputs(probabilities, labels, name):
    with pytest.raises(ValueError, match=name):
        TemperatureScaling().fit(probabilities, np.asarray(labels))


def test_temperature_scaling_checks_its_arguments():
    with pytest.raises(ValueError, match="bias must be True"):
        TemperatureScaling(bias="yes")
    scaler = TemperatureScaling().fit(np.array([0.2, 0.8, 0.6]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="probabilities have 3 classes but the calibration was fitted on 2"):
        scaler.transform(np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="temperature_init"):
        TemperatureScaling().fit(np.array([0.2, 0.8]), np.array([0, 1]), temperature_init=0.0)


# --- docstring examples -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [medtl.adapt.label_shift, medtl.evaluate.calibration])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
