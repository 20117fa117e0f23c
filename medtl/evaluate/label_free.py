"""Label-free performance estimation: how well will a model do at a new hospital, before anyone labels data there.

A model validated at one hospital (source validation AUC 0.99) can fail at another, and the new hospital's labels,
which would show it, are what nobody has yet. These estimators predict the model's **AUC** and **accuracy at its
operating threshold** on the unlabeled target images, each with a percentile bootstrap interval over the target
images (patient-level when ``groups`` are given), so a validation report can warn "expect AUC ≈ 0.6 here":

* :class:`ATCEstimator`: Average Thresholded Confidence (Garg et al., "Leveraging Unlabeled Data to Predict
  Out-of-Distribution Performance", ICLR 2022). A threshold on a confidence score is learned on the labeled
  source validation split so that the fraction of images below it equals the source error rate; the estimated
  target accuracy is the fraction of target images above it. ATC estimates accuracy only: medtl turns it into an
  AUC estimate by temperature-scaling the target probabilities until their expected accuracy equals the ATC
  estimate, then taking the AUC those probabilities expect (:func:`expected_auc`).
* :class:`AgreementEstimator`: the mean prediction of a pool of candidate models (every epoch of every adaptation
  method, the pool whose agreement EnsV uses for model selection; Hu et al., NeurIPS 2024 D&B) stands in for the
  unknown label (Jiang et al., "Assessing Generalization of SGD via Disagreement", ICLR 2022; Baek et al.,
  "Agreement-on-the-Line: Predicting the Performance of Neural Networks under Distribution Shift", NeurIPS 2022).

:func:`estimated_drop_warning` turns an estimate into a sentence for the clinical reviewer. The maths are pure
functions of numpy arrays: :func:`expected_auc`, :func:`expected_accuracy`, :func:`atc_threshold`,
:func:`shift_decision_boundary` and :func:`confidence_score`.

Conventions (those of :mod:`medtl.evaluate.metrics`): inputs are P(class 1) as 1-D arrays (binary task); a decision
is positive when ``p >= threshold``. The bootstrap draws images (or patients) with replacement and represents a
replicate by per-image weights (how many times the image, or its patient, was drawn), so the point estimate (all
weights 1) and the replicates share one implementation.

These are *estimates* under assumptions (ATC: the source-calibrated confidence threshold transfers; agreement: the
pool's errors are not shared), never a substitute for labeling a sample of the target and measuring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from sklearn.utils.validation import check_is_fitted

from medtl.evaluate.metrics import _blocks, _check_bootstrap, _group_codes, _group_weights, _percentile_ci

__all__ = [
    "AUC_REACH_TOLERANCE",
    "CONFIDENCE_SCORES",
    "ATCEstimator",
    "AgreementEstimator",
    "atc_threshold",
    "confidence_score",
    "estimated_drop_warning",
    "expected_accuracy",
    "expected_auc",
    "shift_decision_boundary",
]

CONFIDENCE_SCORES = ("negative_entropy", "max_confidence")
"""The confidence scores of :func:`confidence_score`; Garg et al. found negative entropy (ATC-NE) best."""

TEMPERATURE_GRID = np.geomspace(0.05, 50.0, 200)
"""The log grid of temperatures τ that :class:`ATCEstimator` searches (then refines) for its AUC estimate."""

AUC_REACH_TOLERANCE = 0.02
"""The largest gap between ATC's accuracy and the closest temperature's expected accuracy for which
:class:`ATCEstimator` still gives an AUC estimate (wider: the AUC is NaN, see its docstring)."""

_EPS = 1e-12
_REFINE_STEPS = 4  # regula falsi steps within the best grid interval (each a pass over the images)


def expected_auc(scores: ArrayLike, q: ArrayLike, w: ArrayLike | None = None) -> float:
    """The AUC one expects when image i's label is Bernoulli(q_i), independently, and images are ranked by score.

    Ratio-of-expectations form, with ties counting one half::

        E[AUC] ≈ Σ_{i≠j} q_i (1 − q_j) [1(s_i > s_j) + ½ 1(s_i = s_j)] / Σ_{i≠j} q_i (1 − q_j)

    (the exact expectation of the ratio differs by O(1/N)). With sample weights ``w`` (e.g. how many times a
    bootstrap drew each image) the sums run over the ``w_i`` copies of each image, the copies of one image tying
    with each other::

        num = Σ_{i,j} w_i w_j q_i (1 − q_j) K_ij − ½ Σ_i w_i q_i (1 − q_i)
        den = (Σ_i w_i q_i) (Σ_j w_j (1 − q_j)) − Σ_i w_i q_i (1 − q_i)

    with ``K_ij = 1(s_i > s_j) + ½ 1(s_i = s_j)``, which equals the unweighted form on the index-duplicated arrays
    (and the first form when all weights are 1). Computed in O(N log N) by sorting the scores once and cumulating
    the negative mass ``w (1 − q)`` below and within each block of tied scores; no N × N matrix.

    Sanity: all q equal give 0.5; hard q (0 or 1) give the ordinary Mann-Whitney AUC.

    Args:
        scores: (N,) ranking scores (e.g. P(class 1)); any finite values, only their order matters.
        q: (N,) probabilities in [0, 1] that each image's label is 1.
        w: (N,) non-negative sample weights; None = all 1.

    Returns:
        The expected AUC in [0, 1]; NaN when there is (almost) no positive-negative label mass, e.g. all q equal
        to 0 or all to 1, or a single image.

    Examples:
        >>> expected_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])  # hard labels: sklearn's roc_auc_score
        0.75
        >>> round(expected_auc([0.1, 0.4, 0.35, 0.8], [0.3, 0.3, 0.3, 0.3]), 12)  # labels independent of the scores
        0.5
        >>> expected_auc([0.2, 0.9], [0.0, 1.0], w=[3, 1]) == expected_auc([0.2, 0.2, 0.2, 0.9], [0, 0, 0, 1])
        True
    """
    s = _check_vector(scores, "scores")
    qv = _check_vector(q, "q", length=s.size, unit=True)
    wv = np.ones(s.size) if w is None else _check_weights(w, s.size)
    return float(_expected_auc_rows(s, qv[None, :], wv[None, :])[0])


def expected_accuracy(prob: ArrayLike, q: ArrayLike, threshold: float, w: ArrayLike | None = None) -> float:
    """The accuracy at ``threshold`` one expects when image i's label is Bernoulli(q_i).

    Image i is decided positive when ``p_i >= threshold``; it is then correct with probability ``q_i``, otherwise
    with probability ``1 − q_i``. The result is the (weighted) mean of those probabilities.

    Args:
        prob: (N,) the model's P(class 1), in [0, 1].
        q: (N,) probabilities in [0, 1] that each image's label is 1 (with ``q = prob`` and a calibrated model:
            the model's own estimate of its accuracy).
        threshold: the operating threshold; positive when ``prob >= threshold``.
        w: (N,) non-negative sample weights; None = all 1.

    Returns:
        The expected accuracy in [0, 1].

    Examples:
        >>> expected_accuracy([0.9, 0.2, 0.6], [1.0, 0.0, 0.5], threshold=0.5)  # (1 + 1 + 0.5) / 3
        0.8333...
    """
    p = _check_vector(prob, "prob", unit=True)
    qv = _check_vector(q, "q", length=p.size, unit=True)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (the operating threshold), got {threshold!r}")
    wv = np.ones(p.size) if w is None else _check_weights(w, p.size)
    if not wv.sum() > 0:
        raise ValueError("the weights w sum to 0: at least one image needs a positive weight")
    return float(_expected_accuracy_rows(p >= threshold, qv[None, :], wv[None, :])[0])


def atc_threshold(source_scores: ArrayLike, source_correct: ArrayLike) -> float:
    """Average Thresholded Confidence threshold (Garg et al., ICLR 2022, eq. 1).

    The threshold ``t`` on a confidence score such that the fraction of source validation images with
    ``score < t`` equals the source validation error rate: ``E_S[1(s(x) < t)] = E_S[1(ŷ(x) ≠ y)]``. ATC then
    estimates the target accuracy as the fraction of target images with ``score >= t``. With ``k`` errors among
    the sorted scores ``s_(1) <= ... <= s_(N)``, ``t`` is the midpoint of ``s_(k)`` and ``s_(k+1)`` (``s_(1)``
    when ``k = 0``, just above ``s_(N)`` when ``k = N``); when scores tie there, the midpoint of the closest pair
    of distinct scores, so the fraction below ``t`` is as close to the error rate as the ties allow.

    Args:
        source_scores: (N,) confidence scores of the source validation images (:func:`confidence_score`).
        source_correct: (N,) whether the model's decision on each image was right (bool or 0/1).

    Returns:
        The threshold ``t``.

    Examples:
        >>> round(atc_threshold([0.9, 0.6, 0.8, 0.7], [True, False, True, True]), 6)  # 1 error: 1 score below t
        0.65
    """
    s = _check_vector(source_scores, "source_scores")
    correct = np.asarray(source_correct)
    if correct.shape != s.shape:
        raise ValueError(f"source_correct must be (N,) = ({s.size},), one per source score, got {correct.shape}")
    if correct.dtype != bool:
        if not np.isin(correct, (0, 1)).all():
            raise ValueError("source_correct must be booleans or 0/1: whether each source decision was right")
        correct = correct.astype(bool)
    k = int((~correct).sum())
    ss = np.sort(s)
    # the possible cuts and how many scores each leaves below it: none, each gap between distinct scores, all
    gaps = np.flatnonzero(ss[1:] != ss[:-1]) + 1
    counts = np.r_[0, gaps, ss.size]
    cuts = np.r_[ss[0], (ss[gaps - 1] + ss[gaps]) / 2, np.nextafter(ss[-1], np.inf)]
    return float(cuts[np.argmin(np.abs(counts - k))])


def shift_decision_boundary(prob: ArrayLike, threshold: float) -> NDArray[np.float64]:
    """Move the decision boundary from ``threshold`` to 0.5 by a prior shift: ``p' = p(1−t) / (p(1−t) + (1−p)t)``.

    The odds are multiplied by ``(1−t)/t``, so ``p' >= 0.5`` exactly when ``p >= t`` (enforced against rounding),
    and ``p' = p`` when ``t = 0.5``. A confidence of ``p'`` is then the confidence of the *thresholded* decision.

    Args:
        prob: (N,) P(class 1), in [0, 1].
        threshold: the operating threshold ``t``, in (0, 1).

    Returns:
        (N,) the shifted probabilities ``p'``, in [0, 1].

    Examples:
        >>> shift_decision_boundary([0.2, 0.3, 0.9], threshold=0.3)
        array([0.36842105, 0.5       , 0.95454545])
    """
    p = _check_vector(prob, "prob", unit=True)
    t = _check_threshold(threshold)
    num = p * (1.0 - t)
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = num / (num + (1.0 - p) * t)
    positive = p >= t
    return np.where(positive, np.maximum(shifted, 0.5), np.minimum(shifted, np.nextafter(0.5, 0.0)))


def confidence_score(prob: ArrayLike, threshold: float = 0.5, kind: str = "negative_entropy") -> NDArray[np.float64]:
    """The confidence of the thresholded decision ``p >= threshold``, for ATC.

    The probabilities are first shifted so that the decision boundary lies at 0.5
    (:func:`shift_decision_boundary`); the score is then ``max(p', 1 − p')`` (``"max_confidence"``, in [0.5, 1])
    or the negative entropy ``p' log p' + (1 − p') log(1 − p')`` (``"negative_entropy"``, in [−log 2, 0]; ATC-NE,
    the better of the two in Garg et al.). Higher = more confident, for either kind.

    Args:
        prob: (N,) P(class 1), in [0, 1].
        threshold: the operating threshold, in (0, 1).
        kind: one of ``CONFIDENCE_SCORES``.

    Returns:
        (N,) confidence scores.

    Examples:
        >>> confidence_score([0.5, 0.9, 0.1], kind="max_confidence")
        array([0.5, 0.9, 0.9])
        >>> confidence_score([0.5, 1.0])  # -log 2 at the boundary, 0 when certain
        array([-0.69314718,  0.        ])
    """
    if kind not in CONFIDENCE_SCORES:
        raise ValueError(f"kind must be one of {CONFIDENCE_SCORES} (negative_entropy is ATC-NE, the default), "
                         f"got {kind!r}")
    shifted = shift_decision_boundary(prob, threshold)
    if kind == "max_confidence":
        return np.maximum(shifted, 1.0 - shifted)
    return _xlogx(shifted) + _xlogx(1.0 - shifted)


class ATCEstimator(BaseEstimator):
    """Label-free estimate of a model's target accuracy and AUC by Average Thresholded Confidence.

    Garg et al., "Leveraging Unlabeled Data to Predict Out-of-Distribution Performance", ICLR 2022. ``fit`` learns,
    on the labeled source validation split, the threshold ``t`` on the confidence score (:func:`confidence_score`
    of the decision at the operating threshold) below which the fraction of images equals the source error rate
    (:func:`atc_threshold`). ``estimate`` predicts the target accuracy at the operating threshold as the fraction
    of target images whose score is ``>= t``.

    **AUC (medtl's extension; ATC itself estimates accuracy only).** The target probabilities are
    temperature-scaled, ``q_i = σ(logit(p_i) / τ)``, with τ chosen on a log grid (``TEMPERATURE_GRID``: 200 points
    in [0.05, 50], then regula falsi refinement within the best grid interval) so that
    ``expected_accuracy(p, q, threshold)`` is closest to the ATC accuracy estimate; the AUC estimate is
    ``expected_auc(p, q)``. τ > 1 softens an over-confident model (τ → ∞: q = ½, AUC 0.5). It assumes that the
    shift leaves the ranking informative in proportion to the confidence lost, as when the classes move closer
    together. Some accuracies are out of the grid's reach (below about 0.5, or above what τ = 0.05 gives). Then
    no softening of these scores explains the errors ATC expects: they come from where the operating threshold
    falls (the scores moved as a whole, a location shift that leaves the ranking, and so the AUC, intact), so
    there is **no AUC estimate** (NaN) when the gap exceeds ``AUC_REACH_TOLERANCE``; the accuracy estimate stands,
    the gap is reported in ``details["temperature_gap"]`` and ``notes`` says why. (Seen on the demo's target: ATC
    expected accuracy 0.43 and the measured one was 0.33, while the AUC stayed 0.92; the closest temperature
    would have claimed an AUC of 0.51.) Bootstrap replicates out of reach count as undefined.

    **Bootstrap.** Percentile intervals over ``n_bootstrap`` resamples of the target images (of patients, keeping
    all their images, when ``groups`` are given), each replicate recomputing both estimates (τ included) from
    weights. The source-side fit (``atc_threshold_``) is kept fixed, so the intervals do not include the
    uncertainty of a finite source validation split (with ~100 source errors, the ATC threshold alone moves the
    estimate by a few points of accuracy: a source validation split of a few thousand images is advisable).

    **Limitations.** ATC is exact only when the target's errors are its least confident images in the source's
    proportion. On two Gaussian classes brought closer together (target feature ``a·x + noise``), it is right when
    the added noise roughly balances the lost separation, but it *under*-estimates the accuracy when the model stays
    calibrated and merely grows less confident, and *over*-estimates it (by 0.1 or more of accuracy and of AUC)
    when the model is over-confident on the target, i.e. when noise spreads the scores as much as the classes
    close up: a silent failure of exactly the kind it is meant to catch. Read the estimate as a screening signal
    next to the shift diagnostics, never as a measurement. For a binary task the two scores are monotone in each
    other (both in ``|p' − ½|``), so their estimates differ only by target images whose score falls between the
    two source scores around ``t``; the choice matters for more classes.

    Args:
        score: the confidence score, one of ``CONFIDENCE_SCORES``.
        n_bootstrap: bootstrap replicates; 0 = point estimates only (intervals NaN).
        confidence: two-sided level of the percentile intervals, in (0, 1).
        seed: seed of the bootstrap's random generator.

    Attributes:
        threshold_: the operating threshold (positive when ``p >= threshold_``).
        atc_threshold_: ATC's threshold ``t`` on the confidence score.
        source_accuracy_: accuracy at ``threshold_`` on the source validation split.
        source_auc_: AUC on it (sklearn's ``roc_auc_score``; NaN with a single class).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 4000)  # source: two Gaussian classes, a calibrated logistic model
        >>> p = expit(3.0 * (rng.normal(size=4000) + 1.5 * (2 * y - 1)))
        >>> yt = rng.integers(0, 2, 600)  # target: the classes 3.3x closer, plus noise
        >>> pt = expit(3.0 * (0.3 * (rng.normal(size=600) + 1.5 * (2 * yt - 1)) + 0.6 * rng.normal(size=600)))
        >>> atc = ATCEstimator(n_bootstrap=200).fit(p, y, threshold=0.5)
        >>> est = atc.estimate(pt)
        >>> true_accuracy = float(np.mean((pt >= 0.5) == yt))  # from the target labels ATC does not see
        >>> round(atc.source_accuracy_, 2), round(est["accuracy"]["value"], 2), round(true_accuracy, 2)
        (0.93, 0.75, 0.76)
        >>> round(atc.source_auc_, 2), round(est["auc"]["value"], 2), round(roc_auc_score(yt, pt), 2)  # truth last
        (0.98, 0.83, 0.83)
    """

    def __init__(self, score: str = "negative_entropy", n_bootstrap: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> None:
        self.score = score
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.seed = seed
        self._check_params()

    def fit(self, source_prob: ArrayLike, source_labels: ArrayLike, threshold: float) -> "ATCEstimator":
        """Learn ATC's confidence threshold on the labeled source validation split.

        Args:
            source_prob: (N_s,) the model's P(class 1) on the source validation images.
            source_labels: (N_s,) their labels, 0 or 1.
            threshold: the model's operating threshold, in (0, 1) (e.g. Youden's, chosen on this split).

        Returns:
            self, fitted.
        """
        self._check_params()
        p = _check_vector(source_prob, "source_prob", unit=True)
        y = np.asarray(source_labels)
        if y.shape != p.shape or not np.isin(y, (0, 1)).all():
            raise ValueError(f"source_labels must be (N_s,) = ({p.size},) labels 0 or 1, one per source_prob "
                             f"(drop unlabeled images), got shape {y.shape}")
        t = _check_threshold(threshold)
        correct = (p >= t) == (y == 1)
        self.threshold_ = t
        self.atc_threshold_ = atc_threshold(confidence_score(p, t, self.score), correct)
        self.source_accuracy_ = float(correct.mean())
        self.source_auc_ = float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan")
        return self

    def estimate(self, target_prob: ArrayLike, groups: ArrayLike | None = None) -> dict:
        """Estimate the accuracy at ``threshold_`` and the AUC on the unlabeled target images.

        Args:
            target_prob: (N,) the model's P(class 1) on the target images.
            groups: (N,) patient id per image, for a patient-level bootstrap; None = images independent.

        Returns:
            ``{"method": "atc", "accuracy": {"value", "ci_low", "ci_high"}, "auc": {...}, "n", "n_patients",
            "n_bootstrap" (replicates with both estimates finite), "confidence", "details": {"atc_threshold",
            "temperature", "temperature_gap", "source_accuracy", "source_auc"}, "notes": [str]}``, plain floats
            (NaN where undefined).
        """
        check_is_fitted(self, "atc_threshold_",
                        msg="This ATCEstimator is not fitted yet: call fit(source_prob, source_labels, threshold) "
                            "on the labeled source validation split first.")
        self._check_params()
        p = _check_vector(target_prob, "target_prob", unit=True)
        codes, n_groups = _group_codes(groups, p.size)
        above = confidence_score(p, self.threshold_, self.score) >= self.atc_threshold_
        decision = p >= self.threshold_
        logit = np.log(np.clip(p, _EPS, 1 - _EPS)) - np.log(np.clip(1 - p, _EPS, 1 - _EPS))
        grid_q = expit(logit[None, :] / TEMPERATURE_GRID[:, None])  # (G, N)
        grid_correct = np.where(decision[None, :], grid_q, 1.0 - grid_q)

        def replicates(w: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
            accuracy = (w @ above) / w.sum(axis=1)
            tau, gap = _fit_temperature(logit, decision, w, accuracy, grid_correct)
            auc = _expected_auc_rows(p, expit(logit[None, :] / tau[:, None]), w)
            auc = np.where(gap > AUC_REACH_TOLERANCE, np.nan, auc)
            return {"accuracy": accuracy, "auc": auc, "tau": tau, "gap": gap}

        point = replicates(np.ones((1, p.size)))
        reps = _bootstrap(replicates, codes, n_groups, ("accuracy", "auc"), self.n_bootstrap, self.seed)
        tau, gap = float(point["tau"][0]), float(point["gap"][0])
        notes = []
        if gap > AUC_REACH_TOLERANCE:
            notes.append(f"no temperature in [{TEMPERATURE_GRID[0]:g}, {TEMPERATURE_GRID[-1]:g}] makes the expected "
                         f"accuracy equal ATC's {point['accuracy'][0]:.3f} (closest: {gap:.3f} away, τ = {tau:.3g}): "
                         "the errors ATC expects come from where the operating threshold falls, not from a loss of "
                         "ranking, so ATC gives no AUC estimate here; the threshold chosen at the source may not "
                         "transfer")
        elif gap > 0.005:
            notes.append(f"no temperature makes the expected accuracy equal ATC's {point['accuracy'][0]:.3f} exactly "
                         f"(closest: {gap:.3f} away, τ = {tau:.3g}); the AUC estimate is that of the closest "
                         "temperature")
        details = {"atc_threshold": float(self.atc_threshold_), "temperature": tau, "temperature_gap": gap,
                   "source_accuracy": float(self.source_accuracy_), "source_auc": float(self.source_auc_)}
        return _result("atc", point, reps, self.confidence, p.size, n_groups, details, notes,
                       auc_out_of_reach=gap > AUC_REACH_TOLERANCE)

    def _check_params(self) -> None:
        if self.score not in CONFIDENCE_SCORES:
            raise ValueError(f"score must be one of {CONFIDENCE_SCORES} (negative_entropy, ATC-NE, did best in "
                             f"Garg et al.), got {self.score!r}")
        _check_bootstrap_params(self.n_bootstrap, self.confidence, self.seed)


class AgreementEstimator(BaseEstimator):
    """Label-free estimate of a model's target accuracy and AUC from the agreement of a pool of candidate models.

    After Jiang et al., "Assessing Generalization of SGD via Disagreement", ICLR 2022, and Baek et al.,
    "Agreement-on-the-Line", NeurIPS 2022: the pool's mean probability ``q_i = mean_k p_k,i`` stands in for the
    unknown label of target image i, so the estimated accuracy is ``expected_accuracy(target_prob, q, threshold)``
    and the estimated AUC ``expected_auc(target_prob, q)``. The natural pool is the candidates that unsupervised
    model selection ranks (every epoch of every adaptation method), the pool whose agreement EnsV uses (Hu et al.,
    NeurIPS 2024 D&B). The estimate is optimistic when the candidates share the same errors (e.g. all epochs of
    one method that learned a shortcut): a diverse pool is better.

    A pool of one candidate is allowed, but with the model itself as the pool it then only reflects the model's own
    confidence (``q = p``: the accuracy a calibrated model would expect of itself), which is what fails under shift.

    The bootstrap resamples target images (patients, when ``groups`` are given) with the pool fixed.

    Args:
        n_bootstrap: bootstrap replicates; 0 = point estimates only (intervals NaN).
        confidence: two-sided level of the percentile intervals, in (0, 1).
        seed: seed of the bootstrap's random generator.

    Examples:
        >>> p = np.array([0.9, 0.8, 0.2, 0.1])
        >>> pool = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # the second disagrees on two images
        >>> est = AgreementEstimator(n_bootstrap=0).estimate(p, pool, threshold=0.5)
        >>> est["accuracy"]["value"], est["details"]["mean_pairwise_disagreement"]
        (0.75, 0.5)
    """

    def __init__(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> None:
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.seed = seed
        self._check_params()

    def fit(self, X: None = None, y: None = None) -> "AgreementEstimator":  # noqa: N803 (scikit-learn's names)
        """Nothing to learn (no source-side fit); present for scikit-learn's API.

        Returns:
            self.
        """
        self._check_params()
        return self

    def estimate(self, target_prob: ArrayLike, pool_probabilities: ArrayLike | Sequence[ArrayLike], threshold: float,
                 groups: ArrayLike | None = None) -> dict:
        """Estimate the model's accuracy at ``threshold`` and its AUC on the target, the pool's mean as the label.

        Args:
            target_prob: (N,) the evaluated model's P(class 1) on the target images.
            pool_probabilities: (K, N) P(class 1) of K >= 1 candidate models on the same N images, same order
                (the evaluated model may be one of them).
            threshold: the operating threshold, in (0, 1); it also gives the candidates' decisions for the
                disagreement.
            groups: (N,) patient id per image, for a patient-level bootstrap; None = images independent.

        Returns:
            ``{"method": "agreement", "accuracy": {"value", "ci_low", "ci_high"}, "auc": {...}, "n",
            "n_patients", "n_bootstrap" (replicates with both estimates finite), "confidence", "details":
            {"pool_size", "mean_pairwise_disagreement"}, "notes": [str]}``, plain floats (NaN where undefined).
            The disagreement is the fraction of images on which two candidates' decisions at ``threshold``
            differ, averaged over the K(K−1)/2 pairs (NaN for K = 1).
        """
        self._check_params()
        p = _check_vector(target_prob, "target_prob", unit=True)
        pool = np.asarray(pool_probabilities, dtype=np.float64)
        if pool.ndim == 1:
            pool = pool[None, :]
        if pool.ndim != 2 or pool.shape[0] < 1 or pool.shape[1] != p.size:
            raise ValueError(f"pool_probabilities must be (K, N) = (K, {p.size}): P(class 1) of K >= 1 candidates on "
                             f"the same target images as target_prob, got shape {pool.shape}")
        if not (np.isfinite(pool).all() and (pool >= 0).all() and (pool <= 1).all()):
            raise ValueError("pool_probabilities must be P(class 1) in [0, 1] without NaN: apply a sigmoid / "
                             "softmax to the candidates' logits first")
        t = _check_threshold(threshold)
        codes, n_groups = _group_codes(groups, p.size)
        q = pool.mean(axis=0)
        decision = p >= t

        def replicates(w: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
            return {"accuracy": _expected_accuracy_rows(decision, q[None, :], w),
                    "auc": _expected_auc_rows(p, q[None, :], w)}

        point = replicates(np.ones((1, p.size)))
        reps = _bootstrap(replicates, codes, n_groups, ("accuracy", "auc"), self.n_bootstrap, self.seed)
        k = pool.shape[0]
        notes = []
        if k == 1:
            disagreement = float("nan")
            notes.append("a pool of one candidate: the estimate only reflects that candidate's confidence")
        else:
            n_positive = (pool >= t).sum(axis=0)
            disagreement = float((n_positive * (k - n_positive)).mean() / (k * (k - 1) / 2))
        details = {"pool_size": int(k), "mean_pairwise_disagreement": disagreement}
        return _result("agreement", point, reps, self.confidence, p.size, n_groups, details, notes)

    def _check_params(self) -> None:
        _check_bootstrap_params(self.n_bootstrap, self.confidence, self.seed)


def estimated_drop_warning(estimate: dict, source_auc: float, margin: float = 0.10, *, site: str,
                           source_accuracy: float | None = None) -> str | None:
    """A plain-language warning for a clinical reviewer when a label-free estimate is far below the source's.

    Warns when the upper bound of the estimated AUC's interval (the estimate itself when there is no interval) is
    below ``source_auc − margin``: even the optimistic end of the estimate is a drop of more than ``margin``.
    Otherwise, when ``source_accuracy`` is given, the same test on the accuracy at the operating threshold: a model
    can keep its ranking (AUC) at a new hospital while its scores move as a whole, so that the threshold chosen at
    the source no longer separates the classes there.

    Args:
        estimate: the dict of :meth:`ATCEstimator.estimate` or :meth:`AgreementEstimator.estimate`.
        source_auc: the AUC on the source validation split, in [0, 1].
        margin: the drop, in AUC or accuracy, that is worth a warning.
        site: the target site's name, as the report shows it.
        source_accuracy: the accuracy at the operating threshold on the source validation split, in [0, 1];
            None = no accuracy warning.

    Returns:
        The sentence, or None when the estimate is not that far below (or is undefined).

    Examples:
        >>> est = {"method": "atc", "auc": {"value": 0.62, "ci_low": 0.55, "ci_high": 0.68}, "n": 600,
        ...        "confidence": 0.95, "accuracy": {"value": 0.6, "ci_low": 0.56, "ci_high": 0.64}}
        >>> print(estimated_drop_warning(est, 0.95, site="Hospital B"))  # doctest: +NORMALIZE_WHITESPACE
        Expected AUC at Hospital B 0.62 [0.55–0.68] without its labels, far below the source validation AUC 0.95:
        the model is likely to perform much worse there (expected accuracy at the operating threshold 0.60
        [0.56–0.64]). This is an estimate from Average Thresholded Confidence (Garg et al., ICLR 2022) on 600
        unlabeled images, 95 % interval, not a measurement: label a sample of Hospital B's patients and validate
        the model there before it is used on them.
        >>> estimated_drop_warning(est, 0.70, site="Hospital B") is None
        True
        >>> print(estimated_drop_warning(est, 0.70, site="Hospital B", source_accuracy=0.9))
        ... # doctest: +NORMALIZE_WHITESPACE
        Expected accuracy at the operating threshold at Hospital B 0.60 [0.56–0.64] without its labels, far below
        the source validation accuracy 0.90: the threshold chosen at the source may not transfer there
        (sensitivity and specificity far from the source's), even where the ranking of patients holds. This is an
        estimate from Average Thresholded Confidence (Garg et al., ICLR 2022) on 600 unlabeled images, 95 %
        interval, not a measurement: label a sample of Hospital B's patients and validate the model there before
        it is used on them.
    """
    if not (isinstance(source_auc, (int, float, np.floating)) and 0 <= source_auc <= 1):
        raise ValueError(f"source_auc must be the source validation AUC, a number in [0, 1], got {source_auc!r}")
    if source_accuracy is not None and not (isinstance(source_accuracy, (int, float, np.floating))
                                            and 0 <= source_accuracy <= 1):
        raise ValueError("source_accuracy must be the source validation accuracy at the operating threshold, a "
                         f"number in [0, 1], or None, got {source_accuracy!r}")
    if not (isinstance(margin, (int, float, np.floating)) and margin >= 0):
        raise ValueError(f"margin must be a non-negative AUC difference such as 0.10, got {margin!r}")
    if not isinstance(site, str) or not site:
        raise ValueError(f"site must be the target site's name as the report shows it, got {site!r}")
    try:
        auc = _interval_values(estimate["auc"])
        accuracy = _interval_values(estimate.get("accuracy") or {"value": np.nan})
    except (KeyError, TypeError) as exc:
        raise ValueError("estimate must be the dict of ATCEstimator.estimate or AgreementEstimator.estimate, with "
                         "estimate['auc'] = {'value', 'ci_low', 'ci_high'}") from exc
    if _far_below(auc, source_auc, margin):
        shown = auc
        sentence = (f"Expected AUC at {site} {_figure(*auc)} without its labels, far below the source validation "
                    f"AUC {source_auc:.2f}: the model is likely to perform much worse there")
        if math.isfinite(accuracy[0]):
            sentence += f" (expected accuracy at the operating threshold {_figure(*accuracy)})"
    elif source_accuracy is not None and _far_below(accuracy, source_accuracy, margin):
        shown = accuracy
        sentence = (f"Expected accuracy at the operating threshold at {site} {_figure(*accuracy)} without its "
                    f"labels, far below the source validation accuracy {source_accuracy:.2f}: the threshold chosen "
                    "at the source may not transfer there (sensitivity and specificity far from the source's), "
                    "even where the ranking of patients holds")
    else:
        return None
    method = estimate.get("method")
    if method == "atc":
        how = "Average Thresholded Confidence (Garg et al., ICLR 2022)"
    elif method == "agreement":
        size = (estimate.get("details") or {}).get("pool_size")
        how = f"the agreement of {size} candidate models" if size else "the agreement of candidate models"
    else:
        how = "a label-free estimator"
    n = estimate.get("n")
    on = f" on {n} unlabeled images" if n else ""
    level = estimate.get("confidence")
    has_interval = math.isfinite(shown[1]) and math.isfinite(shown[2])
    interval = f", {100 * level:g} % interval" if has_interval and level else ""
    return (f"{sentence}. This is an estimate from {how}{on}{interval}, not a measurement: label a sample of "
            f"{site}'s patients and validate the model there before it is used on them.")


def _interval_values(block: dict) -> tuple[float, float, float]:
    return tuple(float(block.get(key, np.nan)) for key in ("value", "ci_low", "ci_high"))  # type: ignore[return-value]


def _far_below(interval: tuple[float, float, float], reference: float, margin: float) -> bool:
    """Whether even the optimistic end of ``interval`` (its value when there is no interval) is more than
    ``margin`` below ``reference``."""
    value, low, high = interval
    bound = high if math.isfinite(low) and math.isfinite(high) else value
    return math.isfinite(bound) and bound < reference - margin


def _figure(value: float, low: float, high: float) -> str:
    value, low, high = float(value), float(low), float(high)
    if math.isfinite(low) and math.isfinite(high):
        return f"{value:.2f} [{low:.2f}–{high:.2f}]"
    return f"{value:.2f} (no interval)"


def _expected_auc_rows(s: NDArray[np.float64], q: NDArray[np.float64], w: NDArray[np.float64]) -> NDArray[np.float64]:
    """:func:`expected_auc` for each row of weights ``w`` (R, N) and label probabilities ``q`` (R or 1, N)."""
    order = np.argsort(s, kind="stable")
    ss = s[order]
    qs = np.broadcast_to(q, w.shape)[:, order]
    ws = w[:, order]
    first = np.r_[True, ss[1:] != ss[:-1]]
    block = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], ss.size]
    positive = ws * qs
    negative = ws - positive
    negative_cum = np.concatenate([np.zeros((ws.shape[0], 1)), np.cumsum(negative, axis=1)], axis=1)
    below = negative_cum[:, starts[block]]
    tied = negative_cum[:, ends[block]] - below
    self_pairs = (positive * (1.0 - qs)).sum(axis=1)  # Σ w q (1 − q): an image is never paired with itself
    numerator = (positive * (below + 0.5 * tied)).sum(axis=1) - 0.5 * self_pairs
    denominator = positive.sum(axis=1) * negative_cum[:, -1] - self_pairs
    total = ws.sum(axis=1)
    defined = denominator > _EPS * np.maximum(total * total, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, np.clip(numerator / denominator, 0.0, 1.0), np.nan)


def _expected_accuracy_rows(decision: NDArray[np.bool_], q: NDArray[np.float64],
                            w: NDArray[np.float64]) -> NDArray[np.float64]:
    correct = np.where(decision, q, 1.0 - q)  # (R or 1, N)
    return (w * correct).sum(axis=1) / w.sum(axis=1)


def _fit_temperature(logit: NDArray[np.float64], decision: NDArray[np.bool_], w: NDArray[np.float64],
                     target: NDArray[np.float64], grid_correct: NDArray[np.float64]
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per row of weights: the τ whose expected accuracy is closest to ``target``, and the remaining gap.

    ``grid_correct`` (G, N) holds each image's probability of being right at each τ of ``TEMPERATURE_GRID``. When
    the expected accuracy crosses ``target`` between the best grid point and a neighbour, the crossing is refined
    by regula falsi (Illinois variant) over log τ; otherwise (an accuracy out of reach) the best grid point stays."""
    total = w.sum(axis=1)
    log_grid = np.log(TEMPERATURE_GRID)
    last = len(log_grid) - 1
    grid_diff = (w @ grid_correct.T) / total[:, None] - target[:, None]  # (R, G): expected − target accuracy
    rows = np.arange(len(total))
    best = np.argmin(np.abs(grid_diff), axis=1)
    d_best = grid_diff[rows, best]
    # the neighbour on the other side of the crossing, if any (the one with the smaller |difference| if both)
    left, right = np.maximum(best - 1, 0), np.minimum(best + 1, last)
    d_left, d_right = grid_diff[rows, left], grid_diff[rows, right]
    cross_left = (left != best) & (np.sign(d_left) == -np.sign(d_best)) & (d_best != 0)
    cross_right = (right != best) & (np.sign(d_right) == -np.sign(d_best)) & (d_best != 0)
    use_right = cross_right & (~cross_left | (np.abs(d_right) < np.abs(d_left)))
    other = np.where(use_right, right, left)
    crossing = cross_left | cross_right
    x_a, d_a = log_grid[best], d_best
    x_b, d_b = log_grid[other], np.where(use_right, d_right, d_left)
    x_best, gap_best = x_a.copy(), np.abs(d_a)
    signed_w = w * np.where(decision, 1.0, -1.0)  # correct = (1 − d) + (2d − 1) q, d = the decision
    base = (w @ ~decision) / total
    if crossing.any():
        for _ in range(_REFINE_STEPS):
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.where(crossing, x_a - d_a * (x_b - x_a) / (d_b - d_a), x_a)
            x = np.where(np.isfinite(x), x, x_a)
            q = expit(logit[None, :] * np.exp(-x)[:, None])
            d = base + np.einsum("rn,rn->r", signed_w, q) / total - target
            better = crossing & (np.abs(d) < gap_best)
            x_best, gap_best = np.where(better, x, x_best), np.where(better, np.abs(d), gap_best)
            same_side = np.sign(d) == np.sign(d_b)  # x replaces b; a stays and, if it stayed before, is halved
            x_a, d_a, x_b, d_b = (np.where(same_side, x_a, x_b), np.where(same_side, d_a * 0.5, d_b),
                                  x, d)
    return np.exp(x_best), gap_best


def _bootstrap(replicates, codes: NDArray[np.intp], n_groups: int, names: tuple[str, ...],  # noqa: ANN001
               n_bootstrap: int, seed: int | None) -> dict[str, NDArray[np.float64]]:
    """Replicates of ``names`` over ``n_bootstrap`` (patient-level) resamples, as weights, in memory-sized blocks."""
    out = {name: np.empty(n_bootstrap) for name in names}
    rng = np.random.default_rng(seed)
    for start, stop in _blocks(n_bootstrap, max(codes.size, n_groups)):
        block = replicates(_group_weights(rng, n_groups, stop - start)[:, codes])
        for name in names:
            out[name][start:stop] = block[name]
    return out


def _result(method: str, point: dict, reps: dict, confidence: float, n: int, n_groups: int, details: dict,
            notes: list[str], auc_out_of_reach: bool = False) -> dict:
    """The estimate's dict; ``auc_out_of_reach``: the AUC is undefined for the reason already in ``notes``."""
    out: dict = {"method": method}
    for name in ("accuracy", "auc"):
        low, high, _ = _percentile_ci(reps[name], confidence)
        out[name] = {"value": float(point[name][0]), "ci_low": low, "ci_high": high}
    if auc_out_of_reach:
        out["auc"] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
        valid = int(np.isfinite(reps["accuracy"]).sum())
    else:
        n_rep = len(reps["accuracy"])
        valid = int((np.isfinite(reps["accuracy"]) & np.isfinite(reps["auc"])).sum())
        if valid < n_rep:
            notes.append(f"{n_rep - valid} of {n_rep} bootstrap replicates had an undefined estimate (a resample "
                         "without positive-negative label mass, or out of ATC's temperature reach) and were left "
                         "out of the intervals")
        if not math.isfinite(out["auc"]["value"]):
            notes.append("the AUC estimate is undefined: the stand-in labels have no positive-negative mass")
    out.update(n=int(n), n_patients=int(n_groups), n_bootstrap=valid, confidence=float(confidence), details=details,
               notes=notes)
    return out


def _check_vector(values: ArrayLike, name: str, length: int | None = None, unit: bool = False) -> NDArray[np.float64]:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers, one per image") from exc
    if v.ndim != 1 or v.size == 0 or (length is not None and v.size != length):
        want = f"({length},), one per image" if length is not None else "1-D and non-empty, one value per image"
        raise ValueError(f"{name} must be {want}, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf: drop those images first")
    if unit and ((v < 0).any() or (v > 1).any()):
        raise ValueError(f"{name} must be probabilities in [0, 1] (P(class 1)): apply a sigmoid / softmax to logits")
    return v


def _check_weights(w: ArrayLike, n: int) -> NDArray[np.float64]:
    wv = _check_vector(w, "w", length=n)
    if (wv < 0).any():
        raise ValueError("w must be non-negative sample weights (e.g. how often the bootstrap drew each image)")
    return wv


def _check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float, np.floating, np.integer)) and 0 < threshold < 1):
        raise ValueError(f"threshold must be the operating threshold on P(class 1), strictly between 0 and 1, got "
                         f"{threshold!r}")
    return float(threshold)


def _check_bootstrap_params(n_bootstrap: int, confidence: float, seed: int | None) -> None:
    _check_bootstrap(n_bootstrap, confidence)
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer (or None for a fresh random state), got {seed!r}")


def _xlogx(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return x * np.log(np.where(x > 0, x, 1.0))
