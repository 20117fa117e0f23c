import numpy as np
import pytest

from medtl.select import BackboneSelector, linear_probe_auc, logme


def _task(n=200, d=16, signal=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    informative = rng.normal(size=(n, d))
    informative[:, 0] += signal * y
    noise = rng.normal(size=(n, d))
    return informative, noise, y


def test_logme_prefers_informative_features():
    good, noise, y = _task()
    assert logme(good, y) > logme(noise, y)


def test_logme_handles_more_dims_than_samples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20)
    f = rng.normal(size=(20, 64))
    f[:, 0] += 3 * y
    assert np.isfinite(logme(f, y))


def test_linear_probe_auc_is_high_on_signal_and_chance_on_noise():
    good, noise, y = _task(signal=3.0)
    groups = np.arange(len(y)) // 2
    assert linear_probe_auc(good, y, groups) > 0.9
    assert 0.3 < linear_probe_auc(noise, y, groups) < 0.7


def test_scores_reject_bad_input():
    with pytest.raises(ValueError, match="two classes"):
        logme(np.ones((5, 3)), np.zeros(5, int))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        logme(np.ones(5), np.array([0, 1, 0, 1, 0]))


def test_selector_ranks_and_records_scores():
    good, noise, y = _task(signal=3.0)
    selector = BackboneSelector(rank_by="logme").fit({"x.scratch": noise, "x.imagenet": good}, y)
    assert selector.best_ == "x.imagenet"
    assert selector.ranking_ == ["x.imagenet", "x.scratch"]
    assert list(selector.scores_["rank"]) == [1, 2]
    assert {"logme", "linear_probe_auc"} <= set(selector.scores_.columns)


def test_selector_checks_arguments():
    with pytest.raises(ValueError, match="rank_by"):
        BackboneSelector(rank_by="accuracy")
    with pytest.raises(ValueError, match="no candidates"):
        BackboneSelector().fit({}, np.array([0, 1]))


# --- synthetic tasks whose truth is known -------------------------------------------------------------------

import doctest
import logging

import pandas as pd
from scipy.stats import special_ortho_group
from sklearn.base import clone
from sklearn.covariance import ledoit_wolf

import medtl.select.scores
import medtl.select.selector
import medtl.select.validation
from medtl.select import SCORES, h_score, knn_cv_accuracy, leep, nce, validate_selection

NOISE_LEVELS = (0.4, 0.8, 1.6, 3.2)  # candidate i: class means + noise of this scale; separability decreases


def _candidates(n=150, d=16, classes=3, seed=0):
    """Candidates whose features are the class means plus isotropic noise at decreasing separability.

    The candidates share one noise draw, scaled, so they differ in their noise level only."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = 2.0 * np.eye(classes, d)
    noise = rng.normal(size=(n, d))
    features = {f"noise{sigma}": means[y] + sigma * noise for sigma in NOISE_LEVELS}
    return features, y


def _entropy(y):
    p = np.bincount(y) / len(y)
    return float(-(p * np.log(p)).sum())


def _source_head(y, informativeness, z=10, seed=0):
    """(N, z) source probabilities: with probability ``informativeness`` an image's mass sits on a source class
    owned by its target class, otherwise on a random one."""
    rng = np.random.default_rng(seed)
    owned = y * 3 + rng.integers(0, 3, len(y))  # target class c owns source classes 3c .. 3c + 2
    source = np.where(rng.random(len(y)) < informativeness, owned, rng.integers(0, z, len(y)))
    logits = 3.0 * np.eye(z)[source] + 0.5 * rng.normal(size=(len(y), z))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probabilities / probabilities.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("score", ["logme", "h_score", "linear_probe_auc", "knn_cv_accuracy"])
def test_every_feature_score_orders_candidates_by_separability(score):
    features, y = _candidates()
    groups = np.arange(len(y)) // 3
    compute = {"logme": lambda f: logme(f, y), "h_score": lambda f: h_score(f, y),
               "linear_probe_auc": lambda f: linear_probe_auc(f, y, groups),
               "knn_cv_accuracy": lambda f: knn_cv_accuracy(f, y, groups)}[score]
    values = [compute(features[f"noise{sigma}"]) for sigma in NOISE_LEVELS]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_leep_and_nce_prefer_an_informative_source_head():
    y = np.arange(300) % 3
    informativeness = (1.0, 0.7, 0.3, 0.0)
    leeps = [leep(_source_head(y, p), y) for p in informativeness]
    nces = [nce(_source_head(y, p).argmax(1), y) for p in informativeness]
    assert all(a > b for a, b in zip(leeps, leeps[1:])), leeps
    assert all(a > b for a, b in zip(nces, nces[1:])), nces
    # Both live in [-H(Y), 0]; a head independent of the target sits near -H(Y) (above it by estimation bias).
    for value in leeps + nces:
        assert -_entropy(y) - 1e-12 <= value <= 0.0
    assert leeps[-1] == pytest.approx(-_entropy(y), abs=0.05)
    assert nces[0] == pytest.approx(0.0, abs=1e-12)  # source label determines the target label


def test_leep_and_nce_limits_are_exact():
    y = np.array([0, 0, 1, 2, 2, 2])
    one_hot = np.eye(6)[np.arange(6)]  # every image its own source class: the head determines y
    assert leep(one_hot, y) == pytest.approx(0.0, abs=1e-12)
    assert nce(np.arange(6), y) == pytest.approx(0.0, abs=1e-12)
    constant = np.full((6, 4), 0.25)  # the same prediction for every image: no information
    assert leep(constant, y) == pytest.approx(-_entropy(y))
    assert nce(np.zeros(6, int), y) == pytest.approx(-_entropy(y))


def test_leep_matches_a_hand_computed_example():
    # P(y, z) = [[.45, .05], [.10, .40]], P(z) = [.55, .45], P(y | z) = [[9/11, 1/9], [2/11, 8/9]];
    # image 0: 9/11·0.9 + 1/9·0.1 = 74/99, image 1: 2/11·0.2 + 8/9·0.8 = 74/99.
    assert leep(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1])) == pytest.approx(np.log(74 / 99))
    # Labels need not be 0..C-1, and a source class nobody predicts (column 2) changes nothing.
    assert leep(np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]), np.array(["neg", "pos"])) == pytest.approx(
        np.log(74 / 99))


def test_nce_matches_a_hand_computed_example():
    # z = 0: y is 0 or 1 with probability 1/2 each (entropy log 2); z = 1: y = 1 always. H(Y|Z) = ½ log 2.
    assert nce(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == pytest.approx(-0.5 * np.log(2))
    # Three source classes, two labels: P(z) = (2, 3, 1)/6; H(Y | z) = log 2, h(1/3), 0.
    h_third = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3))
    expected = -(2 / 6 * np.log(2) + 3 / 6 * h_third)
    assert nce(np.array([7, 7, 8, 8, 8, 9]), np.array([0, 1, 0, 1, 1, 1])) == pytest.approx(expected)


def test_h_score_matches_hand_computed_examples():
    # 1-D (Ledoit-Wolf shrinks nothing in 1-D): var = 19/16, between-class var = 9/16.
    assert h_score(np.array([[0.0], [1.0], [1.0], [3.0]]), np.array([0, 0, 1, 1])) == pytest.approx(9 / 19)
    # 2-D, unregularised: cov = [[1/2, 3/4], [3/4, 3/2]], class-mean deviations ±(1/2, 1) with weight 1/2,
    # so H = mᵀ cov⁻¹ m = (16/3)(3/8 - 3/4 + 1/2) = 2/3.
    f = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 3.0]])
    assert h_score(f, np.array([0, 0, 1, 1]), shrinkage=0.0) == pytest.approx(2 / 3)
    # cov = I: the shrunk cov stays I and only the between-class part shrinks, H_α = (1 - α)·1.
    square = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert h_score(square, np.array([0, 0, 1, 1]), shrinkage=0.0) == pytest.approx(1.0)
    assert h_score(square, np.array([0, 0, 1, 1]), shrinkage=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("n, d", [(60, 8), (20, 50)])
def test_h_score_equals_the_direct_ledoit_wolf_formula(n, d):
    rng = np.random.default_rng(n)
    y = np.arange(n) % 3
    f = rng.normal(size=(n, d)) + np.eye(3, d)[y]
    covariance, alpha = ledoit_wolf(f)  # the D × D route: tr(cov_α⁻¹ (1 - α) cov(E[f | y]))
    class_means = np.stack([f[y == c].mean(axis=0) for c in y]) - f.mean(axis=0)
    direct = np.trace(np.linalg.solve(covariance, (1 - alpha) * class_means.T @ class_means / n))
    assert 0.0 < alpha < 1.0
    assert h_score(f, y) == pytest.approx(direct, rel=1e-9)


def test_h_score_invariances_and_bounds():
    features, y = _candidates(d=8)
    f = features["noise0.8"]
    reference = h_score(f, y)
    rotation = special_ortho_group.rvs(8, random_state=0)
    assert h_score(3.0 * f @ rotation + 5.0, y) == pytest.approx(reference)  # translation, rotation, scale
    # Without regularisation any invertible linear map leaves H unchanged.
    mixing = np.random.default_rng(1).normal(size=(8, 8))
    assert h_score(f @ mixing, y, shrinkage=0.0) == pytest.approx(h_score(f, y, shrinkage=0.0))
    assert 0.0 <= reference <= 2.0  # 0 ≤ H ≤ C - 1
    assert h_score(np.ones((6, 3)), np.array([0, 1, 0, 1, 0, 1])) == 0.0  # constant features


def test_h_score_regularisation_keeps_small_n_high_d_meaningful():
    rng = np.random.default_rng(0)
    y = np.arange(20) % 2
    noise = rng.normal(size=(20, 200))
    signal = noise.copy()
    signal[:, 0] += 4.0 * y
    # With D ≫ N the plain H-score sees every labeling as perfectly separable (H = C - 1) ...
    assert h_score(noise, y, shrinkage=0.0) == pytest.approx(1.0)
    # ... the Ledoit-Wolf one still tells signal from noise.
    assert 0.0 <= h_score(noise, y) < h_score(signal, y) <= 1.0


def test_knn_cv_accuracy_keeps_a_patient_out_of_its_own_neighbours():
    rng = np.random.default_rng(0)
    patients = rng.normal(size=(40, 16))
    features = np.repeat(patients, 2, axis=0) + 1e-3 * rng.normal(size=(80, 16))  # two near-identical images
    y = np.repeat(np.arange(40) % 2, 2)  # labels unrelated to the features
    groups = np.repeat(np.arange(40), 2)
    # Ungrouped, an image's twin is in the training folds 9 times in 10 and leaks the label.
    assert knn_cv_accuracy(features, y, folds=10) > 0.9
    assert knn_cv_accuracy(features, y, groups, folds=10) < 0.65


def test_new_scores_reject_bad_input():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="softmax"):
        leep(np.array([[2.0, -1.0]] * 4), y)  # logits, not probabilities
    with pytest.raises(ValueError, match=r"\(N, Z\)"):
        leep(np.full((3, 2), 0.5), y)
    with pytest.raises(ValueError, match="two classes"):
        leep(np.full((4, 2), 0.5), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        nce(np.zeros(3, int), y)
    with pytest.raises(ValueError, match="two classes"):
        nce(np.zeros(4, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="shrinkage"):
        h_score(np.ones((4, 2)), y, shrinkage=1.5)
    with pytest.raises(ValueError, match="groups"):
        knn_cv_accuracy(np.ones((4, 2)), y, groups=np.arange(3))
    with pytest.raises(ValueError, match="folds >= 2"):
        knn_cv_accuracy(np.ones((4, 2)), y, folds=1)
    with pytest.raises(ValueError, match="2 samples"):
        knn_cv_accuracy(np.ones((3, 2)), np.array([0, 1, 1]))


def test_docstring_examples_run():
    for module in (medtl.select.scores, medtl.select.selector, medtl.select.validation):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# --- the selector -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank_by", ["logme", "h_score", "linear_probe_auc", "knn_accuracy"])
def test_selector_ranks_by_separability_whatever_the_score(rank_by):
    features, y = _candidates()
    selector = BackboneSelector(rank_by=rank_by).fit(features, y, groups=np.arange(len(y)) // 3)
    assert selector.ranking_ == [f"noise{sigma}" for sigma in NOISE_LEVELS]
    assert selector.best_ == "noise0.4"
    assert list(selector.scores_.columns) == [*SCORES, "rank"]
    assert list(selector.scores_["rank"]) == [1, 2, 3, 4]
    assert selector.seconds_.index.tolist() == selector.ranking_
    computed = list(set(SCORES) - {"leep", "nce"})
    assert (selector.seconds_[computed] >= 0).all().all()
    assert selector.scores_[["leep", "nce"]].isna().all().all()
    assert selector.seconds_[["leep", "nce"]].isna().all().all()
    assert selector.nan_reasons_["noise0.4"]["leep"] == "no source-classifier probabilities for this candidate"


def test_selector_ranks_candidates_without_the_rank_by_score_last(caplog):
    features, y = _candidates(n=90)
    probabilities = {"noise3.2": _source_head(y, 1.0, seed=1), "noise1.6": _source_head(y, 0.3, seed=2)}
    with caplog.at_level(logging.WARNING, logger="medtl.select"):
        selector = BackboneSelector(rank_by="leep").fit(features, y, source_probabilities=probabilities)
    # The worst features have the most informative source head: LEEP judges the head, not the features.
    assert selector.ranking_ == ["noise3.2", "noise1.6", "noise0.4", "noise0.8"]
    assert selector.scores_.loc["noise3.2", "nce"] > selector.scores_.loc["noise1.6", "nce"]
    assert np.isnan(selector.scores_.loc["noise0.4", "leep"])
    assert sum("ranks last" in record.getMessage() for record in caplog.records) == 2


def test_selector_survives_a_candidate_with_broken_features(caplog):
    features, y = _candidates(n=90)
    features["diverged.ssl"] = np.full((90, 16), np.nan)
    with caplog.at_level(logging.WARNING, logger="medtl.select"):
        selector = BackboneSelector().fit(features, y)
    assert selector.ranking_[-1] == "diverged.ssl"
    assert selector.scores_.loc["diverged.ssl", list(SCORES)].isna().all()
    assert "NaN or inf" in selector.nan_reasons_["diverged.ssl"]["logme"]
    assert any("diverged.ssl ranks last" in record.getMessage() for record in caplog.records)


def test_selector_follows_scikit_learn_conventions():
    selector = BackboneSelector(rank_by="h_score", cv_folds=4)
    assert selector.get_params() == {"rank_by": "h_score", "cv_folds": 4, "knn_k": 20, "seed": 0}
    assert not hasattr(selector, "scores_")
    copy = clone(selector).set_params(rank_by="nce")
    assert copy.rank_by == "nce" and selector.rank_by == "h_score"
    features, y = _candidates(n=60)
    with pytest.raises(ValueError, match="no candidate has a finite nce"):
        copy.fit(features, y)  # nobody has a source head
    copy.set_params(rank_by="bogus")
    with pytest.raises(ValueError, match="rank_by"):
        copy.fit(features, y)


def test_selector_rejects_bad_arguments():
    features, y = _candidates(n=60)
    with pytest.raises(ValueError, match="cv_folds"):
        BackboneSelector(cv_folds=1)
    with pytest.raises(ValueError, match="knn_k"):
        BackboneSelector(knn_k=0)
    with pytest.raises(ValueError, match="two classes"):
        BackboneSelector().fit(features, np.zeros(60, int))
    with pytest.raises(ValueError, match="groups"):
        BackboneSelector().fit(features, y, groups=np.arange(59))
    with pytest.raises(ValueError, match=r"'bad': features must be \(N, D\)"):
        BackboneSelector().fit({**features, "bad": np.ones((59, 16))}, y)
    with pytest.raises(ValueError, match="not candidates"):
        BackboneSelector().fit(features, y, source_probabilities={"unknown": np.full((60, 2), 0.5)})
    with pytest.raises(ValueError, match="'noise0.4'.*softmax"):
        BackboneSelector().fit(features, y, source_probabilities={"noise0.4": np.ones((60, 5))})


# --- validation mode ----------------------------------------------------------------------------------------

def _scored(values, name="score"):
    index = [f"c{i}" for i in range(len(values))]
    return (pd.DataFrame({name: values}, index=index, dtype=float),
            pd.DataFrame({name: np.full(len(values), 0.5)}, index=index))


def test_validation_tau_is_one_when_concordant_and_minus_one_when_reversed():
    results = {"c0": 0.95, "c1": 0.90, "c2": 0.80, "c3": 0.70, "c4": 0.60}
    seconds = dict.fromkeys(results, 100.0)
    concordant = validate_selection(*_scored([5, 4, 3, 2, 1]), results, seconds).loc["score"]
    reversed_ = validate_selection(*_scored([1, 2, 3, 4, 5]), results, seconds).loc["score"]
    assert concordant["weighted_tau"] == pytest.approx(1.0) and concordant["kendall_tau"] == pytest.approx(1.0)
    assert reversed_["weighted_tau"] == pytest.approx(-1.0) and reversed_["kendall_tau"] == pytest.approx(-1.0)
    assert concordant["top_pick"] == "c0" and concordant["top_pick_is_best"] and concordant["regret"] == 0.0
    assert reversed_["top_pick"] == "c4" and not reversed_["top_pick_within_tolerance"]
    assert reversed_["regret"] == pytest.approx(0.35)
    assert concordant["score_seconds"] == pytest.approx(2.5) and concordant["finetune_seconds"] == 500.0
    assert concordant["speedup"] == pytest.approx(200.0)


def test_weighted_tau_penalises_a_swap_at_the_top_more_than_at_the_bottom():
    results = {"c0": 0.95, "c1": 0.90, "c2": 0.80, "c3": 0.70, "c4": 0.60}
    seconds = dict.fromkeys(results, 1.0)
    top_swap = validate_selection(*_scored([4, 5, 3, 2, 1]), results, seconds).loc["score"]
    bottom_swap = validate_selection(*_scored([5, 4, 3, 1, 2]), results, seconds).loc["score"]
    assert top_swap["kendall_tau"] == pytest.approx(bottom_swap["kendall_tau"])  # plain τ: one swap is one swap
    assert top_swap["weighted_tau"] < bottom_swap["weighted_tau"] < 1.0
    # The top swap picks c1, 0.05 below the best: outside the default tolerance, inside a looser one.
    assert not top_swap["top_pick_within_tolerance"]
    loose = validate_selection(*_scored([4, 5, 3, 2, 1]), results, seconds, tolerance=0.05).loc["score"]
    assert loose["top_pick_within_tolerance"] and not loose["top_pick_is_best"]


def test_validation_evaluates_partial_scores_on_the_candidates_that_have_them():
    features, y = _candidates(n=90)
    probabilities = {"noise3.2": _source_head(y, 1.0, seed=1), "noise1.6": _source_head(y, 0.3, seed=2)}
    selector = BackboneSelector().fit(features, y, source_probabilities=probabilities)
    finetuned = {"noise0.4": 0.97, "noise0.8": 0.93, "noise1.6": 0.85, "noise3.2": 0.75}
    table = validate_selection(selector.scores_, selector.seconds_, finetuned, dict.fromkeys(finetuned, 60.0))
    assert list(table.index) == list(SCORES)  # one row per score, `rank` ignored
    assert table.loc["logme", "n_candidates"] == 4 and table.loc["logme", "n_without_score"] == 0
    assert table.loc["logme", "kendall_tau"] == pytest.approx(1.0) and table.loc["logme", "top_pick"] == "noise0.4"
    leep_row = table.loc["leep"]
    assert leep_row["n_candidates"] == 2 and leep_row["n_without_score"] == 2
    # LEEP can only choose among the two it scores; its pick is judged against the best of all four.
    assert leep_row["top_pick"] == "noise3.2" and leep_row["regret"] == pytest.approx(0.22)
    assert leep_row["kendall_tau"] == pytest.approx(-1.0)
    assert leep_row["finetune_seconds"] == 120.0
    assert leep_row["score_seconds"] == pytest.approx(selector.seconds_.loc[["noise3.2", "noise1.6"], "leep"].sum())


def test_validation_leaves_tau_undefined_with_fewer_than_two_candidates():
    scores, seconds = _scored([1.0, np.nan, np.nan])
    row = validate_selection(scores, seconds, {"c0": 0.8, "c1": 0.9, "c2": 0.7},
                             {"c0": 1.0, "c1": 1.0, "c2": 1.0}).loc["score"]
    assert row["n_candidates"] == 1 and row["n_without_score"] == 2
    assert np.isnan(row["weighted_tau"]) and np.isnan(row["kendall_tau"])
    assert row["top_pick"] == "c0" and row["regret"] == pytest.approx(0.1)


def test_validation_rejects_bad_arguments():
    scores, seconds = _scored([1.0, 2.0])
    with pytest.raises(ValueError, match="no scores"):
        validate_selection(scores, seconds, {"c0": 0.8, "other": 0.9}, {"c0": 1.0, "other": 1.0})
    with pytest.raises(ValueError, match="finetune_seconds lacks"):
        validate_selection(scores, seconds, {"c0": 0.8, "c1": 0.9}, {"c0": 1.0})
    with pytest.raises(ValueError, match="finite"):
        validate_selection(scores, seconds, {"c0": 0.8, "c1": float("nan")}, {"c0": 1.0, "c1": 1.0})
    with pytest.raises(ValueError, match="tolerance"):
        validate_selection(scores, seconds, {"c0": 0.8}, {"c0": 1.0}, tolerance=-0.1)
    with pytest.raises(ValueError, match="empty"):
        validate_selection(scores, seconds, {}, {})
