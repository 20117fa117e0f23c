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
