"""Target-aware backbone selection: the probe on the unlabeled target, the feature divergence, the combined ranking."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

import medtl.select.target_aware
from medtl.select.selector import BackboneSelector
from medtl.select.target_aware import (AGREEMENT_KEYS, TARGET_COLUMNS, TargetAwareRanker, feature_divergence,
                                       probe_on_target, ranking_agreement)
from medtl.select.unsupervised import CANDIDATE_KEYS, UNSUPERVISED_SCORES, UnsupervisedSelector
from medtl.select.validation import validate_selection

N_SOURCE, N_TARGET, DIM = 240, 240, 16


def _simulate(seed: int = 0) -> dict:
    """Three backbones whose transfer to a second hospital is known.

    ``imagenet``: the class moves one feature strongly at both hospitals, the target is slightly shifted.
    ``ssl``: the same with a weaker class signal and a larger shift. ``scratch``: a random ReLU projection of
    the image; at the source the class dominates the image (features separate the classes perfectly, the highest
    LogME), at the target the projection changes (another detector) and the image content it responds to carries
    no class, so the source probe gives ~0.5 there.
    """
    rng = np.random.default_rng(seed)
    y_source = rng.permutation(np.repeat([0, 1], N_SOURCE // 2))
    y_target = rng.permutation(np.repeat([0, 1], N_TARGET // 2))

    def embed(labels: np.ndarray, signal: float, shift: float) -> np.ndarray:
        f = rng.normal(size=(len(labels), DIM)) + shift
        f[:, 0] += signal * (2 * labels - 1)
        return f

    source = {"imagenet": embed(y_source, 1.5, 0.0), "ssl": embed(y_source, 0.7, 0.0)}
    target = {"imagenet": embed(y_target, 1.5, 0.2), "ssl": embed(y_target, 0.7, 0.5)}
    w_source, w_target = rng.normal(size=(2, 8, DIM))
    image_source = rng.normal(size=(N_SOURCE, 8))
    image_source[:, 0] += 6.0 * (2 * y_source - 1)
    image_target = rng.normal(size=(N_TARGET, 8)) + 1.0
    source["scratch"] = np.maximum(image_source @ w_source, 0.0)
    target["scratch"] = np.maximum(image_target @ w_target, 0.0)
    groups = np.arange(N_SOURCE) // 2  # two images per patient
    # the truth the ranking should recover: each source probe's AUC on the target, with the target's labels
    auc = {name: float(roc_auc_score(y_target, probe_on_target(source[name], y_source, target[name],
                                                               source_groups=groups)["target_probabilities"][:, 1]))
           for name in source}
    return {"features": source, "target": target, "y": y_source, "groups": groups, "target_auc": auc}


@pytest.fixture(scope="module")
def cohort() -> dict:
    data = _simulate()
    selector = BackboneSelector(rank_by="logme").fit(data["features"], data["y"], groups=data["groups"])
    data["selector"] = selector
    data["source_scores"] = selector.scores_["logme"]
    return data


def _fit(cohort: dict, source_scores=None, features=None, **params) -> TargetAwareRanker:
    return TargetAwareRanker(**params).fit(cohort["source_scores"] if source_scores is None else source_scores,
                                           cohort["features"] if features is None else features, cohort["y"],
                                           cohort["target"], groups=cohort["groups"])


# --- the defining behaviour -------------------------------------------------------------------------------------

def test_simulation_has_the_reported_failure(cohort):
    """Source-only scores put the random network first although it transfers worst."""
    assert cohort["selector"].ranking_[0] == "scratch"
    assert cohort["selector"].scores_.loc["scratch", "linear_probe_auc"] > 0.99
    auc = cohort["target_auc"]
    assert abs(auc["scratch"] - 0.5) < 0.1
    assert auc["imagenet"] > auc["ssl"] > auc["scratch"] + 0.2


def test_target_aware_ranking_demotes_scratch_and_agrees_better(cohort):
    ranker = _fit(cohort)
    assert ranker.best_ == "imagenet"
    assert ranker.ranking_ == ["imagenet", "scratch", "ssl"]
    assert ranker.target_scores_["target_rank"].to_dict() == {"imagenet": 1.0, "scratch": 3.0, "ssl": 2.0}
    # EnsV: scratch's probe disagrees with the pool's ensemble; its features moved most between hospitals
    assert ranker.target_scores_["ensv"].idxmin() == "scratch"
    assert ranker.target_scores_["divergence"].idxmax() == "scratch"

    source_only = ranking_agreement(cohort["source_scores"], cohort["target_auc"])
    combined = ranking_agreement(-ranker.scores_["rank"], cohort["target_auc"])
    assert combined["kendall_tau"] > source_only["kendall_tau"]
    assert combined["weighted_tau"] > source_only["weighted_tau"]
    assert source_only["top_pick"] == "scratch" and not source_only["top_pick_is_best"]
    assert combined["top_pick"] == "imagenet" and combined["top_pick_is_best"] and combined["regret"] == 0.0
    assert source_only["regret"] == pytest.approx(cohort["target_auc"]["imagenet"] - cohort["target_auc"]["scratch"])


def test_learned_attributes_are_consistent(cohort):
    ranker = _fit(cohort)
    order = ranker.ranking_
    assert list(ranker.target_scores_.columns) == list(TARGET_COLUMNS)
    for table in (ranker.target_scores_, ranker.source_rank_, ranker.combined_rank_, ranker.scores_):
        assert list(table.index) == order
    assert ranker.source_rank_.to_dict() == {"scratch": 1.0, "imagenet": 2.0, "ssl": 3.0}
    expected = 0.5 * ranker.source_rank_ + 0.5 * ranker.target_scores_["target_rank"]
    pd.testing.assert_series_equal(ranker.combined_rank_, expected, check_names=False)
    assert ranker.scores_["rank"].tolist() == [1, 2, 3]
    assert ranker.target_scores_[list(UNSUPERVISED_SCORES) + ["divergence"]].notna().all().all()
    assert ranker.nan_reasons_ == {}
    # the same candidate arrays through UnsupervisedSelector give the same scores (the ranker adds nothing hidden)
    arrays = {name: probe_on_target(cohort["features"][name], cohort["y"], cohort["target"][name],
                                    source_groups=cohort["groups"]) for name in order}
    direct = UnsupervisedSelector(scorer="ensv", folds=3).fit(arrays).scores_
    pd.testing.assert_frame_equal(ranker.target_scores_[list(UNSUPERVISED_SCORES)],
                                  direct.loc[order, list(UNSUPERVISED_SCORES)])


def test_dev_iwcv_and_snd_favour_the_shifted_random_network(cohort):
    """A characterisation of the limitation the ranker's docstring states (why ``ensv`` and the divergence)."""
    ranker = _fit(cohort)
    for score in ("dev", "iwcv", "snd"):
        assert ranker.target_scores_[score].idxmax() == "scratch", score
    # the divergence ranks it last, which offsets DEV's rank but not DEV and the source score together
    dev = _fit(cohort, scorer="dev")
    assert dev.target_scores_["divergence"].idxmax() == "scratch" and dev.best_ == "scratch"


# --- probe_on_target -------------------------------------------------------------------------------------------

def test_probe_arrays_have_the_shapes_unsupervised_selector_needs(cohort):
    candidates = {}
    for name, source in cohort["features"].items():
        arrays = probe_on_target(source, cohort["y"], cohort["target"][name], source_groups=cohort["groups"])
        assert tuple(arrays) == CANDIDATE_KEYS
        assert arrays["target_probabilities"].shape == (N_TARGET, 2)
        assert np.allclose(arrays["target_probabilities"].sum(axis=1), 1.0)
        assert arrays["source_val_features"].shape == (N_SOURCE, DIM)
        assert arrays["source_val_losses"].shape == (N_SOURCE,)
        assert arrays["target_features"].shape == (N_TARGET, DIM)
        assert (arrays["source_val_losses"] >= 0).all()
        # standardised with the source scaler: the source is centred, the target keeps its shift
        assert np.allclose(arrays["source_val_features"].mean(axis=0), 0.0, atol=1e-9)
        candidates[name] = arrays
    selector = UnsupervisedSelector(scorer="dev", folds=3).fit(candidates)
    assert np.isfinite(selector.scores_[["dev", "iwcv", "entropy", "snd", "ensv"]].to_numpy()).all()
    assert selector.nan_reasons_ == {}


def test_probe_losses_are_cross_fitted():
    """Out-of-fold losses of a probe on noise are those of chance, not of a probe that saw the samples."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    source = rng.normal(size=(80, 40))  # no class information, many features: a fitted probe memorises
    arrays = probe_on_target(source, y, rng.normal(size=(30, 40)), cv_folds=4)
    assert arrays["source_val_losses"].mean() > np.log(2)  # at least chance: the probe never saw these samples
    # labels are encoded in sorted order, whatever their type
    named = probe_on_target(source, np.where(y == 1, "pneumonia", "normal"), rng.normal(size=(30, 40)), cv_folds=4)
    np.testing.assert_allclose(named["source_val_losses"], arrays["source_val_losses"])


def test_probe_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    source = rng.normal(size=(20, 3))
    with pytest.raises(ValueError, match="same D"):
        probe_on_target(source, y, rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="source features contain NaN"):
        probe_on_target(np.where(np.eye(20, 3) > 0, np.nan, source), y, rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="two classes"):
        probe_on_target(source, np.zeros(20), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="cv_folds"):
        probe_on_target(source, y, rng.normal(size=(5, 3)), cv_folds=1)
    with pytest.raises(ValueError, match="one class only"):  # one patient per class: a fold without a class
        probe_on_target(source, y, rng.normal(size=(5, 3)), source_groups=y)


# --- feature_divergence ----------------------------------------------------------------------------------------

def test_divergence_grows_with_the_shift_and_ignores_the_scale():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(300, 8))
    same, near, far = (rng.normal(size=(300, 8)) + shift for shift in (0.0, 0.3, 1.5))
    d_same, d_near, d_far = (feature_divergence(source, target) for target in (same, near, far))
    assert d_same < 0.2 < d_near < d_far
    assert 0.0 <= d_same and d_far <= 2.0
    # standardised: a backbone with 1000x larger activations (or an offset) is no further from the target
    assert feature_divergence(1000 * source + 5, 1000 * far + 5) == pytest.approx(d_far, abs=0.02)
    # subsampling is deterministic for a seed
    assert feature_divergence(source, far, max_images=100) == feature_divergence(source, far, max_images=100)
    with pytest.raises(ValueError, match="target features contain NaN"):
        feature_divergence(source, np.full((10, 8), np.nan))
    with pytest.raises(ValueError, match="max_images"):
        feature_divergence(source, far, max_images=1)


def test_divergence_is_larger_for_the_shifted_candidate(cohort):
    divergence = {name: feature_divergence(cohort["features"][name], cohort["target"][name])
                  for name in cohort["features"]}
    assert divergence["imagenet"] < divergence["ssl"] < divergence["scratch"]  # target shifts 0.2, 0.5, projection


# --- ranking rules ---------------------------------------------------------------------------------------------

def test_source_weight_one_reproduces_the_source_only_ranking(cohort):
    ranker = _fit(cohort, source_weight=1.0)
    assert ranker.ranking_ == cohort["selector"].ranking_
    # and with weight 0 the target side alone orders them
    assert _fit(cohort, source_weight=0.0).ranking_ == ["imagenet", "ssl", "scratch"]


def test_ties_in_the_combined_rank_go_to_the_source_rank(cohort):
    # source ranks scratch 1, ssl 2, imagenet 3 against target ranks 3, 2, 1: every combined rank is 2
    ranker = _fit(cohort, source_scores={"imagenet": 1.0, "ssl": 2.0, "scratch": 3.0})
    assert ranker.combined_rank_.tolist() == [2.0, 2.0, 2.0]
    assert ranker.ranking_ == ["scratch", "ssl", "imagenet"]
    # ties in the source rank too keep the input order (imagenet, ssl, scratch), as BackboneSelector's ranking does
    tied = _fit(cohort, source_scores={"imagenet": 2.0, "ssl": 1.0, "scratch": 1.0}, source_weight=1.0)
    assert tied.source_rank_.to_dict() == {"imagenet": 1.0, "ssl": 2.5, "scratch": 2.5}
    assert tied.ranking_ == ["imagenet", "ssl", "scratch"]


def test_nan_source_score_ranks_last(cohort):
    scores = cohort["source_scores"].copy()
    scores["imagenet"] = np.nan
    ranker = _fit(cohort, source_scores=scores, source_weight=1.0)
    assert ranker.ranking_[-1] == "imagenet"
    assert ranker.source_rank_["imagenet"] == 3.0
    assert ranker.nan_reasons_["imagenet"]["source_score"] == "no finite source-only score"


def test_nan_features_rank_last_on_the_target_side_with_a_reason(cohort):
    features = dict(cohort["features"])
    features["imagenet"] = features["imagenet"].copy()
    features["imagenet"][0, 0] = np.nan
    ranker = _fit(cohort, features=features)
    row = ranker.target_scores_.loc["imagenet"]
    assert row[list(UNSUPERVISED_SCORES) + ["divergence"]].isna().all()
    assert row["target_rank"] == 3.0
    assert ranker.target_scores_["target_rank"].drop("imagenet").max() < 3.0
    reasons = ranker.nan_reasons_["imagenet"]
    assert reasons["ensv"].startswith("no target probe") and "NaN" in reasons["ensv"]
    assert "NaN" in reasons["divergence"]
    assert "imagenet" in ranker.ranking_  # still ranked, by its source score


def test_without_divergence_the_target_rank_is_the_scorers(cohort):
    ranker = _fit(cohort, divergence=False, scorer="entropy")
    assert ranker.target_scores_["divergence"].isna().all()
    expected = ranker.target_scores_["entropy"].rank(ascending=False)
    pd.testing.assert_series_equal(ranker.target_scores_["target_rank"], expected, check_names=False)
    assert "divergence" not in ranker.nan_reasons_.get("imagenet", {})


# --- parameters and inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, match", [({"scorer": "logme"}, "scorer"), ({"source_weight": 1.5}, "source_weight"),
                                           ({"source_weight": "half"}, "source_weight"), ({"cv_folds": 1}, "cv_folds"),
                                           ({"divergence": "yes"}, "divergence"), ({"seed": 0.5}, "seed")])
def test_invalid_parameters_fail_at_construction(params, match):
    with pytest.raises(ValueError, match=match):
        TargetAwareRanker(**params)


def test_scikit_learn_conventions(cohort):
    ranker = TargetAwareRanker(scorer="snd", source_weight=0.3)
    assert clone(ranker).get_params() == ranker.get_params()
    ranker.set_params(source_weight=2.0)
    with pytest.raises(ValueError, match="source_weight"):
        ranker.fit(cohort["source_scores"], cohort["features"], cohort["y"], cohort["target"])


def test_inconsistent_inputs_are_rejected(cohort):
    features, target, y = cohort["features"], cohort["target"], cohort["y"]
    ranker = TargetAwareRanker()
    with pytest.raises(ValueError, match="source_scores must name exactly"):
        ranker.fit({"imagenet": 1.0}, features, y, target)
    with pytest.raises(ValueError, match="target_features must name exactly"):
        ranker.fit(cohort["source_scores"], features, y, {"imagenet": target["imagenet"]})
    with pytest.raises(ValueError, match="same N_t"):
        ranker.fit(cohort["source_scores"], features, y, {**target, "ssl": target["ssl"][:10]})
    with pytest.raises(ValueError, match="as wide as"):
        ranker.fit(cohort["source_scores"], features, y, {**target, "ssl": target["ssl"][:, :3]})
    with pytest.raises(ValueError, match="no candidate has a target probe"):
        ranker.fit(cohort["source_scores"], {name: np.full_like(f, np.nan) for name, f in features.items()}, y,
                   target)


# --- ranking_agreement -----------------------------------------------------------------------------------------

def test_ranking_agreement_reuses_validate_selection():
    scores = {"a": 3.0, "b": 2.0, "c": np.nan, "d": 1.0}
    measured = {"a": 0.8, "b": 0.9, "c": 0.95, "d": 0.7}
    result = ranking_agreement(scores, measured)
    assert tuple(result) == AGREEMENT_KEYS
    row = validate_selection(pd.DataFrame({"s": scores}), pd.DataFrame({"s": dict.fromkeys(scores, 1.0)}),
                             measured, dict.fromkeys(measured, 1.0)).loc["s"]
    assert result["kendall_tau"] == row["kendall_tau"] and result["weighted_tau"] == row["weighted_tau"]
    assert result["n_candidates"] == 3 and result["n_without_score"] == 1
    assert result["top_pick"] == "a" and result["top_pick_result"] == 0.8
    # the measured best is over every measured candidate, the unscored one included
    assert result["measured_best_candidate"] == "c" and result["measured_best"] == 0.95
    assert result["regret"] == pytest.approx(0.15) and not result["top_pick_is_best"]
    assert ranking_agreement({"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 0.6})["kendall_tau"] == 1.0


def test_doctests():
    result = doctest.testmod(medtl.select.target_aware)
    assert result.attempted > 0 and result.failed == 0


def test_a_divergence_that_is_the_same_for_every_candidate_does_not_rank() -> None:
    """Every feature space tells the hospitals apart (proxy A-distance 2 for all): the target side is EnsV alone."""
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 60)
    features, target = {}, {}
    for name, signal in (("a", 3.0), ("b", 1.0), ("c", 0.3)):
        features[name] = rng.normal(size=(120, 5)) + signal * y[:, None]
        target[name] = rng.normal(size=(120, 5)) + signal * y[:, None] + 25.0  # far away: separable for all
    ranker = TargetAwareRanker().fit({"a": 0.0, "b": 1.0, "c": 2.0}, features, y, target)
    assert np.ptp(ranker.target_scores_["divergence"]) < ranker.min_divergence_spread
    assert ranker.divergence_used_ is False
    expected = ranker.target_scores_["ensv"].rank(ascending=False, method="average")
    assert ranker.target_scores_["target_rank"].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="min_divergence_spread"):
        TargetAwareRanker(min_divergence_spread=-1)
