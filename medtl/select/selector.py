"""Rank candidate backbones by transferability scores (scikit-learn conventions)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from medtl.select.scores import (_check_probabilities, h_score, knn_cv_accuracy, leep, linear_probe_auc, logme,
                                 nce)

log = logging.getLogger("medtl.select")

FEATURE_SCORES = ("logme", "h_score", "linear_probe_auc", "knn_accuracy")
"""Scores of a backbone's features: every candidate has them."""
SOURCE_HEAD_SCORES = ("leep", "nce")
"""Scores of a backbone's source classifier (e.g. ImageNet's 1000 classes): NaN for a candidate without one."""
SCORES = FEATURE_SCORES + SOURCE_HEAD_SCORES


class BackboneSelector(BaseEstimator):
    """Score each candidate's frozen features on the labeled task and rank the candidates.

    Every score is higher-is-better (see :mod:`medtl.select.scores`): ``logme`` (You et al., ICML 2021),
    ``h_score`` (Bao et al., ICIP 2019, Ledoit-Wolf regularised), ``linear_probe_auc`` and ``knn_accuracy``
    (cross-validated, grouped by patient), and, for candidates whose source-head probabilities are given,
    ``leep`` (Nguyen et al., ICML 2020) and ``nce`` (Tran et al., ICCV 2019). A score that cannot be computed
    for a candidate (no source head, non-finite features, too few samples for the folds) is NaN, with the
    reason in ``nan_reasons_``; a candidate whose ``rank_by`` score is NaN ranks last, and that is logged.

    Args:
        rank_by: the score that orders candidates, one of ``SCORES``.
        cv_folds: folds of the linear probe and of the kNN score (at least 2).
        knn_k: neighbours of the kNN score.
        seed: random state of the folds.

    Attributes:
        scores_: DataFrame indexed by candidate, best first, with one column per score (``SCORES``) plus
            ``rank`` (1 = best).
        seconds_: DataFrame like ``scores_`` (without ``rank``): seconds each score took per candidate, NaN
            where it was not computed.
        nan_reasons_: candidate → score → why that score is NaN.
        ranking_: candidate names, best first.
        best_: the chosen candidate.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 20)
        >>> in_domain = y[:, None] + 0.5 * rng.normal(size=(40, 8))
        >>> imagenet_softmax = np.full((40, 1000), 1 / 1000)  # a source head that says nothing here
        >>> selector = BackboneSelector(rank_by="logme").fit(
        ...     {"a.imagenet": rng.normal(size=(40, 8)), "a.ssl": in_domain}, y, groups=np.arange(40) // 2,
        ...     source_probabilities={"a.imagenet": imagenet_softmax})
        >>> selector.ranking_
        ['a.ssl', 'a.imagenet']
        >>> selector.nan_reasons_["a.ssl"]["leep"]
        'no source-classifier probabilities for this candidate'
    """

    def __init__(self, rank_by: str = "logme", cv_folds: int = 3, knn_k: int = 20, seed: int = 0) -> None:
        self.rank_by = rank_by
        self.cv_folds = cv_folds
        self.knn_k = knn_k
        self.seed = seed
        self._check_params()  # fail at construction; fit checks again after set_params

    def fit(self, features: Mapping[str, np.ndarray], y: np.ndarray, groups: np.ndarray | None = None,
            source_probabilities: Mapping[str, np.ndarray] | None = None) -> "BackboneSelector":
        """Compute every applicable score of every candidate and rank the candidates by ``rank_by``.

        Args:
            features: candidate name → (N, D) embeddings of the same N labeled images.
            y: (N,) class labels.
            groups: (N,) patient ids, so cross-validated scores never split a patient across folds.
            source_probabilities: candidate name → (N, Z) softmax of its source classifier on the same images,
                for the candidates that have one (LEEP and NCE are NaN for the others).

        Returns:
            self, fitted.

        Raises:
            ValueError: on inconsistent shapes, fewer than two classes, source probabilities that are not
                probabilities or name no candidate, or when no candidate has a finite ``rank_by`` score.
        """
        self._check_params()
        y = np.asarray(y)
        if y.ndim != 1 or len(np.unique(y)) < 2:
            raise ValueError(f"y must be (N,) labels with at least two classes, got shape {y.shape} "
                             f"and classes {np.unique(y).tolist()[:5]}")
        if groups is not None and np.shape(groups) != y.shape:
            raise ValueError(f"groups must be (N,) = {y.shape}, one patient id per image, got {np.shape(groups)}")
        if not features:
            raise ValueError("no candidates to select from: pass at least one name → (N, D) features")
        features = {name: np.asarray(f) for name, f in features.items()}
        for name, f in features.items():
            if f.ndim != 2 or f.shape[0] != len(y):
                raise ValueError(f"candidate {name!r}: features must be (N, D) = ({len(y)}, D), got {f.shape}")
        probabilities = {name: np.asarray(p, dtype=np.float64) for name, p in (source_probabilities or {}).items()}
        unknown = sorted(set(probabilities) - set(features))
        if unknown:
            raise ValueError(f"source_probabilities names {unknown}, which are not candidates {list(features)}")
        for name, p in probabilities.items():
            try:
                _check_probabilities(p, y)
            except ValueError as exc:
                raise ValueError(f"candidate {name!r}: {exc}") from exc

        scores = pd.DataFrame(np.nan, index=list(features), columns=list(SCORES))
        seconds = scores.copy()
        reasons: dict[str, dict[str, str]] = {}
        for name, f in features.items():
            for score, compute in self._score_functions(f, y, groups, probabilities.get(name)).items():
                start = time.perf_counter()
                try:
                    scores.loc[name, score] = compute()
                except (ValueError, np.linalg.LinAlgError) as exc:  # data that cannot support this score
                    reasons.setdefault(name, {})[score] = str(exc)
                seconds.loc[name, score] = time.perf_counter() - start
            for score in (score for score in SCORES if np.isnan(scores.loc[name, score])):
                reason = self._why_not_computed(score, f, name in probabilities)
                reasons.setdefault(name, {}).setdefault(score, reason)

        unranked = [name for name in features if np.isnan(scores.loc[name, self.rank_by])]
        if len(unranked) == len(features):
            raise ValueError(f"no candidate has a finite {self.rank_by}: "
                             + "; ".join(f"{name}: {reasons[name][self.rank_by]}" for name in unranked)
                             + f". Choose another rank_by among {SCORES}")
        for name in unranked:
            log.warning("select: %s ranks last: its %s is NaN (%s)", name, self.rank_by, reasons[name][self.rank_by])

        order = scores[self.rank_by].sort_values(ascending=False, kind="stable", na_position="last").index
        self.scores_ = scores.loc[order].assign(rank=np.arange(1, len(order) + 1))
        self.seconds_ = seconds.loc[order]
        self.nan_reasons_ = reasons
        self.ranking_ = list(order)
        self.best_ = self.ranking_[0]
        return self

    def _score_functions(self, features: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
                         probabilities: np.ndarray | None) -> dict:
        """Score name → thunk computing it, for the scores this candidate's inputs allow."""
        functions = {}
        if np.isfinite(features).all():
            functions.update({
                "logme": lambda: logme(features, y),
                "h_score": lambda: h_score(features, y),
                "linear_probe_auc": lambda: linear_probe_auc(features, y, groups, self.cv_folds, self.seed),
                "knn_accuracy": lambda: knn_cv_accuracy(features, y, groups, self.cv_folds, k=self.knn_k,
                                                        seed=self.seed),
            })
        if probabilities is not None:
            functions.update({"leep": lambda: leep(probabilities, y),
                              "nce": lambda: nce(probabilities.argmax(axis=1), y)})
        return functions

    @staticmethod
    def _why_not_computed(score: str, features: np.ndarray, has_source_head: bool) -> str:
        if score in SOURCE_HEAD_SCORES and not has_source_head:
            return "no source-classifier probabilities for this candidate"
        if score in FEATURE_SCORES and not np.isfinite(features).all():
            return "its features contain NaN or inf"
        return "the score is undefined on these data (e.g. no test fold with both classes)"

    def _check_params(self) -> None:
        if self.rank_by not in SCORES:
            raise ValueError(f"rank_by must be one of {SCORES}, got {self.rank_by!r}")
        if int(self.cv_folds) != self.cv_folds or self.cv_folds < 2:
            raise ValueError(f"cv_folds must be an integer >= 2, got {self.cv_folds!r}")
        if int(self.knn_k) != self.knn_k or self.knn_k < 1:
            raise ValueError(f"knn_k must be an integer >= 1, got {self.knn_k!r}")
