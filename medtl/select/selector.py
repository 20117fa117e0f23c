"""Rank candidate backbones by transferability scores (scikit-learn conventions)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from medtl.select.scores import linear_probe_auc, logme

SCORES = ("logme", "linear_probe_auc")


class BackboneSelector:
    """Score each candidate's frozen features on the labeled task and rank the candidates.

    Args:
        rank_by: the score that orders candidates (``"logme"`` or ``"linear_probe_auc"``).
        cv_folds: folds of the linear probe.
        seed: random state of the probe's folds.

    Attributes:
        scores_: DataFrame indexed by candidate with one column per score plus ``rank``.
        ranking_: candidate names, best first.
        best_: the chosen candidate.

    Examples:
        >>> selector = BackboneSelector(rank_by="logme").fit({"a.imagenet": fa, "a.scratch": fb}, y, groups)
        >>> selector.best_
        'a.imagenet'
    """

    def __init__(self, rank_by: str = "logme", cv_folds: int = 3, seed: int = 0) -> None:
        if rank_by not in SCORES:
            raise ValueError(f"rank_by must be one of {SCORES}, got {rank_by!r}")
        self.rank_by = rank_by
        self.cv_folds = cv_folds
        self.seed = seed

    def fit(self, features: Mapping[str, np.ndarray], y: np.ndarray,
            groups: np.ndarray | None = None) -> "BackboneSelector":
        """Args:
            features: candidate name → (N, D) embeddings of the same N samples.
            y: (N,) labels; groups: (N,) patient ids for grouped cross-validation.
        """
        if not features:
            raise ValueError("no candidates to select from")
        rows = {}
        for name, f in features.items():
            if f.shape[0] != len(y):
                raise ValueError(f"candidate {name!r}: {f.shape[0]} embeddings for {len(y)} labels")
            rows[name] = {"logme": logme(f, y),
                          "linear_probe_auc": linear_probe_auc(f, y, groups, self.cv_folds, self.seed)}
        scores = pd.DataFrame.from_dict(rows, orient="index")
        scores = scores.sort_values(self.rank_by, ascending=False, kind="stable")
        scores["rank"] = np.arange(1, len(scores) + 1)
        self.scores_ = scores
        self.ranking_ = list(scores.index)
        self.best_ = self.ranking_[0]
        return self
