"""Target-aware backbone selection: rank candidates by their source scores *and* the unlabeled target hospital.

:class:`medtl.select.selector.BackboneSelector` ranks backbones by transferability scores computed on the source
hospitals' labeled images only. Those scores measure how well a backbone's frozen features fit the *source*
labels, not whether they mean the same thing at another hospital: a randomly initialised network can separate
the source classes best (its many random features are easy to fit on a few hundred images; high LogME and
source linear-probe AUC) and still transfer worst, because what its features respond to changes with the
detector and the acquisition. This module adds, per candidate, a **label-free target-side score** computed from
the target hospital's unlabeled images, and a ranking that combines both:

* :func:`probe_on_target`: the candidate's linear probe (trained on the labeled source) applied to the
  unlabeled target, plus cross-fitted source losses, i.e. exactly the arrays that
  :class:`medtl.select.unsupervised.UnsupervisedSelector` scores (EnsV, DEV, IWCV, SND, entropy).
* :func:`feature_divergence`: the proxy A-distance between the candidate's source and target features
  (Ben-David et al., "Analysis of Representations for Domain Adaptation", NeurIPS 2006; "A theory of
  learning from different domains", Machine Learning 2010), lower = closer.
* :class:`TargetAwareRanker`: the target-side rank (mean of the unsupervised score's rank and the divergence's
  rank) averaged with the source-only rank.
* :func:`ranking_agreement`: Kendall τ, weighted τ and regret of a ranking against a measured quantity (e.g.
  target AUC after fine-tuning), via :func:`medtl.select.validation.validate_selection`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from medtl.select.scores import _grouped_folds
from medtl.select.unsupervised import (CANDIDATE_KEYS, UNSUPERVISED_SCORES, UnsupervisedSelector,
                                       per_sample_cross_entropy)
from medtl.select.validation import validate_selection

log = logging.getLogger("medtl.select")

TARGET_COLUMNS = UNSUPERVISED_SCORES + ("divergence", "target_rank")
"""Columns of :attr:`TargetAwareRanker.target_scores_`."""
AGREEMENT_KEYS = ("n_candidates", "n_without_score", "weighted_tau", "kendall_tau", "top_pick", "top_pick_result",
                  "measured_best", "measured_best_candidate", "regret", "top_pick_is_best",
                  "top_pick_within_tolerance")
"""Keys of :func:`ranking_agreement`'s result."""


def probe_on_target(source_features: np.ndarray, source_labels: np.ndarray, target_features: np.ndarray, *,
                    source_groups: np.ndarray | None = None, cv_folds: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A candidate's linear probe, trained on the labeled source and applied to the unlabeled target.

    The probe is the one :func:`medtl.select.scores.linear_probe_auc` cross-validates (``StandardScaler`` then an
    L2 logistic regression with ``C = 0.5``), fitted here on *all* labeled source images; its softmax on the
    target images is what EnsV, SND and entropy score. DEV and IWCV (You et al., ICML 2019; Sugiyama et al.,
    JMLR 2007) need per-sample losses on *held-out* labeled source images, so the source losses are cross-fitted:
    each fold's cross-entropy comes from a probe trained without it, with folds stratified by class and grouped
    by patient (``StratifiedGroupKFold``) so that no patient is in both parts. The features DEV / IWCV weigh are
    standardised with the source scaler, for both domains, since candidates' feature scales differ.

    Args:
        source_features: (N_s, D) the candidate's frozen features of the labeled source images.
        source_labels: (N_s,) their classes (any sortable labels; encoded as 0 … C-1 in sorted order).
        target_features: (N_t, D) its features of the unlabeled target images.
        source_groups: (N_s,) patient ids of the source images, or None (each image its own patient).
        cv_folds: cross-fitting folds of the source losses (capped at the smallest class's count and the
            number of patients; at least 2 must remain).
        seed: random state of the folds.

    Returns:
        The arrays :meth:`UnsupervisedSelector.fit` takes for one candidate, keyed by ``CANDIDATE_KEYS``:
        ``target_probabilities`` (N_t, C), ``source_val_features`` (N_s, D) standardised, ``source_val_losses``
        (N_s,) out-of-fold cross-entropies in nats, ``target_features`` (N_t, D) standardised with the source
        scaler.

    Raises:
        ValueError: on inconsistent shapes, non-finite features, fewer than two classes, or too few samples or
            patients per class for the folds.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 30)
        >>> source = y[:, None] + rng.normal(size=(60, 4))
        >>> arrays = probe_on_target(source, y, rng.normal(size=(50, 4)), source_groups=np.arange(60) // 2)
        >>> {key: arrays[key].shape for key in arrays}  # doctest: +NORMALIZE_WHITESPACE
        {'target_probabilities': (50, 2), 'source_val_features': (60, 4), 'source_val_losses': (60,),
         'target_features': (50, 4)}
        >>> bool(np.allclose(arrays["target_probabilities"].sum(axis=1), 1))
        True
    """
    xs, xt, y_index = _check_domains(source_features, target_features, source_labels)
    if int(cv_folds) != cv_folds or cv_folds < 2:
        raise ValueError(f"cv_folds must be an integer >= 2 (the source losses are cross-fitted), got {cv_folds!r}")
    probe = _make_probe().fit(xs, y_index)
    n_classes = int(y_index.max()) + 1
    out_of_fold = np.zeros((len(xs), n_classes))
    for train, test in _grouped_folds(y_index, source_groups, int(cv_folds), seed, "probe_on_target"):
        if len(np.unique(y_index[train])) < 2:
            raise ValueError("a cross-fitting fold's training part holds one class only: give every class more "
                             "patients or use fewer cv_folds")
        fold_probe = _make_probe().fit(xs[train], y_index[train])
        # a class absent from this fold's training part gets probability 0 (its loss is clipped, finite)
        out_of_fold[np.ix_(test, fold_probe.classes_)] = fold_probe.predict_proba(xs[test])
    scaler = probe[0]
    arrays = {"target_probabilities": probe.predict_proba(xt), "source_val_features": scaler.transform(xs),
              "source_val_losses": per_sample_cross_entropy(out_of_fold, y_index),
              "target_features": scaler.transform(xt)}
    return {key: arrays[key] for key in CANDIDATE_KEYS}


def feature_divergence(source_features: np.ndarray, target_features: np.ndarray, *, seed: int = 0,
                       max_images: int = 2000, cv_folds: int = 3) -> float:
    """Proxy A-distance between a candidate's source and target features: lower = the domains look alike.

    ``PAD = 2 (1 - 2 ε)`` (Ben-David et al., NeurIPS 2006 and Machine Learning 2010), where ε is the
    cross-validated *balanced* error of a logistic regression (on features standardised within each training
    fold, ``class_weight="balanced"``) that tells source (0) from target (1) images; clipped to [0, 2]:
    0 = indistinguishable, 2 = perfectly separable. Balanced error, so that unequal domain sizes cannot fake a
    small distance. The same estimator as the proxy A-distance of :func:`medtl.evaluate.shift.shift_diagnostics`
    (there on image statistics, here on a backbone's embeddings).

    Why PAD rather than MMD² with the median-heuristic bandwidth: the score must be comparable across candidates
    whose features differ in dimension (512 vs 2048) and scale (a random network's activations vs a trained
    one's). PAD is an error rate, in the same units for every feature space, invariant to per-feature scale
    after standardisation, and cross-validation keeps a higher-dimensional space from looking more separable
    just because a linear classifier can fit chance differences in it (those do not generalise out of fold).
    MMD² with the median heuristic is scale-free too, but its value depends on the dimension: pairwise distances
    concentrate around their median as D grows, so Gaussian-kernel values, and MMD², shrink for every shift
    alike, and 0.01 in one feature space is not 0.01 in another. PAD also matches the hypothesis class of the
    linear probe the candidates are ranked for: in the bound ``ε_T(h) ≤ ε_S(h) + ½ d_H(S, T) + λ`` the
    divergence ``d_H`` is that of the linear classifiers, which PAD estimates. Whether a random network's
    features separate the hospitals easily (they respond to intensity and noise, which differ between detectors)
    or not (they average everything out), PAD measures exactly what a linear probe can see of the shift.

    Limitations: PAD saturates at 2 when every candidate's features tell the hospitals apart perfectly (then the
    divergence ties and the ranking is left to the other scores); target images are treated as independent
    (no patient grouping, which the unlabeled target need not have).

    Args:
        source_features: (N_s, D) the candidate's features of the source images.
        target_features: (N_t, D) its features of the target images (same D).
        seed: random state of the subsampling and the folds.
        max_images: at most this many images per domain, drawn without replacement (deterministic for a seed;
            the domain classifier costs O(N · D) per iteration).
        cv_folds: folds of the domain classifier's cross-validation (capped at the smaller domain's size).

    Returns:
        The proxy A-distance in [0, 2].

    Raises:
        ValueError: on inconsistent shapes, non-finite features, or fewer than 2 images in a domain.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> source = rng.normal(size=(200, 5))
        >>> round(feature_divergence(source, rng.normal(size=(200, 5))), 1)  # same distribution
        0.0
        >>> round(feature_divergence(source, rng.normal(size=(200, 5)) + 3.0), 1)  # shifted far apart
        2.0
        >>> feature_divergence(1000 * source, 1000 * rng.normal(size=(200, 5)) + 3000.0) > 1.9  # scale-free
        True
    """
    xs, xt, _ = _check_domains(source_features, target_features)
    if int(max_images) != max_images or max_images < 2:
        raise ValueError(f"max_images must be an integer >= 2 (images per domain), got {max_images!r}")
    if int(cv_folds) != cv_folds or cv_folds < 2:
        raise ValueError(f"cv_folds must be an integer >= 2, got {cv_folds!r}")
    rng = np.random.default_rng(seed)
    xs, xt = (x if len(x) <= max_images else x[np.sort(rng.choice(len(x), int(max_images), replace=False))]
              for x in (xs, xt))
    folds = min(int(cv_folds), len(xs), len(xt))
    if folds < 2:
        raise ValueError(f"the proxy A-distance needs at least 2 source and 2 target images, got {len(xs)} and "
                         f"{len(xt)}")
    x = np.concatenate([xs, xt])
    domain = np.r_[np.zeros(len(xs), int), np.ones(len(xt), int)]
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    predicted = cross_val_predict(classifier, x, domain, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    error = 1.0 - float(balanced_accuracy_score(domain, predicted))
    return float(min(max(2.0 * (1.0 - 2.0 * error), 0.0), 2.0))


class TargetAwareRanker(BaseEstimator):
    """Rank candidate backbones by their source-only score and a label-free score on the target hospital.

    Per candidate, :func:`probe_on_target` trains the linear probe on the labeled source features and applies it
    to the unlabeled target features; :class:`UnsupervisedSelector` scores those probes (every score of
    ``UNSUPERVISED_SCORES``), and :func:`feature_divergence` measures how far apart the candidate's source and
    target features are. The **target-side rank** is the mean of the rank by ``scorer`` and (``divergence=True``)
    the rank by the negative divergence, unless the divergence spans less than ``min_divergence_spread`` over the
    candidates: when every candidate's features tell the hospitals apart (proxy A-distance ≈ 2 for all, as on the
    shift benchmark's hospitals), it says nothing about which transfers better, and only ``scorer`` ranks the
    target side. The **combined rank** is
    ``source_weight · source_rank + (1 - source_weight) · target_rank``, ties broken by the source-only rank,
    then by input order. Ranks are 1 = best, ties share their mean rank, and a NaN score ranks last. With the
    default equal weights, the target side overturns the source order only where it disagrees by more places:
    of two candidates, the source-only pick stays first (1 + 2 ties 2 + 1, and the tie goes to the source rank).

    With ``scorer="ensv"`` (the default; Hu et al., NeurIPS 2024 D&B), the ensemble each probe is compared with is
    the mean of **the pool of these candidates' probes** (a few backbones), not of a large set of adapted
    checkpoints: with three candidates one confident, wrong probe weighs a third of the vote. EnsV's guarantee
    (the ensemble is never the worst member) still holds, but is a guarantee about this pool. The other scorers
    are poor choices here: entropy and SND are fooled by a probe that is confidently wrong on the target, and DEV
    / IWCV *favour* a candidate whose features separate the hospitals, since the importance weights of all its
    source samples then collapse towards 0 and with them the estimated target risk (in the simulation of
    ``tests/test_target_aware.py`` DEV, IWCV and SND all rank the random network first, and the divergence,
    which penalises exactly that separation, offsets DEV there but does not outvote it and the source score).

    Args:
        scorer: the unsupervised score of the target side, one of ``UNSUPERVISED_SCORES``.
        divergence: also rank by the negative proxy A-distance of the features (and average the two ranks).
        source_weight: weight of the source-only rank in [0, 1]; 1 reproduces the source-only ranking, 0 ranks
            by the target side alone (ties still broken by the source rank).
        cv_folds: folds of the probe's cross-fitting (grouped by patient) and of the domain classifiers (DEV /
            IWCV weights and the proxy A-distance).
        seed: random state of those folds and of the divergence's subsampling.
        min_divergence_spread: the smallest range of the candidates' divergences (max − min) for which the
            divergence takes part in the target rank.

    Attributes:
        target_scores_: DataFrame indexed by candidate (``ranking_`` order) with every score of
            ``UNSUPERVISED_SCORES`` (higher = better), ``divergence`` (the proxy A-distance, lower = better) and
            ``target_rank`` (the mean of the ranks, lower = better).
        source_rank_: Series candidate → rank of its source-only score (1 = best, NaN last), ``ranking_`` order.
        combined_rank_: Series candidate → the weighted mean of the source and target ranks, ``ranking_`` order.
        scores_: DataFrame indexed by candidate, best first: ``source_score``, ``source_rank``, ``target_rank``,
            ``combined_rank`` and ``rank`` (the position in ``ranking_``, 1 = best, every tie broken).
        ranking_: candidate names, best first.
        best_: the chosen candidate.
        nan_reasons_: candidate → score (``source_score``, a score of ``UNSUPERVISED_SCORES``, ``divergence``) →
            why it is NaN.
        divergence_used_: whether the divergence took part in the target rank.

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> y = np.repeat([0, 1], 50)
        >>> def embed(labels, signal, shift=0.0):  # the class moves the first feature; the hospital shifts all
        ...     f = rng.normal(size=(len(labels), 6)) + shift
        ...     f[:, 0] += signal * labels
        ...     return f
        >>> w_source, w_target = rng.normal(size=(2, 6, 6))  # a random network responds differently per hospital
        >>> features = {"scratch": np.maximum(embed(y, 8.0) @ w_source, 0), "imagenet": embed(y, 3.0),
        ...             "ssl": embed(y, 1.5)}
        >>> target = {"scratch": np.maximum(embed(y, 0.0, 1.0) @ w_target, 0), "imagenet": embed(y, 3.0, 0.2),
        ...           "ssl": embed(y, 1.5, 0.5)}
        >>> ranker = TargetAwareRanker().fit({"scratch": 1.0, "imagenet": 0.5, "ssl": 0.2}, features, y, target)
        >>> ranker.ranking_  # source-only: scratch first; on the target its probe disagrees and its features move
        ['imagenet', 'scratch', 'ssl']
        >>> ranker.target_scores_["target_rank"].tolist()
        [1.0, 3.0, 2.0]
    """

    def __init__(self, scorer: str = "ensv", divergence: bool = True, source_weight: float = 0.5,
                 cv_folds: int = 3, seed: int = 0, min_divergence_spread: float = 0.05) -> None:
        self.scorer = scorer
        self.divergence = divergence
        self.min_divergence_spread = min_divergence_spread
        self.source_weight = source_weight
        self.cv_folds = cv_folds
        self.seed = seed
        self._check_params()  # fail at construction; fit checks again after set_params

    def fit(self, source_scores: pd.Series | Mapping[str, float], features: Mapping[str, np.ndarray],
            y: np.ndarray, target_features: Mapping[str, np.ndarray],
            groups: np.ndarray | None = None) -> "TargetAwareRanker":
        """Score every candidate on the unlabeled target and rank the candidates by both sides.

        Args:
            source_scores: candidate → its source-only score, higher = better (e.g. ``BackboneSelector.scores_
                ["logme"]``); NaN ranks last on the source side.
            features: candidate → (N_s, D) frozen features of the same N_s labeled source images.
            y: (N_s,) their classes.
            target_features: candidate → (N_t, D) its features of the same N_t unlabeled target images (D as in
                ``features``).
            groups: (N_s,) patient ids of the source images, so the probe's cross-fitting never splits a patient.

        Returns:
            self, fitted.

        Raises:
            ValueError: on missing or extra candidates between the three mappings, inconsistent shapes, or when
                no candidate has a finite ``scorer`` score.
        """
        self._check_params()
        if not features:
            raise ValueError("no candidates to rank: pass at least one name → (N_s, D) features")
        names = list(features)
        source = pd.Series(source_scores, dtype=np.float64) if not isinstance(source_scores, pd.Series) \
            else source_scores.astype(np.float64)
        for what, keys in (("source_scores", set(source.index)), ("target_features", set(target_features))):
            if keys != set(names):
                raise ValueError(f"{what} must name exactly the candidates of features {names}: missing "
                                 f"{sorted(set(names) - keys)}, extra {sorted(keys - set(names))}")
        source = source.loc[names].replace([np.inf, -np.inf], np.nan)
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"y must be (N_s,) labels, got shape {y.shape}")
        if groups is not None and np.shape(groups) != y.shape:
            raise ValueError(f"groups must be (N_s,) = {y.shape}, one patient id per image, got {np.shape(groups)}")
        if len(np.unique(y)) < 2:
            raise ValueError(f"y must have at least two classes, got {np.unique(y).tolist()[:5]}")
        for name in names:
            source_shape, target_shape = np.shape(features[name]), np.shape(target_features[name])
            if len(source_shape) != 2 or source_shape[0] != len(y):
                raise ValueError(f"candidate {name!r}: features must be (N_s, D) = ({len(y)}, D), got {source_shape}")
            if len(target_shape) != 2 or target_shape[1] != source_shape[1]:
                raise ValueError(f"candidate {name!r}: target_features must be (N_t, {source_shape[1]}), as wide as "
                                 f"its source features, got {target_shape}")
        n_target = {name: np.shape(target_features[name])[0] for name in names}
        if len(set(n_target.values())) > 1:
            raise ValueError(f"every candidate's target_features must cover the same N_t target images, got "
                             f"{n_target}: embed the same images with every backbone")

        reasons: dict[str, dict[str, str]] = {}
        for name in names:
            if np.isnan(source[name]):
                reasons.setdefault(name, {})["source_score"] = "no finite source-only score"
        candidates: dict[str, dict[str, np.ndarray]] = {}
        divergences = pd.Series(np.nan, index=names)
        for name in names:
            try:
                candidates[name] = probe_on_target(features[name], y, target_features[name], source_groups=groups,
                                                   cv_folds=self.cv_folds, seed=self.seed)
            except ValueError as exc:  # data that cannot support a probe: NaN and last on the target side
                candidates[name] = {}
                reasons.setdefault(name, {}).update(dict.fromkeys(UNSUPERVISED_SCORES,
                                                                  f"no target probe: {exc}"))
            if self.divergence:
                try:
                    divergences[name] = feature_divergence(features[name], target_features[name], seed=self.seed,
                                                           cv_folds=self.cv_folds)
                except ValueError as exc:
                    reasons.setdefault(name, {})["divergence"] = str(exc)
        if not any(candidates.values()):
            raise ValueError("no candidate has a target probe: "
                             + "; ".join(f"{name}: {reasons[name][self.scorer]}" for name in names))
        selector = UnsupervisedSelector(scorer=self.scorer, folds=self.cv_folds, seed=self.seed).fit(candidates)
        for name, found in selector.nan_reasons_.items():
            for score, reason in found.items():
                reasons.setdefault(name, {}).setdefault(score, reason)  # keep "no target probe: ..." first

        target = selector.scores_.loc[names, list(UNSUPERVISED_SCORES)].astype(np.float64)
        target["divergence"] = divergences
        # a divergence that is (nearly) the same for every candidate, e.g. 2 when every feature space tells the
        # hospitals apart, says nothing about which transfers better: ranking by it would only add noise
        spread = float(divergences.max() - divergences.min()) if divergences.notna().any() else 0.0
        self.divergence_used_ = bool(self.divergence and spread >= self.min_divergence_spread)
        if self.divergence and not self.divergence_used_:
            log.info("select: the source-target divergence spans only %.3f over the candidates (< %.3f): the target "
                     "side ranks by %s alone", spread, self.min_divergence_spread, self.scorer)
        target_ranks = [_rank(target[self.scorer])] + ([_rank(-divergences)] if self.divergence_used_ else [])
        target["target_rank"] = np.mean(target_ranks, axis=0)
        source_rank = _rank(source)
        combined = self.source_weight * source_rank + (1.0 - self.source_weight) * target["target_rank"]
        # rounded so that weighted means equal up to floating-point error (0.3 · 1 + 0.7 · 3) count as ties
        keys = (np.arange(len(names)), source_rank.to_numpy(), np.round(combined.to_numpy(), 9))
        order = [names[i] for i in np.lexsort(keys)]
        for name in names:
            for score, reason in reasons.get(name, {}).items():
                log.info("select: %s has no %s: %s", name, score, reason)

        self.target_scores_ = target.loc[order, list(TARGET_COLUMNS)]
        self.source_rank_ = source_rank.loc[order]
        self.combined_rank_ = combined.loc[order]
        self.scores_ = pd.DataFrame({"source_score": source.loc[order], "source_rank": self.source_rank_,
                                     "target_rank": self.target_scores_["target_rank"],
                                     "combined_rank": self.combined_rank_,
                                     "rank": np.arange(1, len(order) + 1)}, index=order)
        self.nan_reasons_ = reasons
        self.ranking_ = order
        self.best_ = order[0]
        return self

    def _check_params(self) -> None:
        if self.scorer not in UNSUPERVISED_SCORES:
            raise ValueError(f"scorer must be one of {UNSUPERVISED_SCORES}, got {self.scorer!r}")
        if isinstance(self.min_divergence_spread, bool) or not isinstance(self.min_divergence_spread, (int, float)) \
                or self.min_divergence_spread < 0:
            raise ValueError(f"min_divergence_spread must be a proxy A-distance >= 0 (0 = always rank by it), got "
                             f"{self.min_divergence_spread!r}")
        if not isinstance(self.divergence, (bool, np.bool_)):
            raise ValueError(f"divergence must be True or False (rank by the feature divergence too), got "
                             f"{self.divergence!r}")
        if isinstance(self.source_weight, bool) or not isinstance(self.source_weight, (int, float)) \
                or not 0.0 <= self.source_weight <= 1.0:
            raise ValueError(f"source_weight must be a number in [0, 1] (1 = source-only ranking, 0 = target side "
                             f"only), got {self.source_weight!r}")
        if isinstance(self.cv_folds, bool) or int(self.cv_folds) != self.cv_folds or self.cv_folds < 2:
            raise ValueError(f"cv_folds must be an integer >= 2, got {self.cv_folds!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def ranking_agreement(ranking_scores: pd.Series | Mapping[str, float], measured: Mapping[str, float], *,
                      tolerance: float = 0.01) -> dict:
    """How well a ranking agrees with a measured quantity: Kendall τ, weighted τ, top pick and regret.

    A thin wrapper of :func:`medtl.select.validation.validate_selection` for one ranking (the same τ-b of
    :func:`scipy.stats.kendalltau` and hyperbolic weighted τ of :func:`scipy.stats.weightedtau`, Vigna, WWW
    2015, as in the LogME evaluation), without its timing columns, plus the name of the measured best. The
    candidates evaluated are those with a finite ranking score and a measurement; the top pick is the highest
    ranking score (the first in the given order among ties), the regret ``measured_best - top_pick_result``
    with ``measured_best`` over every measured candidate.

    To compare rankings fairly, pass the same ``measured`` to each: e.g. the source-only scores
    (``ranker.scores_["source_score"]``) and the combined ranking's positions (``-ranker.scores_["rank"]``,
    negated since higher must be better).

    Args:
        ranking_scores: candidate → score, higher = ranked higher; NaN = not evaluated.
        measured: candidate → measured result, higher = better (e.g. target AUC after fine-tuning); finite.
        tolerance: the regret still counted as a good pick (``top_pick_within_tolerance``).

    Returns:
        ``{key: value}`` for the keys of ``AGREEMENT_KEYS``; τ are NaN with fewer than two evaluated candidates.

    Raises:
        ValueError: when ``measured`` is empty, names candidates without a ranking score, or is not finite.

    Examples:
        >>> auc = {"scratch": 0.47, "imagenet": 0.57, "ssl": 0.54}
        >>> source_only = ranking_agreement({"scratch": 3.0, "imagenet": 2.0, "ssl": 1.0}, auc)
        >>> source_only["top_pick"], round(source_only["regret"], 2), round(source_only["kendall_tau"], 3)
        ('scratch', 0.1, -0.333)
        >>> ranking_agreement({"imagenet": 3.0, "ssl": 2.0, "scratch": 1.0}, auc)["kendall_tau"]
        1.0
    """
    scores = pd.Series(ranking_scores, dtype=np.float64) if not isinstance(ranking_scores, pd.Series) \
        else ranking_scores.astype(np.float64)
    table = validate_selection(scores.to_frame("ranking"), pd.DataFrame(index=scores.index), measured,
                               dict.fromkeys(measured, 0.0), tolerance=tolerance)
    row = table.loc["ranking"]
    results = pd.Series({name: float(value) for name, value in measured.items()}, dtype=np.float64)
    out = {"n_candidates": int(row["n_candidates"]), "n_without_score": int(row["n_without_score"]),
           "weighted_tau": float(row["weighted_tau"]), "kendall_tau": float(row["kendall_tau"]),
           "top_pick": row["top_pick"], "top_pick_result": float(row["top_pick_result"]),
           "measured_best": float(row["finetuned_best"]), "measured_best_candidate": str(results.idxmax()),
           "regret": float(row["regret"]), "top_pick_is_best": bool(row["top_pick_is_best"]),
           "top_pick_within_tolerance": bool(row["top_pick_within_tolerance"])}
    return {key: out[key] for key in AGREEMENT_KEYS}


def _make_probe() -> Pipeline:
    """The linear probe of :func:`medtl.select.scores.linear_probe_auc`."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))


def _rank(scores: pd.Series) -> pd.Series:
    """1 = the highest score; ties share their mean rank; NaN ranks last."""
    return scores.rank(ascending=False, method="average", na_option="bottom").astype(np.float64)


def _check_domains(source_features: np.ndarray, target_features: np.ndarray,
                   source_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float64 (N_s, D) and (N_t, D) finite features, and the labels encoded as 0 … C-1 (C >= 2)."""
    xs = np.asarray(source_features, dtype=np.float64)
    xt = np.asarray(target_features, dtype=np.float64)
    if xs.ndim != 2 or xt.ndim != 2 or xs.shape[1] != xt.shape[1] or not len(xs) or not len(xt):
        raise ValueError(f"source and target features must be (N_s, D) and (N_t, D) with the same D and N >= 1, "
                         f"got {xs.shape} and {xt.shape}: embed both hospitals with the same backbone")
    if not np.isfinite(xs).all():
        raise ValueError("the source features contain NaN or inf")
    if not np.isfinite(xt).all():
        raise ValueError("the target features contain NaN or inf")
    if source_labels is None:
        return xs, xt, None
    labels = np.asarray(source_labels)
    if labels.shape != (len(xs),):
        raise ValueError(f"source_labels must be (N_s,) = ({len(xs)},), one per source image, got {labels.shape}")
    classes, y_index = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the source labels need at least two classes, got {classes.tolist()}")
    return xs, xt, y_index
