"""Validation mode of backbone selection: does each transferability score rank candidates as fine-tuning does?

Pure evaluation. The caller fine-tunes the candidates (medtl's fine-tuning stage, one run per candidate) and
passes what it measured; this module only compares those results with the selector's scores, as the
transferability literature does (You et al., "LogME", ICML 2021; Nguyen et al., "LEEP", ICML 2020): a rank
correlation that weighs the best candidates most, whether the score's top pick is (close to) the fine-tuned
best, and what the score costs next to the fine-tuning it would replace.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, weightedtau

COLUMNS = ("n_candidates", "n_without_score", "weighted_tau", "kendall_tau", "top_pick", "top_pick_result",
           "finetuned_best", "regret", "top_pick_is_best", "top_pick_within_tolerance", "score_seconds",
           "finetune_seconds", "speedup")


def validate_selection(scores: pd.DataFrame, score_seconds: pd.DataFrame, finetuned: Mapping[str, float],
                       finetune_seconds: Mapping[str, float], tolerance: float = 0.01) -> pd.DataFrame:
    """Compare every transferability score's ranking of the candidates with their fine-tuned results.

    Each score is evaluated on the candidates that have both a finite score and a fine-tuned result; a score
    that is NaN for some candidates (LEEP and NCE without a source head) is evaluated on the others, and
    ``n_without_score`` says how many fine-tuned candidates it left out.

    Rank agreement:

    * ``weighted_tau``: :func:`scipy.stats.weightedtau` with its defaults, i.e. the additive hyperbolic
      weighted τ_h (Vigna, WWW 2015): a discordant pair of candidates at ranks r and s (0 = the highest value)
      weighs ``1/(r+1) + 1/(s+1)``, so a swap among the best candidates costs more than one among the worst;
      the ranks come from decreasing (score, result) and from decreasing (result, score), and the two τ are
      averaged. This is the weighted τ of the LogME evaluation.
    * ``kendall_tau``: plain Kendall τ-b (:func:`scipy.stats.kendalltau`), every pair weighed alike.

    Both are NaN with fewer than two evaluated candidates or when all values of either side are tied.

    Choice quality: ``top_pick`` is the evaluated candidate with the highest score (the first in ``scores``
    order among ties); ``finetuned_best`` is the highest fine-tuned result over *all* fine-tuned candidates,
    including those the score could not evaluate; ``regret = finetuned_best - top_pick_result``;
    ``top_pick_is_best`` says whether regret is 0 and ``top_pick_within_tolerance`` whether it is at most
    ``tolerance``.

    Cost: ``score_seconds`` and ``finetune_seconds`` are summed over the evaluated candidates, and
    ``speedup = finetune_seconds / score_seconds`` is how many times cheaper ranking them by the score was
    than fine-tuning them all.

    Args:
        scores: candidate × score DataFrame, higher = better (``BackboneSelector.scores_``; a ``rank`` column
            is the selector's bookkeeping and is ignored).
        score_seconds: candidate × score seconds of computing each score (``BackboneSelector.seconds_``).
        finetuned: candidate → fine-tuned result, higher = better (e.g. validation AUC after fine-tuning).
        finetune_seconds: candidate → seconds its fine-tuning took, for every candidate in ``finetuned``.
        tolerance: the regret, in units of the result, still counted as a good pick.

    Returns:
        DataFrame indexed by score name with the columns of ``COLUMNS``.

    Raises:
        ValueError: when ``finetuned`` names candidates ``scores`` lacks, has a non-finite result, lacks
            fine-tuning seconds, or when ``tolerance`` is negative.

    Examples:
        >>> scores = pd.DataFrame({"logme": [-0.2, -0.5, -0.6]}, index=["a.ssl", "a.imagenet", "a.scratch"])
        >>> seconds = pd.DataFrame({"logme": [0.1, 0.1, 0.1]}, index=scores.index)
        >>> auc = {"a.ssl": 0.91, "a.imagenet": 0.92, "a.scratch": 0.70}
        >>> row = validate_selection(scores, seconds, auc, {name: 600.0 for name in auc}).loc["logme"]
        >>> row["top_pick"], float(round(row["regret"], 3)), bool(row["top_pick_within_tolerance"])
        ('a.ssl', 0.01, True)
        >>> float(round(row["speedup"]))  # 3 × 600 s of fine-tuning against 3 × 0.1 s of LogME
        6000.0
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 (a regret in units of the fine-tuned result), got {tolerance}")
    unknown = sorted(set(finetuned) - set(scores.index))
    if unknown:
        raise ValueError(f"finetuned names {unknown}, which have no scores; scored candidates: {list(scores.index)}")
    missing_seconds = sorted(set(finetuned) - set(finetune_seconds))
    if missing_seconds:
        raise ValueError(f"finetune_seconds lacks {missing_seconds}: give the seconds of every fine-tuned candidate")
    results = pd.Series({name: float(value) for name, value in finetuned.items()}, dtype=np.float64)
    if not np.isfinite(results).all():
        raise ValueError(f"fine-tuned results must be finite, got {results[~np.isfinite(results)].to_dict()}: "
                         "leave failed runs out of finetuned")
    if results.empty:
        raise ValueError("finetuned is empty: fine-tune at least two candidates to validate the scores")
    best = float(results.max())
    rows = {}
    for score in (column for column in scores.columns if column != "rank"):
        values = scores.loc[scores.index.isin(results.index), score].astype(np.float64)
        evaluated = values[np.isfinite(values)]
        result = results[evaluated.index]
        row = dict.fromkeys(COLUMNS, np.nan)
        row.update(n_candidates=len(evaluated), n_without_score=len(results) - len(evaluated), finetuned_best=best,
                   top_pick=None, top_pick_is_best=False, top_pick_within_tolerance=False)
        if len(evaluated) >= 2:
            row["weighted_tau"] = float(weightedtau(evaluated.to_numpy(), result.to_numpy()).statistic)
            row["kendall_tau"] = float(kendalltau(evaluated.to_numpy(), result.to_numpy()).statistic)
        if len(evaluated):
            top_pick = evaluated.idxmax()
            regret = best - float(results[top_pick])
            row.update(top_pick=top_pick, top_pick_result=float(results[top_pick]), regret=regret,
                       top_pick_is_best=regret <= 0.0,
                       # 0.92 - 0.91 is 0.0100000000000000009 in floating point: still within a 0.01 tolerance
                       top_pick_within_tolerance=regret <= tolerance + 1e-9)
            row["score_seconds"] = float(score_seconds.loc[evaluated.index, score].sum()) \
                if score in score_seconds.columns else np.nan
            row["finetune_seconds"] = float(sum(finetune_seconds[name] for name in evaluated.index))
            row["speedup"] = row["finetune_seconds"] / row["score_seconds"] if row["score_seconds"] > 0 else np.inf
        rows[score] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))
    table.index.name = "score"
    return table
