"""Unsupervised model selection on the unlabeled target: entropy, SND, DEV / IWCV and the selector."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest

import medtl.select.unsupervised
from medtl.select.unsupervised import (UNSUPERVISED_SCORES, UnsupervisedSelector, dev_risk, dev_score,
                                       ensemble_agreement_scores, entropy_score, importance_weights, iwcv_risk,
                                       iwcv_score, prediction_entropy, snd_score)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _clustered(n=60, classes=3, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _softmax(6 * np.eye(classes)[np.arange(n) % classes] + 0.3 * rng.normal(size=(n, classes)))


def _covariate_shift(seed=0, n=300):
    """Source x ~ N(0, I), target around x0 = 2; model "a" is good only where the target is, "b" elsewhere."""
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(n, 2))
    target = rng.normal(size=(n, 2)) * 0.5 + [2.0, 0.0]
    where_target = source[:, 0] > 1
    loss_a = np.where(where_target, 0.1, 1.0) + 0.02 * rng.uniform(size=n)
    loss_b = np.where(where_target, 1.5, 0.1) + 0.02 * rng.uniform(size=n)
    return source, target, loss_a, loss_b


# --- entropy ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 5])
def test_entropy_is_zero_for_one_hot_and_log_c_for_uniform(classes):
    assert prediction_entropy(np.eye(classes)) == 0.0
    assert prediction_entropy(np.full((4, classes), 1 / classes)) == pytest.approx(np.log(classes))
    assert entropy_score(np.full((4, classes), 1 / classes)) == pytest.approx(-np.log(classes))  # higher = better


def test_probabilities_are_validated():
    with pytest.raises(ValueError, match="softmax"):
        prediction_entropy(np.array([[2.0, -1.0]]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        snd_score(np.ones(3) / 3)
    with pytest.raises(ValueError, match="at least 2"):
        snd_score(np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="temperature"):
        snd_score(np.eye(2), temperature=0)


# --- SND ------------------------------------------------------------------------------------------------------------

def test_snd_is_higher_for_clustered_than_for_random_predictions():
    clustered = snd_score(_clustered())  # 3 tight clusters of 20: about log 19
    assert clustered == pytest.approx(np.log(19), abs=0.01)
    for seed in range(5):
        scattered = np.random.default_rng(seed).dirichlet(np.ones(3), size=60)
        assert clustered > snd_score(scattered) + 0.05


def test_snd_bounds_and_blocking():
    identical = np.tile([0.7, 0.2, 0.1], (10, 1))
    assert snd_score(identical) == pytest.approx(np.log(9))  # all 9 neighbours equally near: the maximum
    p = _clustered(n=50)
    assert 0 <= snd_score(p) <= np.log(49)
    assert snd_score(p, block_size=7) == pytest.approx(snd_score(p), rel=1e-12)


# --- DEV / IWCV -----------------------------------------------------------------------------------------------------

def test_dev_with_identical_distributions_is_the_plain_mean_loss():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(400, 3)), rng.normal(size=(400, 3))
    weights = importance_weights(source, target)
    assert weights.shape == (400,) and (weights > 0).all()
    assert weights.mean() == pytest.approx(1.0, abs=0.05) and np.median(np.abs(weights - 1)) < 0.15
    losses = rng.exponential(0.5, size=400)
    assert -dev_score(source, losses, target) == pytest.approx(losses.mean(), rel=0.05)
    assert dev_risk(losses, np.ones(400)) == pytest.approx(losses.mean())
    assert iwcv_risk(losses, np.ones(400)) == pytest.approx(losses.mean())


def test_dev_prefers_the_model_that_is_good_where_the_targets_are():
    source, target, loss_a, loss_b = _covariate_shift()
    assert loss_b.mean() < loss_a.mean()  # the plain source validation loss would pick b
    assert dev_score(source, loss_a, target) > dev_score(source, loss_b, target)
    assert iwcv_score(source, loss_a, target) > iwcv_score(source, loss_b, target)
    weights = importance_weights(source, target)
    assert weights[source[:, 0] > 1].mean() > 5 * weights[source[:, 0] < 0].mean()


def test_control_variate_lowers_the_variance_of_the_estimate():
    # true density ratio of N(1, 1) to N(0, 1): w(x) = exp(x - 1/2); the loss grows with x
    rng = np.random.default_rng(0)
    dev, iwcv = [], []
    for _ in range(300):
        x = rng.normal(size=100)
        w = np.exp(x - 0.5)
        loss = 1.0 + 0.1 * x**2
        dev.append(dev_risk(loss, w))
        iwcv.append(iwcv_risk(loss, w))
    truth = 1.0 + 0.1 * 2.0  # E_target[1 + 0.1 x²] with x ~ N(1, 1)
    assert np.var(dev) < 0.5 * np.var(iwcv)
    assert abs(np.mean(dev) - truth) < 0.05 and abs(np.mean(iwcv) - truth) < 0.05


def test_risk_inputs_are_validated():
    with pytest.raises(ValueError, match="both be"):
        dev_risk(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        iwcv_risk(np.ones(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="same D"):
        importance_weights(np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="folds"):
        importance_weights(np.ones((4, 2)), np.ones((4, 2)), folds=1)


# --- EnsV -----------------------------------------------------------------------------------------------------------

def test_ensv_ranks_a_confidently_wrong_candidate_last_where_entropy_and_snd_rank_it_first():
    """The failure seen on the hardest simulated hospital: the source-only model predicts one class for every
    target image, confidently. Entropy and SND prefer it; the ensemble of the pool outvotes it."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, size=200)

    def noisy_right(flip: float) -> np.ndarray:
        label = np.where(rng.uniform(size=200) < flip, 1 - truth, truth)
        p1 = np.clip(0.5 + (label - 0.5) * rng.uniform(0.2, 0.8, size=200), 0.01, 0.99)
        return np.c_[1 - p1, p1]

    adapted = [noisy_right(0.10), noisy_right(0.15), noisy_right(0.25)]
    collapsed = np.tile([0.02, 0.98], (200, 1))
    pool = [*adapted, collapsed]
    agreement = ensemble_agreement_scores(pool)
    accuracy = [float((p.argmax(1) == truth).mean()) for p in pool]
    assert agreement.shape == (4,) and ((0 <= agreement) & (agreement <= 1)).all()
    assert int(np.argmin(agreement)) == 3 and int(np.argmin(accuracy)) == 3
    assert int(np.argmax(agreement)) == int(np.argmax(accuracy)) == 0
    assert entropy_score(collapsed) > max(entropy_score(p) for p in adapted)
    assert snd_score(collapsed) > max(snd_score(p) for p in adapted)


def test_ensv_of_one_candidate_is_full_agreement_and_inputs_are_checked():
    assert ensemble_agreement_scores([_clustered()]).tolist() == [1.0]
    with pytest.raises(ValueError, match="at least one"):
        ensemble_agreement_scores([])
    with pytest.raises(ValueError, match="same target samples"):
        ensemble_agreement_scores([_clustered(n=60), _clustered(n=30)])
    with pytest.raises(ValueError, match="softmax"):
        ensemble_agreement_scores([np.array([[2.0, -1.0]])])


def test_selector_leaves_candidates_without_target_predictions_out_of_the_ensemble():
    pool = {"a": {"target_probabilities": np.tile([0.9, 0.1], (6, 1))},
            "b": {"target_probabilities": np.tile([0.8, 0.2], (6, 1))},
            "c": {"target_probabilities": np.tile([0.3, 0.7], (6, 1))},
            "features_only": {"target_features": np.ones((6, 2))}}
    selector = UnsupervisedSelector(scorer="ensv").fit(pool)
    assert selector.scores_["ensv"].to_dict() == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.0, "features_only": np.nan},
                                                               nan_ok=True)
    assert selector.ranking_ == ["a", "b", "c", "features_only"]
    assert selector.nan_reasons_["features_only"]["ensv"] == "missing target_probabilities"


# --- the selector ---------------------------------------------------------------------------------------------------

def _candidates() -> dict[str, dict[str, np.ndarray]]:
    source, target, loss_a, loss_b = _covariate_shift()
    rng = np.random.default_rng(3)
    return {
        "good_on_target": {"target_probabilities": _clustered(), "source_val_features": source,
                           "source_val_losses": loss_a, "target_features": target},
        "good_on_source": {"target_probabilities": rng.dirichlet(np.ones(3), size=60),
                           "source_val_features": source, "source_val_losses": loss_b, "target_features": target},
        "predictions_only": {"target_probabilities": rng.dirichlet(np.ones(3) * 0.3, size=60)},
    }


@pytest.mark.parametrize("scorer", UNSUPERVISED_SCORES)
def test_selector_follows_scikit_learn_conventions_and_picks_the_expected_candidate(scorer):
    candidates = _candidates()
    selector = UnsupervisedSelector(scorer=scorer)
    assert selector.get_params() == {"scorer": scorer, "temperature": 0.05, "folds": 5, "seed": 0}
    assert not hasattr(selector, "scores_")
    assert selector.fit(candidates) is selector
    assert isinstance(selector.scores_, pd.DataFrame)
    assert list(selector.scores_.columns) == [*UNSUPERVISED_SCORES, "rank"]
    assert selector.ranking_ == list(selector.scores_.index) and selector.best_ == selector.ranking_[0]
    assert list(selector.scores_["rank"]) == [1, 2, 3]
    assert selector.best_ == "good_on_target"
    assert selector.scores_.loc["predictions_only", ["dev", "iwcv"]].isna().all()
    assert selector.nan_reasons_["predictions_only"]["dev"].startswith("missing source_val_features")
    assert not selector.scores_.loc[["good_on_target", "good_on_source"]].isna().any().any()
    if scorer in ("dev", "iwcv"):
        assert selector.ranking_[-1] == "predictions_only"  # NaN ranks last


def test_selector_rejects_bad_parameters_and_inputs(caplog):
    with pytest.raises(ValueError, match="scorer must be one of"):
        UnsupervisedSelector(scorer="accuracy")
    with pytest.raises(ValueError, match="unknown arrays"):
        UnsupervisedSelector().fit({"a": {"target_probs": np.eye(2)}})
    with pytest.raises(ValueError, match="no candidates"):
        UnsupervisedSelector().fit({})
    with pytest.raises(ValueError, match="no candidate has a finite dev"):
        UnsupervisedSelector(scorer="dev").fit({"a": {"target_probabilities": np.eye(2)}})
    with caplog.at_level("INFO", logger="medtl.select"):
        selector = UnsupervisedSelector(scorer="entropy").fit(
            {"a": {"target_probabilities": np.eye(2)}, "b": {"target_probabilities": np.full((2, 2), 0.5)}})
    assert selector.ranking_ == ["a", "b"]
    assert "has no dev score: missing" in caplog.text


def test_docstring_examples_run():
    result = doctest.testmod(medtl.select.unsupervised, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
