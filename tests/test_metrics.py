"""Metrics: hand-checked values, agreement with scikit-learn, and bootstrap behaviour."""

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtl.evaluate.metrics import (
    auc_difference,
    binary_metrics,
    calibration_curve,
    expected_calibration_error,
    youden_threshold,
)


def _scored(n: int, seed: int = 0, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    return y, p


def _width(result: dict, name: str) -> float:
    return result[name]["ci_high"] - result[name]["ci_low"]


def test_ece_zero_for_perfectly_calibrated_bins():
    # bin [0.2, 0.3): 4 images at 0.25, one positive; bin [0.7, 0.8): 4 at 0.75, three positive
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    p = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_example():
    # 2 bins: [0, .5) holds p=.1,.2 (freq .5, conf .15) and [.5, 1] holds p=.8,.9 (freq .5, conf .85)
    # ECE = .5 * .35 + .5 * .35
    assert expected_calibration_error([0, 1, 1, 0], [0.1, 0.2, 0.8, 0.9], n_bins=2) == pytest.approx(0.35)


def test_calibration_curve_bins_and_empty_bins():
    curve = calibration_curve([0, 1, 1, 0, 1], [0.1, 0.2, 0.8, 0.9, 1.0], n_bins=4)
    np.testing.assert_array_equal(curve.counts, [2, 0, 0, 3])  # p = 1.0 lands in the last, closed bin
    np.testing.assert_allclose(curve.mean_predicted[[0, 3]], [0.15, 0.9])
    np.testing.assert_allclose(curve.observed_frequency[[0, 3]], [0.5, 2 / 3])
    assert np.isnan(curve.mean_predicted[1]) and np.isnan(curve.observed_frequency[2])
    np.testing.assert_allclose(curve.bin_edges, [0, 0.25, 0.5, 0.75, 1.0])


def test_auc_matches_sklearn_including_ties():
    y, p = _scored(300, seed=3)
    p = np.round(p, 1)  # many ties: each tie between classes must count one half
    result = binary_metrics(y, p, n_bootstrap=0)
    assert result["auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(result["auc"]["ci_low"])


def test_threshold_metrics_match_confusion_matrix():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.1, 0.3, 0.5])
    result = binary_metrics(y, p, threshold=0.5, n_bootstrap=0)
    # predicted positive: .9 .6 .7 .5 -> TP 3 (.9 .6 .5), FP 1 (.7), FN 1 (.4), TN 3
    assert result["sensitivity"]["value"] == pytest.approx(0.75)
    assert result["specificity"]["value"] == pytest.approx(0.75)
    assert result["accuracy"]["value"] == pytest.approx(0.75)
    assert result["ece"]["value"] == pytest.approx(expected_calibration_error(y, p))
    assert (result["n"], result["n_positive"], result["n_patients"], result["threshold"]) == (8, 4, 8, 0.5)


def test_ci_contains_point_estimate_and_narrows_with_more_data():
    small = binary_metrics(*_scored(80, seed=1, signal=0.5), n_bootstrap=500)
    large = binary_metrics(*_scored(2000, seed=1, signal=0.5), n_bootstrap=500)
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        for result in (small, large):
            assert result[name]["ci_low"] <= result[name]["value"] <= result[name]["ci_high"], name
        assert _width(large, name) < _width(small, name) / 2, name


def test_patient_cluster_bootstrap_widens_ci_for_correlated_images():
    # 60 patients with 5 near-identical images each: resampling images would pretend n = 300
    y_pat, p_pat = _scored(60, seed=7, signal=0.8)
    y, p = np.repeat(y_pat, 5), np.clip(np.repeat(p_pat, 5) + np.random.default_rng(0).normal(0, 0.01, 300), 0, 1)
    patients = np.repeat([f"pat{i:03d}" for i in range(60)], 5)
    by_image = binary_metrics(y, p, n_bootstrap=400)
    by_patient = binary_metrics(y, p, groups=patients, n_bootstrap=400)
    assert by_patient["n_patients"] == 60 and by_image["n_patients"] == 300
    assert by_patient["auc"]["value"] == by_image["auc"]["value"]
    assert _width(by_patient, "auc") > 1.5 * _width(by_image, "auc")


def test_bootstrap_is_fast_and_reproducible():
    y, p = _scored(200, seed=2)
    groups = np.arange(200) // 2
    start = time.perf_counter()
    first = binary_metrics(y, p, groups=groups, n_bootstrap=1000, seed=5)
    assert time.perf_counter() - start < 1.0
    assert binary_metrics(y, p, groups=groups, n_bootstrap=1000, seed=5) == first


def test_single_class_gives_nan_auc_with_note():
    result = binary_metrics(np.ones(20), np.linspace(0.05, 0.95, 20), n_bootstrap=100)
    assert np.isnan(result["auc"]["value"]) and np.isnan(result["auc"]["ci_low"])
    assert np.isnan(result["specificity"]["value"])
    assert result["sensitivity"]["value"] == pytest.approx(0.5)
    assert any(note.startswith("auc is undefined") for note in result["notes"])


def test_resamples_with_one_class_are_skipped_and_counted():
    y = np.zeros(30, dtype=int)
    y[0] = 1  # a single positive: ~37 % of resamples miss it
    result = binary_metrics(y, np.linspace(0, 1, 30)[::-1], n_bootstrap=300)
    assert result["auc"]["value"] == pytest.approx(1.0)
    assert any(note.startswith("auc:") and "skipped" in note for note in result["notes"])


def test_youden_threshold_separates_separable_data():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.35, 0.6, 0.7, 0.95])
    threshold = youden_threshold(y, p)
    assert threshold == pytest.approx(0.475)  # midway between the highest negative and the lowest positive
    np.testing.assert_array_equal(p >= threshold, y.astype(bool))


def test_youden_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1, 1], [0.2, 0.5, 0.9])


def test_paired_auc_difference_pairs_by_patient():
    y, p = _scored(150, seed=4, signal=0.7)
    rng = np.random.default_rng(1)
    better = np.clip(p + 0.15 * (2 * y - 1) + rng.normal(0, 0.02, y.size), 0, 1)
    patients = np.array([f"p{i}" for i in range(y.size)])
    shuffle = rng.permutation(y.size)  # rows of b in another order: pairing must go through patient ids
    delta = auc_difference(y, better, y[shuffle], p[shuffle], groups_a=patients, groups_b=patients[shuffle],
                           n_bootstrap=500)
    assert delta["value"] == pytest.approx(roc_auc_score(y, better) - roc_auc_score(y, p))
    assert 0 < delta["ci_low"] <= delta["value"] <= delta["ci_high"]


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1], [0.1, 1.2], r"in \[0, 1\]"),
        ([0, 1], [0.1], "equal length"),
        ([], [], "empty"),
        ([0.0, float("nan")], [0.1, 0.2], "only 0 and 1"),
    ],
)
def test_invalid_inputs_name_the_problem(y, p, message):
    with pytest.raises(ValueError, match=message):
        binary_metrics(y, p, n_bootstrap=0)


def test_missing_patient_id_is_rejected():
    with pytest.raises(ValueError, match="missing patient ids"):
        binary_metrics([0, 1, 0], [0.1, 0.9, 0.2], groups=["a", None, "b"], n_bootstrap=10)


def test_predictive_values_and_brier_by_hand():
    # threshold 0.5: flagged = p >= .5 -> images 2, 3, 4 (labels 1, 0, 1): PPV 2/3; cleared 0, 1 (labels 0, 1): NPV 1/2
    y = [0, 1, 1, 0, 1]
    p = [0.1, 0.4, 0.6, 0.7, 0.9]
    m = binary_metrics(y, p, n_bootstrap=200)
    assert m["ppv"]["value"] == pytest.approx(2 / 3)
    assert m["npv"]["value"] == pytest.approx(1 / 2)
    assert m["brier"]["value"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    assert m["ppv"]["ci_low"] <= m["ppv"]["value"] <= m["ppv"]["ci_high"]


def test_predictive_values_follow_the_prevalence_at_the_same_sensitivity_and_specificity():
    """PPV and NPV are read at the data's own prevalence: the same classifier at a rarer finding has a lower PPV."""
    y, p = _scored(4000, seed=3)
    rare = np.flatnonzero(y == 0).tolist() + np.flatnonzero(y == 1)[:400].tolist()
    common = binary_metrics(y, p, n_bootstrap=0)
    scarce = binary_metrics(y[rare], p[rare], n_bootstrap=0)
    assert scarce["sensitivity"]["value"] == pytest.approx(common["sensitivity"]["value"], abs=0.05)
    assert scarce["ppv"]["value"] < common["ppv"]["value"] - 0.1
    assert scarce["npv"]["value"] > common["npv"]["value"]


def test_undefined_predictive_value_is_nan_with_a_note():
    m = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], n_bootstrap=0)  # nothing is called positive
    assert np.isnan(m["ppv"]["value"]) and any("ppv" in note for note in m["notes"])
