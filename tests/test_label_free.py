"""Label-free performance estimation (medtl.evaluate.label_free): the maths against their definitions, and ATC /
agreement on a simulated shift whose true target AUC and accuracy are known from the target labels."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from medtl.evaluate.label_free import (
    AgreementEstimator,
    ATCEstimator,
    atc_threshold,
    confidence_score,
    estimated_drop_warning,
    expected_accuracy,
    expected_auc,
    shift_decision_boundary,
)

MU = 1.5  # source class means ±MU, unit variance: the calibrated logistic model is σ(2·MU·x)


def _cohort(rng: np.random.Generator, n: int, closer: float = 1.0, noise: float = 0.0) -> tuple[np.ndarray, ...]:
    """(P(class 1) of the source-calibrated model, labels) on a cohort whose feature is closer·x + noise·ε."""
    y = rng.integers(0, 2, n)
    x = closer * (rng.normal(size=n) + MU * (2 * y - 1)) + noise * rng.normal(size=n)
    return expit(2 * MU * x), y


def _pairwise_expected_auc(s: np.ndarray, q: np.ndarray) -> float:
    """The definition, O(N²): Σ_{i≠j} q_i (1 − q_j) K_ij / Σ_{i≠j} q_i (1 − q_j)."""
    kernel = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    mass = q[:, None] * (1 - q[None, :])
    np.fill_diagonal(mass, 0.0)
    return float((mass * kernel).sum() / mass.sum())


# ---------------------------------------------------------------- expected_auc / expected_accuracy


def test_expected_auc_is_one_half_when_every_q_is_equal() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    for value in (0.05, 0.3, 0.5, 0.9):
        assert expected_auc(scores, np.full(300, value)) == pytest.approx(0.5, abs=1e-12)
        assert expected_auc(scores, np.full(300, value), w=rng.integers(0, 4, 300)) == pytest.approx(0.5, abs=1e-12)


def test_expected_auc_of_hard_labels_is_sklearns_auc_ties_included() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    scores = np.round(np.clip(0.5 + 0.25 * (2 * y - 1) + 0.3 * rng.normal(size=500), 0, 1), 1)  # heavy ties
    assert expected_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    w = rng.integers(1, 5, 500).astype(float)  # hard labels have no self-pairs: sklearn's weighted AUC too
    assert expected_auc(scores, y, w=w) == pytest.approx(roc_auc_score(y, scores, sample_weight=w), abs=1e-12)


def test_expected_auc_matches_the_pairwise_definition_for_soft_labels() -> None:
    rng = np.random.default_rng(2)
    scores = np.round(rng.random(60), 1)
    q = rng.random(60)
    assert expected_auc(scores, q) == pytest.approx(_pairwise_expected_auc(scores, q), abs=1e-12)


def test_weighted_expected_auc_equals_the_index_duplicated_form() -> None:
    rng = np.random.default_rng(3)
    scores, q = np.round(rng.random(80), 1), rng.random(80)
    w = rng.integers(0, 4, 80)  # 0 = not drawn, 3 = drawn three times (a bootstrap replicate)
    duplicated = np.repeat(np.arange(80), w)
    assert expected_auc(scores, q, w=w) == pytest.approx(expected_auc(scores[duplicated], q[duplicated]), abs=1e-12)
    assert expected_auc(scores, q, w=w) == pytest.approx(
        _pairwise_expected_auc(scores[duplicated], q[duplicated]), abs=1e-12)


def test_expected_auc_is_n_log_n_for_200k_images() -> None:
    rng = np.random.default_rng(4)
    scores, q = rng.random(200_000), rng.random(200_000)
    started = time.perf_counter()
    value = expected_auc(scores, q)
    assert time.perf_counter() - started < 1.0
    assert value == pytest.approx(0.5, abs=0.01)  # q independent of the scores


def test_expected_auc_is_nan_without_positive_negative_mass() -> None:
    assert np.isnan(expected_auc([0.1, 0.7, 0.4], [1.0, 1.0, 1.0]))
    assert np.isnan(expected_auc([0.3], [0.4]))  # a single image has no pair


def test_expected_accuracy_counts_q_for_positive_decisions_and_one_minus_q_otherwise() -> None:
    prob, q = np.array([0.9, 0.2, 0.6, 0.4]), np.array([0.8, 0.1, 0.3, 0.7])
    assert expected_accuracy(prob, q, threshold=0.5) == pytest.approx((0.8 + 0.9 + 0.3 + 0.3) / 4)
    assert expected_accuracy(prob, q, threshold=0.35) == pytest.approx((0.8 + 0.9 + 0.3 + 0.7) / 4)  # 0.4 now positive
    assert expected_accuracy(prob, q, threshold=0.95) == pytest.approx((0.2 + 0.9 + 0.7 + 0.3) / 4)
    assert expected_accuracy(prob, q, 0.5, w=[2, 0, 0, 0]) == pytest.approx(0.8)


# ---------------------------------------------------------------- confidence_score / atc_threshold


def test_shifted_probability_is_positive_exactly_when_p_reaches_the_threshold() -> None:
    rng = np.random.default_rng(5)
    for t in (0.05, 0.3, 0.5, 0.71, 0.97):
        p = np.r_[rng.random(2000), t, np.nextafter(t, 0), np.nextafter(t, 1), 0.0, 1.0]
        shifted = shift_decision_boundary(p, t)
        np.testing.assert_array_equal(shifted >= 0.5, p >= t)
        assert ((shifted >= 0) & (shifted <= 1)).all()


def test_confidence_at_threshold_one_half_is_the_plain_confidence() -> None:
    p = np.linspace(0, 1, 101)
    np.testing.assert_allclose(confidence_score(p, 0.5, "max_confidence"), np.maximum(p, 1 - p), atol=1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        negative_entropy = np.nan_to_num(p * np.log(p)) + np.nan_to_num((1 - p) * np.log(1 - p))
    np.testing.assert_allclose(confidence_score(p, 0.5), negative_entropy, atol=1e-12)  # the default: ATC-NE
    # away from 0.5 the least confident image is the one at the operating threshold
    assert np.argmin(confidence_score(p, 0.3)) == 30


def test_atc_threshold_leaves_the_source_error_rate_below_it() -> None:
    rng = np.random.default_rng(6)
    scores = rng.random(1000)
    for error_rate in (0.0, 0.013, 0.1, 0.37, 1.0):
        correct = np.ones(1000, bool)
        correct[rng.choice(1000, int(round(error_rate * 1000)), replace=False)] = False
        t = atc_threshold(scores, correct)
        assert np.mean(scores < t) == pytest.approx(error_rate)
    # with ties the fraction below is as close to the error rate as the ties allow: 2 errors, blocks of 3
    assert atc_threshold([0.1, 0.1, 0.1, 0.2, 0.2, 0.2], [0, 0, 1, 1, 1, 1]) == pytest.approx(0.15)


# ---------------------------------------------------------------- ATC on a simulated shift


def test_atc_estimates_a_drop_at_a_harder_target_from_unlabeled_images() -> None:
    """Target: the classes 3.3x closer plus noise, the source model applied unchanged: accuracy 0.93 → ~0.75,
    AUC 0.98 → ~0.83. (In this family ATC is this accurate only in a band: see ATCEstimator's limitations and the
    next test.)"""
    rng = np.random.default_rng(7)
    source_p, source_y = _cohort(rng, 5000)
    target_p, target_y = _cohort(rng, 4000, closer=0.3, noise=0.6)
    true_accuracy = float(np.mean((target_p >= 0.5) == target_y))
    true_auc = roc_auc_score(target_y, target_p)
    atc = ATCEstimator(n_bootstrap=0).fit(source_p, source_y, threshold=0.5)
    est = atc.estimate(target_p)
    assert atc.source_accuracy_ - true_accuracy > 0.15 and atc.source_auc_ - true_auc > 0.1  # a real drop
    assert abs(est["accuracy"]["value"] - true_accuracy) < 0.25 * abs(atc.source_accuracy_ - true_accuracy)
    assert abs(est["auc"]["value"] - true_auc) < 0.05
    # the temperature behind the AUC reproduces ATC's accuracy estimate
    q = expit(np.log(target_p / (1 - target_p)) / est["details"]["temperature"])
    assert expected_accuracy(target_p, q, 0.5) == pytest.approx(est["accuracy"]["value"], abs=1e-6)
    assert est["details"]["temperature"] > 1 and est["notes"] == []  # the model is softened, the grid reached


def test_atc_overestimates_when_the_model_is_over_confident_on_the_target() -> None:
    """The documented limitation: noise that spreads the scores as much as the classes close up keeps the model
    confident, so ATC sees little of a large drop."""
    rng = np.random.default_rng(8)
    source_p, source_y = _cohort(rng, 5000)
    target_p, target_y = _cohort(rng, 4000, closer=0.2, noise=np.sqrt(0.16 + 0.6))
    est = ATCEstimator(n_bootstrap=0).fit(source_p, source_y, 0.5).estimate(target_p)
    assert est["accuracy"]["value"] > np.mean((target_p >= 0.5) == target_y) + 0.08
    assert est["auc"]["value"] > roc_auc_score(target_y, target_p) + 0.1


def test_atc_interval_widens_with_fewer_target_images() -> None:
    rng = np.random.default_rng(9)
    atc = ATCEstimator(n_bootstrap=300).fit(*_cohort(rng, 3000), threshold=0.5)
    target_p, _ = _cohort(rng, 1000, closer=0.3, noise=0.6)
    small, large = atc.estimate(target_p[:100]), atc.estimate(target_p)
    for metric in ("accuracy", "auc"):
        width_small = small[metric]["ci_high"] - small[metric]["ci_low"]
        width_large = large[metric]["ci_high"] - large[metric]["ci_low"]
        assert width_small > 2 * width_large > 0
        assert large[metric]["ci_low"] <= large[metric]["value"] <= large[metric]["ci_high"]
    assert large["n"] == 1000 and large["n_bootstrap"] == 300


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_atc_on_a_target_like_the_source_recovers_the_source_figures(threshold: float) -> None:
    rng = np.random.default_rng(10)
    atc = ATCEstimator(n_bootstrap=400).fit(*_cohort(rng, 4000), threshold=threshold)
    est = atc.estimate(_cohort(rng, 600)[0])
    assert est["accuracy"]["ci_low"] <= atc.source_accuracy_ <= est["accuracy"]["ci_high"]
    assert est["auc"]["ci_low"] <= atc.source_auc_ <= est["auc"]["ci_high"]
    assert est["details"]["temperature"] == pytest.approx(1.0, abs=0.35)  # a calibrated model stays as it is


def test_atc_bootstrap_is_patient_level_when_groups_are_given() -> None:
    rng = np.random.default_rng(11)
    atc = ATCEstimator(n_bootstrap=300).fit(*_cohort(rng, 3000), threshold=0.5)
    patients = _cohort(rng, 100, closer=0.3, noise=0.6)[0]
    images = np.repeat(patients, 6)  # six near-identical images per patient
    by_image = atc.estimate(images)
    by_patient = atc.estimate(images, groups=np.repeat(np.arange(100), 6))
    assert by_patient["accuracy"]["value"] == by_image["accuracy"]["value"]
    width = {name: est["accuracy"]["ci_high"] - est["accuracy"]["ci_low"]
             for name, est in (("image", by_image), ("patient", by_patient))}
    assert width["patient"] > 1.8 * width["image"]
    assert by_patient["n_patients"] == 100 and by_patient["n"] == 600


def test_atc_records_the_gap_when_no_temperature_reaches_its_accuracy() -> None:
    rng = np.random.default_rng(12)
    atc = ATCEstimator(n_bootstrap=50).fit(*_cohort(rng, 2000), threshold=0.5)
    est = atc.estimate(np.full(200, 0.5) + rng.uniform(-0.01, 0.01, 200))  # nothing confident: ATC accuracy ~0
    assert est["accuracy"]["value"] < 0.1
    assert est["details"]["temperature_gap"] > 0.3 and "closest" in est["notes"][0]
    assert all(math.isnan(v) for v in est["auc"].values())  # no AUC claimed from a temperature that misses
    assert math.isfinite(est["accuracy"]["ci_low"])


def test_atc_claims_no_auc_when_the_scores_moved_as_a_whole() -> None:
    """The demo's case: at the target the scores shrank towards the threshold and moved past it. The ranking, so
    the AUC, is intact while the accuracy at the source's threshold falls; ATC sees the second (below what any
    temperature gives), and the closest temperature would have turned it into an AUC of ~0.5."""
    rng = np.random.default_rng(14)
    source_prob, source_y = _cohort(rng, 2000)
    atc = ATCEstimator(n_bootstrap=100).fit(source_prob, source_y, threshold=0.5)
    y = rng.integers(0, 2, 600)
    moved = expit(0.3 * (rng.normal(size=600) + 1.5 * (2 * y - 1)) + 0.6)
    est = atc.estimate(moved)
    measured_accuracy = float(np.mean((moved >= 0.5) == y))
    assert roc_auc_score(y, moved) > 0.9 and measured_accuracy < 0.7
    assert math.isnan(est["auc"]["value"]) and "threshold" in est["notes"][0]
    assert est["accuracy"]["value"] < atc.source_accuracy_ - 0.1
    warning = estimated_drop_warning(est, atc.source_auc_, site="Hospital B", source_accuracy=atc.source_accuracy_)
    assert warning is not None and "Expected accuracy at the operating threshold at Hospital B" in warning
    assert "Expected AUC" not in warning


def test_atc_returns_plain_floats_and_validates_its_arguments() -> None:
    rng = np.random.default_rng(13)
    est = ATCEstimator(n_bootstrap=20).fit(*_cohort(rng, 500), threshold=0.5).estimate(_cohort(rng, 50)[0])
    assert est["method"] == "atc" and est["confidence"] == 0.95
    for value in itertools.chain(est["accuracy"].values(), est["auc"].values(), est["details"].values()):
        assert type(value) is float
    assert clone(ATCEstimator(score="max_confidence")).get_params()["score"] == "max_confidence"
    with pytest.raises(ValueError, match="score must be one of"):
        ATCEstimator(score="entropy")
    with pytest.raises(ValueError, match="confidence must lie in"):
        ATCEstimator(confidence=95)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ATCEstimator().fit([0.2, 0.8], [0, 1], threshold=1.0)
    with pytest.raises(NotFittedError, match="call fit"):
        ATCEstimator().estimate([0.2, 0.8])


# ---------------------------------------------------------------- agreement


def test_agreement_of_a_pool_that_matches_a_correct_model_is_one() -> None:
    rng = np.random.default_rng(14)
    p = rng.random(400)
    pool = np.stack([(p >= 0.5).astype(float)] * 3)  # every candidate takes the model's decisions, certain
    est = AgreementEstimator(n_bootstrap=100).estimate(p, pool, threshold=0.5)
    assert est["accuracy"]["value"] == pytest.approx(1.0)
    assert est["accuracy"]["ci_low"] == pytest.approx(1.0)
    assert est["auc"]["value"] == pytest.approx(roc_auc_score(p >= 0.5, p))
    assert est["details"] == {"pool_size": 3, "mean_pairwise_disagreement": 0.0}


def test_agreement_falls_when_the_pool_disagrees_on_half_the_images() -> None:
    rng = np.random.default_rng(15)
    p = rng.random(400)
    agrees = (p >= 0.5).astype(float)
    flips = agrees.copy()
    flips[::2] = 1 - flips[::2]  # disagrees with the model (and the other candidate) on half the images
    est = AgreementEstimator(n_bootstrap=100).estimate(p, np.stack([agrees, flips]), threshold=0.5)
    assert est["accuracy"]["value"] == pytest.approx(0.75)  # q = ½ on half the images
    assert est["accuracy"]["ci_high"] < 1.0
    assert est["details"]["mean_pairwise_disagreement"] == pytest.approx(0.5)
    assert est["auc"]["value"] < AgreementEstimator(n_bootstrap=0).estimate(p, agrees, 0.5)["auc"]["value"]


def test_agreement_of_a_one_model_pool_is_the_models_own_confidence() -> None:
    rng = np.random.default_rng(16)
    p = rng.random(300)
    est = AgreementEstimator(n_bootstrap=0).estimate(p, p[None, :], threshold=0.5)
    assert est["accuracy"]["value"] == pytest.approx(np.maximum(p, 1 - p).mean())
    assert est["auc"]["value"] == pytest.approx(expected_auc(p, p))
    assert np.isnan(est["details"]["mean_pairwise_disagreement"]) and "one candidate" in est["notes"][0]
    assert np.isnan(est["accuracy"]["ci_low"]) and est["n_bootstrap"] == 0
    with pytest.raises(ValueError, match=r"\(K, N\) = \(K, 300\)"):
        AgreementEstimator().estimate(p, np.ones((2, 299)), threshold=0.5)


# ---------------------------------------------------------------- the reviewer's warning


def _estimate(value: float, low: float, high: float) -> dict:
    return {"method": "atc", "auc": {"value": value, "ci_low": low, "ci_high": high}, "n": 600, "confidence": 0.95,
            "accuracy": {"value": 0.61, "ci_low": 0.57, "ci_high": 0.65}}


def test_drop_warning_names_the_site_and_both_figures_only_when_far_below() -> None:
    assert estimated_drop_warning(_estimate(0.93, 0.90, 0.95), source_auc=0.95, site="Hospital B") is None
    assert estimated_drop_warning(_estimate(0.80, 0.76, 0.86), source_auc=0.95, site="Hospital B") is None  # CI
    warning = estimated_drop_warning(_estimate(0.62, 0.55, 0.68), source_auc=0.95, site="Hospital B")
    assert warning is not None
    assert "Hospital B" in warning and "0.62 [0.55–0.68]" in warning and "0.95" in warning
    assert estimated_drop_warning(_estimate(float("nan"), float("nan"), float("nan")), 0.95, site="B") is None
    assert "(no interval)" in estimated_drop_warning(_estimate(0.6, float("nan"), float("nan")), 0.95, site="B")


def test_drop_warning_falls_back_to_accuracy_only_when_given_the_source_accuracy() -> None:
    fine_auc = _estimate(0.93, 0.90, 0.95)  # accuracy 0.61 [0.57–0.65]
    assert estimated_drop_warning(fine_auc, 0.95, site="B") is None
    assert estimated_drop_warning(fine_auc, 0.95, site="B", source_accuracy=0.70) is None  # within the margin
    warning = estimated_drop_warning(fine_auc, 0.95, site="B", source_accuracy=0.90)
    assert "accuracy at the operating threshold at B 0.61 [0.57–0.65]" in warning and "0.90" in warning
    with pytest.raises(ValueError, match="source_accuracy must be"):
        estimated_drop_warning(fine_auc, 0.95, site="B", source_accuracy=1.5)
