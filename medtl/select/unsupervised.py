"""Unsupervised model selection: rank adapted models (or checkpoints) on a target hospital without its labels.

Domain adaptation has hyper-parameters and checkpoints to choose, and the target's labels, which would choose
them, are the one thing it lacks. These scorers use only what is available: the candidate's predictions and
features on the unlabeled target, and its losses on the *labeled source validation* set. Pure functions of numpy
arrays; **higher is better for every score** (each is the negative of a risk or an entropy where needed):

* :func:`entropy_score` = −(mean entropy of the target predictions): confident predictions (Morerio et al.,
  "Minimal-Entropy Correlation Alignment for Unsupervised Deep Domain Adaptation", ICLR 2018, use it as a
  validation criterion). Fooled by a model that is confidently wrong.
* :func:`snd_score`: soft neighbourhood density of the target predictions (Saito et al., "Tune it the Right
  Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood Density", ICCV 2021): high when target
  samples form dense clusters in the prediction space.
* :func:`dev_score` = −(deep embedded validation risk) (You et al., "Towards Accurate Model Selection in Deep
  Unsupervised Domain Adaptation", ICML 2019): the source validation loss importance-weighted towards the
  target, with a control variate; :func:`iwcv_score` is the same without the control variate (Sugiyama et al.,
  "Covariate Shift Adaptation by Importance Weighted Cross Validation", JMLR 2007).
* :func:`ensemble_agreement_scores` (EnsV; Hu et al., "Towards Reliable Model Selection for Unsupervised Domain
  Adaptation: An Empirical Study and A Certified Baseline", NeurIPS 2024 Datasets and Benchmarks): each
  candidate's agreement with the pseudo-labels of the mean prediction of *all* candidates. The only score here
  that is computed over the candidate pool rather than one candidate at a time; the ensemble is provably no
  worse than the worst candidate, so a confidently wrong candidate (which fools entropy and SND) disagrees with
  it and ranks low, and it needs no source validation images (which DEV and IWCV need many of).

:class:`UnsupervisedSelector` computes them all for a set of candidates and ranks them by one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("medtl.select")

UNSUPERVISED_SCORES = ("entropy", "snd", "dev", "iwcv", "ensv")
"""The scores of :class:`UnsupervisedSelector`, all higher-is-better."""
SCORE_INPUTS: Mapping[str, tuple[str, ...]] = {
    "entropy": ("target_probabilities",),
    "snd": ("target_probabilities",),
    "dev": ("source_val_features", "source_val_losses", "target_features"),
    "iwcv": ("source_val_features", "source_val_losses", "target_features"),
    "ensv": ("target_probabilities",),
}
"""The candidate arrays each score needs."""
CANDIDATE_KEYS = ("target_probabilities", "source_val_features", "source_val_losses", "target_features")
"""What a candidate may give: (N_t, C) softmax on the target, (N_s, D) and (N_s,) features and per-sample losses
on the labeled source validation set, (N_t, D) features on the target."""

_EPS = 1e-12


def prediction_entropy(probabilities: np.ndarray) -> float:
    """Mean Shannon entropy (nats) of predicted class distributions.

    Args:
        probabilities: (N, C) softmax outputs, rows summing to 1.

    Returns:
        Mean entropy, in [0, log C]: 0 for one-hot predictions, log C for uniform ones.

    Examples:
        >>> prediction_entropy(np.array([[1.0, 0.0], [0.5, 0.5]]))  # (0 + log 2) / 2
        0.34657...
    """
    p = _check_probabilities(probabilities, "probabilities")
    return float(_row_entropy(p).mean())


def entropy_score(target_probabilities: np.ndarray) -> float:
    """Minus the mean prediction entropy on the target: higher = more confident (Morerio et al., ICLR 2018).

    Args:
        target_probabilities: (N_t, C) softmax outputs of the candidate on the unlabeled target.

    Returns:
        ``-prediction_entropy(target_probabilities)``, in [-log C, 0].

    Examples:
        >>> entropy_score(np.full((2, 4), 0.25))  # uniform over 4 classes: -log 4
        -1.38629...
    """
    return -prediction_entropy(target_probabilities)


def snd_score(target_probabilities: np.ndarray, temperature: float = 0.05, block_size: int = 1024) -> float:
    """Soft neighbourhood density of the target predictions (Saito et al., ICCV 2021); higher = denser clusters.

    The L2-normalised probability vectors ``f_i`` give similarities ``s_ij = f_i · f_j``; each sample's neighbour
    distribution is ``P_i = softmax_j(s_ij / τ)`` over the other samples (self excluded), and
    ``SND = (1/N) Σ_i H(P_i)``. A model whose target predictions fall into tight, consistent clusters has many
    equally near neighbours per sample, hence a high neighbour entropy. (The paper's code masks self with
    similarity -1, i.e. a weight of ``exp(-1/τ)``; here it is excluded exactly.) Computed in blocks of rows,
    so memory is O(``block_size`` · N).

    Args:
        target_probabilities: (N_t, C) softmax outputs on the target, N_t >= 2.
        temperature: τ, the softness of the neighbour distribution (the paper's 0.05).
        block_size: rows of the similarity matrix held at once.

    Returns:
        SND, in [0, log(N_t - 1)] nats.

    Examples:
        >>> round(snd_score(np.repeat(np.eye(2), 3, axis=0)), 4)  # two tight clusters of 3: log 2 + tiny
        0.6931
    """
    p = _check_probabilities(target_probabilities, "target_probabilities")
    if len(p) < 2:
        raise ValueError(f"snd_score needs at least 2 target samples (each needs a neighbour), got {len(p)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (Saito et al. use 0.05), got {temperature}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    f = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), _EPS)
    n = len(f)
    total = 0.0
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        logits = f[start:stop] @ f.T / temperature
        logits[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        log_p = logits - log_z
        q = np.exp(log_p)
        total += float(-(q * np.where(np.isfinite(log_p), log_p, 0.0)).sum())
    return total / n


def importance_weights(source_features: np.ndarray, target_features: np.ndarray, folds: int = 5, seed: int = 0,
                       regularization: float = 1.0) -> np.ndarray:
    """Density ratios ``w(x) = p_target(x) / p_source(x)`` at the source samples, from a domain classifier.

    A logistic regression on standardised features tells source (0) from target (1); by Bayes' rule
    ``w(x) = (N_s / N_t) · P(target | x) / P(source | x)`` (You et al., ICML 2019, eq. 7). The classifier's
    probabilities at the source samples are cross-fitted (each fold's from a classifier trained without it) so
    that the weights are not those of a classifier that memorised the samples it weighs, as the paper's
    discriminator, trained on the source *training* features, is not.

    Args:
        source_features: (N_s, D) features of the labeled source validation samples.
        target_features: (N_t, D) features of the unlabeled target samples.
        folds: cross-fitting folds, at least 2 (capped at the smaller domain's size).
        seed: random state of the folds.
        regularization: inverse L2 strength ``C`` of the logistic regression.

    Returns:
        (N_s,) non-negative weights; they average about 1 when the classifier is calibrated.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> w = importance_weights(rng.normal(size=(200, 2)), rng.normal(size=(200, 2)))
        >>> bool(abs(w.mean() - 1) < 0.1)
        True
    """
    xs = np.asarray(source_features, dtype=np.float64)
    xt = np.asarray(target_features, dtype=np.float64)
    if xs.ndim != 2 or xt.ndim != 2 or xs.shape[1] != xt.shape[1]:
        raise ValueError(f"source_features and target_features must be (N_s, D) and (N_t, D) with the same D, got "
                         f"{xs.shape} and {xt.shape}")
    if not (np.isfinite(xs).all() and np.isfinite(xt).all()):
        raise ValueError("source_features or target_features contain NaN or inf")
    if int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2 (the weights are cross-fitted), got {folds!r}")
    if not regularization > 0:
        raise ValueError(f"regularization (the logistic regression's C) must be > 0, got {regularization}")
    n_s, n_t = len(xs), len(xt)
    folds = min(int(folds), n_s, n_t)
    if folds < 2:
        raise ValueError(f"importance weights need at least 2 source and 2 target samples, got {n_s} and {n_t}")
    x = np.concatenate([xs, xt])
    domain = np.r_[np.zeros(n_s, int), np.ones(n_t, int)]
    weights = np.empty(n_s)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, domain):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
        classifier.fit(x[train], domain[train])
        source_test = test[test < n_s]
        p_target = np.clip(classifier.predict_proba(x[source_test])[:, 1], 1e-6, 1 - 1e-6)
        # the classifier's odds carry its training prior N_t / N_s (of this fold's training part): undo it
        prior_ratio = (domain[train] == 0).sum() / (domain[train] == 1).sum()
        weights[source_test] = p_target / (1 - p_target) * prior_ratio
    return weights


def iwcv_risk(source_val_losses: np.ndarray, weights: np.ndarray) -> float:
    """Importance-weighted validation risk ``(1/N_s) Σ w_i ℓ_i`` (Sugiyama et al., JMLR 2007).

    Args:
        source_val_losses: (N_s,) per-sample losses on the labeled source validation set.
        weights: (N_s,) density ratios target/source at those samples (:func:`importance_weights`).

    Returns:
        The estimated target risk (in the loss's units).

    Examples:
        >>> iwcv_risk(np.array([1.0, 3.0]), np.array([0.5, 1.5]))
        2.5
    """
    loss, w = _check_losses_weights(source_val_losses, weights)
    return float((w * loss).mean())


def dev_risk(source_val_losses: np.ndarray, weights: np.ndarray) -> float:
    """Deep embedded validation risk: the importance-weighted risk with a control variate (You et al., ICML 2019).

    With ``L_i = w_i ℓ_i`` and ``E[w] = 1`` under the source, ``mean(L) + η (mean(w) - 1)`` is unbiased for any η;
    ``η = -Cov(L, w) / Var(w)`` minimises its variance (Algorithm 1 of the paper). With constant weights
    (``Var(w) = 0``) η is 0 and the risk is the IWCV risk.

    Args:
        source_val_losses: (N_s,) per-sample losses on the labeled source validation set.
        weights: (N_s,) density ratios target/source at those samples.

    Returns:
        The DEV estimate of the target risk.

    Examples:
        >>> dev_risk(np.array([1.0, 2.0, 3.0]), np.ones(3))  # identical domains: the plain mean loss
        2.0
    """
    loss, w = _check_losses_weights(source_val_losses, weights)
    weighted = w * loss
    variance = float(w.var(ddof=1)) if len(w) > 1 else 0.0
    eta = -float(np.cov(weighted, w, ddof=1)[0, 1]) / variance if variance > _EPS else 0.0
    return float(weighted.mean() + eta * w.mean() - eta)


def dev_score(source_val_features: np.ndarray, source_val_losses: np.ndarray, target_features: np.ndarray,
              folds: int = 5, seed: int = 0) -> float:
    """Minus the DEV risk (You et al., ICML 2019): higher = lower estimated target loss.

    Args:
        source_val_features: (N_s, D) the candidate's features of the labeled source validation samples.
        source_val_losses: (N_s,) its per-sample losses on them (e.g. cross-entropy).
        target_features: (N_t, D) its features of the unlabeled target samples.
        folds, seed: cross-fitting of the domain classifier (:func:`importance_weights`).

    Returns:
        ``-dev_risk(source_val_losses, importance_weights(...))``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> xs, xt = rng.normal(size=(100, 2)), rng.normal(size=(100, 2))
        >>> bool(abs(dev_score(xs, np.full(100, 0.3), xt) + 0.3) < 1e-9)  # constant loss: exactly -0.3
        True
    """
    weights = importance_weights(source_val_features, target_features, folds=folds, seed=seed)
    return -dev_risk(source_val_losses, weights)


def iwcv_score(source_val_features: np.ndarray, source_val_losses: np.ndarray, target_features: np.ndarray,
               folds: int = 5, seed: int = 0) -> float:
    """Minus the importance-weighted validation risk (DEV without the control variate); higher = better.

    Args:
        source_val_features: (N_s, D) the candidate's features of the labeled source validation samples.
        source_val_losses: (N_s,) its per-sample losses on them.
        target_features: (N_t, D) its features of the unlabeled target samples.
        folds, seed: cross-fitting of the domain classifier (:func:`importance_weights`).

    Returns:
        ``-iwcv_risk(source_val_losses, importance_weights(...))``.
    """
    weights = importance_weights(source_val_features, target_features, folds=folds, seed=seed)
    return -iwcv_risk(source_val_losses, weights)


def ensemble_agreement_scores(target_probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """EnsV: each candidate's agreement with the ensemble of all candidates (Hu et al., NeurIPS 2024 D&B).

    The ensemble's prediction is the mean of the candidates' softmax outputs and its pseudo-label the argmax;
    a candidate scores the fraction of target samples whose argmax equals that pseudo-label. By convexity of the
    loss, the ensemble is at least as accurate (in cross-entropy) as the average candidate, hence never the
    worst; candidates that agree with it are certified away from the worst case, which the paper found every
    other selection method (entropy, SND, DEV, IWCV among them) fails to avoid on some benchmark. Ties in the
    ensemble's argmax go to the lower class, as ``np.argmax`` does.

    Args:
        target_probabilities: K >= 1 arrays, each (N_t, C): the candidates' softmax outputs on the same target
            samples, in the same order.

    Returns:
        (K,) agreements in [0, 1], higher = closer to the ensemble.

    Examples:
        >>> right = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
        >>> also_right = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
        >>> wrong = np.array([[0.1, 0.9], [0.9, 0.1], [0.4, 0.6]])  # confidently wrong: loses the vote
        >>> ensemble_agreement_scores([right, also_right, wrong])
        array([1., 1., 0.])
    """
    if len(target_probabilities) == 0:
        raise ValueError("ensemble_agreement_scores needs at least one candidate's target_probabilities")
    stacked = [_check_probabilities(p, f"target_probabilities[{k}]") for k, p in enumerate(target_probabilities)]
    if len({p.shape for p in stacked}) > 1:
        raise ValueError("every candidate's target_probabilities must be (N_t, C) on the same target samples, got "
                         f"shapes {sorted({p.shape for p in stacked})}: score every candidate on the same images")
    predictions = np.stack(stacked)  # (K, N_t, C)
    pseudo_labels = predictions.mean(axis=0).argmax(axis=1)
    return (predictions.argmax(axis=2) == pseudo_labels).mean(axis=1)


class UnsupervisedSelector(BaseEstimator):
    """Score candidate adapted models on the unlabeled target and rank them (scikit-learn conventions).

    Every score of ``UNSUPERVISED_SCORES`` that a candidate's arrays allow is computed (``SCORE_INPUTS`` says
    which arrays each needs); the others are NaN, with the reason logged and kept in ``nan_reasons_``. Higher
    is better for every score: ``entropy`` (−mean target entropy), ``snd`` (soft neighbourhood density),
    ``dev`` (−DEV risk), ``iwcv`` (−IWCV risk) and ``ensv`` (agreement with the ensemble of the candidates that
    have target predictions). A candidate whose ``scorer`` score is NaN ranks last.

    Args:
        scorer: the score that orders candidates, one of ``UNSUPERVISED_SCORES``.
        temperature: τ of SND.
        folds: cross-fitting folds of the DEV / IWCV domain classifier.
        seed: random state of those folds.

    Attributes:
        scores_: DataFrame indexed by candidate, best first, one column per score (``UNSUPERVISED_SCORES``) plus
            ``rank`` (1 = best).
        nan_reasons_: candidate → score → why that score is NaN.
        ranking_: candidate names, best first.
        best_: the chosen candidate.
        rankings_: every score → candidate names best first by that score (NaN last, ties in input order), so
            one fit shows what each scorer would pick.
        picks_: every score → its best candidate, or None when no candidate has that score.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> confident = np.repeat(np.eye(2), 10, axis=0) * 0.9 + 0.05
        >>> unsure = rng.dirichlet([1, 1], size=20)
        >>> selector = UnsupervisedSelector(scorer="snd").fit(
        ...     {"dann_epoch5": {"target_probabilities": unsure}, "dann_epoch20": {"target_probabilities": confident}})
        >>> selector.best_
        'dann_epoch20'
        >>> selector.nan_reasons_["dann_epoch20"]["dev"]
        'missing source_val_features, source_val_losses, target_features'
    """

    def __init__(self, scorer: str = "snd", temperature: float = 0.05, folds: int = 5, seed: int = 0) -> None:
        self.scorer = scorer
        self.temperature = temperature
        self.folds = folds
        self.seed = seed
        self._check_params()

    def fit(self, candidates: Mapping[str, Mapping[str, np.ndarray]], y: None = None) -> "UnsupervisedSelector":
        """Compute every applicable score of every candidate and rank them by ``scorer``.

        Args:
            candidates: candidate name → its arrays, any of ``CANDIDATE_KEYS``: ``target_probabilities``
                (N_t, C), ``source_val_features`` (N_s, D), ``source_val_losses`` (N_s,), ``target_features``
                (N_t, D).
            y: ignored (there are no target labels); present for scikit-learn's API.

        Returns:
            self, fitted.

        Raises:
            ValueError: on no candidates, unknown array names, or when no candidate has a finite ``scorer`` score.
        """
        self._check_params()
        if not candidates:
            raise ValueError("no candidates to select from: pass name → {array name: array}")
        for name, arrays in candidates.items():
            if not isinstance(arrays, Mapping):
                raise ValueError(f"candidate {name!r}: expected a dict of arrays ({', '.join(CANDIDATE_KEYS)}), "
                                 f"got {type(arrays).__name__}")
            unknown = sorted(set(arrays) - set(CANDIDATE_KEYS))
            if unknown:
                raise ValueError(f"candidate {name!r}: unknown arrays {unknown}; expected any of {CANDIDATE_KEYS}")

        scores = pd.DataFrame(np.nan, index=list(candidates), columns=list(UNSUPERVISED_SCORES))
        reasons: dict[str, dict[str, str]] = {}
        for name, arrays in candidates.items():
            for score in UNSUPERVISED_SCORES:
                missing = [key for key in SCORE_INPUTS[score] if arrays.get(key) is None]
                if missing:
                    reasons.setdefault(name, {})[score] = "missing " + ", ".join(missing)
                elif score != "ensv":  # ensv needs the whole pool: below
                    try:
                        scores.loc[name, score] = self._compute(score, arrays)
                    except (ValueError, np.linalg.LinAlgError) as exc:  # data that cannot support this score
                        reasons.setdefault(name, {})[score] = str(exc)
        pool = [name for name in candidates if "ensv" not in reasons.get(name, {})]
        if pool:
            try:
                scores.loc[pool, "ensv"] = ensemble_agreement_scores(
                    [candidates[name]["target_probabilities"] for name in pool])
            except ValueError as exc:
                for name in pool:
                    reasons.setdefault(name, {})["ensv"] = str(exc)
        for name in candidates:
            for score, reason in reasons.get(name, {}).items():
                log.info("select: %s has no %s score: %s", name, score, reason)

        unranked = [name for name in candidates if np.isnan(scores.loc[name, self.scorer])]
        if len(unranked) == len(candidates):
            raise ValueError(f"no candidate has a finite {self.scorer}: "
                             + "; ".join(f"{name}: {reasons[name][self.scorer]}" for name in unranked)
                             + f". Give each candidate {SCORE_INPUTS[self.scorer]} or choose another scorer "
                               f"among {UNSUPERVISED_SCORES}")
        for name in unranked:
            log.warning("select: %s ranks last: its %s is NaN (%s)", name, self.scorer, reasons[name][self.scorer])

        # the same order for every score (stable: ties keep the input order), computed from one pass of scoring
        self.rankings_ = {score: list(scores[score].sort_values(ascending=False, kind="stable",
                                                                na_position="last").index)
                          for score in UNSUPERVISED_SCORES}
        self.picks_ = {score: (ranking[0] if np.isfinite(scores.loc[ranking[0], score]) else None)
                       for score, ranking in self.rankings_.items()}
        order = self.rankings_[self.scorer]
        self.scores_ = scores.loc[order].assign(rank=np.arange(1, len(order) + 1))
        self.nan_reasons_ = reasons
        self.ranking_ = list(order)
        self.best_ = self.ranking_[0]
        return self

    def _compute(self, score: str, arrays: Mapping[str, np.ndarray]) -> float:
        if score == "entropy":
            return entropy_score(arrays["target_probabilities"])
        if score == "snd":
            return snd_score(arrays["target_probabilities"], temperature=self.temperature)
        function = dev_score if score == "dev" else iwcv_score
        return function(arrays["source_val_features"], arrays["source_val_losses"], arrays["target_features"],
                        folds=self.folds, seed=self.seed)

    def _check_params(self) -> None:
        if self.scorer not in UNSUPERVISED_SCORES:
            raise ValueError(f"scorer must be one of {UNSUPERVISED_SCORES}, got {self.scorer!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (Saito et al. use 0.05), got {self.temperature!r}")
        if int(self.folds) != self.folds or self.folds < 2:
            raise ValueError(f"folds must be an integer >= 2, got {self.folds!r}")


def per_sample_cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy ``-log p(y_i)`` of predicted class distributions: the losses DEV / IWCV weigh.

    Args:
        probabilities: (N, C) softmax outputs, rows summing to 1.
        labels: (N,) integer classes in [0, C).

    Returns:
        (N,) losses in nats; a probability of 0 for the true class is clipped to 1e-12 (a loss of about 27.6)
        so that one confidently wrong sample stays finite.

    Examples:
        >>> per_sample_cross_entropy(np.array([[0.5, 0.5], [0.9, 0.1]]), np.array([1, 0]))  # log 2, -log 0.9
        array([0.69314718, 0.10536052])
    """
    p = _check_probabilities(probabilities, "probabilities")
    y = np.asarray(labels)
    if y.shape != (len(p),):
        raise ValueError(f"labels must be (N,) = ({len(p)},), one per row of probabilities, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.isfinite(y).all() and np.all(y == np.round(y))):
            raise ValueError("labels must be integer classes (unlabeled samples, NaN or -1, have no loss: drop them)")
        y = y.astype(int)
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {p.shape[1]}) for {p.shape[1]} classes, got "
                         f"{sorted(set(y.tolist()))} (unlabeled samples, -1, have no loss: drop them)")
    return -np.log(np.maximum(p[np.arange(len(p)), y], _EPS))


def _check_probabilities(probabilities: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"{name} must be (N, C) with N >= 1 and C >= 2 classes, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{name} must be probabilities (non-negative, rows summing to 1): apply a softmax to the "
                         f"model's logits first")
    return p


def _row_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def _check_losses_weights(losses: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    loss = np.asarray(losses, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if loss.ndim != 1 or loss.shape != w.shape or len(loss) == 0:
        raise ValueError(f"source_val_losses and weights must both be (N_s,) with N_s >= 1, got {loss.shape} and "
                         f"{w.shape}")
    if not (np.isfinite(loss).all() and np.isfinite(w).all()):
        raise ValueError("source_val_losses or weights contain NaN or inf: drop those samples first")
    if (w < 0).any():
        raise ValueError("weights must be non-negative density ratios")
    return loss, w
