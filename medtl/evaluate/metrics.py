"""Binary-classification metrics with patient-level (cluster) bootstrap confidence intervals.

Pure functions: numpy arrays in, floats / dicts / arrays out. Every metric is computed by one
vectorised routine over a matrix of per-sample weights (one row per bootstrap replicate), so the
point estimate (all weights 1) and the bootstrap replicates (weights = how often each sample's
patient was drawn) share a single implementation.

Conventions used throughout:

* ``y_prob`` is the predicted probability of class 1; a sample is called positive when
  ``y_prob >= threshold``.
* Calibration bins are ``B`` equal-width bins on [0, 1]; a probability ``p`` falls in bin
  ``min(floor(p * B), B - 1)``, i.e. bins are ``[k/B, (k+1)/B)`` with the last one closed.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import roc_curve

METRIC_NAMES: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece")
"""``ppv`` / ``npv``: positive / negative predictive value at the operating threshold, at the prevalence of the data
given (so at each site's own prevalence); ``brier``: mean squared error of the probability (Brier 1950)."""

# Replicate x sample cells handled per vectorised block: bounds memory (~32 MB of float64 per
# matrix) for large cohorts while keeping 1000 replicates of a few hundred samples in one block.
_BLOCK_CELLS = 4_000_000


class CalibrationCurve(NamedTuple):
    """Per-bin reliability statistics; empty bins hold NaN means and a zero count."""

    mean_predicted: NDArray[np.float64]
    observed_frequency: NDArray[np.float64]
    counts: NDArray[np.int64]
    bin_edges: NDArray[np.float64]


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error of the class-1 probability (binary reliability ECE).

    ``ECE = sum_b (n_b / N) * |freq_b - conf_b|`` over ``n_bins`` equal-width bins of the
    predicted probability of class 1, where ``conf_b`` is the mean predicted probability in bin
    ``b`` and ``freq_b`` the observed fraction of label 1 in it (Guo et al., "On Calibration of
    Modern Neural Networks", ICML 2017, eq. 3). Unlike Guo et al.'s top-label form, confidence is
    the probability of class 1 rather than of the predicted class, so the value directly reads
    off the reliability diagram of ``P(label = 1)``.

    Args:
        y_true: labels, 0 or 1.
        y_prob: predicted probabilities of class 1, in [0, 1].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        The ECE, in [0, 1]; 0 means every bin's observed frequency equals its mean prediction.
    """
    y, p = _validate(y_true, y_prob)
    _check_n_bins(n_bins)
    gap = np.bincount(_bin_index(p, n_bins), weights=y - p, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)


def calibration_curve(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> CalibrationCurve:
    """Reliability-diagram data: per equal-width bin, mean prediction vs observed frequency.

    Args:
        y_true: labels, 0 or 1.
        y_prob: predicted probabilities of class 1, in [0, 1].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        :class:`CalibrationCurve` with arrays of length ``n_bins`` (``bin_edges``: ``n_bins + 1``);
        ``mean_predicted`` and ``observed_frequency`` are NaN in empty bins.
    """
    y, p = _validate(y_true, y_prob)
    _check_n_bins(n_bins)
    b = _bin_index(p, n_bins)
    counts = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(b, weights=p, minlength=n_bins) / counts
        freq = np.bincount(b, weights=y, minlength=n_bins) / counts
    return CalibrationCurve(mean_pred, freq, counts.astype(np.int64), np.linspace(0.0, 1.0, n_bins + 1))


def youden_threshold(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Operating threshold maximising Youden's J = sensitivity + specificity - 1.

    Meant to be chosen once on the SOURCE validation set and then applied unchanged to every
    hospital. The returned value is the midpoint between the optimal cut score and the next lower
    distinct score: it yields exactly the same confusion matrix on this data as the cut score,
    but does not sit on top of a training-set score, which generalises better under shift.
    Predict positive when ``y_prob >= threshold``.

    Args:
        y_true: labels, 0 or 1; both classes must be present.
        y_prob: predicted probabilities of class 1, in [0, 1].

    Returns:
        The threshold. When no cut beats chance (J <= 0) a ``UserWarning`` is issued and 0.5
        is returned.

    Raises:
        ValueError: when only one class is present (sensitivity or specificity undefined).
    """
    y, p = _validate(y_true, y_prob)
    if y.min() == y.max():
        raise ValueError("youden_threshold needs both classes in y_true; the validation set has only "
                         f"label {int(y[0])}: enlarge it or choose the threshold elsewhere")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # roc_curve prepends an infinite threshold (nothing positive); it is never a usable operating point.
    j = (tpr - fpr)[1:]
    cuts = thresholds[1:]
    best = int(np.argmax(j))
    if j[best] <= 0:
        warnings.warn("no threshold separates the classes better than chance (Youden J <= 0); "
                      "falling back to 0.5", UserWarning, stacklevel=2)
        return 0.5
    lower = cuts[best + 1] if best + 1 < cuts.size else cuts[best]
    return float((cuts[best] + lower) / 2.0)


def binary_metrics(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    *,
    threshold: float = 0.5,
    groups: ArrayLike | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    n_bins: int = 10,
    seed: int = 0,
) -> dict:
    """Point estimates and percentile bootstrap CIs of AUC, accuracy, sensitivity, specificity, PPV, NPV, Brier
    score and ECE.

    The bootstrap resamples *patients* (clusters given by ``groups``) with replacement, keeping all
    images of a drawn patient, so correlated images of one patient do not make the CIs too narrow.
    Replicates in which a metric is undefined (e.g. AUC or sensitivity of a resample without
    positives) are skipped for that metric and counted in ``notes``; a metric undefined on the data
    itself is NaN, never an exception.

    ECE is the exception to plain percentiles: binned |freq - conf| is biased upwards, and a
    resample (with duplicated patients) more so, so for well-calibrated models the raw percentile
    interval can lie entirely above the point estimate. Its interval is therefore shifted by the
    bootstrap bias estimate (mean of replicates - point estimate) and clipped at 0.

    Args:
        y_true: labels, 0 or 1.
        y_prob: predicted probabilities of class 1, in [0, 1].
        threshold: operating point; positive when ``y_prob >= threshold``.
        groups: one cluster id per sample (e.g. patient ids); None = every sample its own cluster.
        n_bootstrap: number of bootstrap replicates; 0 = point estimates only (CIs are NaN).
        confidence: two-sided confidence level of the percentile intervals, in (0, 1).
        n_bins: equal-width bins of the ECE.
        seed: seed of the bootstrap's random generator.

    Returns:
        ``{"auc" | "accuracy" | "sensitivity" | "specificity" | "ppv" | "npv" | "brier" | "ece": {"value",
        "ci_low", "ci_high"},
        "n", "n_positive", "n_patients", "threshold", "n_bootstrap", "confidence", "notes"}``,
        where ``notes`` is a list of human-readable strings about undefined metrics or skipped
        replicates (empty when there is nothing to say).
    """
    y, p = _validate(y_true, y_prob)
    _check_n_bins(n_bins)
    _check_bootstrap(n_bootstrap, confidence)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    codes, n_groups = _group_codes(groups, y.size)

    point = _metric_replicates(y, p, np.ones((1, y.size)), threshold, n_bins)
    reps = {name: np.empty(n_bootstrap) for name in METRIC_NAMES}
    rng = np.random.default_rng(seed)
    for start, stop in _blocks(n_bootstrap, max(y.size, n_groups)):
        weights = _group_weights(rng, n_groups, stop - start)[:, codes]
        block = _metric_replicates(y, p, weights, threshold, n_bins)
        for name in METRIC_NAMES:
            reps[name][start:stop] = block[name]

    out: dict = {}
    notes: list[str] = []
    for name in METRIC_NAMES:
        value = float(point[name][0])
        low, high, n_valid = _percentile_ci(reps[name], confidence)
        if name == "ece" and n_valid:
            bias = float(np.nanmean(reps[name])) - value
            low, high = max(low - bias, 0.0), high - bias
        out[name] = {"value": value, "ci_low": low, "ci_high": high}
        if np.isnan(value):
            notes.append(f"{name} is undefined on these data ({_undefined_reason(name)})")
        elif n_valid < n_bootstrap:
            notes.append(f"{name}: {n_bootstrap - n_valid} of {n_bootstrap} bootstrap replicates were skipped "
                         f"({_undefined_reason(name)} in the resample)")
    out.update(n=int(y.size), n_positive=int(y.sum()), n_patients=int(n_groups), threshold=float(threshold),
               n_bootstrap=int(n_bootstrap), confidence=float(confidence), notes=notes)
    return out


def auc_difference(
    y_true_a: ArrayLike,
    y_prob_a: ArrayLike,
    y_true_b: ArrayLike,
    y_prob_b: ArrayLike,
    *,
    groups_a: ArrayLike | None = None,
    groups_b: ArrayLike | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """AUC(a) - AUC(b) with a paired patient-level bootstrap CI (e.g. adapted vs source-only model).

    Both predictions are evaluated on the same patients; each replicate draws patients once and
    weights both models' samples by the same draw, so the shared patient-to-patient variance
    cancels and the interval is much tighter than comparing two independent CIs. The samples of
    the two models need not be aligned row by row: they are paired through their patient ids.

    Args:
        y_true_a: labels of model a's samples, 0 or 1.
        y_prob_a: model a's predicted probabilities of class 1.
        y_true_b: labels of model b's samples, 0 or 1.
        y_prob_b: model b's predicted probabilities of class 1.
        groups_a: patient id per sample of a; give both groups or neither. Neither = the two
            inputs are paired row by row (same length, same order).
        groups_b: patient id per sample of b.
        n_bootstrap: number of bootstrap replicates; 0 = point estimate only.
        confidence: two-sided confidence level, in (0, 1).
        seed: seed of the bootstrap's random generator.

    Returns:
        ``{"value", "ci_low", "ci_high"}``; NaN where an AUC is undefined (a single class).
    """
    ya, pa = _validate(y_true_a, y_prob_a)
    yb, pb = _validate(y_true_b, y_prob_b)
    _check_bootstrap(n_bootstrap, confidence)
    if (groups_a is None) != (groups_b is None):
        raise ValueError("give both groups_a and groups_b (patient ids) or neither")
    if groups_a is None:
        if ya.size != yb.size:
            raise ValueError(f"without groups the inputs are paired row by row, but a has {ya.size} samples "
                             f"and b has {yb.size}; pass groups_a/groups_b (patient ids)")
        codes_a = codes_b = np.arange(ya.size)
        n_groups = ya.size
    else:
        ga, gb = np.asarray(groups_a), np.asarray(groups_b)
        if ga.shape != (ya.size,) or gb.shape != (yb.size,):
            raise ValueError("groups_a / groups_b must have one patient id per sample of a / b")
        codes, n_groups = _group_codes(np.concatenate([ga, gb]), ya.size + yb.size)
        codes_a, codes_b = codes[:ya.size], codes[ya.size:]

    value = float(_weighted_auc(ya, pa, np.ones((1, ya.size)))[0] - _weighted_auc(yb, pb, np.ones((1, yb.size)))[0])
    reps = np.empty(n_bootstrap)
    rng = np.random.default_rng(seed)
    for start, stop in _blocks(n_bootstrap, max(ya.size, yb.size, n_groups)):
        group_w = _group_weights(rng, n_groups, stop - start)
        reps[start:stop] = _weighted_auc(ya, pa, group_w[:, codes_a]) - _weighted_auc(yb, pb, group_w[:, codes_b])
    low, high, _ = _percentile_ci(reps, confidence)
    return {"value": value, "ci_low": low, "ci_high": high}


def _validate(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    try:
        y = np.asarray(y_true, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError("y_true must be numeric 0/1 labels without missing values; drop unlabeled samples "
                         "before evaluating") from exc
    try:
        p = np.asarray(y_prob, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError("y_prob must be numeric probabilities of class 1") from exc
    if y.ndim != 1 or p.ndim != 1 or y.size != p.size:
        raise ValueError(f"y_true and y_prob must be 1-D and of equal length, got shapes {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no samples to evaluate: y_true is empty")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = np.unique(y[~np.isin(y, (0.0, 1.0))])[:5]
        raise ValueError(f"y_true must contain only 0 and 1 (missing labels are not allowed), found {bad.tolist()}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("y_prob must be probabilities of class 1 in [0, 1] without NaN; apply a softmax / "
                         "sigmoid to logits first")
    return y, p


def _check_n_bins(n_bins: int) -> None:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _check_bootstrap(n_bootstrap: int, confidence: float) -> None:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), e.g. 0.95; got {confidence!r}")


def _bin_index(p: NDArray[np.float64], n_bins: int) -> NDArray[np.intp]:
    return np.minimum((p * n_bins).astype(np.intp), n_bins - 1)


def _group_codes(groups: ArrayLike | None, n: int) -> tuple[NDArray[np.intp], int]:
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must hold one patient id per sample ({n}), got shape {g.shape}")
    # factorize accepts mixed id types and marks missing ids with -1.
    codes, uniques = pd.factorize(g)
    if (codes < 0).any():
        raise ValueError("groups contains missing patient ids; every sample needs one")
    return codes.astype(np.intp), len(uniques)


def _blocks(n_rep: int, width: int) -> list[tuple[int, int]]:
    size = max(1, _BLOCK_CELLS // max(width, 1))
    return [(s, min(s + size, n_rep)) for s in range(0, n_rep, size)]


def _group_weights(rng: np.random.Generator, n_groups: int, n_rep: int) -> NDArray[np.float64]:
    """How often each group is drawn, per replicate: shape (n_rep, n_groups)."""
    draws = rng.integers(0, n_groups, size=(n_rep, n_groups))
    flat = draws + (np.arange(n_rep) * n_groups)[:, None]
    return np.bincount(flat.ravel(), minlength=n_rep * n_groups).reshape(n_rep, n_groups).astype(float)


def _weighted_auc(y: NDArray[np.float64], p: NDArray[np.float64], w: NDArray[np.float64]) -> NDArray[np.float64]:
    """Mann-Whitney AUC (ties count one half) for each row of sample weights ``w`` (R, n)."""
    order = np.argsort(p, kind="stable")
    ps, ys, ws = p[order], y[order], w[:, order]
    first = np.r_[True, ps[1:] != ps[:-1]]
    block = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], ps.size]
    neg_cum = np.concatenate([np.zeros((ws.shape[0], 1)), np.cumsum(ws * (ys == 0), axis=1)], axis=1)
    pos = np.flatnonzero(ys == 1)
    below = neg_cum[:, starts[block[pos]]]
    tied = neg_cum[:, ends[block[pos]]] - below
    pos_w = ws[:, pos]
    n_pos, n_neg = pos_w.sum(axis=1), neg_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _metric_replicates(y: NDArray[np.float64], p: NDArray[np.float64], w: NDArray[np.float64],
                       threshold: float, n_bins: int) -> dict[str, NDArray[np.float64]]:
    pred = p >= threshold
    positive = y == 1
    total = w.sum(axis=1)
    n_pos = w @ positive
    n_neg = total - n_pos
    tp = w @ (pred & positive)
    tn = w @ (~pred & ~positive)
    flagged = w @ pred
    cleared = total - flagged
    gaps = np.zeros((y.size, n_bins))
    gaps[np.arange(y.size), _bin_index(p, n_bins)] = y - p
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "auc": _weighted_auc(y, p, w),
            "accuracy": (tp + tn) / total,
            "sensitivity": np.where(n_pos > 0, tp / n_pos, np.nan),
            "specificity": np.where(n_neg > 0, tn / n_neg, np.nan),
            "ppv": np.where(flagged > 0, tp / flagged, np.nan),
            "npv": np.where(cleared > 0, tn / cleared, np.nan),
            "brier": (w @ (p - y) ** 2) / total,
            # n_b * |freq_b - conf_b| = |sum_b(y) - sum_b(p)|, so ECE = sum_b |sum_b(y - p)| / N
            "ece": np.abs(w @ gaps).sum(axis=1) / total,
        }


def _percentile_ci(reps: NDArray[np.float64], confidence: float) -> tuple[float, float, int]:
    valid = reps[np.isfinite(reps)]
    if valid.size < 2:
        return float("nan"), float("nan"), int(valid.size)
    alpha = 1.0 - confidence
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high), int(valid.size)


def _undefined_reason(name: str) -> str:
    return {
        "auc": "needs both classes",
        "sensitivity": "no positive samples",
        "specificity": "no negative samples",
        "ppv": "no image called positive",
        "npv": "no image called negative",
    }.get(name, "no samples")
